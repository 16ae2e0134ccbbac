"""Training configuration: typed dataclasses, YAML files, `key=value` overrides.

Every field has a default; the defaults are the embedded digits config (`reviewkd/configs/digits.yaml`
holds the same values, spelled out). A config is resolved in three layers:

1. the dataclass defaults;
2. a YAML file (`--config FILE`, or the name of a shipped config such as `digits` or
   `cifar10_resnet56_resnet20`, resolving to `reviewkd/configs/<name>.yaml`); it may set any subset;
3. dotted `key=value` overrides from the command line (`optim.lr=0.05 method.name=kd`), each value
   parsed as YAML (`null`, `true`, `[150, 180]`) and then checked against the field's type.

Unknown keys, wrongly typed values, values outside a field's choices or range and floats that are not
finite (nan, inf) are UsageErrors that name the key; the value they show is cut short. YAML aliases
(`*name`) are refused: no config needs them, and an alias bomb expands a few lines into gigabytes.
Relative paths (data.root, teacher.weights, student.weights) are relative to the current directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploy import run_layout
from deploy.errors import UsageError
from deploy.fileio import write_text_atomic
from deploy.manifest import MAX_IMAGE_SIDE
from deploy.tasks import CLASSIFICATION, DETECTION, TASKS

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG_NAME = "digits"

METHODS = TASKS[CLASSIFICATION].methods
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
AUGMENTS = ("auto", "none", "crop", "crop_flip", "rrc_flip")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("auto", "none", "bf16", "fp16")
DETECTION_FORMATS = ("digits", "coco", "yolo")


@dataclass
class DataConfig:
    """Where the images come from and how they are preprocessed."""

    dataset: str = "digits"  # digits | cifar10 | cifar100 | imagefolder
    root: str | None = None  # folder of cifar10/cifar100 pickles or of an ImageFolder tree
    val_dir: str | None = None  # imagefolder: sub-folder holding the val split (None: val/, else test/)
    image_size: int = 12  # network input H = W
    resize: int | None = None  # eval: shorter side before the centre crop (None: resize to image_size)
    augment: str = "auto"  # auto | none | crop | crop_flip | rrc_flip
    crop_padding: int = 2  # padding of the random crop ("crop", "crop_flip")
    mean: list[float] | None = None  # None: the dataset's usual values
    std: list[float] | None = None
    val_fraction: float = 0.2  # digits: the stratified share held out for validation
    # The digits default (configs/digits.yaml) sets 50; a config of one's own trains on every image
    # unless it asks for fewer.
    subset: int | None = None  # train on N training images (stratified, fixed seed); None: all
    first_per_class: int | None = None  # train on the first N images of each class (file order); None: all
    # Honest selection: carve N training images (stratified, fixed seed) out as the validation split
    # that best-epoch choice and recipe screens read; the dataset's held-out split becomes the test
    # split, scored once at the end. Carved before data.subset / first_per_class, so no model of the
    # run (the teacher with teacher.full_data included) trains on them. None: select on the held-out split.
    val_split: int | None = None
    cache: bool = False  # imagefolder: decode every image once into memory (uint8)
    num_workers: int = 0  # imagefolder without cache: DataLoader workers


@dataclass
class ModelConfig:
    """A zoo network (reviewkd.models.create_model) and optional initial weights."""

    arch: str = "cifar_resnet20"
    weights: str | None = None


@dataclass
class TeacherConfig:
    """The teacher; with no weights, `reviewkd distill` first trains one into DIR/teacher/."""

    arch: str = "cifar_resnet32"
    weights: str | None = None
    epochs: int | None = 15  # epochs when training the teacher (None: train.epochs)
    lr: float | None = None  # learning rate when training the teacher (None: optim.lr)
    full_data: bool = False  # train the teacher on every training image, ignoring data.subset/first_per_class


@dataclass
class MethodConfig:
    """The distillation method and its loss weights (docs/METHOD.md section 1.4)."""

    name: str = "reviewkd"  # ce | kd | reviewkd | reviewkd+kd
    hcl_weight: float = 1.0  # lambda of the HCL term
    kd_weight: float = 1.0  # weight of the Hinton KD term
    temperature: float = 4.0
    warmup_epochs: float = 1.0  # the distillation weight rises linearly from 0 to 1 over these epochs
    student_taps: list[str] | None = None  # None: the model's default taps
    teacher_taps: list[str] | None = None
    # The teacher's default stage taps read before the ReLU that ends them, as the reference does.
    teacher_pre_activation: bool = True


@dataclass
class OptimConfig:
    """The optimizer: SGD (momentum, Nesterov) or AdamW, with weight decay."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = True  # false: no weight decay on BatchNorm weights and on biases


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, evaluated every step.

    step and cosine start with an optional linear warm-up from 0 to optim.lr; onecycle is torch's
    OneCycleLR (without momentum cycling): a cosine rise from lr/div_factor to optim.lr over the
    warm-up (30% of the steps when none is set), then a cosine fall to lr/(div_factor*final_div_factor).
    Set the warm-up by warmup_epochs or by warmup_fraction (of all steps), not both.
    """

    name: str = "cosine"  # step | cosine | onecycle
    milestones: list[int] = field(default_factory=list)  # step: epochs where lr is multiplied by gamma
    gamma: float = 0.1
    min_lr: float = 0.0  # cosine: the final learning rate
    warmup_epochs: float = 1.0  # learning-rate warm-up, in epochs
    warmup_fraction: float = 0.0  # learning-rate warm-up, as a fraction of all steps
    div_factor: float = 25.0  # onecycle: the first learning rate is optim.lr / div_factor
    final_div_factor: float = 1e4  # onecycle: the last is optim.lr / div_factor / final_div_factor


@dataclass
class TrainConfig:
    """The loop: epochs, batch, seed, device and its speed switches."""

    epochs: int = 60
    batch_size: int = 64  # per process
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto (bf16 on GPUs of compute capability >= 8.0) | none | bf16 | fp16 (GradScaler)
    channels_last: bool = True  # NHWC activations: faster on CUDA and on this project's CPUs too
    fuse_teacher: bool = True  # run the frozen teacher with BatchNorm folded into its convs (exact)
    compile: bool = False  # torch.compile the distiller
    # CPU threads for torch (None: torch's default, one per core). One by default: on a busy 2-core
    # machine a preempted second thread stalls every parallel op (digits teacher: 6 vs ~170 images/s).
    threads: int | None = 1
    eval_every: int = 1  # validate every N epochs (and always after the last); the best is among those
    # > 0: validate, keep and export an exponential moving average of the student's weights with this
    # decay (reviewkd/ema.py); the live weights' top-1 is logged beside it. 0: off.
    ema_decay: float = 0.0
    sync_batchnorm: bool = False  # DDP on CUDA: BatchNorm statistics over all ranks (SyncBatchNorm)
    find_unused_parameters: bool = False  # DDP: needed by students with parameters a forward skips


@dataclass
class DetectionConfig:
    """What a detection run (task: detection) reads and builds; classification ignores it.

    student.arch and teacher.arch name detectors (reviewkd.detection.models.list_detectors).
    """

    format: str = "digits"  # digits (the embedded set, no download) | coco | yolo
    # coco: each split's annotation JSON; yolo: each split's folder name under images/ and labels/
    # (null: no split folder); relative to data.root. digits: unused.
    train: str | None = None
    val: str | None = None
    # coco: each split's image folder, relative to data.root (null: its annotation JSON's folder)
    train_images: str | None = None
    val_images: str | None = None
    height: int = 64  # images' size the small detectors are built for (others are resized to it)
    width: int = 96
    # digits: images the embedded set generates per split; its folder is data.root, or, when null,
    # a cache folder named by the set's spec (REVIEWKD_CACHE, else ~/.cache/reviewkd).
    digits_train_images: int = 512
    digits_val_images: int = 128
    digits_seed: int = 0
    flip_probability: float = 0.5  # augmentation: horizontal flips (digits: 0, a mirrored digit is no digit)
    min_scale: float = 0.75  # augmentation: the resize factor of the scale/crop
    max_scale: float = 1.25
    # The small FCOS detectors' anchor side over their level's stride: FCOS assigns a box to a level
    # by its size relative to the anchors (4 to 8 anchor sides), so below 1 spreads smaller objects
    # over the coarser levels.
    anchor_scale: float = 1.0


@dataclass
class OutputConfig:
    """Where the run directory goes (`--out` sets it)."""

    dir: str | None = None


@dataclass
class Config:
    """The whole resolved configuration of a teacher or distillation run."""

    task: str = CLASSIFICATION  # classification | detection (deploy.tasks.TASKS)
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases: a handful of nested aliases (a "billion laughs")
    expands into a structure that takes gigabytes to print or walk."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)


def _load_yaml(text: str) -> Any:
    """yaml.safe_load without aliases (see _NoAliasLoader)."""
    return yaml.load(text, Loader=_NoAliasLoader)


# Characters of a value an error message shows: values come from files and command lines.
_SHOWN_CHARS = 80


def _shown(value: Any) -> str:
    """`value`'s repr for an error message, cut to _SHOWN_CHARS characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 1]}…"


