"""Every option ``train.py`` takes, known without importing torch: cardtune's own (the argument
dataclasses) and ``transformers.TrainingArguments``' fields, read from the source file of the
installed transformers (its module imports torch, several seconds; its source parses in 20 ms).
From the table come the help, grouped by task with cardtune's options first, the check that
every option written on the command line or in a recipe exists, and the type every value must
have (:mod:`cardtune.training.values`). The option strings are exactly the ones
``HfArgumentParser`` makes of the same fields (tested).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import shutil
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_DEFAULT = object()
"""A default the table cannot tell without importing its module (a name, a call)."""

SCALARS = {"bool": bool, "int": int, "float": float, "str": str, "dict": dict, "list": list}


@dataclass(frozen=True)
class Option:
    """One option: its field name, what its values may be, its help and its group."""

    name: str
    types: frozenset[type]
    """The Python types a value may have (``type(None)`` when it may be unset)."""
    choices: tuple[Any, ...] = ()
    """The values allowed, when the field is an enum or a ``Literal``."""
    item: type | None = None
    """A list's item type."""
    default: Any = NO_DEFAULT
    help: str = ""
    group: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def is_bool(self) -> bool:
        return bool in self.types and not self.types - {bool, type(None)}

    @property
    def option_strings(self) -> list[str]:
        """``--name``, ``--name-with-dashes`` and the aliases, as HfArgumentParser makes them."""
        strings = [f"--{self.name}"]
        if "_" in self.name:
            strings.append(f"--{self.name.replace('_', '-')}")
        return strings + list(self.aliases)

    @property
    def negation(self) -> list[str]:
        """``--no_name``: a boolean option that defaults to true can be turned off without a value."""
        if self.is_bool and self.default is True:
            return [f"--no_{self.name}", f"--no-{self.name.replace('_', '-')}"]
        return []

    def metavar(self) -> str:
        if self.choices:
            return "{" + ",".join(str(c) for c in self.choices) + "}"
        if self.is_bool:
            return "[true|false]"
        if list in self.types:
            return f"{(self.item or str).__name__.upper()} [...]"
        named = [t for t in (int, float, str, dict) if t in self.types]
        return named[0].__name__.upper() if named else "VALUE"


