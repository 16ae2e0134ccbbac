"""Config: defaults, shipped files, typed overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from deploy.errors import UsageError
from reviewkd.app.cli import main
from reviewkd.config import (
    Config,
    diff_configs,
    load_config,
    load_run_config,
    save_config,
    shipped_configs,
)

# The ReviewKD paper's CIFAR-100 pairs and their HCL weights (docs/METHOD.md section 1.4).
CIFAR100_PAIRS = {
    "cifar100_resnet56_resnet20": ("cifar_resnet56", "cifar_resnet20", 0.6),
    "cifar100_resnet110_resnet32": ("cifar_resnet110", "cifar_resnet32", 1.0),
    "cifar100_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4", 5.0),
    "cifar100_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2", 5.0),
    "cifar100_wrn_40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1", 5.0),
}


def test_shipped_digits_config_is_the_embedded_default() -> None:
    assert load_config(None) == load_config("digits")
    # The demo's few-image students are the digits config's, not defaults a config of one's own inherits.
    digits = load_config("digits")
    assert (digits.data.subset, digits.teacher.full_data, digits.data.val_split) == (50, True, 200)
    assert (Config().data.subset, Config().teacher.full_data, Config().data.val_split) == (None, False, None)
    # ... and so is its teacher's post-ReLU feature (measured better for these students).
    assert digits.method.teacher_pre_activation is False and Config().method.teacher_pre_activation
    assert dataclasses.replace(
        digits,
        data=dataclasses.replace(digits.data, subset=None, val_split=None),
        teacher=dataclasses.replace(digits.teacher, full_data=False),
        method=dataclasses.replace(digits.method, teacher_pre_activation=True),
    ) == Config()


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_resolves(name: str) -> None:
    config = load_config(name, ["data.root=/data/somewhere"])
    assert config.method.name in ("reviewkd", "reviewkd+kd")
    assert config.train.epochs >= 1
    # The embedded demos' few-image students and warm-ups stay out of the paper recipes.
    if name not in ("digits", "digits_detection"):
        assert config.data.subset is None and config.schedule.warmup_epochs == 0.0


def test_shipped_configs_cover_the_paper_pairs() -> None:
    names = set(shipped_configs())
    assert {"digits", "cifar10_resnet56_resnet20", "imagenet_resnet34_resnet18", *CIFAR100_PAIRS} <= names
    for name, (teacher, student, weight) in CIFAR100_PAIRS.items():
        config = load_config(name, ["data.root=/c100"])
        assert (config.teacher.arch, config.student.arch, config.method.hcl_weight) == (
            teacher,
            student,
            weight,
        )
        assert config.data.dataset == "cifar100"
        # The paper's CIFAR recipe.
        assert (config.optim.lr, config.optim.weight_decay, config.train.batch_size) == (0.1, 5e-4, 128)
        assert (config.train.epochs, config.schedule.milestones) == (240, [150, 180, 210])
    imagenet = load_config("imagenet_resnet34_resnet18", ["data.root=/imagenet"])
    assert (imagenet.teacher.arch, imagenet.student.arch) == ("torchvision:resnet34", "torchvision:resnet18")
    assert imagenet.method.hcl_weight == 1.0


def test_cifar10_config_needs_a_data_root() -> None:
    with pytest.raises(UsageError, match=r"data\.root"):
        load_config("cifar10_resnet56_resnet20")


def test_overrides_are_typed() -> None:
    config = load_config(
        None,
        [
            "optim.lr=0.05",
            "optim.lr=1",  # an int where a float is expected is fine
            "optim.weight_decay=1e-4",  # YAML 1.1 reads this as a string
            "method.name=kd",
            "schedule.milestones=[2, 4]",
            "data.subset=100",
            "data.mean=[0.5, 0.5, 0.5]",
            "train.compile=true",
            "teacher.weights=2024",  # a number where a path is expected stays a string
        ],
    )
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.optim.weight_decay == 1e-4
    assert config.method.name == "kd"
    assert config.schedule.milestones == [2, 4]
    assert config.data.subset == 100
    assert config.data.mean == [0.5, 0.5, 0.5]
    assert config.train.compile is True
    assert config.teacher.weights == "2024"
    assert load_config(None, ["data.subset=null"]).data.subset is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=0.1", r"unknown config key optim\.lrr"),
        ("training.epochs=3", r"unknown config key training"),
        ("train.epochs=three", r"train\.epochs: expected int"),
        ("train.epochs=2.5", r"train\.epochs: expected int"),
        ("train.compile=maybe", r"train\.compile: expected bool"),
        ("optim.lr=fast", r"optim\.lr: expected float, got 'fast'"),
        ("method.name=fitnet", r"method\.name: 'fitnet' is not one of"),
        ("optim.lr=-1", r"optim\.lr: must be > 0"),
        ("schedule.milestones=5", r"schedule\.milestones: expected a list"),
        ("schedule.milestones=[9, 3]", r"schedule\.milestones: must be increasing"),
        ("data.std=[1, 1]", r"data\.std: expected 3 values"),
        ("data.val_fraction=1.5", r"data\.val_fraction"),
        ("train=3", r"train: expected a mapping"),
        ("optim.lr", r"expected key=value"),
        ("schedule.name=linear", r"schedule\.name: 'linear' is not one of step, cosine, onecycle"),
        ("schedule.warmup_fraction=1.0", r"schedule\.warmup_fraction: must be in \[0, 1\)"),
        ("schedule.div_factor=0", r"schedule\.div_factor: must be > 0"),
        ("data.first_per_class=0", r"data\.first_per_class: must be > 0"),
        ("train.eval_every=0", r"train\.eval_every: must be > 0"),
        ("train.ema_decay=1.0", r"train\.ema_decay: must be 0 \(off\) or in \(0, 1\), got 1\.0"),
        ("train.ema_decay=-0.1", r"train\.ema_decay: must be 0 \(off\) or in \(0, 1\)"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["schedule.warmup_epochs=1", "schedule.warmup_fraction=0.1"],
            r"warmup_epochs and schedule\.warmup_fraction",
        ),
        (["data.subset=100", "data.first_per_class=10"], r"data\.subset and data\.first_per_class"),
    ],
)
def test_exclusive_keys_are_refused_together(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_config(None, overrides)


def test_bad_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: unknown config key optim\.momentun"):
        load_config(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(UsageError, match=r"bad\.yaml: a config must be a YAML mapping"):
        load_config(path)
    with pytest.raises(UsageError, match=r"no such file, and not a shipped config \(.*digits"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_roundtrip(tmp_path: Path) -> None:
    config = load_config(
        "cifar10_resnet56_resnet20",
        ["data.root=/x", "method.student_taps=[a, b]", "method.teacher_taps=[c, d]"],
    )
    save_config(config, tmp_path / "config.yaml")
    assert load_run_config(tmp_path) == config
    other = load_config("cifar10_resnet56_resnet20", ["data.root=/x", "train.epochs=5", "optim.lr=0.2"])
    assert diff_configs(config, other, ignore=["train.epochs"]) == [
        "method.student_taps",
        "method.teacher_taps",
        "optim.lr",
    ]


def test_cli_reports_config_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["distill", "--out", str(tmp_path / "run"), "optim.momentun=0.9"]) == 2
    err = capsys.readouterr().err
    assert "reviewkd distill: error: unknown config key optim.momentun" in err
    assert not (tmp_path / "run").exists()
