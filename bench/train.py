"""Training throughput and memory: cardtune's batching vs static padding to max length.

    python bench/train.py [--steps 40] [--batch_size 8] [--threads 1]

The same LoRA steps on the embedded demo model (``tiny-llava-demo``, demo recipe) and demo
data, three ways, each in its own process so each peak RSS is its own:

- ``static``  - random batches, every sample padded to the tokenizer's ``model_max_length``
  (what lmms-finetune does);
- ``grouped`` - cardtune's default: length-grouped batches, padded to the longest in the batch;
- ``packed``  - cardtune's packing: samples packed into rows of ``model_max_length`` tokens,
  attention kept inside each sample (block-diagonal mask on CPU).

Tokens/s counts real (non-padding) tokens. The last line is
``RESULT tokens_per_s_ratio=<grouped/static> peak_rss_ratio=<grouped/static>``
(``packed/static`` is printed on the line above).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("static", "grouped", "packed")


def child(mode: str, steps: int, batch_size: int, threads: int, warmup: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    from cardtune.collators.engine import ChatEncoder
    from cardtune.datasets import LengthGroupedBatchSampler
    from cardtune.train import demo_data, resolve
    from cardtune.training.arguments import parse_arguments
    from cardtune.training.data import (
        PackedCollator,
        PackedDataset,
        conversation_dataset,
        media_config,
        prepare_split,
    )
    from cardtune.training.model import load_and_prepare

    args = parse_arguments(["--model_id", "tiny-llava-demo", "--output_dir", "/tmp/cardtune-bench", "--seed", "0"])
    resolved, overrides = resolve(args)
    card = resolved.card
    demo_data(args, card)
    loader = resolved.loader()
    processing = loader.load_processing()
    max_length = processing.tokenizer.model_max_length
    encoder = ChatEncoder(card, processing, max_length=max_length)
    d = args.data
    split = prepare_split("train", d.data_path, encoder, card, image_folder=d.image_folder, video_folder=None,
                          policy="error", output_dir=None, seed=0, log=lambda _: None)
    torch.manual_seed(0)
    model = load_and_prepare(loader, card, args, overrides, processing.tokenizer).model
    model.train()
    handler = encoder.handler
    if mode == "packed":
        dataset = PackedDataset(split, card, encoder, media_config(card, d.image_folder, None), max_length)
        lengths, collate = dataset.lengths, PackedCollator(handler, "sdpa", mask_dtype=model.dtype)
    else:
        dataset = conversation_dataset(split, card, encoder, d.image_folder, None)
        lengths, collate = split.lengths, handler
        if mode == "static":
            handler.pad_to_multiple_of = max_length  # every batch padded to max_length
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=0, group_by_length=mode == "grouped")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)

    def batches():
        """(batch, real tokens): an item's length is its real tokens, a packed row's its samples'."""
        while True:
            for indices in sampler:
                items = [dataset[i] for i in indices]
                yield collate(items), sum(len(item.input_ids) for item in items)
            sampler.set_epoch(sampler.epoch + 1)

    real_tokens, computed_tokens, timed = 0, 0, 0.0
    stream = batches()
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch, real = next(stream)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            timed += time.perf_counter() - started
            real_tokens += real
            computed_tokens += batch["input_ids"].numel()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "mode": mode,
        "steps": steps,
        "seconds": timed,
        "real_tokens": real_tokens,
        "computed_tokens": computed_tokens,
        "tokens_per_s": real_tokens / timed,
        "real_fraction": real_tokens / computed_tokens,
        "peak_rss_mb": peak_kb / 1024,
        "last_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.threads, args.warmup)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--batch_size", str(args.batch_size), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.steps} LoRA steps of {args.batch_size} on tiny-llava-demo, {args.threads} thread(s), one process per mode")
    print(f"{'mode':<9}{'real tok/s':>12}{'real/computed':>15}{'peak RSS MB':>13}{'seconds':>9}{'last loss':>11}")
    for mode, r in results.items():
        print(f"{mode:<9}{r['tokens_per_s']:>12.0f}{r['real_fraction']:>15.3f}{r['peak_rss_mb']:>13.0f}"
              f"{r['seconds']:>9.2f}{r['last_loss']:>11.3f}")
    s, g, p = results["static"], results["grouped"], results["packed"]
    print(f"packed/static: tokens_per_s_ratio={p['tokens_per_s'] / s['tokens_per_s']:.2f} "
          f"peak_rss_ratio={p['peak_rss_mb'] / s['peak_rss_mb']:.2f}")
    print(f"RESULT tokens_per_s_ratio={g['tokens_per_s'] / s['tokens_per_s']:.2f} "
          f"peak_rss_ratio={g['peak_rss_mb'] / s['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
