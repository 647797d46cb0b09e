"""``cardtune eval``: answer every sample of a data file with a trained model and score the answers.

The model folder is what training or merge wrote (full, LoRA adapter, MoE); it is loaded as
``cardtune chat`` loads it, and each prompt is the sample's conversation before its last answer,
exactly as training encodes it (:mod:`cardtune.evaluation.prompts`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from cardtune.cli import Handler, command


def default_out(model: str, data: str) -> Path:
    """``MODEL/eval-DATA``: beside the model it evaluates (a run's --overwrite_output_dir moves it
    aside with the run)."""
    stem = Path(data.split(":")[0]).name.split(".")[0] or "data"
    return Path(model) / f"eval-{stem}"


def device_and_dtype(device: str | None) -> tuple[str, Any]:
    """A CUDA device when there is one (bf16 where it supports it, as training loads), else the CPU in fp32."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, None


@command("eval", "answer each sample of a data file with a trained model; predictions.jsonl and metrics.json")
def _configure_eval(p: argparse.ArgumentParser) -> Handler:
    from cardtune.commands.chat import add_trust_arg

    p.add_argument("--model", required=True, metavar="DIR", help="a folder written by training or merge")
    p.add_argument("--data", required=True, help="JSON/JSONL (LLaVA-style or OpenAI messages): each sample's last "
                   "assistant turn is the reference, the conversation before it the prompt")
    p.add_argument("--image-folder", "--image_folder", dest="image_folder")
    p.add_argument("--video-folder", "--video_folder", dest="video_folder")
    p.add_argument("--allow-absolute-paths", "--allow_absolute_paths", dest="allow_absolute_paths", action="store_true")
    p.add_argument("--user-key", "--user_key", dest="user_key", default="human")
    p.add_argument("--assistant-key", "--assistant_key", dest="assistant_key", default="gpt")
    p.add_argument("--out", metavar="DIR", help="where predictions.jsonl and metrics.json go (default MODEL/eval-DATA); "
                   "a rerun into it goes on where it stopped")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8,
                   help="prompts generated together, padded on the left (default 8)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0, help="with --sample (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", action="append", default=[], metavar="MODULE:FUNCTION",
                   help="a score of your own: FUNCTION(prediction, reference) -> number or dict of numbers (repeatable)")
    p.add_argument("--limit", type=int, help="the first N samples only")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_trust_arg(p)

    def run(args: argparse.Namespace) -> int:
        from cardtune.commands.chat import say_untrusted_code
        from cardtune.evaluation.metrics import ScorerError, load_scorer
        from cardtune.evaluation.run import EvalOptions, EvalSettingsError, evaluate
        from cardtune.inputs import check_data_paths

        if args.batch_size < 1 or args.max_new_tokens < 1:
            print("cardtune eval: --batch-size and --max-new-tokens must be at least 1", file=sys.stderr)
            return 2
        check_data_paths(args.data)
        for folder, option in ((args.image_folder, "--image-folder"), (args.video_folder, "--video-folder")):
            if folder is not None and not Path(folder).is_dir():
                print(f"cardtune eval: {option} {folder}: no such folder", file=sys.stderr)
                return 2
        try:
            for path in args.scorer:  # before the model loads
                load_scorer(path)
        except ScorerError as exc:
            print(f"cardtune eval: {exc}", file=sys.stderr)
            return 2
        say_untrusted_code(args, args.model)
        model, encoder, card = load_for_eval(args.model, args.trust_remote_code, args.device)
        from cardtune.data.formats import load_samples
        from cardtune.data.media import MediaConfig

        samples = load_samples(args.data, user_key=args.user_key, assistant_key=args.assistant_key)
        items = itertools.chain(samples.errors, samples)  # read a sample at a time: a large set stays on disk
        media = MediaConfig.from_card(card, image_folder=args.image_folder, video_folder=args.video_folder,
                                      allow_absolute_paths=args.allow_absolute_paths)
        out = Path(args.out) if args.out else default_out(args.model, args.data)
        options = EvalOptions(args.max_new_tokens, args.batch_size, args.sample, args.temperature, args.top_p,
                              args.seed, args.limit, list(args.scorer))
        settings = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()),
                    "image_folder": _abs(args.image_folder), "video_folder": _abs(args.video_folder)}
        try:
            result = evaluate(model, encoder, items, media, out, options, settings=settings,
                              total=len(samples.errors) + len(samples),
                              progress=args.progress)
        except (EvalSettingsError, ScorerError) as exc:
            print(f"cardtune eval: {exc}", file=sys.stderr)
            return 2
        metrics = result.metrics
        print(json.dumps(metrics, indent=2))
        print(f"cardtune eval: {metrics['samples']} answered, {metrics['failed']} failed; "
              f"predictions: {out / 'predictions.jsonl'}, metrics: {out / 'metrics.json'}", file=sys.stderr)
        return 1 if metrics["failed"] else 0

    return run


def load_for_eval(folder: str, trust_remote_code: bool = False, device: str | None = None) -> tuple[Any, Any, Any]:
    """(model, encoder, card) of a trained folder, as ``cardtune chat`` loads it, on ``device``."""
    from cardtune.collators.engine import ChatEncoder
    from cardtune.training.output import load_trained

    device, dtype = device_and_dtype(device)
    trained = load_trained(folder, merge=True, trust_remote_code=trust_remote_code, dtype=dtype)
    model = trained.model.to(device)
    return model, ChatEncoder(trained.card, trained.processing), trained.card


def _abs(folder: str | None) -> str | None:
    return str(Path(folder).resolve()) if folder else None
