"""From what the user typed (``--model_id`` or ``--model-path``) to a card, a folder and a loader."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.conversation import Processing
from cardtune.loaders import LOADERS
from cardtune.registry import FamilyCard, get_registry
from cardtune.registry.errors import CardError

# Where a vision-language model keeps its parts, by config layout; used only for folders
# that no card describes (a card always names its modules).
_VLM_MODULES = {
    "vision_config": {
        "vision_encoder": ["vision_tower"],
        "vision_projector": ["multi_modal_projector"],
        "llm": ["language_model", "lm_head"],
    },
}
_QWEN_VL_MODULES = {
    "vision_encoder": ["visual.patch_embed", "visual.rotary_pos_emb", "visual.blocks"],
    "vision_projector": ["visual.merger"],
    "llm": ["language_model", "lm_head"],
}


@dataclass
class Resolved:
    """A model ready to load: its card, the folder or hub path, and how it was found."""

    model_id: str
    card: FamilyCard
    path: str
    revision: str | None = None
    derived: bool = False
    notes: list[str] = field(default_factory=list)

    def loader(self):
        return LOADERS[self.card.loader](self.card, self.path, self.revision)


def resolve_model(
    model_id: str | None = None, model_path: str | os.PathLike | None = None, cards: Iterable[str] = ()
) -> Resolved:
    """``model_id`` alone: the registered hub path. ``model_path`` alone: a local HF folder,
    matched to a registered model by nothing but the user's word, so its card is derived.
    Both: the registered card applied to the local folder (a local copy of a registered model)."""
    if model_id is None and model_path is None:
        raise CardError("give --model_id (a registered id) or --model-path (a local Hugging Face folder)")
    if model_id is not None:
        spec = get_registry(cards).get(model_id)
        path = str(model_path) if model_path is not None else spec.hf_path
        return Resolved(model_id, spec.family, path, None if model_path else spec.revision)
    folder = Path(model_path)  # type: ignore[arg-type]
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CardError(f"{folder}: not a Hugging Face model folder (no config.json or tokenizer_config.json)")
    card, notes = derive_card(folder)
    return Resolved(card.models[0].model_id, card, str(folder), derived=True, notes=notes)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def derive_card(folder: Path) -> tuple[FamilyCard, list[str]]:
    """A card for an unregistered local folder, from its config.json; says what it derived."""
    config = _read(folder / "config.json")
    notes: list[str] = []
    archs = config.get("architectures") or []
    model_class = archs[0] if archs else "AutoModelForCausalLM"
    notes.append(f"model class {model_class} (from config.json architectures)" if archs else
                 "model class AutoModelForCausalLM (config.json names no architecture)")
    remote = "auto_map" in config or any(folder.glob("*.py"))
    multimodal = "vision_config" in config or "visual" in config
    extra: dict[str, Any] = {}
    if multimodal:
        qwen_vl = config.get("model_type", "").startswith("qwen2")
        modules = _QWEN_VL_MODULES if qwen_vl else _VLM_MODULES["vision_config"]
        modalities = ["text", "image", "multi_image"]
        tok_config = _read(folder / "tokenizer_config.json")
        image_token = "<|image_pad|>" if qwen_vl else tok_config.get("image_token") or "<image>"
        extra = {"media": {"image_token": image_token}, "collator": "qwen2-vl" if qwen_vl else "default"}
        notes.append(f"vision-language model ({config.get('model_type')}): modules {modules}, image token {image_token!r}")
    else:
        modules = {"llm": ["model", "lm_head"]}
        modalities = ["text"]
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    card = FamilyCard.model_validate(
        {
            "family": f"local-{name}" if name[:1].isalnum() else "local-model",
            "description": f"derived from {folder}",
            "status": "experimental",
            "status_note": "derived automatically from the model folder; write a card to pin it",
            "model_class": model_class,
            "trust_remote_code": False,
            "modalities": modalities,
            "modules": modules,
            **extra,
            "models": [{"model_id": name if name[:1].isalnum() else "local-model", "hf_path": str(folder)}],
        }
    )
    if remote:
        notes.append("the folder ships remote code; it is not run (trust_remote_code stays false)")
    return card, notes


def load_processing(resolved: Resolved) -> Processing:
    return resolved.loader().load_processing()
