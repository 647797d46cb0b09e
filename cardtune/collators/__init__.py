"""Collators: the one masking engine plus per-family media handling where it truly differs.

``COLLATORS`` maps a card's ``collator`` name to its class; heavy imports happen on use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

COLLATORS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_collator(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in COLLATORS:
            raise ValueError(f"collator '{name}' registered twice")
        COLLATORS[name] = cls
        return cls

    return wrap


from cardtune.collators import media  # noqa: E402,F401  (registers "default" and the family ones)
