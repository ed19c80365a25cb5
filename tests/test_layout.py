"""The house rules, checked on the source: one folder-to-import rule, layers that only import
downward, no import cycle between packages, and no private name imported across packages.

Imports are read with `ast` from every module, including imports inside functions (a lazy import
upward is still an upward dependency)."""

from __future__ import annotations

import ast
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom up. A package may import its own layer and the layers below it, never above.
LAYERS = [
    {"core"},
    {"runtime", "targets"},
    {"frontend"},
    {"passes"},
    {"backends"},
    {"drivers"},
    {"cli"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def package_dirs() -> dict[str, str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config["package-dir"]


def test_every_top_level_folder_x_is_splitc_x():
    mapping = package_dirs()
    assert mapping.pop("splitc") == "splitc"
    for name, folder in mapping.items():
        assert name == f"splitc.{folder}", f"{name} is installed from {folder}/: the rule is folder X -> splitc.X"
    assert set(mapping.values()) == set(RANK), "every package has a layer, and every layer a package"
    # splitc/ holds the public API only: nothing else to map there.
    assert sorted(p.name for p in (ROOT / "splitc").glob("*.py")) == ["__init__.py"]
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {"splitc"} | {
        "splitc." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in mapping.values() for init in (ROOT / folder).rglob("__init__.py")
    }
    assert on_disk == declared, f"pyproject lists {sorted(declared ^ on_disk)} differently from the folders"


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in package_dirs().items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((name, *parts))] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [a.name for a in node.names], node.lineno))
    return out


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "splitc" and len(parts) > 1 else None


def splitc_imports():
    for module, path in modules().items():
        for target, names, line in imports_of(module, path):
            if target == "splitc" or target.startswith("splitc."):
                yield module, path, target, names, line


def test_nothing_imports_upward():
    upward = []
    for module, path, target, _, line in splitc_imports():
        source, dest = package_of(module), package_of(target)
        if source is None or dest is None or source == dest:
            continue
        if RANK[dest] > RANK[source]:
            upward.append(f"{path.relative_to(ROOT)}:{line} ({source}) imports {target} ({dest})")
    assert upward == []


def test_no_import_cycle_between_packages():
    edges = defaultdict(set)
    for module, _, target, _, _ in splitc_imports():
        source, dest = package_of(module), package_of(target)
        if source and dest and source != dest:
            edges[source].add(dest)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in list(edges):
        if node not in state:
            visit(node, [])


def test_no_private_name_imported_across_packages():
    private = []
    for module, path, target, names, line in splitc_imports():
        if package_of(module) == package_of(target):
            continue
        leaked = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if leaked or any(part.startswith("_") and not part.startswith("__") for part in target.split(".")):
            private.append(f"{path.relative_to(ROOT)}:{line} imports {', '.join(leaked) or target} from {target}")
    assert private == []


def test_the_layering_check_sees_a_violation(tmp_path):
    """The checks read real imports: an upward one in a module's function body is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from splitc.cli import main\n")
    found = imports_of("splitc.core.probe", path)
    assert ("splitc.cli", ["main"], 2) in found
    assert RANK[package_of(found[0][0])] > RANK["core"]
