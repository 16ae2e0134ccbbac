"""Atomic writes: readable modes, nothing half-written, one-line errors for outputs that cannot be written."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy.errors import OutputError, UsageError
from deploy.fileio import (
    append_line,
    atomic_output,
    check_self_contained_onnx,
    onnx_external_tensors,
    write_json_atomic,
    write_text_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_files_get_the_mode_the_umask_gives(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "report" / "validate.json", {"results": {}})
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what an ordinary write gives, for comparison
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "report" / "validate.json") == 0o666 & ~umask == _mode(plain)


def test_a_rewrite_keeps_the_mode_the_file_had(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.write_text("{}")
    target.chmod(0o640)
    write_text_atomic(target, "{}\n")
    assert _mode(target) == 0o640
    assert target.read_text() == "{}\n"


def test_out_naming_a_file_is_an_output_error_naming_the_target(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    with pytest.raises(OutputError, match=r"taken/validate\.json: cannot write it") as caught:
        write_json_atomic(blocker / "validate.json", {})
    assert "\n" not in str(caught.value)
    assert blocker.read_text() == "a file, not a folder"


def test_a_full_disk_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "bench.json"
    target.write_text("previous")

    def full_disk(self: Path, data: str, *args: object, **kwargs: object) -> int:
        with open(self, "w") as handle:
            handle.write(data[: len(data) // 2])  # half the bytes made it, then the disk filled
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OutputError, match=r"bench\.json: cannot write it \(No space left on device\)"):
        write_json_atomic(target, {"results": {"x": 1}})
    monkeypatch.undo()
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]


def test_an_error_that_is_not_about_writing_passes_through(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an OSError"), atomic_output(tmp_path / "x.json"):
        raise ValueError("not an OSError")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["symbolic link", "hard link"])
def test_an_append_never_writes_through_a_link(tmp_path: Path, how: str) -> None:
    # metrics.jsonl is appended to in place: a second name of another file would append to that file.
    victim = tmp_path / "victim.txt"
    victim.write_text("the victim's own words\n")
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    if how == "hard link":
        os.link(victim, metrics)
    else:
        metrics.symlink_to(victim)
    with pytest.raises(OutputError, match=f"^{metrics}: cannot write it"):
        append_line(metrics, '{"epoch": 1}')
    assert victim.read_text() == "the victim's own words\n"


def test_an_append_adds_one_line(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    append_line(metrics, '{"epoch": 1}')
    append_line(metrics, '{"epoch": 2}')
    assert metrics.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'


def _external(tensor: onnx.TensorProto, location: str = "weights.bin") -> onnx.TensorProto:
    """Mark `tensor` as kept in another file, as onnx's external-data writer does."""
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    return tensor


def test_external_data_is_found_wherever_the_schema_keeps_a_tensor() -> None:
    from onnx import GraphProto, TensorProto, helper, numpy_helper

    def tensor(name: str) -> TensorProto:
        return numpy_helper.from_array(np.ones((2,), np.float32), name)

    def graph(*, initializer: TensorProto | None = None, constant: TensorProto | None = None) -> GraphProto:
        nodes = [helper.make_node("Constant", [], ["c"], value=constant)] if constant is not None else []
        nodes.append(helper.make_node("Identity", ["x"], ["y"]))
        return helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
            initializer=[initializer] if initializer is not None else [],
        )

    def model(main: onnx.GraphProto) -> bytes:
        return helper.make_model(main).SerializeToString()

    plain = model(graph(initializer=tensor("w"), constant=tensor("k")))
    assert onnx_external_tensors(plain) == []
    check_self_contained_onnx("plain.onnx", plain)
    assert onnx_external_tensors(model(graph(initializer=_external(tensor("w"))))) == ["w"]
    assert onnx_external_tensors(model(graph(constant=_external(tensor("k"))))) == ["k"]
    # Inside a subgraph: an If's branch holding a Constant whose value lies elsewhere.
    branch = graph(constant=_external(tensor("deep")))
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    outer = graph()
    outer.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch, else_branch=graph()))
    outer.input.append(cond)
    nested = model(outer)
    assert onnx_external_tensors(nested) == ["deep"]
    with pytest.raises(UsageError, match=r"^nested\.onnx: 1 tensor\(s\) \('deep' first\) keep their data"):
        check_self_contained_onnx("nested.onnx", nested)
    # A deprecated group in an unknown field (protobuf reads it) hides nothing: the walk goes past it.
    grouped = b"\xfb\x3f\x08\x01\xfc\x3f" + model(graph(initializer=_external(tensor("w"))))
    assert onnx.load_from_string(grouped).graph.initializer[0].name == "w"
    assert onnx_external_tensors(grouped) == ["w"]
    with pytest.raises(ValueError, match="unsupported protobuf wire type"):
        onnx_external_tensors(b"\x0f\xff")
    check_self_contained_onnx("junk.onnx", b"\x0f\xff")  # not ONNX at all: the loader says so
