"""Datasets for training and evaluation: digits, CIFAR-10/100 pickles and ImageFolder trees.

Every source yields uint8 image batches (N, 3, H, W) and int64 labels; normalisation to float happens
where the batch is used (on the GPU during training), so the CPU only moves bytes. Images held in
memory (digits, CIFAR pickles, an ImageFolder tree with `data.cache`) are augmented batch-wise with
tensor ops; image files are decoded and augmented per sample in a DataLoader.

Randomness is a pure function of (train.seed, epoch, rank): the epoch's sample order comes from one
generator and the augmentation from another, so a resumed run sees exactly the batches an
uninterrupted one would. The digits split and the `data.subset` selection use a fixed seed of their
own and do not move with train.seed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from deploy.errors import UsageError
from deploy.optional import optional_import
from deploy.preprocess import to_8bit
from deploy.sampling import spread_indices
from reviewkd.config import Config, DataConfig, load_run_config

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATA_SEED = 0  # the digits train/val split and the training subset never depend on train.seed

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # digits: pixel mean and std of all 1,797 images on the 0-1 scale (grey, so equal per channel).
    "digits": ((0.3053, 0.3053, 0.3053), (0.3760, 0.3760, 0.3760)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": _IMAGENET_STATS,
}


@dataclass
class Split:
    """One split: images in memory (uint8, N x 3 x H x W) or image files, and int64 labels."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    def take(self, indices: torch.Tensor) -> Split:
        """The sub-split of the given sample indices."""
        images = self.images[indices] if self.images is not None else None
        files = [self.files[i] for i in indices.tolist()] if self.files is not None else None
        return Split(labels=self.labels[indices], images=images, files=files)


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers; distinct tuples give unrelated streams."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return value


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix_seed(*parts))


def load_image(path: Path) -> Any:
    """Open an image file as RGB PIL image; an unreadable file is a UsageError naming it.

    16-bit and float images are rescaled to 8 bits by their depth, as `reviewkd predict` does.
    """
    try:
        with Image.open(path) as img:
            return to_8bit(img).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UsageError(f"{path}: refused, too many pixels to decode safely ({exc})") from exc
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read this image ({exc})") from exc


def _eval_transform(image_size: int, resize: int | None) -> Any:
    with optional_import("loading training images"):
        from torchvision import transforms as T

    first = T.Resize(resize) if resize else T.Resize((image_size, image_size))
    return T.Compose([first, T.CenterCrop(image_size), T.PILToTensor()])


def _train_transform(image_size: int, resize: int | None, augment: str, padding: int) -> Any:
    with optional_import("loading training images"):
        from torchvision import transforms as T

    if augment == "rrc_flip":
        steps: list[Any] = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        steps = [_eval_transform(image_size, resize).transforms[0], T.CenterCrop(image_size)]
        if augment in ("crop", "crop_flip"):
            steps.append(T.RandomCrop(image_size, padding=padding))
        if augment == "crop_flip":
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.PILToTensor()])


class _FileDataset(torch.utils.data.Dataset):
    """Image files through a torchvision transform to uint8 tensors."""

    def __init__(self, files: Sequence[Path], labels: torch.Tensor, transform: Any) -> None:
        self.files = list(files)
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(load_image(self.files[index])), self.labels[index]


def _random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and take one random crop of the original size per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].permute(0, 3, 1, 2).contiguous()


def _random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(3)
    return x


def _random_resized_crop(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) per sample, drawing from `gen`."""
    with optional_import("loading training images"):
        from torchvision.transforms import functional as TF

    n, _, h, w = x.shape
    out = torch.empty_like(x)
    for k in range(n):
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):
            area = h * w * (0.08 + 0.92 * torch.rand(1, generator=gen).item())
            log_ratio = (
                math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(1, generator=gen).item()
            )
            ratio = math.exp(log_ratio)
            cw_try, ch_try = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw_try <= w and 0 < ch_try <= h:
                top = int(torch.randint(0, h - ch_try + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw_try + 1, (1,), generator=gen))
                ch, cw = ch_try, cw_try
                break
        out[k] = TF.resized_crop(x[k], top, left, ch, cw, [h, w], antialias=True)
    return out


def augment_batch(x: torch.Tensor, augment: str, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Apply the training augmentation to a uint8 batch held in memory."""
    if augment == "rrc_flip":
        return _random_flip(_random_resized_crop(x, gen), gen)
    if augment in ("crop", "crop_flip") and padding > 0:
        x = _random_crop(x, padding, gen)
    if augment == "crop_flip":
        x = _random_flip(x, gen)
    return x


