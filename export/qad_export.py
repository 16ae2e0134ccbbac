"""Q/DQ ONNX files from a QAD run (reviewkd.qad): the fine-tuned scales, not post-training calibration.

torch's exporter writes each fake-quantize op of the QAD student as a QuantizeLinear/DequantizeLinear
pair; onnxscript's optimizer folds the scale arithmetic into constants. Two files, each checked like
every int8 export file (export.check's int8 gate against the fp32 student, on the run's validation
images) and recorded in the run's manifest:

    export/student.int8.qad.trt.onnx  symmetric int8 Q/DQ, zero points 0, per-channel weights, float
                                      biases: TensorRT's explicit-quantization form ("int8-qad-trt")
    export/student.int8.qad.onnx      the same quantization with each activation pair re-expressed as
                                      uint8 with zero point 128 (identical values), the activation type
                                      of ONNX Runtime's CPU int8 kernels ("int8-qad")

Both files carry 8-bit weights, as QAD trained them, and are marked to run unfused in ONNX Runtime
(deploy's UNFUSED_QDQ_KEY): its fused AVX2 kernels saturate on 8-bit weights (export.precision).

Each check also records the file's parity with the fake-quantized PyTorch model it came from:
`qad_max_abs_diff`, `qad_top1_agreement` and `qad_samples_within_1e4` (the share of samples whose
logits all agree to 1e-4). Parity is close, not exact: torch multiplies by 1/scale where
QuantizeLinear divides, and ONNX Runtime's integer kernels (QLinearConv) requantize in their own
rounding, so a value near a rounding boundary lands one int8 step apart and that step travels on.
Evaluated node by node (ONNX Runtime's QDQ fusions off, as the files now run) most samples agree to
1e-4; with the integer kernels most logits moved a little (on the digits student: max 0.39 on logits
up to 8).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import ensure_writable_dir, sha256_file
from deploy.manifest import input_spec, model_block, read_manifest, write_manifest
from deploy.run_lock import locks_run
from deploy.runners.onnxruntime_runner import session_device
from export.check import CheckResult, compare, gate, open_check_session, run_session
from export.onnx_export import DEFAULT_OPSET, optimize_onnx, save_onnx, set_metadata, torch_export
from export.pipeline import STUDENT_FILE, load_student, run_batches, torch_logits
from export.precision import Int8Flavour, zero_points_all_zero
from export.producing import BatchSource, ExportRecorder, ExportSummary
from reviewkd.qad import load_qad_student

# QAD trained full 8-bit weights, so both files run unfused in ONNX Runtime (Int8Flavour.runs_unfused);
# biases stay float as TensorRT takes them; QAD quantizes every layer, so no layer is left in float.
QAD_TRT_FLAVOUR = Int8Flavour(
    "qad-trt",
    activation="int8",
    symmetric_activations=True,
    quantize_bias=False,
    weight_bits=8,
    float_layers="fp32",
)
QAD_CPU_FLAVOUR = dataclasses.replace(
    QAD_TRT_FLAVOUR, name="qad-cpu", activation="uint8", symmetric_activations=False
)


def _description(flavour: Int8Flavour, qad: dict[str, Any]) -> dict[str, Any]:
    return {
        **flavour.describe(),
        "calibration": {
            "method": "qad",
            "selected": qad.get("selected"),
            "epochs": qad.get("epochs"),
            "samples": qad.get("calibrated", {}).get("samples"),
        },
    }


def activations_to_uint8(model: onnx.ModelProto) -> int:
    """Re-express every activation Q/DQ pair (int8, zero point 0) as uint8 with zero point 128, in place.

    q_uint8 = q_int8 + 128 over the same scale: the dequantized values are identical. Weight pairs
    (those quantizing an initializer) keep int8. Returns the number of pairs changed.
    """
    initializers = {i.name for i in model.graph.initializer}
    quantize_of = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    changed = 0
    retyped: set[str] = set()
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in quantize_of:
            continue
        quantize = quantize_of[node.input[0]]
        if quantize.input[0] in initializers:
            continue
        name = f"{quantize.name or quantize.output[0]}_uint8_zero_point"
        model.graph.initializer.append(numpy_helper.from_array(np.array(128, dtype=np.uint8), name))
        for q_or_dq in (quantize, node):
            del q_or_dq.input[2:]
            q_or_dq.input.append(name)
        retyped.add(quantize.output[0])
        changed += 1
    # Shape inference recorded the pairs' int8 tensors; let the checker infer the uint8 ones afresh.
    kept = [v for v in model.graph.value_info if v.name not in retyped]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return changed


def qdq_model(quantized: torch.nn.Module, input_shape: tuple[int, int, int], opset: int) -> onnx.ModelProto:
    """The fake-quantized model traced to ONNX: each fake-quantize op a QuantizeLinear/DequantizeLinear
    pair, the scale arithmetic folded into constants. Raises UsageError on a non-zero zero point."""
    proto = optimize_onnx(torch_export(quantized.eval(), input_shape, opset))
    proto.producer_name = "reviewkd"
    if not zero_points_all_zero(proto):
        raise UsageError("the exported Q/DQ graph has a non-zero zero point; expected symmetric int8")
    return proto


def samples_within(logits: np.ndarray, reference: np.ndarray, tolerance: float) -> float:
    """The fraction of samples whose every logit is within `tolerance` of the reference's."""
    return float(np.mean(np.abs(logits - reference).max(axis=1) <= tolerance))


