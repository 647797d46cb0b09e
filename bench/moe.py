"""MoE-tuning cost: an upcycled model vs the dense one on the same data and steps.

    python bench/moe.py [--steps 60] [--batch_size 8] [--threads 1] [--layers sparse] [--experts 4] [--top_k 2]

The embedded demo model (``tiny-llava-demo``) and demo data, the whole language model trained
(``--moe_train all`` for the MoE run, so both train the same parts), length-grouped batches from
the same seed, each mode in its own process so each peak RSS is its own:

- ``dense`` - the model as built;
- ``moe``   - ``--layers`` upcycled into ``--experts`` experts, top-``--top_k``, dropless, with the
  load-balancing loss (0.01) added to the loss as the Trainer does.

Printed: real tokens/s and peak RSS of each, the language model's parameters in total and
active per token (a token runs ``top_k`` of a layer's experts), and the expert load's
coefficient of variation (tokens per expert, std/mean, averaged over the MoE layers) on the
demo's 48 eval conversations before and after training. The last line is
``RESULT tokens_per_s_ratio=<moe/dense> peak_rss_ratio=<moe/dense> active_params_ratio=...
total_params_ratio=... load_cv_before=... load_cv_after=...``.
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

MODES = ("dense", "moe")


def load_cv(model, batches) -> float:
    """Mean over the MoE layers of the coefficient of variation of tokens per expert."""
    import torch

    from cardtune.training.moe import RoutingMonitor, coefficient_of_variation
    from cardtune.training.moe.balance import layer_balance, token_mask

    monitor = RoutingMonitor(model, 0.0)
    totals = [None] * len(monitor.blocks)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            for _, block in monitor.blocks:
                block.records = []
            model(**batch)
            for i, (_, block) in enumerate(monitor.blocks):
                for routing in block.records:
                    counts = layer_balance(routing, token_mask(batch["attention_mask"], routing.probs.shape[0]))[1]
                    totals[i] = counts if totals[i] is None else totals[i] + counts
                block.records = None
    model.train()
    return sum(coefficient_of_variation(c) for c in totals) / len(totals)


def lm_parameters(model, card) -> tuple[int, int]:
    """(total, active per token) parameters of the language model."""
    from cardtune.training.model import group_of
    from cardtune.training.moe import moe_blocks

    total = sum(p.numel() for n, p in model.named_parameters() if group_of(n, card) == "llm")
    idle = 0
    for _, block in moe_blocks(model):
        per_expert = sum(p.numel() for p in block.experts[0].parameters())
        idle += (block.num_experts - block.top_k) * per_expert
    return total, total - idle


def child(mode: str, steps: int, batch_size: int, threads: int, warmup: int, layers: str, experts: int,
          top_k: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    from cardtune.collators.engine import ChatEncoder
    from cardtune.datasets import LengthGroupedBatchSampler
    from cardtune.train import demo_data, folder_loader, resolve
    from cardtune.training.arguments import parse_arguments
    from cardtune.training.data import conversation_dataset, prepare_split
    from cardtune.training.model import load_and_prepare
    from cardtune.training.moe import RoutingMonitor

    argv = ["--model_id", "tiny-llava-demo", "--output_dir", "/tmp/cardtune-bench-moe", "--seed", "0", "--use_lora",
            "false"]
    if mode == "moe":
        argv += ["--moe_layers", layers, "--moe_num_experts", str(experts), "--moe_top_k", str(top_k),
                 "--moe_train", "all"]
    args = parse_arguments(argv)
    resolved, overrides = resolve(args)
    card = resolved.card
    demo_data(args, card)
    loader = folder_loader(resolved)
    processing = loader.load_processing()
    encoder = ChatEncoder(card, processing)
    d = args.data

    def split(name: str, path: str):
        return prepare_split(name, path, encoder, card, image_folder=d.image_folder, video_folder=None,
                             policy="error", output_dir=None, seed=0, log=lambda _: None)

    train_split, eval_split = split("train", d.data_path), split("eval", d.eval_data_path)
    torch.manual_seed(0)
    prepared = load_and_prepare(loader, card, args, overrides, processing.tokenizer)
    model = prepared.model
    model.train()
    handler = encoder.handler
    dataset = conversation_dataset(train_split, card, encoder, d.image_folder, None)
    held_out = conversation_dataset(eval_split, card, encoder, d.image_folder, None)
    eval_batches = [handler([held_out[i] for i in range(j, min(j + 16, len(held_out)))])
                    for j in range(0, len(held_out), 16)]
    sampler = LengthGroupedBatchSampler(train_split.lengths, batch_size, seed=0, group_by_length=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    monitor = RoutingMonitor(model, prepared.moe.router_aux_loss_coef) if prepared.moe else None
    cv_before = load_cv(model, eval_batches) if monitor else None

    def batches():
        while True:
            for indices in sampler:
                items = [dataset[i] for i in indices]
                yield handler(items), sum(len(item.input_ids) for item in items)
            sampler.set_epoch(sampler.epoch + 1)

    real_tokens, timed = 0, 0.0
    stream = batches()
    for step in range(warmup + steps):
        started = time.perf_counter()
        batch, real = next(stream)
        if monitor:
            monitor.start()
        loss = model(**batch).loss
        if monitor:
            loss = loss + monitor.coef * monitor.finish(batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            timed += time.perf_counter() - started
            real_tokens += real
    total, active = lm_parameters(model, card)
    return {
        "mode": mode,
        "tokens_per_s": real_tokens / timed,
        "seconds": timed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "last_loss": float(loss),
        "lm_params": total,
        "active_params": active,
        "cv_before": cv_before,
        "cv_after": load_cv(model, eval_batches) if monitor else None,
        "moe": prepared.moe.describe() if prepared.moe else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", default="sparse")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch_size", str(args.batch_size),
               "--threads", str(args.threads), "--layers", args.layers, "--experts", str(args.experts),
               "--top_k", str(args.top_k)]
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.threads, args.warmup, args.layers,
                               args.experts, args.top_k)))
        return
    results = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, "--child", mode, *options], capture_output=True, text=True,
                             check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    dense, moe = results["dense"], results["moe"]
    print(f"{args.steps} steps of {args.batch_size} on tiny-llava-demo, whole LLM trained, {args.threads} thread(s), "
          f"one process per mode; moe: {moe['moe']}")
    print(f"{'mode':<7}{'real tok/s':>12}{'peak RSS MB':>13}{'LM params':>12}{'active/token':>14}{'last loss':>11}")
    for mode, r in results.items():
        print(f"{mode:<7}{r['tokens_per_s']:>12.0f}{r['peak_rss_mb']:>13.0f}{r['lm_params']:>12,}"
              f"{r['active_params']:>14,}{r['last_loss']:>11.3f}")
    print(f"expert load (tokens per expert, std/mean over the eval set): {moe['cv_before']:.3f} before training, "
          f"{moe['cv_after']:.3f} after")
    print(f"RESULT tokens_per_s_ratio={moe['tokens_per_s'] / dense['tokens_per_s']:.2f} "
          f"peak_rss_ratio={moe['peak_rss_mb'] / dense['peak_rss_mb']:.2f} "
          f"active_params_ratio={moe['active_params'] / dense['active_params']:.2f} "
          f"total_params_ratio={moe['lm_params'] / dense['lm_params']:.2f} "
          f"load_cv_before={moe['cv_before']:.3f} load_cv_after={moe['cv_after']:.3f}")


if __name__ == "__main__":
    main()
