"""Batches without wasted padding: cheap length estimates, a length-grouped (and distributed,
modality-aware) batch sampler, and packing of several samples into one row.

Padding a batch to its longest sample is the collator's job; this module decides which samples
share a batch (similar lengths), or a row (packing: position ids restart per sample, attention
kept inside each sample, and the first token of a sample is never a target of the one before).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from cardtune.conversation import Sample, message_text
from cardtune.data.media import MediaConfig, MediaProblem, image_size

IGNORE_INDEX = -100
TokensPerImage = int | Callable[[tuple[int, int]], int]
ModalityMode = Literal["mixed", "no_text_only", "separate"]


def has_media(sample: Sample) -> bool:
    return bool(sample.images or sample.videos)


# -- lengths ------------------------------------------------------------------------------------
def estimate_lengths(
    samples: Sequence[Sample],
    tokenizer: Any,
    tokens_per_image: TokensPerImage = 0,
    *,
    tokens_per_video: int = 0,
    tokens_per_turn: int = 0,
    media: MediaConfig | None = None,
    chunk: int = 1024,
) -> list[int]:
    """Token counts without loading any pixels: the turns' text through the tokenizer (in
    batches), plus ``tokens_per_turn`` of template per message, plus media tokens.

    ``tokens_per_image`` is a family constant (llava-1.5: 576) or, for families whose count
    depends on the image size, a function of ``(width, height)``, read from the file header
    (see :func:`tokens_per_image_from_encoder`). An image whose header cannot be read counts 0;
    validation reports it.
    """
    media = media or MediaConfig()
    lengths: list[int] = []
    batch: list[Sample] = []

    def flush() -> None:
        texts = ["\n".join(t for m in s.messages if isinstance(t := message_text_safe(m), str)) for s in batch]
        counts = tokenizer(texts, add_special_tokens=False)["input_ids"]
        for s, ids in zip(batch, counts, strict=True):
            n = len(ids) + tokens_per_turn * len(s.messages) + tokens_per_video * len(s.videos)
            n += sum(_image_tokens(ref, tokens_per_image, media) for ref in s.images)
            lengths.append(n)
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) >= chunk:
            flush()
    if batch:
        flush()
    return lengths


def message_text_safe(message: dict[str, Any]) -> str:
    try:
        return message_text(message)
    except TypeError:  # a non-string turn (validation reports it)
        return ""


def _image_tokens(ref: Any, tokens_per_image: TokensPerImage, media: MediaConfig) -> int:
    if isinstance(tokens_per_image, int):
        return tokens_per_image
    try:
        return tokens_per_image(image_size(ref, media))
    except (MediaProblem, OSError):
        return 0


def tokens_per_image_from_encoder(encoder: Any, size: tuple[int, int] | None = None) -> TokensPerImage:
    """Media tokens one image becomes, measured by encoding a blank image with the real encoder.

    With ``size``: that count as a constant (fixed-resolution families). Without: a function of
    the image size, measured once per distinct size (size-dependent families: anyres, qwen2-vl).
    """
    from PIL import Image

    from cardtune.conversation import Media

    probe = Sample(
        "length-probe",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
        images=["probe"],
    )
    cache: dict[tuple[int, int], int] = {}

    def count(wh: tuple[int, int]) -> int:
        if wh not in cache:
            encoded = encoder.encode(probe, Media(images=[Image.new("RGB", wh)]))
            cache[wh] = sum(1 for t in encoded.input_ids if t in encoder.media_token_ids)
        return cache[wh]

    return count(size) if size is not None else count


# -- batch sampler ------------------------------------------------------------------------------
class LengthGroupedBatchSampler:
    """Batches of similar lengths, in a deterministic shuffled order, for one rank or all.

    Indices are shuffled (``seed`` + epoch), cut into megabatches of ``megabatch_mult`` global
    steps, sorted by length inside each, and cut into batches; consecutive batches (closest in
    length) form one step across ranks, and steps are shuffled (the longest step first, so an
    out-of-memory shows at once). ``rank`` r of ``num_replicas`` gets batch r of every step:
    ranks never share a sample (except the repeats that even out the last step unless
    ``drop_last``). ``rank=None`` yields every rank's batch step by step, the order that
    accelerate's ``BatchSamplerShard`` deals out round-robin.

    ``modality`` (``media`` flags per sample):
    ``no_text_only`` - every batch holds at least one media sample: under DeepSpeed ZeRO-3 a
    rank whose batch skips the vision tower hangs the others;
    ``separate`` - batches (and steps) are all-text or all-media, for collators that cannot mix.
    ``group_by_length=False`` gives plain shuffled batches with the same guarantees.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int | None = 0,
        seed: int = 0,
        megabatch_mult: int = 64,
        drop_last: bool = False,
        group_by_length: bool = True,
        longest_first: bool = True,
        media: Sequence[bool] | None = None,
        modality: ModalityMode = "mixed",
    ) -> None:
        if batch_size < 1 or num_replicas < 1:
            raise ValueError("batch_size and num_replicas must be at least 1")
        if rank is not None and not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if modality != "mixed" and media is None:
            raise ValueError(f"modality={modality!r} needs the media flag of every sample")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.media = np.asarray(media, dtype=bool) if media is not None else None
        if self.media is not None and len(self.media) != len(self.lengths):
            raise ValueError("media flags and lengths differ in count")
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.drop_last = drop_last
        self.group_by_length = group_by_length
        self.longest_first = longest_first
        self.modality = modality
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- building -----------------------------------------------------------------------------
    def _batches(self, indices: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        indices = indices[rng.permutation(len(indices))]
        if not self.group_by_length:
            return [indices[i : i + self.batch_size].tolist() for i in range(0, len(indices), self.batch_size)]
        size = self.batch_size * self.num_replicas * self.megabatch_mult
        batches: list[list[int]] = []
        for start in range(0, len(indices), size):
            mega = indices[start : start + size]
            mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            batches += [mega[i : i + self.batch_size].tolist() for i in range(0, len(mega), self.batch_size)]
        return batches

    def _steps(self, batches: list[list[int]]) -> list[list[list[int]]]:
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        w = self.num_replicas
        steps = [batches[i : i + w] for i in range(0, len(batches), w)]
        if steps and len(steps[-1]) < w:
            if self.drop_last:
                steps.pop()
            else:  # even out the last step with repeats, as DistributedSampler does
                steps[-1] += [batches[k % len(batches)] for k in range(w - len(steps[-1]))]
        return steps

    def steps(self) -> list[list[list[int]]]:
        """Every step of this epoch: ``num_replicas`` batches each, in training order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        everything = np.arange(len(self.lengths))
        if self.modality == "separate":
            assert self.media is not None
            groups = [everything[~self.media], everything[self.media]]
            steps = [s for g in groups if len(g) for s in self._steps(self._batches(g, rng))]
        else:
            batches = self._batches(everything, rng)
            if self.modality == "no_text_only":
                batches = self._no_text_only(batches)
            steps = self._steps(batches)
        order = rng.permutation(len(steps)).tolist()
        if self.longest_first and self.group_by_length and steps:
            longest = max(range(len(steps)), key=lambda k: max(self.lengths[b].max(initial=0) for b in steps[k]))
            order.remove(longest)
            order.insert(0, longest)
        return [steps[k] for k in order]

    def _no_text_only(self, batches: list[list[int]]) -> list[list[int]]:
        """Swap one media sample into each text-only batch, from a batch holding two or more,
        choosing the media sample closest in length to keep batches grouped."""
        assert self.media is not None
        media = self.media
        count = [int(media[b].sum()) for b in batches]
        targets = [k for k, c in enumerate(count) if c == 0]
        if not targets:
            return batches
        spares = sorted((int(self.lengths[i]), k, i) for k, b in enumerate(batches) if count[k] > 1 for i in b if media[i])
        if len(targets) > sum(c - 1 for c in count if c > 1):
            raise ValueError(
                f"{len(targets)} batches would hold only text but there are too few media samples to give each one "
                f"(batch size {self.batch_size}, {int(media.sum())} media samples): under DeepSpeed ZeRO-3 a rank "
                "with a text-only batch hangs. Add media samples, lower the batch size, or use modality='mixed'."
            )
        batches = [list(b) for b in batches]
        for k in targets:
            target = batches[k]
            mid = int(np.median(self.lengths[target]))
            pos = bisect.bisect_left(spares, (mid, -1, -1))
            candidates = [p for p in (pos - 1, pos) if 0 <= p < len(spares)]
            p = min(candidates, key=lambda q: abs(spares[q][0] - mid))
            length, donor, m = spares.pop(p)
            t = min(target, key=lambda i: abs(int(self.lengths[i]) - length))
            target[target.index(t)] = m
            batches[donor][batches[donor].index(m)] = t
            count[donor] -= 1
            if count[donor] == 1:  # its last media sample must stay
                spares = [s for s in spares if s[1] != donor]
        return batches

    # -- iterating ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps():
            if self.rank is None:
                yield from step
            else:
                yield step[self.rank]

    def __len__(self) -> int:
        if self.modality == "separate" or (self.drop_last and self.group_by_length):
            n = len(self.steps())
        else:
            full, rest = divmod(len(self.lengths), self.batch_size)
            batches = full if self.drop_last else full + (rest > 0)
            n = batches // self.num_replicas if self.drop_last else math.ceil(batches / self.num_replicas)
        return n * (self.num_replicas if self.rank is None else 1)


# -- packing ------------------------------------------------------------------------------------
@dataclass
class PackedRow:
    """Several encoded samples in one row; ``seq_lens`` are their lengths, in order."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]
    sample_ids: list[str]
    media_tensors: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def cu_seqlens(self) -> list[int]:
        """Cumulative boundaries ``[0, n1, n1+n2, ...]`` (FlashAttention's ``cu_seqlens``)."""
        return [0, *np.cumsum(self.seq_lens).tolist()]


def plan_packs(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing: indices per row, each row's total at most ``max_length``."""
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} samples are longer than max_length {max_length} (first: index {too_long[0]}); "
                         "encode with the same max_length so they are truncated or reported")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # A max-tree over the rows' free room finds the first row that fits in O(log n).
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    tree = [0] * (2 * size)  # room per row; unopened rows have 0 room until opened
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if tree[1] >= n and rows:
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= n else 2 * node + 1
            row = node - size
            rows[row].append(i)
            room = tree[node] - n
        else:
            row = len(rows)
            rows.append([i])
            node = size + row
            room = max_length - n
        tree[node] = room
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def check_packing(card: Any) -> None:
    """Refuse packing where the family's card says its model does not support it."""
    from cardtune.registry.errors import CapabilityError

    if card.capabilities.packing == "unsupported":
        raise CapabilityError(
            f"family {card.family} does not support packing (card: capabilities.packing: unsupported); "
            "train without packing (length grouping keeps padding low)"
        )


