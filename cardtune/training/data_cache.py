"""The validated dataset kept between runs, so a rerun or a resume on the same data starts in seconds.

One folder per key under ``$CARDTUNE_DATA_CACHE`` (default ``$CARDTUNE_CACHE/data``, i.e.
``~/.cache/cardtune/data``). The key hashes everything that shapes the result: the data files'
bytes (and a mix's weights and seed), the card, the model folder's tokenizer/processor files
(everything but weights), the arguments that shape encoding, and cardtune's own code and
version, so an engine change validates again. The folder holds the samples as read (their
buffer of JSON documents and its offsets, memory-mapped back, so memory does not grow with N),
the report of the validation pass with every exact length, and the size and mtime of every
media file the samples name: a media file changed since (a new image of another size) is a miss too.

What is read back is data only: JSON, and numpy arrays of numbers loaded with
``allow_pickle=False`` (no pickle anywhere, so an edited folder cannot run code), checked for
their shapes and the samples' digest before use. A folder that fails a check is not used: one
warning, and the split is validated and kept again.

Hub datasets (no local file to hash) are not cached.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cardtune.data.formats import parse_data_arg
from cardtune.data.sample_store import SampleSet
from cardtune.data.validate import Problem, Report
from cardtune.errors import SampleError
from cardtune.hashing import code_fingerprint, hash_file, hash_model_folder, hash_tree, hasher

CACHE_ENV = "CARDTUNE_DATA_CACHE"
FORMAT = 2  # bump when what a cache folder holds changes (2: samples as JSON, not pickles)


def cache_root(explicit: str | None = None) -> Path | None:
    """Where data caches live; ``explicit`` ``none`` (or ``$CARDTUNE_DATA_CACHE=none``) turns caching off."""
    from cardtune.demo.cache import cache_root as cardtune_cache

    chosen = explicit or os.environ.get(CACHE_ENV)
    if chosen is not None and chosen.lower() in ("none", "off", ""):
        return None
    return Path(chosen) if chosen else cardtune_cache() / "data"


def data_fingerprint(data_path: str) -> str | None:
    """The data files' contents and the mix's settings; None for a source with no local files."""
    spec = parse_data_arg(data_path)
    h = hasher()
    h.update(spec.model_dump_json().encode())
    for source in spec.sources:
        path = Path(source.path)
        if path.is_file():
            hash_file(h, path)
        elif path.is_dir():
            hash_tree(h, path)
        else:
            return None
    return h.hexdigest()


def split_key(data_path: str, card: Any, model_folder: str | None, settings: dict[str, Any]) -> str | None:
    """The cache key of one split; None when the split cannot be cached (a hub dataset)."""
    data = data_fingerprint(data_path)
    if data is None:
        return None
    h = hasher()
    h.update(json.dumps({"format": FORMAT, "data": data, "code": code_fingerprint(),
                         "card": card.model_dump(mode="json"), "settings": settings}, sort_keys=True, default=str).encode())
    folder = Path(model_folder) if model_folder else None
    if folder is not None and folder.is_dir():
        hash_model_folder(h, folder)
    else:
        h.update(str(model_folder).encode())
    return h.hexdigest()


# -- media files named by the samples -------------------------------------------------------------
def media_manifest(samples: Any, image_folder: str | None, video_folder: str | None) -> tuple[list[str], np.ndarray, list[bool]]:
    """(distinct media paths, their (size, mtime_ns), each sample's has-media flag), in one pass."""
    seen: dict[str, None] = {}
    flags: list[bool] = []
    for sample in samples:
        flags.append(bool(sample.images or sample.videos))
        for refs, folder in ((sample.images, image_folder), (sample.videos, video_folder)):
            for ref in refs:
                if isinstance(ref, str) and not ref.startswith("data:"):
                    seen.setdefault(os.path.join(folder or os.getcwd(), ref.removeprefix("file://")))
    paths = list(seen)
    return paths, _stats(paths), flags


def _stats(paths: list[str]) -> np.ndarray:
    out = np.full((len(paths), 2), -1, dtype=np.int64)
    for k, path in enumerate(paths):
        try:
            st = os.stat(path)
            out[k] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    return out


# -- one cache folder ---------------------------------------------------------------------------
def _problem_rows(report: Report) -> list[list[Any]]:
    return [[p.index, p.error.sample_id, p.error.field, p.error.reason, p.error.detail, p.error.source]
            for p in report.problems]


def save(folder: Path, samples: SampleSet, report: Report, media: tuple[list[str], np.ndarray, list[bool]]) -> None:
    """Write the split as a folder renamed into place, so a reader never sees half of it."""
    paths, stats, flags = media
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        samples.save_buffer(staging / "buffer.npy")
        digest = hasher()
        hash_file(digest, staging / "buffer.npy")
        np.save(staging / "offsets.npy", np.asarray(samples._offsets))
        if samples._order is not None:
            np.save(staging / "order.npy", np.asarray(samples._order))
        np.save(staging / "lengths.npy", np.asarray([-1 if n is None else n for n in report.lengths], dtype=np.int64))
        np.save(staging / "media_flags.npy", np.asarray(flags, dtype=bool))
        np.save(staging / "media_stats.npy", stats)
        (staging / "media_paths.json").write_text(json.dumps(paths), encoding="utf-8")
        (staging / "report.json").write_text(json.dumps({
            "num_samples": report.num_samples, "num_records": report.num_records,
            "num_truncated": report.num_truncated, "notes": report.notes, "problems": _problem_rows(report),
            "num_typed_control_tokens": report.num_typed_control_tokens,
            "duplicate_ids": report.duplicate_ids, "hint": report.hint, "samples_digest": digest.hexdigest(),
        }), encoding="utf-8")
        if folder.exists():  # a stale copy (its media files changed since)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process wrote the same key meanwhile
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load(folder: Path, log: Callable[[str], None] | None = None) -> tuple[SampleSet, Report, list[bool]] | None:
    """The split kept in ``folder``, or None when there is none, a media file changed since, or
    the folder fails a check (said in one warning through ``log``, default stderr)."""
    if not (folder / "report.json").is_file():
        return None
    try:
        paths = json.loads((folder / "media_paths.json").read_text(encoding="utf-8"))
        if not np.array_equal(_stats(paths), _array(folder, "media_stats.npy")):
            return None  # a media file changed since: validated again
        return _read(folder)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        say = log or (lambda line: print(line, file=sys.stderr))
        say(f"warning: the data cache {folder} is not used ({exc}): the data is validated and kept again")
        return None


def _array(folder: Path, name: str, mmap: bool = False) -> np.ndarray:
    """A kept array: numbers only, never pickled objects."""
    array = np.load(folder / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    if array.dtype.hasobject:
        raise ValueError(f"{name} holds Python objects")
    return array


def _read(folder: Path) -> tuple[SampleSet, Report, list[bool]]:
    meta = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    buffer = _array(folder, "buffer.npy", mmap=True)
    offsets = _array(folder, "offsets.npy", mmap=True)
    order = _array(folder, "order.npy", mmap=True) if (folder / "order.npy").is_file() else None
    if buffer.dtype != np.uint8 or buffer.ndim != 1 or offsets.dtype != np.int64 or offsets.ndim != 1:
        raise ValueError("buffer.npy or offsets.npy is not an array of the kind this code writes")
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(buffer) or np.any(np.diff(offsets) < 0):
        raise ValueError("offsets.npy does not index buffer.npy")
    count = len(offsets) - 1
    if order is not None and (order.dtype != np.int64 or len(order) and not 0 <= order.min() <= order.max() < count):
        raise ValueError("order.npy names samples that buffer.npy does not hold")
    digest = hasher()
    hash_file(digest, folder / "buffer.npy")  # read, not mapped: the check adds nothing to the run's memory
    if digest.hexdigest() != meta["samples_digest"]:
        raise ValueError("buffer.npy is not the samples this cache wrote: edited or damaged")
    problems = [Problem(index, SampleError(sid, field, reason, detail, source))
                for index, sid, field, reason, detail, source in meta["problems"]]
    samples = SampleSet(buffer, offsets, [p.error for p in problems if p.index is None], order)
    lengths = [None if n < 0 else n for n in _array(folder, "lengths.npy").tolist()]
    flags = _array(folder, "media_flags.npy").tolist()
    if len(lengths) != len(samples) or len(flags) != len(samples):
        raise ValueError("lengths.npy or media_flags.npy does not cover the samples")
    report = Report(meta["num_samples"], problems, meta["num_truncated"], meta["num_records"],
                    lengths=lengths, notes=list(meta["notes"]), duplicate_ids=meta.get("duplicate_ids", {}),
                    num_typed_control_tokens=meta.get("num_typed_control_tokens", 0), hint=meta.get("hint"))
    return samples, report, flags
