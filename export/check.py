"""Parity checks of each exported ONNX file against the PyTorch student it came from.

The gates are deploy.gates' (the same table `reviewkd validate` applies), in percent: by default
fp32 max |diff| of logits <= 1e-4 and 100% top-1 agreement; fp16 top-1 agreement >= 99%; int8
top-1 accuracy at most 1 point under the student's, judged on the paired 95% interval of the drop
over the check images (deploy.paired_stats). The uint8-input variant with baked-in
preprocessing is an fp32 model and is held to the fp32 gates. On random inputs (no images: no
labels) a file is also held to deploy.gates.RANDOM_INPUT_GATES (fp16: the relative L2 error of its
logits), and its agreement gate is judged on the agreement's interval: a shortfall 64 inputs cannot
resolve is inconclusive, not a failure.

A check whose every gate can be judged on an interval (deploy.gates.SEQUENTIAL_GATES: int8's drop,
fp16's agreement, on labelled images) is sequential: it runs the file on the images in deploy.gates'
fixed schedule of looks and stops at the first look that resolves every gate, with the interval of
that look's confidence. Its metrics say how
many images it used ("n") of how many it had, and its reason says so when it stopped early.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from deploy.errors import MissingDependencyError, UsageError
from deploy.gates import (
    DEFAULT_GATES,
    GATE_METRICS,
    RANDOM_INPUT_GATES,
    SEQUENTIAL_GATES,
    Look,
    describe_check,
    evaluate_gates,
    gates_for,
    resolved,
    sequential_looks,
)
from deploy.gpu import current_gpu
from deploy.manifest import CheckDeviceRecord
from deploy.optional import installed, optional_import
from deploy.paired_stats import DEFAULT_CONFIDENCE, compare_predictions
from deploy.runners.onnxruntime_runner import (
    CUDA_PROVIDER,
    available_providers,
    check_session_providers,
    open_session_on,
    parse_embedded_manifest,
    provider_options,
    providers_for_device,
    runs_integer_kernels,
    session_device,
)
from deploy.status import Status

# The parity numbers of `compare` the gates read.
PARITY_METRICS = ("n", "max_abs_diff", "mean_abs_diff", "rel_l2_error", "top1_agreement")
# The precision label of the uint8-input variant, and the gates it is held to.
UINT8_INPUT = "uint8"


@dataclass
class CheckResult:
    """The outcome of one file's check: passed, failed or skipped (status), and the numbers."""

    path: str
    precision: str
    status: Status
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether the file may be used (a skipped check does not fail the file)."""
        return self.status != Status.FAILED

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form for the manifest."""
        return {"status": self.status, "reason": self.reason, **self.metrics}


def session_threads() -> int:
    """Intra-op threads of export's own sessions: one per CPU this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --check-device's choices: where an export computes its references and runs its files.
CHECK_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class CheckDevice:
    """Where one export computes (`--check-device`): the PyTorch references on `torch`, and the
    checks, scores and mixed-precision searches of its ONNX files on `onnxruntime`, each "cpu" or
    "cuda". On "cuda" the ONNX Runtime CPU int8 flavour still runs on the CPU, where its integer
    kernels are (`open_check_session`); each check records where its file ran. `notes` say why
    "auto" left a side on the CPU. Calibration statistics and the search's latency timings run on
    the CPU."""

    torch: str = "cpu"
    onnxruntime: str = "cpu"
    notes: tuple[str, ...] = ()

    def describe(self) -> CheckDeviceRecord:
        """The manifest's record (manifest["export"]["check_device"])."""
        return {"torch": self.torch, "onnxruntime": self.onnxruntime, "notes": list(self.notes)}


CPU_CHECKS = CheckDevice()


