"""``cardtune list``, ``show`` and ``check``: the registry seen from the terminal."""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from cardtune.cli import Handler, command
from cardtune.registry import CardError, UnknownModelError, get_registry
from cardtune.registry.loader import card_dirs, iter_card_files


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

        families = len({r["family"] for r in rows})
        table = Table(title=f"{plural(len(rows), 'model')} in {plural(families, 'family', 'families')}")
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
        # Piped or redirected, rich would fold every cell to 80 columns: each row keeps its full
        # width there (unless $COLUMNS asks for a width).
        piped = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
        console = Console(width=_UNWRAPPED, soft_wrap=True) if piped else Console()
        console.print(table)
        return 0

    return run


_UNWRAPPED = 10_000


def plural(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def _state(state: str) -> str:
    return {"supported": "yes", "experimental": "[yellow]exp[/]", "unsupported": "[dim]no[/]"}[state]


# -- show -----------------------------------------------------------------------------------
@command("show", "print a model's resolved card (defaults filled in) as YAML")
def _configure_show(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_id")

    def run(args: argparse.Namespace) -> int:
        spec = get_registry(args.cards).get(args.model_id)
        card = spec.family.model_dump(mode="json")
        # An id added with register_model is not among its family card's own entries.
        entry = next((m for m in card["models"] if m["model_id"] == spec.model_id), None) or {
            "model_id": spec.model_id, "hf_path": spec.hf_path, "revision": spec.revision,
        }
        card["models"] = [{**entry, "config_overrides": spec.config_overrides}]
        sys.stdout.write(f"# {spec.model_id}: from {spec.source}\n")
        sys.stdout.write(yaml.safe_dump(card, sort_keys=False, allow_unicode=True))
        return 0

    return run


# -- check ----------------------------------------------------------------------------------
@command(
    "check",
    "validate the model cards (all, or the given ids); with --model-path, --models-dir or --fetch, also "
    "load the real tokenizer/processor and check special tokens, bos, template, role tokens and labels; "
    "non-zero exit on any problem",
)
def _configure_check(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("model_ids", nargs="*", metavar="MODEL_ID")
    p.add_argument(
        "--model-path", "--model_path", dest="model_path", metavar="DIR",
        help="a local model folder: check MODEL_ID's card on it, or (no MODEL_ID) the card derived from it",
    )
    p.add_argument(
        "--models-dir", dest="models_dir", metavar="DIR",
        help="a folder of model folders: check each registered model whose folder is there "
        "(folder named as the model id or its hub name)",
    )
    p.add_argument(
        "--fetch", action="store_true",
        help="download each MODEL_ID's tokenizer, config and template files (no weights, no code) from the hub "
        "at its hf_path and revision, into $CARDTUNE_CACHE/hub, and check the card on them",
    )
    p.add_argument(
        "--changed-since", dest="changed_since", metavar="GIT_REF",
        help="with --fetch or --models-dir: the model ids whose card entry (or family) changed since GIT_REF "
        "in the current git repository, e.g. origin/main",
    )

    def run(args: argparse.Namespace) -> int:
        from cardtune.registry import Registry

        _check_options(args)
        problems: list[str] = []
        registry = Registry()
        problems += registry.load_files(iter_card_files(card_dirs(args.cards)))
        for model_id in args.model_ids:
            try:
                registry.get(model_id)
            except UnknownModelError as exc:
                problems.append(str(exc))
        problems += _check_components(registry)
        for problem in problems:
            print(f"FAIL {problem}", file=sys.stderr)
        if problems:
            return 1
        if args.model_path is None and args.models_dir is None and not args.fetch:
            checked = args.model_ids or list(registry.models)
            print(f"ok: {plural(len(checked), 'model id')} in {plural(len(registry.families), 'family', 'families')}")
            return 0
        return _check_folders(args, registry)

    return run


def _check_options(args: argparse.Namespace) -> None:
    """--fetch and --changed-since with what they need and nothing they contradict."""
    if args.fetch and (args.model_path is not None or args.models_dir is not None):
        raise CardError("--fetch downloads the models' files: give it without --model-path and --models-dir")
    if args.fetch and not args.model_ids and args.changed_since is None:
        raise CardError("--fetch downloads each model's files: give MODEL_IDs or --changed-since GIT_REF")
    if args.changed_since is not None and not (args.fetch or args.models_dir is not None):
        raise CardError("--changed-since selects the models to check on their files: give --fetch or --models-dir")
    if args.changed_since is not None and args.model_ids:
        raise CardError("give MODEL_IDs or --changed-since, not both")


def _check_folders(args: argparse.Namespace, registry) -> int:
    from pathlib import Path

    from cardtune.checks import check_model, format_report, match_model_folders

    wanted = list(args.model_ids)
    if args.changed_since is not None:
        from cardtune.registry.changes import changed_model_ids

        wanted = changed_model_ids(args.changed_since, card_dirs(args.cards))
        if not wanted:
            print(f"ok: no model entry changed since {args.changed_since}")
            return 0
        print(f"changed since {args.changed_since}: {', '.join(wanted)}")
    targets: list[tuple[str, str, object, str]] = []
    if args.model_path is not None:
        if len(args.model_ids) > 1:
            raise CardError("--model-path checks one model: give at most one MODEL_ID")
        if args.model_ids:
            spec = registry.get(args.model_ids[0])
            targets.append((spec.model_id, args.model_path, spec.family, registry.family_sources[spec.family.family]))
        else:
            from cardtune.loaders.resolve import resolve_model

            resolved = resolve_model(model_path=args.model_path)
            for note in resolved.notes:
                print(f"derived: {note}")
            targets.append((resolved.model_id, args.model_path, resolved.card, "derived from the folder"))
    if args.models_dir is not None:
        if not Path(args.models_dir).is_dir():
            raise CardError(f"--models-dir {args.models_dir}: not a folder")
        pairs, unmatched = match_model_folders(registry, args.models_dir)
        for model_id, folder in pairs:
            if wanted and model_id not in wanted:
                continue
            spec = registry.get(model_id)
            targets.append((model_id, str(folder), spec.family, registry.family_sources[spec.family.family]))
        for folder in unmatched:
            print(f"skip {folder}: no registered model is named after this folder")
        for model_id in sorted(set(wanted) - {model_id for model_id, _ in pairs}):
            print(f"skip {model_id}: no folder of it in {args.models_dir} (check it with --fetch)")
        if not pairs:
            raise CardError(f"--models-dir {args.models_dir}: no folder is named after a registered model")
    unfetched: list[str] = []
    if args.fetch:
        from cardtune.fetch import FetchError, fetch_small_files

        for model_id in wanted:
            spec = registry.get(model_id)
            try:
                fetched = fetch_small_files(spec)
            except FetchError as exc:
                print(f"FAIL {exc}", file=sys.stderr)
                unfetched.append(model_id)
                continue
            print(fetched.line(spec))
            targets.append((model_id, str(fetched.folder), spec.family, registry.family_sources[spec.family.family]))
    failed = list(unfetched)
    for model_id, path, card, source in targets:
        result = check_model(model_id, path, card, source)
        sys.stdout.write(format_report(result))
        if result.failed:
            failed.append(model_id)
    if failed:
        if targets:  # else every model failed to fetch, and its line said so
            print(f"FAIL: {len(failed)} of {len(targets) + len(unfetched)} models failed: {', '.join(failed)}",
                  file=sys.stderr)
        return 1
    print(f"ok: {len(targets)} model{'s' if len(targets) != 1 else ''} checked on their folders")
    return 0


def _check_components(registry) -> list[str]:
    """Every loader and collator a card names must exist."""
    from cardtune.inputs import component_problems

    problems = []
    for name, card in registry.families.items():
        problems += component_problems(card, lambda field, name=name: registry.field_location(name, field))
    return problems
