"""The Trainer: ``transformers.Trainer`` fed by cardtune's batch sampler, plus the callbacks a
run needs (loss curve, card and arguments in every checkpoint), and ``auto`` resumption.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cardtune.datasets import LengthGroupedBatchSampler
from cardtune.training.output import ARGS_FILE, CARD_FILE

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"
LOG_FILE = "log_history.json"


class CardtuneTrainer(Trainer):
    """A Trainer whose training batches come from :class:`LengthGroupedBatchSampler`.

    ``lengths`` are the items' exact token counts (length grouping; ignored otherwise) and
    ``media_flags`` which items carry media (DeepSpeed ZeRO-3 needs no text-only batch).
    The sampler yields every rank's batch of a step in turn; ``accelerator.prepare`` deals
    them out round-robin, so ranks never share a batch.
    """

    def __init__(self, *args: Any, lengths: list[int], media_flags: list[bool], group_by_length: bool,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cardtune_lengths = lengths
        self.cardtune_media_flags = media_flags
        self.cardtune_group_by_length = group_by_length

    def _modality(self) -> str:
        flags = self.cardtune_media_flags
        zero3 = self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        return "no_text_only" if zero3 and any(flags) and not all(flags) else "mixed"

    def get_train_dataloader(self) -> Any:
        from torch.utils.data import DataLoader

        args = self.args
        sampler = LengthGroupedBatchSampler(
            self.cardtune_lengths,
            self._train_batch_size,
            num_replicas=args.world_size,
            rank=None,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            drop_last=args.dataloader_drop_last,
            group_by_length=self.cardtune_group_by_length,
            media=self.cardtune_media_flags,
            modality=self._modality(),  # type: ignore[arg-type]
        )
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if args.dataloader_num_workers > 0 else None,
        )
        return self.accelerator.prepare(loader)


# -- callbacks ----------------------------------------------------------------------------------
class CardFilesCallback(TrainerCallback):
    """Writes the resolved card and the arguments into every checkpoint, so each one is a
    complete, self-describing folder (``cardtune chat``/``merge`` read the card from it)."""

    def __init__(self, card_yaml: str, arguments: dict[str, Any]) -> None:
        self.card_yaml = card_yaml
        self.arguments = arguments

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CARD_FILE).write_text(self.card_yaml, encoding="utf-8")
        (folder / ARGS_FILE).write_text(json.dumps(self.arguments, indent=2, default=str) + "\n", encoding="utf-8")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                self.write(folder)


class LossPlotCallback(TrainerCallback):
    """At the end of training: ``loss.png`` (train loss, and eval loss when there is one) and
    ``log_history.json`` in the output dir. A resumed run's history includes the earlier steps."""

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / LOG_FILE).write_text(json.dumps(state.log_history, indent=1) + "\n", encoding="utf-8")
        plot_loss(state.log_history, out / LOSS_PLOT)


def plot_loss(history: list[dict[str, Any]], path: str | Path) -> Path | None:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# -- resume -------------------------------------------------------------------------------------
def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-N`` folders whose trainer state was written (the Trainer writes it last),
    oldest first: a run killed while saving leaves a folder without it, which is skipped."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found: list[tuple[int, Path]] = []
    for child in folder.iterdir():
        if not (child.is_dir() and child.name.startswith(PREFIX_CHECKPOINT_DIR + "-")):
            continue
        step = child.name.rsplit("-", 1)[-1]
        state = child / "trainer_state.json"
        if not step.isdigit() or not state.is_file():
            continue
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append((int(step), child))
    return [p for _, p in sorted(found)]


def resolve_resume(value: str | None, output_dir: str | Path) -> tuple[str | None, str | None]:
    """(checkpoint to resume from, note). ``auto``: the latest complete checkpoint in
    ``output_dir``, or a fresh start when there is none."""
    if value is None or value == "" or str(value).lower() in ("false", "no", "none"):
        return None, None
    if str(value).lower() in ("auto", "true", "latest"):
        done = complete_checkpoints(output_dir)
        if not done:
            return None, f"resume: auto: no complete checkpoint in {output_dir}; starting from step 0"
        return str(done[-1]), f"resume: auto: {done[-1]}"
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    return str(value), f"resume: {value}"
