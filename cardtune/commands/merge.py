"""``cardtune merge``: fold a LoRA adapter into its base model and save a standalone folder."""

from __future__ import annotations

import argparse

from cardtune.cli import Handler, command
from cardtune.commands.chat import add_trust_arg, say_untrusted_code

DTYPES = ("auto", "float32", "bfloat16", "float16")


@command("merge", "merge a LoRA adapter into its base model; save a standalone Hugging Face folder")
def _configure_merge(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--adapter", required=True, metavar="DIR", help="an adapter folder written by training")
    p.add_argument("--output", required=True, metavar="DIR", help="where the merged model is written")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype of the merged model (default: the base's)")
    add_trust_arg(p)

    def run(args: argparse.Namespace) -> int:
        from cardtune.quiet import name_deepspeed_accelerator, no_weight_bars
        from cardtune.training.output import is_adapter

        if not is_adapter(args.adapter):
            print(f"cardtune merge: {args.adapter} holds no adapter_config.json (a full model needs no merge)")
            return 2
        name_deepspeed_accelerator()  # before peft imports accelerate, which imports deepspeed
        with no_weight_bars():
            return merge(args)

    return run


def merge(args: argparse.Namespace) -> int:
    """The adapter folded into its base, saved with the side files."""
    from pathlib import Path

    import torch

    from cardtune.training.moe import model_spec
    from cardtune.training.output import adapter_base, copy_side_files, load_trained

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    say_untrusted_code(args, args.adapter)
    trained = load_trained(args.adapter, dtype=dtype, merge=True, trust_remote_code=args.trust_remote_code)
    out = Path(args.output)
    spec = model_spec(trained.model)
    saved_as, moe_note, written = type(trained.model).__name__, None, set()
    if spec is None:
        trained.model.save_pretrained(out)
    else:
        from cardtune.training.moe.output import card_with_class, save_full_model
        from cardtune.training.output import CARD_FILE

        out.mkdir(parents=True, exist_ok=True)
        moe = save_full_model(trained.model, spec, out, card_class=trained.card.model_class)
        moe_note = moe.note
        if moe.model_class:
            saved_as = moe.model_class
            card = (Path(args.adapter) / CARD_FILE).read_text(encoding="utf-8")
            (out / CARD_FILE).write_text(card_with_class(card, moe.model_class), encoding="utf-8")
            written.add(CARD_FILE)
    copied = copy_side_files(args.adapter, out, written)
    print(f"merged {args.adapter} into its base {adapter_base(args.adapter)}")
    print(f"saved {out} ({saved_as}" + (f"; also {', '.join(copied)})" if copied else ")"))
    if moe_note:
        print(f"moe: {moe_note}")
    return 0

