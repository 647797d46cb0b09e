"""Each sequence's log-probability of its trained tokens (a preference loss's input), summed over
the answer's labelled positions, without the whole logits.

With an :class:`~cardtune.training.loss.OutputHead` (the chunked loss was shown equal to the
model's own at load), the model runs with its head on no position and the log-probabilities come
from the last hidden states at the trained positions only, ``head.chunk_tokens`` at a time;
:class:`ChunkedTokenLogProbs` keeps no chunk's logits and makes them again in backward, as
:class:`~cardtune.training.loss.ChunkedCrossEntropy` does. What is kept is one float per trained
token. Without a head (``--loss_impl model``, ZeRO-3, FSDP) they are read off the model's logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cardtune.training.loss import IGNORE_INDEX, OutputHead, no_positions, replayed_rng, rng_state


class ChunkedTokenLogProbs(torch.autograd.Function):
    """``log p(target)`` at each row of ``hidden`` (positions × hidden size), the logits made
    ``head.chunk_tokens`` rows at a time and dropped; backward makes each chunk's logits again (in
    the forward's autocast state and random numbers) for the gradients of ``hidden`` and of the
    head's trainable parameters (passed as ``params``)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead,
                *params: torch.Tensor) -> torch.Tensor:
        device = hidden.device
        ctx.head = head
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = rng_state(device) if head.stochastic and head.module.training else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=device)
        step = head.chunk_tokens
        for start in range(0, hidden.shape[0], step):
            logits = head.logits(hidden[start:start + step])
            out[start:start + step] = -F.cross_entropy(logits, targets[start:start + step], reduction="none")
            del logits
        ctx.save_for_backward(hidden, targets, *params)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, targets, *params = ctx.saved_tensors
        head: OutputHead = ctx.head
        want_hidden = ctx.needs_input_grad[0]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        step = head.chunk_tokens
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled), replayed_rng(ctx.rng):
            for start in range(0, hidden.shape[0], step):
                chunk = hidden[start:start + step].detach().requires_grad_(want_hidden)
                inputs = ([chunk] if want_hidden else []) + [params[i] for i in wanted]
                if not inputs:
                    continue
                logps = -F.cross_entropy(head.logits(chunk), targets[start:start + step], reduction="none")
                got = list(torch.autograd.grad(logps, inputs, grad_out[start:start + step], allow_unused=True))
                if want_hidden:
                    grad_hidden[start:start + step] = got.pop(0)
                for i, g in zip(wanted, got, strict=True):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)
                del logps, got
        return (grad_hidden, None, None, *grads)


def sequence_log_probs(model: Any, inputs: dict[str, Any], labels: torch.Tensor,
                       head: OutputHead | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(each row's summed log-probability of its trained tokens, float32; each row's trained
    token count; the model's outputs). ``labels`` as the engine gives them, shifted here as the
    causal-LM loss shifts them."""
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if head is not None:
        outputs = model(**inputs, logits_to_keep=no_positions(labels), output_hidden_states=True)
        hidden = outputs.hidden_states[-1]
        shift = shift.to(hidden.device)
        trained = shift != IGNORE_INDEX
        per_token = ChunkedTokenLogProbs.apply(hidden[trained], shift[trained], head, *head.trainable_parameters())
    else:
        outputs = model(**inputs)
        logits = outputs.logits
        shift = shift.to(logits.device)
        trained = shift != IGNORE_INDEX
        per_token = torch.gather(logits[trained].float().log_softmax(-1), 1, shift[trained][:, None])[:, 0]
    rows = trained.nonzero(as_tuple=True)[0]
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=per_token.device).index_add(0, rows, per_token)
    return sums, trained.sum(dim=1), outputs
