"""Upcycling: the card-named FFN of each chosen decoder layer becomes a :class:`MoEBlock` whose
experts start as copies of it, and reading such a model back from its folder.

Which modules are FFNs is the card's ``modules.llm_mlp`` (a keyword matching the end of a module
name, inside the ``llm`` keywords and outside the vision ones); a layer's index is the last
number in its FFN's name (``model.language_model.layers.3.mlp`` is layer 3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from cardtune.registry import FamilyCard
from cardtune.training.moe.block import MoEBlock
from cardtune.training.moe.spec import (
    SPEC_FILE,
    SPEC_KEY,
    MoEError,
    MoESpec,
    choose_layers,
    parse_layers,
    parse_num_experts,
)


def _ends_with(name: str, keyword: str) -> bool:
    want = keyword.split(".")
    return name.split(".")[-len(want):] == want


def find_ffns(model: nn.Module, card: FamilyCard) -> list[tuple[int, str]]:
    """(decoder-layer index, module name) of every language-model FFN, by layer."""
    from cardtune.training.model import keyword_matches

    keywords = card.modules.llm_mlp
    if not keywords:
        raise MoEError(f"family {card.family}: its card does not name the language model's MLP modules "
                       "(modules.llm_mlp), so there is no FFN to upcycle into experts")
    vision = card.multimodal_keywords
    found: dict[int, str] = {}
    for name, module in model.named_modules():
        if not (name and any(_ends_with(name, k) for k in keywords)):
            continue
        if not any(keyword_matches(k, name) for k in card.modules.llm) or any(keyword_matches(k, name) for k in vision):
            continue
        numbers = [part for part in name.split(".") if part.isdigit()]
        if not numbers:
            raise MoEError(f"family {card.family}: modules.llm_mlp matches {name}, which is in no numbered layer list")
        layer = int(numbers[-1])
        if layer in found:
            raise MoEError(f"family {card.family}: modules.llm_mlp matches two modules of layer {layer}: "
                           f"{found[layer]} and {name}")
        if isinstance(module, MoEBlock):
            raise MoEError(f"{name} is already a mixture of experts")
        found[layer] = name
    if not found:
        raise MoEError(f"family {card.family}: modules.llm_mlp {keywords} matches no module of the language model")
    return sorted(found.items())


def _already_sparse(model: nn.Module) -> str | None:
    text = model.config.get_text_config()
    for attribute in ("num_local_experts", "num_experts"):
        if getattr(text, attribute, 0):
            return f"{type(model).__name__} is already a mixture of experts ({attribute}={getattr(text, attribute)})"
    return None


def plan_moe(model: nn.Module, card: FamilyCard, *, layers: str, num_experts: str, top_k: int,
             router_aux_loss_coef: float, capacity_factor: float | None = None,
             eval_capacity_factor: float | None = None, min_capacity: int = 4,
             use_residual: bool = False) -> MoESpec:
    """The mixtures asked for, checked against this model's layers."""
    sparse = _already_sparse(model)
    if sparse:
        raise MoEError(f"{sparse}: cardtune upcycles dense FFNs")
    ffns = find_ffns(model, card)
    available = [layer for layer, _ in ffns]
    chosen = choose_layers(parse_layers(layers), available)
    counts = parse_num_experts(num_experts)
    if len(counts) == 1:
        counts = counts * len(chosen)
    if len(counts) != len(chosen):
        raise MoEError(f"--moe_num_experts {num_experts}: {len(counts)} numbers for {len(chosen)} MoE layers "
                       f"({','.join(map(str, chosen))})")
    if top_k > min(counts):
        raise MoEError(f"--moe_top_k {top_k}: more than the {min(counts)} experts of a layer")
    names = dict(ffns)
    return MoESpec(modules=[names[i] for i in chosen], layers=chosen, num_layers=len(ffns), num_experts=counts,
                   top_k=top_k, router_aux_loss_coef=router_aux_loss_coef, capacity_factor=capacity_factor,
                   eval_capacity_factor=eval_capacity_factor, min_capacity=min_capacity, use_residual=use_residual)


def upcycle(model: nn.Module, spec: MoESpec) -> nn.Module:
    """Replace each FFN named in ``spec`` by a :class:`MoEBlock` of copies of it (in place); the
    spec goes into the model's config, so ``save_pretrained`` writes it with the weights."""
    hidden_size = model.config.get_text_config().hidden_size
    for name, experts in zip(spec.modules, spec.num_experts, strict=True):
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        ffn = getattr(parent, attribute)
        block = MoEBlock(ffn, hidden_size, experts, spec.top_k, capacity_factor=spec.capacity_factor,
                         eval_capacity_factor=spec.eval_capacity_factor, min_capacity=spec.min_capacity,
                         use_residual=spec.use_residual)
        setattr(parent, attribute, block)
    set_spec(model, spec)
    return model


