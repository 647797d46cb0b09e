"""The layers of ../shared/DESIGN.md, "Layers (what may import what)", checked on the source:
a module imports only units (packages or modules) of its own layer and of layers below it. The
units DESIGN.md does not name sit where their imports put them: the small helpers every layer
uses at the bottom, ``evaluation`` beside ``training`` (it renders prompts as training encodes
them), and ``report`` above both (it reads what a run wrote and what evaluation scored)."""

from __future__ import annotations

import ast
from pathlib import Path

import cardtune

LAYERS: list[set[str]] = [
    {"conversation", "errors", "quiet", "demo", "hashing"},
    {"registry", "supported_models"},
    {"chat"},
    {"loaders"},
    {"collators"},
    {"data", "datasets"},
    {"training", "evaluation", "checks", "scaffold", "inputs", "fetch"},
    {"report"},
    {"commands", "cli", "train", "__main__", "__init__"},
]


def _unit(path: Path, root: Path) -> str:
    return path.relative_to(root).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, name.split(".")[1]) for name in names if name.startswith("cardtune.")]
    return found


def test_every_unit_has_a_layer() -> None:
    root = Path(cardtune.__file__).parent
    units = {_unit(p, root) for p in root.rglob("*.py")}
    placed = set().union(*LAYERS)
    assert units - placed == set(), "a new module or package: give it its layer here (and say why in its docstring)"


def test_no_module_imports_a_layer_above_its_own() -> None:
    root = Path(cardtune.__file__).parent
    layer_of = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
    upward = []
    for path in sorted(root.rglob("*.py")):
        unit = _unit(path, root)
        for line, imported in _imports(path):
            if layer_of.get(imported, -1) > layer_of[unit]:
                upward.append(f"{path.relative_to(root.parent)}:{line} ({unit}) imports cardtune.{imported}")
    assert upward == []
