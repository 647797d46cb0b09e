"""Every trainable parameter takes part in every training step, so a batch that reaches only some
of them (a text-only batch while the vision tower or projector trains) neither crashes the step
nor leaves data-parallel peers waiting.

Two failures share that cause:

- one process, nothing trainable on the batch's path (the projector trains alone and the batch
  holds no image): its loss has no gradient, and ``backward`` raises ``element 0 of tensors does
  not require grad``. The step is then skipped cleanly: backward runs on a detached copy of the
  loss, no parameter gets a gradient and the optimizer leaves every one as it was; the loss is
  logged, and the run counts such batches;
- DDP: each process's backward must produce a gradient for every parameter DDP holds, or the
  reduction waits for the missing ones (a hang, or "Expected to have finished reduction in the
  prior iteration"). PyTorch's answer, ``find_unused_parameters``, walks the autograd graph
  after every forward to find them, on every run (and warns when it finds none). Instead the
  loss gets ``0 * sum`` of each trainable parameter outside the language model (vision tower,
  projector, whatever the card lists beside them): the parameters a batch may not reach. The
  language model's are reached by every token (an upcycled mixture calls every expert on every
  forward, on zero tokens if none chose it; transformers' native mixtures hold their experts in
  one tensor). A process whose batch skipped the tower then contributes zero gradients, which is
  what its share of the average is.

Under DeepSpeed ZeRO-3 and FSDP a parameter outside its module's forward is a shard, not the
weight: there the batch sampler keeps text-only batches away instead (``trainer._modality``).
"""

from __future__ import annotations

from typing import Any

from cardtune.registry import FamilyCard


def unreachable_parameters(model: Any, card: FamilyCard) -> list[Any]:
    """The trainable parameters a batch may leave off its path: every one outside the card's
    language model (its ``llm`` keywords)."""
    from cardtune.training.model import group_of

    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen and group_of(name, card) != "llm":
            seen.add(id(param))
            out.append(param)
    return out


def zero_touch(params: list[Any]) -> Any:
    """``0 * sum(p)`` over ``params``, in float32 (a float16 sum of a large weight could reach
    infinity, and ``0 * inf`` is NaN): a zero that every one of them is part of."""
    import torch

    return sum(p.sum(dtype=torch.float32) for p in params) * 0.0


class Participation:
    """What a training step adds to its loss so that every trainable parameter takes part
    (``distributed``: DDP), and how many batches reached no trainable parameter at all."""

    def __init__(self, model: Any, card: FamilyCard, *, distributed: bool) -> None:
        self.touched = unreachable_parameters(model, card) if distributed else []
        self.batches = 0
        self.unreached = 0
        """Batches whose loss no trainable parameter took part in."""

    def __call__(self, loss: Any) -> Any:
        self.batches += 1
        if not loss.requires_grad:
            self.unreached += 1
            if not self.touched:
                return loss.detach().requires_grad_()  # backward runs; no parameter gets a gradient
        if self.touched:
            loss = loss + zero_touch(self.touched).to(loss.dtype)
        return loss

    def report(self) -> str | None:
        if not self.unreached:
            return None
        return (f"{self.unreached} of {self.batches} training batches reached no trainable parameter (text only, "
                "while only vision parts train): their loss was logged, and they trained nothing")


def text_only_warning(plan: Any, media_flags: list[bool]) -> str | None:
    """Text-only samples train nothing when only vision parts train (the language model frozen):
    projector pretraining (LLaVA / MoE-LLaVA stage 1) is image-caption data."""
    modes = plan.modes
    vision = [g.replace("_", " ") for g in ("vision_encoder", "vision_projector") if modes.get(g, "frozen") != "frozen"]
    if not vision or modes.get("llm") != "frozen" or modes.get("others") != "frozen":
        return None
    text_only = media_flags.count(False)
    if not text_only:
        return None
    return (f"{text_only} of {len(media_flags)} training samples hold no image or video, and only the "
            f"{' and the '.join(vision)} train{'s' if len(vision) == 1 else ''} (the language model is frozen): "
            "those samples train nothing. Projector pretraining (stage 1) is image-caption data; drop them, or "
            "train the language model too")