def pack(encoded: Sequence[Any], max_length: int, *, card: Any | None = None) -> list[PackedRow]:
    """Encoded samples (``input_ids``, ``labels``, ``media_tensors``) packed into rows.

    Position ids restart at 0 for each sample. Each sample's first label is -100: after the
    causal shift it would be the target of the previous sample's last token (it is never a
    target unpacked either), so nothing crosses a boundary, as in transformers'
    ``DataCollatorWithFlattening``. Media tensors are concatenated along their first axis in
    sample order.
    """
    import torch

    if card is not None:
        check_packing(card)
    rows: list[PackedRow] = []
    for members in plan_packs([len(e.input_ids) for e in encoded], max_length):
        row = PackedRow([], [], [], [], [])
        media: dict[str, list[Any]] = {}
        for i in members:
            e = encoded[i]
            n = len(e.input_ids)
            row.input_ids += list(e.input_ids)
            row.labels += [IGNORE_INDEX, *list(e.labels)[1:]]
            row.position_ids += list(range(n))
            row.seq_lens.append(n)
            row.sample_ids.append(getattr(e, "sample_id", str(i)))
            for key, value in (getattr(e, "media_tensors", None) or {}).items():
                media.setdefault(key, []).append(value)
        row.media_tensors = {k: torch.cat(v, dim=0) for k, v in media.items()}
        rows.append(row)
    return rows


