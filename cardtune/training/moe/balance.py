"""Load balancing: the auxiliary loss added to the language-model loss, and the expert load
that the training logs show.

Per MoE layer, the Switch-Transformer loss ``E * sum_e f_e * P_e``: ``f_e`` is the share of the
layer's (token, slot) assignments that chose expert ``e`` (before any capacity drop), ``P_e`` the
mean router probability of ``e``, both over the real tokens (padding excluded when the batch's
attention mask lines up with the tokens). It is 1.0 when the load is even and reaches ``E`` when
every token picks one expert; ``f`` is a count, so the loss's gradient reaches the router (and,
through the router's input, the layers below), never the experts it routes to. ``aux_loss`` is
its mean over the MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cardtune.training.moe.block import MoEBlock, Routing


def moe_blocks(model: Any) -> list[tuple[str, MoEBlock]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]


def token_mask(attention_mask: Any, tokens: int) -> torch.Tensor | None:
    """The flat real-token mask, when the batch's 2-D attention mask covers exactly these tokens."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and attention_mask.numel() == tokens:
        return attention_mask.reshape(-1)
    return None


def layer_balance(routing: Routing, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the layer's load-balancing loss, assignments per expert) for one forward."""
    probs, chosen = routing.probs, routing.chosen
    experts, top_k = probs.shape[-1], chosen.shape[-1]
    real = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask.to(probs.device, torch.float32)
    counts = torch.zeros(experts, device=probs.device).scatter_add_(0, chosen.reshape(-1), real.repeat_interleave(top_k))
    total = real.sum().clamp_min(1.0)
    share = counts / (total * top_k)
    mean_prob = (probs * real[:, None]).sum(0) / total
    return experts * (share * mean_prob).sum(), counts


def coefficient_of_variation(counts: torch.Tensor) -> float:
    """Standard deviation over mean of tokens per expert (population): 0 is a perfect balance."""
    counts = counts.double()
    mean = counts.mean()
    return float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0


class RoutingMonitor:
    """Collects each training forward's routing from the model's MoE blocks: the aux loss for
    the step and, per logging window, the mean aux loss and every layer's expert load."""

    def __init__(self, model: Any, coef: float) -> None:
        self.coef = coef
        self.blocks = moe_blocks(model)
        self.layers = [_layer_label(name) for name, _ in self.blocks]
        self._reset()

    def _reset(self) -> None:
        self.aux_sum = 0.0
        self.steps = 0
        self.counts: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.dropped = 0.0
        self.slots = 0.0

    def start(self) -> None:
        for _, block in self.blocks:
            block.records = []

    def finish(self, attention_mask: Any) -> torch.Tensor:
        """The mean aux loss over the MoE layers of the forward just run (recording stops)."""
        losses = []
        for i, (_, block) in enumerate(self.blocks):
            records, block.records = block.records or [], None
            for routing in records:
                mask = token_mask(attention_mask, routing.probs.shape[0])
                loss, counts = layer_balance(routing, mask)
                losses.append(loss)
                counts = counts.detach()
                self.counts[i] = counts if self.counts[i] is None else self.counts[i] + counts
                if routing.kept is not None:
                    slots = routing.kept.numel() if mask is None else float(mask.sum()) * routing.kept.shape[1]
                    kept = routing.kept if mask is None else routing.kept & mask.bool()[:, None]
                    self.slots += slots
                    self.dropped += slots - float(kept.sum())
        if not losses:
            raise RuntimeError("no MoE block routed any token in this forward")
        aux = torch.stack([loss.to(losses[0].device) for loss in losses]).mean()
        self.aux_sum += float(aux.detach())
        self.steps += 1
        return aux

    def window_logs(self, accelerator: Any) -> dict[str, float]:
        """The logging window's figures, summed or averaged over the ranks, then reset."""
        if not self.steps:
            return {}
        device = accelerator.device
        aux = accelerator.reduce(torch.tensor([self.aux_sum / self.steps], device=device), "mean")
        logs: dict[str, float] = {"aux_loss": round(float(aux), 6)}
        cvs = []
        for label, counts in zip(self.layers, self.counts, strict=True):
            if counts is None:
                continue
            counts = accelerator.reduce(counts.to(device), "sum")
            shares = counts / counts.sum().clamp_min(1)
            cvs.append(coefficient_of_variation(counts))
            for e, share in enumerate(shares.tolist()):
                logs[f"moe_load/{label}/expert_{e}"] = round(share, 4)
        if cvs:
            logs["moe_load_cv"] = round(sum(cvs) / len(cvs), 4)
        if self.slots:
            dropped = accelerator.reduce(torch.tensor([self.dropped, self.slots], device=device), "sum")
            logs["moe_dropped"] = round(float(dropped[0] / dropped[1]), 4)
        self._reset()
        return logs


def _layer_label(name: str) -> str:
    """``layer_3`` for ``model.language_model.layers.3.mlp``: the last number in the name."""
    numbers = [part for part in name.split(".") if part.isdigit()]
    return f"layer_{numbers[-1]}" if numbers else name


def routing_counts(records: Iterable[Routing], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert summed over ``records`` (the bench's balance before/after)."""
    total = None
    for routing in records:
        _, counts = layer_balance(routing, mask)
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("no routing recorded")
    return total
