"""The model zoo: architectures, feature taps, weight loading and its errors, pretrained accuracy."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from deploy.errors import MissingDependencyError, UsageError
from reviewkd.models import create_model, list_models, load_weights, read_state_dict

ZOO = [
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_1",
    "wrn_40_2",
]

# Published parameter counts in millions (ResNet paper table 6; CRD/ReviewKD model tables).
PUBLISHED_PARAMS_M = {
    "cifar_resnet20": 0.27,
    "cifar_resnet56": 0.85,
    "cifar_resnet110": 1.7,
    "resnet8x4": 1.2,
    "resnet32x4": 7.4,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.2,
}


def _taps(model: nn.Module) -> tuple[str, ...]:
    taps = type(model).default_feature_taps  # type: ignore[attr-defined]
    assert isinstance(taps, tuple)
    return taps


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_list_models_is_the_zoo() -> None:
    assert list_models() == sorted(ZOO)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_zoo_forward_shapes(name: str, size: tuple[int, int]) -> None:
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_param_counts_match_published(name: str) -> None:
    model = create_model(name, num_classes=10 if name.startswith("cifar_") else 100)
    assert _n_params(model) / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], rel=0.04)


@pytest.mark.parametrize("name", ZOO)
def test_default_taps_fire_once_with_stage_outputs(name: str) -> None:
    model = create_model(name, num_classes=5).eval()
    taps = _taps(model)
    assert taps[-1] == "avgpool"
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    modules = dict(model.named_modules())
    outputs: dict[str, list[torch.Tensor]] = {t: [] for t in taps}
    for tap in taps:
        modules[tap].register_forward_hook(lambda _m, _i, out, tap=tap: outputs[tap].append(out))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 24, 40))
    assert all(len(v) == 1 for v in outputs.values()), {k: len(v) for k, v in outputs.items()}
    stage_sizes = [tuple(outputs[t][0].shape[-2:]) for t in taps[:-1]]
    assert stage_sizes == [(24, 40), (12, 20), (6, 10)]
    # The classifier consumes exactly the pooled feature, so that tap is the penultimate layer.
    classifier = model.get_submodule("fc" if hasattr(model, "fc") else "linear")
    pooled = outputs["avgpool"][0]
    assert pooled.shape[-2:] == (1, 1)
    torch.testing.assert_close(classifier(torch.flatten(pooled, 1)), logits)


def test_wrn_final_activation_runs_before_pooling() -> None:
    model = create_model("wrn_16_2", num_classes=5).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule("avgpool").register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen[0].min() >= 0  # pooled input is post-ReLU


def test_option_a_shortcut_has_no_parameters() -> None:
    model = create_model("cifar_resnet20", num_classes=10)
    assert not any("shortcut" in k for k in model.state_dict())
    assert sorted({k.split(".")[0] for k in model.state_dict()}) == [
        "bn1",
        "conv1",
        "layer1",
        "layer2",
        "layer3",
        "linear",
    ]


def test_tapped_stage_output_survives_backward() -> None:
    """Hooks keep stage outputs alive; no later in-place op may invalidate them for autograd."""
    for name in ("cifar_resnet20", "resnet8x4", "wrn_16_2"):
        model = create_model(name, num_classes=5).train()
        kept: list[torch.Tensor] = []
        for tap in _taps(model):
            model.get_submodule(tap).register_forward_hook(lambda _m, _i, out, kept=kept: kept.append(out))
        logits = model(torch.randn(2, 3, 16, 16))
        loss = logits.sum() + sum(f.pow(2).mean() for f in kept)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())


def _perturbed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_load_safetensors(tmp_path: Path) -> None:
    source = create_model("resnet8x4", num_classes=10)
    state = _perturbed_state(source)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model("resnet8x4", num_classes=10, weights=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key])


def test_load_nested_module_prefixed_checkpoint(tmp_path: Path) -> None:
    source = create_model("wrn_16_2", num_classes=10)
    state = _perturbed_state(source)
    # Old files lack BatchNorm's counter; DataParallel prefixes every key.
    nested = {"module." + k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": nested, "best_prec1": 0.5}, path)
    model = create_model("wrn_16_2", num_classes=10)
    load_weights(model, path)
    for key, value in model.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key])


def test_load_checkpoint_nested_under_model(tmp_path: Path) -> None:
    state = _perturbed_state(create_model("cifar_resnet20", num_classes=10))
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, path)
    assert read_state_dict(path).keys() == state.keys()


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UsageError, match=r"nope\.pth"):
        create_model("cifar_resnet20", 10, weights=missing)


def test_garbage_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a checkpoint at all\n" * 10)
    with pytest.raises(UsageError, match=r"garbage\.pth.*neither"):
        create_model("cifar_resnet20", 10, weights=path)


def test_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(print, protocol=2))  # weights_only refuses arbitrary globals
    with pytest.raises(UsageError, match=r"evil\.pth"):
        create_model("cifar_resnet20", 10, weights=path)


def test_checkpoint_without_tensors_is_named(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"state_dict": {"epoch": 3}}, path)
    with pytest.raises(UsageError, match=r"meta\.pth.*epoch"):
        create_model("cifar_resnet20", 10, weights=path)


def test_wrong_keys_are_named(tmp_path: Path) -> None:
    model = create_model("cifar_resnet20", num_classes=10)
    state = model.state_dict()
    state.pop("layer2.1.conv1.weight")
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as info:
        load_weights(model, path)
    message = str(info.value)
    assert "wrong.safetensors" in message
    assert "1 missing keys: layer2.1.conv1.weight" in message
    assert "1 unexpected keys: head.weight" in message
    assert "\n" not in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed despite the failed load"


def test_many_missing_keys_are_counted(tmp_path: Path) -> None:
    state = create_model("cifar_resnet20", num_classes=10).state_dict()
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer3")}, path)
    with pytest.raises(UsageError, match=r"\d+ missing keys: layer3\.0\.conv1\.weight, .*and \d+ more"):
        create_model("cifar_resnet20", 10, weights=path)


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = create_model("cifar_resnet20", num_classes=10).state_dict()
    path = tmp_path / "c10.pt"
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"linear\.weight \(file \(10, 64\) vs model \(100, 64\)\)"):
        create_model("cifar_resnet20", 100, weights=path)


def test_torchvision_model_builds() -> None:
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown model 'resnet9000'.*cifar_resnet56.*wrn_40_2"):
        create_model("resnet9000", 10)
    with pytest.raises(UsageError, match=r"torchvision:not_a_net.*resnet18"):
        create_model("torchvision:not_a_net", 10)
    with pytest.raises(UsageError, match="unknown model 'torchvision:'"):
        create_model("torchvision:", 10)


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="num_classes"):
        create_model("resnet8x4", 0)
    with pytest.raises(UsageError, match="resnet8x4"):
        create_model("resnet8x4", 10, no_such_option=1)


def test_timm_without_timm_says_how_to_get_it() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install timm"):
            create_model("timm:resnet18", 10)
    else:
        assert create_model("timm:resnet18", 10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def _stratified_subset(targets: list[int], per_class: int) -> list[int]:
    counts: dict[int, int] = {}
    chosen = []
    for index, label in enumerate(targets):
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            chosen.append(index)
    return chosen


@pytest.mark.shared_data
def test_pretrained_cifar_resnet56_accuracy(cifar_weights_dir: Path, cifar10_dir: Path) -> None:
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    model = create_model("cifar_resnet56", 10, weights=cifar_weights_dir / "resnet56-4bfd9763.th").eval()
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    test_set = datasets.ImageFolder(str(cifar10_dir / "test"), transform=transform)
    assert test_set.classes[:3] == ["airplane", "automobile", "bird"]
    # 200 images per class keep this under ~10 s; the full 10,000-image test set scores 83.2%.
    subset = Subset(test_set, _stratified_subset(test_set.targets, per_class=200))
    correct = 0
    with torch.no_grad():
        for images, labels in DataLoader(subset, batch_size=250, num_workers=0):
            correct += int((model(images).argmax(1) == labels).sum())
    assert correct / len(subset) >= 0.82


def test_torchvision_batchnorm_momentum_is_torch_default() -> None:
    # torchvision's MobileNetV3 ships 0.01: over a short run the eval-mode statistics trail the weights
    assert torch.nn.BatchNorm2d(4).momentum == 0.1
    model = create_model("torchvision:mobilenet_v3_small", num_classes=10)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)
