"""Atomic writes and content hashes shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from deploy.errors import OutputError, UsageError


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def current_umask() -> int:
    """The process umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(target: Path) -> int:
    """The mode a plain open(target, "w") would leave: the old file's, else 0666 less the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Readers never see a half-written file, and a failure leaves any previous file untouched.
    The file gets the mode a plain write would give it (mkstemp's own 0600 would hide it from
    other users after a copy to a device or a shared folder). An OSError while creating,
    writing or renaming (a read-only folder, a full disk, a file where a folder belongs) is an
    OutputError naming `path`.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        # mkstemp names its own random file in the error; the target says more.
        temporary = (exc.filename,) if Path(str(exc.filename)).name.startswith(f".{target.name}.") else ()
        raise OutputError.from_os_error(target, exc, aliases=temporary) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _final_mode(target))
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError.from_os_error(target, exc, aliases=(tmp,)) from exc
    finally:
        tmp.unlink(missing_ok=True)


def ensure_writable_dir(folder: str | os.PathLike[str]) -> None:
    """Create `folder` and prove a file can be written in it, else an OutputError naming it.

    Commands call it before long work (an export, a fine-tuning, a comparison), so an unwritable
    output fails at once instead of after the work.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: cannot write it (not a directory)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".reviewkd-write-test-"):
            pass
    except OSError as exc:
        raise OutputError.from_os_error(folder, exc) from exc


def _shown(path: Path) -> str:
    """`path` for a one-line message: as it is, or quoted with escapes when it holds a line break or
    another character a terminal would act on (names inside a run are the run's, not the user's)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def check_no_link_leaves(run_dir: str | os.PathLike[str], entries: Iterable[str]) -> None:
    """UsageError naming the first symbolic link that resolves outside `run_dir`, among its
    top-level `entries` (names; missing ones are skipped) and everything below those that are folders.

    Every writing command calls it (through deploy.run_lock, with run_layout.WRITTEN_ENTRIES) before
    its first write: a write into a run then never follows a link out of it, whichever of those
    files or folders the command goes on to write, remove or rename (RUN/export linked into another
    run would otherwise have that run's files overwritten; RUN/metrics.jsonl linked to a file
    elsewhere, appended to). Links that stay inside the run are fine; a dangling one is resolved as
    far as it goes. Folders are walked without following links, so each link is judged where it is.
    """
    root = Path(os.path.realpath(run_dir))
    for entry in entries:
        top = root / entry
        paths = [top]
        if top.is_dir() and not top.is_symlink():
            paths += [Path(folder, name) for folder, dirs, files in os.walk(top) for name in (*dirs, *files)]
        for path in paths:
            if not path.is_symlink():
                continue
            target = Path(os.path.realpath(path))
            if not target.is_relative_to(root):
                raise UsageError(
                    f"{_shown(path)}: a symbolic link to {_shown(target)}, outside the run directory"
                    f" {root}; reviewkd writes into a run only inside it, so it refuses to write through"
                    " the link (replace the link with a copy of what it points to)"
                )


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append `line` (and a newline) to the regular file `path`, creating it, and flush it to disk.

    An append writes into the file in place, unlike the atomic writers, which replace it; so it
    refuses a symbolic link (O_NOFOLLOW) and a file with more than one name (a hard link, maybe to a
    file outside the run), and anything but a regular file: OutputError naming `path`.
    """
    target = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "a symbolic link; appends never follow one"
            raise OutputError(f"{target}: cannot write it ({reason})") from exc
        raise OutputError.from_os_error(target, exc) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            what = "not a regular file" if not stat.S_ISREG(info.st_mode) else f"{info.st_nlink} hard links"
            raise OutputError(f"{target}: cannot write it ({what}; appends go only to a file of its own)")
        data = (line + "\n").encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    except OSError as exc:
        raise OutputError.from_os_error(target, exc) from exc
    finally:
        os.close(fd)


# How deep a JSON document this project reads may nest. Its own documents nest 5 levels at most; the
# bound keeps every reader and writer that walks a document (json.dumps among them) far from
# Python's recursion limit, where a hand-made file would end in a RecursionError.
MAX_JSON_DEPTH = 64