@locks_run("export")
def export_qad(
    run_dir: str | os.PathLike[str],
    *,
    check_samples: int = 2000,
    batch_size: int = 64,
    opset: int = DEFAULT_OPSET,
    batches: BatchSource | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> ExportSummary:
    """Export RUN/qad/student.safetensors to the two Q/DQ files, check them and record them in the manifest.

    Returns the summary; its raise_for_status() turns a failed gate into exit code 1.

    Raises:
        UsageError: no QAD run, a bad manifest, an unwritable export folder, bad options.
    """
    run = Path(run_dir)
    for name, value in (("check_samples", check_samples), ("batch_size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1, got {value}")
    manifest = read_manifest(run)
    qad_block = manifest.get("qad")
    if not qad_block or not qad_block.get("weights"):
        raise UsageError(f"{run / 'manifest.json'}: no qad block; run `reviewkd quantize {run}` first")
    input_shape = input_spec(manifest).shape
    student = load_student(run, manifest)
    quantized, _plan = load_qad_student(run)
    ensure_writable_dir(run / "export")
    summary = ExportSummary(run)
    recorder = ExportRecorder(run, manifest, summary)
    source = batches if batches is not None else run_batches(run)
    pairs = list(source("val", batch_size, check_samples))
    if not pairs:
        raise UsageError(f"{run}: the validation split has no images to check the QAD files on")
    images = [p[0].astype(np.float32) for p in pairs]
    labels = np.concatenate([p[1] for p in pairs])
    summary.check_data = f"{len(labels)} validation images of the run"
    reference = torch_logits(student, images)
    qad_logits = torch_logits(quantized, images)

    recorded = model_block(manifest, "student")
    metadata = {
        "classes": manifest.get("classes", []),
        "input": manifest.get("input", {}),
        "student": {"arch": recorded.arch, "num_classes": recorded.num_classes, "sha256": recorded.sha256},
        "source_sha256": sha256_file(run / STUDENT_FILE),
        "qad_weights_sha256": manifest["artifacts"][qad_block["weights"]]["sha256"],
    }
    log(f"exporting {run_layout.QAD_TRT_ONNX}")
    proto = qdq_model(quantized, input_shape, opset)
    trt_desc = _description(QAD_TRT_FLAVOUR, qad_block)
    set_metadata(proto, {**metadata, "precision": "int8", "int8": trt_desc})
    save_onnx(proto, run / run_layout.QAD_TRT_ONNX)
    cpu_desc = _description(QAD_CPU_FLAVOUR, qad_block)
    cpu_desc["uint8_activation_pairs"] = activations_to_uint8(proto)
    set_metadata(proto, {**metadata, "precision": "int8", "int8": cpu_desc})
    save_onnx(proto, run / run_layout.QAD_CPU_ONNX)

    for rel, desc in ((run_layout.QAD_TRT_ONNX, trt_desc), (run_layout.QAD_CPU_ONNX, cpu_desc)):
        session = open_check_session(run / rel)
        logits = run_session(session, images)
        metrics = compare(logits, reference, labels)
        parity = compare(logits, qad_logits, None)
        metrics.update(
            qad_max_abs_diff=parity["max_abs_diff"],
            qad_top1_agreement=parity["top1_agreement"],
            qad_samples_within_1e4=samples_within(logits, qad_logits, 1e-4),
        )
        metrics["device"] = session_device(session)
        status, reason = gate("int8", metrics)
        result = CheckResult(str(run / rel), "int8", status, reason, metrics)
        recorder.checked(rel, result, "onnx", precision="int8", **desc)
        log(
            f"  {rel}: {result.status} ({result.reason}; vs the fake-quant model: "
            f"max|diff| {parity['max_abs_diff']:.3g}, agreement {parity['top1_agreement']:.2f}%)"
        )
    write_manifest(run, manifest)
    return summary