def set_spec(model: nn.Module, spec: MoESpec) -> None:
    setattr(model.config, SPEC_KEY, spec.model_dump())


def same_structure(saved: MoESpec, requested: Any) -> None:
    """A run's ``--moe_*`` options on a model already upcycled must describe its mixtures."""
    layers = choose_layers(parse_layers(requested.moe_layers), list(range(saved.num_layers)))
    counts = parse_num_experts(requested.moe_num_experts)
    asked = {
        "--moe_layers": (layers, saved.layers),
        "--moe_num_experts": (counts * len(layers) if len(counts) == 1 else counts, saved.num_experts),
        "--moe_top_k": (requested.moe_top_k, saved.top_k),
        "--moe_capacity_factor": (requested.moe_capacity_factor, saved.capacity_factor),
        "--moe_use_residual": (requested.moe_use_residual, saved.use_residual),
    }
    differ = [f"{option} {mine} (the model has {theirs})" for option, (mine, theirs) in asked.items() if mine != theirs]
    if differ:
        raise MoEError("the model is already upcycled (" + saved.describe() + "); these options describe another "
                       "one: " + "; ".join(differ))


@dataclass
class MoEParts:
    """Module names in an upcycled model: what ``--moe_train`` trains."""

    experts: list[str]
    """Each block's experts (and residual FFN): LoRA targets under ``--moe_train lora``."""
    routers: list[str]
    """Each block's router (and residual coefficient): always trained in full."""


def moe_parts(model: nn.Module) -> MoEParts:
    experts, routers = [], []
    for name, module in model.named_modules():
        if isinstance(module, MoEBlock):
            experts.append(f"{name}.experts")
            routers.append(f"{name}.router")
            if module.residual is not None:
                experts.append(f"{name}.residual")
                routers.append(f"{name}.coefficient")
    if not experts:
        raise MoEError("the model has no MoE block")
    return MoEParts(experts, routers)


# -- folders ------------------------------------------------------------------------------------
def folder_spec(folder: str | Path) -> MoESpec | None:
    """The mixtures a local folder's model carries: its config's (a full model) or the
    ``cardtune_moe.json`` beside an adapter (whose base is dense)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    config = folder / "config.json"
    data = json.loads(config.read_text(encoding="utf-8")).get(SPEC_KEY) if config.is_file() else None
    if data is None and (folder / SPEC_FILE).is_file():
        data = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    return MoESpec.model_validate(data) if data is not None else None


def model_spec(model: nn.Module) -> MoESpec | None:
    data = getattr(model.config, SPEC_KEY, None)
    return MoESpec.model_validate(data) if data is not None else None


_MOE_CLASSES: dict[type, type] = {}


def moe_model_class(base: type) -> type:
    """``base`` whose construction upcycles the FFNs its config's spec names, so that
    ``from_pretrained`` finds a module for every saved expert and router weight. The class
    keeps ``base``'s name and module: transformers applies an architecture's checkpoint key
    renames (llava's ``language_model.lm_head`` -> ``lm_head``, ...) only to the classes of its
    own modules, and the upcycled model names its weights as ``base`` does; a folder it saves
    names ``base`` in ``architectures``, plus the spec."""
    if base not in _MOE_CLASSES:

        def __init__(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
            base.__init__(self, config, *args, **kwargs)
            upcycle(self, MoESpec.model_validate(getattr(config, SPEC_KEY)))

        _MOE_CLASSES[base] = type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                                           "__qualname__": base.__qualname__})
    return _MOE_CLASSES[base]


def load_moe_folder(card: FamilyCard, folder: str | Path, *, dtype: Any = None,
                    attn_implementation: str | None = None) -> nn.Module:
    """A full cardtune-MoE model from its folder, every weight from the folder."""
    import transformers

    cls = getattr(transformers, card.model_class, None)
    if cls is None:
        raise MoEError(f"card {card.family}: model_class {card.model_class} is not a transformers class; "
                       "cardtune MoE folders load through the family's transformers class")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model, info = moe_model_class(cls).from_pretrained(str(folder), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        raise MoEError(f"{folder}: the weights lack {len(missing)} tensors of its MoE model, e.g. {missing[:3]}")
    return model

