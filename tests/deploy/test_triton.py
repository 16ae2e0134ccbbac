"""`reviewkd triton`: the model repository, its config.pbtxt read as Triton's own ModelConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from deploy.detection.outputs import OUTPUT_NAMES as DETECTION_OUTPUTS
from deploy.errors import UsageError
from deploy.fileio import sha256_file
from deploy.manifest import forget_artifact, read_manifest, record_artifact, write_manifest
from deploy.runners import OnnxRuntimeRunner
from deploy.triton import preferred_batch_sizes, write_triton_repository
from deploy.trt_sidecar import sidecar_path
from reviewkd.app.cli import main
from tests.helpers import (
    CLASSES,
    DETECTION_CLASSES,
    DETECTION_INPUT_SHAPE,
    DETECTION_TOP_K,
    INPUT_SHAPE,
    add_fp16_file,
    add_int8_files,
    export_onnx,
    make_detection_run,
    make_run,
    random_batch,
    tiny_net,
    write_plan,
)

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def read_config(model_dir: Path) -> Any:
    """Parse a config.pbtxt the way Triton does: text format into inference.ModelConfig."""
    return text_format.Parse(
        (model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig()
    )


def make_run_with_plan(tmp_path: Path, min_batch: int = 1) -> tuple[Path, dict[str, Any]]:
    """A run with its fp32 ONNX file and an fp16 plan (profile up to batch 16) plus sidecar."""
    run, manifest = make_run(tmp_path)
    plan = write_plan(run / "export" / "student.fp16.plan", "fp16", max_batch=16, min_batch=min_batch)
    record_artifact(run, manifest, "export/student.fp16.plan", "tensorrt", precision="fp16")
    record_artifact(run, manifest, sidecar_path(plan).relative_to(run).as_posix(), "sidecar")
    write_manifest(run, manifest)
    return run, manifest


def test_repository_layout_and_configs(tmp_path: Path) -> None:
    run, manifest = make_run_with_plan(tmp_path)
    repo = tmp_path / "repo"
    models = write_triton_repository(run, repo)
    assert [m.name for m in models] == ["tiny_net_onnx", "tiny_net_tensorrt_fp16"]
    assert sorted(p.name for p in repo.iterdir()) == ["tiny_net_onnx", "tiny_net_tensorrt_fp16"]

    onnx_config = read_config(repo / "tiny_net_onnx")
    assert onnx_config.name == "tiny_net_onnx"
    assert onnx_config.platform == "onnxruntime_onnx"
    assert onnx_config.max_batch_size == 64
    (inp,) = onnx_config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == (
        "images",
        model_config_pb2.TYPE_FP32,
        list(INPUT_SHAPE),
    )
    (out,) = onnx_config.output
    assert (out.name, out.data_type, list(out.dims)) == ("logits", model_config_pb2.TYPE_FP32, [len(CLASSES)])
    assert out.label_filename == "labels.txt"
    assert onnx_config.HasField("dynamic_batching")
    assert list(onnx_config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32, 64]
    (group,) = onnx_config.instance_group
    assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)

    plan_config = read_config(repo / "tiny_net_tensorrt_fp16")
    plan_text = (repo / "tiny_net_tensorrt_fp16" / "config.pbtxt").read_text(encoding="utf-8")
    assert (
        "# Engine built with TensorRT 10.13.0.35 for NVIDIA H100 80GB HBM3 (compute capability 9.0)"
        in plan_text
    )
    assert plan_config.platform == "tensorrt_plan"
    assert plan_config.max_batch_size == 16
    assert list(plan_config.input[0].dims) == list(INPUT_SHAPE)
    assert list(plan_config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert plan_config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU

    for model_dir, filename, source in [
        ("tiny_net_onnx", "model.onnx", "export/student.onnx"),
        ("tiny_net_tensorrt_fp16", "model.plan", "export/student.fp16.plan"),
    ]:
        assert sorted(p.name for p in (repo / model_dir).iterdir()) == ["1", "config.pbtxt", "labels.txt"]
        assert sha256_file(repo / model_dir / "1" / filename) == manifest["artifacts"][source]["sha256"]
        labels = (repo / model_dir / "labels.txt").read_text(encoding="utf-8").splitlines()
        assert labels == CLASSES

    # The copy Triton would serve computes the same logits as the run's file.
    images = random_batch(3)
    with (
        OnnxRuntimeRunner(repo / "tiny_net_onnx" / "1" / "model.onnx") as served,
        OnnxRuntimeRunner(run / "export" / "student.onnx") as original,
    ):
        np.testing.assert_array_equal(served.infer(images), original.infer(images))


def test_every_onnx_file_onnx_runtime_serves_as_checked_gets_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    add_fp16_file(run)
    add_int8_files(run)
    repo = tmp_path / "repo"
    assert main(["triton", str(run), "--out", str(repo)]) == 0
    out = capsys.readouterr().out
    served = {"tiny_net_onnx": "student.onnx", "tiny_net_onnx_fp16": "student.fp16.onnx"}
    served["tiny_net_onnx_int8"] = "student.int8.onnx"
    assert sorted(p.name for p in repo.iterdir()) == sorted(served)
    images = random_batch(3)
    for name, file in served.items():
        config = read_config(repo / name)
        assert (config.name, config.platform) == (name, "onnxruntime_onnx")
        assert f"{repo / name}: onnxruntime_onnx from export/{file}," in out
        # The copy computes what the run's file computes, opened as reviewkd opens it.
        with (
            OnnxRuntimeRunner(repo / name / "1" / "model.onnx") as copy,
            OnnxRuntimeRunner(run / "export" / file) as original,
        ):
            np.testing.assert_array_equal(copy.infer(images), original.infer(images))
    # The TensorRT flavour must run its Q/DQ unfused, which Triton's ONNX Runtime would not: left out,
    # and the output says why.
    assert "export/student.int8.trt.onnx: not served: made for TensorRT" in out


def test_cli_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = make_run_with_plan(tmp_path)
    repo = tmp_path / "repo"
    argv = ["triton", str(run), "--out", str(repo), "--max-batch-size", "8", "--instance-kind", "gpu"]
    assert main([*argv, "--count", "2", "--name", "resnet"]) == 0
    out = capsys.readouterr().out
    assert f"{repo / 'resnet_onnx'}: onnxruntime_onnx from export/student.onnx, max_batch_size 8" in out
    onnx_config = read_config(repo / "resnet_onnx")
    plan_config = read_config(repo / "resnet_tensorrt_fp16")
    assert (onnx_config.max_batch_size, plan_config.max_batch_size) == (8, 8)
    for config in (onnx_config, plan_config):
        (group,) = config.instance_group
        assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2)
    assert main(["triton", str(run), "--out", str(repo), "--count", "0"]) == 2
    assert "--count: expected a positive number" in capsys.readouterr().err


def test_rewriting_replaces_our_models_and_keeps_others(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path)
    repo = tmp_path / "repo"
    (repo / "someone_elses_model" / "1").mkdir(parents=True)
    (repo / "someone_elses_model" / "config.pbtxt").write_text(
        'name: "someone_elses_model"\n', encoding="utf-8"
    )
    (repo / "tiny_net_onnx").mkdir()
    (repo / "tiny_net_onnx" / "stale.txt").write_text("from an earlier export", encoding="utf-8")
    write_triton_repository(run, repo, max_batch_size=1)
    assert sorted(p.name for p in repo.iterdir()) == ["someone_elses_model", "tiny_net_onnx"]
    assert not (repo / "tiny_net_onnx" / "stale.txt").exists()
    config = read_config(repo / "tiny_net_onnx")
    assert config.max_batch_size == 1
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo.")] == []


def test_tampered_files_leave_the_repository_untouched(tmp_path: Path) -> None:
    run, manifest = make_run_with_plan(tmp_path)
    repo = tmp_path / "repo"
    write_triton_repository(run, repo)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}

    (run / "export" / "student.fp16.plan").write_bytes(b"swapped engine")
    with pytest.raises(UsageError, match=r"student\.fp16\.plan: sha256 .* does not match the manifest"):
        write_triton_repository(run, repo)
    export_onnx(tiny_net(seed=9), run / "export" / "student.onnx")
    with pytest.raises(UsageError, match=r"student\.onnx: sha256 .* does not match the manifest"):
        write_triton_repository(run, repo, manifest=manifest)

    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo.")] == []


def test_plans_must_accept_batch_one(tmp_path: Path) -> None:
    run, _ = make_run_with_plan(tmp_path, min_batch=2)
    with pytest.raises(UsageError, match="profile starts at batch 2; Triton sends batches from 1"):
        write_triton_repository(run, tmp_path / "repo")


def test_a_run_without_onnx_is_a_usage_error(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    forget_artifact(manifest, "export/student.onnx")
    with pytest.raises(
        UsageError,
        match=r"no onnxruntime/fp32 file in the manifest \(has: none\);"
        r" make it with `reviewkd export .* --formats onnx`",
    ):
        write_triton_repository(run, tmp_path / "repo", manifest=manifest)
    assert not (tmp_path / "repo").exists()


def test_a_fixed_batch_onnx_file_cannot_be_batched(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    export_onnx(tiny_net(), run / "export" / "student.onnx", batch=1)
    record_artifact(run, manifest, "export/student.onnx", "onnx", precision="fp32")
    with pytest.raises(UsageError, match="fixed batch 1; Triton's batching needs a dynamic batch dimension"):
        write_triton_repository(run, tmp_path / "repo", manifest=manifest)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "--max-batch-size"),
        ({"instance_kind": "tpu"}, "--instance-kind"),
        ({"model_name": "a/b"}, "--name"),
    ],
)
def test_bad_options(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    run, _ = make_run(tmp_path)
    with pytest.raises(UsageError, match=message):
        write_triton_repository(run, tmp_path / "repo", **options)


@pytest.mark.parametrize(
    ("maximum", "sizes"),
    [(1, []), (2, [2]), (4, [4]), (6, [4, 6]), (64, [4, 8, 16, 32, 64]), (100, [4, 8, 16, 32, 64, 100])],
)
def test_preferred_batch_sizes(maximum: int, sizes: list[int]) -> None:
    assert preferred_batch_sizes(maximum) == sizes


# --- hostile runs: nothing from a run's files may add to config.pbtxt or labels.txt (issue 11 item 2) ---

INJECTION = '\nparameters { key: "injected" value { string_value: "yes" } }\n'


def _write_hostile_sidecar(run: Path, manifest: dict[str, Any], **changes: Any) -> None:
    """Rewrite the fp16 plan's sidecar with `changes` and record it in the manifest."""
    import dataclasses

    from deploy.trt_sidecar import read_sidecar, write_sidecar

    path = sidecar_path(run / "export" / "student.fp16.plan")
    write_sidecar(path, dataclasses.replace(read_sidecar(path), **changes))
    record_artifact(run, manifest, path.relative_to(run).as_posix(), "sidecar")
    write_manifest(run, manifest)


