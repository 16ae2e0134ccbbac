"""What a training run writes besides its checkpoint: metrics.jsonl, the best weights, manifest.json.

Only rank 0 calls the writers. Every file is written atomically, except metrics.jsonl, which is
appended one fsync'ed line per epoch; a line cut short by a kill is skipped when read, and on resume
the file is cut back to the epochs the checkpoint holds.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deploy import run_layout
from deploy.fileio import append_line, atomic_output, write_text_atomic
from deploy.manifest import new_manifest, read_manifest, record_artifact, write_manifest
from deploy.optional import optional_import
from deploy.tasks import TASKS
from reviewkd.config import Config
from reviewkd.data import DataBundle

STUDENT_FILE = run_layout.STUDENT_WEIGHTS
TEACHER_FILE = run_layout.TEACHER_WEIGHTS
METRICS_FILE = run_layout.METRICS


def weights_file(role: str) -> str:
    """The best-weights file name of a run: student.safetensors, or teacher.safetensors for a teacher."""
    return STUDENT_FILE if role == "student" else TEACHER_FILE


def save_weights(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a state_dict as safetensors, atomically; a file that already holds exactly these tensors
    and this metadata is left as it is, byte for byte.

    A resume re-derives the best weights from last.pt, and safetensors writes the metadata in an
    order that changes from one write to the next: rewriting the same weights would give the file a
    new sha256 and mark every export made from it stale. The metadata is also written sorted, so the
    same weights always make the same bytes.
    """
    with optional_import("writing the trained weights"):
        from safetensors.torch import save

    data = _with_sorted_metadata(save({k: v.contiguous() for k, v in state.items()}, metadata=metadata))
    if _same_safetensors(path, data):
        return
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _with_sorted_metadata(data: bytes) -> bytes:
    """safetensors bytes with the header's metadata in sorted key order, the same in every process
    (safetensors itself orders it by a hash seeded anew in each one); the header keeps its length."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if not header.get("__metadata__"):
        return data
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # never with the same keys and values; kept as safetensors wrote it if so
        return data
    return data[:8] + text.ljust(size, b" ") + data[8 + size :]


def _same_safetensors(path: Path, data: bytes) -> bool:
    """Whether the safetensors file at `path` holds what `data` holds: the same header, read as JSON
    (tensor names, dtypes, shapes, offsets and metadata, in any order), and the same tensor bytes."""

    def split(blob: bytes) -> tuple[Any, bytes]:
        size = int.from_bytes(blob[:8], "little")
        return json.loads(blob[8 : 8 + size]), blob[8 + size :]

    try:
        existing = path.read_bytes()
        return split(existing) == split(data)
    except (OSError, ValueError):  # missing, unreadable or not safetensors: write it anew
        return False


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one epoch's record to metrics.jsonl and flush it to disk."""
    append_line(path, json.dumps(record))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of metrics.jsonl (a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and "epoch" in record:
                records.append(record)
    return records


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep one line per epoch up to `epochs_done`: the state last.pt holds."""
    kept: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path):
        if record["epoch"] <= epochs_done:
            kept[record["epoch"]] = record
    if path.exists() or kept:
        write_text_atomic(path, "".join(json.dumps(kept[e]) + "\n" for e in sorted(kept)))


def method_params(config: Config) -> dict[str, Any]:
    """The hyper-parameters the configured method actually uses (for the manifest)."""
    m = config.method
    params: dict[str, Any] = {}
    if m.name == "ce":
        return params
    params["warmup_epochs"] = m.warmup_epochs
    if m.name in ("kd", "reviewkd+kd"):
        params.update(kd_weight=m.kd_weight, temperature=m.temperature)
    if m.name in ("reviewkd", "reviewkd+kd"):
        params.update(
            hcl_weight=m.hcl_weight,
            student_taps=m.student_taps,
            teacher_taps=m.teacher_taps,
            teacher_pre_activation=m.teacher_pre_activation,
        )
    return params


@dataclass(frozen=True)
class RunData:
    """What a trained model's manifest says of its data: class names, the input block, the data block."""

    classes: list[str]
    input: dict[str, Any]
    data: dict[str, Any]


def record_trained_model(
    out_dir: Path,
    config: Config,
    role: str,
    data: RunData,
    record: dict[str, Any],
    teacher_record: dict[str, Any],
    best: dict[str, Any] | None,
    params: dict[str, Any],
) -> None:
    """(Re)write manifest.json for a trained model of any task: `data` gives the classes, input and
    data blocks; `record` (arch, num_classes, ...) becomes the model's block, with the
    weights file, its sha256, the epoch and the task's model metrics (deploy.tasks) from `best`.
    A student run records its method (`params`) and `teacher_record`; a teacher run is recorded as
    the teacher, trained by the task's baseline method."""
    path = out_dir / run_layout.MANIFEST
    manifest = read_manifest(out_dir) if path.is_file() else new_manifest()
    manifest["classes"], manifest["input"], manifest["data"] = data.classes, data.input, data.data
    manifest["task"] = config.task
    spec = TASKS[config.task]
    name = weights_file(role)
    if best is not None:
        entry = record_artifact(out_dir, manifest, name, "weights", role=role)
        metrics = {key: best[key] for key, _ in spec.model_metrics}
        record = {**record, "weights": name, "sha256": entry["sha256"], **metrics, "epoch": best["epoch"]}
    if role == "student":
        manifest["method"] = {"name": config.method.name, "params": params}
        manifest["teacher"] = teacher_record
        manifest["student"] = record
    else:
        manifest["method"] = {"name": spec.baseline_method, "params": {}}
        manifest["teacher"] = record
    write_manifest(out_dir, manifest)


def record_test_scores(out_dir: Path, task: str, role: str, split: str, scores: dict[str, Any]) -> None:
    """Record the held-out test split's scores of the kept model in its manifest block ("test": the
    split's name, its image count and the task's model metrics). Written once training has ended: a
    run that carved its validation split (data.val_split) scores the test split only then."""
    manifest = read_manifest(out_dir)
    metrics = {key: scores[key] for key, _ in TASKS[task].model_metrics}
    test = {"split": split, "n": scores["n"], **metrics}
    if role == "student":
        manifest["student"]["test"] = test
    else:
        manifest["teacher"]["test"] = test
    write_manifest(out_dir, manifest)


def write_run_manifest(
    out_dir: Path,
    config: Config,
    bundle: DataBundle,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any] | None,
) -> None:
    """(Re)write manifest.json of a classification run from the config, the data and the best model."""
    data = RunData(list(bundle.classes), bundle.manifest_input(), bundle.manifest_data())
    record = {"arch": config.student.arch, "num_classes": bundle.num_classes}
    record_trained_model(out_dir, config, role, data, record, teacher_record, best, method_params(config))


def write_best(
    out_dir: Path,
    config: Config,
    bundle: DataBundle,
    role: str,
    teacher_record: dict[str, Any],
    best: dict[str, Any],
) -> None:
    """Write the best weights (from last.pt's `best`) and the manifest that records them."""
    meta = {"arch": config.student.arch, "num_classes": str(bundle.num_classes), "role": role}
    save_weights(best["state"], out_dir / weights_file(role), meta)
    write_run_manifest(out_dir, config, bundle, role, teacher_record, best)
