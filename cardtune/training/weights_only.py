"""The files of a checkpoint that a resume unpickles, checked before anything loads the way the
Trainer loads them: ``torch.load(weights_only=True)``, with transformers' own allowlist (the
numpy types of ``rng_state.pth``).

A weights-only load runs no code, whatever the file says, but refuses a file that names
anything else (``os.system``, a class) with an ``UnpicklingError`` deep inside the Trainer,
after the model has loaded, naming no file. Checked here, the refusal is one line naming the
checkpoint, the file and what it names, before the run starts.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from cardtune.training.arguments import ArgumentError

TORCH_FILES = (".pt", ".pth", ".bin")
NEVER_LOADED = ("training_args.bin",)
"""Written by the Trainer for the record (a pickled ``TrainingArguments``, not weights); no resume reads it."""


def refused_file(checkpoint: str | Path) -> str | None:
    """``FILE: why`` for the first torch file of ``checkpoint`` that a weights-only load refuses, or None."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    for file in sorted(Path(checkpoint).iterdir()):
        if not file.is_file() or file.suffix not in TORCH_FILES or file.name in NEVER_LOADED:
            continue
        with safe_globals():
            try:  # what it names, read without unpickling anything
                unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
            except (ValueError, RuntimeError, OSError):
                continue  # not a torch zip file: the completeness check speaks of that
            if unsafe:
                named = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
                return f"{file.name}: it names {named}, which a weights-only load refuses"
            try:  # the load itself (mapped, no tensor read): what a static look may miss
                torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "refused"
                return f"{file.name}: a weights-only load refuses it ({first})"
            except Exception:  # noqa: BLE001 - any other failure is the Trainer's to report as it loads
                continue
    return None


def check_weights_only(checkpoint: str | Path) -> None:
    """An :class:`ArgumentError` (one line) when a file of ``checkpoint`` would be refused on resume."""
    refused = refused_file(checkpoint)
    if refused:
        raise ArgumentError(
            f"{checkpoint}: {refused} (the Trainer loads checkpoints weights-only: torch.load(weights_only=True)), "
            "so this checkpoint cannot be resumed: it was altered, or written by other software. Resume from a "
            "checkpoint this run wrote (--resume_from_checkpoint PATH), or start over without --resume_from_checkpoint")
