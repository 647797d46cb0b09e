"""Library output that helps no one, silenced through the libraries' own public switches, each
where cardtune has handled what it is about. A line a user sees either helps them or is not
printed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any


def name_deepspeed_accelerator() -> None:
    """deepspeed, which accelerate imports whenever it is installed, warns on every run of a
    machine without an accelerator that it "was unable to detect" one and takes its CPU
    accelerator. There that is the only choice, so it is named through deepspeed's own override
    (``DS_ACCELERATOR=cpu``) and the run says nothing false; a setting of the user's is kept."""
    import os

    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    import torch

    if not torch.accelerator.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def bpe_cleanup_off(tokenizer: Any) -> None:
    """transformers ignores ``clean_up_tokenization_spaces=True`` on a BPE tokenizer (the cleanup
    is WordPiece's: on BPE it strips the spaces before punctuation) and says so on the first
    decode of every run (llama-3's folders set it). cardtune decodes answers to check labels and
    to chat, which needs them exactly: the flag is set to what transformers does anyway, its own
    way to leave the warning out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (getattr(tokenizer, "clean_up_tokenization_spaces", False) and backend is not None
            and type(backend.model).__name__ == "BPE"
            and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)):
        tokenizer.clean_up_tokenization_spaces = False


@contextlib.contextmanager
def no_weight_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", "Writing model shards") off inside the
    block: a local folder loads or saves in seconds, and a bar drawn before cardtune's first line
    told the user nothing to act on. The Trainer's progress bar is not one of them."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def plain_cardtune_warnings() -> None:
    """cardtune's own warnings (a capability the card marks experimental) as one line,
    ``warning: ...``, not Python's ``FILE:LINE: Category: ...`` followed by the source line that
    raised it. Other libraries' warnings print as they do."""
    original = warnings.formatwarning
    if getattr(original, "cardtune", False):
        return

    def format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
        if category.__module__.split(".")[0] == "cardtune":
            return f"warning: {message}\n"
        return original(message, category, filename, lineno, line)

    format_warning.cardtune = True  # type: ignore[attr-defined]
    warnings.formatwarning = format_warning
