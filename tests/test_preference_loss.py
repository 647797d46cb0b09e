"""Preference losses (issue 19): on fixed log-probabilities each loss is its formula computed by
hand; on a real batch of pairs encoded by the engine, DPO, IPO and robust DPO equal TRL's public
``DPOTrainer.compute_loss`` given the same token ids, completion masks and reference
log-probabilities (TRL computes the policy's log-probabilities its own way, from the full logits);
the chunked sequence log-probabilities equal the full logits' in value and gradient.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

CHOSEN = [-10.0, -22.5, -5.25]
REJECTED = [-12.0, -20.0, -5.0]
REF_CHOSEN = [-11.0, -21.0, -6.0]
REF_REJECTED = [-11.5, -20.5, -4.0]
CHOSEN_TOKENS = [5, 9, 3]
REJECTED_TOKENS = [4, 10, 3]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _by_hand(kind: str, beta: float, eps: float = 0.0, gamma: float = 0.0, sft: float = 0.0) -> list[float]:
    out = []
    for c, r, c0, r0, nc, nr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS,
                                    strict=True):
        z = beta * ((c - c0) - (r - r0))
        if kind == "sigmoid":
            loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        elif kind == "robust":
            loss = (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps)
        elif kind == "ipo":
            loss = ((c - c0) / nc - (r - r0) / nr - 1 / (2 * beta)) ** 2
        else:  # simpo
            z = beta * c / nc - beta * r / nr - gamma
            loss = -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        out.append(loss + sft * (-c / nc))
    return out


@pytest.mark.parametrize("kind,beta,eps,gamma,sft", [
    ("sigmoid", 0.1, 0.0, 0.0, 0.0), ("sigmoid", 0.5, 0.2, 0.0, 0.0), ("robust", 0.1, 0.2, 0.0, 0.0),
    ("ipo", 0.1, 0.0, 0.0, 0.0), ("simpo", 2.0, 0.0, 0.5, 0.0), ("simpo", 2.5, 0.1, 1.0, 0.0),
    ("sigmoid", 0.1, 0.0, 0.0, 0.5),
])
def test_each_loss_is_its_formula_by_hand(kind: str, beta: float, eps: float, gamma: float, sft: float) -> None:
    from cardtune.training.preference.losses import PreferenceLoss

    t = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    loss = PreferenceLoss(kind, beta, eps, gamma, sft)
    terms = loss(t(CHOSEN), t(REJECTED), torch.tensor(CHOSEN_TOKENS), torch.tensor(REJECTED_TOKENS),
                 *((t(REF_CHOSEN), t(REF_REJECTED)) if loss.needs_reference else ()))
    assert terms.loss.tolist() == pytest.approx(_by_hand(kind, beta, eps, gamma, sft), rel=1e-12)
    f = terms.figures
    if kind == "simpo":
        want_chosen = [beta * c / n for c, n in zip(CHOSEN, CHOSEN_TOKENS, strict=True)]
        want_rejected = [beta * r / n for r, n in zip(REJECTED, REJECTED_TOKENS, strict=True)]
    else:
        want_chosen = [beta * (c - c0) for c, c0 in zip(CHOSEN, REF_CHOSEN, strict=True)]
        want_rejected = [beta * (r - r0) for r, r0 in zip(REJECTED, REF_REJECTED, strict=True)]
    assert f["rewards/chosen"].tolist() == pytest.approx(want_chosen)
    assert f["rewards/rejected"].tolist() == pytest.approx(want_rejected)
    assert f["rewards/margins"].tolist() == pytest.approx([a - b for a, b in zip(want_chosen, want_rejected, strict=True)])
    assert f["rewards/accuracies"].tolist() == [float(a > b) for a, b in zip(want_chosen, want_rejected, strict=True)]
    assert f["logps/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert ("nll/chosen" in f) == bool(sft)


# -- a real batch -----------------------------------------------------------------------------
PAIRS = [
    ([("user", "What is the capital of France?")], "The capital of France is Paris.", "It is Lyon, I think."),
    ([("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And of Italy?")], "Rome.", "Milan."),
    ([("system", "Be brief."), ("user", "Name a colour.")], "Red.", "A colour is a property of light."),
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], Any]:
    """A tiny Qwen2.5 (the fixture's tokenizer and template, random weights) and a batch of three
    pairs encoded and collated as training does."""
    from test_train import tiny_model

    from cardtune.collators.pairs import PairCollator, PairEncoder
    from cardtune.conversation import REJECTED, Sample
    from cardtune.loaders.resolve import load_processing, resolve_model

    folder = tiny_model("qwen2.5-7b-instruct", tmp_path_factory.mktemp("qwen") / "model")
    resolved = resolve_model("qwen2.5-7b-instruct", folder)
    from cardtune.collators.engine import ChatEncoder

    encoder = PairEncoder(ChatEncoder(resolved.card, load_processing(resolved)))
    pairs = []
    for n, (prompt, chosen, rejected) in enumerate(PAIRS):
        messages = [{"role": role, "content": text} for role, text in prompt]
        messages.append({"role": "assistant", "content": chosen,
                         REJECTED: {"role": "assistant", "content": rejected}})
        pairs.append(encoder.encode(Sample(f"pair-{n}", messages)))
    return folder, PairCollator(encoder.handler)(pairs), resolved


class _Fixed:
    """A reference whose log-probabilities are given."""

    def __init__(self, logps: torch.Tensor) -> None:
        self.logps = logps

    def log_probs(self, *args: Any) -> tuple[torch.Tensor, None]:
        return self.logps, None


def _model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_the_loss_on_a_batch_is_trls_public_dpo_loss(batch, kind: str, eps: float) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from cardtune.training.loss import probe_head
    from cardtune.training.preference.losses import PreferenceLoss
    from cardtune.training.preference.trainer import PreferenceObjective

    folder, inputs, resolved = batch
    model = _model(folder)
    pairs = inputs["input_ids"].shape[0] // 2
    ref = torch.tensor([-40.0, -8.0, -3.5, -45.0, -7.0, -30.0])  # chosen then rejected, as the batch
    objective = PreferenceObjective(PreferenceLoss(kind, beta=0.1, label_smoothing=eps), probe_head(model), _Fixed(ref))
    with torch.no_grad():
        ours = objective(model, model, inputs)[0].loss.mean()

    # TRL tokenizes its own dataset at construction; the loss below gets only the engine's ids.
    placeholder = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]],
                                     "chosen": [[{"role": "assistant", "content": "a"}]],
                                     "rejected": [[{"role": "assistant", "content": "b"}]]})
    config = DPOConfig(output_dir=str(folder.parent / f"trl-{kind}"), beta=0.1, loss_type=[kind], label_smoothing=eps,
                       report_to="none", use_cpu=True, disable_tqdm=True)
    from transformers import AutoTokenizer

    trainer = DPOTrainer(model=_model(folder), args=config, train_dataset=placeholder,
                         processing_class=AutoTokenizer.from_pretrained(folder))
    trainer.precompute_ref_logps = True  # the reference's log-probabilities come with the batch, as above
    trl_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                  "completion_mask": (inputs["labels"] != -100).long(),
                  "ref_chosen_logps": ref[:pairs], "ref_rejected_logps": ref[pairs:]}
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trl_inputs)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5, abs=1e-6)
    assert float(ours) > 0.05  # not a degenerate batch


def test_chunked_log_probs_equal_the_full_logits_in_value_and_gradient(batch) -> None:
    from cardtune.training.logprobs import sequence_log_probs
    from cardtune.training.loss import probe_head

    folder, inputs, _ = batch
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    results = []
    for chunked in (True, False):
        model = _model(folder)
        head = probe_head(model) if chunked else None
        if chunked:
            head.chunk_tokens = 3  # several chunks on this small batch
        logps, tokens, _ = sequence_log_probs(model, model_inputs, labels, head)
        (logps * torch.arange(1, 7)).sum().backward()
        results.append((logps.detach(), tokens, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, tokens_a, grads_a), (b, tokens_b, grads_b) = results
    assert torch.equal(tokens_a, tokens_b) and tokens_a.tolist() == [(row != -100).sum().item() for row in labels]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)
