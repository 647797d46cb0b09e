"""Each sequence's log-probability of its trained tokens (a preference loss's input), summed over
the answer's labelled positions, without the whole logits.

With an :class:`~cardtune.training.loss.OutputHead` (the chunked loss was shown equal to the
model's own at load), the model runs with its head on no position and the log-probabilities come
from the last hidden states at the trained positions only, ``head.chunk_tokens`` at a time;
:class:`~cardtune.training.loss.ChunkedTokenLogProbs` (the supervised loss's own) keeps no
chunk's logits and makes them again in backward. What is kept is one float per trained token. Without a head (``--loss_impl model``, ZeRO-3, FSDP) they are read off the model's logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cardtune.training.loss import IGNORE_INDEX, ChunkedTokenLogProbs, OutputHead, no_positions


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
