"""The Trainer of preference pairs: each batch is every pair's chosen sequence, then its rejected
one (:class:`~cardtune.collators.pairs.PairCollator`); a step's loss is the sum of its pairs'
losses divided by the number of pairs in the whole accumulated batch, over every rank
(``num_items_in_batch``, counted here in pairs), so gradient accumulation and data parallelism
weigh every pair the same: not a mean of per-batch means.

Logged with the loss, for training and evaluation (``eval_`` prefixed), each the mean over the
window's pairs on every rank: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies`` (the chosen reward higher), ``logps/chosen``, ``logps/rejected``,
``logps/accuracies`` (the policy gives the chosen answer the higher log-probability: the model's
own preference), and ``nll/chosen`` with an SFT term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cardtune.training.logprobs import sequence_log_probs
from cardtune.training.loss import OutputHead
from cardtune.training.preference.losses import PairTerms, PreferenceLoss
from cardtune.training.trainer import CardtuneTrainer


@dataclass
class PreferenceObjective:
    """The loss of a batch of pairs: the reference's log-probabilities (when the loss has one),
    then the policy's, then the loss per pair."""

    loss: PreferenceLoss
    head: OutputHead | None
    reference: Any | None

    def __call__(self, model: Any, unwrapped: Any, inputs: dict[str, Any],
                 before_policy: Callable[[], None] | None = None) -> tuple[PairTerms, Any]:
        """(the per-pair terms, the policy's outputs). ``model``: as the Trainer calls it (DDP,
        DeepSpeed); ``unwrapped``: the model itself, which the reference runs as (no gradient
        synchronisation); ``before_policy``: called between the two forwards."""
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        ref = None
        if self.loss.needs_reference:
            ref, _ = self.reference.log_probs(unwrapped, model_inputs, labels, self.head)
        if before_policy is not None:
            before_policy()
        logps, tokens, outputs = sequence_log_probs(model, model_inputs, labels, self.head)
        pairs = labels.shape[0] // 2
        terms = self.loss(logps[:pairs], logps[pairs:], tokens[:pairs], tokens[pairs:],
                          *((ref[:pairs].to(logps.device), ref[pairs:].to(logps.device)) if ref is not None else ()))
        return terms, outputs


@dataclass
class Figures:
    """The figures of a logging window (or of an evaluation), summed per name over its pairs."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    pairs: int = 0

    def add(self, figures: dict[str, torch.Tensor]) -> None:
        for name, values in figures.items():
            total = values.float().sum()
            self.sums[name] = total if name not in self.sums else self.sums[name] + total
        self.pairs += next(iter(figures.values())).numel()

    def pop(self, accelerator: Any, prefix: str = "") -> dict[str, float]:
        """The means over every rank's pairs (each rank calls it at the same log), then reset."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        device = accelerator.device
        totals = torch.stack([*(self.sums[n].to(device) for n in names),
                              torch.tensor(float(self.pairs), device=device)])
        totals = accelerator.reduce(totals, "sum")
        self.sums, self.pairs = {}, 0
        return {f"{prefix}{name}": round(float(totals[i] / totals[-1]), 6) for i, name in enumerate(names)}


class PreferenceTrainer(CardtuneTrainer):
    """A :class:`~cardtune.training.trainer.CardtuneTrainer` whose loss is ``objective``'s; see the module."""

    def __init__(self, *args: Any, objective: PreferenceObjective, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cardtune_objective = objective
        self.cardtune_figures = {"train": Figures(), "eval": Figures()}
        # The loss is already divided by the accumulated batch's pairs: not by the steps again.
        self.loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator: Iterator[Any], num_batches: int, device: Any) -> tuple[list, Any]:
        """The accumulated batch and its number of pairs (over every rank where the Trainer
        averages across devices, as it does its token counts)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        pairs = torch.tensor(sum(b["input_ids"].shape[0] // 2 for b in batches), device=device)
        if self._across_devices():
            pairs = self.accelerator.gather(pairs).sum()
        return batches, pairs

    def _across_devices(self) -> bool:
        return bool(self.args.average_tokens_across_devices) and self.args.world_size > 1

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any) -> Any:
        routing = self.cardtune_routing if model.training else None
        terms, outputs = self.cardtune_objective(model, self.accelerator.unwrap_model(model), inputs,
                                                 routing.start if routing is not None else None)
        self.cardtune_figures["train" if model.training else "eval"].add(terms.figures)
        if model.training and num_items_in_batch is not None:
            loss = terms.loss.sum() / num_items_in_batch.to(terms.loss.device)
            if self._across_devices():
                loss = loss * self.accelerator.num_processes  # the ranks' gradients are averaged
        else:
            loss = terms.loss.mean()
        head = self.cardtune_objective.head
        aux = outputs.get("aux_loss") if hasattr(outputs, "get") else None
        steps = self.current_gradient_accumulation_steps if model.training else 1
        if aux is not None and head is not None and head.aux_loss_coef is not None:
            loss = loss + head.aux_loss_coef * aux.to(loss.device) / steps  # a router's own balancing loss
        if routing is not None:
            loss = loss + routing.coef * routing.finish(inputs.get("attention_mask")).to(loss.device) / steps
        return (loss, {}) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.cardtune_figures["train"].pop(self.accelerator))
        if "eval_loss" in logs:
            logs.update(self.cardtune_figures["eval"].pop(self.accelerator, "eval_"))
        super().log(logs, *args, **kwargs)
