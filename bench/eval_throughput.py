"""Generated tokens per second of ``cardtune eval``: batched (left padding) vs one sample at a time.

Both passes run in this process on the same model and samples, one after the other, through
``cardtune.evaluation.run.evaluate`` (what ``cardtune eval`` calls: prompts, generation, scores,
predictions.jsonl), each into a fresh folder; tokens/s is the tokens the model generated
(stop tokens included) over the pass's wall time. Greedy, so both passes answer the same, which
is checked. Without ``--model``, the demo is trained for ``--train-steps`` first (so it answers
with its end-of-turn, as a finetuned model does) and asked its eval set, repeated ``--repeat``
times.

    python bench/eval_throughput.py [--batch-size 16] [--repeat 4] [--model DIR --data FILE --image-folder DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any


def demo_model(folder: Path, steps: int) -> tuple[Path, Path, Path]:
    """(trained demo folder, eval data, image folder)."""
    from cardtune.demo import EVAL_FILE, IMAGE_DIR, ensure_demo_dataset
    from cardtune.train import run

    out = folder / "demo"
    run(["--model_id", "tiny-llava-demo", "--output_dir", str(out), "--max_steps", str(steps), "--eval_strategy", "no",
         "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"])
    data = ensure_demo_dataset()
    return out, data / EVAL_FILE, data / IMAGE_DIR


def one_pass(model: Any, encoder: Any, card: Any, data: Path, images: Path | None, out: Path, batch_size: int,
             max_new_tokens: int, repeat: int) -> tuple[float, int, float, list[str]]:
    """(tokens/s over the pass, tokens generated, seconds, predictions)."""
    from cardtune.data.formats import load_samples
    from cardtune.data.media import MediaConfig
    from cardtune.evaluation.run import EvalOptions, evaluate

    samples = load_samples(str(data))
    items = [samples[i] for _ in range(repeat) for i in range(len(samples))]
    media = MediaConfig.from_card(card, image_folder=str(images) if images else None)
    options = EvalOptions(max_new_tokens=max_new_tokens, batch_size=batch_size)
    started = time.perf_counter()
    result = evaluate(model, encoder, items, media, out, options, progress=False)
    seconds = time.perf_counter() - started
    predictions = [json.loads(line)["prediction"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return result.generated_tokens / seconds, result.generated_tokens, seconds, predictions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a trained folder (default: the demo, trained first)")
    p.add_argument("--data", help="eval data (with --model)")
    p.add_argument("--image-folder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=4, help="the data this many times over (the demo's eval set is 48)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--device")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from cardtune.commands.eval import load_for_eval

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="cardtune-bench-eval-") as tmp:
        work = Path(tmp)
        if args.model:
            model_dir, data, images = Path(args.model), Path(args.data), Path(args.image_folder) if args.image_folder else None
        else:
            model_dir, data, images = demo_model(work, args.train_steps)
        model, encoder, card = load_for_eval(str(model_dir), device=args.device)
        print(f"model: {model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters) on {model.device}; "
              f"data: {data} x{args.repeat}; greedy, at most {args.max_new_tokens} new tokens")
        # warm-up: first calls allocate and pick kernels
        one_pass(model, encoder, card, data, images, work / "warm", args.batch_size, args.max_new_tokens, 1)
        single = one_pass(model, encoder, card, data, images, work / "single", 1, args.max_new_tokens, args.repeat)
        batched = one_pass(model, encoder, card, data, images, work / "batched", args.batch_size,
                           args.max_new_tokens, args.repeat)
    print(f"{'mode':<22}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    for name, (rate, tokens, seconds, _) in (("one at a time", single), (f"batched ({args.batch_size})", batched)):
        print(f"{name:<22}{tokens:>10,}{seconds:>10.2f}{rate:>12.1f}")
    same = single[3] == batched[3]
    print(f"same answers batched and one at a time: {same}")
    print(f"RESULT tokens_per_s_batched={batched[0]:.1f} tokens_per_s_single={single[0]:.1f} "
          f"speedup={batched[0] / single[0]:.2f} batch_size={args.batch_size} same_answers={same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
