"""Stage features from any nn.Module by module path, with logits, in one forward pass.

Forward hooks work on every model (eager code, torchvision, timm) without editing it; the
hooks only record while a `FeatureTaps` call is running, so the model behaves normally (and
exports cleanly) outside it.

A tap is a module path, whose output is recorded, or a module path followed by `:input`, whose
input is recorded instead: `layer1.2.relu2:input` is the pre-activation that the reference code
takes from its teachers (docs/METHOD.md section 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deploy.errors import UsageError

MAX_SPATIAL_LEVELS = 4
INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class TapInfo:
    """What one probe forward found at a tap: its module path, channels and spatial size."""

    path: str
    channels: int
    size: tuple[int, int]


def model_label(model: nn.Module) -> str:
    """A readable name for error messages: the zoo name when known, else the class name."""
    return str(getattr(model, "zoo_name", type(model).__name__))


def split_tap(tap: str) -> tuple[str, bool]:
    """A tap's module path, and whether the module's input (rather than its output) is recorded."""
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    return tap, False


def _as_map(output: Any, path: str, model: nn.Module) -> torch.Tensor:
    """Turn a tapped output into an (N, C, H, W) map; pooled (N, C) vectors become (N, C, 1, 1)."""
    if isinstance(output, torch.Tensor) and output.dim() == 4:
        return output
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        return output[:, :, None, None]
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise UsageError(
        f"tap '{path}' of {model_label(model)} gives {shape}; expected a (N, C, H, W) map or a pooled (N, C)"
    )


def _probe_input(model: nn.Module, input_shape: Sequence[int], *, random: bool = False) -> torch.Tensor:
    """A batch of two probe images on the model's device: zeros, or seeded normal noise when the
    probe must tell values apart (zeros make many maps constant)."""
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if random:
        noise = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
        return noise.to(device)
    return torch.zeros((2, *input_shape), device=device)


def _is_image_grid(size: tuple[int, ...], input_shape: Sequence[int]) -> bool:
    """Whether an output's last two dims look like a downsampled input grid (H', W').

    Channels-last tensors inside some blocks (ConvNeXt) are 4-D too, with (W', C) last; their
    sizes exceed the input or break its aspect ratio.
    """
    height, width = size
    in_height, in_width = input_shape[-2], input_shape[-1]
    if height > in_height or width > in_width:
        return False
    ratio = (height / width) / (in_height / in_width)
    return 1 / 1.5 <= ratio <= 1.5


def default_taps(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The default stage taps: the model's own `default_feature_taps`, else found by a probe.

    The probe hooks every submodule and records the spatial size of each 4-D output. Stages
    are read at one nesting depth: the depth whose modules show the most distinct resolutions
    (the shallowest on a tie), so a stage is a whole block, never a layer inside one. A stage's
    output is the last module at that depth to finish at its resolution. The deepest
    MAX_SPATIAL_LEVELS resolutions are kept, followed by the globally pooled feature (the last
    module giving a 1x1 map). For torchvision ResNets this is layer1..layer4 and avgpool, as in
    the reference; for MobileNets the last block of each resolution inside `features`.
    """
    declared = getattr(model, "default_feature_taps", None)
    if declared:
        return list(declared)

    finished: list[tuple[str, tuple[int, ...]]] = []
    calls: dict[str, int] = {}

    def make_hook(path: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[path] = calls.get(path, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                finished.append((path, tuple(output.shape[-2:])))

        return hook

    handles = [m.register_forward_hook(make_hook(p)) for p, m in model.named_modules() if p]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_probe_input(model, input_shape))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    # A module run more than once (a shared ReLU) cannot stand for one stage.
    once = [(path, size) for path, size in finished if calls[path] == 1]
    pooled = [path for path, size in once if size == (1, 1)]
    spatial = [(path, size) for path, size in once if size != (1, 1) and _is_image_grid(size, input_shape)]
    by_depth: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for path, size in spatial:
        by_depth.setdefault(path.count("."), []).append((path, size))
    if not by_depth:
        raise UsageError(
            f"{model_label(model)}: found no spatial feature maps to tap; name the taps explicitly"
        )
    depth = max(sorted(by_depth), key=lambda d: len({size for _, size in by_depth[d]}))
    last_at_size: dict[tuple[int, ...], str] = {}
    for path, size in by_depth[depth]:
        last_at_size.pop(size, None)  # keep resolutions in the order their stage ends
        last_at_size[size] = path
    stages = list(last_at_size.values())[-MAX_SPATIAL_LEVELS:]
    if pooled:
        stages.append(pooled[-1])
    return stages


def pair_default_taps(student_taps: list[str], teacher_taps: list[str]) -> tuple[list[str], list[str]]:
    """Default taps of a student and a teacher with different numbers of levels, paired deepest first.

    A MobileNet on a 32x32 input shows more resolutions than a CIFAR ResNet (16, 8, 4, 2 against 32,
    16, 8): the longer list loses its shallowest levels, so the pooled features pair with each other
    and each remaining stage with the stage at the same distance from the output. Both lists end in
    their pooled feature when both models have one, as `default_taps` gives them.
    """
    levels = min(len(student_taps), len(teacher_taps))
    return student_taps[len(student_taps) - levels :], teacher_taps[len(teacher_taps) - levels :]


def pre_activation_taps(model: nn.Module, taps: Sequence[str], input_shape: Sequence[int]) -> list[str]:
    """`taps` with every stage that ends in a ReLU read before that ReLU (`<relu path>:input`).

    The reference ReviewKD code compares the review chain's outputs with the teacher's
    pre-activations (its models' `preact=True`): the sum of a residual block before its last ReLU,
    negative values included, which a ReLU would clip to zero. A probe finds, for each tap, the
    last `nn.ReLU` to run inside that module and checks that its output is the module's output;
    taps whose module does not end in a ReLU (a pooled feature, a pre-activation or linear
    bottleneck block) and taps already reading an input stay as they are.
    """
    modules = dict(model.named_modules())
    plain = [tap for tap in taps if not split_tap(tap)[1] and tap in modules]
    tap_outputs: dict[str, torch.Tensor] = {}
    relu_calls: list[tuple[str, torch.Tensor]] = []

    def record_tap(path: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                tap_outputs[path] = output.clone()

        return hook

    def record_relu(path: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            relu_calls.append((path, output.clone()))

        return hook

    handles = [modules[tap].register_forward_hook(record_tap(tap)) for tap in plain]
    handles += [m.register_forward_hook(record_relu(p)) for p, m in modules.items() if isinstance(m, nn.ReLU)]
    probe = _probe_input(model, input_shape, random=True)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    result = list(taps)
    for index, tap in enumerate(taps):
        output = tap_outputs.get(tap)
        inside = [(path, out) for path, out in relu_calls if path == tap or path.startswith(tap + ".")]
        if output is None or not inside:
            continue
        relu_path, relu_output = inside[-1]
        if relu_output.shape == output.shape and torch.equal(relu_output, output):
            result[index] = relu_path + INPUT_SUFFIX
    return result


class FeatureTaps:
    """Wrap a model so that one call returns its logits and the features at `taps`.

    A plain object rather than an nn.Module, so the model's parameters are not registered a
    second time in whatever module holds both (the distiller's state_dict stays clean).

    Args:
        model: any classifier; it is not modified beyond forward hooks that record only
            while this wrapper is being called.
        taps: module paths (as in `named_modules()`), shallow to deep; a path ending in
            `:input` records the module's input instead of its output.
        input_shape: (C, H, W) of one input, for the probe that fills `info`.
    """

    def __init__(self, model: nn.Module, taps: Sequence[str], input_shape: Sequence[int]) -> None:
        self.model = model
        self.taps = list(taps)
        modules = dict(model.named_modules())
        missing = [tap for tap in self.taps if split_tap(tap)[0] not in modules]
        if missing:
            known = ", ".join(p for p in modules if p and "." not in p)
            raise UsageError(
                f"{model_label(model)} has no module '{split_tap(missing[0])[0]}' to tap "
                f"(tap '{missing[0]}'); its top-level modules: {known}"
            )
        self._recording = False
        self._features: dict[str, Any] = {}
        self._handles = [self._attach(modules[split_tap(tap)[0]], tap) for tap in self.taps]
        self.info = self._probe(input_shape)

    def _attach(self, module: nn.Module, tap: str) -> Any:
        if split_tap(tap)[1]:

            def input_hook(_module: nn.Module, inputs: Any) -> None:
                # A copy: an in-place module (ReLU(inplace=True)) overwrites its input. A module
                # run several times (a shared ReLU) keeps its last call.
                if self._recording and inputs:
                    self._features[tap] = inputs[0].clone()

            return module.register_forward_pre_hook(input_hook)

        def output_hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._recording:
                self._features[tap] = output

        return module.register_forward_hook(output_hook)

    def _probe(self, input_shape: Sequence[int]) -> list[TapInfo]:
        was_training = self.model.training
        try:
            self.model.eval()
            with torch.no_grad():
                _, features = self(_probe_input(self.model, input_shape))
        finally:
            self.model.train(was_training)
        return [
            TapInfo(path=tap, channels=int(f.shape[1]), size=(int(f.shape[2]), int(f.shape[3])))
            for tap, f in zip(self.taps, features, strict=True)
        ]

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (logits, features shallow to deep as (N, C, H, W) maps)."""
        self._features.clear()
        self._recording = True
        try:
            logits = self.model(images)
        finally:
            self._recording = False
        missing = [tap for tap in self.taps if tap not in self._features]
        if missing:
            raise UsageError(
                f"tap '{missing[0]}' of {model_label(self.model)} did not run in the forward pass"
            )
        features = [_as_map(self._features[tap], tap, self.model) for tap in self.taps]
        self._features.clear()
        return logits, features

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
