"""Batched generation: prompts padded on the LEFT, the model's own end-of-turn tokens as stop.

Training pads on the right (labels follow the tokens); generation must pad on the left, so
that every row's next token is written at the same last position. The media tensors are
batched as the training collator batches them (:func:`cardtune.collators.media.batch_media`),
except the per-token ones (Qwen2-VL's ``mm_token_type_ids``, Gemma 3's ``token_type_ids``,
Mllama's ``cross_attention_mask``), which are aligned to the right with their tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cardtune.evaluation.prompts import Prompt


def stop_ids(tokenizer: Any, roles: Any, model: Any = None) -> list[int]:
    """The tokens that end an answer: eos, the template's end of turn where it is one token
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``; each form, where the template writes
    several: harmony's ``<|end|>`` and ``<|return|>``), and the model's configured eos ids."""
    ids = {tokenizer.eos_token_id}
    for closing in (roles.end_of_turn, *getattr(roles, "closings", ())):
        if len(closing) == 1:
            ids.add(closing[0])
    generation = getattr(model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


@dataclass
class Generated:
    text: str
    num_tokens: int
    """Tokens the model generated for this answer, its stop token included."""


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


class Generator:
    """Generates answers for :class:`Prompt` batches with one model."""

    def __init__(self, model: Any, encoder: Any, settings: GenerationSettings | None = None, *,
                 synced_gpus: bool = False) -> None:
        """``synced_gpus``: every rank of a sharded model (ZeRO-3, FSDP) runs the same number of
        forward passes, as each pass gathers weights from all of them."""
        self.model = model
        self.synced_gpus = synced_gpus
        self.encoder = encoder
        self.tokenizer = encoder.tokenizer
        self.settings = settings or GenerationSettings()
        self.stop = stop_ids(self.tokenizer, encoder.roles, model)
        self.pad_id = encoder.handler.pad_id

    def batch(self, prompts: Sequence[Prompt]) -> dict[str, Any]:
        """The model inputs for ``prompts``, padded on the left."""
        import torch

        from cardtune.collators.media import batch_media, is_per_token

        longest = max(len(p.input_ids) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, p in enumerate(prompts):
            n = len(p.input_ids)
            input_ids[row, longest - n:] = torch.tensor(p.input_ids, dtype=torch.long)
            attention[row, longest - n:] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention}
        per_token = {k for p in prompts for k, v in p.tensors.items() if is_per_token(v, len(p.input_ids))}
        for key in per_token:
            present = [(row, p.tensors[key]) for row, p in enumerate(prompts) if key in p.tensors]
            first = present[0][1]
            inner = [max(t.shape[i] for _, t in present) for i in range(2, first.dim())]
            out = torch.zeros((len(prompts), longest, *inner), dtype=first.dtype)
            for row, t in present:
                n = t.shape[1]
                out[(row, slice(longest - n, longest), *[slice(0, s) for s in t.shape[2:]])] = t[0]
            batch[key] = out
        rest = [{k: v for k, v in p.tensors.items() if k not in per_token} for p in prompts]
        if any(rest):
            aligned = self.encoder.handler.batch_aligned_keys() if hasattr(self.encoder.handler, "batch_aligned_keys") \
                else frozenset()
            batch.update(batch_media(rest, [len(p.input_ids) for p in prompts], longest, aligned))
        return batch

    def generate(self, prompts: Sequence[Prompt]) -> list[Generated]:
        import torch

        model = self.model
        batch = self.batch(prompts)
        device = model.device
        dtype = getattr(model, "dtype", None)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() and dtype is not None and dtype.is_floating_point
                      else v.to(device)) for k, v in batch.items()}
        s = self.settings
        sampling = ({"do_sample": True, "temperature": s.temperature, "top_p": s.top_p} if s.do_sample
                    else {"do_sample": False})
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=s.max_new_tokens, eos_token_id=self.stop,
                                     pad_token_id=self.pad_id, use_cache=True,
                                     **({"synced_gpus": True} if self.synced_gpus else {}), **sampling)
        finally:
            if was_training:
                model.train()
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        results = []
        stop = set(self.stop)
        for row in new:
            end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            text = self.tokenizer.decode(row[:end], skip_special_tokens=True).strip()
            results.append(Generated(text, end))
        return results
