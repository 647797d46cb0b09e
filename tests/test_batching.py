"""Batches without wasted padding: length estimates, the length-grouped sampler (distributed,
modality-aware), packing without cross-contamination, and the padding benchmark."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cardtune.collators.engine import IGNORE_INDEX, Encoded
from cardtune.conversation import Sample
from cardtune.datasets import (
    LengthGroupedBatchSampler,
    MediaConfig,
    block_diagonal_mask,
    collate_packed,
    estimate_lengths,
    load_samples,
    pack,
    plan_packs,
    tokens_per_image_from_encoder,
)
from cardtune.registry.errors import CapabilityError
from tests.conftest import require_fixture

REPO = Path(__file__).resolve().parents[1]


def lognormal(n: int, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).lognormal(np.log(300), 1.0, n), 16, 2048).astype(int)


def real_fraction(batches, lengths) -> float:
    return sum(int(lengths[b].sum()) for b in batches) / sum(len(b) * int(lengths[b].max()) for b in batches)


# -- length estimates ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_encoder():
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model("llava-1.5-7b", require_fixture("llava-1.5-7b"))
    return ChatEncoder(resolved.card, load_processing(resolved))


def test_estimates_track_encoded_lengths(llava_encoder, tmp_path: Path) -> None:
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "a.png")
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    rng = np.random.default_rng(1)
    records = []
    for i in range(24):
        q = " ".join(rng.choice(words, rng.integers(1, 60)))
        a = " ".join(rng.choice(words, rng.integers(1, 120)))
        r = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if i % 2 else "") + q},
                                             {"from": "gpt", "value": a}]}
        if i % 2:
            r["image"] = "a.png"
        records.append(r)
    (tmp_path / "d.json").write_text(json.dumps(records))
    samples = load_samples(str(tmp_path / "d.json"))
    per_image = tokens_per_image_from_encoder(llava_encoder, (336, 336))
    assert per_image == 576
    cfg = MediaConfig(image_folder=str(tmp_path))
    estimates = estimate_lengths(samples, llava_encoder.tokenizer, per_image, tokens_per_turn=4, media=cfg)
    from cardtune.datasets import load_media

    actual = [len(llava_encoder.encode(s, load_media(s, cfg)).input_ids) for s in samples]
    for est, act in zip(estimates, actual, strict=True):
        assert abs(est - act) <= 6, (est, act)


def test_size_dependent_tokens_read_the_header_only(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "r.jpg", exif=exif)
    Image.new("RGB", (30, 10)).save(tmp_path / "p.png")
    sample = Sample("s", [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], images=["r.jpg", "p.png"])
    seen = []

    def per_size(wh):
        seen.append(wh)
        return wh[0] * wh[1] // 100

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)

    class Tok:
        def __call__(self, texts, add_special_tokens):
            return {"input_ids": [[0] * len(t.split()) for t in texts]}

    (n,) = estimate_lengths([sample], Tok(), per_size, media=MediaConfig(image_folder=str(tmp_path)))
    assert seen == [(20, 40), (30, 10)]  # EXIF orientation 6 swaps width and height
    assert n == 8 + 3


# -- the sampler --------------------------------------------------------------------------------
def test_length_grouping_batches_similar_lengths() -> None:
    lengths = lognormal(2000)
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(2000))
    assert len(batches) == len(sampler) == 250
    assert real_fraction(batches, lengths) > 0.95
    shuffled = list(LengthGroupedBatchSampler(lengths, 8, seed=0, group_by_length=False))
    assert real_fraction(shuffled, lengths) < 0.5
    assert max(lengths[batches[0]]) == lengths.max()  # the longest batch first: OOM shows at step 1
    assert batches == list(LengthGroupedBatchSampler(lengths, 8, seed=0))  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_get_disjoint_data(drop_last: bool) -> None:
    lengths = lognormal(1000, seed=2)
    per_rank = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r, seed=5, drop_last=drop_last))
                for r in range(2)]
    a, b = ({i for batch in batches for i in batch} for batches in per_rank)
    assert len(per_rank[0]) == len(per_rank[1]) == len(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=0,
                                                                                  drop_last=drop_last))
    assert not a & b
    assert len(a | b) == 1000  # 1000 = 125 steps of 2 x 4: nothing dropped, nothing repeated
    # the same step on both ranks holds similar lengths (no rank waits for a long one)
    for x, y in zip(*per_rank, strict=True):
        assert abs(int(lengths[x].max()) - int(lengths[y].max())) <= max(64, 0.1 * int(lengths[x].max()))
    both = list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=None, seed=5, drop_last=drop_last))
    assert both[0::2] == per_rank[0] and both[1::2] == per_rank[1]  # accelerate's round-robin order


def test_uneven_last_step_is_padded_or_dropped() -> None:
    lengths = lognormal(10)
    kept = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r)) for r in range(2)]
    assert len(kept[0]) == len(kept[1]) == 2  # 3 batches -> 2 steps, one batch repeated
    dropped = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r, drop_last=True)) for r in range(2)]
    assert len(dropped[0]) == len(dropped[1]) == 1 and all(len(b) == 4 for d in dropped for b in d)


def test_no_text_only_batches() -> None:
    lengths = lognormal(800, seed=3)
    media = np.random.default_rng(3).random(800) < 0.25
    sampler = LengthGroupedBatchSampler(lengths, 8, media=media, modality="no_text_only", seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(800))
    assert all(media[b].any() for b in batches)
    assert real_fraction(batches, lengths) > 0.85
    with pytest.raises(ValueError, match="ZeRO-3"):
        list(LengthGroupedBatchSampler(lengths, 8, media=np.arange(800) < 20, modality="no_text_only"))


def test_separate_modalities_never_mix() -> None:
    lengths = lognormal(400, seed=4)
    media = np.arange(400) % 3 == 0
    per_rank = [list(LengthGroupedBatchSampler(lengths, 4, num_replicas=2, rank=r, media=media, modality="separate"))
                for r in range(2)]
    for x, y in zip(*per_rank, strict=True):
        kinds = {bool(media[i]) for i in x + y}
        assert len(kinds) == 1  # one step, both ranks: all text or all media
    covered = {i for batches in per_rank for b in batches for i in b}
    assert covered == set(range(400))


# -- packing ------------------------------------------------------------------------------------
def test_first_fit_decreasing() -> None:
    assert plan_packs([5, 7, 3, 2, 9, 1], 10) == [[4, 5], [1, 2], [0, 3]]
    lengths = lognormal(3000, seed=6).tolist()
    rows = plan_packs(lengths, 2048)
    assert sorted(i for r in rows for i in r) == list(range(3000))
    assert all(sum(lengths[i] for i in r) <= 2048 for r in rows)
    assert sum(lengths) / (len(rows) * 2048) > 0.97
    with pytest.raises(ValueError, match="longer than max_length"):
        plan_packs([3, 11], 10)


def _encoded(sample_id: str, n: int, seed: int) -> Encoded:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 100, n).tolist()
    labels = [t if k >= n // 2 else IGNORE_INDEX for k, t in enumerate(ids)]  # a prompt, then an answer
    return Encoded(sample_id, ids, labels)


def test_pack_rows_restart_positions_and_stop_labels_at_boundaries() -> None:
    encoded = [_encoded("a", 5, 0), _encoded("b", 7, 1), _encoded("c", 4, 2)]
    encoded[1].labels[0] = encoded[1].input_ids[0]  # a sample whose first token would be trained
    (row,) = pack(encoded, 16)
    assert row.sample_ids == ["b", "a", "c"] and row.seq_lens == [7, 5, 4] and row.cu_seqlens == [0, 7, 12, 16]
    assert row.position_ids == [*range(7), *range(5), *range(4)]
    bounds = list(zip(row.cu_seqlens, row.cu_seqlens[1:], strict=False))
    for (start, end), e in zip(bounds, [encoded[1], encoded[0], encoded[2]], strict=True):
        assert row.input_ids[start:end] == e.input_ids
        assert row.labels[start] == IGNORE_INDEX  # never the target of the previous sample's last token
        assert row.labels[start + 1 : end] == e.labels[1:]


def test_block_diagonal_mask() -> None:
    allowed = block_diagonal_mask([[2, 3], [4]], 6, torch.bool)
    assert allowed.shape == (2, 1, 6, 6)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only: no NaN row
    ], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], expected)
    additive = block_diagonal_mask([[2, 3], [4]], 6)
    assert torch.equal(additive == 0, allowed) and additive.min() == torch.finfo(torch.float32).min


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("attention", ["block_mask", "padding_free"])
def test_packed_forward_equals_separate_forwards(tiny_llama, attention: str) -> None:
    encoded = [_encoded(str(k), n, k) for k, n in enumerate([9, 5, 12, 7, 3, 6])]
    rows = pack(encoded, 16)
    assert len(rows) > 1 and any(len(r.seq_lens) > 1 for r in rows)
    batch = collate_packed(rows, pad_id=0, attention=attention)
    with torch.no_grad():
        packed = tiny_llama(**batch)
        by_id = {e.sample_id: e for e in encoded}
        offset, total_loss, total_tokens = 0, 0.0, 0
        for r, row in enumerate(rows):
            for sid, start, end in zip(row.sample_ids, row.cu_seqlens, row.cu_seqlens[1:], strict=False):
                e = by_id[sid]
                alone = tiny_llama(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
                if attention == "padding_free":  # every row flattened into one sequence
                    got = packed.logits[0, offset + start : offset + end]
                else:
                    got = packed.logits[r, start:end]
                torch.testing.assert_close(got, alone.logits[0], atol=1e-5, rtol=1e-4)
                n = sum(1 for x in e.labels[1:] if x != IGNORE_INDEX)
                total_loss += alone.loss.item() * n
                total_tokens += n
            offset += len(row)
    packed_loss = packed.loss
    assert packed_loss.item() == pytest.approx(total_loss / total_tokens, rel=1e-5)


def test_packing_refused_where_the_card_says_unsupported() -> None:
    from cardtune.registry import get_registry

    with pytest.raises(CapabilityError, match="capabilities.packing: unsupported"):
        pack([_encoded("a", 4, 0)], 8, card=get_registry().get("llava-1.5-7b").family)
    assert pack([_encoded("a", 4, 0)], 8, card=get_registry().get("mistral-7b-instruct-v0.2").family)


# -- the benchmark ------------------------------------------------------------------------------
def test_padding_benchmark(capsys) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import padding
    finally:
        sys.path.pop(0)
    assert padding.main([]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"RESULT static=([\d.]+) random=([\d.]+) grouped=([\d.]+) packed=([\d.]+)", last)
    assert match, last
    static, random_, grouped, packed = map(float, match.groups())
    assert static < random_ < grouped and grouped >= 0.95 and packed >= 0.95


def test_dataloader_end_to_end_mixes_text_only_samples(llava_encoder, tmp_path: Path) -> None:
    """Text-only and image samples through the real encoder and collator, batched by the
    sampler in a DataLoader worker: no text-only batch, pixel_values only for the images."""
    from torch.utils.data import DataLoader

    from cardtune.datasets import ConversationDataset

    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "a.png")
    records = [{"id": str(i), "conversations": [
        {"from": "human", "value": ("<image>\n" if i % 4 == 0 else "") + "Describe " * (i + 1)},
        {"from": "gpt", "value": "Fine. " * (i % 5 + 1)}], **({"image": "a.png"} if i % 4 == 0 else {})}
        for i in range(16)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    samples = load_samples(str(tmp_path / "d.json"))
    ds = ConversationDataset(samples, MediaConfig(image_folder=str(tmp_path)), llava_encoder)
    lengths = estimate_lengths(samples, llava_encoder.tokenizer, 576, media=ds.media)
    sampler = LengthGroupedBatchSampler(lengths, 4, media=ds.media_flags(), modality="no_text_only")
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=llava_encoder.handler, num_workers=1)
    seen = []
    for batch, ids in zip(loader, sampler, strict=True):
        n_images = sum(1 for i in ids if records[i].get("image"))
        assert n_images >= 1 and batch["pixel_values"].shape[0] == n_images
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        seen += ids
    assert sorted(seen) == list(range(16))
