"""Layer-wise parity: where, layer by layer, a lower-precision ONNX file departs from the fp32 one.

Both files run on the same images with every node output the comparison needs marked as a graph
output, and each tensor the two graphs share by name is compared, as the next layer reads it (after
its Q/DQ pair where it has one): cosine similarity and relative L2 error (||x_q - x|| / ||x||), in the
fp32 graph's order. A node's *jump* is its error minus the largest
error among its inputs: the layer whose jump is largest is where the error is made, not merely
carried. Node names come from torch's TorchScript exporter scopes ("/layer1/layer1.0/conv1/Conv"),
which survive onnxscript's optimizer and ONNX Runtime's quantizer; export.onnx_export.module_path
turns them back into the student's module paths ("layer1.0.conv1", "head.classification_head.conv.0").

Where it stops: the run's task says (export.producing.LayerwiseSetup, the task's ExportTask in
export.pipeline.EXPORT_TASKS): the comparison ends at the task's *end outputs* and covers only the
nodes they depend on. For a classifier that is the logits, the whole graph; for a detector the
head's raw outputs (class logits, box regression, centreness), so its post-processing (box decoding,
score filter, NMS, whose tensors have data-dependent shapes) is never compared: its effect is
measured in the task's own metric instead (below).

Why not Polygraphy: its layer-wise mode (ModifyOutputs with MARK_ALL, then OnnxrtRunner) does the
same marking in ONNX Runtime; we need that marking, the name-to-module mapping and the jump, about
as much code as driving Polygraphy, without a new dependency on every machine that exports.

Caveat, and why the end outputs are also compared as deployed: marking intermediate tensors as
outputs stops ONNX Runtime fusing Q/DQ pairs into its int8 kernels, so the layer-wise numbers follow
the file's Q/DQ semantics (what TensorRT implements), not ORT's fused CPU kernels. The report
compares the end outputs of the file run as deployed (deploy's session options: fused kernels for
the cpu flavour, Q/DQ as float operations for the trt flavour, which must run unfused; only the end
outputs marked, which are the file's own outputs for a classifier) with the marked ones; a large
gap means the runtime's kernels, not the quantization, lose the accuracy (the saturation described
in export/precision.py was found that way). Where the task has its own metric (a detector's mAP),
both unmodified files are scored with it as deployed on the same images: what the errors cost.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import atomic_output, ensure_writable_dir, write_text_atomic
from deploy.formats import EFFICIENT_NMS, LOWER_PRECISION_FILES, ONNX_FORMATS, QAD_FILES
from deploy.manifest import Manifest, read_manifest, verify_artifact
from deploy.optional import optional_import, require_installed
from deploy.predict import check_export_is_current
from deploy.run_lock import locks_run
from deploy.runners.onnxruntime_runner import session_options
from deploy.tasks import task_of
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, get_metadata, load_onnx, module_path
from export.pipeline import export_task
from export.producing import EndMetric


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


@dataclass(frozen=True)
class EndError:
    """One end output's relative L2 error against fp32: with every tensor marked (the file's Q/DQ
    semantics) and with only the end outputs marked (as deployed)."""

    marked_rel_l2: float
    deployed_rel_l2: float

    @property
    def runtime_loses_more(self) -> bool:
        """Whether the deployed runtime's kernels lose clearly more than the quantization itself."""
        return self.deployed_rel_l2 > 2 * self.marked_rel_l2 + 1e-3


@dataclass
class LayerwiseReport:
    """The layer-wise comparison of one file against fp32, up to the end outputs."""

    reference: str
    candidate: str
    images: int
    layers: list[LayerError]
    end_outputs: dict[str, EndError]  # end tensor -> its error, in the order given
    end_label: str = "logits"  # what the end outputs are, for people
    source: str = ""  # which images
    metric: EndMetric | None = None  # the task's own metric of both files as deployed

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
            "source": self.source,
            "end_label": self.end_label,
            "end_outputs": {name: dict(error.__dict__) for name, error in self.end_outputs.items()},
            "metric": self.metric.as_dict() if self.metric is not None else None,
            "jump": worst.as_dict() if worst else None,
            "layers": [layer.as_dict() for layer in self.layers],
        }


