"""``cardtune merge``: fold a LoRA adapter into its base model and save a standalone folder."""

from __future__ import annotations

import argparse

from cardtune.cli import Handler, command

DTYPES = ("auto", "float32", "bfloat16", "float16")


@command("merge", "merge a LoRA adapter into its base model; save a standalone Hugging Face folder")
def _configure_merge(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--adapter", required=True, metavar="DIR", help="an adapter folder written by training")
    p.add_argument("--output", required=True, metavar="DIR", help="where the merged model is written")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype of the merged model (default: the base's)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from cardtune.training.output import adapter_base, copy_side_files, is_adapter, load_trained

        if not is_adapter(args.adapter):
            print(f"cardtune merge: {args.adapter} holds no adapter_config.json (a full model needs no merge)")
            return 2
        import torch

        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        trained = load_trained(args.adapter, dtype=dtype, merge=True)
        out = Path(args.output)
        trained.model.save_pretrained(out)
        copied = copy_side_files(args.adapter, out)
        print(f"merged {args.adapter} into its base {adapter_base(args.adapter)}")
        print(f"saved {out} ({type(trained.model).__name__}; also {', '.join(copied)})")
        return 0

    return run
