"""Peak memory and speed of one training step: the chunked loss (cardtune/training/loss.py) vs the
model's own loss, on a 262k vocabulary.

    python bench/loss_memory.py [--tokens 4096 8192] [--masked 0.7] [--steps 2] [--hidden 256] [--layers 2]

The model is Gemma 3's text model (``Gemma3ForCausalLM``) built from the text config of the
gemma-3-4b-it fixture with its real vocabulary (262,208 rows) and shrunk in depth and width
(``--hidden``, ``--layers``), float32 on CPU, every parameter trained (the tied embedding and
head too). One sequence of N tokens whose first 70% of every 512 (``--masked``: image and prompt
tokens) are not trained. A step is one forward and backward, as the Trainer makes it: the model's
own path is ``model(**batch).loss.backward()`` (its outputs dropped before backward, as
``compute_loss`` drops them); the chunked path is cardtune's ``ChunkedLossModel`` at its default
chunk (128 tokens at a time on this vocabulary).

Each (length, loss) runs in a fresh process. Peak memory is that process's peak resident set
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark: it sees torch's
allocations, which tracemalloc does not), the model and the Python runtime included; the table
also gives the step's own peak above the resident set before the first step. tokens/s is the
sequence length over the median time of ``--steps`` timed steps after one untimed step.

A variant that cannot fit is not started: the model's own path holds about three float32
tensors of tokens x vocabulary at its peak (the logits, their log-softmax, its gradient), 25.8 GB
at 8k tokens. When that plus the measured base exceeds the memory available (less 1 GiB kept for
the machine's other users), its peak and time are extrapolated from the shorter length measured
(the logits-sized part and the time grow linearly with tokens; attention's quadratic share makes
the extrapolated time a lower bound, so the extrapolated ratio is conservative), and the table
says so. A running child is also stopped should its resident set reach that limit.

The last line is ``RESULT peak_memory_ratio_4k=<chunked/model> tokens_per_s_ratio_4k=<chunked/model>
peak_memory_ratio_8k=... tokens_per_s_ratio_8k=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "gemma-3-4b-it"
IMPLS = ("model", "chunked")
MARGIN = 1 << 30


def fixtures() -> Path:
    return Path(os.environ.get("CARDTUNE_FIXTURES", REPO.parent / "shared" / "fixtures")) / "models" / FIXTURE


def _rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def build(hidden: int, layers: int):
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fixtures()).text_config
    heads = max(1, hidden // 64)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, 2 * hidden, layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, 1, hidden // heads
    config.layer_types = config.layer_types[:layers]
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).float().train(), config


def batch_of(tokens: int, vocab: int, masked: float):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, tokens), generator=g)
    labels = ids.clone()
    block = 512
    position = torch.arange(tokens) % block
    labels[0, position < int(masked * block)] = -100  # image + prompt tokens of each 512-token turn
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def child(impl: str, tokens: int, masked: float, steps: int, hidden: int, layers: int) -> dict:
    import torch

    from cardtune.training.loss import ChunkedLossModel, probe_head

    model, config = build(hidden, layers)
    batch = batch_of(tokens, config.vocab_size, masked)
    head = probe_head(model) if impl == "chunked" else None

    def step() -> float:
        started = time.perf_counter()
        if head is None:
            loss = model(**batch).loss
        else:
            loss = ChunkedLossModel(model, head)(**batch)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    base = _rss_bytes()
    step()
    times = [step() for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trained = int((batch["labels"][:, 1:] != -100).sum())
    return {"impl": impl, "tokens": tokens, "trained": trained, "vocab": config.vocab_size,
            "seconds": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
            "peak_bytes": peak, "base_bytes": base, "step_bytes": peak - base,
            "chunk_tokens": head.chunk_tokens if head else None, "threads": torch.get_num_threads()}


def run_child(options: list[str], limit: int) -> dict:
    """The child's result; stopped (None) if its resident set reaches ``limit``."""
    proc = subprocess.Popen([sys.executable, __file__, *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while proc.poll() is None:
        try:
            if _rss_bytes(proc.pid) > limit:
                proc.kill()
                proc.wait()
                return {"stopped_at": limit}
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"child {' '.join(options)} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--masked", type=float, default=0.7)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.masked, args.steps, args.hidden, args.layers)))
        return

    gib = 1 << 30
    results: dict[tuple[int, str], dict] = {}
    for tokens in sorted(args.tokens):
        for impl in IMPLS:
            options = ["--child", impl, "--tokens", str(tokens), "--masked", str(args.masked), "--steps",
                       str(args.steps), "--hidden", str(args.hidden), "--layers", str(args.layers)]
            limit = available_bytes() - MARGIN
            measured = [r for (n, i), r in results.items() if i == impl and "peak_bytes" in r]
            need = None
            if impl == "model" and measured:
                ref = measured[-1]
                need = ref["base_bytes"] + ref["step_bytes"] * tokens / ref["tokens"]
            elif impl == "model" and results:
                ref = next(iter(results.values()))
                need = ref["base_bytes"] + 12 * tokens * ref["vocab"]
            if need is not None and need > limit:
                results[(tokens, impl)] = extrapolated(measured[-1] if measured else None, tokens, need, limit)
                continue
            results[(tokens, impl)] = run_child(options, limit)
            if "stopped_at" in results[(tokens, impl)]:
                results[(tokens, impl)] = extrapolated(measured[-1] if measured else None, tokens,
                                                       need or limit, limit)

    any_ = next(r for r in results.values() if "vocab" in r)
    print(f"Gemma3ForCausalLM from {FIXTURE}'s text config: vocabulary {any_['vocab']:,}, hidden {args.hidden}, "
          f"{args.layers} layers, float32, all parameters trained; {args.masked:.0%} of positions masked; "
          f"CPU, {any_['threads']} threads; one process per row; peak = ru_maxrss of that process")
    print(f"{'tokens':>7} {'loss':<8}{'trained':>8}{'s/step':>9}{'tokens/s':>10}{'peak MB':>10}{'step MB':>10}  note")
    for (tokens, impl), r in sorted(results.items()):
        print(f"{tokens:>7} {impl:<8}{r.get('trained', 0):>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>10.0f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{r['step_bytes'] / 2**20:>10.0f}  {r.get('note', '')}")
    fields = []
    for tokens in sorted(args.tokens):
        own, ours = results[(tokens, "model")], results[(tokens, "chunked")]
        label = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
        fields.append(f"peak_memory_ratio_{label}={ours['peak_bytes'] / own['peak_bytes']:.3f}")
        fields.append(f"tokens_per_s_ratio_{label}={ours['tokens_per_s'] / own['tokens_per_s']:.2f}")
    print(f"memory available at the start of the last row: {available_bytes() / gib:.1f} GiB")
    print("RESULT " + " ".join(fields))


def extrapolated(ref: dict | None, tokens: int, need: float, limit: int) -> dict:
    """The model's own path where it cannot run here: its peak and time from the longest length
    measured, scaled by tokens (see the module docstring)."""
    if ref is None:
        raise SystemExit(f"the model's own loss at {tokens} tokens needs about {need / 2**30:.1f} GiB, more than the "
                         f"{limit / 2**30:.1f} GiB available, and no shorter length was measured to extrapolate from")
    scale = tokens / ref["tokens"]
    step = ref["step_bytes"] * scale
    seconds = ref["seconds"] * scale
    return {**ref, "tokens": tokens, "trained": int(ref["trained"] * scale), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_bytes": ref["base_bytes"] + step, "step_bytes": step,
            "note": f"extrapolated from {ref['tokens']}: needs ~{need / 2**30:.1f} GiB, "
                    f"{limit / 2**30:.1f} GiB available"}


if __name__ == "__main__":
    main()
