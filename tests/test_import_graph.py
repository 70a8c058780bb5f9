"""The package's dependency direction, checked on its source (docs/ARCHITECTURE.md).

    numerics  <-  metrics, kernels, records, data_utils, version  <-  routers  <-  families  <-  cards
    <-  modeling  <-  sharding  <-  patching, export, reporting  <-  distillation  <-  trainers
    <-  scripts  <-  experiments  <-  cli

A module may import a module of its own part or of a part further left; never one to its right.
Imports inside functions count as much as top-level ones (a late import hides a cycle, it does not
remove it); only ``if TYPE_CHECKING:`` blocks are left out. The package root (``__init__``) is the
public facade and sits above everything: no module imports names from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hf_moe_routers"
PACKAGE = "hf_moe_routers"

#: Each part of the package and its layer; a part may import parts of a lower layer only.
LAYERS: dict[str, int] = {
    "version": 1,
    "numerics": 0,
    "_import_hooks": 0,  # the import watcher of the root's lazy registration: imports nothing of ours
    "records": 1,
    "data_utils": 1,
    "metrics": 1,
    "kernels": 1,
    "routers": 2,
    "families": 3,
    "cards": 4,
    "modeling": 5,
    "sharding": 6,
    "patching": 7,
    "export": 7,
    "reporting": 7,
    "distillation": 8,
    "trainers": 9,
    "scripts": 10,
    "experiments": 11,
    "cli": 12,
    "__main__": 13,
    "": 14,  # the package root
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _part(module: str) -> str:
    """The part a dotted module name belongs to: ``hf_moe_routers.modeling.base`` -> ``modeling``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of a package module in ``path``.

    ``from . import name`` resolves to the submodule ``name`` when there is one, so importing a
    sibling module counts against that module, not against the package's ``__init__``.
    """
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for n in ast.walk(node)
    }
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [
                (alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == PACKAGE
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                as_path = PACKAGE_DIR.parent.joinpath(*submodule.split("."))
                is_submodule = as_path.with_suffix(".py").is_file() or (as_path / "__init__.py").is_file()
                found.append((submodule if is_submodule else target, node.lineno))
    return found


def _source_files() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(_module_name(path)) for path in _source_files()}
    assert parts <= set(LAYERS), f"give these parts a layer in LAYERS: {sorted(parts - set(LAYERS))}"


@pytest.mark.parametrize("path", _source_files(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_imports_point_down_the_layers(path):
    module = _module_name(path)
    part = _part(module)
    wrong = [
        f"line {line}: {module} imports {target} ({_part(target) or 'the package root'})"
        for target, line in _imports(path)
        if _part(target) != part and LAYERS[_part(target)] >= LAYERS[part]
    ]
    assert not wrong, "imports against the dependency direction:\n" + "\n".join(wrong)


def test_the_checker_sees_a_violation(tmp_path):
    """The rule is not vacuous: an upward import (late, inside a function) is reported."""
    fake_dir = tmp_path / PACKAGE
    (fake_dir / "modeling").mkdir(parents=True)
    (fake_dir / "trainers").mkdir()
    (fake_dir / "__init__.py").write_text("")
    (fake_dir / "trainers" / "__init__.py").write_text("")
    (fake_dir / "modeling" / "__init__.py").write_text("")
    source = fake_dir / "modeling" / "base.py"
    source.write_text("def save():\n    from ..trainers import trainer\n")
    globals()["PACKAGE_DIR"] = fake_dir
    try:
        assert _imports(source) == [("hf_moe_routers.trainers", 2)]
        with pytest.raises(AssertionError, match="modeling.base imports hf_moe_routers.trainers"):
            test_imports_point_down_the_layers(source)
    finally:
        globals()["PACKAGE_DIR"] = Path(__file__).resolve().parent.parent / PACKAGE