def test_a_gpu_name_cannot_add_fields_to_the_config(tmp_path: Path) -> None:
    from deploy.trt_sidecar import GpuInfo

    run, manifest = make_run_with_plan(tmp_path)
    _write_hostile_sidecar(run, manifest, gpu=GpuInfo("NVIDIA H100" + INJECTION + "#", (9, 0)))
    repo = tmp_path / "repo"
    write_triton_repository(run, repo)
    text = (repo / "tiny_net_tensorrt_fp16" / "config.pbtxt").read_text(encoding="utf-8")
    config = read_config(repo / "tiny_net_tensorrt_fp16")
    assert not config.parameters
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert len(comments) == 2 and "NVIDIA H100\\nparameters {" in comments[1]


def test_tensor_names_are_escaped_not_spliced(tmp_path: Path) -> None:
    run, manifest = make_run_with_plan(tmp_path)
    hostile = 'images"\n}\n]\nparameters { key: "x" value { string_value: "y" } }\ninput [ { name: "z'
    _write_hostile_sidecar(run, manifest, input_names=(hostile,))
    repo = tmp_path / "repo"
    write_triton_repository(run, repo)
    config = read_config(repo / "tiny_net_tensorrt_fp16")
    assert not config.parameters
    assert [i.name for i in config.input] == [hostile]


