"""Imports sit at the top of their module; inside a function only an optional dependency is imported, and
only through deploy.optional.optional_import (docs/METHOD.md section 4).

An AST scan of the four packages, so that neither a cycle nor a slow import hides in a function again.
A project module counts as an optional dependency when it imports one at its top, directly or through
other project modules (the edge install's commands must start without the training stack), but only for
a module that does not import that dependency already: the training stack imports torch, so inside it a
function-local import of another training module would only hide a cycle.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from deploy.optional import ADAPTERS, INSTALL_HINTS
from tests.helpers import REPO_ROOT

PACKAGES = ("reviewkd", "export", "deploy", "benchmarks")
HELPER = "optional_import"


def _module_files() -> dict[str, Path]:
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


MODULES = _module_files()


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_names(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """Every module `node` imports: the named ones, their parent packages, and a `from` import's
    names that are submodules."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
    names = []
    for target in targets:
        parts = target.split(".")
        names += [".".join(parts[: i + 1]) for i in range(len(parts))]
    return names


def _walk(tree: ast.AST, in_function: bool = False, parents: tuple[ast.AST, ...] = ()):
    """(import node, whether it sits in a function, its ancestors) for every import in `tree`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, in_function, (*parents, tree)
        nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _walk(child, nested, (*parents, tree))


@cache
def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"))


@cache
def _top_level_imports(module: str) -> frozenset[str]:
    """What importing `module` imports at once (its TYPE_CHECKING block aside)."""
    return frozenset(
        name
        for node, in_function, parents in _walk(_tree(module))
        if not in_function and not any(_is_type_checking(p) for p in parents)
        for name in _imported_names(node, module)
    )


def _optional_dependencies(name: str, seen: frozenset[str] = frozenset()) -> frozenset[str]:
    """The optional dependencies that importing `name` imports."""
    if name.split(".")[0] in INSTALL_HINTS:
        return frozenset({name.split(".")[0]})
    if name in ADAPTERS:
        return frozenset({ADAPTERS[name]})
    if name not in MODULES or name in seen:
        return frozenset()
    return frozenset().union(
        *(_optional_dependencies(imported, seen | {name}) for imported in _top_level_imports(name))
    )


def _imported_at_the_top(module: str) -> frozenset[str]:
    """The optional dependencies `module`'s own top imports (an adapter's lazy one aside)."""
    if module not in MODULES:
        return frozenset()
    return frozenset().union(
        *(_optional_dependencies(name, frozenset({module})) for name in _top_level_imports(module))
    )


def _inside_helper(parents: tuple[ast.AST, ...]) -> bool:
    owner = parents[-1]
    return isinstance(owner, ast.With) and any(
        isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func).endswith(HELPER)
        for item in owner.items
    )


def _violations(module: str, tree: ast.Module, where: str) -> list[str]:
    found = []
    for node, in_function, parents in _walk(tree):
        if not in_function:
            continue
        line = f"{where}:{node.lineno}: {ast.unparse(node)}"
        names = _imported_names(node, module)
        # `from package import name`: the submodule when `name` is one, else the package.
        leaves = names if isinstance(node, ast.Import) else [n for n in names if n in MODULES] or names
        # Lazy only for what it brings: an optional dependency this module does not import already.
        brings = frozenset().union(*map(_optional_dependencies, leaves)) - _imported_at_the_top(module)
        if not brings:
            found.append(f"{line} (no optional dependency this module lacks: import it at the top)")
        elif not _inside_helper(parents):
            found.append(f"{line} (an optional dependency: import it inside `with {HELPER}(...)`)")
    return found


def test_function_local_imports_are_optional_dependencies_through_the_helper() -> None:
    found = [
        line
        for module, path in MODULES.items()
        for line in _violations(module, _tree(module), str(path.relative_to(REPO_ROOT)))
    ]
    assert found == []


def test_helper_bodies_hold_imports_only() -> None:
    # The helper turns any ModuleNotFoundError of an optional module into exit 3: a body that also
    # runs code would hide that code's own missing imports behind the same message.
    bodies = [
        f"{path.relative_to(REPO_ROOT)}:{node.lineno}"
        for module, path in MODULES.items()
        for node in ast.walk(_tree(module))
        if _inside_helper((node,)) and not all(isinstance(s, ast.Import | ast.ImportFrom) for s in node.body)
    ]
    assert bodies == []


SAMPLE = """
import json
from deploy.optional import optional_import

def late():
    import yaml
    from deploy.manifest import read_manifest
    import onnxruntime
    with optional_import("x"):
        import torch
        from reviewkd.engine import fit
        from deploy import manifest
"""


def test_the_scan_refuses_what_it_must() -> None:
    # The rules on a known sample, so that a scan that finds nothing cannot pass by seeing nothing.
    found = _violations("deploy.sample", ast.parse(SAMPLE), "sample.py")
    assert [line.split(" (")[0] for line in found] == [
        "sample.py:6: import yaml",
        "sample.py:7: from deploy.manifest import read_manifest",
        "sample.py:8: import onnxruntime",
        "sample.py:12: from deploy import manifest",
    ]
    assert "inside `with optional_import" in found[2]


def test_each_adapter_imports_its_dependency_inside_its_functions() -> None:
    # An adapter counts as its dependency only while it drives it: a stale entry would excuse a lazy
    # import of a module that no longer needs to be lazy.
    for module, dependency in ADAPTERS.items():
        lazy = {
            name.split(".")[0]
            for node, in_function, _ in _walk(_tree(module))
            if in_function
            for name in _imported_names(node, module)
        }
        assert dependency in lazy, module
