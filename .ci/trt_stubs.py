"""Write a mypy-usable copy of the installed tensorrt-stubs into a directory for MYPYPATH.

tensorrt-stubs (installed with --no-deps, see the Makefile) ships `tensorrt/` and `tensorrt_bindings/`
as bare .pyi folders with no py.typed, so mypy skips them and, with ignore_missing_imports, treats
TensorRT as Any: nothing gets checked. The generated stubs also do not parse (parameters named after
keywords such as `in`, a parameter without a default after defaulted ones) and import `tensorrt_libs`,
a runtime-only package. This script copies every .pyi of the distribution into OUT_DIR, rewrites the
`def` lines that do not parse, and replaces imports of modules that exist neither in the stubs nor in
the environment by ModuleType-typed names. OUT_DIR goes on MYPYPATH for one mypy run only: it must
never be on sys.path, where it would make `import tensorrt` succeed without TensorRT.

Usage: python .ci/trt_stubs.py OUT_DIR   (idempotent; unchanged files are not rewritten, so mypy's
cache stays valid; exit 1 with a message when tensorrt-stubs is missing or a line cannot be fixed).
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import keyword
import re
import sys
from pathlib import Path

DISTRIBUTION = "tensorrt-stubs"
_DEF = re.compile(r"^(?P<head>\s*(?:async\s+)?def\s+\w+\s*)\((?P<params>.*)\)(?P<tail>\s*(?:->.*)?:.*)$")
_PLAIN_IMPORT = re.compile(r"^(?P<indent>\s*)import\s+(?P<module>[\w.]+)(?:\s+as\s+(?P<alias>\w+))?\s*$")


class StubError(Exception):
    """The stubs cannot be found or patched; the message says what to do."""


def _split_top_level(text: str) -> list[str]:
    """Split a parameter list on the commas outside brackets and string literals."""
    parts: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts if text.strip() else []


def _fix_params(params: str) -> str:
    """Rename keyword-named parameters and default the required ones that follow a defaulted one."""
    fixed: list[str] = []
    seen_default = False
    keyword_only = False
    for raw in _split_top_level(params):
        param = raw.strip()
        name = re.match(r"\**(\w*)", param)
        assert name is not None  # the pattern matches any string
        if param.startswith("*"):
            # After a bare `*` or `*args`, required parameters are legal (keyword-only).
            keyword_only = True
        elif param != "/":
            if keyword.iskeyword(name.group(1)):
                param = name.group(1) + "_" + param[len(name.group(1)) :]
            annotation_and_default = param.split(":", 1)[-1]
            if "=" in _strip_brackets(annotation_and_default) or ("=" in param and ":" not in param):
                seen_default = True
            elif seen_default and not keyword_only:
                param += " = ..."
        fixed.append(param)
    return ", ".join(fixed)


def _strip_brackets(text: str) -> str:
    """The text with bracketed parts removed, so `=` inside `Literal["a=b"]` is not a default."""
    out: list[str] = []
    depth = 0
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


def _parses(line: str) -> bool:
    try:
        ast.parse(line.strip() + (" ..." if line.rstrip().endswith(":") else ""))
    except SyntaxError:
        return False
    return True


def patch_source(source: str, name: str, importable: set[str]) -> str:
    """The stub `source` (file `name`, for messages) made parseable; raise StubError where it cannot."""
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        match = _DEF.match(line)
        if match and not _parses(line):
            lines[number - 1] = f"{match['head']}({_fix_params(match['params'])}){match['tail']}"
            if not _parses(lines[number - 1]):
                raise StubError(f"{name}:{number}: cannot fix this signature: {line.strip()}")
            continue
        imported = _PLAIN_IMPORT.match(line)
        top = imported["module"].split(".")[0] if imported else ""
        if imported and top not in importable and importlib.util.find_spec(top) is None:
            # A runtime-only package (tensorrt_libs): keep the name, typed as a module.
            bound = imported["alias"] or top
            lines[number - 1] = f"{imported['indent']}import types as _types; {bound}: _types.ModuleType"
    patched = "\n".join(lines) + "\n"
    try:
        ast.parse(patched, filename=name)
    except SyntaxError as exc:
        raise StubError(f"{name}:{exc.lineno}: still not valid Python after patching: {exc.msg}") from exc
    return patched


def installed_stubs() -> dict[Path, str]:
    """Relative path -> text of every .pyi file of the installed tensorrt-stubs distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise StubError(
            f"{DISTRIBUTION} is not installed in {sys.prefix}; install it with "
            f"`{sys.executable} -m pip install --no-deps {DISTRIBUTION}` (or run `make lint`)"
        ) from exc
    stubs = {
        Path(str(file)): Path(str(dist.locate_file(file))).read_text(encoding="utf-8")
        for file in dist.files or []
        if str(file).endswith(".pyi")
    }
    if not any(path.parts[0] == "tensorrt" for path in stubs):
        raise StubError(f"{DISTRIBUTION} {dist.version} has no tensorrt/*.pyi files; reinstall it")
    return stubs


def write_patched(out_dir: Path) -> list[Path]:
    """Write the patched stubs under `out_dir`, drop stale .pyi files there; return those rewritten."""
    stubs = installed_stubs()
    packages = {path.parts[0] for path in stubs}
    written: list[Path] = []
    for relative, source in sorted(stubs.items()):
        target = out_dir / relative
        text = patch_source(source, str(relative), packages)
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".pyi.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(target)
        written.append(relative)
    for stale in out_dir.rglob("*.pyi"):
        if stale.relative_to(out_dir) not in stubs:
            stale.unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: write the patched stubs to the directory given; 1 with a message on failure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to put on MYPYPATH (outside site-packages)")
    args = parser.parse_args(argv)
    try:
        written = write_patched(args.out_dir)
    except StubError as exc:
        print(f"trt_stubs: {exc}", file=sys.stderr)
        return 1
    if written:
        print(f"trt_stubs: wrote {len(written)} patched stub file(s) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
