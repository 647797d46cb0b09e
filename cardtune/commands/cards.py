"""``cardtune list``, ``show`` and ``check``: the registry seen from the terminal."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from cardtune.cli import Handler, command
from cardtune.registry import CardError, UnknownModelError, get_registry
from cardtune.registry.loader import card_dirs, iter_card_files, load_card_file


# -- list -----------------------------------------------------------------------------------
@command("list", "list registered models: id, family, modalities, capability states")
def _configure_list(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--family", help="only this family")
    p.add_argument("--modality", choices=["text", "image", "multi_image", "video"], help="only models with it")

    def run(args: argparse.Namespace) -> int:
        registry = get_registry(args.cards)
        if args.family and args.family not in registry.families:
            raise UnknownModelError(f"unknown family '{args.family}'; families: {', '.join(registry.families)}")
        rows = []
        for spec in registry.models.values():
            card = spec.family
            if args.family and card.family != args.family:
                continue
            if args.modality and args.modality not in card.modalities:
                continue
            rows.append(
                {
                    "model_id": spec.model_id,
                    "family": card.family,
                    "hf_path": spec.hf_path,
                    "status": card.status,
                    "modalities": list(card.modalities),
                    "capabilities": card.capabilities.model_dump(),
                    "source": spec.source,
                }
            )
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            sys.stdout.write("\n")
            return 0
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{len(rows)} models in {len({r['family'] for r in rows})} families")
        for col in ("model id", "family", "hf path", "modalities", "lora", "qlora", "flash-attn", "packing", "video"):
            table.add_column(col, overflow="fold")
        for r in rows:
            caps = r["capabilities"]
            model_id = r["model_id"] + (" (experimental)" if r["status"] == "experimental" else "")
            table.add_row(
                model_id,
                r["family"],
                r["hf_path"],
                ",".join(r["modalities"]),
                *(_state(caps[k]) for k in ("lora", "qlora", "flash_attention", "packing", "video")),
            )
        Console().print(table)
        return 0

    return run


def _state(state: str) -> str:
    return {"supported": "yes", "experimental": "[yellow]exp[/]", "unsupported": "[dim]no[/]"}[state]


# -- show -----------------------------------------------------------------------------------
@command("show", "print a model's resolved card (defaults filled in) as YAML")
def _configure_show(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_id")

    def run(args: argparse.Namespace) -> int:
        spec = get_registry(args.cards).get(args.model_id)
        card = spec.family.model_dump(mode="json")
        card["models"] = [m for m in card["models"] if m["model_id"] == spec.model_id]
        card["models"][0]["config_overrides"] = spec.config_overrides
        sys.stdout.write(f"# {spec.model_id}: from {spec.source}\n")
        sys.stdout.write(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
        return 0

    return run


# -- check ----------------------------------------------------------------------------------
@command("check", "validate the model cards (all, or the given ids); non-zero exit on any problem")
def _configure_check(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_ids", nargs="*", metavar="MODEL_ID")

    def run(args: argparse.Namespace) -> int:
        from cardtune.registry import Registry

        problems: list[str] = []
        registry = Registry()
        for path in iter_card_files(card_dirs(args.cards)):
            try:
                registry.add_family(load_card_file(path), str(path))
            except CardError as exc:
                problems.append(str(exc))
        for model_id in args.model_ids:
            try:
                registry.get(model_id)
            except UnknownModelError as exc:
                problems.append(str(exc))
        problems += _check_components(registry)
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        checked = args.model_ids or list(registry.models)
        if not problems:
            print(f"ok: {len(checked)} model ids in {len(registry.families)} families")
        return 1 if problems else 0

    return run


def _check_components(registry) -> list[str]:
    """Every loader and collator a card names must exist."""
    from cardtune.collators import COLLATORS
    from cardtune.loaders import LOADERS

    problems = []
    for name, card in registry.families.items():
        src = registry.family_sources[name]
        if card.loader not in LOADERS:
            problems.append(f"{src}: loader: unknown loader '{card.loader}' (known: {', '.join(sorted(LOADERS))})")
        if card.collator not in COLLATORS:
            problems.append(
                f"{src}: collator: unknown collator '{card.collator}' (known: {', '.join(sorted(COLLATORS))})"
            )
    return problems
