"""Write a Triton Inference Server model repository for a run's deployable files.

One model per file, declaring the outputs of the run's task (deploy.task_serving: a classifier's logits, a
detector's num_detections, detection_boxes, detection_scores and detection_classes, int32 where the
file's are): every ONNX file ONNX Runtime serves as it was checked (platform
"onnxruntime_onnx", `1/model.onnx`: fp32, fp16, int8 and the QAD int8 file) and every TensorRT plan
the manifest lists (platform "tensorrt_plan", `1/model.plan`). The int8 files made for TensorRT are
left out (`onnx_files_left_out`): they must run their Q/DQ pairs unfused, a session option Triton's
ONNX Runtime backend does not set, and TensorRT serves them as plans. Each model gets a
config.pbtxt (max_batch_size, dims without the batch, dynamic_batching, instance_group) and a
labels file with the class names, which outputs of one value per class reference. Files are
copied only after their sha256 matches the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.formats import format_keys
from deploy.manifest import (
    MANIFEST_NAME,
    Manifest,
    artifact_path,
    artifacts_of_kind,
    check_classes,
    input_spec,
    model_block,
    read_manifest,
    verify_artifact,
)
from deploy.predict import check_export_is_current
from deploy.runners import OnnxRuntimeRunner, select_artifact
from deploy.runners.onnxruntime_runner import UNFUSED_QDQ_KEY
from deploy.task_serving import ModelOutput, serving_of
from deploy.trt_sidecar import Sidecar, read_sidecar, sidecar_path

DEFAULT_MAX_BATCH_SIZE = 64
# Triton's ModelConfig holds max_batch_size as an int32: a larger value makes it reject the config.
MAX_BATCH_SIZE_LIMIT = 2**31 - 1
LABELS_FILENAME = "labels.txt"
INSTANCE_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# Triton's data types of the numpy dtypes a task's outputs have (deploy.task_serving.ModelOutput.dtype).
TRITON_TYPES = {"float32": "TYPE_FP32", "int32": "TYPE_INT32"}
# What a model name (and so its folder in the repository) may hold.
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class TritonModel:
    """One model of the repository: what its config.pbtxt says and which run file it serves."""

    name: str
    platform: str  # "onnxruntime_onnx" or "tensorrt_plan"
    source: str  # the artifact's path relative to the run directory
    max_batch_size: int
    input_name: str
    outputs: tuple[ModelOutput, ...]  # the task's outputs (deploy.tasks), in the file's order
    input_dims: tuple[int, int, int]
    instance_kind: str  # "KIND_CPU" or "KIND_GPU"
    instance_count: int
    labels: bool  # whether a labels file is written; the per-class outputs reference it
    note: str | None = None  # a comment for the reader of config.pbtxt

    @property
    def model_filename(self) -> str:
        """The file name Triton looks for in the version folder."""
        return "model.plan" if self.platform == "tensorrt_plan" else "model.onnx"


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 4 below `max_batch_size`, then the maximum itself (none for 1)."""
    sizes = []
    size = 4
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    if max_batch_size > 1:
        sizes.append(max_batch_size)
    return sizes


def _dims(values: Any) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def _quoted(text: str) -> str:
    """A protobuf text-format string literal: quotes, backslashes and every byte that is not
    printable ASCII escaped, so no value can end the string and add fields of its own."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _comment(text: str) -> str:
    """One comment line: line breaks and other unprintable characters shown escaped, never kept,
    so that text from a run's files (a sidecar's GPU name) cannot start a line of config."""
    return "# " + "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text) + "\n"


def check_labels(classes: Any) -> list[str]:
    """The manifest's class names for labels.txt, one per line: each must be a non-empty string
    without line breaks or control characters (they would shift every later label), and unique
    (deploy.manifest.check_classes, which every manifest reader applies)."""
    return check_classes(classes)


def _output_entry(output: ModelOutput, labels: bool) -> str:
    label_line = f"    label_filename: {_quoted(LABELS_FILENAME)}\n" if labels and output.per_class else ""
    return (
        "  {\n"
        f"    name: {_quoted(output.name)}\n"
        f"    data_type: {TRITON_TYPES[output.dtype]}\n"
        f"    dims: {_dims(output.dims)}\n"
        f"{label_line}"
        "  }"
    )


def config_pbtxt(model: TritonModel) -> str:
    """Render a model's config.pbtxt in protobuf text format (Triton's ModelConfig)."""
    preferred = preferred_batch_sizes(model.max_batch_size)
    batching = f"  preferred_batch_size: {_dims(preferred)}\n" if preferred else ""
    header = _comment(f"Written by reviewkd from {model.source}.")
    if model.note:
        header += _comment(model.note)
    outputs = ",\n".join(_output_entry(output, model.labels) for output in model.outputs)
    return header + (
        f"name: {_quoted(model.name)}\n"
        f"platform: {_quoted(model.platform)}\n"
        f"max_batch_size: {model.max_batch_size}\n"
        "input [\n  {\n"
        f"    name: {_quoted(model.input_name)}\n"
        "    data_type: TYPE_FP32\n"
        f"    dims: {_dims(model.input_dims)}\n"
        "  }\n]\n"
        f"output [\n{outputs}\n]\n"
        "dynamic_batching {\n"
        f"{batching}"
        "}\n"
        "instance_group [\n  {\n"
        f"    count: {model.instance_count}\n"
        f"    kind: {model.instance_kind}\n"
        "  }\n]\n"
    )


def _model_base_name(manifest: Manifest) -> str:
    """A Triton-safe model name from the student's architecture ("torchvision:resnet18" -> ...)."""
    arch = model_block(manifest, "student").arch or "student"
    return re.sub(r"[^A-Za-z0-9_-]+", "_", arch).strip("_") or "student"


