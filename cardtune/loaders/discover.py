"""What a model folder says about itself: the one discovery behind ``add-model`` (which writes
it as a card for review) and ``--model-path`` alone (which derives a card and uses it).

Read off the folder, never guessed per family: the model class (``config.json``
architectures), the remote code it declares (``auto_map``; never run unless trusted), the
loader (a file only one family ships), whether it takes images, its media tokens (the
processor's and tokenizer's own, then the ids the config names, then what its template writes
for an image), and the module keywords (the model built on the meta device; by config layout
where it cannot be built here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.loaders.generic import read_json
from cardtune.registry.errors import CardError

# Module names, classified by their last dotted component (lower case).
_VISION = re.compile(r"vision|visual|image_encoder|img_processor|vit\b|siglip|clip")
_PROJECTOR = re.compile(r"projector|projection|merger|mm_proj|attn_pool|connector|aligner|resampler|adapter")
# Loaders chosen by a file that only their family ships.
LOADER_MARKERS = {"qwen.tiktoken": "qwen-vl"}
# Where a vision-language model keeps its parts when it cannot be built here, by config layout.
_LAYOUT_MODULES = {
    "visual": {"vision_encoder": ["visual.patch_embed", "visual.rotary_pos_emb", "visual.blocks"],
               "vision_projector": ["visual.merger"], "llm": ["language_model", "lm_head"]},
    "vision_config": {"vision_encoder": ["vision_tower"], "vision_projector": ["multi_modal_projector"],
                      "llm": ["language_model", "lm_head"]},
}
_TEXT_MODULES = {"llm": ["model", "lm_head"]}
# Unused tokens a vocabulary keeps for later: candidates for a missing pad (MoE-LLaVA's practice).
_RESERVED = re.compile(r"^<\|?(extra|reserved|unused|reg)[_a-z]*\d+\|?>$")


@dataclass
class FolderFacts:
    """The cheap facts of a folder: its files only, nothing loaded."""

    folder: Path
    config: dict[str, Any]
    model_class: str | None
    """``config.json``'s first architecture, or None when it names none."""
    remote_code: list[str]
    """The remote-code files the folder's configs declare (``auto_map``), or its ``*.py``."""
    loader: str
    multimodal: bool
    notes: list[str] = field(default_factory=list)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type") or "")


def read_folder(folder: Path) -> FolderFacts:
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CardError(f"{folder}: not a Hugging Face model folder (no config.json or tokenizer_config.json)")
    config = read_json(folder / "config.json")
    refuse_untrainable(folder, config)
    archs = config.get("architectures") or []
    multimodal = any(k in c for c in nested_configs(config) for k in ("vision_config", "visual", "img_processor", "embd_layer"))
    notes = [f"model class {archs[0]} (config.json architectures)"] if archs else []
    if not archs and config.get("model_type"):
        by_type = _class_for_model_type(str(config["model_type"]), multimodal)
        if by_type:
            archs = [by_type]
            notes.append(f"model class {by_type} (config.json names no architecture; transformers' class for "
                         f"model_type {config['model_type']!r})")
    declared: set[str] = set()
    for source in (config, read_json(folder / "tokenizer_config.json"), read_json(folder / "processor_config.json"),
                   read_json(folder / "preprocessor_config.json")):
        for value in (source.get("auto_map") or {}).values():
            for ref in value if isinstance(value, list) else [value]:
                if isinstance(ref, str):
                    declared.add(ref.split("--")[-1].split(".")[0] + ".py")
    remote = sorted(declared) or sorted(p.name for p in folder.glob("*.py"))
    loader = next((name for marker, name in LOADER_MARKERS.items() if (folder / marker).is_file()), "generic")
    if loader != "generic":
        notes.append(f"loader {loader} (the folder ships {next(m for m, n in LOADER_MARKERS.items() if n == loader)})")
    return FolderFacts(folder, config, archs[0] if archs else None, remote, loader, multimodal, notes)


_TRAINABLE_TASKS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")


