"""``cardtune check --fetch``: a registered model's small files, fetched from the hub.

A card added in a pull request names a model nobody may hold a folder of. Its tokenizer,
configs, processor configs and chat templates are what ``check`` reads; they are a few MB, so
they are downloaded (at the entry's ``revision``) into ``$CARDTUNE_CACHE/hub`` and the card is
checked on that snapshot. Weights are never fetched, nor Python files: remote code is never
run by ``check``. The repository's file list is read first, so a file too big to be a
tokenizer or config file is refused before any download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cardtune.demo.cache import cache_root
from cardtune.hashing import WEIGHT_SUFFIXES
from cardtune.registry import ModelSpec

SMALL_FILE_PATTERNS = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
"""Tokenizer files (``tokenizer.json``, ``tokenizer.model``, ``vocab.json``, ``merges.txt``,
``qwen.tiktoken``), configs, processor configs, chat templates."""
NEVER_FETCHED = [f"*{suffix}" for suffix in WEIGHT_SUFFIXES] + ["*.py"]
MAX_SMALL_FILE = 200 * 2**20
"""A file bigger than this matching :data:`SMALL_FILE_PATTERNS` is not a tokenizer or config
file (a big ``tokenizer.json`` is a few tens of MB)."""


class FetchError(Exception):
    """A model's files could not be fetched: one line naming the model, its hub path and why."""


@dataclass(frozen=True)
class Fetched:
    """A model's small files as fetched: the snapshot folder and what it holds."""

    folder: Path
    commit: str
    files: list[str]
    size: int

    def line(self, spec: ModelSpec) -> str:
        return (f"fetch {spec.model_id}: {_where(spec)} (commit {self.commit[:12]}): "
                f"{len(self.files)} small file{'s' if len(self.files) != 1 else ''}, {self.size / 2**20:.1f} MB")


def _where(spec: ModelSpec) -> str:
    return spec.hf_path + (f"@{spec.revision}" if spec.revision else "")


def fetch_small_files(spec: ModelSpec) -> Fetched:
    """Download ``spec``'s small files at its revision into ``$CARDTUNE_CACHE/hub``;
    :class:`FetchError` (one line) when the hub is offline or unreachable, the repository or
    revision is missing or gated, or a file is too big."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download
    from huggingface_hub.utils import disable_progress_bars, filter_repo_objects

    def fail(reason: str) -> FetchError:
        return FetchError(f"{spec.model_id} ({_where(spec)}): cannot fetch its small files: {reason}")

    if is_offline_mode():
        raise fail("the hub is offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it, "
                   "or check a local copy with --model-path DIR")
    api = HfApi()
    hub_cache = cache_root() / "hub"
    try:
        hub_cache.mkdir(parents=True, exist_ok=True)
        info = api.model_info(spec.hf_path, revision=spec.revision, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - cache, network and hub errors: all one line
        raise fail(_reason(exc, api.endpoint, spec)) from None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    wanted = sorted(filter_repo_objects(sizes, allow_patterns=SMALL_FILE_PATTERNS, ignore_patterns=NEVER_FETCHED))
    if not wanted:
        raise fail(f"the repository holds no tokenizer or config file ({', '.join(SMALL_FILE_PATTERNS)})")
    too_big = [name for name in wanted if sizes[name] > MAX_SMALL_FILE]
    if too_big:
        raise fail(f"{too_big[0]} is {sizes[too_big[0]] / 2**20:.0f} MB, too big for a tokenizer or config file "
                   f"(at most {MAX_SMALL_FILE // 2**20} MB): check a local copy with --model-path DIR")
    try:
        with disable_progress_bars():  # a few small files: the fetch line says what came
            folder = Path(snapshot_download(  # at the commit listed: the files are the ones sized above
                spec.hf_path, revision=info.sha, cache_dir=hub_cache,
                allow_patterns=SMALL_FILE_PATTERNS, ignore_patterns=NEVER_FETCHED,
            ))
    except Exception as exc:  # noqa: BLE001 - network, hub and disk errors: all one line
        raise fail(_reason(exc, api.endpoint, spec)) from None
    return Fetched(folder, info.sha, wanted, sum(sizes[name] for name in wanted))


def _reason(exc: Exception, endpoint: str, spec: ModelSpec) -> str:
    """Why a hub call failed, and what to do, in words."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its terms on its hub page and set HF_TOKEN to a token of that account"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository on the hub (a private one needs HF_TOKEN): check the entry's hf_path"
    if isinstance(exc, RevisionNotFoundError):
        return f"the repository has no revision '{spec.revision or 'main'}': check the entry's revision"
    if isinstance(exc, HfHubHTTPError):
        return f"the hub at {endpoint} answered {exc.response.status_code}"
    if isinstance(exc, OSError) and exc.filename:  # the cache folder, not the hub
        return f"{exc.strerror}: {exc.filename} (set CARDTUNE_CACHE to a folder it can write)"
    detail = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {detail[0] if detail else ''}"
    # Not an OSError: the HTTP client's own (connection refused, timeout, name not resolved).
    return what if isinstance(exc, OSError) else f"the hub at {endpoint} cannot be reached ({what})"
