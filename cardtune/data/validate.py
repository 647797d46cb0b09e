"""One pass over a dataset that reports every problem, per sample id and field, before step 1.

``validate`` checks structure (roles, turns, placeholders), media (found, inside its folder,
of sane size from its header, or fully decoded with ``check_media="full"``) and, given a
:class:`~cardtune.collators.engine.ChatEncoder`, what training would see (the exact length
after media expansion, labels, template), in several processes. ``apply_policy`` is what
training does with the report: ``error`` stops with it, ``skip`` drops exactly the reported
samples, prints the counts and writes their ids to ``skipped_samples.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cardtune.conversation import ROLES, Sample
from cardtune.data.media import MediaConfig, load_headers_checked, load_media_checked
from cardtune.data.preferences import check_pair
from cardtune.errors import REASONS, SampleError

Policy = Literal["error", "skip"]
MediaCheck = Literal["header", "full", "none"]
SKIPPED_FILE = "skipped_samples.jsonl"


@dataclass
class Problem:
    """A reported error; ``index`` is the sample's position, None for a record that never became one."""

    index: int | None
    error: SampleError


@dataclass
class Report:
    num_samples: int
    problems: list[Problem] = field(default_factory=list)
    num_truncated: int = 0
    """Samples kept with text cut after their last media token (``max_length``)."""
    num_records: int = 0
    """Samples plus records that could not be read as samples."""
    lengths: list[int | None] = field(default_factory=list)
    """Each sample's exact token count as training encodes it (None where it was not encoded)."""
    notes: list[str] = field(default_factory=list)
    """How the pass was made (header counts or decoding, processes), for the caller to print."""
    duplicate_ids: dict[str, list[str]] = field(default_factory=dict)
    """Ids written by more than one record of a file, and where: a warning, not a problem."""
    num_typed_control_tokens: int = 0
    """Samples whose text holds control-token strings (``<|im_end|>``, ``</s>``): plain text,
    unless the run keeps them (``--typed_control_tokens keep``)."""
    hint: str | None = None
    """What the problems suggest went wrong with the command (a media folder not given)."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(p.error.reason for p in self.problems).most_common())

    @property
    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems if p.index is not None}

    @property
    def num_bad(self) -> int:
        """Records that would be dropped: bad samples plus unreadable records."""
        return len(self.bad_indices) + sum(1 for p in self.problems if p.index is None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.num_records,
            "samples": self.num_samples,
            "bad": self.num_bad,
            "truncated": self.num_truncated,
            "typed_control_tokens": self.num_typed_control_tokens,
            "counts": self.counts,
            "errors": [{"index": p.index, **p.error.to_dict()} for p in self.problems],
            "duplicate_ids": self.duplicate_ids,
        }

    def summary(self) -> str:
        if self.ok:
            line = f"ok: {self.num_records} records, no problems"
        else:
            by_reason = ", ".join(f"{reason} {n}" for reason, n in self.counts.items())
            line = f"{self.num_bad} of {self.num_records} records have problems ({by_reason})"
        if self.num_truncated:
            line += f"; {self.num_truncated} samples truncated after their last media token"
        if self.num_typed_control_tokens:
            n = self.num_typed_control_tokens
            line += (f"; {n} {'sample holds' if n == 1 else 'samples hold'} control-token strings typed in their text "
                     "(encoded as plain text unless --typed_control_tokens keep)")
        if self.duplicate_ids:
            records = sum(len(w) for w in self.duplicate_ids.values())
            line += (f"; warning: {len(self.duplicate_ids)} ids written by more than one record ({records} records: "
                     f"{', '.join(list(self.duplicate_ids)[:5])}{', ...' if len(self.duplicate_ids) > 5 else ''})")
        return line

    def format_table(self, limit: int | None = None) -> str:
        """The problems as a table (none when there are none), their counts, the duplicate ids,
        the hint and the summary line."""
        lines: list[str] = []
        if self.problems:
            rows = [("id", "source", "field", "reason", "detail")]
            shown = self.problems if limit is None else self.problems[:limit]
            rows += [(e.sample_id, e.source, e.field, e.reason, e.detail or REASONS[e.reason])
                     for e in (p.error for p in shown)]
            widths = [min(max(len(r[i]) for r in rows), 40) for i in range(4)]
            lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
            if limit is not None and len(self.problems) > limit:
                lines.append(f"... and {len(self.problems) - limit} more")
            lines.append("")
            lines += [f"{n:>7}  {reason}: {REASONS[reason]}" for reason, n in self.counts.items()]
        if self.duplicate_ids:
            lines += ["", "duplicate ids (kept and trained; each is named by its line):"]
            shown_ids = list(self.duplicate_ids) if limit is None else list(self.duplicate_ids)[:limit]
            lines += [f"  {i}: {', '.join(self.duplicate_ids[i])}" for i in shown_ids]
            if len(shown_ids) < len(self.duplicate_ids):
                lines.append(f"  ... and {len(self.duplicate_ids) - len(shown_ids)} more")
        if self.hint:
            lines.append(self.hint)
        lines.append(self.summary())
        return "\n".join(lines)


class DataValidationError(ValueError):
    """Training stopped before step 1 (policy ``error``); carries the report."""

    def __init__(self, report: Report) -> None:
        self.report = report
        super().__init__(
            f"the data has problems; nothing was trained (use --bad_sample_policy skip to drop them):\n"
            f"{report.format_table(limit=50)}"
        )


# -- structure ----------------------------------------------------------------------------------
def _texts(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [content]
    return [p.get("text") for p in content if p.get("type") == "text"]


def _media_parts(content: Any) -> int:
    return 0 if isinstance(content, str) else sum(1 for p in content if p.get("type") in ("image", "video"))


# Where a LLaVA `from` value other than human/gpt/system gets its role.
ROLE_KEYS_HINT = ("a LLaVA 'from' value maps to a role with --user-key/--assistant-key (train, labels, inspect, "
                  "validate-data), or user_key/assistant_key/system_key of a source in a mix YAML")


def check_structure(sample: Sample, card: Any | None = None) -> list[SampleError]:
    """Roles, turns, answers and placeholder counts; with a card, the media kinds it takes; of a
    preference pair, its conversation with the chosen answer and then the pair itself."""
    errs: list[SampleError] = []

    def err(field: str, reason: str, detail: str = "") -> None:
        errs.append(SampleError(sample.id, field, reason, detail, sample.source))

    messages = sample.messages
    expected, alternation_reported = "user", False
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            err(f"messages[{i}].role", "unknown_role", f"role {role!r} (known: {', '.join(ROLES)}; {ROLE_KEYS_HINT})")
        texts = _texts(m.get("content") or [])
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            err(f"messages[{i}].content", "non_string_turn", f"{role} turn text is {type(bad[0]).__name__}: {bad[0]!r:.60}")
        elif not "".join(texts).strip():
            if role == "assistant":
                err(f"messages[{i}].content", "empty_answer")
            elif not _media_parts(m.get("content") or []):
                err(f"messages[{i}].content", "empty_turn", f"{role} turn has no text and no media")
        if role not in ROLES or alternation_reported:
            continue
        if role == "system":
            if i != 0:
                err(f"messages[{i}].role", "roles_not_alternating", "a system turn is only allowed first")
                alternation_reported = True
            continue
        if role != expected:
            previous = next((messages[j].get("role") for j in range(i - 1, -1, -1) if messages[j].get("role") in ROLES), None)
            err(f"messages[{i}].role", "roles_not_alternating",
                f"{role} turn follows {previous or 'the start'}; expected {expected}")
            alternation_reported = True
        expected = "assistant" if role == "user" else "user"
    if not any(m.get("role") == "assistant" for m in messages):
        err("messages", "no_assistant_turn")
    for kind, given in (("image", sample.images), ("video", sample.videos)):
        placeholders = sum(1 for m in messages if not isinstance(m.get("content"), str)
                           for p in m.get("content") or [] if p.get("type") == kind)
        if placeholders != len(given):
            err(f"{kind}s", "placeholder_mismatch", f"{placeholders} {kind} placeholders for {len(given)} {kind}s")
    if card is not None:
        errs += check_modalities(sample, card)
    return errs + check_pair(sample)


def check_modalities(sample: Sample, card: Any) -> list[SampleError]:
    """The sample's media kinds and counts that ``card``'s family does not take (``unsupported_media``)."""
    def err(field: str, detail: str) -> SampleError:
        return SampleError(sample.id, field, "unsupported_media", detail, sample.source)

    modalities, out = card.modalities, []
    if sample.images and "image" not in modalities:
        out.append(err("images", f"family {card.family} takes no images"))
    elif len(sample.images) > 1 and "multi_image" not in modalities:
        out.append(err("images", f"family {card.family} takes one image per sample, got {len(sample.images)}"))
    if sample.videos and ("video" not in modalities or card.capabilities.video == "unsupported"):
        out.append(err("videos", f"family {card.family} takes no video"))
    return out


def media_folder_hint(errors: Sequence[SampleError], samples: Sequence[Sample], *, image_folder: str | None,
                      video_folder: str | None) -> str | None:
    """"did you forget --image_folder?" when none was given and most of the images, named by
    paths relative to the current folder, are missing (likewise videos); else None. Looks at the
    samples only when there are such errors."""
    missing = Counter(e.field.split("[", 1)[0] for e in errors if e.reason == "missing_media")
    for kind, folder in (("image", image_folder), ("video", video_folder)):
        if folder is not None or not missing[f"{kind}s"]:
            continue
        relative = sum(1 for sample in samples for ref in getattr(sample, f"{kind}s")
                       if isinstance(ref, str) and not os.path.isabs(ref.removeprefix("file://"))
                       and not ref.startswith(("data:", "http://", "https://")))
        if relative and 2 * missing[f"{kind}s"] > relative:
            return (f"{missing[f'{kind}s']} of {relative} {kind}s are missing, and their paths are relative to the current "
                    f"folder ({os.getcwd()}): did you forget --{kind}_folder?")
    return None


# -- the pass -----------------------------------------------------------------------------------
def default_workers() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


AUTO_WORKERS_MIN_SAMPLES = 256
"""Below this many samples, ``num_workers=None`` checks in-process: starting processes costs more."""


def validate(
    samples: Sequence[Sample],
    encoder: Any | None = None,
    *,
    card: Any | None = None,
    image_folder: str | None = None,
    video_folder: str | None = None,
    allow_absolute_paths: bool = False,
    num_frames: int | None = None,
    media: bool = True,
    check_media: MediaCheck = "header",
    max_image_pixels: int | None = None,
    num_workers: int | None = None,
) -> Report:
    """Check every sample; all problems of a sample are reported, not only the first.

    ``samples`` may be a :class:`~cardtune.data.formats.SampleSet`: its unreadable records are
    reported first. With ``encoder``, samples that pass the structural and media checks are
    encoded (media expanded, ``encoder.max_length`` applied) to find over-length samples, empty
    labels, template errors and label-contract failures; their exact lengths are in
    ``Report.lengths``.

    ``check_media``: ``header`` (default) reads each image's header only (present, readable, an
    image, under ``max_image_pixels``) and counts its tokens from its size
    (:mod:`cardtune.data.media_tokens`); pixels are decoded later, in the DataLoader workers.
    ``full`` decodes every image and runs the real processor, as training will. ``none`` (or
    ``media=False``) opens no file. Videos are decoded in ``header`` mode too.
    ``num_workers``: processes (None: the machine's cores; 0 or 1: this process); the report is
    the same whatever the number.
    """
    if not media:
        check_media = "none"
    card = card if card is not None else getattr(encoder, "card", None)
    extra: dict[str, Any] = {} if num_frames is None else {"num_frames": num_frames}
    cfg = MediaConfig.from_card(card, image_folder=image_folder, video_folder=video_folder,
                                allow_absolute_paths=allow_absolute_paths, max_image_pixels=max_image_pixels, **extra)
    read_errors = list(getattr(samples, "errors", []))
    report = Report(num_samples=len(samples), problems=[Problem(None, e) for e in read_errors])
    report.num_records = len(samples) + len(read_errors)
    header_encoder = None
    if encoder is not None and check_media == "header":
        from cardtune.data.media_tokens import HeaderEncoder

        header_encoder, note = HeaderEncoder.for_encoder(encoder)
        report.notes.append(note)
    report.duplicate_ids = dict(getattr(samples, "duplicate_ids", {}))
    # upsampled repeats of one record (a weighted mix) are checked once, reported each time
    owner = _first_of_each_record(samples)
    unique = np.flatnonzero(owner == np.arange(len(owner)))
    work = _Work(samples, encoder, header_encoder, card, cfg, check_media)
    if num_workers is None:
        num_workers = default_workers() if len(unique) >= AUTO_WORKERS_MIN_SAMPLES else 0
    if num_workers > 1 and len(unique) > 1:
        checks = _check_in_workers(work, unique, num_workers)
        report.notes.append(f"checked in {num_workers} processes")
    else:
        checks = (work.check(i) for i in unique.tolist())
    # kept as arrays as they come: a list of every sample's result tuple takes ~150 bytes a sample
    errors_of: dict[int, list[SampleError]] = {}
    lengths = np.full(len(unique), -1, dtype=np.int64)
    truncated, typed = np.zeros(len(unique), dtype=bool), np.zeros(len(unique), dtype=bool)
    for k, (errs, was_truncated, length, has_typed) in enumerate(checks):
        if errs:
            errors_of[k] = errs
        truncated[k], typed[k] = was_truncated, has_typed
        if length is not None:
            lengths[k] = length
    checked_as = np.searchsorted(unique, owner)  # each sample's position in unique
    has_errors = np.zeros(len(unique), dtype=bool)
    has_errors[list(errors_of)] = True
    for index in np.flatnonzero(has_errors[checked_as]).tolist():
        report.problems += [Problem(index, e) for e in errors_of[int(checked_as[index])]]
    report.num_truncated = int(truncated[checked_as].sum())
    report.num_typed_control_tokens = int(typed[checked_as].sum())
    report.lengths = [None if n < 0 else n for n in lengths[checked_as].tolist()]
    if check_media != "none":
        report.hint = media_folder_hint([p.error for p in report.problems], samples, image_folder=image_folder,
                                        video_folder=video_folder)
    return report


def _first_of_each_record(samples: Sequence[Sample]) -> np.ndarray:
    """For each position, the first position that holds the same stored record."""
    storage_index = getattr(samples, "storage_index", None)
    if storage_index is None:
        return np.arange(len(samples))
    stored = np.fromiter((storage_index(i) for i in range(len(samples))), dtype=np.int64, count=len(samples))
    _, first, inverse = np.unique(stored, return_index=True, return_inverse=True)
    return first[inverse]


@dataclass
class _Work:
    """What each check needs; forked workers inherit it rather than unpickle it."""

    samples: Sequence[Sample]
    encoder: Any | None
    header_encoder: Any | None
    card: Any | None
    cfg: MediaConfig
    check_media: MediaCheck
    headers: dict[Any, Any] = field(default_factory=dict)
    """Image headers read so far in this process, by reference (records often share images)."""

    def check(self, index: int) -> tuple[list[SampleError], bool, int | None, int]:
        return self.check_sample(self.samples[index])

    def check_sample(self, sample: Sample) -> tuple[list[SampleError], bool, int | None, int]:
        errs = check_structure(sample, self.card)
        loaded, encoder, cfg = None, self.encoder, self.cfg
        has_media = bool(sample.images or sample.videos)
        if self.check_media == "header" and not sample.videos and self.header_encoder is not None:
            media_errs, loaded = load_headers_checked(sample, cfg, self.headers)
            encoder = self.header_encoder
        elif self.check_media == "header" and (encoder is None or not cfg.load_image):
            media_errs, loaded = load_headers_checked(sample, cfg, self.headers)
        elif self.check_media != "none":
            # families that take paths still get their files decoded once here, to catch corrupt ones
            media_errs, loaded = load_media_checked(sample, cfg if cfg.load_image else dataclasses.replace(cfg, load_image=True))
            if loaded is not None and not cfg.load_image:
                _, loaded = load_media_checked(sample, cfg)  # the paths the family takes
        else:
            media_errs = []
        errs += media_errs
        if errs or encoder is None or (self.check_media == "none" and has_media):
            return errs, False, None, 0
        try:
            encoded = encoder.encode(sample, loaded)
        except SampleError as exc:
            return [exc], False, None, 0
        except Exception as exc:  # noqa: BLE001 - a processor or template failing on this one sample
            return [SampleError(sample.id, "messages", "template_error",
                                f"encoding failed: {type(exc).__name__}: {exc}", sample.source)], False, None, 0
        return [], bool(encoded.num_truncated), len(encoded), bool(encoded.typed_control_tokens)


_WORK: _Work | None = None  # what forked workers check, inherited rather than pickled


def _check_chunk(indices: list[int]) -> list[tuple[list[SampleError], bool, int | None, int]]:
    assert _WORK is not None
    return [_WORK.check(i) for i in indices]


def _ignore_interrupts() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _check_in_workers(work: _Work, indices: np.ndarray, num_workers: int) -> Iterator[tuple[list[SampleError], bool, int | None, int]]:
    """The checks of ``indices``, in order, as the workers send them back."""
    import multiprocessing

    global _WORK
    _WORK = work
    size = max(1, min(256, len(indices) // (num_workers * 4) or 1))
    chunks = (indices[k : k + size].tolist() for k in range(0, len(indices), size))
    try:
        # Ctrl-C is the main process's to handle (it stops the pool); a worker interrupted in
        # the middle of a sample would print its own "Process ForkPoolWorker-N:" and traceback.
        with multiprocessing.get_context("fork").Pool(num_workers, initializer=_ignore_interrupts) as pool:
            for chunk in pool.imap(_check_chunk, chunks):
                yield from chunk
    finally:
        _WORK = None


# -- training's policy --------------------------------------------------------------------------
def apply_policy(
    report: Report,
    samples: Sequence[Sample],
    policy: Policy = "error",
    output_dir: str | Path | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Sample] | Sequence[Sample]:
    """``error``: raise :class:`DataValidationError` if the report has any problem. ``skip``: the
    samples without problems, in order; prints the counts and writes one line per dropped record
    (id, source, its errors) to ``output_dir/skipped_samples.jsonl``."""
    if policy not in ("error", "skip"):
        raise ValueError(f"unknown data policy {policy!r} (error or skip)")
    if report.num_samples != len(samples):
        raise ValueError(f"the report covers {report.num_samples} samples, not these {len(samples)}")
    log = log or (lambda line: print(line, file=sys.stderr))
    if report.ok:
        return samples
    if policy == "error":
        raise DataValidationError(report)
    bad = report.bad_indices
    kept_indices = [i for i in range(len(samples)) if i not in bad]
    kept = samples.take(kept_indices) if hasattr(samples, "take") else [samples[i] for i in kept_indices]
    if hasattr(kept, "errors"):
        kept.errors = []
    by_record: dict[tuple[Any, str, str], list[SampleError]] = {}
    for p in report.problems:
        by_record.setdefault((p.index, p.error.sample_id, p.error.source), []).append(p.error)
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / SKIPPED_FILE).open("w", encoding="utf-8") as f:
            for (index, sample_id, source), errors in by_record.items():
                f.write(json.dumps({
                    "id": sample_id, "source": source, "index": index,
                    "errors": [{k: v for k, v in e.to_dict().items() if k not in ("id", "source")} for e in errors],
                }) + "\n")
    where = f"; ids in {Path(output_dir) / SKIPPED_FILE}" if output_dir is not None else ""
    log(f"data: skipped {len(by_record)} of {report.num_records} records, kept {len(kept_indices)} "
        f"({', '.join(f'{r} {n}' for r, n in report.counts.items())}){where}")
    return kept