def test_an_artifact_key_cannot_add_fields_to_the_config(tmp_path: Path) -> None:
    run, manifest = make_run(tmp_path)
    key = "export/student" + INJECTION.replace("/", "_") + ".fp16.plan"
    write_plan(run / key, "fp16", max_batch=16)
    record_artifact(run, manifest, key, "tensorrt", precision="fp16")
    write_manifest(run, manifest)
    repo = tmp_path / "repo"
    try:
        write_triton_repository(run, repo)
    except UsageError:
        assert not any(repo.rglob("config.pbtxt"))  # refused outright: nothing half-written
        return
    config = read_config(repo / "tiny_net_tensorrt_fp16")
    assert not config.parameters


@pytest.mark.parametrize("name", ["dog\ncat", "dog\r", "tab\there", "", "nul\x00"])
def test_class_names_that_would_break_labels_txt_are_refused(tmp_path: Path, name: str) -> None:
    run, manifest = make_run(tmp_path)
    manifest["classes"] = ["cat", name, "ship", "frog"]
    write_manifest(run, manifest)
    repo = tmp_path / "repo"
    with pytest.raises(UsageError, match=r"classes\[1\]: .*without line breaks or control characters"):
        write_triton_repository(run, repo)
    assert not any(repo.rglob("*"))


