"""Model names to networks: our CIFAR zoo, any torchvision classifier, and timm models where installed."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from deploy.errors import UsageError
from deploy.optional import optional_import

from .cifar100_nets import CifarResNetB, WideResNet
from .cifar_resnet import CifarResNet
from .weights import load_weights

_X4_FILTERS = (32, 64, 128, 256)

_ZOO: dict[str, Callable[..., nn.Module]] = {
    "cifar_resnet20": lambda num_classes, **kw: CifarResNet(20, num_classes, **kw),
    "cifar_resnet32": lambda num_classes, **kw: CifarResNet(32, num_classes, **kw),
    "cifar_resnet44": lambda num_classes, **kw: CifarResNet(44, num_classes, **kw),
    "cifar_resnet56": lambda num_classes, **kw: CifarResNet(56, num_classes, **kw),
    "cifar_resnet110": lambda num_classes, **kw: CifarResNet(110, num_classes, **kw),
    "resnet8x4": lambda num_classes, **kw: CifarResNetB(8, _X4_FILTERS, num_classes, **kw),
    "resnet32x4": lambda num_classes, **kw: CifarResNetB(32, _X4_FILTERS, num_classes, **kw),
    "wrn_16_2": lambda num_classes, **kw: WideResNet(16, 2, num_classes, **kw),
    "wrn_40_1": lambda num_classes, **kw: WideResNet(40, 1, num_classes, **kw),
    "wrn_40_2": lambda num_classes, **kw: WideResNet(40, 2, num_classes, **kw),
}

_PREFIXES = ("torchvision:", "timm:")


def list_models() -> list[str]:
    """The names of our own zoo networks; "torchvision:<name>" and "timm:<name>" are accepted too."""
    return sorted(_ZOO)


def _unknown(name: str) -> UsageError:
    return UsageError(
        f"unknown model {name!r}; known: {', '.join(list_models())}, torchvision:<name>, timm:<name>"
    )


def _import_timm(arch: str) -> Any:
    with optional_import(f"model 'timm:{arch}'"):
        import timm
    return timm


def check_model_name(name: str) -> None:
    """Raise unless `name` is a model create_model can build; cheap, builds nothing.

    Raises:
        UsageError: an unknown name (the message lists the known ones).
        MissingDependencyError: a "timm:" name without timm installed.
    """
    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    arch = name[len(prefix) :] if prefix else name
    if prefix is None:
        if name not in _ZOO:
            raise _unknown(name)
    elif not arch:
        raise _unknown(name)
    elif prefix == "torchvision:":
        with optional_import("a torchvision model"):
            import torchvision.models as tvm

        classifiers = tvm.list_models(module=tvm)
        if arch not in classifiers:
            raise UsageError(
                f"unknown model 'torchvision:{arch}'; torchvision classifiers are: {', '.join(classifiers)}"
            )
    elif not _import_timm(arch).is_model(arch):
        raise UsageError(f"unknown model 'timm:{arch}'; timm.list_models() shows the names timm knows")


def _use_torch_batchnorm_momentum(model: nn.Module) -> None:
    """Give every BatchNorm torch's default momentum (0.1).

    torchvision's MobileNetV3 and EfficientNets set 0.01, tuned for ImageNet's hundreds of thousands
    of steps. Over a few thousand steps the running statistics then trail the weights: a ReviewKD
    mobilenet_v3_small trained 5 epochs on 10,000 CIFAR-10 images scored 45% on its training batches
    and 16% in eval mode, and 44% once its statistics were recomputed (benchmarks/RESULTS.md).
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.1


def create_model(
    name: str, num_classes: int, weights: str | os.PathLike[str] | None = None, **kwargs: Any
) -> nn.Module:
    """Build the network `name` with `num_classes` outputs, optionally loading `weights` strictly.

    `name` is one of list_models(), "torchvision:<name>" (any torchvision classifier, built without
    pretrained weights, its BatchNorm momentum set to torch's default 0.1) or "timm:<name>" (where
    timm is installed). Extra keyword arguments go to the network's constructor (for example
    drop_rate for the WRNs). The model is returned in train mode.

    Raises:
        UsageError: unknown name, bad num_classes or constructor argument, or weights that cannot be read
            or do not fit (load_weights names the offending keys).
        MissingDependencyError: a "timm:" name without timm installed.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r} for model {name!r}")
    check_model_name(name)
    try:
        if name.startswith("torchvision:"):
            with optional_import("a torchvision model"):
                import torchvision.models as tvm

            model = tvm.get_model(
                name.removeprefix("torchvision:"), weights=None, num_classes=num_classes, **kwargs
            )
            _use_torch_batchnorm_momentum(model)
        elif name.startswith("timm:"):
            arch = name.removeprefix("timm:")
            model = _import_timm(arch).create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
        else:
            model = _ZOO[name](num_classes, **kwargs)
    except TypeError as exc:
        raise UsageError(f"model {name!r} does not accept the arguments {sorted(kwargs)}: {exc}") from exc
    if weights is not None:
        load_weights(model, weights)
    return model
