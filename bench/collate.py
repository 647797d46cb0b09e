"""Collation speed and exactness: cardtune's engine vs transformers' assistant mask.

Both sides label the same 1,000 conversations with the same llava-1.5 tokenizer, whose template
carries ``{% generation %}`` blocks, so transformers can compute an assistant mask itself
(``apply_chat_template(..., return_assistant_tokens_mask=True)``). "Exact" means: every
assistant turn is supervised, and each supervised span decodes to exactly the answer followed
by the end-of-turn token ``</s>``, nothing else.

    python bench/collate.py [--fixtures DIR] [--n 1000]

The last line is ``RESULT collate_ratio=<cardtune/baseline> cardtune_exact=<bool> baseline_exact=<bool>
floor_ratio_1thread=<floor/cardtune> floor_ratio_default=<floor/cardtune>``: the floor renders the
same batches and tokenizes each once (what any exact labeller must do), with one tokenizer thread
and with the default threads.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the cat dog red blue circle square image shows a small large bright dark left right "
         "near far two three many people car tree house sky water road sign text logo").split()


def conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    convs = []
    for _ in range(n):
        msgs = []
        for _turn in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": [{"type": "text", "text": sentence(4, 20)}]})
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": sentence(2, 40)}]})
        convs.append(msgs)
    return convs


def spans(labels_or_mask: list[int], ids: list[int], is_mask: bool) -> list[list[int]]:
    out, cur = [], []
    for tok, lab in zip(ids, labels_or_mask, strict=True):
        on = lab == 1 if is_mask else lab != -100
        if on:
            cur.append(tok)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def exact(tokenizer, conv: list[dict], got: list[list[int]], eot: str) -> bool:
    answers = [m["content"][0]["text"] for m in conv if m["role"] == "assistant"]
    if len(got) != len(answers):
        return False
    return all(tokenizer.decode(s, clean_up_tokenization_spaces=False).strip() == a + eot for s, a in zip(got, answers, strict=True))


def floor_ratio(encoder, tokenizer, samples, convs, bs: int, parallel: str, repeats: int = 3) -> float:
    """floor time / cardtune time, where the floor is what any exact labeller must do: render the
    same batches with the template and tokenize each batch once (same ids). ``parallel`` is
    TOKENIZERS_PARALLELISM ("false": one tokenizer thread; "true": the default thread pool);
    best of ``repeats`` for each side."""
    os.environ["TOKENIZERS_PARALLELISM"] = parallel
    batches = [(samples[i : i + bs], convs[i : i + bs]) for i in range(0, len(samples), bs)]
    best_ours = best_floor = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for batch, _ in batches:
            encoder.encode_batch(batch)
        best_ours = min(best_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _, conv in batches:
            texts = tokenizer.apply_chat_template(conv, tokenize=False)
            tokenizer(texts, add_special_tokens=False)
        best_floor = min(best_floor, time.perf_counter() - t0)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return best_floor / best_ours


def main() -> None:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.conversation import Processing, Sample
    from cardtune.loaders.resolve import resolve_model

    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=os.environ.get("CARDTUNE_FIXTURES", repo.parent / "shared" / "fixtures"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()

    resolved = resolve_model("llava-1.5-7b", Path(args.fixtures) / "models" / "llava-1.5-7b")
    tokenizer = resolved.loader().load_tokenizer()
    convs = conversations(args.n)
    samples = [Sample(str(i), c) for i, c in enumerate(convs)]
    encoder = ChatEncoder(resolved.card, Processing(tokenizer))
    eot = tokenizer.eos_token

    # warm-up both paths once (template compilation, caches)
    encoder.encode_batch(samples[:2])
    tokenizer.apply_chat_template(convs[0], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    # Both sides get the same batches, as a collator would (batch size --batch); each side's
    # best of 3 passes, taken in turn, so a busy machine slows both alike.
    bs = args.batch
    t_ours = t_base = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        ours = [e for i in range(0, len(samples), bs) for e in encoder.encode_batch(samples[i : i + bs])]
        t_ours = min(t_ours, time.perf_counter() - t0)

        t0 = time.perf_counter()
        base = []
        for i in range(0, len(convs), bs):
            out = tokenizer.apply_chat_template(
                convs[i : i + bs], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            base += [{"input_ids": ids, "assistant_masks": m}
                     for ids, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        t_base = min(t_base, time.perf_counter() - t0)

    floor = {mode: floor_ratio(encoder, tokenizer, samples, convs, bs, mode) for mode in ("false", "true")}

    ours_exact = all(exact(tokenizer, c, spans(e.labels, e.input_ids, False), eot) for c, e in zip(convs, ours, strict=True))
    base_exact = all(
        exact(tokenizer, c, spans(b["assistant_masks"], b["input_ids"], True), eot) for c, b in zip(convs, base, strict=True)
    )
    example = spans(base[0]["assistant_masks"], base[0]["input_ids"], True)
    print(f"{'':28s}{'samples/s':>12s}{'exact':>8s}")
    print(f"{'cardtune ChatEncoder':28s}{args.n / t_ours:12.0f}{str(ours_exact):>8s}")
    print(f"{'HF assistant_tokens_mask':28s}{args.n / t_base:12.0f}{str(base_exact):>8s}")
    print(f"baseline's first supervised span decodes to {tokenizer.decode(example[0])!r}" if example else
          "baseline supervised nothing in the first sample")
    print(f"encode_batch / (render + batched encode of the same conversations): "
          f"{floor['false']:.2f}x with one tokenizer thread, {floor['true']:.2f}x with the default threads")
    print(f"RESULT collate_ratio={t_base / t_ours:.2f} cardtune_exact={str(ours_exact).lower()} "
          f"baseline_exact={str(base_exact).lower()} floor_ratio_1thread={floor['false']:.2f} "
          f"floor_ratio_default={floor['true']:.2f}")


if __name__ == "__main__":
    main()
