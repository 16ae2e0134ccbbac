"""`reviewkd predict` on a detection run: boxes in the original images' pixels, as JSON and drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.detection.predict import (
    PALETTE,
    FoundObject,
    ImageDetections,
    detect_each,
    draw_detections,
    drawing_scale,
)
from deploy.errors import UsageError
from deploy.manifest import InputSpec
from deploy.predict import open_target
from deploy.preprocess import load_image_sized, to_original_pixels
from reviewkd.app.cli import main
from tests.helpers import (
    DETECTION_BOXES,
    DETECTION_CLASS_INDICES,
    DETECTION_CLASSES,
    DETECTION_COUNT,
    DETECTION_INPUT_SHAPE,
    DETECTION_SCORE_OFFSETS,
    make_detection_run,
    make_run,
    write_deep_image,
    write_image,
)


def _sigmoid(value: float) -> float:
    return float(1.0 / (1.0 + np.exp(-value)))


def _grey_image(path: Path, size: tuple[int, int], level: int) -> Path:
    Image.fromarray(np.full((size[1], size[0], 3), level, dtype=np.uint8)).save(path)
    return path


def _white_square_found(
    spec: InputSpec, size: tuple[int, int], square: tuple[int, int, int, int], tmp: Path
) -> np.ndarray:
    """Draw a white rectangle (x1, y1, x2, y2, original pixels) on black, preprocess the image as predict
    does, find the rectangle in the model's input and map its box back with `to_original_pixels`."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x1, y1, x2, y2 = square
    pixels[y1:y2, x1:x2] = 255
    path = tmp / "square.png"
    Image.fromarray(pixels).save(path)
    image, read_size = load_image_sized(path, spec)
    assert read_size == size
    rows, cols = np.nonzero(image[0] > 0.5)
    found = np.array([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=np.float32)
    return to_original_pixels(found, size, spec)[0]


@pytest.mark.parametrize(
    ("resize", "size", "square"),
    [
        (None, (48, 32), (8, 6, 24, 20)),  # stretched to 24 x 16: halves both sides
        (None, (96, 16), (40, 4, 72, 12)),  # 4x across, 1x down
        (20, (50, 25), (20, 5, 40, 20)),  # shorter side 25 -> 20, then the centre 24 x 16 crop
    ],
)
def test_boxes_map_back_onto_the_original_image(
    resize: int | None, size: tuple[int, int], square: tuple[int, int, int, int], tmp_path: Path
) -> None:
    spec = InputSpec(DETECTION_INPUT_SHAPE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize)
    back = _white_square_found(spec, size, square, tmp_path)
    # Within a couple of original pixels: the resize blurs the edges by one input pixel at most.
    scale = max(size[0] / DETECTION_INPUT_SHAPE[2], size[1] / DETECTION_INPUT_SHAPE[1])
    np.testing.assert_allclose(back, square, atol=scale + 0.5)


def test_boxes_past_the_crop_are_clipped_to_the_image() -> None:
    spec = InputSpec(DETECTION_INPUT_SHAPE, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 16)
    # A 32 x 16 image: resize keeps it, the crop takes columns 4..28; the whole input is the crop.
    whole = to_original_pixels(np.array([[-5.0, -5.0, 30.0, 20.0]]), (32, 16), spec)
    np.testing.assert_allclose(whole, [[0.0, 0.0, 32.0, 16.0]])
    inside = to_original_pixels(np.array([[0.0, 0.0, 24.0, 16.0]]), (32, 16), spec)
    np.testing.assert_allclose(inside, [[4.0, 0.0, 28.0, 16.0]])


def test_detect_each_gives_classes_scores_and_boxes_per_image(tmp_path: Path) -> None:
    run = make_detection_run(tmp_path)
    dark = _grey_image(tmp_path / "dark.png", (48, 32), 0)
    bright = _grey_image(tmp_path / "bright.png", (24, 16), 255)
    runner, manifest = open_target(run)
    with runner:
        results = detect_each(runner, manifest, [dark, tmp_path / "missing.png", bright])
    first, missing, second = results
    assert isinstance(missing, UsageError) and "missing.png: no such image file" in str(missing)
    assert not isinstance(first, UsageError) and not isinstance(second, UsageError)
    assert first.size == (48, 32) and second.size == (24, 16)
    for result, mean, scale in ((first, 0.0, 2.0), (second, 1.0, 1.0)):
        assert len(result.objects) == DETECTION_COUNT
        for row, found in enumerate(result.objects):
            assert found.class_index == DETECTION_CLASS_INDICES[row]
            assert found.class_name == DETECTION_CLASSES[DETECTION_CLASS_INDICES[row]]
            assert found.score == pytest.approx(_sigmoid(mean + DETECTION_SCORE_OFFSETS[row]), abs=1e-6)
            assert found.box == pytest.approx([v * scale for v in DETECTION_BOXES[row]])


def test_padding_rows_are_never_read(tmp_path: Path) -> None:
    run = make_detection_run(tmp_path, count=0)
    runner, manifest = open_target(run)
    with runner:
        (result,) = detect_each(runner, manifest, [_grey_image(tmp_path / "a.png", (24, 16), 9)])
    assert not isinstance(result, UsageError) and result.objects == ()


def test_cli_prints_boxes_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_detection_run(tmp_path)
    image = _grey_image(tmp_path / "img.png", (48, 32), 0)
    assert main(["predict", str(run), str(image), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["runner"] == "onnxruntime/fp32"
    (prediction,) = document["predictions"]
    assert prediction["image"] == str(image) and prediction["size"] == [48, 32]
    assert [d["class"] for d in prediction["detections"]] == ["two", "zero"]
    assert prediction["detections"][0]["box"] == [4.0, 6.0, 20.0, 24.0]
    assert prediction["detections"][0]["score"] == pytest.approx(_sigmoid(2.0), abs=1e-6)
    assert "drawn" not in document


def test_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_detection_run(tmp_path)
    image = _grey_image(tmp_path / "img.png", (48, 32), 0)
    assert main(["predict", str(run), str(image)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "runner: onnxruntime/fp32"
    assert lines[1].split() == ["IMAGE", "#", "CLASS", "SCORE", "BOX", "x1,y1,x2,y2"]
    assert lines[2].split() == [str(image), "1", "two", f"{_sigmoid(2.0):.4f}", "4.0,6.0,20.0,24.0"]
    assert lines[3].split() == ["2", "zero", f"{_sigmoid(0.5):.4f}", "24.0,2.0,44.0,30.0"]


def test_save_dir_draws_each_box_in_its_class_colour(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_detection_run(tmp_path)
    image = _grey_image(tmp_path / "photo.jpg", (48, 32), 0)
    out = tmp_path / "out"
    assert main(["predict", str(run), str(image), "--save-dir", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drawn"] == [str(out / "photo.png")]
    assert sorted(p.name for p in out.iterdir()) == ["photo.png"]  # no temporary file left
    with Image.open(out / "photo.png") as drawn:
        # 32 px high, under MIN_DRAWN_SIDE: drawn 8 times as large (256 / 32).
        assert drawn.size == (48 * 8, 32 * 8)
        pixels = np.asarray(drawn.convert("RGB"))
    # The first box (class "two") spans x 4..20, y 6..24 in the original; its bottom edge is drawn
    # in class 2's colour, the second box's (class 0) right edge in class 0's, far corners stay black.
    assert tuple(pixels[24 * 8, 12 * 8]) == PALETTE[2]
    assert tuple(pixels[16 * 8, 44 * 8]) == PALETTE[0]
    assert tuple(pixels[32 * 8 - 1, 0]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("size", "scale"), [((48, 32), 8), ((96, 64), 4), ((300, 255), 2), ((256, 1000), 1), ((640, 480), 1)]
)
def test_small_images_are_drawn_enlarged_by_a_whole_factor(size: tuple[int, int], scale: int) -> None:
    assert drawing_scale(size) == scale


def test_the_most_confident_box_is_drawn_on_top(tmp_path: Path) -> None:
    image = write_image(tmp_path / "img.png", (256, 256))
    low = FoundObject(class_index=0, class_name="zero", score=0.3, box=(10.0, 10.0, 100.0, 100.0))
    high = FoundObject(class_index=1, class_name="one", score=0.9, box=(10.0, 10.0, 100.0, 100.0))
    for order in ((high, low), (low, high)):
        found = ImageDetections(size=(256, 256), objects=order)
        drawn = draw_detections(image, found, tmp_path / "out.png")
        with Image.open(drawn) as picture:
            # The shared left edge, below both labels, shows the confident box's colour.
            assert tuple(np.asarray(picture.convert("RGB"))[60, 10]) == PALETTE[1]


def test_save_dir_refuses_two_images_of_one_name_before_drawing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_detection_run(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_image(tmp_path / "a" / "x.png", (24, 16))
    second = write_image(tmp_path / "b" / "x.png", (24, 16))
    out = tmp_path / "out"
    assert main(["predict", str(run), str(first), str(second), "--save-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would both be drawn to x.png" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_save_dir_on_a_classification_run_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = make_run(tmp_path)
    image = write_image(tmp_path / "img.png", (10, 8))
    assert main(["predict", str(run), str(image), "--save-dir", str(tmp_path / "out")]) == 2
    assert "draws a detector's boxes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_standalone_detection_file_carries_its_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_detection_run(tmp_path)
    alone = tmp_path / "alone.onnx"
    alone.write_bytes((run / "export/student.onnx").read_bytes())
    image = _grey_image(tmp_path / "img.png", (24, 16), 0)
    assert main(["predict", str(alone), str(image), "--json"]) == 0
    (prediction,) = json.loads(capsys.readouterr().out)["predictions"]
    assert [d["class"] for d in prediction["detections"]] == ["two", "zero"]


def test_a_16_bit_image_is_drawn_as_it_was_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_detection_run(tmp_path)
    image = write_deep_image(tmp_path / "deep.png", np.full((32, 48), 128, dtype=np.uint8), "I;16")
    assert main(["predict", str(run), str(image), "--save-dir", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "deep.png") as drawn:
        pixels = np.asarray(drawn.convert("RGB"))
    # Mid-grey (128 * 257 of 65535), not the white that clipping 16-bit values at 255 gives.
    assert tuple(pixels[31, 0]) == (128, 128, 128)
