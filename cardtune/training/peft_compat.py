"""peft on transformers 5: one known deprecation, kept out of every run's output.

``peft.PeftModel.__init__`` (peft 0.21) reads ``model.is_gradient_checkpointing`` to decide
whether to hook the input embeddings; transformers 5 made that property a deprecated alias of
``is_activation_checkpointing`` that warns on each read. The read is peft's, not ours, and
changes nothing, so exactly that warning is ignored while peft wraps or loads a model; any
other warning, from peft or anything else, still shows.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

ALIAS_WARNING = r"`is_gradient_checkpointing` is deprecated"


@contextmanager
def peft_reading_checkpointing_alias() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=ALIAS_WARNING, category=FutureWarning)
        yield
