"""The mixture-of-experts block that takes the place of one dense FFN.

Its experts are copies of that FFN (whatever its family writes: a gated ``gate/up/down`` MLP,
phi's ``fc1/fc2``, ...), so the block is the same code for every family: a linear router, a
softmax over the experts, the top-k of each token with their weights renormalised to sum to 1,
and each expert run on the tokens routed to it. With identical experts the block returns the
FFN's output exactly (the weights sum to 1), which is why an upcycled model starts where the
dense one was.

Routing is dropless unless a capacity factor is set: then each expert takes at most
``max(min_capacity, ceil(tokens * top_k / experts * factor))`` (token, slot) assignments, every
token's first choice before any second choice (DeepSpeed's order), and a token keeps the
renormalised weights of the slots it kept (none kept: the block adds nothing for it, the
decoder layer's residual stream carries it on).

Every expert is called on every forward, on zero tokens if none chose it: all ranks then run the
same modules in the same order (DeepSpeed ZeRO-3 gathers each module's weights as it runs) and
every expert parameter gets a gradient (DDP waits for all of them).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """One forward's routing in one block: what the load-balancing loss and the load logs read."""

    probs: torch.Tensor
    """(tokens, experts), float32 softmax of the router logits (differentiable)."""
    chosen: torch.Tensor
    """(tokens, top_k) expert ids, best first."""
    kept: torch.Tensor | None
    """(tokens, top_k) 1 where the slot fitted the expert's capacity; None when dropless."""


def replicate(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its own parameters. Under DeepSpeed ZeRO-3 the parameters were
    partitioned as they loaded: they are gathered for the copy, and the copy's are plain tensors,
    which DeepSpeed partitions when it wraps the model."""
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        return copy.deepcopy(module)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        clone = copy.deepcopy(module)
        for owner in clone.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                setattr(owner, name, nn.Parameter(param.data.clone(), requires_grad=param.requires_grad))
    return clone


class MoEBlock(nn.Module):
    """Router + experts (``ffn`` and copies of it), optionally beside a residual copy of ``ffn``
    mixed in by a learned 2-way coefficient (PR-MoE, MoE-LLaVA's ``use_residual``)."""

    def __init__(self, ffn: nn.Module, hidden_size: int, num_experts: int, top_k: int, *,
                 capacity_factor: float | None = None, eval_capacity_factor: float | None = None,
                 min_capacity: int = 4, use_residual: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k {top_k} must be between 1 and the number of experts ({num_experts})")
        weight = next(ffn.parameters())
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        # The FFN itself is the first expert; the others are copies.
        self.experts = nn.ModuleList([ffn, *(replicate(ffn) for _ in range(num_experts - 1))])
        self.residual = replicate(ffn) if use_residual else None
        self.coefficient = nn.Linear(hidden_size, 2, **factory) if use_residual else None
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.records: list[Routing] | None = None
        """A list while a trainer collects routing (see ``balance.RoutingMonitor``); None otherwise."""

    def extra_repr(self) -> str:
        routing = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return f"num_experts={self.num_experts}, top_k={self.top_k}, {routing}"

    def capacity(self, tokens: int) -> int | None:
        factor = self.capacity_factor if self.training else (self.eval_capacity_factor or self.capacity_factor)
        if factor is None:
            return None
        return max(self.min_capacity, math.ceil(tokens * self.top_k / self.num_experts * factor))

    def _within_capacity(self, chosen: torch.Tensor) -> torch.Tensor | None:
        capacity = self.capacity(chosen.shape[0])
        if capacity is None:
            return None
        # Slot-major order: all first choices queue before any second choice.
        queue = F.one_hot(chosen.t().reshape(-1), self.num_experts)
        position = (queue.cumsum(0) * queue).sum(-1) - 1
        return (position < capacity).reshape(self.top_k, -1).t()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        kept = self._within_capacity(chosen)
        if kept is not None:
            weights = weights * kept
        # Renormalised over the kept slots; the clamp only matters for a token that kept none.
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            routed = chosen == index if kept is None else (chosen == index) & kept
            token, slot = torch.where(routed)
            y = expert(x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        if self.residual is not None:
            mix = F.softmax(self.coefficient(x), dim=-1)
            out = out * mix[:, :1] + self.residual(x) * mix[:, 1:]
        if self.records is not None:
            self.records.append(Routing(probs, chosen, kept))
        return out.reshape(shape)