def _json_depth(data: Any) -> int:
    """How many arrays and objects deep `data` nests (0 for a scalar), walked without recursion."""
    deepest = 0
    pending = [(data, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:  # one level past the bound is enough to refuse the document
            pending.extend((child, depth + 1) for child in children)
    return deepest


def parse_json(text: str) -> Any:
    """json.loads for files a user hands us: a ValueError, never a RecursionError, for a document
    nested deeper than MAX_JSON_DEPTH (json.JSONDecodeError, also a ValueError, for bad syntax)."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as indented JSON to `path` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


# --- the content hash a stand-alone ONNX file carries ------------------------------------------------

# metadata_props key of an ONNX file's content hash: the sha256 of every other byte of the file's
# ModelProto (graph, weights, opsets, the other metadata), so that a copy travelling without its run
# directory, and so without the manifest's sha256, can still be checked.
ONNX_CONTENT_HASH_KEY = "reviewkd_content_sha256"
# Field numbers of onnx.ModelProto.metadata_props and of StringStringEntryProto.key.
_METADATA_PROPS_FIELD = 14
_ENTRY_KEY_FIELD = 1


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a protobuf varint at `pos`; return it and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _typed_fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int, int, int]]:
    """Protobuf wire-format fields of a message: (field number, wire type, start, payload start, end)."""
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, end = _varint(data, pos)
        elif wire_type == 1:
            end = pos + 8
        elif wire_type == 5:
            end = pos + 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            end = pos + length
        elif wire_type == 3:
            end = _group_end(data, pos, tag >> 3)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if end > len(data):
            raise ValueError("a field runs past the end of the data")
        yield tag >> 3, wire_type, start, pos, end
        pos = end


def _group_end(data: bytes | memoryview, pos: int, number: int) -> int:
    """The position after the end-group tag closing the group `number` whose fields start at `pos`
    (the deprecated group encoding, which protobuf still reads in unknown fields); nested groups are
    counted without recursion."""
    open_groups = [number]
    while open_groups:
        tag, pos = _varint(data, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 3:
            open_groups.append(tag >> 3)
        elif wire_type == 4 and open_groups[-1] == tag >> 3:
            open_groups.pop()
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} or an unmatched group")
        if pos > len(data):
            raise ValueError("a group runs past the end of the data")
    return pos


def _fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Protobuf wire-format fields of a message: (field number, start, payload start, end)."""
    for number, _, start, payload, end in _typed_fields(data):
        yield number, start, payload, end


def _is_content_hash_entry(entry: bytes) -> bool:
    return any(
        number == _ENTRY_KEY_FIELD and entry[payload:end] == ONNX_CONTENT_HASH_KEY.encode()
        for number, _, payload, end in _fields(entry)
    )


def onnx_content_sha256(data: bytes) -> tuple[str, str | None]:
    """Return (sha256 of an ONNX file's bytes without its content-hash entry, the hash it records).

    Reads the protobuf wire format directly, so it needs neither onnx nor protobuf; the recorded
    hash is None when the file carries none. ValueError if the bytes are not a protobuf message.
    """
    digest = hashlib.sha256()
    recorded: str | None = None
    for number, start, payload, end in _fields(data):
        if number == _METADATA_PROPS_FIELD and _is_content_hash_entry(data[payload:end]):
            for field, _, value_start, value_end in _fields(data[payload:end]):
                if field == 2:
                    recorded = data[payload:end][value_start:value_end].decode("ascii", "replace")
            continue
        digest.update(data[start:end])
    return digest.hexdigest(), recorded


def verify_onnx_content(path: str | os.PathLike[str]) -> None:
    """Check a stand-alone ONNX file against the content hash export stored in it; UsageError if
    it carries none, its bytes changed since, or it keeps weights in other files (external data)."""
    file = Path(path)
    data = file.read_bytes()
    try:
        actual, recorded = onnx_content_sha256(data)
    except ValueError as exc:
        raise UsageError(f"{file}: not an ONNX file ({exc})") from exc
    if recorded is None:
        raise UsageError(
            f"{file}: no run manifest lists it and it carries no content hash ({ONNX_CONTENT_HASH_KEY})"
            " to check it by; keep it in its run directory (RUN/export/) or pass the run directory"
        )
    if actual != recorded:
        raise UsageError(
            f"{file}: content sha256 {actual[:12]}… does not match the {recorded[:12]}… recorded at"
            " export; the graph, weights or metadata changed after export"
        )
    check_self_contained_onnx(file, data)


# --- external data: weights an ONNX file keeps in other files ------------------------------------------

# Where ONNX's schema keeps tensors: message kind -> {field number: the kind of message it holds}.
# A tensor sits in a graph's initializers, a node attribute's value, a sparse tensor, a function's
# nodes or a training graph, at any depth of subgraphs (an If's branches, a Loop's body).
_ONNX_MESSAGES: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "function": {7: "node", 11: "attribute"},
    "training": {1: "graph", 2: "graph"},
}
_TENSOR_NAME_FIELD = 8
_TENSOR_EXTERNAL_DATA_FIELD = 13
_TENSOR_DATA_LOCATION_FIELD = 14
_DATA_LOCATION_EXTERNAL = 1


def onnx_external_tensors(data: bytes) -> list[str]:
    """The names of the tensors of an ONNX file (its bytes) that keep their data in another file.

    Reads the protobuf wire format directly (no onnx, no protobuf), walking every place the schema
    keeps a tensor without recursion, so no nesting exhausts the stack. ValueError if the bytes are
    not a protobuf message.
    """
    found: list[str] = []
    pending: list[tuple[str, memoryview]] = [("model", memoryview(data))]
    while pending:
        kind, message = pending.pop()
        if kind != "tensor":
            children = _ONNX_MESSAGES[kind]
            pending.extend(
                (children[number], message[payload:end])
                for number, wire_type, _, payload, end in _typed_fields(message)
                if wire_type == 2 and number in children
            )
            continue
        name, external = "", False
        for number, wire_type, _, payload, end in _typed_fields(message):
            if number == _TENSOR_NAME_FIELD and wire_type == 2:
                name = bytes(message[payload:end]).decode("utf-8", "replace")
            elif number == _TENSOR_EXTERNAL_DATA_FIELD and wire_type == 2:
                external = True
            elif number == _TENSOR_DATA_LOCATION_FIELD and wire_type == 0:
                external |= _varint(message, payload)[0] == _DATA_LOCATION_EXTERNAL
        if external:
            found.append(name)
    return found


def check_self_contained_onnx(path: str | os.PathLike[str], data: bytes) -> None:
    """UsageError naming `path` unless the ONNX file whose bytes are `data` holds all its weights.

    A sha256 of the .onnx file (the manifest's, or the content hash inside it) covers that file
    alone: weights kept as external data in other files could change unnoticed. Export writes every
    file self-contained, so reviewkd runs no file with external data. Bytes that are no protobuf
    message pass: no runtime loads them (nor any external data they name), and the loader that
    tries says so in its own words.
    """
    try:
        external = onnx_external_tensors(data)
    except ValueError:
        return
    if external:
        raise UsageError(
            f"{path}: {len(external)} tensor(s) ({external[0]!r} first) keep their data in another file"
            " (ONNX external data), which no sha256 covers; reviewkd runs only self-contained ONNX"
            " files, as export writes them"
        )