def block_diagonal_mask(seq_lens: Sequence[Sequence[int]], length: int | None = None, dtype: Any = None) -> Any:
    """A 4-D mask ``[rows, 1, length, length]`` for SDPA/eager: causal inside each sample,
    nothing across samples. Float dtypes are additive (0 or the dtype's minimum), ``torch.bool``
    is True where attention is allowed. Padding after the last sample attends to itself only
    (a fully masked row would give NaN)."""
    import torch

    dtype = dtype or torch.float32
    length = length or max(sum(r) for r in seq_lens)
    segment = torch.full((len(seq_lens), length), -1, dtype=torch.long)
    for r, lens in enumerate(seq_lens):
        start = 0
        for k, n in enumerate(lens):
            segment[r, start : start + n] = k
            start += n
    same = segment[:, :, None] == segment[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = (same & causal & (segment[:, :, None] >= 0)) | torch.eye(length, dtype=torch.bool)
    allowed = allowed[:, None]
    if dtype == torch.bool:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def collate_packed(
    rows: Sequence[PackedRow],
    pad_id: int,
    *,
    attention: Literal["padding_free", "block_mask"] = "padding_free",
    pad_to_multiple_of: int | None = None,
    mask_dtype: Any = None,
) -> dict[str, Any]:
    """A batch of packed rows.

    ``padding_free`` (FlashAttention-2, or any kernel through transformers' packed-sequence
    detection): all rows flattened into one ``[1, total]`` sequence, no attention mask,
    ``position_ids`` restarting per sample, plus ``cu_seq_lens_q/k``, ``max_length_q/k`` and
    ``use_cache=False`` (a cache turns transformers' packed-sequence detection off).
    ``block_mask`` (SDPA/eager on CPU): rows padded to the longest, a 4-D block-diagonal mask.
    """
    import torch

    media: dict[str, list[Any]] = {}
    for row in rows:
        for k, v in row.media_tensors.items():
            media.setdefault(k, []).append(v)
    batch: dict[str, Any] = {k: torch.cat(v, dim=0) for k, v in media.items()}
    if attention == "padding_free":
        lens = [n for row in rows for n in row.seq_lens]
        cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
        batch.update(
            input_ids=torch.tensor([[t for r in rows for t in r.input_ids]], dtype=torch.long),
            labels=torch.tensor([[t for r in rows for t in r.labels]], dtype=torch.long),
            position_ids=torch.tensor([[t for r in rows for t in r.position_ids]], dtype=torch.long),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lens), max_length_k=max(lens),
            # transformers detects packed sequences from position_ids only without a KV cache:
            # with the default use_cache=True, SDPA/eager would attend across samples.
            use_cache=False,
        )
        return batch
    if attention != "block_mask":
        raise ValueError(f"unknown attention {attention!r} (padding_free or block_mask)")
    longest = max(len(r) for r in rows)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row)
        input_ids[r, :n] = torch.tensor(row.input_ids)
        labels[r, :n] = torch.tensor(row.labels)
        position_ids[r, :n] = torch.tensor(row.position_ids)
    batch.update(
        input_ids=input_ids, labels=labels, position_ids=position_ids,
        attention_mask=block_diagonal_mask([r.seq_lens for r in rows], longest, mask_dtype),
    )
    return batch
