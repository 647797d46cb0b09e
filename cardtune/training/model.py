"""Model preparation: dtype, attention kernel, loading through the card's loader, and what is
trained (full, LoRA, vision LoRA, QLoRA, projector only), all decided from the card's
module keywords and capability states.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cardtune.registry import CapabilityError, FamilyCard
from cardtune.training.arguments import ArgumentError, Arguments

log = logging.getLogger(__name__)

GROUPS = ("vision_encoder", "vision_projector", "llm", "others")
NEVER_LORA = ("lm_head",)


class CapabilityWarning(UserWarning):
    """The card marks a requested capability experimental for this family."""


# -- keywords ---------------------------------------------------------------------------------
def keyword_matches(keyword: str, name: str) -> bool:
    """A keyword matches a module or parameter name when it equals a dotted run of it."""
    want, parts = keyword.split("."), name.split(".")
    n = len(want)
    return any(parts[i : i + n] == want for i in range(len(parts) - n + 1))


def group_of(name: str, card: FamilyCard) -> str | None:
    """The card component a parameter belongs to; vision wins over llm for a name both match."""
    for group in GROUPS:
        if any(keyword_matches(k, name) for k in getattr(card.modules, group)):
            return group
    return None


def keyword_roots(model: Any, keywords: Iterable[str]) -> list[str]:
    """Names of the modules a keyword names (the module itself, not its children).

    A container (``ModuleList``/``ModuleDict``) is replaced by its children, so each name can
    be wrapped by peft's ``modules_to_save``.
    """
    import torch.nn as nn

    keywords = list(keywords)
    modules = dict(model.named_modules())
    roots = [
        name for name in modules
        if name and any(name.split(".")[-len(k.split(".")):] == k.split(".") for k in keywords)
    ]
    # Keep the outermost only: a keyword like `visual.blocks` inside `visual` is covered once.
    roots = [r for r in roots if not any(r != o and r.startswith(o + ".") for o in roots)]
    out: list[str] = []
    for name in roots:
        if isinstance(modules[name], (nn.ModuleList, nn.ModuleDict)):
            out += [f"{name}.{child}" for child, _ in modules[name].named_children()]
        else:
            out.append(name)
    return out


def linear_targets(model: Any, include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules under ``include`` keywords, outside ``exclude``
    keywords, never ``lm_head``: the LoRA targets."""
    import torch.nn as nn

    include, exclude = list(include), [*exclude, *NEVER_LORA]
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(keyword_matches(k, name) for k in include)
        and not any(keyword_matches(k, name) for k in exclude)
    ]


# -- capabilities, dtype, attention -------------------------------------------------------------
def check_capability(card: FamilyCard, name: str, what: str) -> None:
    state = getattr(card.capabilities, name)
    if state == "unsupported":
        raise CapabilityError(f"family {card.family}: {what} is unsupported (card: capabilities.{name}: unsupported)")
    if state == "experimental":
        warnings.warn(
            f"family {card.family}: {what} is experimental (card: capabilities.{name}: experimental)",
            CapabilityWarning,
            stacklevel=2,
        )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_dtype(args: Arguments) -> tuple[Any, str]:
    """bf16 on a GPU that supports it, fp32 otherwise (CPU, or a GPU without bf16)."""
    import torch

    t = args.training
    if t.use_cpu or not cuda_available():
        return torch.float32, "fp32 (no GPU)" if not t.use_cpu else "fp32 (--use_cpu)"
    if t.fp16:
        return torch.float32, "fp32 weights with fp16 autocast (--fp16)"
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, "bf16 (GPU supports bf16)"
    return torch.float32, "fp32 (GPU without bf16)"


def choose_attention(requested: str | None, card: FamilyCard) -> tuple[str, str]:
    """(implementation, why): flash_attention_2 with CUDA and flash_attn, sdpa otherwise."""
    if requested:
        if requested == "flash_attention_2":
            check_capability(card, "flash_attention", "FlashAttention-2")
        return requested, "--attn_implementation"
    if card.capabilities.flash_attention == "unsupported":
        return "sdpa", f"the card marks flash_attention unsupported for {card.family}"
    if not cuda_available():
        return "sdpa", "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "sdpa", "flash_attn is not installed"
    if card.capabilities.flash_attention == "experimental":
        return "sdpa", "the card marks flash_attention experimental (ask with --attn_implementation flash_attention_2)"
    return "flash_attention_2", "CUDA and flash_attn are present"


