"""A disk that fills up during a run: one clear error naming the folder and what was being
written, instead of the writer's own exception (safetensors: ``SafetensorError ... (os error
28)``; torch: ``RuntimeError ... inline_container.cc ...``; Python: ``OSError [Errno 28]``).
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How the writers that report no errno say it: Rust's io::Error (safetensors, tokenizers).
_FULL_TEXTS = ("os error 28", "os error 122", "No space left on device", "Disk quota exceeded", "StorageFull")
# torch.save's zip writer loses the errno ("unexpected pos", "file write failed"): a failed
# write of its archive is taken for a full disk only when the disk is nearly full.
_TORCH_WRITER_TEXT = "inline_container.cc"
_NEARLY_FULL_BYTES = 64 * 2**20


class DiskFullError(RuntimeError):
    """No space left where the run writes; nothing half-written is left to resume from."""

    def __init__(self, folder: str | Path, what: str, cause: BaseException) -> None:
        super().__init__(folder, what)
        self.folder = Path(folder)
        self.what = what
        self.cause = cause
        self.free = _free_bytes(self.folder)
        self.hint = ""
        """What to do next, added by whoever knows (the run: which checkpoint a resume takes)."""

    def __str__(self) -> str:
        where = f"{self.folder} ({self.free / 2**20:,.1f} MiB free)" if self.free is not None else str(self.folder)
        return (f"no space left on device while writing {self.what} in {where} "
                f"({type(self.cause).__name__}: {self.cause})" + (f"\n{self.hint}" if self.hint else ""))


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_disk_full(exc: BaseException, folder: str | Path) -> bool:
    """Whether ``exc`` (or an exception it came from) is a write that found no space."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        text = str(e)
        if any(t in text for t in _FULL_TEXTS):
            return True
        if _TORCH_WRITER_TEXT in text:
            free = _free_bytes(Path(folder))
            return free is not None and free < _NEARLY_FULL_BYTES
    return False


@contextmanager
def writing(folder: str | Path, what: str | Callable[[], str]) -> Iterator[None]:
    """Turn a full disk inside the block into :class:`DiskFullError` naming ``folder`` and
    ``what`` (a callable is asked only when the disk filled up)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not is_disk_full(exc, folder):
            raise
        raise DiskFullError(folder, what() if callable(what) else what, exc) from exc
