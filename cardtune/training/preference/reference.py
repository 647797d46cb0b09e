"""The reference a DPO-style loss compares the policy with: the model as it was at step 0.

- Under LoRA (any peft model: adapters on the language model and/or the vision tower, with
  parts trained in full kept as peft's ``modules_to_save``), the reference is the same model with
  its adapters disabled (peft's ``disable_adapter()``): the base weights, no second copy of them.
- Otherwise (full finetuning, projector-only training), :class:`InitialWeights` keeps a copy of
  the *trained* parameters only, as they were before step 1, and runs the model with them in
  place (``torch.func.functional_call``, parameters swapped for that call alone): the frozen
  parts are shared, so projector-only training keeps a copy of the projector, not of the model.

Either way the reference runs without gradients, in evaluation mode (no dropout), on the very
batch the policy trains on, and before the policy's forward. Under DeepSpeed ZeRO-3 and FSDP a
parameter outside its module's forward is a shard, so only the adapter-disabled reference works
there (``check_reference`` refuses the other before anything loads).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cardtune.training.logprobs import sequence_log_probs
from cardtune.training.loss import OutputHead


def is_adapter_model(model: Any) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class AdapterDisabled:
    """The base model under a peft adapter: the adapters (and peft's trained copies of modules)
    switched off for the reference's forward."""

    kind = "the base model with its adapters disabled (no copy of the weights)"

    def log_probs(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor,
                  head: OutputHead | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), _evaluating(model), model.disable_adapter():
            logps, tokens, _ = sequence_log_probs(model, inputs, labels, head)
        return logps, tokens


class _LogProbs(nn.Module):
    """The model and its head as one module, so that ``functional_call`` swaps the parameters
    of both for the whole computation (the head is called after the model's forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict[str, Any], labels: torch.Tensor, head: OutputHead | None) -> Any:
        logps, tokens, _ = sequence_log_probs(self.model, inputs, labels, head)
        return logps, tokens


class InitialWeights:
    """The model with its trained parameters as they were before step 1 (a copy of those only)."""

    kind = "the trained parameters' initial values, kept apart (the frozen ones shared)"

    def __init__(self, model: nn.Module) -> None:
        self.initial = {f"model.{name}": p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.initial.values())

    def log_probs(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor,
                  head: OutputHead | None) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(model.parameters()).device
        if next(iter(self.initial.values())).device != device:  # the Trainer moved the model
            self.initial = {k: v.to(device) for k, v in self.initial.items()}
        with torch.no_grad(), _evaluating(model):
            return torch.func.functional_call(_LogProbs(model), self.initial, (inputs, labels, head))


class SeparateModel:
    """A second model as the reference (what a frozen copy costs: ``bench/dpo.py`` compares it)."""

    kind = "a separate frozen copy of the model"

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval().requires_grad_(False)

    def log_probs(self, model: Any, inputs: dict[str, Any], labels: torch.Tensor,
                  head: OutputHead | None) -> tuple[torch.Tensor, torch.Tensor]:
        import dataclasses

        own = dataclasses.replace(head, module=self.model.get_output_embeddings()) if head is not None else None
        with torch.no_grad():
            logps, tokens, _ = sequence_log_probs(self.model, inputs, labels, own)
        return logps, tokens


def reference_for(model: Any) -> AdapterDisabled | InitialWeights:
    """The reference of a model prepared for training (before the Trainer loads a checkpoint)."""
    return AdapterDisabled() if is_adapter_model(model) else InitialWeights(model)


def describe_reference(model: Any) -> str:
    """What :func:`reference_for` gives ``model``, said before it is built (the copy is taken when
    the Trainer is)."""
    if is_adapter_model(model):
        return AdapterDisabled.kind
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{InitialWeights.kind}: {trained:,} values"