def _plan_sidecar(run_dir: Path, manifest: Manifest, plan: str) -> Sidecar:
    """Read a plan's sidecar (PLAN.json), checking its sha256 where the manifest lists it."""
    relpath = sidecar_path(plan).as_posix()
    if relpath in manifest.get("artifacts", {}):
        return read_sidecar(verify_artifact(run_dir, manifest, relpath))
    return read_sidecar(artifact_path(run_dir, relpath))


def _copy_verified(run_dir: Path, manifest: Manifest, relpath: str, target: Path) -> None:
    """Copy an artifact after checking its sha256, and check the copy too (the source may change)."""
    source = verify_artifact(run_dir, manifest, relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    if sha256_file(target) != manifest["artifacts"][relpath]["sha256"]:
        raise UsageError(f"{source}: changed while it was being copied to the Triton repository")


def onnx_files_left_out(manifest: Manifest) -> dict[str, str]:
    """The run's ONNX files a Triton repository does not serve, with why: the int8 files whose
    manifest entry says ONNX Runtime must run their Q/DQ pairs unfused (export's TensorRT flavours)."""
    left_out = {}
    for key, relpath in format_keys(manifest.get("artifacts", {})).items():
        entry = manifest["artifacts"][relpath]
        if key.startswith("onnxruntime/") and entry.get(UNFUSED_QDQ_KEY) is True:
            left_out[relpath] = (
                "made for TensorRT (serve its engine, `--formats tensorrt`); Triton's ONNX Runtime would"
                " fuse its Q/DQ pairs, which it must run unfused"
            )
    return left_out


def plan_models(
    run_dir: str | os.PathLike[str],
    manifest: Manifest,
    *,
    max_batch_size: int | None = None,
    instance_kind: str = "cpu",
    instance_count: int = 1,
    model_name: str | None = None,
) -> list[TritonModel]:
    """Describe the repository's models without writing anything (see write_triton_repository)."""
    run = Path(run_dir)
    if max_batch_size is not None and not 1 <= max_batch_size <= MAX_BATCH_SIZE_LIMIT:
        raise UsageError(
            f"--max-batch-size {max_batch_size}: expected 1 to {MAX_BATCH_SIZE_LIMIT}"
            " (Triton holds it as a 32-bit integer)"
        )
    if instance_kind not in INSTANCE_KINDS:
        raise UsageError(
            f"--instance-kind: expected one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}"
        )
    if instance_count < 1:
        raise UsageError(f"--count: expected a positive number, got {instance_count}")
    base = model_name or _model_base_name(manifest)
    if not _MODEL_NAME.fullmatch(base):
        raise UsageError(f"--name: {base!r}; expected letters, digits, '_' or '-'")
    dims = input_spec(manifest).shape
    task = serving_of(manifest, str(run / MANIFEST_NAME))
    labels = bool(check_labels(manifest.get("classes") or []))

    # The fp32 file is the one every run has; the others are served beside it.
    fp32_rel = select_artifact(run, manifest, "onnxruntime", "fp32")
    left_out = onnx_files_left_out(manifest)
    models = []
    for key, onnx_rel in format_keys(manifest.get("artifacts", {})).items():
        if not key.startswith("onnxruntime/") or onnx_rel in left_out:
            continue
        check_export_is_current(run, manifest, onnx_rel)
        # Open the file once on the CPU: it proves the file loads and gives the real tensor names.
        probe = OnnxRuntimeRunner(
            verify_artifact(run, manifest, onnx_rel),
            providers=["CPUExecutionProvider"],
            threads=1,
            input_shape=dims,
        )
        probe.close()
        if probe.unfused_qdq:
            raise UsageError(
                f"{run / onnx_rel}: its metadata says to run its Q/DQ pairs unfused, its manifest entry"
                f" does not ({UNFUSED_QDQ_KEY}); re-export it"
            )
        if probe.max_batch is not None:
            raise UsageError(
                f"{run / onnx_rel}: fixed batch {probe.max_batch};"
                " Triton's batching needs a dynamic batch dimension"
            )
        label = re.sub(r"[^A-Za-z0-9_-]+", "_", key.partition("/")[2])
        models.append(
            TritonModel(
                name=f"{base}_onnx" if onnx_rel == fp32_rel else f"{base}_onnx_{label}",
                platform="onnxruntime_onnx",
                source=onnx_rel,
                max_batch_size=max_batch_size or DEFAULT_MAX_BATCH_SIZE,
                input_name=probe.input_name,
                outputs=task.outputs(manifest, probe.output_names, str(run / onnx_rel)),
                input_dims=dims,
                instance_kind=INSTANCE_KINDS[instance_kind],
                instance_count=instance_count,
                labels=labels,
            )
        )
    for plan_rel, entry in sorted(artifacts_of_kind(manifest, "tensorrt").items()):
        check_export_is_current(run, manifest, plan_rel)
        sidecar = _plan_sidecar(run, manifest, plan_rel)
        profile = sidecar.profile
        if profile.min_batch != 1:
            raise UsageError(
                f"{run / plan_rel}: its profile starts at batch {profile.min_batch};"
                " Triton sends batches from 1"
            )
        if tuple(profile.chw) != dims:
            raise UsageError(
                f"{run / plan_rel}: the engine takes (C, H, W) = {tuple(profile.chw)},"
                f" the manifest says {dims}"
            )
        high = profile.max_batch
        models.append(
            TritonModel(
                name=f"{base}_tensorrt_{entry.get('precision') or sidecar.precision}",
                platform="tensorrt_plan",
                source=plan_rel,
                max_batch_size=min(max_batch_size, high) if max_batch_size else high,
                input_name=sidecar.input_names[0],
                outputs=task.outputs(manifest, sidecar.output_names, str(run / plan_rel)),
                input_dims=dims,
                instance_kind=INSTANCE_KINDS["gpu"],  # an engine runs only on a GPU
                instance_count=instance_count,
                labels=labels,
                note=(
                    f"Engine built with TensorRT {sidecar.tensorrt_version} for {sidecar.gpu.name}"
                    f" (compute capability {sidecar.gpu.cc}); serve it with that TensorRT version."
                ),
            )
        )
    names = [m.name for m in models]
    for name in names:
        # Precisions come from the manifest and sidecars: a name is also a folder of the repository.
        if not _MODEL_NAME.fullmatch(name):
            raise UsageError(f"Triton model name {name!r}: expected letters, digits, '_' or '-'")
    if len(set(names)) != len(names):
        raise UsageError(f"two files would get the same Triton model name: {', '.join(names)}")
    return models


def write_triton_repository(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    manifest: Manifest | None = None,
    max_batch_size: int | None = None,
    instance_kind: str = "cpu",
    instance_count: int = 1,
    model_name: str | None = None,
) -> list[TritonModel]:
    """Write (or replace) the run's models in the Triton repository `out` and return them.

    `max_batch_size` defaults to 64 for ONNX and to the profile's maximum for a plan (a given
    value caps it); `instance_kind` ("cpu" or "gpu") applies to the ONNX model, plans always
    run on the GPU. Models are built in a staging folder beside `out` and each is moved into
    place by rename, so Triton never sees a half-written model; other models in `out` are kept.
    """
    run = Path(run_dir)
    manifest = manifest if manifest is not None else read_manifest(run)
    models = plan_models(
        run,
        manifest,
        max_batch_size=max_batch_size,
        instance_kind=instance_kind,
        instance_count=instance_count,
        model_name=model_name,
    )
    repo = Path(out)
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"--out {repo}: exists and is not a directory")
    repo.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.", dir=repo.parent))
    try:
        for model in models:
            model_dir = stage / model.name
            _copy_verified(run, manifest, model.source, model_dir / "1" / model.model_filename)
            (model_dir / "config.pbtxt").write_text(config_pbtxt(model), encoding="utf-8")
            if model.labels:
                labels = "".join(f"{name}\n" for name in manifest["classes"])
                (model_dir / LABELS_FILENAME).write_text(labels, encoding="utf-8")
        for model in models:
            final = repo / model.name
            if final.exists():
                # Move the old version into the staging folder, which is deleted below.
                os.replace(final, stage / f"{model.name}.replaced")
            os.replace(stage / model.name, final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return models
