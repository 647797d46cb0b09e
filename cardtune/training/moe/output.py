"""What a run or a merge writes for an upcycled model, and the line that says which format.

A full model is saved in a transformers MoE architecture when one expresses it exactly
(``native``), else in cardtune's MoE format: the base architecture's ``config.json`` with the
spec under ``cardtune_moe`` and the experts' and routers' weights, which ``cardtune chat``,
``merge`` and ``train --model_path`` load. A LoRA adapter stays an adapter over the dense base,
with ``cardtune_moe.json`` beside it (``cardtune merge`` then writes the full model).
Checkpoints keep the training layout (cardtune's format), which resuming needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cardtune.training.moe.native import native_target, save_native
from cardtune.training.moe.spec import MoESpec

_WEIGHT_PATTERNS = ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                    "pytorch_model.bin.index.json")


@dataclass
class MoEOutput:
    format: str
    """``Mixtral``, ``Qwen2-MoE``, ``cardtune MoE`` or ``LoRA adapter``."""
    note: str
    """The run summary's line."""
    model_class: str | None = None
    """The class a plain ``from_pretrained`` builds, where it differs from the card's (a text model saved as
    Mixtral or Qwen2-MoE): the saved card names it."""


def save_full_model(model: Any, spec: MoESpec, folder: str | Path, *, state: dict[str, Any] | None = None,
                    card_class: str, written: bool = False) -> MoEOutput:
    """Save ``model`` (unwrapped; ``state``: its full state dict, gathered under ZeRO-3) into
    ``folder``. ``written``: the folder already holds it in cardtune's format (``save_model``)."""
    folder = Path(folder)
    target = native_target(model, spec)
    if isinstance(target, str):
        if not written:
            model.save_pretrained(str(folder), state_dict=state)
        return MoEOutput("cardtune MoE", "saved in cardtune's MoE format (config.json: cardtune_moe; cardtune chat, "
                         f"merge and train --model_path load it), not natively: {target}")
    for pattern in _WEIGHT_PATTERNS:  # the training layout's weight files give way to the native ones
        for stale in folder.glob(pattern):
            stale.unlink()
    built = save_native(model, state if state is not None else model.state_dict(), spec, target, folder)
    inside = "" if built != card_class else f" (the text_config of {built})"
    return MoEOutput(target.name, f"saved as {target.name}{inside}: loads with plain transformers "
                     f"({built}.from_pretrained)", built if built != card_class else None)


def adapter_output() -> MoEOutput:
    return MoEOutput("LoRA adapter", "saved as a LoRA adapter over the dense base, with cardtune_moe.json; "
                     "cardtune merge writes the full MoE model (native where an architecture fits)")


def card_with_class(card_yaml: str, model_class: str) -> str:
    """The saved card's text naming ``model_class``, its header comment kept."""
    header = "".join(line + "\n" for line in card_yaml.splitlines() if line.startswith("#"))
    data = yaml.safe_load(card_yaml)
    data["model_class"] = model_class
    note = f"# Saved as {model_class} (mixture of experts upcycled by cardtune).\n"
    return header + note + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
