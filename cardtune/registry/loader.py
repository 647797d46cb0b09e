"""Reading model cards from YAML, with errors that name the file, the line and the field.

:func:`load_yaml` is how every YAML file a user writes is read (model cards, training recipes,
data mixes): plain data only. A duplicate key, an anchor or alias, or a tag beyond YAML's plain
types is an error at its line, as are bytes that are not UTF-8.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cardtune.registry.errors import CardError, InputFileError
from cardtune.registry.schema import FamilyCard, FamilyEntries

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
        data, root = load_yaml(text, source)
    except InputFileError as exc:
        raise CardError(str(exc)) from None
    if not isinstance(data, dict):
        raise CardError(f"{source}:1: a card is a mapping with 'family', 'model_class' and 'models'")
    try:
        return FamilyCard.model_validate(data)
    except ValidationError as exc:
        raise CardError(validation_lines(exc, root, source)) from None


def validation_lines(exc: ValidationError, root: yaml.Node | None, source: str) -> str:
    """A pydantic error on data read by :func:`load_yaml`, one ``FILE:LINE: field: message`` a line."""
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if p not in ("function-after[_one_or_many(), nullable[list[str]]]",)]
        loc += err.get("ctx", {}).get("loc", ())  # a cross-field rule's field (schema.card_rule_error)
        line = _line_of(root, loc)
        lines.append(f"{source}:{line}: {dotted(loc)}: {describe(err)}")
    return "\n".join(lines)


# -- YAML a user writes -----------------------------------------------------------------------
PLAIN_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "timestamp", "seq", "map")
)
"""What a card, a recipe or a data mix holds: YAML's plain scalars, lists and mappings."""


class _NotPlainData(yaml.YAMLError):
    def __init__(self, node_or_mark: Any, what: str) -> None:
        mark = getattr(node_or_mark, "start_mark", node_or_mark)
        self.line = mark.line + 1
        self.what = what


MAX_DEPTH = 32
"""Lists and mappings inside each other a card, recipe or mix may hold: they use a few; a
thousand would end YAML's recursive composer in a RecursionError."""
MAX_DIGITS = 100
"""Digits of a number: Python refuses to read an integer of more than 4300 (a ValueError)."""


class _PlainDataLoader(yaml.SafeLoader):
    """Refuses anchors and aliases while composing: an alias repeats a node by reference, so a
    1 KB file of nested aliases becomes gigabytes once something copies the data. Refuses
    nesting deeper than :data:`MAX_DEPTH` at its line, before the composer's recursion is deep."""

    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _NotPlainData(event, f"alias *{event.anchor}: anchors and aliases are not allowed; write the value out")
        if getattr(event, "anchor", None) is not None:
            raise _NotPlainData(event, f"anchor &{event.anchor}: anchors and aliases are not allowed; write the value out")
        if self.depth >= MAX_DEPTH:
            raise _NotPlainData(event, f"lists and mappings nested more than {MAX_DEPTH} levels deep: not a value "
                                       "this file takes")
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _check_plain(node: yaml.Node, path: list[str | int]) -> None:
    """Every tag plain, every mapping key a scalar written once."""
    if node.tag not in PLAIN_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _NotPlainData(node, f"{dotted(path)}: tag {tag} is not allowed: only plain data (text, numbers, "
                                  "true/false, lists, mappings); remove the tag")
    if node.tag.endswith((":int", ":float")) and len(node.value) > MAX_DIGITS:
        raise _NotPlainData(node, f"{dotted(path)}: a number written with {len(node.value)} characters: not a value "
                                  "this file takes")
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_plain(item, [*path, i])
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode):
                raise _NotPlainData(key, f"{dotted(path)}: a key is a name, not a list or mapping")
            _check_plain(key, path)
            name = (key.tag, key.value)
            if name in first_line:
                raise _NotPlainData(key, f"{dotted([*path, key.value])}: duplicate key (first at line {first_line[name]})")
            first_line[name] = key.start_mark.line + 1
            _check_plain(value, [*path, key.value])


def load_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """The data of one YAML document a user wrote, and its node tree (for field lines).
    Raises :class:`InputFileError` ``FILE:LINE: ...`` for anything but plain data written once:
    a duplicate key (YAML would keep the last one silently), an anchor or alias, a tag such as
    ``!!python/object``, or a syntax error."""
    loader = _PlainDataLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_plain(root, [])
        return loader.construct_document(root), root
    except _NotPlainData as exc:
        raise InputFileError(f"{source}:{exc.line}: {exc.what}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise InputFileError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    finally:
        loader.dispose()


def read_text(path: str | os.PathLike) -> str:
    """A file a user wrote, as text: UTF-8 (a leading byte-order mark dropped). Other bytes are
    an :class:`InputFileError` naming the line and column of the first one."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path}:{not_utf8(raw, exc.start)}; save the file as UTF-8") from None


def not_utf8(data: bytes, start: int) -> str:
    """``LINE: not UTF-8 text: byte 0x.. at column C (byte offset N)`` for the bad byte at
    ``start`` of ``data`` (a ``UnicodeDecodeError``'s ``start``)."""
    line = data.count(b"\n", 0, start) + 1
    column = start - (data.rfind(b"\n", 0, start) + 1) + 1
    return f"{line}: not UTF-8 text: byte 0x{data[start]:02x} at column {column} (byte offset {start})"


def load_card_file(path: Path) -> FamilyCard:
    try:
        text = read_text(path)
    except InputFileError as exc:
        raise CardError(str(exc)) from None
    return parse_card(text, str(path))


ENTRY_KEYS = frozenset({"family", "models"})


def load_card_or_entries(path: Path) -> FamilyCard | FamilyEntries:
    """A card file, or an entries file: only ``family`` and ``models``, adding model ids to a
    family whose card is defined in another file."""
    try:
        text = read_text(path)
        data, root = load_yaml(text, str(path))
    except InputFileError as exc:
        raise CardError(str(exc)) from None
    if isinstance(data, dict) and data and set(data) <= ENTRY_KEYS and "models" in data:
        try:
            return FamilyEntries.model_validate(data)
        except ValidationError as exc:
            raise CardError(validation_lines(exc, root, str(path))) from None
    return parse_card(text, str(path))


def iter_card_files(dirs: Iterable[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for d in map(Path, dirs):
        files += sorted(p for p in d.glob("*.yaml") if p.is_file())
        files += sorted(p for p in d.glob("*.yml") if p.is_file())
    return files