def test_a_precision_cannot_name_a_folder_outside_the_repository(tmp_path: Path) -> None:
    run, manifest = make_run_with_plan(tmp_path)
    manifest["artifacts"]["export/student.fp16.plan"]["precision"] = "../../escaped"
    write_manifest(run, manifest)
    repo = tmp_path / "repo"
    with pytest.raises(UsageError, match=r"Triton model name 'tiny_net_tensorrt_\.\./\.\./escaped'"):
        write_triton_repository(run, repo)
    assert not any(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("stale", ["export/student.onnx", "export/student.fp16.plan"])
def test_files_from_an_older_student_are_not_served(tmp_path: Path, stale: str) -> None:
    from deploy.predict import STUDENT_SHA256_KEY

    run, manifest = make_run_with_plan(tmp_path)
    manifest["student"]["sha256"] = "c" * 64
    for rel in ("export/student.onnx", "export/student.fp16.plan"):
        manifest["artifacts"][rel][STUDENT_SHA256_KEY] = "d" * 64 if rel == stale else "c" * 64
    write_manifest(run, manifest)
    repo = tmp_path / "repo"
    with pytest.raises(UsageError, match=rf"{stale}: it was exported from student dddddddddddd…"):
        write_triton_repository(run, repo)
    assert not any(repo.rglob("*"))


def test_a_detection_run_declares_the_four_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_detection_run(tmp_path)
    manifest = read_manifest(run)
    plan = write_plan(
        run / "export" / "student.fp16.plan",
        "fp16",
        max_batch=8,
        input_shape=DETECTION_INPUT_SHAPE,
        output_names=DETECTION_OUTPUTS,
    )
    record_artifact(run, manifest, "export/student.fp16.plan", "tensorrt", precision="fp16")
    record_artifact(run, manifest, sidecar_path(plan).relative_to(run).as_posix(), "sidecar")
    write_manifest(run, manifest)
    repo = tmp_path / "repo"
    assert main(["triton", str(run), "--out", str(repo)]) == 0
    assert f"{repo / 'fcos_small_student_onnx'}: onnxruntime_onnx" in capsys.readouterr().out
    fp32, int32 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT32
    k = DETECTION_TOP_K
    expected = [
        ("num_detections", int32, [1]),
        ("detection_boxes", fp32, [k, 4]),
        ("detection_scores", fp32, [k]),
        ("detection_classes", int32, [k]),
    ]
    for name in ("fcos_small_student_onnx", "fcos_small_student_tensorrt_fp16"):
        config = read_config(repo / name)
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == expected
        # Triton's labels are for outputs of one score per class; a detector has none.
        assert all(not o.label_filename for o in config.output)
        assert list(config.input[0].dims) == list(DETECTION_INPUT_SHAPE)
        assert (repo / name / "labels.txt").read_text(encoding="utf-8").splitlines() == DETECTION_CLASSES
    # The served copy returns what the contract says, for any batch.
    images = np.zeros((5, *DETECTION_INPUT_SHAPE), dtype=np.float32)
    with OnnxRuntimeRunner(repo / "fcos_small_student_onnx" / "1" / "model.onnx") as served:
        outputs = served.infer_outputs(images)
    assert {name: (array.dtype.name, array.shape[1:]) for name, array in outputs.items()} == {
        name: ("int32" if dtype == int32 else "float32", tuple(dims)) for name, dtype, dims in expected
    }
    assert outputs["num_detections"].shape[0] == 5


def test_a_detection_run_without_its_detection_block_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_detection_run(tmp_path)
    manifest = read_manifest(run)
    del manifest["detection"]
    write_manifest(run, manifest)
    assert main(["triton", str(run), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert "detection: expected an object with max_detections" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "repo").exists()
