"""Library output that helps no one, silenced through the libraries' own public switches, each
where cardtune has handled what it is about. A line a user sees either helps them or is not
printed.
"""

from __future__ import annotations

import importlib.util


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
