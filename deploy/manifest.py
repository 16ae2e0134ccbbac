"""manifest.json: the record that travels from distillation to export to deployment.

Layout (docs/METHOD.md section 5.1); every stage adds to it and rewrites it atomically:

    schema_version   int, MANIFEST_SCHEMA_VERSION
    classes          list of class names, index = label
    input            {"shape": [C, H, W], "layout": "NCHW", "dtype": "float32",
                      "mean": [..], "std": [..] (on 0-1 pixel values), "resize": int or null
                      (shorter side before the centre crop to H x W; null: resize to H x W)}
    student          {"arch", "num_classes", "sha256" (of student.safetensors), "top1", "top5"}
    teacher          {"arch", "sha256" (of its weights file, or null), "top1", "top5"}
    method           {"name": "ce" | "kd" | "reviewkd" | "reviewkd+kd", "params": {...}}
    data             {"dataset": ..., ...}: where the validation images come from
    artifacts        {relative path: {"sha256", "size_bytes", "kind", ...}} where kind is one of
                     "weights", "onnx", "tensorrt", "sidecar", "report", "checkpoint"; ONNX and
                     TensorRT entries also carry "precision" ("fp32", "fp16", "int8", ...)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deploy.errors import UsageError
from deploy.fileio import sha256_file, write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1

Manifest = dict[str, Any]


def new_manifest() -> Manifest:
    """Return an empty manifest of the current schema."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "classes": [],
        "input": {},
        "student": {},
        "teacher": {},
        "method": {},
        "data": {},
        "artifacts": {},
    }


def manifest_path(run_dir: str | os.PathLike[str]) -> Path:
    """Return the path of the manifest inside a run directory."""
    return Path(run_dir) / MANIFEST_NAME


def read_manifest(run_dir: str | os.PathLike[str]) -> Manifest:
    """Read and check a run's manifest; a missing or malformed file is a UsageError naming it."""
    path = manifest_path(run_dir)
    if not path.is_file():
        raise UsageError(f"{path}: no manifest.json; expected a run directory written by reviewkd")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise UsageError(f"{path}: not a reviewkd manifest (no schema_version)")
    version = manifest["schema_version"]
    if version != MANIFEST_SCHEMA_VERSION:
        raise UsageError(
            f"{path}: manifest schema version {version}, this reviewkd reads {MANIFEST_SCHEMA_VERSION}"
        )
    manifest.setdefault("artifacts", {})
    return manifest


def write_manifest(run_dir: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write the manifest atomically and return its path."""
    path = manifest_path(run_dir)
    write_json_atomic(path, manifest)
    return path


def record_artifact(
    run_dir: str | os.PathLike[str], manifest: Manifest, relpath: str, kind: str, **meta: Any
) -> dict[str, Any]:
    """Hash a file of the run and record it (path, sha256, size, kind, extra metadata)."""
    path = Path(run_dir) / relpath
    if not path.is_file():
        raise UsageError(f"{path}: cannot record a missing artifact")
    entry = {"sha256": sha256_file(path), "size_bytes": path.stat().st_size, "kind": kind, **meta}
    manifest.setdefault("artifacts", {})[relpath] = entry
    return entry


def forget_artifact(manifest: Manifest, relpath: str) -> None:
    """Drop an artifact's entry (the file was removed or renamed)."""
    manifest.setdefault("artifacts", {}).pop(relpath, None)


def verify_artifact(run_dir: str | os.PathLike[str], manifest: Manifest, relpath: str) -> Path:
    """Return the artifact's path after checking that its sha256 matches the manifest."""
    entry = manifest.get("artifacts", {}).get(relpath)
    path = Path(run_dir) / relpath
    if entry is None:
        raise UsageError(f"{path}: not listed in {manifest_path(run_dir)}")
    if not path.is_file():
        raise UsageError(f"{path}: listed in the manifest but missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise UsageError(
            f"{path}: sha256 {actual[:12]}… does not match the manifest's {entry['sha256'][:12]}…;"
            " the file changed after it was recorded"
        )
    return path


def artifacts_of_kind(manifest: Manifest, kind: str) -> dict[str, dict[str, Any]]:
    """Return the manifest's artifacts of one kind, keyed by relative path."""
    return {rel: e for rel, e in manifest.get("artifacts", {}).items() if e.get("kind") == kind}