@dataclass
class DataBundle:
    """Both splits of a dataset with its preprocessing; what the engine and the manifest need."""

    dataset: str
    classes: list[str]
    train: Split
    val: Split  # what training selects on: the carved split with data.val_split, else the held-out one
    val_name: str
    test: Split | None  # the held-out split when data.val_split carved the val split, scored once
    test_name: str | None
    image_size: int
    resize: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    crop_padding: int
    num_workers: int
    root: str | None
    subset: int | None
    first_per_class: int | None

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one network input."""
        return (3, self.image_size, self.image_size)

    def manifest_input(self) -> dict[str, Any]:
        """The manifest's "input" block."""
        return {
            "shape": list(self.input_shape),
            "layout": "NCHW",
            "dtype": "float32",
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
        }

    def manifest_data(self) -> dict[str, Any]:
        """The manifest's "data" block: where the training and validation images come from."""
        return {
            "dataset": self.dataset,
            "root": self.root,
            "val_split": self.val_name,
            "num_train": len(self.train),
            "num_val": len(self.val),
            "test_split": self.test_name,
            "num_test": len(self.test) if self.test is not None else None,
            "subset": self.subset,
            "first_per_class": self.first_per_class,
            "augment": self.augment,
        }

    @property
    def held_out(self) -> Split:
        """The split no selection reads when data.val_split carved one (the test split), else val."""
        return self.test if self.test is not None else self.val

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) on any device to normalised float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def train_steps(self, batch_size: int, world_size: int = 1) -> int:
        """Optimizer steps per epoch per process (the last partial batch is dropped)."""
        return max(1, len(self.train) // world_size // batch_size)

    def train_batches(
        self,
        epoch: int,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        aug_state: torch.Tensor | None = None,
    ) -> TrainEpoch:
        """The batches of one training epoch for one process (see TrainEpoch)."""
        return TrainEpoch(self, epoch, seed, batch_size, rank, world_size, start_step, aug_state)

    def eval_batches(
        self, split: str, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 batches of "train", "val" or "test" in order, with the evaluation preprocessing;
        sharded by rank. "test" is the held-out split: the val split when none was carved."""
        data = {"train": self.train, "val": self.val, "test": self.held_out}[split]
        indices = torch.arange(len(data))[rank::world_size]
        yield from _ordered_batches(data.take(indices), batch_size, self, self.num_workers)


def _ordered_batches(
    data: Split, batch_size: int, bundle: DataBundle, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if data.images is not None:
        for start in range(0, len(data), batch_size):
            yield data.images[start : start + batch_size], data.labels[start : start + batch_size]
        return
    assert data.files is not None
    dataset = _FileDataset(data.files, data.labels, _eval_transform(bundle.image_size, bundle.resize))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    yield from loader


class TrainEpoch:
    """One epoch of training batches for one process; resumable mid-epoch.

    `aug_state` is the augmentation generator's state after the batches before `start_step`
    (TrainEpoch.aug_state at that point); with it, in-memory sources resume bit-exactly.
    """

    def __init__(
        self,
        bundle: DataBundle,
        epoch: int,
        seed: int,
        batch_size: int,
        rank: int,
        world_size: int,
        start_step: int,
        aug_state: torch.Tensor | None,
    ) -> None:
        self.bundle = bundle
        self.batch_size = batch_size
        self.steps = bundle.train_steps(batch_size, world_size)
        self.start_step = start_step
        order = torch.randperm(len(bundle.train), generator=_generator(seed, epoch, 0))
        # Each rank takes a strided share, cut so that every rank runs the same number of steps.
        self.indices = order[rank::world_size][: self.steps * batch_size]
        if len(self.indices) < batch_size:  # a split smaller than one batch: train on what there is
            self.indices = order
        self.generator = _generator(seed, epoch, 1 + rank)
        if aug_state is not None:
            self.generator.set_state(aug_state)

    @property
    def aug_state(self) -> torch.Tensor:
        """The augmentation generator's current state (to resume after the batches taken so far)."""
        return self.generator.get_state()

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        b = self.bundle
        bs = self.batch_size
        remaining = self.indices[self.start_step * bs :]
        if b.train.images is not None:
            # Lazy, so the generator has drawn exactly for the batches handed out so far.
            for start in range(0, self.steps * bs - self.start_step * bs, bs):
                idx = remaining[start : start + bs]
                if len(idx) == 0:
                    return
                yield (
                    augment_batch(b.train.images[idx], b.augment, b.crop_padding, self.generator),
                    b.train.labels[idx],
                )
            return
        assert b.train.files is not None
        transform = _train_transform(b.image_size, b.resize, b.augment, b.crop_padding)
        dataset = _FileDataset(b.train.files, b.train.labels, transform)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=bs,
            sampler=remaining.tolist(),
            num_workers=b.num_workers,
            generator=self.generator,
            drop_last=len(remaining) >= bs,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        yield from loader


def _stratified_pick(labels: np.ndarray, count: int, seed: int, key: str) -> np.ndarray:
    """Indices of `count` samples keeping class proportions (sklearn's stratified split), sorted;
    `key` names the config key in the error for a count below the number of classes."""
    with optional_import("loading training images"):
        from sklearn.model_selection import train_test_split

    if count >= len(labels):
        return np.arange(len(labels))
    n_classes = len(np.unique(labels))
    if count < n_classes:
        raise UsageError(f"config key {key}: {count} is fewer than the {n_classes} classes")
    picked, _ = train_test_split(np.arange(len(labels)), train_size=count, stratify=labels, random_state=seed)
    return np.sort(picked)


def first_per_class(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first `count` samples of each class, in dataset (file name) order, sorted."""
    picked = [np.flatnonzero(labels == c)[:count] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 batch (N, C, H, W) to size x size, bilinear with antialiasing when shrinking."""
    if images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def _load_digits(cfg: DataConfig) -> tuple[list[str], Split, Split, str]:
    with optional_import("loading training images"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction, stratify=labels, random_state=DATA_SEED
    )
    # 0-16 grey levels to 0-255, upsampled to the network's size and repeated to RGB.
    grey = torch.from_numpy(digits.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    grey = F.interpolate(grey, size=(cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    rgb = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    lab = torch.from_numpy(labels)

    def split(idx: np.ndarray) -> Split:
        t = torch.from_numpy(np.sort(idx))
        return Split(labels=lab[t], images=rgb[t])

    return [str(c) for c in digits.target_names], split(train_idx), split(val_idx), "heldout"


def _load_cifar(cfg: DataConfig) -> tuple[list[str], Split, Split, str]:
    with optional_import("loading training images"):
        from torchvision import datasets

    assert cfg.root is not None
    root = Path(cfg.root)
    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    if not root.is_dir():
        raise UsageError(f"data.root {root}: no such folder (expected {cls.base_folder}/ inside it)")
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=False)
        except RuntimeError as exc:
            raise UsageError(
                f"data.root {root}: no {cfg.dataset} python-pickle data ({cls.base_folder}/) there ({exc})"
            ) from exc
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        splits.append(
            Split(
                labels=torch.tensor(ds.targets, dtype=torch.int64),
                images=_resize_uint8(images, cfg.image_size),
            )
        )
    return list(ds.classes), splits[0], splits[1], "test"


def _scan_class_folders(
    folder: Path, classes: Sequence[str] | None
) -> tuple[list[str], list[Path], list[int]]:
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder (expected one sub-folder of images per class)")
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise UsageError(f"{folder}: no class folders inside (expected <class>/<image> files)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise UsageError(f"{folder}: class folders {unknown} are not among the training classes")
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for name in found:
        class_dir = folder / name
        images = sorted(
            Path(e.path)
            for e in os.scandir(class_dir)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise UsageError(f"{class_dir}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files)")
        files += images
        labels += [index[name]] * len(images)
    return list(classes), files, labels


def _decode_all(files: Sequence[Path], image_size: int, resize: int | None) -> torch.Tensor:
    """Decode image files once into a uint8 tensor with the evaluation geometry."""
    transform = _eval_transform(image_size, resize)

    def one(path: Path) -> torch.Tensor:
        img = load_image(path)
        if img.size == (image_size, image_size):
            with optional_import("loading training images"):
                from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(img)
        return transform(img)

    out = torch.empty((len(files), 3, image_size, image_size), dtype=torch.uint8)
    # PIL releases the GIL while decoding, so threads overlap on several cores.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, tensor in enumerate(pool.map(one, files, chunksize=256)):
            out[i] = tensor
    return out


def _load_imagefolder(cfg: DataConfig, cache: bool) -> tuple[list[str], Split, Split, str]:
    assert cfg.root is not None
    root = Path(cfg.root)
    if not root.is_dir():
        raise UsageError(f"data.root {root}: no such folder (expected train/ and val/ or test/ inside)")
    classes, train_files, train_labels = _scan_class_folders(root / "train", None)
    if cfg.val_dir:
        val_name = cfg.val_dir
    else:
        val_name = next((n for n in ("val", "test") if (root / n).is_dir()), "val")
        if not (root / val_name).is_dir():
            raise UsageError(f"data.root {root}: neither val/ nor test/ found (or set data.val_dir)")
    _, val_files, val_labels = _scan_class_folders(root / val_name, classes)
    train = Split(labels=torch.tensor(train_labels, dtype=torch.int64), files=train_files)
    val = Split(labels=torch.tensor(val_labels, dtype=torch.int64), files=val_files)
    return classes, train, val, val_name


def _carve_val(train: Split, count: int) -> tuple[Split, Split]:
    """(the rest, `count` stratified training samples) with the fixed data seed; a one-line error when
    the count is not below the number of training images or is below the number of classes."""
    labels = train.labels.numpy()
    if count >= len(labels):
        raise UsageError(
            f"config key data.val_split: {count} is not fewer than the {len(labels)} training images"
        )
    picked = _stratified_pick(labels, count, DATA_SEED, "data.val_split")
    keep = np.setdiff1d(np.arange(len(labels)), picked)
    return train.take(torch.from_numpy(keep)), train.take(torch.from_numpy(picked))


def _decoded(split: Split, cfg: DataConfig) -> Split:
    """An image-file split decoded once into memory (data.cache)."""
    if split.images is not None:
        return split
    assert split.files is not None
    return Split(labels=split.labels, images=_decode_all(split.files, cfg.image_size, cfg.resize))


def resolve_augment(cfg: DataConfig) -> str:
    """The augmentation "auto" stands for: digits crop only; small images crop+flip; else RRC+flip."""
    if cfg.augment != "auto":
        return cfg.augment
    if cfg.dataset == "digits":
        return "crop"  # a mirrored digit is another glyph
    return "crop_flip" if cfg.image_size <= 64 else "rrc_flip"


def build_data(config: Config, *, cache: bool | None = None) -> DataBundle:
    """Load the dataset of `config` (train split restricted to data.subset when set).

    `cache` overrides data.cache for ImageFolder trees: decode every image once into memory.

    Raises:
        UsageError: a missing folder, an empty class folder or an unreadable image, naming the path.
    """
    cfg = config.data
    use_cache = cfg.cache if cache is None else cache
    if cfg.dataset == "digits":
        classes, train, val, val_name = _load_digits(cfg)
    elif cfg.dataset in ("cifar10", "cifar100"):
        classes, train, val, val_name = _load_cifar(cfg)
    else:
        classes, train, val, val_name = _load_imagefolder(cfg, use_cache)
    test: Split | None = None
    test_name: str | None = None
    if cfg.val_split is not None:
        train, carved = _carve_val(train, cfg.val_split)
        test, test_name, val, val_name = val, val_name, carved, "train-holdout"
    if cfg.subset is not None:
        picked = _stratified_pick(train.labels.numpy(), cfg.subset, DATA_SEED, "data.subset")
        train = train.take(torch.from_numpy(picked))
    elif cfg.first_per_class is not None:
        train = train.take(torch.from_numpy(first_per_class(train.labels.numpy(), cfg.first_per_class)))
    if use_cache and train.images is None:
        train, val = _decoded(train, cfg), _decoded(val, cfg)
        test = _decoded(test, cfg) if test is not None else None
    mean, std = DATASET_STATS[cfg.dataset]
    return DataBundle(
        dataset=cfg.dataset,
        classes=classes,
        train=train,
        val=val,
        val_name=val_name,
        test=test,
        test_name=test_name,
        image_size=cfg.image_size,
        resize=cfg.resize,
        mean=tuple(cfg.mean) if cfg.mean is not None else mean,
        std=tuple(cfg.std) if cfg.std is not None else std,
        augment=resolve_augment(cfg),
        crop_padding=cfg.crop_padding,
        num_workers=cfg.num_workers,
        root=str(Path(cfg.root).resolve()) if cfg.root else None,
        subset=cfg.subset,
        first_per_class=cfg.first_per_class,
    )


def iter_run_batches(
    run_dir: str | os.PathLike[str], split: str, batch_size: int, limit: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of a run's data with its evaluation preprocessing, for calibration and validation.

    Reads RUN/config.yaml. Yields (float32 NCHW normalised images, int64 labels) as numpy arrays.
    split "val": the validation split in order (with `limit`, that many images spread evenly over
    it: deploy.sampling); "test": the held-out split the same way (the val split when the run
    carved none with data.val_split). split "train": the images the run trained on (its
    subset when it had one; with teacher.full_data, the whole training split its teacher saw, so
    that int8 calibration does not rest on a student's few images) in a fixed-seed shuffled order,
    without augmentation. `limit` caps the images.

    Raises:
        UsageError: an unknown split, a bad batch size or limit, or data that cannot be read.
    """
    if split not in ("train", "val", "test"):
        raise UsageError(f"split {split!r}: expected 'train', 'val' or 'test'")
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be >= 1, got {limit}")
    config = load_run_config(run_dir)
    if split == "train" and config.teacher.full_data:
        config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, subset=None, first_per_class=None)
        )
    bundle = build_data(config, cache=False)
    data = {"train": bundle.train, "val": bundle.val, "test": bundle.held_out}[split]
    if split != "train":
        order = torch.tensor(spread_indices(len(data), limit), dtype=torch.long)
    else:
        order = torch.randperm(len(data), generator=_generator(DATA_SEED))[:limit]
    for images, labels in _ordered_batches(data.take(order), batch_size, bundle, 0):
        yield bundle.normalize(images).numpy(), labels.numpy().astype(np.int64)
