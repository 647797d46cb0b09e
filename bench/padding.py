"""Real-token fraction (real tokens / computed tokens) of four ways to batch the same samples.

5,000 sample lengths drawn log-normally and clipped to [16, 2048]; batch size 8, max length
2048. Static padding pads every sample to max length (lmms-finetune); random batching pads each
batch to its longest; length grouping is cardtune's ``LengthGroupedBatchSampler``; packing is
cardtune's first-fit-decreasing ``plan_packs`` into rows of max length, each batch of rows padded
to its longest row (the block-mask path; the padding-free path computes no padding at all).

    python bench/padding.py [--samples N] [--batch-size B] [--max-length L] [--seed S]
"""

from __future__ import annotations

import argparse

import numpy as np

from cardtune.data.batching import LengthGroupedBatchSampler, plan_packs


def lognormal_lengths(n: int, low: int, high: int, seed: int, median: float = 300.0, sigma: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), low, high).astype(np.int64)


def fraction(batches: list[list[int]], lengths: np.ndarray, pad_to: int | None = None) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    computed = sum(len(b) * (pad_to or int(lengths[b].max())) for b in batches)
    return real / computed


def packed_fraction(lengths: np.ndarray, max_length: int, batch_size: int, seed: int) -> tuple[float, int]:
    rows = plan_packs(lengths.tolist(), max_length)
    row_lengths = np.array([int(lengths[r].sum()) for r in rows])
    order = np.random.default_rng(seed).permutation(len(rows))
    batches = [order[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    computed = sum(len(b) * int(row_lengths[b].max()) for b in batches)
    return float(row_lengths.sum()) / computed, len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--min-length", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    lengths = lognormal_lengths(args.samples, args.min_length, args.max_length, args.seed)
    bs = args.batch_size
    random_batches = list(LengthGroupedBatchSampler(lengths, bs, seed=args.seed, group_by_length=False))
    grouped_batches = list(LengthGroupedBatchSampler(lengths, bs, seed=args.seed))
    results = {
        "static": fraction(random_batches, lengths, pad_to=args.max_length),
        "random": fraction(random_batches, lengths),
        "grouped": fraction(grouped_batches, lengths),
    }
    results["packed"], num_rows = packed_fraction(lengths, args.max_length, bs, args.seed)

    print(f"{args.samples} samples, lengths log-normal in [{args.min_length}, {args.max_length}] "
          f"(median {int(np.median(lengths))}, mean {lengths.mean():.0f}); batch size {bs}, max length {args.max_length}")
    computed = {k: lengths.sum() / v for k, v in results.items()}
    print(f"{'strategy':<20} {'real-token fraction':>20} {'computed tokens':>16} {'vs static':>10}")
    for name, label in (("static", "static"), ("random", "random"), ("grouped", "grouped"), ("packed", f"packed ({num_rows} rows)")):
        print(f"{label:<20} {results[name]:>20.3f} {computed[name]:>16,.0f} {computed['static'] / computed[name]:>9.1f}x")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
