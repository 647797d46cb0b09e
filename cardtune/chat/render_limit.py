"""A time limit on rendering a chat template, so a template that never ends stops the command.

A chat template is code that comes with a model folder. transformers renders it in jinja2's
sandbox, which keeps it from Python's internals but not from looping: three nested
``{% for %}`` over ``range(100000)`` (the sandbox's own cap on one range) run for days. No
render of a real conversation comes near a second, so a render still going after
:data:`RENDER_SECONDS` is a template that never ends.

The limit is an interval timer (``setitimer``) whose ``SIGALRM`` raises in the rendering
thread: no thread or process of its own, and a few microseconds a render (arming and disarming the
timer; the handler is installed once per process), against some 50 us for the render itself.
A signal reaches only a process's main thread, where every render of cardtune happens (the
commands, and the main thread of each validation and DataLoader worker process). A render in
another thread, while a timer of someone else's is armed, where ``SIGALRM`` has a handler of
the program's own, or where there is no ``setitimer`` (Windows) runs unbounded rather than
disturb them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

RENDER_SECONDS = 10.0
"""The longest one render may take."""
_HAS_TIMER = hasattr(signal, "setitimer")


class RenderTimeout(BaseException):
    """A chat template still rendering after :data:`RENDER_SECONDS`.

    A ``BaseException``, as ``KeyboardInterrupt`` is: the code around a render catches
    ``Exception`` to treat a template that refuses a conversation as an answer ("this form is
    not accepted"), and a template that never ends must stop the command instead of being tried
    again with the next form."""

    def __init__(self, where: str, seconds: float) -> None:
        self.where = where
        self.seconds = seconds
        super().__init__(
            f"{where}: the chat template did not finish rendering one conversation in {seconds:g} s (it loops "
            "without end, or as good as): fix the template, or give --template FILE (another chat template)")


_active: tuple[Callable[[], str], float] | None = None
"""The render whose timer is armed in this process: what names its folder, and its limit."""


def _expired(signum: int, frame: Any) -> None:
    if _active is not None:
        where, limit = _active
        raise RenderTimeout(where(), limit)
    # Not ours (an alarm() of code that expects SIGALRM's default): do what the default does.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.raise_signal(signal.SIGALRM)


def _can_arm() -> bool:
    if not _HAS_TIMER or threading.get_ident() != threading.main_thread().ident:
        return False
    handler = signal.getsignal(signal.SIGALRM)
    if handler is not _expired:
        if handler is not signal.SIG_DFL:
            return False  # the program's own handler (or SIG_IGN): left alone
        signal.signal(signal.SIGALRM, _expired)
    return True


def bounded(where: Callable[[], str], call: Callable[[], T], seconds: float | None = None) -> T:
    """``call()``, stopped with :class:`RenderTimeout` (naming ``where()``) once it has run
    ``seconds`` (default :data:`RENDER_SECONDS`), where a timer can be armed (see the module notes)."""
    global _active
    if not _can_arm():
        return call()
    limit = RENDER_SECONDS if seconds is None else seconds
    _active = (where, limit)
    earlier = signal.setitimer(signal.ITIMER_REAL, limit)
    if earlier[0]:  # a timer of someone else's was running: theirs again, and this render unbounded
        signal.setitimer(signal.ITIMER_REAL, *earlier)
        _active = None
        return call()
    try:
        return call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _active = None


def renderer_name(renderer: Any) -> str:
    """The folder (or hub id) a tokenizer or processor was loaded from."""
    for owner in (renderer, getattr(renderer, "tokenizer", None)):
        name = getattr(owner, "name_or_path", None)
        if name:
            return str(name)
    return "the model"


def render_chat(renderer: Any, messages: Any, arguments: dict[str, Any]) -> Any:
    """``apply_chat_template`` to text, with the arguments every render passes (the frozen date:
    ``cardtune.collators.roles.template_kwargs``); a render that does not end is stopped."""
    return bounded(lambda: renderer_name(renderer),
                   lambda: renderer.apply_chat_template(messages, tokenize=False, **arguments))