def onnxruntime_cuda_missing() -> str | None:
    """Why ONNX Runtime cannot compute on its CUDA provider here, or None when it can: the provider
    must be installed, a GPU found, and a one-operator model must load on it with TF32 off and give
    the right answer (installed is not loadable: onnxruntime-gpu lists the provider without a driver
    or cuDNN, and some libraries load only at the first kernel)."""
    if not installed("onnxruntime"):
        return "onnxruntime is not installed"
    with optional_import("ONNX Runtime"):
        import onnxruntime as ort

    if CUDA_PROVIDER not in available_providers():
        return f"onnxruntime {ort.__version__} has no CUDA provider (onnxruntime-gpu is not installed)"
    if current_gpu() is None:
        return "onnxruntime lists its CUDA provider, but no NVIDIA GPU was found"
    value = {name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")}
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [value["x"]], [value["y"]])
    # IR version 8 is opset 18's: one every ONNX Runtime that runs export's files reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    providers = providers_for_device("cuda")
    try:
        session = ort.InferenceSession(
            model.SerializeToString(),
            providers=providers,
            provider_options=[provider_options(p) for p in providers],
        )
        loaded, options = session.get_providers(), session.get_provider_options()
        check_session_providers(Path("<probe>"), providers, loaded, options)
        (computed,) = session.run(None, {"x": np.array([-1.0], dtype=np.float32)})
    except MissingDependencyError:
        return (
            "onnxruntime's CUDA provider does not load: it needs an NVIDIA driver and the CUDA and cuDNN"
            " versions its release names"
        )
    except Exception as exc:  # onnxruntime raises its own exception types, none shared
        lines = str(exc).strip().splitlines()
        return f"onnxruntime's CUDA provider does not run: {lines[0] if lines else type(exc).__name__}"
    if computed.tolist() != [0.0]:
        return f"onnxruntime's CUDA provider computed Relu(-1) = {computed.tolist()}"
    return None


def resolve_check_device(requested: str, torch_cuda_missing: Callable[[], str | None]) -> CheckDevice:
    """The CheckDevice of `--check-device requested`: "cpu" puts both on the CPU, probing nothing;
    "cuda" both on the GPU, a MissingDependencyError (exit 3) when either cannot run there; "auto"
    each on the GPU where it can run there, else on the CPU with the reason in `notes`. UsageError for
    any other value. `torch_cuda_missing()` says why PyTorch cannot use a CUDA GPU here (None: it
    can; reviewkd.runtime's, which export passes); ONNX Runtime's is `onnxruntime_cuda_missing()`."""
    if requested not in CHECK_DEVICES:
        raise UsageError(f"--check-device {requested!r}: expected one of {', '.join(CHECK_DEVICES)}")
    if requested == "cpu":
        return CPU_CHECKS
    missing = {"PyTorch": torch_cuda_missing(), "ONNX Runtime": onnxruntime_cuda_missing()}
    if requested == "cuda" and any(missing.values()):
        reasons = "; ".join(f"{who}: {why}" for who, why in missing.items() if why)
        raise MissingDependencyError(f"--check-device cuda: {reasons}; use --check-device cpu or auto")
    notes = tuple(f"{who} on the CPU: {why}" for who, why in missing.items() if why)
    return CheckDevice(
        "cpu" if missing["PyTorch"] else "cuda", "cpu" if missing["ONNX Runtime"] else "cuda", notes
    )


def open_check_session(path: str | os.PathLike[str], device: str = "cpu") -> Any:
    """A session on the ONNX file at `path` as export's checks, scores and searches run it.

    It is opened as deploy opens it (`open_session_on`, on `device`): a file whose int8 description
    asks for it runs its Q/DQ pairs unfused, as TensorRT computes them, exactly as `reviewkd
    validate` runs it; the ONNX Runtime CPU int8 flavour runs on the CPU whatever `device` says
    (`session_device` of the session says where it ran). On a GPU its embedded manifest is read
    first, so that such a file, many of which the calibration race and the mixed-precision search
    write, is opened on the CPU alone rather than on CUDA and then again. Its intra-op threads are
    `session_threads()`, and idle ones sleep rather than spin: ONNX Runtime's busy-waiting threads
    computed nothing and, beside another job on the CPUs, doubled the CPU time of a check (the
    digits student's files, 2 CPUs).
    """
    if device != "cpu" and runs_integer_kernels(_embedded_manifest(path)):
        device = "cpu"
    return open_session_on(path, device, threads=session_threads(), spinning=False)[0]