# -- reading a dataclass field's annotation ------------------------------------------------------
def _union(node: ast.expr) -> Iterator[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        yield from _union(node.left)
        yield from _union(node.right)
    else:
        yield node


def read_annotation(text: str, enums: dict[str, tuple[str, ...]]) -> tuple[frozenset[type], tuple[Any, ...], type | None]:
    """(types, choices, list item type) of an annotation written as text (``int | None``,
    ``Literal["error", "skip"]``, ``IntervalStrategy | str``). An enum in a union with ``str``
    takes only the enum's values, as HfArgumentParser parses it."""
    types: set[type] = set()
    choices: tuple[Any, ...] = ()
    item: type | None = None
    for part in _union(ast.parse(text, mode="eval").body):
        if isinstance(part, ast.Constant) and part.value is None:
            types.add(type(None))
        elif isinstance(part, ast.Name) and part.id in SCALARS:
            types.add(SCALARS[part.id])
        elif isinstance(part, ast.Name) and part.id == "Any":
            types.add(object)
        elif isinstance(part, ast.Name) and part.id in enums:
            choices = enums[part.id]
            types.add(str)
        elif isinstance(part, ast.Subscript) and isinstance(part.value, ast.Name):
            outer = part.value.id
            if outer == "Literal":
                values = ast.literal_eval(part.slice)
                values = values if isinstance(values, tuple) else (values,)
                if all(isinstance(v, bool) for v in values):
                    types.add(bool)
                else:
                    choices = tuple(values)
                    types.update(type(v) for v in values)
            elif outer in SCALARS:
                types.add(SCALARS[outer])
                if outer == "list" and isinstance(part.slice, ast.Name):
                    item = SCALARS.get(part.slice.id, str if part.slice.id in enums else None)
        else:
            types.add(object)  # a class of its own (ParallelismConfig): its own code checks it
    if choices and str in types and len(types - {type(None)}) > 1:
        types = {str, *(types & {type(None)})}
    return frozenset(types), choices, item


# -- cardtune's own options ----------------------------------------------------------------------
GROUPS = {
    "ModelArguments": "model",
    "DataArguments": "data",
    "TuneArguments": "what to train",
    "MoEArguments": "MoE-tuning (docs/MOE.md; a recipe's moe: section)",
    "PreferenceArguments": "preference tuning (--method dpo; docs/PREFERENCE.md)",
    "RunArguments": "output",
}
TRAINER_GROUP = "Trainer options (transformers.TrainingArguments)"
OUTPUT_GROUP = "output"
CONFIG_HELP = ("a recipe YAML (configs/train/) holding any of these options; the command line overrides it, and it "
               "overrides the demo's own recipe (applied only to a loader: demo model)")

TRAINER_HELP = {
    "output_dir": "where the run writes its checkpoints and final model (default: out/<model_id>; with --model_path "
                  "alone, out/<the folder's name>)",
    "resume_from_checkpoint": "a checkpoint folder to continue from, or auto: the latest complete checkpoint in "
                              "--output_dir (a fresh start when there is none)",
    "ddp_find_unused_parameters": "DDP searches the autograd graph for unused parameters after every forward (default: "
                                  "false: cardtune makes every trainable parameter take part in every step)",
    "dataloader_num_workers": "data-loading processes (default: on a GPU, the CPU cores per training process minus "
                              "one, at most 4; on CPU none)",
    "report_to": "where the logs go: tensorboard, wandb, ..., none (default: tensorboard when installed, else none)",
    "logging_nan_inf_filter": "log a NaN or infinite loss as the mean of the window so far (default: false: a run "
                              "stops at a loss that is not finite, and its logs say so)",
}
"""TrainingArguments' fields that cardtune settles or gives a meaning to: their help says so."""
IN_OUTPUT_GROUP = ("output_dir", "resume_from_checkpoint")


@functools.cache
def cardtune_options() -> tuple[Option, ...]:
    from cardtune.training.arguments import ARGUMENT_CLASSES

    out = []
    for cls in ARGUMENT_CLASSES:
        hints = {k: str(v) for k, v in cls.__annotations__.items()}  # text: from __future__ import annotations
        for f in dataclasses.fields(cls):
            types, choices, item = read_annotation(hints[f.name], {})
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else NO_DEFAULT)
            out.append(Option(f.name, types, choices, item, default, f.metadata.get("help", ""), GROUPS[cls.__name__],
                              tuple(f.metadata.get("aliases", ()))))
    return tuple(out)