def shipped_configs() -> list[str]:
    """Names of the configs shipped in reviewkd/configs/ (usable as `--config NAME`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config_path(source: str | Path) -> Path:
    """A config file path, or a shipped config's name, to an existing file; else a UsageError."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise UsageError(
            f"--config {source}: is a directory; expected a YAML file or a shipped config's name"
        )
    packaged = CONFIGS_DIR / f"{source}.yaml"
    if not path.suffix and packaged.is_file():
        return packaged
    raise UsageError(
        f"--config {source}: no such file, and not a shipped config ({', '.join(shipped_configs())})"
    )


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, list[...], X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if float in args:
            _check_finite(key, value)  # said as such, not as "expected float or null"
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except UsageError:
                continue
        raise UsageError(f"config key {key}: expected {_type_name(tp)}, got {_shown(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise UsageError(
                f"config key {key}: expected a {_type_name(tp)} such as [1, 2], got {_shown(value)}"
            )
        (item,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # PyYAML (YAML 1.1) reads `1e-3` as a string; it means the number.
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None:
            _check_finite(key, number)
            return number
    # YAML reads `arch=resnet18` as a string but `root=2024` as an int: both mean a string here.
    elif tp is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UsageError(f"config key {key}: expected {_type_name(tp)}, got {_shown(value)}")


def _check_finite(key: str, value: Any) -> None:
    """UsageError for a float value (or its YAML string spelling) that is nan or infinite: nan passes
    every range check (its comparisons are all false), and inf is no learning rate."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return
    if isinstance(number, float) and not math.isfinite(number):
        raise UsageError(f"config key {key}: expected a finite number, got {_shown(value)}")


def _merge(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    """Set the fields of dataclass `obj` from a nested mapping, checking names and types."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "<top>"
        raise UsageError(f"config key {where}: expected a mapping, got {_shown(data)}")
    hints = _field_types(type(obj))
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{n}" for n in hints)
            raise UsageError(f"unknown config key {key}; known keys here: {known}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _check_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise UsageError(f"config key {key}: {_shown(value)} is not one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"config key {key}: must be {'>= 0' if allow_zero else '> 0'}, got {_shown(value)}")


def validate(config: Config) -> Config:
    """Check choices and ranges that types cannot express; returns the config for chaining."""
    _check_choice("task", config.task, tuple(TASKS))
    _check_choice("data.dataset", config.data.dataset, DATASETS)
    _check_choice("data.augment", config.data.augment, AUGMENTS)
    _check_choice("method.name", config.method.name, TASKS[config.task].methods)
    _check_choice("optim.name", config.optim.name, OPTIMIZERS)
    _check_choice("schedule.name", config.schedule.name, SCHEDULES)
    _check_choice("train.device", config.train.device, DEVICES)
    _check_choice("train.amp", config.train.amp, AMP_MODES)
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise UsageError(
            f"config key train.ema_decay: must be 0 (off) or in (0, 1), got {config.train.ema_decay!r}"
        )
    for key, value in (
        ("data.image_size", config.data.image_size),
        ("data.resize", config.data.resize),
        ("data.subset", config.data.subset),
        ("train.epochs", config.train.epochs),
        ("train.batch_size", config.train.batch_size),
        ("train.threads", config.train.threads),
        ("train.eval_every", config.train.eval_every),
        ("teacher.epochs", config.teacher.epochs),
        ("teacher.lr", config.teacher.lr),
        ("optim.lr", config.optim.lr),
        ("method.temperature", config.method.temperature),
        ("data.first_per_class", config.data.first_per_class),
        ("data.val_split", config.data.val_split),
        ("schedule.div_factor", config.schedule.div_factor),
        ("schedule.final_div_factor", config.schedule.final_div_factor),
    ):
        _check_positive(key, value)
    for key, value in (
        ("data.crop_padding", config.data.crop_padding),
        ("data.num_workers", config.data.num_workers),
        ("method.hcl_weight", config.method.hcl_weight),
        ("method.kd_weight", config.method.kd_weight),
        ("method.warmup_epochs", config.method.warmup_epochs),
        ("optim.momentum", config.optim.momentum),
        ("optim.weight_decay", config.optim.weight_decay),
        ("schedule.gamma", config.schedule.gamma),
        ("schedule.min_lr", config.schedule.min_lr),
        ("schedule.warmup_epochs", config.schedule.warmup_epochs),
    ):
        _check_positive(key, value, allow_zero=True)
    for key, side in (("data.image_size", config.data.image_size), ("data.resize", config.data.resize)):
        if side is not None and side > MAX_IMAGE_SIDE:
            # The run's manifest records them; a reader refuses a larger side (deploy.manifest).
            raise UsageError(f"config key {key}: at most {MAX_IMAGE_SIDE} pixels, got {side}")
    if not 0.0 <= config.schedule.warmup_fraction < 1.0:
        raise UsageError(
            f"config key schedule.warmup_fraction: must be in [0, 1), got {config.schedule.warmup_fraction}"
        )
    if config.schedule.warmup_fraction and config.schedule.warmup_epochs:
        raise UsageError(
            "config keys schedule.warmup_epochs and schedule.warmup_fraction: set one of them, not both"
        )
    if config.data.subset is not None and config.data.first_per_class is not None:
        raise UsageError("config keys data.subset and data.first_per_class: set one of them, not both")
    if not 0.0 < config.data.val_fraction < 1.0:
        raise UsageError(
            f"config key data.val_fraction: must be between 0 and 1, got {config.data.val_fraction}"
        )
    for key, values in (("data.mean", config.data.mean), ("data.std", config.data.std)):
        if values is not None and len(values) != 3:
            raise UsageError(f"config key {key}: expected 3 values (R, G, B), got {values}")
    if config.data.std is not None and any(v <= 0 for v in config.data.std):
        raise UsageError(f"config key data.std: every value must be > 0, got {config.data.std}")
    if config.task == DETECTION:
        _validate_detection(config)
    elif config.data.dataset != "digits" and not config.data.root:
        raise UsageError(
            f"config key data.root: required for data.dataset={config.data.dataset}; "
            "pass data.root=DIR (the dataset's folder)"
        )
    if sorted(config.schedule.milestones) != config.schedule.milestones:
        raise UsageError(
            f"config key schedule.milestones: must be increasing, got {config.schedule.milestones}"
        )
    if config.method.name in ("reviewkd", "reviewkd+kd") and (config.method.student_taps is None) != (
        config.method.teacher_taps is None
    ):
        raise UsageError("config keys method.student_taps and method.teacher_taps: set both or neither")
    return config


def _validate_detection(config: Config) -> None:
    """The detection section's choices and ranges (task: detection)."""
    dc = config.detection
    _check_choice("detection.format", dc.format, DETECTION_FORMATS)
    if dc.format != "digits" and not config.data.root:
        raise UsageError(
            f"config key data.root: required for detection.format={dc.format}; "
            "pass data.root=DIR (the data set's folder)"
        )
    if dc.format == "coco" and not (dc.train and dc.val):
        raise UsageError(
            "config keys detection.train and detection.val: detection.format=coco needs each split's"
            " annotation JSON (relative to data.root)"
        )
    for key, value in (
        ("detection.height", dc.height),
        ("detection.width", dc.width),
        ("detection.digits_train_images", dc.digits_train_images),
        ("detection.digits_val_images", dc.digits_val_images),
        ("detection.min_scale", dc.min_scale),
        ("detection.max_scale", dc.max_scale),
        ("detection.anchor_scale", dc.anchor_scale),
    ):
        _check_positive(key, value)
    if not 0.0 <= dc.flip_probability <= 1.0:
        raise UsageError(
            f"config key detection.flip_probability: must be in [0, 1], got {dc.flip_probability}"
        )
    unsupported = {"train.ema_decay": config.train.ema_decay > 0, "train.compile": config.train.compile}
    for key, is_set in unsupported.items():
        if is_set:
            raise UsageError(f"config key {key}: not available for task detection; leave it off")
    if dc.min_scale > dc.max_scale:
        raise UsageError(
            f"config keys detection.min_scale and detection.max_scale: expected min <= max, got"
            f" {dc.min_scale} > {dc.max_scale}"
        )


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"override {text!r}: expected key=value, for example optim.lr=0.05")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(f"override {key}: cannot parse value {raw!r} ({yaml_problem(exc)})") from exc
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line, column) and what, without its multi-line excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        context = f" ({exc.context})" if exc.context else ""
        return f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem or 'invalid YAML'}{context}"
    return " ".join(str(exc).split())


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; unreadable files and non-mappings are one-line UsageErrors naming the path."""
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML: {yaml_problem(exc)}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the config ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping over the defaults."""
    config = Config()
    _merge(config, data, "")
    return validate(config)


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a config: defaults, then the file or shipped name `source` (the embedded digits default
    when None), then `key=value` overrides.

    Raises:
        UsageError: a missing or unreadable file, an unknown key, a bad value; the message names it.
    """
    config = Config()
    path = resolve_config_path(DEFAULT_CONFIG_NAME if source is None else source)
    data = read_yaml(path)  # its errors name the path already
    try:
        _merge(config, data, "")
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc
    for text in overrides:
        key, value = parse_override(text)
        _merge(config, _nest(key, value), "")
    return validate(config)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts (YAML- and JSON-serialisable)."""
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    """The config as YAML text, sections in declaration order."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


def save_config(config: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    write_text_atomic(path, dump_config(config))
    return Path(path)


def load_run_config(run_dir: str | os.PathLike[str]) -> Config:
    """Read RUN/config.yaml as written by a training run."""
    path = run_layout.run_path(run_dir, run_layout.CONFIG)
    if not path.is_file():
        raise UsageError(f"{path}: no config.yaml; expected a run directory written by reviewkd distill")
    data = read_yaml(path)
    try:
        return config_from_dict(data)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def diff_configs(a: Config, b: Config, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out keys under `ignore` prefixes."""

    def flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in data.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(config_to_dict(a)), flat(config_to_dict(b))
    return [k for k in fa if fa[k] != fb.get(k) and not any(k == p or k.startswith(f"{p}.") for p in ignore)]
