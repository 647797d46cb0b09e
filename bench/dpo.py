"""Peak memory and pairs/s of a DPO step with its reference as the base model with the LoRA
adapters disabled (cardtune's) vs a separate frozen copy of the model (what a second reference
model costs), and of a supervised (SFT) step on the same pairs' chosen sequences.

    python bench/dpo.py [--pairs 4] [--prompt 192] [--answer 64] [--steps 3] [--hidden 512] [--layers 4]

The model is Qwen2 built from the text config of the qwen2.5-7b-instruct fixture with its real
vocabulary (152,064 rows, an untied head) and shrunk in width and depth (``--hidden``,
``--layers``), float32 on CPU, random weights; LoRA r=16 on every linear layer of the decoder
(never the head), AdamW. A batch is ``--pairs`` pairs of one shared prompt of ``--prompt`` tokens
and two different answers of ``--answer`` tokens each (random ids: the step's cost does not
depend on what they say), labelled on the answers only, as :class:`~cardtune.collators.pairs.PairCollator`
batches them (chosen rows, then rejected rows). A step is what the Trainer runs: the loss
(cardtune's :class:`~cardtune.training.preference.trainer.PreferenceObjective`, DPO sigmoid, beta 0.1,
log-probabilities from the last hidden states a chunk at a time; for SFT the chunked cross-entropy
of the chosen rows), backward, the optimizer step.

Each variant runs in a fresh process. Peak memory is that process's peak resident set
(``ru_maxrss``), the model and the Python runtime included; "above the model" is that peak less
the resident set once the policy model is built, so a reference copy counts there. pairs/s is
``--pairs`` over the median time of ``--steps`` timed steps after one untimed step (an SFT step
trains on the pairs' chosen sequences: its pairs/s is chosen sequences per second).

The last line is ``RESULT peak_mb_adapters_off=... peak_mb_copy=... peak_mb_sft=...
pairs_per_s_adapters_off=... pairs_per_s_copy=... pairs_per_s_sft=... memory_ratio_copy_over_adapters_off=...``.
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
FIXTURE = "qwen2.5-7b-instruct"
VARIANTS = ("adapters_off", "copy", "sft")


def fixture() -> Path:
    return Path(os.environ.get("CARDTUNE_FIXTURES", REPO.parent / "shared" / "fixtures")) / "models" / FIXTURE


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build(hidden: int, layers: int):
    import torch
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fixture())
    heads = max(1, hidden // 64)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden, 2 * hidden, layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, max(1, heads // 4), hidden // heads
    config.max_window_layers, config.use_cache = layers, False
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(config).float().train(), config


def batch_of(pairs: int, prompt: int, answer: int, vocab: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    shared = torch.randint(10, vocab, (pairs, prompt), generator=g)
    chosen, rejected = (torch.randint(10, vocab, (pairs, answer), generator=g) for _ in range(2))
    ids = torch.cat([torch.cat([shared, chosen], 1), torch.cat([shared, rejected], 1)])
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def child(variant: str, pairs: int, prompt: int, answer: int, steps: int, hidden: int, layers: int) -> dict:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from cardtune.training.loss import ChunkedLossModel, probe_head
    from cardtune.training.preference.losses import PreferenceLoss
    from cardtune.training.preference.reference import AdapterDisabled, SeparateModel
    from cardtune.training.preference.trainer import PreferenceObjective

    base, config = build(hidden, layers)
    built = _rss_bytes()
    reference = SeparateModel(copy.deepcopy(base)) if variant == "copy" else AdapterDisabled()
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets))
    head = probe_head(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = batch_of(pairs, prompt, answer, config.vocab_size)
    chosen = {k: v[:pairs] for k, v in batch.items()}
    objective = PreferenceObjective(PreferenceLoss("sigmoid", beta=0.1), head, reference)

    def step() -> float:
        started = time.perf_counter()
        if variant == "sft":
            loss = ChunkedLossModel(model, head)(**chosen)["loss"]
        else:
            loss = objective(model, model, batch)[0].loss.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    step()
    times = [step() for _ in range(steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = statistics.median(times)
    params = sum(p.numel() for p in base.parameters())
    return {"variant": variant, "seconds": seconds, "pairs_per_s": pairs / seconds, "peak_bytes": peak,
            "above_model_bytes": peak - built, "params": params, "vocab": config.vocab_size,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=192)
    parser.add_argument("--answer", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = [str(x) for x in (args.pairs, args.prompt, args.answer, args.steps, args.hidden, args.layers)]
    if args.child:
        print(json.dumps(child(args.child, *map(int, shape))))
        return

    results = {}
    for variant in VARIANTS:
        options = ["--child", variant, "--pairs", shape[0], "--prompt", shape[1], "--answer", shape[2],
                   "--steps", shape[3], "--hidden", shape[4], "--layers", shape[5]]
        done = subprocess.run([sys.executable, __file__, *options], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])

    any_ = results["sft"]
    print(f"Qwen2ForCausalLM from {FIXTURE}'s config: vocabulary {any_['vocab']:,}, hidden {args.hidden}, "
          f"{args.layers} layers, {any_['params'] / 1e6:.0f}M parameters, float32, LoRA r=16; {args.pairs} pairs of "
          f"{args.prompt} + {args.answer} tokens; CPU, {any_['threads']} threads; one process per row")
    names = {"adapters_off": "DPO, reference: adapters disabled", "copy": "DPO, reference: separate copy",
             "sft": "SFT on the chosen sequences"}
    print(f"{'step':<36}{'s/step':>8}{'pairs/s':>9}{'peak MB':>9}{'above the model MB':>20}")
    for variant, r in results.items():
        print(f"{names[variant]:<36}{r['seconds']:>8.2f}{r['pairs_per_s']:>9.2f}{r['peak_bytes'] / 2**20:>9.0f}"
              f"{r['above_model_bytes'] / 2**20:>20.0f}")
    mb = {v: r["peak_bytes"] / 2**20 for v, r in results.items()}
    fields = [f"peak_mb_{v}={mb[v]:.0f}" for v in VARIANTS]
    fields += [f"pairs_per_s_{v}={results[v]['pairs_per_s']:.2f}" for v in VARIANTS]
    fields.append(f"memory_ratio_copy_over_adapters_off={mb['copy'] / mb['adapters_off']:.2f}")
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