def _embedded_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest export embedded in the ONNX file at `path` (None: none), read with onnx."""
    model = onnx.load(str(path), load_external_data=False)
    return parse_embedded_manifest({prop.key: prop.value for prop in model.metadata_props}, path)


def run_onnx(path: str | os.PathLike[str], batches: Sequence[np.ndarray], device: str = "cpu") -> np.ndarray:
    """Run an ONNX file over `batches` and return the concatenated first output.

    The session is `open_check_session`'s on `device`: the file's own semantics, as `reviewkd
    validate` runs it.
    """
    return run_session(open_check_session(path, device), batches)


def run_session(session: Any, batches: Sequence[np.ndarray]) -> np.ndarray:
    """The session's first output over `batches`, concatenated (`session_device(session)` says where
    it ran)."""
    return np.concatenate(list(_logits_per_batch(session, batches)))


def _logits_per_batch(session: Any, batches: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The session's first output on each batch in turn."""
    input_name = session.get_inputs()[0].name
    for batch in batches:
        yield np.asarray(session.run(None, {input_name: batch})[0], dtype=np.float32)


def compare(
    logits: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Parity numbers of `logits` against `reference`, and top-1 accuracies (%) where labels exist;
    the drop's interval at `confidence` (a sequential check's look)."""
    diff = np.abs(logits.astype(np.float64) - reference.astype(np.float64))
    count = len(logits)

    def percent(hits: np.ndarray) -> float:
        # From counts, as validate computes them, so that both agree to the last bit at a gate's edge.
        return 100.0 * int(np.sum(hits)) / count

    scale = max(float(np.linalg.norm(reference.astype(np.float64))), 1e-12)
    metrics: dict[str, Any] = {
        "n": count,
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "rel_l2_error": float(np.linalg.norm(diff)) / scale,
        "top1_agreement": percent(logits.argmax(1) == reference.argmax(1)),
    }
    if labels is not None:
        metrics["top1"] = percent(logits.argmax(1) == labels)
        metrics["reference_top1"] = percent(reference.argmax(1) == labels)
        paired = compare_predictions(labels, reference.argmax(1), logits.argmax(1), confidence)
        metrics["paired"] = {**paired.counts(), "confidence": confidence}
        metrics["top1_drop_ci"] = [100 * bound for bound in paired.interval]
    return metrics


def precision_gates(
    precision: str, gates: Mapping[str, Mapping[str, float]] = DEFAULT_GATES, *, random_inputs: bool = False
) -> dict[str, float]:
    """The gates a file of `precision` is held to (the uint8-input variant: fp32's); with
    `random_inputs`, RANDOM_INPUT_GATES added. UsageError when there is none."""
    gated = "fp32" if precision == UINT8_INPUT else precision
    held_to = gates_for(gates, gated)
    if random_inputs:
        held_to.update(gates_for(RANDOM_INPUT_GATES, gated))
    if not held_to:
        raise UsageError(f"no parity gate for precision {precision!r}")
    return held_to


def gate(
    precision: str,
    metrics: Mapping[str, Any],
    gates: Mapping[str, Mapping[str, float]] = DEFAULT_GATES,
    *,
    random_inputs: bool = False,
) -> tuple[Status, str]:
    """Hold `metrics` (from `compare`) to the precision's gates; return (status, reason).

    A gate on accuracy without labelled images cannot be measured: the check is skipped. With
    `random_inputs` (the check had no images), RANDOM_INPUT_GATES add to the precision's gates and
    the agreement gate is judged on its interval (deploy.gates).
    """
    status, reason, _ = _judge(precision, metrics, gates, random_inputs=random_inputs)
    return status, reason


def _judge(
    precision: str,
    metrics: Mapping[str, Any],
    gates: Mapping[str, Mapping[str, float]],
    *,
    random_inputs: bool,
    interim_confidence: float | None = None,
) -> tuple[Status, str, list[dict[str, Any]]]:
    """`gate`'s (status, reason) and the gate records behind them (none when skipped);
    `interim_confidence`: an interim look of a sequential check (deploy.gates.evaluate_gates)."""
    held_to = precision_gates(precision, gates, random_inputs=random_inputs)
    top1 = metrics.get("top1")
    reference_top1 = metrics.get("reference_top1")
    if top1 is None and any(GATE_METRICS[name].metric.startswith("accuracy.") for name in held_to):
        return Status.SKIPPED, f"{precision} accuracy gate needs labelled images", []
    measurement = {
        "parity": {k: metrics.get(k) for k in PARITY_METRICS},
        "accuracy": {
            "top1": top1,
            "top1_drop": None if top1 is None or reference_top1 is None else reference_top1 - top1,
            "paired": metrics.get("paired"),
        },
    }
    checks = evaluate_gates(
        measurement, held_to, agreement_interval=random_inputs, interim_confidence=interim_confidence
    )
    status = Status.OK if all(c["passed"] for c in checks) else Status.FAILED
    return status, "; ".join(describe_check(c) for c in checks), checks


def batch_looks(batches: Sequence[np.ndarray]) -> list[Look]:
    """deploy.gates' sequential schedule over the images of `batches`, each look moved up to the next
    batch boundary (the schedule still depends on nothing but the batch sizes)."""
    boundaries = np.cumsum([len(b) for b in batches])
    return [
        Look(int(boundaries[np.searchsorted(boundaries, look.images)]), look.confidence)
        for look in sequential_looks(int(boundaries[-1]))
    ]


def sequential_logits(
    session: Any, batches: Sequence[np.ndarray], looks: Sequence[Look]
) -> Iterator[tuple[int, Look, np.ndarray]]:
    """(look number from 1, look, the file's logits on the images up to it) for each look in turn,
    running only the batches each look needs on `session` (`open_check_session`'s); looks that batch
    boundaries merged are yielded once. The caller stops iterating where a look resolves its question."""
    logits = _logits_per_batch(session, batches)
    outputs: list[np.ndarray] = []
    seen = 0
    for taken, look in enumerate(looks, start=1):
        if seen >= look.images and taken < len(looks):
            continue
        while seen < look.images:
            outputs.append(next(logits))
            seen += len(outputs[-1])
        yield taken, look, np.concatenate(outputs)


def check_looks(precision: str, batches: Sequence[np.ndarray], labels: np.ndarray | None) -> list[Look]:
    """The looks a check of `precision` on `batches` takes: `batch_looks` when every gate can be
    judged on an interval (labels exist and each gate is one of SEQUENTIAL_GATES); else one look at
    all the images at 95%."""
    if labels is None or not set(precision_gates(precision)) <= SEQUENTIAL_GATES:
        return [Look(sum(len(b) for b in batches), DEFAULT_CONFIDENCE)]
    return batch_looks(batches)


def check_file(
    path: str | os.PathLike[str],
    precision: str,
    batches: Sequence[np.ndarray],
    reference: np.ndarray,
    labels: np.ndarray | None,
    device: str = "cpu",
) -> CheckResult:
    """Run `path` on `batches` (on `device`, as `run_onnx`) and hold its logits against the
    student's `reference` logits.

    A sequential check (`check_looks`) stops at the first look that resolves every gate; its
    metrics["n"] is the images used, metrics["sequential"] the schedule and where it stopped.
    metrics["device"] is where the file ran ("cpu" or "cuda": the session's own providers).
    """
    looks = check_looks(precision, batches, labels)
    total = looks[-1].images
    session = open_check_session(path, device)
    ran_on = session_device(session)
    for taken, look, logits in sequential_logits(session, batches, looks):
        seen = len(logits)
        seen_labels = None if labels is None else labels[:seen]
        metrics = {**compare(logits, reference[:seen], seen_labels, look.confidence), "device": ran_on}
        interim = look.confidence if taken < len(looks) else None
        status, reason, checks = _judge(
            precision, metrics, DEFAULT_GATES, random_inputs=labels is None, interim_confidence=interim
        )
        if len(looks) > 1 and (resolved(checks) or taken == len(looks)):
            metrics["sequential"] = {
                "images_available": total,
                "looks": [{"images": n.images, "confidence": n.confidence} for n in looks],
                "looks_taken": taken,
                "stopped_early": seen < total,
            }
            if seen < total:
                stop = f"look {taken} of {len(looks)}"
                reason += f" [sequential: stopped at {stop}, {seen:,} of {total:,} images]"
            break
    return CheckResult(str(Path(path)), precision, status, reason, metrics)
