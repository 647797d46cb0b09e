"""Is the demo task learnable? Train the demo model with plain torch AdamW and watch the loss.

Not a test and not cardtune's trainer: a sanity check of the demo model and dataset alone.
Conversations are rendered with the demo processor's own chat template; labels are the
input ids with padding and image tokens set to -100 (no assistant masking).

    python bench/demo_overfit.py [--steps 200] [--batch_size 8] [--lr 1e-3] [--threads 2] [--lora]

``--lora`` trains only LoRA adapters on the language model's linear layers (needs peft), as a
LoRA run of the demo would. It ends with the share of eval answers that greedy generation
reproduces exactly, then the line
``RESULT loss_start=<first 10 steps> loss_end=<last 10 steps> eval_start=… eval_end=… wall_s=… cpu_s=…``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROLES = {"human": "user", "gpt": "assistant"}


def load_split(folder: Path, file: str) -> list[tuple[list[dict[str, str]], list[Any]]]:
    from PIL import Image

    from cardtune.demo import IMAGE_DIR

    samples = []
    for sample in json.loads((folder / file).read_text(encoding="utf-8")):
        names = sample.get("image", [])
        names = [names] if isinstance(names, str) else names
        images = [Image.open(folder / IMAGE_DIR / name).convert("RGB") for name in names]
        messages = [
            {"role": ROLES[turn["from"]], "content": turn["value"]} for turn in sample["conversations"]
        ]
        samples.append((messages, images))
    return samples


def make_batch(processor: Any, samples: list[tuple[list[dict[str, str]], list[Any]]]) -> dict[str, Any]:
    texts = [processor.apply_chat_template(messages, tokenize=False) for messages, _ in samples]
    images = [image for _, sample_images in samples for image in sample_images]
    batch = processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == processor.tokenizer.convert_tokens_to_ids(processor.image_token)] = -100
    batch["labels"] = labels
    return batch


def mean_loss(model: Any, batches: list[dict[str, Any]]) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def answer_accuracy(
    model: Any, processor: Any, samples: list[tuple[list[dict[str, str]], list[Any]]]
) -> float:
    """Share of samples whose last answer greedy generation reproduces exactly."""
    import torch

    model.eval()
    right = 0
    for messages, images in samples:
        prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += answer.strip() == messages[-1]["content"]
    model.train()
    return right / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the LLM only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from cardtune.demo import EVAL_FILE, TRAIN_FILE, ensure_demo_dataset, ensure_demo_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model_dir, data_dir = ensure_demo_model(), ensure_demo_dataset()
    print(f"model {model_dir}\ndata  {data_dir}  (build/cache {time.perf_counter() - started:.2f}s)")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(
        f"trainable parameters: {sum(p.numel() for p in trainable):,} of {sum(p.numel() for p in model.parameters()):,}"
    )

    train, evaluation = load_split(data_dir, TRAIN_FILE), load_split(data_dir, EVAL_FILE)
    eval_batches = [make_batch(processor, evaluation[i : i + 16]) for i in range(0, len(evaluation), 16)]
    eval_start = mean_loss(model, eval_batches)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    rng, order, losses = random.Random(args.seed), [], []
    train_started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order += rng.sample(range(len(train)), len(train))
        batch = make_batch(processor, [train[order.pop()] for _ in range(args.batch_size)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.3f}")
    train_s, cpu_s = time.perf_counter() - train_started, time.process_time() - cpu_started
    eval_end = mean_loss(model, eval_batches)
    start, end = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    # On a busy machine wall time misleads. With --threads 1, CPU seconds are what an idle
    # machine would take; with more threads, workers that spin while waiting inflate them.
    print(
        f"{args.steps} steps of {args.batch_size} in {train_s:.1f}s wall, {cpu_s:.1f} CPU-s on {args.threads} threads"
        f" ({'LoRA' if args.lora else 'full'}, lr {args.lr})"
    )
    print(
        f"eval answers reproduced exactly by greedy generation: {answer_accuracy(model, processor, evaluation):.0%}"
    )
    print(
        f"RESULT loss_start={start:.3f} loss_end={end:.3f} eval_start={eval_start:.3f} "
        f"eval_end={eval_end:.3f} wall_s={train_s:.1f} cpu_s={cpu_s:.1f}"
    )


if __name__ == "__main__":
    main()