def upstream_nodes(model: onnx.ModelProto, tensors: Collection[str]) -> list[int]:
    """The positions of the nodes `tensors` depend on (those that make them included), in graph
    order: where the comparison stops. UsageError naming a tensor no node makes."""
    nodes = list(model.graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output if name}
    missing = [name for name in tensors if name not in producer]
    if missing:
        raise UsageError(f"no node makes {', '.join(missing)}; expected the run's own exported files")
    needed: set[int] = set()
    pending = [producer[name] for name in tensors]
    while pending:
        index = pending.pop()
        if index not in needed:
            needed.add(index)
            pending.extend(producer[name] for name in nodes[index].input if name in producer)
    return sorted(needed)


def _run_marked(
    model: onnx.ModelProto, tensors: Collection[str], images: np.ndarray
) -> dict[str, np.ndarray]:
    """Run `model` on `images` with `tensors` added to its outputs (deploy's session options for the
    file); every output by name."""
    with optional_import("the layer-by-layer comparison"):
        import onnxruntime as ort

    marked = onnx.ModelProto()
    marked.CopyFrom(model)
    outputs = {o.name for o in marked.graph.output}
    for name in tensors:
        if name not in outputs:
            marked.graph.output.append(onnx.ValueInfoProto(name=name))
            outputs.add(name)
    options = session_options(get_metadata(model))
    session = ort.InferenceSession(marked.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {INPUT_NAME: images}), strict=True))


def _node_outputs(model: onnx.ModelProto, indices: Sequence[int]) -> list[str]:
    return [name for index in indices for name in model.graph.node[index].output if name]


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
    reference: str | os.PathLike[str],
    candidate: str | os.PathLike[str],
    images: np.ndarray,
    end_outputs: Sequence[str] = (OUTPUT_NAME,),
) -> LayerwiseReport:
    """Compare every tensor `candidate` shares with the fp32 `reference` file on `images` (float32
    NCHW), from the input up to `end_outputs` (module docstring): only the nodes those depend on."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise UsageError(f"layer-wise parity needs a non-empty NCHW batch, got shape {images.shape}")
    ref_model, cand_model = load_onnx(reference), load_onnx(candidate)
    as_read = _dequantized_names(cand_model)
    # The end outputs as the candidate's consumers read them (after a Q/DQ pair where they have one).
    cand_ends = {name: as_read.get(name, name) for name in end_outputs}
    try:
        ref_nodes = upstream_nodes(ref_model, end_outputs)
        cand_nodes = upstream_nodes(cand_model, list(cand_ends.values()))
    except UsageError as exc:
        raise UsageError(f"{candidate} against {reference}: {exc}") from None
    ref_tensors = _run_marked(ref_model, _node_outputs(ref_model, ref_nodes), images)
    cand_tensors = _run_marked(cand_model, _node_outputs(cand_model, cand_nodes), images)
    errors: dict[str, float] = {INPUT_NAME: 0.0}
    layers: list[LayerError] = []
    for index in ref_nodes:
        node = ref_model.graph.node[index]
        # A tensor that is not compared carries the largest error of its node's inputs.
        carried = max((errors[name] for name in node.input if name in errors), default=0.0)
        for name in node.output:
            errors[name] = carried
        compared = _compared(node, ref_tensors, cand_tensors, as_read)
        if compared is None:
            continue
        cosine, rel_l2 = compared
        errors[node.output[0]] = rel_l2
        layers.append(
            LayerError(
                index,
                node.name,
                node.op_type,
                module_path(node.name),
                node.output[0],
                cosine,
                rel_l2,
                rel_l2 - carried,
            )
        )
    produced = [
        index
        for index in ref_nodes
        if ref_model.graph.node[index].output
        and ref_model.graph.node[index].op_type not in ("Constant", "Identity")
    ]
    if 2 * len(layers) < len(produced):
        raise UsageError(
            f"{candidate}: shares {len(layers)} of {len(produced)} layer outputs with {reference};"
            " expected a file quantized or converted from it"
        )
    deployed = _run_marked(cand_model, list(cand_ends.values()), images)
    ends = {
        name: EndError(
            _errors(ref_tensors[name], cand_tensors[read])[1], _errors(ref_tensors[name], deployed[read])[1]
        )
        for name, read in cand_ends.items()
    }
    return LayerwiseReport(str(reference), str(candidate), len(images), layers, ends)


def end_lines(report: LayerwiseReport, fmt: str) -> list[str]:
    """What the errors come to at the end: each end output's relative L2 with Q/DQ semantics and as
    deployed, and the task's own metric of both files as deployed where it has one."""
    lines = [
        f"{name} relative L2: {error.marked_rel_l2:.4f} with Q/DQ semantics (every tensor marked),"
        f" {error.deployed_rel_l2:.4f} as deployed (ONNX Runtime with the file's session options)"
        for name, error in report.end_outputs.items()
    ]
    if report.metric is not None:
        metric = report.metric
        lines.append(
            f"{metric.label} as deployed on the same images: {metric.reference:.2f} fp32,"
            f" {metric.candidate:.2f} {fmt}: drop {metric.drop:.2f} points"
        )
    return lines


