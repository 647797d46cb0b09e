"""The run's data: samples read and validated before step 1 (with the policy), lengths for
length grouping and packing taken from the validation pass itself, and the datasets and
collators the Trainer gets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.conversation import Sample
from cardtune.datasets import (
    ConversationDataset,
    DataValidationError,
    MediaConfig,
    PackedRow,
    Report,
    apply_policy,
    check_packing,
    collate_packed,
    estimate_lengths,
    has_media,
    load_media,
    load_samples,
    pack,
    plan_packs,
    validate,
)


class DataStop(RuntimeError):
    """Validation found problems and the policy is ``error``: nothing was trained."""

    def __init__(self, split: str, report: Report) -> None:
        self.report = report
        super().__init__(
            f"the {split} data has problems; nothing was trained. Fix them, or drop exactly these samples "
            f"with --bad_sample_policy skip:\n{report.format_table(limit=50)}"
        )


class _LengthRecorder:
    """Wraps the encoder during validation and keeps each encoded sample's exact length,
    so length grouping and packing need no second pass."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.lengths: dict[tuple[str, str], int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode(self, sample: Sample, media: Any = None) -> Any:
        encoded = self._encoder.encode(sample, media)
        self.lengths[(sample.id, sample.source)] = len(encoded.input_ids)
        return encoded


@dataclass
class SplitData:
    samples: Sequence[Sample]
    lengths: list[int]
    report: Report
    media_flags: list[bool] = field(default_factory=list)


def prepare_split(
    split: str,
    data_path: str,
    encoder: Any,
    card: Any,
    *,
    image_folder: str | None,
    video_folder: str | None,
    policy: str,
    output_dir: str | None,
    seed: int,
    log: Any = print,
) -> SplitData:
    """Read, validate (every sample encoded once) and apply the policy to one split."""
    samples = load_samples(data_path, seed=seed)
    recorder = _LengthRecorder(encoder)
    report = validate(samples, recorder, card=card, image_folder=image_folder, video_folder=video_folder)
    log(f"data ({split}): {data_path}: {report.summary()}")
    try:
        kept = apply_policy(report, samples, policy, output_dir if split == "train" else
                            (Path(output_dir) / "eval" if output_dir else None), log=log)
    except DataValidationError as exc:
        raise DataStop(split, exc.report) from None
    missing = [s for s in kept if (s.id, s.source) not in recorder.lengths]
    if missing:  # not encoded by validation (should not happen): estimate them
        estimated = dict(zip(((s.id, s.source) for s in missing), estimate_lengths(missing, encoder.tokenizer), strict=True))
        recorder.lengths.update(estimated)
    lengths = [recorder.lengths[(s.id, s.source)] for s in kept]
    return SplitData(kept, lengths, report, [has_media(s) for s in kept])


def media_config(card: Any, image_folder: str | None, video_folder: str | None) -> MediaConfig:
    return MediaConfig.from_card(card, image_folder=image_folder, video_folder=video_folder)


def conversation_dataset(split: SplitData, card: Any, encoder: Any, image_folder: str | None,
                         video_folder: str | None) -> ConversationDataset:
    return ConversationDataset(split.samples, media_config(card, image_folder, video_folder), encoder)


class PackedDataset:
    """Rows of several samples each, planned from the exact lengths (first-fit decreasing);
    a row's samples are encoded, and their media loaded, when the row is read."""

    def __init__(self, split: SplitData, card: Any, encoder: Any, media: MediaConfig, max_length: int) -> None:
        check_packing(card)
        self.samples = split.samples
        self.encoder = encoder
        self.media = media
        self.max_length = max_length
        self.card = card
        self.rows = plan_packs(split.lengths, max_length)
        self.lengths = [sum(split.lengths[i] for i in row) for row in self.rows]
        self.media_flags = [any(split.media_flags[i] for i in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PackedRow:
        encoded = [self.encoder.encode(self.samples[i], load_media(self.samples[i], self.media))
                   for i in self.rows[index]]
        (row,) = pack(encoded, self.max_length)
        return row


class PackedCollator:
    """Packed rows to a batch: padding-free for FlashAttention-2, block-diagonal masks otherwise.
    Unpacked items (the eval split is not packed) go to the family collator."""

    def __init__(self, handler: Any, attention: str, mask_dtype: Any = None) -> None:
        self.handler = handler
        self.mode = "padding_free" if attention == "flash_attention_2" else "block_mask"
        self.mask_dtype = mask_dtype

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        if not isinstance(items[0], PackedRow):
            return self.handler(items)
        return collate_packed(items, self.handler.pad_id, attention=self.mode, mask_dtype=self.mask_dtype,
                              pad_to_multiple_of=getattr(self.handler, "pad_to_multiple_of", None))
