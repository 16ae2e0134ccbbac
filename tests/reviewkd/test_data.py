"""Data: digits split, ImageFolder trees (files and in-memory cache), augmentation, batches, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deploy.errors import UsageError
from reviewkd.config import load_config, save_config
from reviewkd.data import augment_batch, build_data, iter_run_batches
from tests.helpers import write_deep_image, write_png_bomb


def _digits(*overrides: str):  # type: ignore[no-untyped-def]
    # The embedded default trains students on 50 images and carves a val split; these tests start
    # from the whole training split.
    return build_data(load_config(None, ["data.subset=null", "data.val_split=null", *overrides]))


def test_digits_split_is_stratified_fixed_and_upsampled() -> None:
    bundle = _digits()
    assert (len(bundle.train), len(bundle.val)) == (1437, 360)
    assert bundle.classes == [str(d) for d in range(10)]
    assert bundle.train.images is not None and bundle.train.images.dtype == torch.uint8
    assert tuple(bundle.train.images.shape[1:]) == (3, 12, 12) == bundle.input_shape
    assert int(bundle.train.images.max()) == 255
    # Every class is held out in proportion (about 36 of each).
    counts = torch.bincount(bundle.val.labels, minlength=10)
    assert int(counts.min()) >= 34 and int(counts.max()) <= 38
    # The split does not move with the training seed.
    other = _digits("train.seed=7", "data.image_size=8")
    assert torch.equal(other.val.labels, bundle.val.labels)
    assert bundle.manifest_input() == {
        "shape": [3, 12, 12],
        "layout": "NCHW",
        "dtype": "float32",
        "mean": [0.3053] * 3,
        "std": [0.376] * 3,
        "resize": None,
    }
    assert bundle.manifest_data()["num_val"] == 360


def test_subset_is_stratified() -> None:
    bundle = _digits("data.subset=200")
    assert len(bundle.train) == 200
    assert int(torch.bincount(bundle.train.labels).min()) >= 19
    with pytest.raises(UsageError, match=r"data\.subset: 5 is fewer than the 10 classes"):
        _digits("data.subset=5")


def test_first_per_class_takes_the_first_images_of_each_class_in_order() -> None:
    full, bundle = _digits(), _digits("data.first_per_class=5")
    assert len(bundle.train) == 50 and torch.bincount(bundle.train.labels).tolist() == [5] * 10
    assert bundle.manifest_data()["first_per_class"] == 5
    assert full.train.images is not None and bundle.train.images is not None
    for label in range(10):
        first = torch.nonzero(full.train.labels == label).flatten()[:5]
        picked = bundle.train.images[bundle.train.labels == label]
        assert torch.equal(picked, full.train.images[first])
    assert torch.equal(bundle.val.labels, full.val.labels)  # validation is never cut


def test_train_batches_depend_only_on_seed_and_epoch_and_resume_mid_epoch() -> None:
    bundle = _digits("data.subset=300")

    def epoch(seed: int, e: int, start: int = 0, state: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [x for x, _ in bundle.train_batches(e, seed, 64, start_step=start, aug_state=state)]

    first = epoch(0, 0)
    assert len(first) == 300 // 64
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 0), strict=True))
    assert not torch.equal(first[0], epoch(0, 1)[0])
    assert not torch.equal(first[0], epoch(1, 0)[0])
    # Stop after two batches, keep the augmentation state, and resume: the rest is identical.
    partial = bundle.train_batches(0, 0, 64)
    iterator = iter(partial)
    next(iterator), next(iterator)
    rest = epoch(0, 0, start=2, state=partial.aug_state)
    assert all(torch.equal(a, b) for a, b in zip(first[2:], rest, strict=True))
    # Two ranks see disjoint halves.
    rank0 = torch.cat([y for _, y in bundle.train_batches(0, 0, 32, rank=0, world_size=2)])
    rank1 = torch.cat([y for _, y in bundle.train_batches(0, 0, 32, rank=1, world_size=2)])
    assert len(rank0) == len(rank1) == 128


def test_augmentations_keep_shape_and_pixels() -> None:
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.int64).remainder(256).to(torch.uint8).view(2, 3, 6, 6)
    gen = torch.Generator().manual_seed(0)
    for mode in ("none", "crop", "crop_flip", "rrc_flip"):
        out = augment_batch(x, mode, 2, gen)
        assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(augment_batch(x, "none", 2, gen), x)
    # A crop either keeps a pixel or brings in the zero padding; it never invents values.
    cropped = augment_batch(x, "crop", 1, gen)
    assert set(cropped.unique().tolist()) <= set(x.unique().tolist()) | {0}


def _write_tree(root: Path, split: str, classes: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_files_and_cache_agree(tmp_path: Path) -> None:
    _write_tree(tmp_path, "train", {"cat": 5, "dog": 4})
    _write_tree(tmp_path, "test", {"cat": 2, "dog": 3})
    overrides = ["data.dataset=imagefolder", "data.val_split=null", f"data.root={tmp_path}"]
    overrides += ["data.image_size=8", "data.resize=10"]
    overrides.append("data.subset=null")
    files = build_data(load_config(None, overrides))
    assert files.classes == ["cat", "dog"] and files.val_name == "test"
    assert (len(files.train), len(files.val)) == (9, 5)
    assert files.train.files is not None and files.augment == "crop_flip"
    assert files.mean == (0.485, 0.456, 0.406) and files.manifest_input()["resize"] == 10
    cached = build_data(load_config(None, [*overrides, "data.cache=true"]))
    assert cached.val.images is not None
    from_files = torch.cat([x for x, _ in files.eval_batches("val", 2)])
    assert torch.equal(from_files, cached.val.images)
    batches = list(files.train_batches(0, 0, 4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 8, 8)] * 2
    # The first N files of each class by name, as the reference's CIFAR-10 subset takes them.
    first = build_data(load_config(None, [*overrides, "data.first_per_class=3"]))
    assert first.train.files is not None
    assert [(f.parent.name, f.name) for f in first.train.files] == [
        ("cat", "0.png"),
        ("cat", "1.png"),
        ("cat", "2.png"),
        ("dog", "0.png"),
        ("dog", "1.png"),
        ("dog", "2.png"),
    ]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", r"no such folder"),
        ("empty_class", r"dog: empty class folder"),
        ("unreadable", r"0\.png: cannot read this image"),
        ("unknown_val_class", r"class folders \['bird'\] are not among the training classes"),
        ("no_val", r"neither val/ nor test/"),
    ],
)
def test_imagefolder_errors_name_the_path(tmp_path: Path, setup: str, message: str) -> None:
    root = tmp_path / "data"
    if setup != "missing":
        _write_tree(root, "train", {"cat": 2, "dog": 0 if setup == "empty_class" else 2})
    if setup not in ("missing", "no_val"):
        _write_tree(root, "val", {"cat": 1, "bird" if setup == "unknown_val_class" else "dog": 1})
    if setup == "unreadable":
        (root / "val" / "cat" / "0.png").write_bytes(b"not a png")
    config = load_config(
        None, ["data.dataset=imagefolder", "data.val_split=null", f"data.root={root}", "data.cache=true"]
    )
    with pytest.raises(UsageError, match=message):
        build_data(config)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_imagefolder_rescales_16_bit_and_float_images(tmp_path: Path, cache: str) -> None:
    root = tmp_path / "data"
    _write_tree(root, "train", {"cat": 2, "dog": 2})
    _write_tree(root, "val", {"cat": 1, "dog": 1})
    eight_bit = np.asarray(Image.open(root / "val" / "cat" / "0.png").convert("L"))
    overrides = ["data.dataset=imagefolder", "data.val_split=null", f"data.root={root}"]
    overrides += ["data.image_size=8", f"data.cache={cache}"]
    (root / "val" / "cat" / "0.png").unlink()
    Image.fromarray(eight_bit).save(root / "val" / "cat" / "0.png")
    reference = torch.cat([x for x, _ in build_data(load_config(None, overrides)).eval_batches("val", 2)])
    write_deep_image(root / "val" / "cat" / "0.png", eight_bit, "I;16")
    deep = torch.cat([x for x, _ in build_data(load_config(None, overrides)).eval_batches("val", 2)])
    assert torch.equal(deep, reference)
    (root / "val" / "cat" / "0.png").unlink()
    write_deep_image(root / "val" / "cat" / "0.tiff", eight_bit, "F")
    floats = torch.cat([x for x, _ in build_data(load_config(None, overrides)).eval_batches("val", 2)])
    assert torch.equal(floats, reference)


@pytest.mark.parametrize("cache", ["true", "false"])
def test_imagefolder_refuses_a_decompression_bomb(tmp_path: Path, cache: str) -> None:
    root = tmp_path / "data"
    _write_tree(root, "train", {"cat": 2, "dog": 2})
    _write_tree(root, "val", {"cat": 1, "dog": 1})
    write_png_bomb(root / "val" / "dog" / "0.png")
    overrides = ["data.dataset=imagefolder", "data.val_split=null", f"data.root={root}"]
    overrides += ["data.image_size=8", f"data.cache={cache}"]
    with pytest.raises(UsageError, match=r"dog/0\.png: refused, too many pixels to decode safely"):
        list(build_data(load_config(None, overrides)).eval_batches("val", 2))


def test_cifar_pickles_missing_is_a_clear_error(tmp_path: Path) -> None:
    config = load_config(None, ["data.dataset=cifar100", f"data.root={tmp_path}"])
    with pytest.raises(UsageError, match=r"no cifar100 python-pickle data \(cifar-100-python/\)"):
        build_data(config)


def test_iter_run_batches_reads_the_run_config(tmp_path: Path) -> None:
    overrides = ["data.image_size=8", "data.subset=100", "data.val_split=null"]
    save_config(load_config(None, overrides), tmp_path / "config.yaml")
    val = list(iter_run_batches(tmp_path, "val", 128))
    assert [len(y) for _, y in val] == [128, 128, 104]
    images, labels = val[0]
    assert images.dtype == np.float32 and images.shape == (128, 3, 8, 8) and labels.dtype == np.int64
    # Normalised with the digits mean and std: background pixels (0) map to -mean/std.
    assert np.isclose(images.min(), -0.3053 / 0.376, atol=1e-5)
    train = [y for _, y in iter_run_batches(tmp_path, "train", 16, limit=40)]
    assert [len(y) for y in train] == [16, 16, 8]
    again = [y for _, y in iter_run_batches(tmp_path, "train", 40, limit=40)]
    assert np.array_equal(np.concatenate(train), again[0])
    with pytest.raises(UsageError, match="split 'holdout'"):
        next(iter_run_batches(tmp_path, "holdout", 8))
    with pytest.raises(UsageError, match=r"no config\.yaml"):
        next(iter_run_batches(tmp_path / "nothing", "val", 8))


@pytest.mark.parametrize(("full_data", "expected"), [("true", 1237), ("false", 100)])
def test_run_train_images_are_the_teachers_with_full_data(
    tmp_path: Path, full_data: str, expected: int
) -> None:
    # int8 calibration reads these: with teacher.full_data, every image the run's teacher saw (the
    # 1,437 training images less the 200 the embedded default carves as its val split).
    overrides = ["data.image_size=8", "data.subset=100", f"teacher.full_data={full_data}"]
    save_config(load_config(None, overrides), tmp_path / "config.yaml")
    assert sum(len(y) for _, y in iter_run_batches(tmp_path, "train", 512)) == expected


def test_val_split_is_carved_from_the_training_images_and_the_held_out_split_becomes_the_test() -> None:
    plain, carved = _digits(), _digits("data.val_split=200")
    assert (len(carved.train), len(carved.val)) == (1237, 200)
    assert carved.test is not None and torch.equal(carved.test.labels, plain.val.labels)
    assert (carved.val_name, carved.test_name) == ("train-holdout", "heldout")
    assert plain.test is None and plain.held_out is plain.val and carved.held_out is carved.test
    assert int(torch.bincount(carved.val.labels, minlength=10).min()) >= 19  # stratified
    # Disjoint: every carved image is a training image no longer trained on (pixels identify them).
    assert plain.train.images is not None and carved.train.images is not None
    assert carved.val.images is not None
    train_rows = {bytes(x.numpy()) for x in carved.train.images}
    all_rows = [bytes(x.numpy()) for x in plain.train.images]
    val_rows = [bytes(x.numpy()) for x in carved.val.images]
    assert all(row in all_rows for row in val_rows)
    assert sum(row in train_rows for row in val_rows) <= 2  # digits has a few duplicate glyph images
    # Carved before the subset: a 50-image student never trains on the val split either.
    small = _digits("data.val_split=200", "data.subset=50")
    assert small.val.images is not None and torch.equal(small.val.images, carved.val.images)
    recorded = small.manifest_data()
    assert {k: recorded[k] for k in ("val_split", "num_val", "test_split", "num_test", "num_train")} == {
        "val_split": "train-holdout",
        "num_val": 200,
        "test_split": "heldout",
        "num_test": 360,
        "num_train": 50,
    }
    # The split does not move with the training seed.
    assert torch.equal(_digits("data.val_split=200", "train.seed=5").val.labels, carved.val.labels)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", r"data\.val_split: must be > 0"),
        ("5", r"data\.val_split: 5 is fewer than the 10 classes"),
        ("1437", r"data\.val_split: 1437 is not fewer than the 1437 training images"),
    ],
)
def test_val_split_out_of_range_is_a_one_line_error(value: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _digits(f"data.val_split={value}")


def test_iter_run_batches_reads_the_test_split_of_a_carved_run(tmp_path: Path) -> None:
    save_config(load_config(None, ["data.subset=null", "data.val_split=100"]), tmp_path / "config.yaml")
    # (the embedded default itself carves 200)
    assert sum(len(y) for _, y in iter_run_batches(tmp_path, "val", 64)) == 100
    assert sum(len(y) for _, y in iter_run_batches(tmp_path, "test", 64)) == 360
    with pytest.raises(UsageError, match="expected 'train', 'val' or 'test'"):
        next(iter(iter_run_batches(tmp_path, "nope", 64)))
