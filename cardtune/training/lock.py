"""One run at a time in an output folder.

A run holds ``output_dir/.cardtune-run.lock`` from before its heavy work until it exits: the
file is created atomically (``O_CREAT | O_EXCL``) and names its owner (pid, host, start time).
A second run into the same folder is refused naming the first. A lock left by a process that
is gone (killed, or a machine that restarted) is recognised on the same host and taken over,
saying so; on another host nobody can tell, so the message says which file to delete. The lock
is released when the run ends: normally, on an exception (``finally``) and on SIGTERM (the
handler removes it, then lets the signal do what it did before). Creating the lock is also the
check that the folder can be written, done before anything loads. Only the main process of a
multi-process launch takes it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cardtune.training.arguments import ArgumentError

LOCK_FILE = ".cardtune-run.lock"
_UNREADABLE_GRACE_S = 10.0
"""A lock with no readable owner is another run between creating and writing it, unless older."""


class FolderInUseError(RuntimeError):
    """Another run holds the output folder."""


class OutputNotWritableError(ArgumentError):
    """The output folder cannot be created or written."""


def _owner_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})


def _read(path: Path) -> tuple[str, dict[str, Any] | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "", None
    try:
        owner = json.loads(text)
        return text, owner if isinstance(owner, dict) and {"pid", "host", "since"} <= owner.keys() else None
    except ValueError:
        return text, None


def describe(owner: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(owner["since"])))
    return f"pid {owner['pid']} on {owner['host']}, since {since}"


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (Linux /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    if fields[0] in ("Z", "X"):  # a zombie has exited: it only waits for its parent
        return float("inf")
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def is_running(owner: dict[str, Any]) -> bool:
    """Whether the process that wrote ``owner`` may still run; another host's always may."""
    if owner["host"] != socket.gethostname():
        return True
    pid = int(owner["pid"])
    if pid == os.getpid():
        return False  # this process did not take it: a process of an earlier boot or container had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    started = _started_at(pid)
    # A pid reused by a process that started after the lock was written is not its owner.
    return started is None or started <= float(owner["since"]) + 1.0


class OutputLock:
    """A held lock: :meth:`release` removes it if it is still this run's."""

    def __init__(self, path: Path, text: str, note: str | None, created: bool = False) -> None:
        self.path = path
        self.text = text
        self.note = note
        """The line saying a stale lock was taken over, or None."""
        self.created = created
        """The run created the folder: a run refused before writing anything leaves none behind."""

    def release(self) -> None:
        if _read(self.path)[0] == self.text:
            self.path.unlink(missing_ok=True)
        if self.created:
            try:
                self.path.parent.rmdir()  # only when empty
            except OSError:
                pass


def _not_writable(folder: Path, exc: OSError) -> OutputNotWritableError:
    why = exc.strerror or type(exc).__name__
    return OutputNotWritableError(f"--output_dir {folder}: cannot write there ({why}): give a folder you can write to")


def take(folder: str | Path) -> OutputLock:
    """Create ``folder`` if needed and take its lock; :class:`FolderInUseError` naming the
    owner when a running process holds it."""
    folder = Path(folder)
    created = not folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, not permitted, or a file where a folder should be
        raise _not_writable(folder, exc) from None
    path = folder / LOCK_FILE
    text = _owner_text()
    note = None
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held, owner = _read(path)
            if owner is None:
                if not held and not path.exists():
                    continue  # released meanwhile
                try:
                    age = time.time() - path.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < _UNREADABLE_GRACE_S:
                    raise FolderInUseError(f"{folder} is in use by another run, which is starting now ({path}); "
                                           "wait for it to finish, or use another --output_dir") from None
                note = f"{folder}: taking over {LOCK_FILE}, which names no owner (left {age:.0f}s ago)"
            elif is_running(owner):
                elsewhere = "" if owner["host"] == socket.gethostname() else (
                    f"; if it is no longer running, delete {path}")
                raise FolderInUseError(f"{folder} is in use by another run ({describe(owner)}): wait for it to "
                                       f"finish, or use another --output_dir{elsewhere}") from None
            else:
                note = f"{folder}: taking over the lock of a run that is no longer running ({describe(owner)})"
            _move_aside(path, held)
            continue
        except OSError as exc:
            raise _not_writable(folder, exc) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _not_writable(folder, exc) from None
        return OutputLock(path, text, note, created)
    raise FolderInUseError(f"{folder}: its lock {path} keeps changing hands; use another --output_dir")


def _move_aside(path: Path, stale: str) -> None:
    """Remove the stale lock ``stale`` only: renamed first, so a lock another process took
    meanwhile is put back, never deleted."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text(encoding="utf-8") != stale:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


@contextmanager
def holding(folder: str | Path, main_process: bool, say: Callable[[str], None]) -> Iterator[OutputLock | None]:
    """Hold ``folder`` for the block (the main process only), released also on an exception
    and on SIGTERM."""
    if not main_process:
        yield None
        return
    lock = take(folder)
    if lock.note:
        say(lock.note)
    previous = _release_on_sigterm(lock)
    try:
        yield lock
    finally:
        lock.release()
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:
                pass


def _release_on_sigterm(lock: OutputLock) -> Any:
    """A SIGTERM handler that releases the lock, then hands the signal to the handler before it
    (by default the process ends, as without cardtune: ``auto`` resumes its last checkpoint)."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        return None  # SIGTERM does not end this process: the lock stays until it ends
    previous = previous if previous is not None else signal.SIG_DFL  # None: set outside Python

    def handler(signum: int, frame: Any) -> None:
        lock.release()
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no signal handlers there
        return None
    return previous