def markdown(report: LayerwiseReport, title: str) -> str:
    """The report as a Markdown section: a summary, then one row per layer with the jump marked."""
    worst = report.worst_jump
    lines = [
        f"## Layer-wise parity: {title}",
        "",
        f"{Path(report.candidate).name} against {Path(report.reference).name} on {report.images} images"
        f"{f' ({report.source})' if report.source else ''}; cosine similarity and relative L2 error of"
        f" each layer's output, in graph order, up to the {report.end_label}"
        f" ({', '.join(report.end_outputs)}).",
        "",
        f"- error jumps at **{worst.module}** (`{worst.node}`, {worst.op_type}): relative L2 "
        f"{worst.rel_l2:.4f}, +{worst.jump:.4f} over its inputs"
        if worst
        else "- no layer compared",
        *(f"- {line}" for line in end_lines(report, title)),
    ]
    if any(error.runtime_loses_more for error in report.end_outputs.values()):
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


LAYERWISE_PREFIX = "layerwise_"  # RUN/report/layerwise_<format>.{md,json,png}, which the report shows


def comparable_files() -> dict[str, tuple[str, str]]:
    """Format label -> (run-relative file, the command that writes it) for every file layerwise
    compares with fp32 (deploy.formats.LOWER_PRECISION_FILES): export's fp16 and int8 files and the
    QAD files of `reviewkd quantize`."""

    def command(label: str) -> str:
        if label in QAD_FILES:
            return "reviewkd quantize RUN --epochs N"
        return f"reviewkd export RUN --formats onnx,{label}"

    return {label: (file, command(label)) for label, file in LOWER_PRECISION_FILES.items()}


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
    file on up to `count` of the run's images, up to its end outputs, with the task's own metric of
    both files where it has one: the run's task says which (its ExportTask's `layerwise`: a
    classifier's validation images and logits; a detector's held-out images, those export checks
    its files on, its head outputs and mAP). Written to RUN/report/layerwise_<format>.*, where
    `reviewkd report` picks it up.

    Raises:
        UsageError: a bad format or count, the EfficientNMS file (ONNX Runtime cannot run it), a
            QAD file of a task `reviewkd quantize` cannot fine-tune; a run without both files, with
            a file changed after export or exported from an older student; an unwritable report
            folder.
        MissingDependencyError: matplotlib (the plots extra) is not installed.
    """
    run = Path(run_dir)
    fmt = target.removeprefix("onnxruntime/")
    files = comparable_files()
    choices = ", ".join(f"onnxruntime/{f}" for f in files)
    if fmt == EFFICIENT_NMS.name:
        raise UsageError(
            f"--format {target}: {EFFICIENT_NMS.file} ends in TensorRT's EfficientNMS_TRT plugin, which"
            f" ONNX Runtime cannot run, and is fp32 like the reference; expected one of {choices}"
        )
    if fmt not in files:
        raise UsageError(f"--format {target}: expected one of {choices}")
    if count < 1:
        raise UsageError(f"--images must be >= 1, got {count}")
    require_installed("matplotlib", "layerwise's plot")
    manifest = read_manifest(run)
    spec = task_of(manifest, str(run / run_layout.MANIFEST))
    if fmt in QAD_FILES and not spec.is_ready("quantize"):
        raise UsageError(
            f"--format {target}: a {spec.name} run has no QAD files; quantize is not available:"
            f" {spec.deploy_skip_reason}"
        )
    export_fp32 = files[fmt][1] if fmt in ONNX_FORMATS else "reviewkd export RUN --formats onnx"
    reference = _exported_file(run, manifest, ONNX_FORMATS["onnx"].file, export_fp32)
    candidate = _exported_file(run, manifest, *files[fmt])
    setup = export_task(run, manifest).layerwise(run, manifest, count)
    ensure_writable_dir(run / "report")
    compared = compare_layers(reference, candidate, setup.images, setup.end_outputs)
    metric = setup.end_metric(reference, candidate) if setup.end_metric is not None else None
    report = dataclasses.replace(compared, end_label=setup.end_label, source=setup.source, metric=metric)
    title = f"onnxruntime/{fmt}"
    return report, write_report(report, run / "report", LAYERWISE_PREFIX + fmt, title)