def refuse_untrainable(folder: Path, config: dict[str, Any]) -> None:
    """Refuse, in one line, a model transformers knows but serves neither as a causal LM nor as
    an image-text-to-text model: an omni folder (a thinker for text, images and audio, plus a
    talker and a vocoder that speak) is one model whose loss is not a language model's. Its
    parts are named from the config's sub-configs, with the one cardtune could train alone."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = str(config.get("model_type") or "")
    if model_type not in CONFIG_MAPPING_NAMES:
        return  # unknown to transformers (remote code, or no config): judged where it loads
    trainable = [getattr(modeling_auto, t) for t in _TRAINABLE_TASKS]
    if any(model_type in table for table in trainable):
        return
    tasks = sorted(name.removeprefix("MODEL_FOR_").removesuffix("_MAPPING_NAMES").lower().replace("_", "-")
                   for name in dir(modeling_auto) if name.startswith("MODEL_FOR_") and name.endswith("_MAPPING_NAMES")
                   and model_type in getattr(modeling_auto, name))
    parts = {k.removesuffix("_config"): str(v.get("model_type") or "") for k, v in config.items()
             if k.endswith("_config") and isinstance(v, dict)}
    alone = [k for k, t in parts.items() if any(t in table for table in trainable)]
    said = f" (transformers serves it as: {', '.join(tasks)})" if tasks else ""
    has = f"; its parts: {', '.join(parts)}" if parts else ""
    hint = (f"; its {alone[0]} ({parts[alone[0]]}) is an image-text-to-text model: save it as a folder of its own "
            "(its weights and config) to train it" if alone else "")
    raise CardError(f"{folder}: cardtune cannot train a {model_type} model: it is neither a causal language model "
                    f"nor an image-text-to-text model{said}{has}{hint}")


def _class_for_model_type(model_type: str, multimodal: bool) -> str | None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    tables = [MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    for table in tables if multimodal else tables[::-1]:
        name = table.get(model_type)
        if isinstance(name, str):
            return name
    return None


# -- media tokens ----------------------------------------------------------------------------
def nested_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """``config`` and every sub-config it nests (``text_config``, ``vision_config``, an omni
    model's ``thinker_config`` and the configs inside it), breadth first."""
    out, queue = [], [config]
    while queue:
        c = queue.pop(0)
        out.append(c)
        queue += [v for k, v in c.items() if k.endswith("_config") and isinstance(v, dict)]
    return out


def media_tokens(facts: FolderFacts, tokenizer: Any, processor: Any | None = None) -> tuple[dict[str, str], list[str]]:
    """``{"image_token": ..., "video_token": ..., "image_placeholder": ...}`` as far as the folder
    tells, and how each was found.

    The media token is the one the model scatters features into: first the id its config names
    (``image_token_id`` / ``image_token_index``, in nested configs too), then the tokenizer's
    and its configs', then the processor's attribute, then the special token the template
    writes for an image (where one alone is new). The placeholder is what the template writes
    for an image part, where the processor expands it into something else (Gemma 3 writes
    ``<start_of_image>``; its image token ``<image_soft_token>`` never appears in the render).
    """
    folder, config = facts.folder, facts.config
    tok_config = read_json(folder / "tokenizer_config.json")
    proc_config = read_json(folder / "processor_config.json")
    configs = nested_configs(config)
    media: dict[str, str] = {}
    notes: list[str] = []
    for kind in ("image", "video"):
        token, source = None, ""
        for c in configs:
            for key in (f"{kind}_token_id", f"{kind}_token_index"):
                tid = c.get(key)
                if isinstance(tid, int) and 0 <= tid < len(tokenizer):
                    token, source = tokenizer.convert_ids_to_tokens(tid), f"config.json {key} {tid}"
                    break
            if token:
                break
        if token is None:
            for where, value in (("tokenizer_config.json", tok_config.get(f"{kind}_token")),
                                 ("processor_config.json", proc_config.get(f"{kind}_token")),
                                 ("the tokenizer", getattr(tokenizer, f"{kind}_token", None)),
                                 ("the processor", getattr(processor, f"{kind}_token", None))):
                if isinstance(value, str) and value:
                    token, source = value, where
                    break
        written_all = _tokens_the_template_writes(tokenizer, folder) if kind == "image" and facts.multimodal else []
        written = _token_the_template_writes(tokenizer, folder) if written_all else None
        if token is None and written:
            token, source = written, "the token the chat template writes for an image"
        if token:
            media[f"{kind}_token"] = token
            notes.append(f"{kind} token {token!r} ({source})")
        if token and written and token not in written_all:
            media[f"{kind}_placeholder"] = written
            notes.append(f"{kind} placeholder {written!r}: what the chat template writes for an image, which the "
                         f"processor expands into {token!r} tokens")
    return media, notes


def _token_the_template_writes(tokenizer: Any, folder: Path) -> str | None:
    """The special token a chat template writes for an image part and not for text."""
    new = _tokens_the_template_writes(tokenizer, folder)
    if len(new) == 1:
        return new[0]
    padded = [s for s in new if "pad" in s.lower()]
    return padded[0] if len(padded) == 1 else None


def _tokens_the_template_writes(tokenizer: Any, folder: Path) -> list[str]:
    """The special (or added) tokens a chat template writes for an image part and not for text."""
    from cardtune.loaders.generic import folder_chat_template

    template = folder_chat_template(folder) or getattr(tokenizer, "chat_template", None)
    if not template:
        return []

    from cardtune.chat.render_limit import render_chat

    def render(parts: list[dict[str, Any]]) -> str:
        try:  # (bounded: a template that never ends stops the command, RenderTimeout)
            return render_chat(tokenizer, [{"role": "user", "content": parts}], {"chat_template": template})
        except Exception:  # noqa: BLE001 - a template that refuses the probe tells nothing
            return ""

    text = [{"type": "text", "text": "Look."}]
    with_image, without = render([{"type": "image"}, *text]), render(text)
    new = [s for s in tokenizer.all_special_tokens if with_image.count(s) > without.count(s)]
    new += [str(t) for t in tokenizer.added_tokens_decoder.values()
            if str(t) not in new and with_image.count(str(t)) > without.count(str(t))]
    return new


# -- modules ---------------------------------------------------------------------------------
def build_on_meta(folder: Path, model_class: str, trust_remote_code: bool) -> Any:
    """The model of ``folder`` built on the meta device (no memory, no weights)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    cls = getattr(transformers, model_class, None)
    with torch.device("meta"):
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def _has_params(module: Any) -> bool:
    return any(True for _ in module.parameters())


def discover_modules(model: Any) -> dict[str, list[str]]:
    """Module keywords per component, from the names of the model's sub-modules.

    The base model (``model.model``) is opened; a vision module holding a projector-like child
    (Qwen-VL's ``visual.merger``) is split into that child and the rest. Names are written
    relative to the base model, the way a keyword matches (a dotted run of a parameter name).
    A model with no vision part gives ``llm: [<base>, lm_head]``.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    top = [(name, child) for name, child in model.named_children() if child is not base]
    inner = list(base.named_children()) if base is not None else []
    if base is None and any(_VISION.search(name.lower()) for name, _ in top):
        inner, top = top, []  # no base model: the parts hang off the model itself (Llama 4)
    groups: dict[str, list[str]] = {"vision_encoder": [], "vision_projector": [], "llm": []}
    for name, child in inner:
        last = name.lower()
        if _VISION.search(last):
            parts = list(child.named_children())
            if any(_PROJECTOR.search(n.lower()) for n, _ in parts):
                for sub, grandchild in parts:
                    if _has_params(grandchild):
                        key = "vision_projector" if _PROJECTOR.search(sub.lower()) else "vision_encoder"
                        groups[key].append(f"{name}.{sub}")
            elif _has_params(child):
                groups["vision_encoder"].append(name)
        elif _PROJECTOR.search(last):
            groups["vision_projector"].append(name)
        elif _has_params(child):
            groups["llm"].append(name)
    if not groups["vision_encoder"] and base is not None:
        groups["llm"] = [prefix]
    groups["llm"] += [name for name, child in top if _has_params(child)]
    groups["llm_mlp"] = _decoder_mlps(model, [*groups["vision_encoder"], *groups["vision_projector"]])
    return groups


_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def _decoder_mlps(model: Any, vision: list[str]) -> list[str]:
    """The name of the FFN under each language-model decoder layer (``mlp``, ``feed_forward``):
    a child of ``layers.N`` whose class is an MLP, outside the vision modules (MoE upcycling
    replaces these)."""
    found: list[str] = []
    for name, module in model.named_modules():
        head, _, last = name.rpartition(".")
        if (type(module).__name__.lower().endswith("mlp") and _LAYER.search(head + ".") and head.split(".")[-1].isdigit()
                and not any(f".{v}." in f".{name}." for v in vision) and last not in found
                and not _is_mixture(module)):
            found.append(last)
    return found


def _is_mixture(module: Any) -> bool:
    """An FFN that is already a mixture of experts (gpt-oss's ``GptOssMLP`` holds a router and
    its experts): nothing to upcycle."""
    return any("expert" in name.lower() for name, _ in module.named_children())


def module_keywords(facts: FolderFacts, model_class: str, trust_remote_code: bool) -> tuple[dict[str, list[str]] | None, str]:
    """(keywords, how they were found); keywords None where the model cannot be built here.
    Remote code runs only with ``trust_remote_code``."""
    import transformers

    native = getattr(transformers, model_class, None) is not None
    try:
        if not facts.config:
            raise CardError("no config.json")
        if not native and not trust_remote_code:
            raise CardError(f"{model_class} is remote code ({', '.join(facts.remote_code) or 'auto_map'}), not run without trust")
        if not native and not any(facts.folder.glob("*.py")):
            raise CardError(f"its remote code ({', '.join(facts.remote_code) or 'auto_map'}) is not in the folder")
        modules = discover_modules(build_on_meta(facts.folder, model_class, trust_remote_code))
    except Exception as exc:  # noqa: BLE001 - remote code absent or untrusted, unknown class, no config
        why = str(exc) if isinstance(exc, CardError) else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return None, why
    if not facts.multimodal:
        modules = {"llm": modules["llm"], "llm_mlp": modules["llm_mlp"]}
    found = "; ".join(f"{k} {v}" for k, v in modules.items() if v)
    return {k: v for k, v in modules.items() if v}, f"module keywords from the model built on the meta device: {found}"


def layout_modules(facts: FolderFacts) -> dict[str, list[str]]:
    """The usual keywords for the folder's config layout, where the model cannot be built."""
    if not facts.multimodal:
        return dict(_TEXT_MODULES)
    layout = "visual" if "visual" in facts.config else "vision_config"
    return {k: list(v) for k, v in _LAYOUT_MODULES[layout].items()}


# -- special tokens --------------------------------------------------------------------------
def _config_token(tokenizer: Any, folder: Path, key: str) -> str | None:
    for source in (read_json(folder / "generation_config.json"), read_json(folder / "config.json")):
        value = source.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < len(tokenizer):
            return tokenizer.convert_ids_to_tokens(value)
    return None


def recommend_special_tokens(tokenizer: Any, folder: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """(chat.special_tokens, what was decided, what to review) for a tokenizer as shipped."""
    tokens = {r: getattr(tokenizer, f"{r}_token") for r in ("pad", "unk", "bos", "eos")}
    fix: dict[str, Any] = {}
    said: list[str] = []
    review: list[str] = []
    if tokens["eos"] is None:
        eos = _config_token(tokenizer, folder, "eos_token_id")
        if eos is not None:
            fix["eos"] = tokens["eos"] = eos
            said.append(f"eos {eos!r}: the tokenizer has none; generation_config/config name its id")
        else:
            review.append("the tokenizer has no eos and the configs name none: set chat.special_tokens.eos")
    shared = [r for r in ("bos", "eos", "unk") if tokens[r] is not None]
    if len({tokens[r] for r in shared}) < len(shared):
        fix["allow_shared"] = True
        group = {tokens[r] for r in shared}
        review.append(
            f"bos/eos/unk share a token as shipped ({', '.join(f'{r}={tokens[r]!r}' for r in shared)}): "
            "allow_shared is set because the model was trained so; give distinct tokens if your code "
            f"needs them ({len(group)} distinct)"
        )
    if tokens["pad"] is None:
        reserved = sorted(
            (t for t in tokenizer.get_vocab() if _RESERVED.match(t)),
            key=lambda t: tokenizer.convert_tokens_to_ids(t),
        )
        if tokens["unk"] is not None and tokens["unk"] != tokens["eos"]:
            fix["pad"] = tokens["unk"]
            said.append(f"pad {tokens['unk']!r}: the tokenizer has none; unk pads (never trained: masked)")
        elif reserved:
            fix["pad"] = reserved[0]
            said.append(f"pad {reserved[0]!r}: the tokenizer has none; its first unused reserved token pads")
        elif tokens["eos"] is not None:
            fix["pad"] = tokens["eos"]
            said.append(f"pad {tokens['eos']!r} = eos: the tokenizer has no pad, and no unk or reserved token apart from eos; "
                        "padding is found by the attention mask, so eos labels are kept")
        else:
            review.append("no pad token can be chosen: set chat.special_tokens.pad")
    return fix, said, review


# -- the card --------------------------------------------------------------------------------
