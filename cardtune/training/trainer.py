"""The Trainer: ``transformers.Trainer`` fed by cardtune's batch sampler, plus the callbacks a
run needs (loss curve, card and arguments in every checkpoint, a stop at numbers that are not
finite).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from cardtune.datasets import LengthGroupedBatchSampler
from cardtune.training.faults import NonFiniteError, check_finite_weights
from cardtune.training.output import ARGS_FILE, CARD_FILE
from cardtune.training.writes import writing

log = logging.getLogger(__name__)

LOSS_PLOT = "loss.png"
LOG_FILE = "log_history.json"


class CardtuneTrainer(Trainer):
    """A Trainer whose training batches come from :class:`LengthGroupedBatchSampler`, and
    whose saved folders carry the card files.

    ``lengths`` are the items' exact token counts (length grouping; ignored otherwise) and
    ``media_flags`` which items carry media (DeepSpeed ZeRO-3 needs no text-only batch).
    The sampler yields every rank's batch of a step in turn; ``accelerator.prepare`` deals
    them out round-robin, so ranks never share a batch.

    ``moe`` (an upcycled model's ``MoESpec``): each training step's loss gets the
    load-balancing loss, ``router_aux_loss_coef * aux_loss``, and each training log line the
    window's ``aux_loss`` and expert load (``moe_load/layer_N/expert_E``, ``moe_load_cv``).

    ``loss`` (an ``OutputHead``, see ``training.loss``): training steps compute the model's loss
    from its last hidden states, a chunk of trained positions at a time, never its whole logits;
    evaluation keeps the model's own.

    ``card``: every trainable parameter takes part in every training step
    (:mod:`cardtune.training.participation`): a batch that reaches none of them is skipped
    cleanly and counted (``cardtune_participation``), and under DDP the parameters a batch may
    not reach get a zero-weighted touch, so DDP needs no search for unused parameters.

    ``generation`` (``--eval_generate``, :mod:`cardtune.evaluation.during_training`): each
    evaluation's log also gets the generation metrics (``eval_exact_match``, ...).
    """

    def __init__(self, *args: Any, lengths: list[int], media_flags: list[bool], group_by_length: bool,
                 card_files: CardFiles | None = None, moe: Any = None, loss: Any = None, card: Any = None,
                 generation: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cardtune_generation = generation
        self.cardtune_participation = None
        if card is not None:
            from cardtune.training.participation import Participation

            self.cardtune_participation = Participation(self.model, card, distributed=self._ddp())
        self.cardtune_loss = loss
        self.cardtune_lengths = lengths
        self.cardtune_media_flags = media_flags
        self.cardtune_group_by_length = group_by_length
        self.cardtune_card_files = card_files
        self.cardtune_routing = None
        self.cardtune_finite_saves: set[int] = set()
        """Steps whose weights were found finite when saved (:func:`check_finite_weights`)."""
        if moe is not None:
            from cardtune.training.moe import RoutingMonitor

            self.cardtune_routing = RoutingMonitor(self.model, moe.router_aux_loss_coef)

    def _ddp(self) -> bool:
        """Several processes whose parameters are whole in each (DDP, DeepSpeed ZeRO-1/2): not
        ZeRO-3 or FSDP, whose parameters are shards outside their module's forward; nor DDP
        told to find unused parameters itself (``--ddp_find_unused_parameters true``), which
        marks them ready after the forward, so a touch in backward would mark them twice."""
        if self.args.world_size <= 1 or self.is_fsdp_enabled or self.args.ddp_find_unused_parameters:
            return False
        return not (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        result = self._compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.cardtune_participation is None or not model.training:
            return result
        if return_outputs:
            return self.cardtune_participation(result[0]), result[1]
        return self.cardtune_participation(result)

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        parallel = getattr(self.accelerator, "parallelism_config", None)
        if (self.cardtune_loss is not None and model.training and "labels" in inputs
                and self.label_smoother is None and self.compute_loss_func is None
                and not getattr(parallel, "sp_enabled", False)):  # sequence parallelism shards the labels
            from cardtune.training.loss import ChunkedLossModel

            # The Trainer calls it as it would the model (num_items_in_batch passed or not, the
            # loss scaled across devices), and it returns the model's outputs with the same loss.
            model = ChunkedLossModel(model, self.cardtune_loss)
        routing = self.cardtune_routing
        if routing is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        routing.start()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux = routing.finish(inputs.get("attention_mask"))
        scaled = (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None
                  else self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        # A loss already normalised over the accumulated batch is not divided by the number of
        # accumulation steps again: the aux loss, a per-batch mean, is divided here instead.
        weight = routing.coef / (self.current_gradient_accumulation_steps if scaled else 1)
        loss = loss + weight * aux.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.cardtune_routing is not None and "loss" in logs:
            logs.update(self.cardtune_routing.window_logs(self.accelerator))
        if self.cardtune_generation is not None and "eval_loss" in logs:
            # in place: evaluate() returns this dict, so metric_for_best_model sees them too
            logs.update(self.cardtune_generation(self.model, self.state.global_step))
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The weights, then the card files: in a checkpoint both land before its trainer state,
        which the Trainer writes last, so a checkpoint with a trainer state has its arguments.
        Weights that are not finite are never written (:class:`NonFiniteError` instead)."""
        folder = output_dir or self.args.output_dir
        check_finite_weights(self.model, self.state.global_step)  # before anything is written
        self.cardtune_finite_saves.add(self.state.global_step)
        with writing(folder, "the model weights"):
            if _internal_call and self._plain_weights():
                self._save_checkpoint_weights(folder)
            else:
                super().save_model(output_dir, _internal_call=_internal_call)
        if self.cardtune_card_files is not None and self.args.should_save:
            self.cardtune_card_files.write(folder)

    def _plain_weights(self) -> bool:
        """A full (not adapter) model whose weights the Trainer saves itself, not DeepSpeed or FSDP."""
        from transformers import PreTrainedModel

        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return (isinstance(model, PreTrainedModel) and not getattr(model, "_hf_peft_config_loaded", False)
                and not self.is_deepspeed_enabled and not self.is_fsdp_enabled)

    def _save_checkpoint_weights(self, folder: str) -> None:
        """A checkpoint's weights under the names the model has in memory.

        transformers 5 saves a model under its original checkpoint names by default (a llava's
        ``model.language_model.*`` written back as ``language_model.model.*``), while the
        Trainer resumes with a non-strict ``load_state_dict`` of the raw file: no key matched,
        nothing loaded, and training went on from the base weights without a word. The final
        folder keeps the original names (what other tools load); checkpoints, read back by the
        Trainer only, are written as they are in memory (``save_original_format=False``)."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.save_pretrained(folder, is_main_process=self.args.should_save, save_original_format=False)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(folder)
            import torch
            from transformers.trainer import TRAINING_ARGS_NAME

            torch.save(self.args, Path(folder) / TRAINING_ARGS_NAME)

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
class CardFiles:
    """The resolved card and the arguments, written beside the weights of every checkpoint and
    of the final folder, so each one is complete and self-describing (``cardtune chat``/``merge``
    read the card from it; ``auto`` resumes only a checkpoint whose arguments match)."""

    def __init__(self, card_yaml: str, arguments: dict[str, Any], extra: dict[str, str] | None = None) -> None:
        self.card_yaml = card_yaml
        self.arguments = arguments
        self.extra = dict(extra or {})
        """More files by name and text (an adapter's ``cardtune_moe.json``)."""

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        with writing(folder, f"{CARD_FILE} and {ARGS_FILE}"):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / CARD_FILE).write_text(self.card_yaml, encoding="utf-8")
            (folder / ARGS_FILE).write_text(json.dumps(self.arguments, indent=2, default=str) + "\n", encoding="utf-8")
            for name, text in self.extra.items():
                (folder / name).write_text(text, encoding="utf-8")


class LossPlotCallback(TrainerCallback):
    """At the end of training: ``loss.png`` (train loss, and eval loss when there is one) and
    ``log_history.json`` in the output dir. A resumed run's history includes the earlier steps.
    ``plot`` is the plot written, None when nothing was logged to plot."""

    def __init__(self) -> None:
        self.plot: Path | None = None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir)
        with writing(out, f"{LOG_FILE} and {LOSS_PLOT}"):
            out.mkdir(parents=True, exist_ok=True)
            (out / LOG_FILE).write_text(json.dumps(state.log_history, indent=1) + "\n", encoding="utf-8")
            self.plot = plot_loss(state.log_history, out / LOSS_PLOT)


def _finite(value: Any) -> bool:
    return not isinstance(value, (int, float)) or math.isfinite(value)


class NonFiniteGuard(TrainerCallback):
    """Stops training at the first logged loss or gradient norm that is not finite, before the
    checkpoint of that step is saved or evaluation runs. Every rank logs the same values (the
    loss is gathered, the gradients reduced), so every rank stops at the same step."""

    def __init__(self) -> None:
        self.fault: NonFiniteError | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        # Under fp16 the loss scaler skips a step that overflows and lowers its scale: there only
        # the weights count (checked before every save).
        if self.fault is not None or "loss" not in logs or args.fp16:
            return
        bad = [f"the loss ({logs['loss']})"] if not _finite(logs["loss"]) else []
        if not _finite(logs.get("grad_norm")):
            bad.append(f"the gradient norm ({logs['grad_norm']})")
        if bad:
            self.fault = NonFiniteError(state.global_step, " and ".join(bad) + (" is" if len(bad) == 1 else " are"))
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    def raise_if_stopped(self) -> None:
        if self.fault is not None:
            raise self.fault


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
