"""The run's data: samples read and validated before step 1 (with the policy; in several
processes; kept in the data cache for the next run), lengths for length grouping and packing
taken from the validation pass itself, and the datasets and collators the Trainer gets. A
sample whose media fail only when decoded in a DataLoader worker is skipped and counted, or
stops the run naming it, per the same policy.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.conversation import Sample
from cardtune.data.validate import SKIPPED_FILE
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
    load_media,
    load_samples,
    pack,
    plan_packs,
    validate,
)
from cardtune.errors import SampleError
from cardtune.training.optional_cache import keep_in_cache
from cardtune.training.writes import writing


class DataStop(RuntimeError):
    """Validation found problems and the policy is ``error``: nothing was trained."""

    def __init__(self, split: str, report: Report) -> None:
        self.report = report
        super().__init__(
            f"the {split} data has problems; nothing was trained. Fix them, or drop exactly these samples "
            f"with --bad_sample_policy skip:\n{report.format_table(limit=50)}"
        )


class MediaFailedInTraining(DataStop):
    """A sample whose media failed to decode in a DataLoader worker, under policy ``error``.

    Built from one message, so the DataLoader can raise it again in the main process (it
    rebuilds a worker's exception from its text, traceback included: only the last line is kept).
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        self.report = None  # type: ignore[assignment]
        RuntimeError.__init__(self, message)


@dataclass
class SplitData:
    samples: Sequence[Sample]
    lengths: list[int]
    report: Report
    media_flags: list[bool] = field(default_factory=list)
    policy: str = "error"
    skipped_file: Path | None = None
    """Where samples that fail only in training (decoding in the DataLoader) are added."""
    cached: bool = False
    """The split came from the data cache."""


def prepare_split(
    split: str,
    data_path: str,
    encoder: Any,
    card: Any,
    *,
    image_folder: str | None,
    video_folder: str | None,
    allow_absolute_paths: bool = False,
    policy: str,
    output_dir: str | None,
    seed: int,
    log: Any = print,
    check_media: str = "header",
    max_image_pixels: int | None = None,
    num_workers: int | None = None,
    cache: str | None = None,
    role_keys: dict[str, str] | None = None,
    settings: dict[str, Any] | None = None,
) -> SplitData:
    """Read, validate (every sample encoded once, in ``num_workers`` processes, default the
    cores) and apply the policy to one split. The validated split is kept in the data cache
    (``cache``: a folder, or ``none``; default ``$CARDTUNE_DATA_CACHE`` or ``$CARDTUNE_CACHE/data``)
    and read back from it while nothing that shapes it has changed (``settings``: what else
    shapes it, the training method's own)."""
    from accelerate import PartialState

    from cardtune.training import data_cache

    settings = {"split": split, "seed": seed, "image_folder": _abs(image_folder), "video_folder": _abs(video_folder),
                "max_length": encoder.max_length, "length_limit": getattr(getattr(encoder, "limit", None), "tokens", None),
                "allow_absolute_paths": allow_absolute_paths, "check_media": check_media,
                "max_image_pixels": max_image_pixels,
                "typed_control_tokens": "keep" if getattr(encoder, "keep_typed_control_tokens", False) else "plain",
                "role_keys": role_keys or {}, **(settings or {})}
    root = data_cache.cache_root(cache)
    key = data_cache.split_key(data_path, card, getattr(encoder.tokenizer, "name_or_path", None), settings) if root else None
    folder = root / key if root is not None and key is not None else None
    state = PartialState()
    with state.main_process_first():  # one process validates and writes the cache; the other ranks read it
        kept_before = data_cache.load(folder, log) if folder is not None else None
        if kept_before is not None:
            samples, report, flags = kept_before
            log(f"data ({split}): {data_path}: validated before; read from the cache {folder}")
        else:
            samples = load_samples(data_path, seed=seed, **(role_keys or {}))
            report = validate(samples, encoder, card=card, image_folder=image_folder, video_folder=video_folder,
                              allow_absolute_paths=allow_absolute_paths, check_media=check_media,  # type: ignore[arg-type]
                              max_image_pixels=max_image_pixels,
                              num_workers=num_workers)
            manifest = data_cache.media_manifest(samples, image_folder, video_folder)
            flags = manifest[2]
            if folder is not None and state.is_main_process:
                keep_in_cache(folder, split, log, samples, report, manifest)
    for note in report.notes:
        log(f"data ({split}): {note}")
    log(f"data ({split}): {data_path}: {report.summary()}")
    if report.hint and policy != "error":  # under "error" the table of problems carries it
        log(f"data ({split}): {report.hint}")
    skip_dir = (Path(output_dir) if split == "train" else Path(output_dir) / "eval") if output_dir else None
    try:
        with writing(skip_dir or ".", "the list of skipped samples"):
            kept = apply_policy(report, samples, policy, skip_dir, log=log)
    except DataValidationError as exc:
        raise DataStop(split, exc.report) from None
    bad = report.bad_indices
    kept_indices = [i for i in range(len(samples)) if i not in bad] if bad else range(len(samples))
    lengths = [report.lengths[i] for i in kept_indices]
    missing = [k for k, n in enumerate(lengths) if n is None]
    if missing:  # not encoded by validation (should not happen): estimate them
        for k, n in zip(missing, estimate_lengths([kept[k] for k in missing], encoder.tokenizer), strict=True):
            lengths[k] = n
    return SplitData(kept, lengths, report, [flags[i] for i in kept_indices], policy,  # type: ignore[arg-type]
                     skip_dir / SKIPPED_FILE if skip_dir else None, cached=kept_before is not None)


def _abs(folder: str | None) -> str | None:
    return os.path.abspath(folder) if folder else None


def media_config(card: Any, image_folder: str | None, video_folder: str | None,
                 max_image_pixels: int | None = None, allow_absolute_paths: bool = False) -> MediaConfig:
    return MediaConfig.from_card(card, image_folder=image_folder, video_folder=video_folder,
                                 max_image_pixels=max_image_pixels, allow_absolute_paths=allow_absolute_paths)


class FailurePolicy:
    """What a sample failing in a DataLoader worker (media found bad only when decoded) does:
    ``error`` stops the run naming it; ``skip`` adds it to ``skipped_samples.jsonl`` (marked
    ``"found": "training"``), says so on stderr, and the next sample that loads takes its place."""

    def __init__(self, policy: str, skipped_file: Path | None) -> None:
        self.policy = policy
        self.skipped_file = skipped_file
        self.known: set[int] = set()
        """Samples (by stored record) this process found failing: each is recorded once, and
        neither read again nor taken as another failed sample's replacement."""

    def failed(self, sample: Sample, exc: Exception, record: int | None = None) -> None:
        """``record``: the sample's stored record (:meth:`SampleSet.storage_index`), remembered
        so that a sample read again (the next epoch, the replacement of another) is not decoded
        and counted again."""
        if record is not None:
            self.known.add(record)
        error = exc if isinstance(exc, SampleError) else SampleError(
            sample.id, "messages", "template_error", f"encoding failed: {type(exc).__name__}: {exc}", sample.source)
        if self.policy != "skip":
            raise MediaFailedInTraining(
                f"sample {error.sample_id} ({error.source}) failed in training: {error.field}: {error.reason}: "
                f"{error.detail} (found when decoding, which validation's header check does not do: "
                "--check_media full finds it before step 1, --bad_sample_policy skip drops it)")
        if self.skipped_file is None:
            print(f"data: skipped in training: {error}", file=sys.stderr, flush=True)
            return
        import fcntl

        self.skipped_file.parent.mkdir(parents=True, exist_ok=True)
        with self.skipped_file.open("a+", encoding="utf-8") as f:
            # DataLoader workers are processes sharing the file: under its lock, a sample another
            # worker already recorded is not recorded (nor said) twice.
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            if (error.sample_id, error.source) in _found_in_training(f.read()):
                return
            print(f"data: skipped in training: {error}", file=sys.stderr, flush=True)
            f.write(json.dumps({"id": error.sample_id, "source": error.source, "index": None, "found": "training",
                                "errors": [{"field": error.field, "reason": error.reason, "detail": error.detail}]})
                    + "\n")

    def count(self) -> int:
        """Samples recorded as failed in training so far."""
        if self.skipped_file is None or not self.skipped_file.is_file():
            return 0
        return len(_found_in_training(self.skipped_file.read_text(encoding="utf-8")))


def _found_in_training(text: str) -> set[tuple[str, str]]:
    """(id, source) of each sample a ``skipped_samples.jsonl`` records as failed in training."""
    lines = (json.loads(line) for line in text.splitlines())
    return {(s["id"], s["source"]) for s in lines if s.get("found") == "training"}


class TrainingDataset(ConversationDataset):
    """The dataset the Trainer reads: a sample that fails here goes to its :class:`FailurePolicy`."""

    def __init__(self, samples: Sequence[Sample], media: MediaConfig, encoder: Any, failures: FailurePolicy) -> None:
        super().__init__(samples, media, encoder)
        self.failures = failures

    def __getitem__(self, index: int) -> Any:
        for step in range(len(self)):
            i = (index + step) % len(self)
            record = _record(self.samples, i)
            if record in self.failures.known:
                continue
            try:
                return super().__getitem__(i)
            except Exception as exc:  # noqa: BLE001 - a processor failing on one sample's media
                self.failures.failed(self.samples[i], exc, record)
        raise MediaFailedInTraining("every sample failed in training; see skipped_samples.jsonl")


def _record(samples: Sequence[Sample], index: int) -> int:
    """The stored record at ``index`` (repeats of an upsampled record share one)."""
    storage_index = getattr(samples, "storage_index", None)
    return storage_index(index) if storage_index is not None else index


def failure_policy(split: SplitData) -> FailurePolicy:
    """What a sample of ``split`` failing in a DataLoader worker does (its policy, its skip list)."""
    return FailurePolicy(split.policy, split.skipped_file)


def conversation_dataset(split: SplitData, card: Any, encoder: Any, image_folder: str | None,
                         video_folder: str | None, max_image_pixels: int | None = None,
                         allow_absolute_paths: bool = False) -> ConversationDataset:
    media = media_config(card, image_folder, video_folder, max_image_pixels, allow_absolute_paths)
    return TrainingDataset(split.samples, media, encoder, failure_policy(split))


class PackedDataset:
    """Rows of several samples each, planned from the exact lengths (first-fit decreasing);
    a row's samples are encoded, and their media loaded, when the row is read."""

    def __init__(self, split: SplitData, card: Any, encoder: Any, media: MediaConfig, max_length: int) -> None:
        check_packing(card)
        self.samples = split.samples
        self.failures = failure_policy(split)
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
        encoded = []
        for i in self.rows[index]:  # a sample failing here leaves the row shorter (policy skip)
            record = _record(self.samples, i)
            if record in self.failures.known:
                continue
            sample = self.samples[i]
            try:
                encoded.append(self.encoder.encode(sample, load_media(sample, self.media)))
            except Exception as exc:  # noqa: BLE001 - a processor failing on one sample's media
                self.failures.failed(sample, exc, record)
        if not encoded:
            raise MediaFailedInTraining(f"every sample of packed row {index} failed in training; see skipped_samples.jsonl")
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
