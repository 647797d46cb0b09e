"""The data cache only saves time: a cache that cannot be used is one warning, never a failed run.

Its folder is checked before any data is read (:func:`usable_cache`: a read-only folder, a file
where the folder should be); a write that fails later (:func:`keep_in_cache`: its disk full)
names the cache's own folder and that device's free space, not the output folder's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cardtune.training.writes import DiskFullError, is_disk_full


def usable_cache(cache: str | None, log: Any = print) -> str | None:
    """The data cache a run uses: ``cache`` (a folder, ``none``, or None for the default), or
    ``none`` when its folder cannot be created or written, checked before any data is read.
    The cache only saves time, so a read-only folder, or a file where the folder should be,
    is one warning and the run goes on without it."""
    import tempfile

    from cardtune.training import data_cache

    root = data_cache.cache_root(cache)
    if root is None:
        return cache
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        log(f"warning: the data cache {root} cannot be written ({exc.strerror or type(exc).__name__}): this run goes "
            "on without it (--data_cache DIR names another folder, --data_cache none turns it off)")
        return "none"
    return str(root)


def keep_in_cache(folder: Path, split: str, log: Any, *split_data: Any) -> None:
    """Save the split in the data cache; a cache that cannot be written (its disk full, say) is
    a warning naming the cache's own folder and device, and the run goes on without it."""
    from cardtune.training import data_cache

    try:
        data_cache.save(folder, *split_data)
    except Exception as exc:
        full = is_disk_full(exc, folder)
        if not full and not isinstance(exc, OSError):
            raise
        why = str(DiskFullError(folder, "the data cache", exc)) if full else f"cannot write the data cache {folder} ({exc})"
        log(f"warning: data ({split}): {why}; the cache is optional: this run goes on without it")
        return
    log(f"data ({split}): kept in the cache {folder}")