def check_qlora_possible(card: FamilyCard) -> None:
    """QLoRA needs CUDA and bitsandbytes: fail before anything loads."""
    check_capability(card, "qlora", "QLoRA")
    if not cuda_available():
        raise ArgumentError(
            "--q_lora needs a CUDA GPU: bitsandbytes 4-bit (nf4) layers do not train on CPU, and this machine has "
            "no CUDA device. Use --use_lora without --q_lora, or run on a GPU machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ArgumentError("--q_lora needs bitsandbytes: pip install 'cardtune[gpu]' (or pip install bitsandbytes)")


# -- what is trained ---------------------------------------------------------------------------
@dataclass
class TrainPlan:
    """Which component is trained how: ``full``, ``lora``, ``frozen``, or ``moe`` (the LLM's
    experts and routers in full, the rest of it frozen)."""

    modes: dict[str, str]
    lora_targets: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    moe_modules: list[str] = field(default_factory=list)
    """Modules trained in full whatever their component's mode (experts and routers)."""
    new_token_ids: list[int] = field(default_factory=list)
    """Rows added to the embeddings for new tokens: trained (and saved) with the adapters, as
    their random initialisation would otherwise stay untrained under LoRA."""

    @property
    def uses_lora(self) -> bool:
        return "lora" in self.modes.values()


def plan_training(model: Any, card: FamilyCard, args: Arguments, new_token_ids: Iterable[int] = (),
                  moe_train: str | None = None) -> TrainPlan:
    """``moe_train`` (an upcycled model): ``only_moe`` trains only the experts and routers,
    ``lora`` adapters on the experts, ``all`` what the flags say; routers always in full."""
    t = args.tune
    multimodal = card.is_multimodal
    modes = {
        "vision_encoder": ("lora" if t.use_vision_lora else "full") if t.train_vision_encoder else "frozen",
        "vision_projector": "full" if t.train_vision_projector else "frozen",
        "llm": ("lora" if t.use_lora else "full") if t.train_llm else "frozen",
        # Modules the card lists as neither vision nor LLM follow the LLM when it is fully trained.
        "others": "full" if t.train_llm and not t.use_lora else "frozen",
    }
    if not multimodal:
        modes["vision_encoder"] = modes["vision_projector"] = "frozen"
        if not t.train_llm:
            raise ArgumentError(f"{card.family} is a text-only family: nothing to train without --train_llm")
    parts = None
    if moe_train is not None:
        from cardtune.training.moe import moe_parts

        parts = moe_parts(model)
        if moe_train != "all":
            modes = dict.fromkeys(GROUPS, "frozen")
            modes["llm"] = "moe" if moe_train == "only_moe" else "lora"
    plan = TrainPlan(modes)
    vision = card.multimodal_keywords
    if parts is not None and moe_train == "only_moe":
        plan.moe_modules = parts.experts + parts.routers
    if parts is not None and modes["llm"] == "lora":
        plan.modules_to_save += parts.routers  # a router learns in full, never through an adapter
        vision = [*vision, *parts.routers]
    if modes["llm"] == "lora":
        include = parts.experts if parts is not None and moe_train == "lora" else card.modules.llm
        plan.lora_targets += linear_targets(model, include, vision)
    if modes["vision_encoder"] == "lora":
        plan.lora_targets += linear_targets(model, card.modules.vision_encoder, [])
    if plan.uses_lora:
        check_capability(card, "lora", "LoRA")
        if not plan.lora_targets:
            raise CapabilityError(f"family {card.family}: no nn.Linear module matches the card's keywords for LoRA")
        for group in GROUPS:
            if modes[group] == "full":
                plan.modules_to_save += keyword_roots(model, getattr(card.modules, group))
        if modes["llm"] == "lora":
            plan.new_token_ids = list(new_token_ids)
    return plan


def apply_plan(model: Any, card: FamilyCard, plan: TrainPlan, args: Arguments) -> Any:
    """Freeze, wrap with peft where LoRA is asked, and return the model to train."""
    if plan.uses_lora:
        from peft import LoraConfig, get_peft_model

        t = args.tune
        config = LoraConfig(
            r=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            target_modules=plan.lora_targets,
            modules_to_save=plan.modules_to_save or None,
            trainable_token_indices=plan.new_token_ids or None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        from cardtune.training.peft_compat import peft_reading_checkpointing_alias

        with peft_reading_checkpointing_alias():
            return get_peft_model(model, config)
    for name, param in model.named_parameters():
        group = group_of(name, card) or "others"
        param.requires_grad_(plan.modes[group] == "full")
    for name in plan.moe_modules:
        model.get_submodule(name).requires_grad_(True)
    return model


def parameter_table(model: Any, card: FamilyCard) -> list[tuple[str, int, int]]:
    """(group, trainable, total) per card component, plus ``unassigned`` for names no keyword matches."""
    counts: dict[str, list[int]] = {g: [0, 0] for g in (*GROUPS, "unassigned")}
    seen: set[int] = set()
    for name, param in model.named_parameters():
        # Tied weights count once; a peft modules_to_save copy replaces its frozen original.
        if id(param) in seen or ".original_module." in name:
            continue
        seen.add(id(param))
        group = group_of(name, card) or "unassigned"
        n = param.numel()
        counts[group][1] += n
        if param.requires_grad:
            counts[group][0] += n
    return [(g, c[0], c[1]) for g, c in counts.items() if c[1]]


def format_parameter_table(rows: list[tuple[str, int, int]], plan: TrainPlan) -> str:
    lines = [f"{'component':<18}{'mode':<8}{'trainable':>14}{'total':>16}"]
    for group, trainable, total in rows:
        mode = plan.modes.get(group, "frozen" if not trainable else "full")
        lines.append(f"{group:<18}{mode:<8}{trainable:>14,}{total:>16,}")
    trainable = sum(r[1] for r in rows)
    total = sum(r[2] for r in rows)
    lines.append(f"{'all':<18}{'':<8}{trainable:>14,}{total:>16,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(lines)


# -- loading ---------------------------------------------------------------------------------
@dataclass
class PreparedModel:
    model: Any
    plan: TrainPlan
    dtype: Any
    dtype_note: str
    attention: str
    attention_note: str
    notes: list[str] = field(default_factory=list)
    moe: Any = None
    """The model's mixtures of experts (a ``MoESpec``), when it has them."""
    loss: Any = None
    """The model's ``OutputHead`` for the chunked loss (``training.loss``); None: the model's own loss."""


def quantization_config(model_path: str, card: FamilyCard, dtype: Any) -> Any:
    """nf4 4-bit with double quantization; vision modules and lm_head stay in full precision."""
    from transformers import BitsAndBytesConfig

    skip = [*card.multimodal_keywords, *NEVER_LORA]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def _with_attention(load: Any, attention: str, note: str, requested: str | None) -> tuple[Any, str, str]:
    """``load(attention)``; where sdpa was cardtune's choice and the model class has no sdpa
    path (transformers refuses it before any weight loads: gpt-oss's attention sinks), eager."""
    try:
        return load(attention), attention, note
    except ValueError as exc:
        if requested or attention != "sdpa" or "scaled_dot_product_attention" not in str(exc):
            raise
    return load("eager"), "eager", "the model has no sdpa attention in transformers"


def load_and_prepare(loader: Any, card: FamilyCard, args: Arguments, config_overrides: dict[str, Any],
                     tokenizer: Any) -> PreparedModel:
    import torch

    if args.tune.q_lora:
        check_qlora_possible(card)
    dtype, dtype_note = choose_dtype(args)
    attention, attention_note = choose_attention(args.model.attn_implementation, card)
    kwargs: dict[str, Any] = {}
    if args.tune.q_lora:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = quantization_config(loader.path, card, dtype)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    from cardtune.training.moe import folder_spec, load_moe_folder

    notes: list[str] = []
    saved_moe = folder_spec(loader.path)
    if saved_moe is not None:
        if args.moe.moe_layers is not None:
            from cardtune.training.moe import MoEError, same_structure

            try:  # before the weights load
                same_structure(saved_moe, args.moe)
            except MoEError as exc:
                raise ArgumentError(str(exc)) from None
        model, attention, attention_note = _with_attention(
            lambda a: load_moe_folder(card, loader.path, dtype=dtype, attn_implementation=a),
            attention, attention_note, args.model.attn_implementation)
        notes.append(f"moe: {loader.path} holds an upcycled model: {saved_moe.describe()}")
    else:
        model, attention, attention_note = _with_attention(
            lambda a: loader.load_model(dtype=dtype, attn_implementation=a, config_overrides=config_overrides, **kwargs),
            attention, attention_note, args.model.attn_implementation)
    embeddings = model.get_input_embeddings()
    # num_embeddings, not the weight's shape: under ZeRO-3 the weight is a shard of shape 0 outside its forward
    rows = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    new_token_ids: list[int] = []
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer))
        new_token_ids = list(range(rows, len(tokenizer)))
        added = tokenizer.convert_ids_to_tokens(new_token_ids)
        notes.append(f"resized token embeddings {rows} -> {len(tokenizer)} for the tokens the model lacked: "
                     f"{', '.join(map(repr, added[:8]))}{' ...' if len(added) > 8 else ''}")
    t = args.training
    if t.activation_checkpointing and t.activation_checkpointing_kwargs is None:
        # Reentrant checkpointing drops the gradients when the embeddings are frozen (LoRA, projector only).
        t.activation_checkpointing_kwargs = {"use_reentrant": False}
    if args.tune.q_lora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=t.activation_checkpointing,
            gradient_checkpointing_kwargs=t.activation_checkpointing_kwargs,
        )
    moe, moe_train = prepare_moe(model, card, args, saved_moe, notes)
    plan = plan_training(model, card, args, new_token_ids, moe_train=moe_train)
    if plan.new_token_ids:
        notes.append(f"LoRA: the {len(plan.new_token_ids)} new embedding rows are trained and saved with the adapter")
    model = apply_plan(model, card, plan, args)
    if t.activation_checkpointing:
        model.enable_input_require_grads()
    if hasattr(model, "config"):
        model.config.use_cache = False
    from cardtune.training.loss import choose_loss

    loss, loss_note = choose_loss(model, args.model.loss_impl, t, t.label_smoothing_factor)  # shown on the model as trained
    notes.append(loss_note)
    return PreparedModel(model, plan, dtype, dtype_note, attention, attention_note, notes, moe, loss)


