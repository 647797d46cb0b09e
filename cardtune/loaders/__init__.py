"""Loaders: one per family where loading differs, most families share ``generic``.

``LOADERS`` maps a card's ``loader`` name to its class; the registry checks at ``cardtune
check`` time that every card names a loader that exists. Heavy imports happen on use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

LOADERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_loader(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in LOADERS:
            raise ValueError(f"loader '{name}' registered twice")
        LOADERS[name] = cls
        return cls

    return wrap


from cardtune.loaders import generic  # noqa: E402,F401,I001  (registers "generic"; generic first)
from cardtune.loaders import demo  # noqa: E402,F401  (registers "demo")
from cardtune.loaders import qwen_vl  # noqa: E402,F401  (registers "qwen-vl")
