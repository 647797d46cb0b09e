"""Reading model cards from YAML, with errors that name the file, the line and the field."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cardtune.registry.errors import CardError
from cardtune.registry.schema import FamilyCard

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
BUILTIN_CARD_DIR = PACKAGE_ROOT / "configs" / "models"
CARDS_ENV = "CARDTUNE_CARDS"


def card_dirs(extra: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """User card folders first (``--cards``, then ``$CARDTUNE_CARDS``), the built-in folder last."""
    dirs = [Path(d) for d in extra]
    dirs += [Path(p) for p in os.environ.get(CARDS_ENV, "").split(os.pathsep) if p]
    for d in dirs:
        if not d.is_dir():
            raise CardError(f"{d}: card folder does not exist")
    return [*dirs, BUILTIN_CARD_DIR]


def _line_of(node: yaml.Node | None, path: Sequence[str | int]) -> int | None:
    """1-based line of the deepest element along ``path`` present in the YAML tree: the line of
    a mapping key (where a field is written), or of a sequence item."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if k.value == key), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _split_field(field: str | Sequence[str | int]) -> list[str | int]:
    """``"models[1].model_id"`` -> ``["models", 1, "model_id"]``; a sequence is taken as is."""
    if not isinstance(field, str):
        return list(field)
    return [int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", field)]


def field_line(source: str | os.PathLike, field: str | Sequence[str | int]) -> int | None:
    """The 1-based line of ``field`` (``"loader"``, ``"models[1].model_id"``) in the card file
    ``source``, as validation errors count it: a field the file does not write gets the line of
    its nearest written parent (line 1 at the top). None when ``source`` is not a readable YAML
    file (a card registered from Python, ``<python>``)."""
    try:
        root = yaml.compose(Path(source).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return _line_of(root, _split_field(field)) or 1


def field_location(source: str, field: str | Sequence[str | int]) -> str:
    """``FILE:LINE`` of ``field`` in the card file ``source`` (just ``source`` when it has no lines)."""
    line = field_line(source, field)
    return f"{source}:{line}" if line is not None else source


def dotted(path: Sequence[str | int]) -> str:
    """``["models", 1, "model_id"]`` -> ``"models[1].model_id"``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(card)"


def describe(error: dict[str, Any]) -> str:
    """One pydantic error as the words after ``FILE:LINE: field:``."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"expected one of {expected}, got {error['input']!r}"
    msg = error["msg"]
    msg = msg.removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{msg[0].lower()}{msg[1:]}, got {error['input']!r}"
    return msg


def parse_card(text: str, source: str) -> FamilyCard:
    """Validate one card's YAML text; ``source`` names it in errors."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise CardError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise CardError(f"{source}:1: a card is a mapping with 'family', 'model_class' and 'models'")
    try:
        return FamilyCard.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = [p for p in err["loc"] if p not in ("function-after[_one_or_many(), nullable[list[str]]]",)]
            loc += err.get("ctx", {}).get("loc", ())  # a cross-field rule's field (schema.card_rule_error)
            line = _line_of(root, loc)
            lines.append(f"{source}:{line}: {dotted(loc)}: {describe(err)}")
        raise CardError("\n".join(lines)) from None


def load_card_file(path: Path) -> FamilyCard:
    return parse_card(path.read_text(encoding="utf-8"), str(path))


def iter_card_files(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for d in map(Path, dirs):
        files += sorted(p for p in d.glob("*.yaml") if p.is_file())
        files += sorted(p for p in d.glob("*.yml") if p.is_file())
    return files
