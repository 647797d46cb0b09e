"""Conversation datasets: files to samples, media loaded lazily per item, validation, batching.

The pieces, each in its own module under :mod:`cardtune.data`:

- :func:`load_samples` reads LLaVA JSON/JSONL, OpenAI ``messages`` JSONL, any
  ``datasets.load_dataset`` source, or a weighted mix, into a :class:`SampleSet`;
- :class:`ConversationDataset` loads one item's media (and encodes it) in ``__getitem__``;
- :func:`validate` / :func:`apply_policy` find every problem before step 1 and drop exactly those;
- :func:`estimate_lengths`, :class:`LengthGroupedBatchSampler`, :func:`pack`,
  :func:`collate_packed` and :func:`block_diagonal_mask` keep padding low.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from cardtune.conversation import Sample
from cardtune.data.batching import (
    LengthGroupedBatchSampler,
    PackedRow,
    block_diagonal_mask,
    check_packing,
    collate_packed,
    estimate_lengths,
    has_media,
    pack,
    plan_packs,
    tokens_per_image_from_encoder,
)
from cardtune.data.formats import DataMix, DataSource, load_samples, parse_data_arg
from cardtune.data.media import MediaConfig, image_size, load_media, load_video, open_image, resolve_path
from cardtune.data.sample_store import SampleSet
from cardtune.data.validate import (
    DataValidationError,
    Problem,
    Report,
    apply_policy,
    check_structure,
    validate,
)

__all__ = [
    "ConversationDataset",
    "DataMix",
    "DataSource",
    "DataValidationError",
    "LengthGroupedBatchSampler",
    "LoadedSample",
    "MediaConfig",
    "PackedRow",
    "Problem",
    "Report",
    "SampleSet",
    "apply_policy",
    "block_diagonal_mask",
    "check_packing",
    "check_structure",
    "collate_packed",
    "estimate_lengths",
    "has_media",
    "image_size",
    "load_media",
    "load_samples",
    "load_video",
    "open_image",
    "pack",
    "parse_data_arg",
    "plan_packs",
    "resolve_path",
    "tokens_per_image_from_encoder",
    "validate",
]


@dataclass
class LoadedSample:
    """A sample with its media loaded (``media`` is None for a text-only sample)."""

    sample: Sample
    media: Any | None


class ConversationDataset(Dataset):
    """Samples whose media load in ``__getitem__`` (in DataLoader workers), one item at a time.

    Holding a :class:`SampleSet` (one buffer of encoded samples), the dataset's memory does not grow with
    the number of images, and forked workers share it without copy-on-write growth. With an
    ``encoder`` an item is its :class:`~cardtune.collators.engine.Encoded` form, ready for the
    collator; without, a :class:`LoadedSample`. Run :func:`validate` first: an item that fails
    here raises :class:`~cardtune.errors.SampleError` naming the sample.
    """

    def __init__(self, samples: Sequence[Sample], media: MediaConfig | None = None, encoder: Any | None = None) -> None:
        if not isinstance(samples, SampleSet):
            samples = SampleSet.from_samples(samples)
        self.samples = samples
        self.media = media or MediaConfig.from_card(getattr(encoder, "card", None))
        self.encoder = encoder

    @classmethod
    def for_card(cls, samples: Sequence[Sample], card: Any, encoder: Any | None = None, **media: Any) -> ConversationDataset:
        """``media``: ``image_folder``, ``video_folder``, ``allow_absolute_paths``, ``num_frames``."""
        return cls(samples, MediaConfig.from_card(card, **media), encoder)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        sample = self.samples[index]
        media = load_media(sample, self.media)
        if self.encoder is not None:
            return self.encoder.encode(sample, media)
        return LoadedSample(sample, media)

    def media_flags(self) -> list[bool]:
        """Which samples carry media, for ``LengthGroupedBatchSampler(media=...)``."""
        return [has_media(s) for s in self.samples]
