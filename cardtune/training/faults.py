"""How a run stops when training goes wrong: numbers that are no longer finite, and Ctrl-C.

**Not finite.** A loss or gradient norm that is NaN or infinite stops the run at the step it is
logged (``training.trainer.NonFiniteGuard``, from the values the Trainer already logs: no extra
synchronisation per step), and no weights that are not finite are ever written: every save
(each checkpoint and the final folder) first checks the trainable parameters
(:func:`check_finite_weights`: one reduction and one synchronisation per save, next to which
writing the files is slow). So every checkpoint a run leaves is one whose weights were finite,
and the error names the last of them. transformers' ``logging_nan_inf_filter`` logs a NaN
step's loss as the mean of the window's earlier steps, 0.0 in a window of one step (how a NaN
run closed with ``loss: 7.249 -> 0.000``): the run turns it off unless it is asked for.
Under fp16 mixed precision an overflowing step is the loss scaler's business (it skips the
step), so only the weights count there.

**Ctrl-C** ends the run with what was saved and the command that continues it
(:class:`Interrupted`, exit status 130), never a traceback.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any


class NonFiniteError(RuntimeError):
    """Training produced a loss, gradient norm or weights that are not finite; nothing
    non-finite was saved."""

    quiet = False
    """Set on the ranks other than the main one of a multi-process run: the main one says it."""

    def __init__(self, step: int, what: str) -> None:
        super().__init__(step, what)
        self.step = step
        self.what = what
        self.hint = ""
        """The last good checkpoint and how to go on, added by the run (it knows the folder)."""

    def __str__(self) -> str:
        return (f"stopped at step {self.step}: {self.what} not finite; nothing that is not finite was saved, "
                "and no final model was written" + (f"\n{self.hint}" if self.hint else ""))


def nonfinite_weights(model: Any) -> bool:
    """Whether any trainable parameter holds a NaN or an infinity, on any rank. Each rank looks
    at its own part (a DeepSpeed ZeRO-3 partition, an FSDP shard, or the whole tensor)."""
    import torch

    flags = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3 keeps a rank's partition here
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 DTensor's shard
        if local.numel():
            flags.append(torch.isfinite(local).all().to(flags[0].device if flags else local.device))
    finite = torch.stack(flags).all() if flags else torch.tensor(True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        as_int = finite.to(torch.int32)
        if torch.distributed.get_backend() == "nccl":
            as_int = as_int.cuda()
        torch.distributed.all_reduce(as_int, op=torch.distributed.ReduceOp.MIN)
        finite = as_int.bool()
    return not bool(finite)


def check_finite_weights(model: Any, step: int) -> None:
    """Before a save: :class:`NonFiniteError` when a trainable parameter is not finite."""
    if nonfinite_weights(model):
        raise NonFiniteError(step, "the trainable weights are")


# -- what a stopped run says ----------------------------------------------------------------
def train_command(argv: Sequence[str], *, resume: str, overwrite_from_recipe: bool = False) -> str:
    """The command the user ran (``python train.py`` or ``cardtune train``), continuing from
    ``resume`` (``auto`` or a checkpoint) instead of starting over."""
    program = sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "train.py" else None
    words = ["python", program] if program else ["cardtune", "train"]
    kept: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        word = items[i]
        name = word.split("=", 1)[0]
        if name == "--resume_from_checkpoint":
            i += 1 if "=" in word else 2
            continue
        if name == "--overwrite_output_dir":
            i += 1
            if "=" not in word and i < len(items) and items[i].lower() in ("true", "false", "yes", "no", "1", "0"):
                i += 1
            continue
        kept.append(word)
        i += 1
    tail = ["--overwrite_output_dir", "false"] if overwrite_from_recipe else []
    return shlex.join([*words, *kept, *tail, "--resume_from_checkpoint", resume])


def last_good_checkpoint(output_dir: str | Path, before_step: int, checked: Collection[int] = ()) -> Path | None:
    """The latest complete checkpoint in ``output_dir`` saved before ``before_step``. Those
    this run saved (their steps in ``checked``) had finite weights; one another run left is
    read back to be sure (on this failure path only)."""
    from cardtune.training.checkpoints import checkpoint_step, complete_checkpoints

    for folder in reversed(complete_checkpoints(output_dir)):
        step = checkpoint_step(folder)
        if step < before_step and (step in checked or not _nonfinite_files(folder)):
            return folder
    return None


def _nonfinite_files(folder: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    bad = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            if any(not torch.isfinite(f.get_tensor(k)).all() for k in f.keys()):
                bad.append(file.name)
    return bad


class Interrupted(RuntimeError):
    """Ctrl-C: what was saved, and the command that continues."""

    quiet = False

    def __init__(self, step: int | None, saved: Path | None, command: str) -> None:
        where = f"at step {step}" if step is not None else "before training started"
        kept = (f"the last complete checkpoint is {saved}" if saved is not None
                else "nothing was saved (no checkpoint was complete)")
        super().__init__(f"interrupted {where} (Ctrl-C); {kept}\nto continue: {command}")
