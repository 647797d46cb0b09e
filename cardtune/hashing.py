"""Content fingerprints for cardtune's caches (the validated data, the tokenizer class memo)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")
"""A model folder's weights: never part of a key (what a key covers is read, weights are not)."""


def hasher() -> Any:
    """A fast 128-bit hasher: xxh3 (xxhash comes with datasets), else blake2b."""
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:
        import hashlib

        return hashlib.blake2b(digest_size=16)


def hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


LARGE_FILE = 64 * 2**20
"""A model folder's file this big (an archive, a dataset copied in, weights under a name not
known as weights) is keyed by its size and modification time, not read on every command."""


def hash_tree(h: Any, folder: Path, skip: tuple[str, ...] = (), recursive: bool = True,
              read_up_to: int | None = None) -> None:
    """Every file's relative name and bytes, in sorted order; names ending in ``skip`` left out.
    ``read_up_to``: a file bigger than this is keyed by its size and mtime instead (a model
    folder's, :func:`hash_model_folder`; a data folder's files are always read)."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(p for p in files if p.is_file()):
        if path.name.endswith(skip) or "__pycache__" in path.parts:
            continue
        h.update(str(path.relative_to(folder)).encode())
        stat = path.stat()
        if read_up_to is not None and stat.st_size > read_up_to:
            h.update(f"size={stat.st_size} mtime_ns={stat.st_mtime_ns}".encode())
        else:
            hash_file(h, path)


def hash_model_folder(h: Any, folder: Path, recursive: bool = True) -> None:
    """A model folder as a key sees it: every file but the weights, one over :data:`LARGE_FILE`
    by its size and mtime."""
    hash_tree(h, folder, skip=WEIGHT_SUFFIXES, recursive=recursive, read_up_to=LARGE_FILE)


PACKAGE = Path(__file__).resolve().parent


def code_fingerprint() -> str:
    """cardtune's version and the source of every module (the engine, the data code, the loaders)."""
    from cardtune import __version__

    h = hasher()
    h.update(__version__.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        h.update(str(path.relative_to(PACKAGE)).encode())
        hash_file(h, path)
    return h.hexdigest()


class FolderMemo:
    """A JSON value worked out from a local model folder, kept under ``$CARDTUNE_CACHE/<kind>/``.

    Keyed by transformers' version, the folder's path, ``parts`` (what else decides the value)
    and the bytes of every file at the top of the folder but the weights, so an edited
    tokenizer_config.json or a new transformers is a miss. A cache that cannot be written or
    read is no error: the value is worked out again.
    """

    def __init__(self, file: Path) -> None:
        self.file = file

    @classmethod
    def of(cls, kind: str, folder: str | Path, *parts: Any) -> FolderMemo | None:
        """None for a path that is not a local folder (a hub id: nothing to key on)."""
        import transformers

        from cardtune.demo.cache import cache_root

        folder = Path(folder)
        if not folder.is_dir():
            return None
        h = hasher()
        h.update(json.dumps([kind, transformers.__version__, str(folder.resolve()), parts],
                            sort_keys=True, default=str).encode())
        try:
            hash_model_folder(h, folder, recursive=False)
        except OSError:
            return None
        return cls(cache_root() / kind / f"{h.hexdigest()}.json")

    def load(self) -> Any:
        try:
            return json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def store(self, value: Any) -> None:
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(value), encoding="utf-8")
            os.replace(tmp, self.file)
        except OSError as exc:
            logging.getLogger(__name__).info("could not keep %s (%s)", self.file, exc)
