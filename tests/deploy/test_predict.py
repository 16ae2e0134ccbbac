"""Preprocessing from the manifest, predict on real image files, and `reviewkd predict`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import transforms

from deploy.errors import UsageError
from deploy.manifest import record_artifact, write_manifest
from deploy.predict import STUDENT_SHA256_KEY, class_names, predict, softmax
from deploy.preprocess import InputSpec, load_image, load_images
from deploy.runners import OnnxRuntimeRunner
from reviewkd.app.cli import main
from tests.helpers import (
    CLASSES,
    INPUT_SHAPE,
    MEAN,
    STD,
    add_int8_files,
    export_onnx,
    input_block,
    make_run,
    tiny_net,
    write_deep_image,
    write_image,
    write_png_bomb,
)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """An RGB PNG, an RGB JPEG, a grayscale PNG and an RGBA PNG, all of different sizes."""
    folder = tmp_path / "images"
    folder.mkdir()
    return [
        write_image(folder / "colour.png", (23, 17), seed=1),
        write_image(folder / "photo.jpg", (40, 30), seed=2),
        write_image(folder / "gray.png", (16, 16), "L", seed=3),
        write_image(folder / "alpha.png", (12, 20), "RGBA", seed=4),
    ]


def torchvision_reference(path: Path, resize: int | None) -> np.ndarray:
    """The same preprocessing written with torchvision, as a training pipeline would."""
    _, height, width = INPUT_SHAPE
    steps: list[Any] = (
        [transforms.Resize((height, width))]
        if resize is None
        else [transforms.Resize(resize), transforms.CenterCrop((height, width))]
    )
    pipeline = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    with Image.open(path) as image:
        return pipeline(image.convert("RGB")).numpy()


# --- preprocessing -------------------------------------------------------------------------------


@pytest.mark.parametrize("resize", [None, 12, 15])
def test_preprocessing_matches_torchvision(images: list[Path], resize: int | None) -> None:
    spec = InputSpec.from_manifest({"input": input_block(resize)})
    for path in images:
        array = load_image(path, spec)
        assert array.dtype == np.float32
        assert array.shape == INPUT_SHAPE
        np.testing.assert_allclose(array, torchvision_reference(path, resize), atol=1e-6)


def test_grayscale_becomes_three_equal_channels(images: list[Path]) -> None:
    spec = InputSpec.from_manifest({"input": input_block()})
    gray = load_image(images[2], spec)
    pixels = (
        gray * np.asarray(STD, dtype=np.float32)[:, None, None]
        + np.asarray(MEAN, dtype=np.float32)[:, None, None]
    )
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1e-6)
    np.testing.assert_allclose(pixels[0], pixels[2], atol=1e-6)


def test_a_resize_that_would_explode_a_thin_image_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 x 100 pixels, shorter side to 50: 50 x 2500 pixels, above a limit of 100000 (PIL's own limit
    # is 89 million: a 1 x 50000 image resized to 4096 would hold 200 billion).
    path = tmp_path / "thin.png"
    Image.fromarray(np.full((100, 2, 3), 90, dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    spec = InputSpec.from_manifest({"input": input_block(resize=50)})
    with pytest.raises(UsageError, match=r"thin\.png: cannot read as an image \(2 x 100 pixels would become"):
        load_image(path, spec)
    assert load_image(path, InputSpec.from_manifest({"input": input_block(resize=12)})).shape == INPUT_SHAPE


def test_single_channel_models_get_grayscale(images: list[Path]) -> None:
    spec = InputSpec.from_manifest({"input": input_block(shape=(1, 8, 10))})
    batch = load_images(images, spec)
    assert batch.shape == (len(images), 1, 8, 10)
    with Image.open(images[0]) as image:
        expected = np.asarray(image.convert("L").resize((10, 8), Image.Resampling.BILINEAR), np.float32) / 255
    np.testing.assert_allclose(batch[0, 0], (expected - MEAN[0]) / STD[0], atol=1e-6)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, r"input\.shape: expected \[C, H, W\]"),
        ({**input_block(), "shape": [3, 8]}, r"input\.shape"),
        ({**input_block(), "shape": [4, 8, 10], "mean": [0.5] * 4, "std": [0.5] * 4}, "4 channels"),
        ({**input_block(), "mean": [0.5, 0.5]}, r"input\.mean: expected 3 finite numbers"),
        ({**input_block(), "mean": [0.5, float("nan"), 0.5]}, r"input\.mean: expected 3 finite numbers"),
        ({**input_block(), "std": [0.2, 0.0, 0.2]}, r"input\.std: expected positive"),
        ({**input_block(), "resize": 6}, r"input\.resize: expected null or an integer from 8 to 4096"),
        ({**input_block(), "resize": 4097}, r"input\.resize: expected null or an integer from 8 to 4096"),
        ({**input_block(), "shape": [3, 8, 4097]}, r"input\.shape: .* H and W at most 4096"),
    ],
    ids=[
        "missing",
        "two-dims",
        "four-channels",
        "mean-length",
        "nan-mean",
        "zero-std",
        "resize-too-small",
        "resize-too-large",
        "side-too-large",
    ],
)
def test_bad_input_blocks_are_usage_errors(block: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        InputSpec.from_manifest({"input": block})


def test_missing_and_unreadable_images_are_named(tmp_path: Path) -> None:
    spec = InputSpec.from_manifest({"input": input_block()})
    with pytest.raises(UsageError, match=r"nowhere\.png: no such image file"):
        load_image(tmp_path / "nowhere.png", spec)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image", encoding="utf-8")
    with pytest.raises(UsageError, match=r"fake\.png: cannot read as an image"):
        load_image(fake, spec)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(write_image(tmp_path / "whole.jpg", (64, 64)).read_bytes()[:200])
    with pytest.raises(UsageError, match=r"truncated\.jpg: cannot read as an image"):
        load_image(truncated, spec)
    with pytest.raises(UsageError, match="no image files"):
        load_images([], spec)


# --- predict -------------------------------------------------------------------------------------


def test_predict_matches_the_torch_model(tmp_path: Path, images: list[Path]) -> None:
    run, manifest = make_run(tmp_path, resize=12)
    with OnnxRuntimeRunner(run / "export" / "student.onnx") as runner:
        results = predict(runner, manifest, images, top_k=3)
    batch = torch.from_numpy(np.stack([torchvision_reference(p, 12) for p in images]))
    with torch.no_grad():
        probabilities = torch.softmax(tiny_net()(batch), dim=1).numpy()
    assert len(results) == len(images)
    for top, expected in zip(results, probabilities, strict=True):
        order = np.argsort(-expected)[:3]
        assert [name for name, _ in top] == [CLASSES[i] for i in order]
        np.testing.assert_allclose([p for _, p in top], expected[order], atol=1e-5)
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)


def test_top_k_is_cut_to_the_class_count_and_must_be_positive(tmp_path: Path, images: list[Path]) -> None:
    run, manifest = make_run(tmp_path)
    with OnnxRuntimeRunner(run / "export" / "student.onnx") as runner:
        (top,) = predict(runner, manifest, images[:1], top_k=10)
        assert sorted(name for name, _ in top) == sorted(CLASSES)
        assert sum(p for _, p in top) == pytest.approx(1.0)
        with pytest.raises(UsageError, match="--top-k"):
            predict(runner, manifest, images[:1], top_k=0)


def test_fixed_batch_models_are_fed_padded_batches(tmp_path: Path, images: list[Path]) -> None:
    run, manifest = make_run(tmp_path)
    fixed = export_onnx(tiny_net(), tmp_path / "fixed.onnx", batch=2)
    three = images[:3]
    with (
        OnnxRuntimeRunner(fixed) as fixed_runner,
        OnnxRuntimeRunner(run / "export" / "student.onnx") as dynamic,
    ):
        assert fixed_runner.max_batch == 2
        padded = predict(fixed_runner, manifest, three, top_k=2)
        reference = predict(dynamic, manifest, three, top_k=2)
    assert [[n for n, _ in top] for top in padded] == [[n for n, _ in top] for top in reference]
    np.testing.assert_allclose(
        [[p for _, p in top] for top in padded], [[p for _, p in top] for top in reference]
    )


def test_predict_checks_the_manifest_against_the_model(tmp_path: Path, images: list[Path]) -> None:
    run, manifest = make_run(tmp_path)
    with OnnxRuntimeRunner(run / "export" / "student.onnx") as runner:
        with pytest.raises(UsageError, match=r"the manifest says \(3, 10, 8\)"):
            predict(runner, {**manifest, "input": input_block(shape=(3, 10, 8))}, images)
        with pytest.raises(UsageError, match="4 logits but the manifest lists 2 classes"):
            predict(runner, {**manifest, "classes": ["a", "b"]}, images)
        with pytest.raises(UsageError, match=r"missing\.png"):
            predict(runner, manifest, [images[0], tmp_path / "missing.png"])
        (top,) = predict(runner, {**manifest, "classes": []}, images[:1], top_k=4)
    assert sorted(name for name, _ in top) == ["0", "1", "2", "3"]


def test_softmax_is_stable_and_class_names_fall_back_to_indices() -> None:
    probabilities = softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(probabilities, [[0.5, 0.5, 0.0]])
    assert class_names({}, 3) == ["0", "1", "2"]


# --- images deeper than 8 bits, and decompression bombs (issue 11 items 5 and 13) ---------------


def _digit_three(size: int = 24) -> np.ndarray:
    """A grey "3" drawn in mid-tones (8-bit values 40..200), so that clipping or blackening shows."""
    pixels = np.full((size, size), 40, dtype=np.uint8)
    for row in (3, size // 2, size - 4):
        pixels[row - 1 : row + 2, 6 : size - 6] = 200
    pixels[3 : size - 3, size - 8 : size - 5] = 200
    return pixels


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("F", ".tiff")])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_and_float_images_are_rescaled_by_bit_depth(
    tmp_path: Path, mode: str, suffix: str, channels: int
) -> None:
    pixels = _digit_three()
    eight_bit = tmp_path / "three.png"
    Image.fromarray(pixels).save(eight_bit)
    deep = write_deep_image(tmp_path / f"three_deep{suffix}", pixels, mode)
    with Image.open(deep) as opened:
        assert opened.mode == mode  # the file really is deeper than 8 bits
    shape = (channels, *INPUT_SHAPE[1:])
    spec = InputSpec.from_manifest({"input": input_block(shape=shape)})
    np.testing.assert_allclose(load_image(deep, spec), load_image(eight_bit, spec), atol=1e-6)


@pytest.mark.parametrize(
    ("pixels", "mode", "message"),
    [
        (
            np.full((8, 8), 1.5, dtype=np.float32),
            "F",
            r"floating-point pixels span 1\.5 to 1\.5; expected values in 0-1",
        ),
        (np.full((8, 8), np.nan, dtype=np.float32), "F", r"floating-point pixels span nan"),
        (np.full((8, 8), 70000, dtype=np.int32), "I", r"32-bit integer pixels span 70000 to 70000"),
        (np.full((8, 8), -5, dtype=np.int32), "I", r"32-bit integer pixels span -5 to -5"),
    ],
)
def test_pixel_values_no_bit_depth_explains_are_refused(
    tmp_path: Path, pixels: np.ndarray, mode: str, message: str
) -> None:
    path = tmp_path / "odd.tiff"
    Image.fromarray(pixels, mode).save(path)
    spec = InputSpec.from_manifest({"input": input_block()})
    with pytest.raises(UsageError, match=rf"odd\.tiff: cannot read as an image \({message}"):
        load_image(path, spec)


def test_cli_predicts_a_16_bit_image_as_its_8_bit_twin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    eight_bit = tmp_path / "three.png"
    Image.fromarray(_digit_three()).save(eight_bit)
    deep = write_deep_image(tmp_path / "three16.png", _digit_three(), "I;16")
    code, out, err = predict_cli(capsys, run, eight_bit, deep, "--json")
    assert code == 0, err
    first, second = json.loads(out)["predictions"]
    assert [t["class"] for t in first["top_k"]] == [t["class"] for t in second["top_k"]]
    for a, b in zip(first["top_k"], second["top_k"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-6)


def test_cli_refuses_a_decompression_bomb_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    bomb = write_png_bomb(tmp_path / "bomb.png")
    code, out, err = predict_cli(capsys, run, bomb)
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"reviewkd predict: error: {bomb}: refused, too many pixels to decode safely")


# --- reviewkd predict ----------------------------------------------------------------------------


def predict_cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """Run `reviewkd predict ...`; return the exit code, stdout and stderr."""
    code = main(["predict", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_predicts_with_a_run_directory(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, manifest = make_run(tmp_path)
    code, out, _ = predict_cli(capsys, run, *images, "--top-k", "2", "--json")
    assert code == 0
    document = json.loads(out)
    assert document["runner"] == "onnxruntime/fp32"
    assert [entry["image"] for entry in document["predictions"]] == [str(p) for p in images]
    with OnnxRuntimeRunner(run / "export" / "student.onnx") as runner:
        expected = predict(runner, manifest, images, top_k=2)
    for entry, top in zip(document["predictions"], expected, strict=True):
        assert [(t["class"], t["probability"]) for t in entry["top_k"]] == [
            (n, pytest.approx(p)) for n, p in top
        ]
    code, out, _ = predict_cli(capsys, run, images[0], "--top-k", "1")
    assert code == 0
    assert "onnxruntime/fp32" in out
    assert str(images[0]) in out
    assert expected[0][0][0] in out


def test_cli_predicts_with_a_stand_alone_onnx_file(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    elsewhere = shutil.copyfile(run / "export" / "student.onnx", tmp_path / "shipped.onnx")
    code, out, _ = predict_cli(capsys, elsewhere, images[1], "--json")
    assert code == 0
    (entry,) = json.loads(out)["predictions"]
    assert len(entry["top_k"]) == len(CLASSES)
    bare = export_onnx(tiny_net(), tmp_path / "bare.onnx")
    code, _, err = predict_cli(capsys, bare, images[1])
    assert code == 2
    assert "bare.onnx: no run manifest lists it" in err


def test_cli_refuses_a_tampered_run_file(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    export_onnx(tiny_net(seed=5), run / "export" / "student.onnx")
    code, out, err = predict_cli(capsys, run, images[0])
    assert code == 2
    assert out == ""
    assert "does not match the manifest" in err
    # Pointing at the file inside the run finds the run's manifest and checks it too.
    code, _, err = predict_cli(capsys, run / "export" / "student.onnx", images[0])
    assert code == 2
    assert "does not match the manifest" in err


def test_predict_takes_every_format_validate_and_bench_name(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    add_int8_files(run)
    from benchmarks.targets import artifact_formats
    from deploy.manifest import read_manifest

    keys = [key for key in artifact_formats(read_manifest(run)) if key.startswith("onnxruntime/")]
    assert keys == ["onnxruntime/fp32", "onnxruntime/int8", "onnxruntime/int8-trt"]
    for key in keys:
        code, out, err = predict_cli(capsys, run, images[0], "--backend", key, "--json")
        assert code == 0, (key, err)
        assert len(json.loads(out)["predictions"][0]["top_k"]) == len(CLASSES)


def test_cli_usage_errors(tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = make_run(tmp_path)
    code, _, err = predict_cli(capsys, run, images[0], "--backend", "onnxruntime/int8")
    assert code == 2
    assert (
        f"{run}: no onnxruntime/int8 file in the manifest (has: onnxruntime/fp32);"
        f" make it with `reviewkd export {run} --formats int8`"
    ) in err
    code, _, err = predict_cli(capsys, run, images[0], "--backend", "tflite/fp32")
    assert code == 2 and "--backend 'tflite/fp32'" in err
    code, _, err = predict_cli(
        capsys, run / "export" / "student.onnx", images[0], "--backend", "onnxruntime/fp32"
    )
    assert code == 2 and "--backend picks a file of a run directory" in err
    code, _, err = predict_cli(capsys, tmp_path / "nothing", images[0])
    assert code == 2 and "no such run directory or model file" in err
    code, _, err = predict_cli(capsys, run, tmp_path / "missing.jpg")
    assert code == 2 and "missing.jpg: no such image file" in err


def test_cli_torch_backend_agrees_with_onnx(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from reviewkd.models import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", len(CLASSES)).eval()
    run = tmp_path / "run"
    run.mkdir()
    save_file(model.state_dict(), str(run / "student.safetensors"))
    manifest = {
        "schema_version": 1,
        "classes": CLASSES,
        "input": input_block(shape=(3, 32, 32)),
        "student": {"arch": "cifar_resnet20", "num_classes": len(CLASSES)},
        "artifacts": {},
    }
    export_onnx(model, run / "export" / "student.onnx", (3, 32, 32))
    record_artifact(run, manifest, "student.safetensors", "weights")
    record_artifact(run, manifest, "export/student.onnx", "onnx", precision="fp32")
    write_manifest(run, manifest)
    results = {}
    for backend in ("torch/fp32", "onnxruntime/fp32"):
        code, out, _ = predict_cli(capsys, run, *images, "--json", "--backend", backend)
        assert code == 0
        document = json.loads(out)
        assert document["runner"] == backend
        results[backend] = [
            [(t["class"], t["probability"]) for t in e["top_k"]] for e in document["predictions"]
        ]
    for torch_top, onnx_top in zip(results["torch/fp32"], results["onnxruntime/fp32"], strict=True):
        assert [n for n, _ in torch_top] == [n for n, _ in onnx_top]
        np.testing.assert_allclose([p for _, p in torch_top], [p for _, p in onnx_top], atol=1e-4)


# --- stale and altered files (issue 11 items 4 and 6) ---------------------------------------------


def test_an_export_from_an_older_student_is_refused(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, manifest = make_run(tmp_path)
    manifest["student"]["sha256"] = "a" * 64  # the student the run now has (retrained)
    manifest["artifacts"]["export/student.onnx"][STUDENT_SHA256_KEY] = "b" * 64
    write_manifest(run, manifest)
    for target in (run, run / "export" / "student.onnx"):
        code, out, err = predict_cli(capsys, target, images[0])
        assert code == 2 and out == ""
        assert err == (
            f"reviewkd predict: error: {run / 'export' / 'student.onnx'}: it was exported from student"
            " bbbbbbbbbbbb…, the run's student is now aaaaaaaaaaaa…;"
            f" re-export it with `reviewkd export {run} --formats onnx`\n"
        )
    del manifest["artifacts"]["export/student.onnx"][STUDENT_SHA256_KEY]
    write_manifest(run, manifest)
    code, _, err = predict_cli(capsys, run, images[0])
    assert code == 2 and "the manifest does not record which student it was exported from" in err
    manifest["artifacts"]["export/student.onnx"][STUDENT_SHA256_KEY] = "a" * 64
    write_manifest(run, manifest)
    assert predict_cli(capsys, run, images[0])[0] == 0


def _rewrite_loose_copy(source: Path, target: Path, change: str) -> Path:
    """Copy a sealed ONNX file and alter it as a careless or hostile hand would (onnx.save, no reseal)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    if change == "weights":
        weights = model.graph.initializer[0]
        weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * 1.01, weights.name))
    elif change == "classes":
        for prop in model.metadata_props:
            if prop.key == "reviewkd_manifest":
                document = json.loads(prop.value)
                document["classes"] = list(reversed(document["classes"]))
                prop.value = json.dumps(document)
    elif change == "graph":
        model.graph.node[-1].name = "renamed"
    elif change == "unsealed":
        kept = [p for p in model.metadata_props if p.key != "reviewkd_content_sha256"]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("weights", "does not match the"),
        ("classes", "does not match the"),
        ("graph", "does not match the"),
        ("unsealed", "carries no content hash (reviewkd_content_sha256)"),
    ],
)
def test_a_loose_onnx_file_is_checked_by_its_content_hash(
    tmp_path: Path, images: list[Path], capsys: pytest.CaptureFixture[str], change: str, message: str
) -> None:
    run, _ = make_run(tmp_path)
    loose = shutil.copyfile(run / "export" / "student.onnx", tmp_path / "shipped.onnx")
    assert predict_cli(capsys, loose, images[0])[0] == 0
    altered = _rewrite_loose_copy(loose, tmp_path / "altered.onnx", change)
    code, out, err = predict_cli(capsys, altered, images[0])
    assert code == 2 and out == ""
    assert err.startswith(f"reviewkd predict: error: {altered}: ") and message in err
    assert err.count("\n") == 1
