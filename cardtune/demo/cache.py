"""Where the demo's generated folders live, and how each is built exactly once."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "CARDTUNE_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` when given, else ``$CARDTUNE_CACHE``, else ``~/.cache/cardtune``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "cardtune"


def fingerprint(*parts: object) -> str:
    """A short stable hash of what a build depends on, so a changed recipe never reuses a stale folder."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:10]


COMPLETE_MARKER = ".cardtune-complete"


def is_complete(folder: Path) -> bool:
    """A built folder: its marker, written after everything else, is there."""
    return (folder / COMPLETE_MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(staging_dir)`` unless it is complete.

    The build runs in a staging folder beside ``target`` that is renamed into place only once
    complete, so an interrupted build never leaves a half-written folder, and processes that
    race (the ranks of a multi-process run) all end up with the one folder that won. The last
    file written is :data:`COMPLETE_MARKER`: a ``target`` without it (files written into the
    cache folder by hand or by other code, a build from before the marker) is moved away and
    rebuilt, never used.
    """
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not is_complete(target):  # checked again: a racing build may have just won
        _discard(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, 0o755)
        build(staging)
        (staging / COMPLETE_MARKER).write_text("built by cardtune\n", encoding="utf-8")
        try:
            os.rename(staging, target)
        except OSError:
            if not is_complete(target):
                raise
            # Another process finished the same build first; its folder is identical.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _discard(folder: Path) -> None:
    """Move an incomplete ``folder`` out of the way (a rename, so a racing process that already
    discarded it is no error), then delete it."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.incomplete.", dir=folder.parent))
    try:
        os.rename(folder, trash / folder.name)
    except OSError:
        if folder.exists() and not is_complete(folder):
            raise
    shutil.rmtree(trash, ignore_errors=True)
