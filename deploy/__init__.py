"""Serving side of reviewkd: runners, the artifact manifest, predict and Triton.

This package imports nothing from `reviewkd`, `export` or `benchmarks` and needs only numpy,
the standard library and the runtime of the file it serves (onnxruntime or TensorRT).
"""
