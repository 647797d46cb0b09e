"""The validated dataset kept between runs, so a rerun or a resume on the same data starts in seconds.

One folder per key under ``$CARDTUNE_DATA_CACHE`` (default ``$CARDTUNE_CACHE/data``, i.e.
``~/.cache/cardtune/data``). The key hashes everything that shapes the result: the data files'
bytes (and a mix's weights and seed), the card, the model folder's tokenizer/processor files
(everything but weights), the arguments that shape encoding, and cardtune's own code and
version, so an engine change validates again. The folder holds the samples as read (their
pickled buffer and offsets, memory-mapped back, so memory does not grow with N), the report of
the validation pass with every exact length, and the size and mtime of every media file the
samples name: a media file changed since (a new image of another size) is a miss too.

Hub datasets (no local file to hash) are not cached.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cardtune.data.formats import SampleSet, parse_data_arg
from cardtune.data.validate import Problem, Report
from cardtune.errors import SampleError
from cardtune.hashing import code_fingerprint, hash_file, hash_model_folder, hash_tree, hasher

CACHE_ENV = "CARDTUNE_DATA_CACHE"
FORMAT = 1  # bump when what a cache folder holds changes


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
            "duplicate_ids": report.duplicate_ids,
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


def load(folder: Path) -> tuple[SampleSet, Report, list[bool]] | None:
    """The split kept in ``folder``, or None when there is none or a media file changed since."""
    if not (folder / "report.json").is_file():
        return None
    try:
        paths = json.loads((folder / "media_paths.json").read_text(encoding="utf-8"))
        if not np.array_equal(_stats(paths), np.load(folder / "media_stats.npy")):
            return None
        meta = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        order = np.load(folder / "order.npy", mmap_mode="r") if (folder / "order.npy").is_file() else None
        problems = [Problem(index, SampleError(sid, field, reason, detail, source))
                    for index, sid, field, reason, detail, source in meta["problems"]]
        samples = SampleSet(np.load(folder / "buffer.npy", mmap_mode="r"), np.load(folder / "offsets.npy", mmap_mode="r"),
                            [p.error for p in problems if p.index is None], order)
        lengths = [None if n < 0 else n for n in np.load(folder / "lengths.npy").tolist()]
        flags = np.load(folder / "media_flags.npy").tolist()
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a damaged folder is a miss; it is written again
    report = Report(meta["num_samples"], problems, meta["num_truncated"], meta["num_records"],
                    lengths=lengths, notes=list(meta["notes"]), duplicate_ids=meta.get("duplicate_ids", {}),
                    num_typed_control_tokens=meta.get("num_typed_control_tokens", 0))
    return samples, report, flags
