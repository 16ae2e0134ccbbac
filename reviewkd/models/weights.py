"""Read checkpoints (safetensors or torch) into a state_dict and load them strictly, with named errors."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from deploy.errors import UsageError
from deploy.optional import optional_import

# Wrappers training scripts put around parameter names: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which training scripts nest the state_dict, tried in this order.
_NESTING_KEYS = ("state_dict", "model")
# How many names of each kind a mismatch message lists before it only counts.
_NAMES_SHOWN = 5


def _is_safetensors(path: Path) -> bool:
    # A safetensors file is an 8-byte little-endian header length followed by a JSON header.
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return 0 < header_len <= path.stat().st_size - 8


# Terminal colour codes torch puts in some of its messages.
_ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")
# The callable torch's weights_only refusal names ("Unsupported global: GLOBAL posix.system ...",
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked").
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# Longest torch message quoted in one of our one-line errors.
_QUOTE_LIMIT = 200


def describe_torch_load_error(exc: BaseException) -> str:
    """torch.load's failure in one line, for a message that names the file.

    A weights_only refusal says what it refused and that loading it could run arbitrary code,
    instead of quoting torch's advice to load without weights_only; any other error is its
    first sentence, without colour codes.
    """
    text = _ANSI_CODES.sub("", str(exc))
    if "Weights only load failed" in text:
        refused = _REFUSED_GLOBAL.search(text)
        what = f" (the global {refused.group(1)})" if refused else ""
        return (
            f"it holds pickled Python objects besides tensors{what}; unpickling them could run"
            " arbitrary code, so reviewkd reads checkpoints with weights_only=True only: re-save the"
            " tensors alone (a state_dict, or safetensors) from a copy you trust"
        )
    line = " ".join(text.split())
    if len(line) > _QUOTE_LIMIT:
        sentence_end = line.rfind(". ", 0, _QUOTE_LIMIT)
        line = line[: sentence_end + 1] if sentence_end > 0 else line[:_QUOTE_LIMIT] + "..."
    return f"{type(exc).__name__}: {line}"


def _strip_prefixes(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                stripped = True
    return name


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a CPU state_dict with wrapper prefixes ('module.') stripped.

    Accepts a safetensors file or a torch checkpoint (any format torch.load reads, legacy pickles
    included), holding the state_dict bare or nested under 'state_dict' or 'model'. Torch files are
    always unpickled with weights_only=True, so a file cannot run code.

    Raises:
        UsageError: the file is missing, is not a checkpoint, or holds no state_dict of tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"weights file {file} not found")
    raw: object
    if _is_safetensors(file):
        with optional_import("reading a safetensors weights file"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

        try:
            raw = load_file(str(file), device="cpu")
        except SafetensorError as exc:
            raise UsageError(f"weights file {file} is not a readable safetensors file: {exc}") from exc
    else:
        try:
            raw = torch.load(file, map_location="cpu", weights_only=True)
        # torch.load reports foreign bytes with many exception types (UnpicklingError, RuntimeError,
        # EOFError, UnicodeDecodeError, ...), none of which mean anything but "not a checkpoint".
        except Exception as exc:
            raise UsageError(
                f"weights file {file} is neither a safetensors file nor a torch checkpoint "
                f"loadable with weights_only=True ({describe_torch_load_error(exc)})"
            ) from exc
    while isinstance(raw, Mapping):
        nested = next((raw[k] for k in _NESTING_KEYS if isinstance(raw.get(k), Mapping)), None)
        if nested is None:
            break
        raw = nested
    if not isinstance(raw, Mapping) or not raw:
        raise UsageError(f"weights file {file} holds no state_dict (got {type(raw).__name__})")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise UsageError(
            f"weights file {file} holds no state_dict of tensors: {_names(not_tensors)} are not tensors"
        )
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        state[_strip_prefixes(str(key))] = tensor
    return state


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown}, and {more} more" if more > 0 else shown


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a checkpoint into `model` strictly (see read_state_dict for the accepted formats).

    Checks every name before anything is copied, so a bad file leaves the model untouched.
    BatchNorm `num_batches_tracked` counters may be absent (files from old PyTorch versions lack them).

    Raises:
        UsageError: the file cannot be read, or its keys or shapes do not match the model; the message
            names the missing keys, the unexpected keys and the shape mismatches.
    """
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {tuple(state[k].shape)} vs model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{len(names)} {kind}: {_names(names)}"
        for kind, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if names
    ]
    if problems:
        raise UsageError(
            f"weights file {Path(path)} does not fit {type(model).__name__}: " + "; ".join(problems)
        )
    # The checks above cover everything strict loading would reject; absent num_batches_tracked
    # counters are filled in by BatchNorm itself (the dict carries no version metadata).
    model.load_state_dict(state, strict=True)
