"""Saving an upcycled model in a transformers MoE architecture, where one expresses it exactly.

- a llama or mistral language model with every layer upcycled is a **Mixtral**: the same
  attention, norms and rotary embedding, a softmax router whose top-k weights are renormalised;
- a qwen2 language model with any layers upcycled is a **Qwen2-MoE**: ``mlp_only_layers`` keeps
  the other layers dense, ``norm_topk_prob: true`` renormalises the top-k weights, and the
  shared expert (which Qwen2-MoE always adds) gets zero width, so it adds exactly 0.

Either needs dropless routing, no residual FFN, the same number of experts in every MoE layer
and experts that are the architecture's own gated MLP (``gate_proj``/``up_proj``/``down_proj``
without biases). A vision-language model keeps its class; only its ``text_config`` changes.
Anything else stays in cardtune's MoE format (the base architecture's config plus the spec,
which ``cardtune chat``/``merge``/``train`` load).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cardtune.training.moe.block import MoEBlock
from cardtune.training.moe.spec import SPEC_KEY, MoESpec

GATED_MLP = {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
# Config fields a Mixtral / Qwen2-MoE text config copies from its dense sibling.
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
    "eos_token_id",
)


@dataclass
class NativeTarget:
    """The transformers architecture a model is saved in."""

    name: str
    text_config: Any


def _shared(text: Any) -> dict[str, Any]:
    fields = {k: getattr(text, k) for k in _SHARED_FIELDS if hasattr(text, k)}
    if getattr(text, "head_dim", None):
        fields["head_dim"] = text.head_dim
    return fields


def _mixtral(text: Any, spec: MoESpec) -> NativeTarget | str:
    from transformers import MixtralConfig

    if spec.layers != list(range(spec.num_layers)):
        return "a Mixtral has experts in every layer (--moe_layers dense); this model has them in layers " + \
            ",".join(map(str, spec.layers))
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(text, flag, False):
            return f"a Mixtral has no {flag.replace('_', ' ')}es; this {text.model_type} has {flag}: true"
    config = MixtralConfig(**_shared(text), sliding_window=getattr(text, "sliding_window", None),
                           num_local_experts=spec.num_experts[0], num_experts_per_tok=spec.top_k,
                           router_aux_loss_coef=spec.router_aux_loss_coef)
    return NativeTarget("Mixtral", config)


def _qwen2_moe(text: Any, spec: MoESpec) -> NativeTarget | str:
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(
        **_shared(text),
        use_sliding_window=getattr(text, "use_sliding_window", False),
        sliding_window=getattr(text, "sliding_window", None),
        max_window_layers=getattr(text, "max_window_layers", text.num_hidden_layers),
        layer_types=list(text.layer_types),
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(spec.num_layers) if i not in spec.layers],
        moe_intermediate_size=text.intermediate_size,
        shared_expert_intermediate_size=0,
        num_experts=spec.num_experts[0],
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=True,
        qkv_bias=True,
        router_aux_loss_coef=spec.router_aux_loss_coef,
    )
    return NativeTarget("Qwen2-MoE", config)


NATIVE: dict[str, Callable[[Any, MoESpec], NativeTarget | str]] = {
    "llama": _mixtral,
    "mistral": _mixtral,
    "qwen2": _qwen2_moe,
}
"""Dense text architecture (``model_type``) -> its MoE sibling in transformers."""


def native_target(model: nn.Module, spec: MoESpec) -> NativeTarget | str:
    """The architecture that expresses ``model`` exactly, or why none does."""
    text = model.config.get_text_config()
    build = NATIVE.get(text.model_type)
    if build is None:
        return f"transformers has no MoE sibling of {text.model_type} that cardtune maps to"
    if not spec.dropless:
        return "transformers' MoE layers route dropless; this model drops tokens over capacity"
    if spec.use_residual:
        return "transformers' MoE layers have no residual FFN beside the experts"
    if len(set(spec.num_experts)) != 1:
        return "transformers' MoE layers have the same number of experts in every layer"
    for name in spec.modules:
        block = model.get_submodule(name)
        if not isinstance(block, MoEBlock):
            return f"{name} is not an MoE block"
        if {n for n, _ in block.experts[0].named_parameters()} != GATED_MLP:
            return f"the experts of {name} are not a bias-free gate/up/down MLP"
    return build(text, spec)


def native_state_dict(state: dict[str, torch.Tensor], spec: MoESpec, target: NativeTarget) -> dict[str, torch.Tensor]:
    """The upcycled model's tensors under the native model's names: router -> ``gate``, each
    layer's experts stacked into ``experts.gate_up_proj`` (gate rows, then up rows) and
    ``experts.down_proj``; a Qwen2-MoE's zero-width shared expert and its gate added."""
    out = dict(state)
    hidden = target.text_config.hidden_size
    for name, experts in zip(spec.modules, spec.num_experts, strict=True):
        router = out.pop(f"{name}.router.weight")
        out[f"{name}.gate.weight"] = router
        gate_up, down = [], []
        for e in range(experts):
            prefix = f"{name}.experts.{e}."
            gate_up.append(torch.cat([out.pop(prefix + "gate_proj.weight"), out.pop(prefix + "up_proj.weight")]))
            down.append(out.pop(prefix + "down_proj.weight"))
        out[f"{name}.experts.gate_up_proj"] = torch.stack(gate_up)
        out[f"{name}.experts.down_proj"] = torch.stack(down)
        if target.name == "Qwen2-MoE":
            like = {"dtype": router.dtype, "device": router.device}
            out[f"{name}.shared_expert.gate_proj.weight"] = torch.zeros(0, hidden, **like)
            out[f"{name}.shared_expert.up_proj.weight"] = torch.zeros(0, hidden, **like)
            out[f"{name}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 0, **like)
            out[f"{name}.shared_expert_gate.weight"] = torch.zeros(1, hidden, **like)
    return out


def save_native(model: nn.Module, state: dict[str, torch.Tensor], spec: MoESpec, target: NativeTarget,
                folder: str | Path) -> str:
    """Write ``folder`` as the native architecture; returns the class a plain
    ``from_pretrained`` builds from it."""
    import transformers

    config = copy.deepcopy(model.config)
    if hasattr(config, SPEC_KEY):
        delattr(config, SPEC_KEY)
    text = target.text_config
    text.dtype = model.config.get_text_config().dtype
    if config.get_text_config() is config:  # a text model: the whole config is the MoE one
        config = text
        cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    else:
        config.text_config = text
        cls = getattr(transformers, type(model).__name__)
    config.architectures = [cls.__name__]
    with torch.device("meta"):
        native = cls(config)
    native.load_state_dict(native_state_dict(state, spec, target), strict=True, assign=True)
    native.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        native.generation_config = copy.deepcopy(model.generation_config)
    native.save_pretrained(str(folder))
    return cls.__name__
