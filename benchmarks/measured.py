"""What a validate or bench result measured, so that results of different kinds are never mixed.

Every result carries a "measured" block:

    source          where the inputs came from: {"kind", "path", "images", ...}
                        kind "run-split": the run's own validation split (RUN/config.yaml; "path"
                            is its data root, "dataset" its dataset), "limit" the --limit given;
                        kind "folder": an image folder given with --data ("path", absolute);
                        kind "given": batches handed to the harness by its caller;
                        kind "random": bench's seeded random inputs ("seed").
                    "images" is how many images were measured (None for bench).
    reference       the format the others were compared with (None for bench)
    student_sha256  the run's student.safetensors when measured (None: the run records none)

Two results are of the same kind when these agree (`measurement_key`); only those are merged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from deploy.manifest import model_block

SOURCE_RUN_SPLIT = "run-split"
SOURCE_FOLDER = "folder"
SOURCE_GIVEN = "given"
SOURCE_RANDOM = "random"
# The source fields that identify what was measured; the others ("limit", "seed") only describe it.
_IDENTIFYING_SOURCE_FIELDS = ("kind", "dataset", "path", "images")


def measured_block(
    source: Mapping[str, Any], reference: str | None, student_sha256: str | None
) -> dict[str, Any]:
    """The "measured" block of a result (see the module docstring)."""
    return {"source": dict(source), "reference": reference, "student_sha256": student_sha256}


def measurement_key(result: Mapping[str, Any]) -> str:
    """A result's identity as text: equal for two results exactly when they may be merged.

    A result without a "measured" block (written by hand) has the key of no source at all.
    """
    measured = result.get("measured")
    measured = measured if isinstance(measured, Mapping) else {}
    source = measured.get("source")
    source = source if isinstance(source, Mapping) else {}
    identity = {
        "source": {name: source.get(name) for name in _IDENTIFYING_SOURCE_FIELDS},
        "reference": measured.get("reference"),
        "student_sha256": measured.get("student_sha256"),
    }
    return json.dumps(identity, sort_keys=True, default=str)


def student_of(result: Mapping[str, Any]) -> str | None:
    """The student sha256 a result was measured with (None: not recorded)."""
    measured = result.get("measured")
    if not isinstance(measured, Mapping):
        return None
    sha = measured.get("student_sha256")
    return sha if isinstance(sha, str) else None


def source_text(result: Mapping[str, Any]) -> str:
    """One line naming a result's inputs, for the report and the terminal."""
    measured = result.get("measured")
    source = measured.get("source") if isinstance(measured, Mapping) else None
    if not isinstance(source, Mapping):
        return "inputs not recorded"
    kind, images = source.get("kind"), source.get("images")
    count = f"{images} images" if images is not None else None
    if kind == SOURCE_RUN_SPLIT:
        dataset = source.get("dataset")
        # The split validate reads: the test split where data.val_split carved the val split.
        what = "the run's held-out split" + (f" ({dataset})" if dataset else "")
    elif kind == SOURCE_FOLDER:
        what = f"image folder {source.get('path')}"
    elif kind == SOURCE_RANDOM:
        what = f"random inputs (seed {source.get('seed')})"
    elif kind == SOURCE_GIVEN:
        what = "images given by the caller"
    else:
        what = f"source {kind!r}"
    return f"{what}, {count}" if count else what


def short_sha(sha: str | None) -> str:
    """The first 12 hex digits of a sha256, as predict's stale-export message shows them."""
    return "none recorded" if not sha else f"{sha[:12]}…"


def manifest_student_sha256(manifest: Mapping[str, Any]) -> str | None:
    """The sha256 of the run's student.safetensors as its manifest records it (None: no student)."""
    return model_block(manifest, "student").sha256
