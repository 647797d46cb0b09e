"""``cardtune validate-data``: every problem in a dataset, per sample id and field, in one pass."""

from __future__ import annotations

import argparse
import json
import sys

from cardtune.cli import Handler, command
from cardtune.commands.labels import add_data_args, add_model_args, open_encoder, resolve_checked


@command("validate-data", "check a dataset against a model before training; non-zero exit on any problem")
def _configure_validate_data(p: argparse.ArgumentParser) -> Handler:
    add_model_args(p)
    add_data_args(p)
    p.add_argument("--no-encode", action="store_true",
                   help="structure and media only: no tokenizer, so no length or label checks")
    p.add_argument("--check-media", "--check_media", dest="check_media", choices=("header", "full"), default="header",
                   help="header (default): each image present, an image, under the pixel limit, and its token count "
                   "from its size; full: decode every image and run the processor, as training will")
    p.add_argument("--max-image-pixels", "--max_image_pixels", dest="max_image_pixels", type=int, metavar="N",
                   help="refuse images with more pixels (image_too_large; default 89,478,485, Pillow's threshold)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="check in N processes (default: the machine's cores; 0: in this process)")
    p.add_argument("--limit", type=int, default=200, help="rows of the table to print (default 200; --json prints all)")
    p.add_argument("--json", action="store_true", help="machine-readable report")

    def run(args: argparse.Namespace) -> int:
        from cardtune.collators.pairs import PairEncoder
        from cardtune.conversation import is_preference
        from cardtune.data.formats import load_samples
        from cardtune.data.validate import validate

        if not args.model_id and not args.model_path:
            print("cardtune validate-data: give --model_id or --model-path", file=sys.stderr)
            return 2
        if args.no_encode:
            resolved, encoder = resolve_checked(args, loads=False), None
        else:
            resolved, encoder = open_encoder(args)
        try:
            samples = load_samples(args.data, user_key=args.user_key, assistant_key=args.assistant_key)
        except (OSError, ValueError) as exc:
            print(f"cardtune validate-data: {exc}", file=sys.stderr)
            return 2
        if encoder is not None and len(samples) and is_preference(samples[0]):
            encoder = PairEncoder(encoder)  # preference pairs, validated as --method dpo trains them
        report = validate(
            samples, encoder, card=resolved.card, image_folder=args.image_folder, video_folder=args.video_folder,
            allow_absolute_paths=args.allow_absolute_paths, num_workers=args.workers,
            check_media=args.check_media, max_image_pixels=args.max_image_pixels,
        )
        for note in report.notes:
            print(f"cardtune validate-data: {note}", file=sys.stderr)
        if args.json:
            json.dump({"model_id": resolved.model_id, "data": args.data, **report.to_dict()}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(f"{resolved.model_id} ({resolved.card.family}): {args.data}")
            print(report.format_table(limit=args.limit))
        return 0 if report.ok else 1

    return run