def prepare_moe(model: Any, card: FamilyCard, args: Arguments, saved: Any, notes: list[str]) -> tuple[Any, str | None]:
    """Upcycle the model as ``--moe_layers`` asks, or keep the mixtures its folder holds (a later
    stage; the structure and routing stay, ``--router_aux_loss_coef`` and ``--moe_train`` apply).
    Returns the model's ``MoESpec`` and how its MoE parts train (None: no MoE)."""
    from cardtune.training.moe import MoEError, plan_moe, set_spec, upcycle

    m = args.moe
    try:
        if saved is not None:
            if m.moe_layers is None:
                notes.append("moe: no --moe_layers: the experts and routers train as the other flags say (--moe_train all)")
            if "router_aux_loss_coef" in args.sources:
                saved = saved.model_copy(update={"router_aux_loss_coef": m.router_aux_loss_coef})
                set_spec(model, saved)
            return saved, m.moe_train if m.moe_layers is not None else "all"
        if m.moe_layers is None:
            return None, None
        spec = plan_moe(model, card, layers=m.moe_layers, num_experts=m.moe_num_experts, top_k=m.moe_top_k,
                        router_aux_loss_coef=m.router_aux_loss_coef, capacity_factor=m.moe_capacity_factor,
                        eval_capacity_factor=m.moe_eval_capacity_factor, min_capacity=m.moe_min_capacity,
                        use_residual=m.moe_use_residual)
    except MoEError as exc:
        raise ArgumentError(str(exc)) from None
    upcycle(model, spec)
    notes.append(f"moe: upcycled {spec.describe()}")
    return spec, m.moe_train
