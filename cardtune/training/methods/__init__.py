"""Training methods by name (``--method``): ``sft`` (:mod:`.sft`) and ``dpo`` (:mod:`.dpo`).

Each registers itself with :func:`register_method`; the registry is checked at import against the
names ``--method`` accepts (the choices of ``TuneArguments.method``). Importing this package is cheap: a
method imports torch and the Trainer only when a run asks it for them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, get_args

from cardtune.training.methods.base import Method, TrainingData

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def method_named(name: str) -> Method:
    return METHODS[name]()


def _check_complete() -> None:
    from typing import get_type_hints

    from cardtune.training.arguments import TuneArguments

    named = set(get_args(get_type_hints(TuneArguments)["method"]))
    if set(METHODS) != named:
        raise ImportError(f"training methods registered {sorted(METHODS)}, but --method names {sorted(named)}")


from cardtune.training.methods import dpo, sft  # noqa: E402,F401  (register themselves)

_check_complete()

__all__: list[Any] = ["METHODS", "Method", "TrainingData", "method_named", "register_method"]
