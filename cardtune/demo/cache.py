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


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(staging_dir)`` when it does not exist.

    The build runs in a staging folder beside ``target`` that is renamed into place only once
    complete, so an interrupted build never leaves a half-written folder, and processes that
    race (the ranks of a multi-process run) all end up with the one folder that won.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.chmod(staging, 0o755)
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not target.is_dir():
                raise
            # Another process finished the same build first; its folder is identical.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
