"""Preference losses on sequence log-probabilities, one value per pair (the Trainer sums them over
the pairs of an accumulated batch and divides by their number: every pair weighs the same, however
the pairs fall into micro-batches and ranks).

With ``c``, ``r`` the policy's summed log-probabilities of the chosen and the rejected answer,
``c0``, ``r0`` the reference's, ``|c|``, ``|r|`` their trained token counts, ``ε`` the label
smoothing and ``σ`` the logistic function:

- ``sigmoid`` (DPO; Rafailov et al. 2023), with ``ε > 0`` conservative DPO (cDPO):
  ``-(1-ε)·log σ(βΔ) - ε·log σ(-βΔ)``, ``Δ = (c - c0) - (r - r0)``;
- ``robust`` (rDPO; Chowdhury et al. 2024), unbiased under a share ``ε`` of flipped labels:
  ``(-(1-ε)·log σ(βΔ) + ε·log σ(-βΔ)) / (1 - 2ε)``;
- ``ipo`` (Azar et al. 2023) on per-token log-ratios, as TRL computes it (its authors' normalisation):
  ``((c - c0)/|c| - (r - r0)/|r| - 1/(2β))²``;
- ``simpo`` (Meng et al. 2024), reference-free: ``-(1-ε)·log σ(βΔ' - γ) - ε·log σ(γ - βΔ')``,
  ``Δ' = c/|c| - r/|r|``.

The rewards are ``β(c - c0)`` and ``β(r - r0)``, SimPO's ``βc/|c|`` and ``βr/|r|``. ``sft_weight``
adds each pair's mean negative log-likelihood of its chosen answer's tokens (RPO; CPO-SimPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "robust", "ipo", "simpo")


@dataclass
class PairTerms:
    """Per pair: the loss, and the figures the run logs (``rewards/chosen``, ...)."""

    loss: torch.Tensor
    figures: dict[str, torch.Tensor]


@dataclass(frozen=True)
class PreferenceLoss:
    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"preference loss {self.kind!r}: one of {', '.join(LOSSES)}")

    @property
    def needs_reference(self) -> bool:
        return self.kind != "simpo"

    def __call__(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
                 rejected_tokens: torch.Tensor, ref_chosen: torch.Tensor | None = None,
                 ref_rejected: torch.Tensor | None = None) -> PairTerms:
        """Each argument one value per pair: summed log-probabilities (policy, reference) and
        trained token counts."""
        beta, eps = self.beta, self.label_smoothing
        nc, nr = chosen_tokens.clamp(min=1).to(chosen.dtype), rejected_tokens.clamp(min=1).to(chosen.dtype)
        if self.kind == "simpo":
            chosen_rewards, rejected_rewards = beta * chosen / nc, beta * rejected / nr
            z = chosen_rewards - rejected_rewards - self.simpo_gamma
            loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        else:
            if ref_chosen is None or ref_rejected is None:
                raise ValueError(f"the {self.kind} loss needs the reference's log-probabilities")
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
            z = beta * (chosen_ratio - rejected_ratio)
            if self.kind == "sigmoid":
                loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
            elif self.kind == "robust":
                loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
            else:  # ipo
                loss = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
        figures = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen, "logps/rejected": rejected,
            "logps/accuracies": (chosen > rejected).float(),
        }
        if self.sft_weight:
            nll = -chosen / nc
            loss = loss + self.sft_weight * nll
            figures["nll/chosen"] = nll
        return PairTerms(loss, {k: v.detach() for k, v in figures.items()})
