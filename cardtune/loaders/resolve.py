"""From what the user typed (``--model_id`` or ``--model-path``) to a card, a folder and a loader."""

from __future__ import annotations

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
    card, notes = derive_card(folder)
    return Resolved(card.models[0].model_id, card, str(folder), derived=True, notes=notes)


def derive_card(folder: Path) -> tuple[FamilyCard, list[str]]:
    """A card for an unregistered local folder, from what the folder says about itself
    (:mod:`cardtune.loaders.discover`, the discovery ``add-model`` writes up too); says what it
    derived. Remote code is never run: the card does not trust it.

    The card and what was said are kept (a :class:`~cardtune.hashing.FolderMemo` keyed by the
    folder's files and cardtune's code): discovery builds the model on the meta device, which
    takes seconds and torch, so a later run on the same folder reads them back instead. A memo
    is a file anyone who can write the cache may edit: the card read back never trusts remote
    code, whatever the memo says."""
    from cardtune.hashing import FolderMemo, code_fingerprint

    memo = FolderMemo.of("derived-cards", folder, code_fingerprint())
    kept = memo.load() if memo is not None else None
    if isinstance(kept, dict):
        try:
            card = FamilyCard.model_validate(kept["card"]).model_copy(update={"trust_remote_code": False})
            return card, [str(n) for n in kept["notes"]]
        except (KeyError, TypeError, ValueError):
            pass  # not what this code writes: derived again
    card, notes = _derive_card(folder)
    if memo is not None:
        memo.store({"card": card.model_dump(mode="json"), "notes": notes})
    return card, notes


def _derive_card(folder: Path) -> tuple[FamilyCard, list[str]]:
    from cardtune.loaders.discover import (
        layout_modules,
        media_tokens,
        module_keywords,
        read_folder,
        recommend_special_tokens,
    )

    facts = read_folder(folder)
    notes = list(facts.notes) or ["model class AutoModelForCausalLM (config.json names no architecture)"]
    model_class = facts.model_class or "AutoModelForCausalLM"
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.resolve().name.lower()).strip("-._")
    model_id = name if name[:1].isalnum() else "local-model"
    base = {
        "family": f"local-{name}" if name[:1].isalnum() else "local-model",
        "description": f"derived from {folder}",
        "status": "experimental",
        "status_note": "derived automatically from the model folder; write a card to pin it",
        "model_class": model_class,
        "trust_remote_code": False,
        "loader": facts.loader,
        "models": [{"model_id": model_id, "hf_path": str(folder)}],
    }
    modules, how = module_keywords(facts, model_class, trust_remote_code=False)
    if modules is None:
        modules = layout_modules(facts)
        notes.append(f"module keywords {modules} (the usual layout; the model cannot be built here: {how})")
    elif facts.multimodal and not (modules.get("vision_encoder") and modules.get("vision_projector")):
        found = modules
        modules = {**layout_modules(facts), **({"llm_mlp": found["llm_mlp"]} if found.get("llm_mlp") else {})}
        notes.append(f"module keywords {modules} (the usual layout: the model's own names {found} do not tell its "
                     "vision parts apart)")
    else:
        notes.append(how)
    extra: dict[str, Any] = {}
    modalities = ["text", "image", "multi_image"] if facts.multimodal else ["text"]
    probe = FamilyCard.model_validate({  # the tokenizer as shipped: shared tokens are judged below
        **base, "modules": modules, "modalities": modalities, "chat": {"special_tokens": {"allow_shared": True}},
        **({"load_image": False} if facts.loader == "qwen-vl" else {}),
    })
    tokenizer = LOADERS[facts.loader](probe, folder).load_tokenizer()
    fixups, said, review = recommend_special_tokens(tokenizer, folder)
    if fixups:
        extra["chat"] = {"special_tokens": fixups}
        notes += said + review
    if facts.multimodal:
        if facts.loader == "qwen-vl":
            extra["load_image"] = False
            notes.append("images are given by path in the prompt (the tokenizer reads the path): load_image false")
        else:
            media, found = media_tokens(facts, tokenizer)
            notes += found
            if "video_token" in media:
                modalities.append("video")
                extra["capabilities"] = {"video": "experimental"}
            if media:
                extra["media"] = media
        notes.append(f"vision-language model ({facts.model_type}): modalities {', '.join(modalities)}")
    card = FamilyCard.model_validate({**base, "modalities": modalities, "modules": modules, **extra})
    if facts.remote_code:
        notes.append(f"the folder declares remote code ({', '.join(facts.remote_code)}); it is not run (trust_remote_code stays false)")
    return card, notes


def load_processing(resolved: Resolved) -> Processing:
    return resolved.loader().load_processing()
