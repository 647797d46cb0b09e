"""What a training method contributes to a run, in one place; the stages every run shares
(resolve, checks, resume point, data, model, trainer, output) are :mod:`cardtune.train`'s.

A method says which arguments it takes, what encodes and validates a sample, the datasets and
collator the Trainer reads, the Trainer itself (its loss and logged figures), and what the
closing lines say of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class TrainingData:
    """What the Trainer reads: the datasets, the collator, and for the batch sampler each
    training item's exact length and whether it carries media."""

    train: Any
    eval: Any | None
    collator: Any
    lengths: list[int]
    media_flags: list[bool]
    note: str | None = None
    """A line the run prints about them (packing's rows)."""


class Method:
    """A training method; see the module."""

    name: ClassVar[str]
    help: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()
    """Arguments only this method takes: given to another method, they are an error."""
    demo_files: ClassVar[tuple[str, str]]
    """The demo dataset's (train, eval) files this method trains on by default."""
    demo_recipe: ClassVar[str]
    """The demo model's own recipe for this method (``configs/train/``)."""

    def check(self, args: Any) -> None:
        """Combinations of arguments this method cannot train, before anything loads."""

    def encoder(self, engine: Any) -> Any:
        """What validates and encodes one record for this method (``engine``: the model's
        :class:`~cardtune.collators.engine.ChatEncoder`)."""
        return engine

    def cache_settings(self) -> dict[str, Any]:
        """Settings that shape the validated data beyond the encoder's (kept in the data cache's key)."""
        return {}

    def data(self, splits: Any, encoder: Any, media: Any, prepared: Any, args: Any) -> TrainingData:
        raise NotImplementedError

    def describe(self, prepared: Any, arguments: Any) -> list[str]:
        """Lines the run prints before step 1 about what this method trains with."""
        return []

    def trainer(self, prepared: Any, arguments: Any, /, **common: Any) -> Any:
        """The Trainer, from the arguments every method's Trainer takes (``common``)."""
        raise NotImplementedError

    def closing_lines(self, history: list[dict[str, Any]]) -> list[str]:
        """What the run's closing lines say of this method's logged figures."""
        return []
