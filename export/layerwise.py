"""Layer-wise parity: where, layer by layer, a lower-precision ONNX file departs from the fp32 one.

Both files run on the same images with every node output marked as a graph output, and each
tensor the two graphs share by name is compared, as the next layer reads it (after its Q/DQ pair
where it has one): cosine similarity and relative L2 error (||x_q - x|| / ||x||), in the fp32
graph's order. A node's *jump* is its error minus the largest
error among its inputs: the layer whose jump is largest is where the error is made, not merely
carried. Node names come from torch's TorchScript exporter scopes ("/layer1/layer1.0/conv1/Conv"),
which survive onnxscript's optimizer and ONNX Runtime's quantizer; `module_path` turns them back
into the student's module paths ("layer1.0.conv1").

Why not Polygraphy: its layer-wise mode (ModifyOutputs with MARK_ALL, then OnnxrtRunner) does the
same marking in ONNX Runtime; we need that marking, the name-to-module mapping and the jump, about
as much code as driving Polygraphy, without a new dependency on every machine that exports.

Caveat, and why the as-deployed logits are reported too: marking intermediate tensors as outputs
stops ONNX Runtime fusing Q/DQ pairs into its int8 kernels, so the layer-wise numbers follow the
file's Q/DQ semantics (what TensorRT implements), not ORT's fused CPU kernels. The report compares
the final logits of the unmarked file, run as deployed (deploy's session options: fused kernels for
the cpu flavour, Q/DQ as float operations for the trt flavour, which must run unfused), with the
marked one; a large gap means the runtime's kernels, not the quantization, lose the accuracy (the
saturation described in export/precision.py was found that way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import atomic_output, ensure_writable_dir, write_text_atomic
from deploy.formats import ONNX_FORMATS
from deploy.manifest import Manifest, read_manifest, verify_artifact
from deploy.optional import optional_import, require_installed
from deploy.predict import check_export_is_current
from deploy.run_lock import locks_run
from deploy.runners.onnxruntime_runner import session_options
from export.check import run_onnx
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, get_metadata, load_onnx
from reviewkd.data import iter_run_batches

TOP_LEVEL = "(top level)"


def module_path(node_name: str) -> str:
    """The PyTorch module path in an exporter node name: "/layer1/layer1.0/conv1/Conv" -> "layer1.0.conv1".

    The TorchScript exporter writes one scope per module: its attribute name ("conv1"), or, for a
    container's child, the parent's scope and the child's name ("layer1.0" inside "layer1",
    "block.0.0" inside "block.0"). Names without scopes belong to the top level.
    """
    parts = [p for p in node_name.split("/") if p][:-1]
    path: list[str] = []
    previous = ""
    for part in parts:
        path.append(part[len(previous) + 1 :] if previous and part.startswith(previous + ".") else part)
        previous = part
    return ".".join(path) or TOP_LEVEL


@dataclass(frozen=True)
class LayerError:
    """One compared tensor: the node that makes it, its module, and its error against fp32."""

    index: int  # position of the node in the fp32 graph
    node: str
    op_type: str
    module: str
    tensor: str
    cosine: float
    rel_l2: float
    jump: float  # rel_l2 minus the largest rel_l2 among the node's compared inputs

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        return dict(self.__dict__)


@dataclass
class LayerwiseReport:
    """The layer-wise comparison of one file against fp32."""

    reference: str
    candidate: str
    images: int
    layers: list[LayerError]
    deployed_logits_rel_l2: float  # the candidate run as deployed (fused), against fp32
    marked_logits_rel_l2: float  # the candidate with every tensor marked (Q/DQ semantics)

    @property
    def worst_jump(self) -> LayerError | None:
        """The layer where the error jumps most."""
        return max(self.layers, key=lambda layer: layer.jump, default=None)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form."""
        worst = self.worst_jump
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "images": self.images,
            "deployed_logits_rel_l2": self.deployed_logits_rel_l2,
            "marked_logits_rel_l2": self.marked_logits_rel_l2,
            "jump": worst.as_dict() if worst else None,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def _all_outputs(
    path: str | os.PathLike[str], images: np.ndarray
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Run `path` with every node output marked as a graph output; return the model and the tensors."""
    with optional_import("the layer-by-layer comparison"):
        import onnxruntime as ort

    model = load_onnx(path)
    marked = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in marked:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                marked.add(name)
    options = session_options(get_metadata(model))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return model, dict(zip(names, session.run(None, {INPUT_NAME: images}), strict=True))


def _dequantized_names(model: onnx.ModelProto) -> dict[str, str]:
    """tensor -> the DequantizeLinear output of its QuantizeLinear: the tensor as its consumers read it.

    Comparing that, not the raw tensor, charges a layer with its own output quantization, and
    follows ONNX Runtime's quantizer where it drops a Relu into the clipping of its conv's Q/DQ
    (the raw tensor then still holds negative values no consumer sees).
    """
    quantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {
        quantized[n.input[0]]: n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    }


def _compared(
    node: onnx.NodeProto,
    ref_tensors: dict[str, np.ndarray],
    cand_tensors: dict[str, np.ndarray],
    as_read: dict[str, str],
) -> tuple[float, float] | None:
    """(cosine, relative L2) of the node's first output in both files, or None where it is not comparable."""
    if not node.output or node.op_type in ("Constant", "Identity"):
        return None
    tensor = node.output[0]
    candidate = cand_tensors.get(as_read.get(tensor, tensor))
    reference = ref_tensors.get(tensor)
    if candidate is None or reference is None or candidate.shape != reference.shape:
        return None
    if not np.issubdtype(reference.dtype, np.floating):
        return None
    return _errors(reference, candidate)


def _errors(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    ref = reference.astype(np.float64).ravel()
    cand = candidate.astype(np.float64).ravel()
    ref_norm, cand_norm = float(np.linalg.norm(ref)), float(np.linalg.norm(cand))
    diff = float(np.linalg.norm(cand - ref))
    if ref_norm == 0.0:
        return (1.0 if cand_norm == 0.0 else 0.0), (0.0 if diff == 0.0 else float("inf"))
    cosine = float(ref @ cand) / (ref_norm * cand_norm) if cand_norm > 0 else 0.0
    return cosine, diff / ref_norm


def compare_layers(
    reference: str | os.PathLike[str], candidate: str | os.PathLike[str], images: np.ndarray
) -> LayerwiseReport:
    """Compare every tensor `candidate` shares with the fp32 `reference` file on `images` (float32 NCHW)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UsageError(f"layer-wise parity needs a non-empty NCHW batch, got shape {images.shape}")
    ref_model, ref_tensors = _all_outputs(reference, images)
    cand_model, cand_tensors = _all_outputs(candidate, images)
    as_read = _dequantized_names(cand_model)
    errors: dict[str, float] = {INPUT_NAME: 0.0}
    layers: list[LayerError] = []
    for index, node in enumerate(ref_model.graph.node):
        # A tensor that is not compared carries the largest error of its node's inputs.
        carried = max((errors[name] for name in node.input if name in errors), default=0.0)
        for name in node.output:
            errors[name] = carried
        compared = _compared(node, ref_tensors, cand_tensors, as_read)
        if compared is None:
            continue
        cosine, rel_l2 = compared
        errors[node.output[0]] = rel_l2
        module = module_path(node.name)
        layers.append(
            LayerError(
                index, node.name, node.op_type, module, node.output[0], cosine, rel_l2, rel_l2 - carried
            )
        )
    produced = [n for n in ref_model.graph.node if n.output and n.op_type not in ("Constant", "Identity")]
    if 2 * len(layers) < len(produced):
        raise UsageError(
            f"{candidate}: shares {len(layers)} of {len(produced)} layer outputs with {reference};"
            " expected a file quantized or converted from it"
        )
    deployed = run_onnx(candidate, [images])
    _, deployed_rel = _errors(ref_tensors[OUTPUT_NAME], deployed)
    _, marked_rel = _errors(ref_tensors[OUTPUT_NAME], cand_tensors[OUTPUT_NAME])
    return LayerwiseReport(str(reference), str(candidate), len(images), layers, deployed_rel, marked_rel)


def markdown(report: LayerwiseReport, title: str) -> str:
    """The report as a Markdown section: a summary, then one row per layer with the jump marked."""
    worst = report.worst_jump
    lines = [
        f"## Layer-wise parity: {title}",
        "",
        f"{Path(report.candidate).name} against {Path(report.reference).name} on {report.images} images;"
        " cosine similarity and relative L2 error of each layer's output, in graph order.",
        "",
        f"- error jumps at **{worst.module}** (`{worst.node}`, {worst.op_type}): relative L2 "
        f"{worst.rel_l2:.4f}, +{worst.jump:.4f} over its inputs"
        if worst
        else "- no layer compared",
        f"- logits relative L2: {report.marked_logits_rel_l2:.4f} with Q/DQ semantics (every tensor marked),"
        f" {report.deployed_logits_rel_l2:.4f} as deployed (ONNX Runtime with the file's session options)",
    ]
    if report.deployed_logits_rel_l2 > 2 * report.marked_logits_rel_l2 + 1e-3:
        lines.append(
            "- **the deployed runtime loses more than the quantization itself**: its fused kernels"
            " depart from the file's Q/DQ semantics"
        )
    lines += ["", "| # | module | node | op | cosine | rel. L2 | jump |", "|---|---|---|---|---|---|---|"]
    for layer in report.layers:
        mark = " **<- jump**" if worst is not None and layer is worst else ""
        lines.append(
            f"| {layer.index} | {layer.module} | `{layer.node}` | {layer.op_type} | {layer.cosine:.5f}"
            f" | {layer.rel_l2:.4f} | {layer.jump:+.4f}{mark} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: LayerwiseReport, path: str | os.PathLike[str], title: str) -> None:
    """Relative L2 error per layer in graph order, the jump marked, as a PNG at `path`."""
    with optional_import("the layerwise plot"):
        import matplotlib

    matplotlib.use("Agg")
    with optional_import("the layerwise plot"):
        import matplotlib.pyplot as plt

    positions = list(range(len(report.layers)))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.12 * len(positions)), 3.5))
    axis.plot(positions, [layer.rel_l2 for layer in report.layers], marker=".", label="relative L2 vs fp32")
    worst = report.worst_jump
    if worst is not None:
        at = report.layers.index(worst)
        axis.scatter([at], [worst.rel_l2], color="red", zorder=3, label=f"jump: {worst.module}")
    axis.set_xlabel("layer (graph order)")
    axis.set_ylabel("relative L2 error")
    axis.set_title(f"Layer-wise parity: {title}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(str(tmp), format="png", dpi=110)
    plt.close(figure)


def write_report(
    report: LayerwiseReport, folder: str | os.PathLike[str], stem: str, title: str
) -> dict[str, Path]:
    """Write STEM.json, STEM.md and STEM.png into `folder`; return their paths by kind."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_text_atomic(paths["json"], json.dumps(report.as_dict(), indent=2) + "\n")
    plot(report, paths["png"], title)
    write_text_atomic(paths["md"], markdown(report, title) + f"\n![layer-wise error]({stem}.png)\n")
    return paths


def layer_images(batches: Sequence[np.ndarray], count: int) -> np.ndarray:
    """The first `count` images of `batches`, as one array."""
    images = np.concatenate([np.asarray(b, dtype=np.float32) for b in batches])[:count]
    if len(images) == 0:
        raise UsageError("layer-wise parity found no images")
    return images


LAYERWISE_PREFIX = "layerwise_"  # RUN/report/layerwise_<format>.{md,json,png}, which the report shows


def comparable_files() -> dict[str, tuple[str, str]]:
    """Format label -> (run-relative file, the command that writes it) for every file layerwise
    compares with fp32: export's fp16 and int8 files and the QAD files of `reviewkd quantize`."""

    files = {
        name: (fmt.file, f"reviewkd export RUN --formats onnx,{name}")
        for name, fmt in ONNX_FORMATS.items()
        if name != "onnx"
    }
    quantize = "reviewkd quantize RUN --epochs N"
    files["int8-qad"] = (run_layout.QAD_CPU_ONNX, quantize)
    files["int8-qad-trt"] = (run_layout.QAD_TRT_ONNX, quantize)
    return files


def _exported_file(run: Path, manifest: Manifest, rel: str, command: str) -> Path:
    """The run's file `rel`, verified and exported from the run's current student."""

    if rel not in manifest.get("artifacts", {}):
        raise UsageError(
            f"{run / rel}: not in the run's manifest (never exported, or it failed its check);"
            f" expected a run that went through `{command.replace('RUN', str(run))}`"
        )
    path = verify_artifact(run, manifest, rel)
    check_export_is_current(run, manifest, rel)
    return path


@locks_run("layerwise")
def debug_run(
    run_dir: str | os.PathLike[str], target: str, count: int = 64
) -> tuple[LayerwiseReport, dict[str, Path]]:
    """Layer-wise parity of a run's exported `target` ("onnxruntime/int8-trt", or "int8-trt"; any
    label of `comparable_files`, QAD's "int8-qad" and "int8-qad-trt" included) against its fp32
    file on the first `count` validation images; written to RUN/report/layerwise_<format>.*, where
    `reviewkd report` picks it up.

    Raises:
        UsageError: a bad format or count; a run without both files, with a file changed after
            export or exported from an older student; an unwritable report folder.
        MissingDependencyError: matplotlib (the plots extra) is not installed.
    """
    run = Path(run_dir)
    fmt = target.removeprefix("onnxruntime/")
    files = comparable_files()
    if fmt not in files:
        choices = ", ".join(f"onnxruntime/{f}" for f in files)
        raise UsageError(f"--format {target}: expected one of {choices}")
    if count < 1:
        raise UsageError(f"--images must be >= 1, got {count}")
    require_installed("matplotlib", "layerwise's plot")
    manifest = read_manifest(run)
    export_fp32 = files[fmt][1] if fmt in ONNX_FORMATS else "reviewkd export RUN --formats onnx"
    reference = _exported_file(run, manifest, ONNX_FORMATS["onnx"].file, export_fp32)
    candidate = _exported_file(run, manifest, *files[fmt])
    images = layer_images([b[0] for b in iter_run_batches(run, "val", 64, count)], count)
    ensure_writable_dir(run / "report")
    report = compare_layers(reference, candidate, images)
    title = f"onnxruntime/{fmt}"
    return report, write_report(report, run / "report", LAYERWISE_PREFIX + fmt, title)
