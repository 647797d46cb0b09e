"""``cardtune add-model``: scaffold a card for a model folder (or hub id), write it, check it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cardtune.cli import Handler, command
from cardtune.registry import CardError


@command("add-model", "scaffold a model card from a model folder or hub id, write it, and check it on the folder")
def _configure_add_model(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("source", metavar="DIR_OR_HF_ID", help="a local Hugging Face model folder, or a hub id (config and tokenizer files only are fetched)")
    p.add_argument("--model_id", "--model-id", dest="model_id", required=True, help="the id to register (lowercase, e.g. my-llava-7b)")
    p.add_argument("--family", help="add an entry to this registered family, or name the new family (default: the model id)")
    p.add_argument("--like", metavar="FAMILY", help="a registered family to take what the folder cannot tell: its chat template when the folder ships none, its module keywords when the model cannot be built here")
    p.add_argument("--model-class", "--model_class", dest="model_class", help="the transformers class, when config.json names none or the wrong one")
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="run the folder's remote code (configuration_*.py, modeling_*.py, tokenization_*.py) to read it, "
                        "and write trust_remote_code: true into the card; read that code first. Without it, nothing "
                        "from the folder runs and add-model says what it could not derive")
    p.add_argument("--out", metavar="DIR", help="the card folder to write to (default: the first --cards / $CARDTUNE_CARDS folder, else configs/models)")
    p.add_argument("--dry-run", action="store_true", help="print the card and check it, write nothing")
    p.add_argument("--force", action="store_true", help="overwrite an existing card file of the same name")

    def run(args: argparse.Namespace) -> int:
        from cardtune.checks import check_model, format_report
        from cardtune.registry import Registry
        from cardtune.registry.loader import BUILTIN_CARD_DIR, card_dirs, parse_card
        from cardtune.scaffold import append_entry, card_yaml, entries_yaml, scaffold

        # A --cards folder that does not exist yet holds no card: the new one goes there, and the
        # folder is created when the card is written.
        dirs = card_dirs([d for d in args.cards if Path(d).exists()])
        if args.cards and not Path(args.cards[0]).exists():
            dirs.insert(0, Path(args.cards[0]))
        registry = Registry()
        registry.load_dirs(dirs)
        s = scaffold(args.source, args.model_id, registry, family=args.family, like=args.like,
                     model_class=args.model_class, trust_remote_code=args.trust_remote_code)

        if s.new_family:
            out_dir = Path(args.out) if args.out else dirs[0]
            target = out_dir / f"{s.family}.yaml"
            text = card_yaml(s, args.source)
            if s.family in registry.families:
                raise CardError(f"family '{s.family}' already exists; give --family to name the new one")
            if target.exists() and not args.force and not args.dry_run:
                raise CardError(f"{target} exists; give --force to overwrite it, or --family to choose another name")
            card = parse_card(text, str(target))  # exactly what will be read back
            if args.dry_run:
                sys.stdout.write(text)
            else:
                out_dir.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
                print(f"wrote {target}: new family {s.family}, model id {args.model_id}")
        else:
            target = Path(registry.family_sources[s.family])
            user_dir = Path(args.out) if args.out else (dirs[0] if dirs[0] != BUILTIN_CARD_DIR else None)
            if user_dir is not None and target.resolve().parent == BUILTIN_CARD_DIR.resolve():
                # a built-in family: the new id goes into the user's folder, in an entries file
                # of that family (the package's own card is never written)
                target = user_dir / f"{s.family}.yaml"
                if target.exists() and not _holds_entries_of(target, s.family):
                    raise CardError(f"{target} exists and is not an entries file of family {s.family}; "
                                    "give another --out folder")
            card = registry.families[s.family]
            if args.dry_run:
                print(f"would add to {target}: - model_id: {s.entry['model_id']}  hf_path: {s.entry['hf_path']}")
            else:
                if target.exists():
                    append_entry(target, s.entry)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(entries_yaml(s, args.source), encoding="utf-8")
                check = Registry()
                check.load_dirs(dirs if target.parent in dirs else [target.parent, *dirs])
                card = check.get(args.model_id).family  # exactly what will be read back
                print(f"added {args.model_id} to family {s.family} in {target}")
        if not args.dry_run:  # a dry run printed them in the card's header
            for line in s.derived:
                print(f"  derived: {line}")
        folder = str(Path(args.source)) if Path(args.source).is_dir() else args.source
        result = check_model(args.model_id, str(s.folder), card, str(target))
        sys.stdout.write("check: " + format_report(result))
        if s.review:
            print("review before a pull request:")
            for line in s.review:
                print(f"  - {line}")
        print("then: cardtune inspect --model_id " + args.model_id + " --model-path " + folder + " --data YOUR_DATA -n 3")
        if result.failed:
            print(f"cardtune add-model: the card for {args.model_id} fails its check (above)", file=sys.stderr)
            return 1
        return 0

    return run


def _holds_entries_of(path: Path, family: str) -> bool:
    from cardtune.registry.loader import load_card_or_entries
    from cardtune.registry.schema import FamilyEntries

    try:
        found = load_card_or_entries(path)
    except CardError:
        return False
    return isinstance(found, FamilyEntries) and found.family == family