# -- TrainingArguments' options, from transformers' source ---------------------------------------
def _transformers_file(name: str) -> Path:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("transformers is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / name


def _enums(*files: str) -> dict[str, tuple[str, ...]]:
    """Enum classes of transformers' modules: name -> the string values of their members."""
    found: dict[str, tuple[str, ...]] = {}
    for name in files:
        for node in ast.parse(_transformers_file(name).read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and any("Enum" in ast.unparse(b) for b in node.bases):
                found[node.name] = tuple(
                    s.value.value for s in node.body
                    if isinstance(s, ast.Assign) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str))
    return found


def _literal(node: ast.expr | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else NO_DEFAULT
    except ValueError:
        return NO_DEFAULT


@functools.cache
def trainer_options() -> tuple[Option, ...]:
    """``TrainingArguments``' fields as options, from ``transformers/training_args.py``."""
    enums = _enums("trainer_utils.py", "training_args.py", "debug_utils.py")
    tree = ast.parse(_transformers_file("training_args.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments")
    out = []
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        call = node.value
        keywords = {k.arg: k.value for k in call.keywords} if isinstance(call, ast.Call) else {}
        if isinstance(keywords.get("init"), ast.Constant) and keywords["init"].value is False:
            continue
        metadata = keywords.get("metadata")
        meta = {}
        if isinstance(metadata, ast.Dict):
            meta = {_literal(k): v for k, v in zip(metadata.keys, metadata.values, strict=True)}
        help_text = _literal(meta.get("help"))
        types, choices, item = read_annotation(ast.unparse(node.annotation), enums)
        given = _literal(meta.get("choices"))
        if isinstance(given, list):
            choices = tuple(given)
        if "default_factory" in keywords:
            default = NO_DEFAULT if not isinstance(keywords["default_factory"], ast.Name) else (
                [] if keywords["default_factory"].id == "list" else NO_DEFAULT)
        else:
            default = _literal(keywords.get("default")) if isinstance(call, ast.Call) else _literal(call)
        name = node.target.id
        group = OUTPUT_GROUP if name in IN_OUTPUT_GROUP else TRAINER_GROUP
        help_text = TRAINER_HELP.get(name, help_text if isinstance(help_text, str) else "")
        aliases = _literal(meta.get("aliases")) if "aliases" in meta else ()
        aliases = (aliases,) if isinstance(aliases, str) else aliases if isinstance(aliases, (list, tuple)) else ()
        out.append(Option(name, types, choices, item, default, help_text, group, tuple(aliases)))
    return tuple(out)


def all_options() -> dict[str, Option]:
    """Every option by field name, cardtune's first."""
    return {o.name: o for o in (*cardtune_options(), *trainer_options())}


def option_strings() -> set[str]:
    """Every string the command line may name an option by."""
    strings = {"--config", "-h", "--help"}
    for option in all_options().values():
        strings.update(option.option_strings, option.negation)
    return strings


# -- the command line before anything heavy loads ------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage and exit
        from cardtune.training.arguments import ArgumentError

        raise ArgumentError(message)


@functools.cache
def light_parser() -> argparse.ArgumentParser:
    """Every option taking any number of values, no types: what is named, and by what."""
    parser = _Parser(prog="train.py", add_help=False, allow_abbrev=False)
    parser.add_argument("--config", nargs="*")
    for option in all_options().values():
        parser.add_argument(*option.option_strings, dest=option.name, nargs="*")
        if option.negation:
            parser.add_argument(*option.negation, dest=option.name, action="store_const", const=["false"])
    return parser


def given_options(argv: Sequence[str]) -> dict[str, list[str]]:
    """The options ``argv`` names (field name -> its values as typed); an option that does not
    exist is an :class:`ArgumentError` naming the closest ones."""
    from cardtune.training.arguments import ArgumentError, close_names

    namespace, unknown = light_parser().parse_known_args(list(argv))
    if unknown:
        option = next((u for u in unknown if u.startswith("-")), unknown[0])
        if not option.startswith("-"):
            raise ArgumentError(f"{option}: train.py takes options only (--name value), not {option!r}")
        raise ArgumentError(f"unknown option {option}{close_names(option.split('=')[0], set(all_options()))}")
    return {k: v for k, v in vars(namespace).items() if v is not None}


# -- help -----------------------------------------------------------------------------------------
USAGE = """usage: train.py --model_id ID [--config RECIPE.yaml] [--data_path DATA] [--image_folder DIR] [options]

Finetune a registered model (`cardtune list`) on conversations and images; docs/TRAINING.md.
  python train.py --model_id tiny-llava-demo          the embedded demo: no download, a minute on CPU
  python train.py --config configs/train/lora.yaml --model_id llava-1.5-7b --data_path d.json --image_folder imgs/
Every option may also be a key of a --config recipe; the command line wins over it."""


def format_help(width: int | None = None) -> str:
    width = width or min(110, shutil.get_terminal_size((100, 24)).columns)
    options = all_options()
    groups: dict[str, list[tuple[str, str]]] = {"recipe": [("--config RECIPE.yaml", CONFIG_HELP)]}
    for option in options.values():
        names = ", ".join([option.option_strings[0], *option.aliases[:1], *option.negation[:1]])
        text = " ".join(option.help.split())
        shown = _shown_default(option)
        if shown is not None and "default" not in text:
            text += f" (default: {shown})"
        groups.setdefault(option.group, []).append((f"{names} {option.metavar()}", text))
    order = ["recipe", *GROUPS.values(), TRAINER_GROUP]
    lines = [USAGE, ""]
    for group in sorted(groups, key=order.index):
        lines.append(f"{group}:")
        for head, text in groups[group]:
            lines.append(f"  {head}")
            lines += textwrap.wrap(text, width, initial_indent=" " * 8, subsequent_indent=" " * 8) or []
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _shown_default(option: Option) -> str | None:
    value = option.default
    if value is NO_DEFAULT or value is None or value == [] or option.name in TRAINER_HELP:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
