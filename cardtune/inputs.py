"""What the user named is there and usable, checked before anything loads: the data paths, the
model folder (or hub id), its weights when training, and the loader and collator its card names.

Each problem is one line naming the path or the card field and what to do, raised as
:class:`~cardtune.registry.errors.InputFileError` (a path) or
:class:`~cardtune.registry.errors.CardError` (a card): the commands and ``train`` print it and
exit 2. Without these checks the same mistakes surface minutes later, deep inside
transformers or datasets, as tracebacks that name none of them ("Repo id must be in the form",
"Couldn't reach 'trian.json' on the Hub", a ``KeyError``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cardtune.data.formats import check_data_paths
from cardtune.registry.errors import CardError, InputFileError

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")
"""Files that hold a model's weights (or index them)."""
_HUB_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")

__all__ = ["check_components", "check_data_paths", "check_model", "check_model_path", "component_problems"]


def component_problems(card: Any, location: Callable[[str], str]) -> list[str]:
    """The loader and collator ``card`` names, checked to exist; ``location(field)`` gives the
    ``FILE:LINE`` where the card writes that field."""
    from cardtune.collators import COLLATORS
    from cardtune.loaders import LOADERS

    problems = []
    for field, known in (("loader", LOADERS), ("collator", COLLATORS)):
        name = getattr(card, field)
        if name not in known:
            problems.append(f"{location(field)}: {field}: unknown {field} '{name}' (known: {', '.join(sorted(known))})")
    return problems


def check_components(card: Any, model_id: str | None, cards: Any = ()) -> None:
    """:func:`component_problems` as a :class:`CardError`, for the card ``model_id`` resolved to."""
    def location(field: str) -> str:
        from cardtune.registry import get_registry

        registry = get_registry(cards)
        if model_id is None or card.family not in registry.family_sources:
            return f"card {card.family}"  # derived from a folder, or read from a trained one
        return registry.field_location(card.family, field)

    problems = component_problems(card, location)
    if problems:
        raise CardError("\n".join(problems))


def check_model_path(model_path: str | None, *, weights: bool) -> None:
    """``--model_path``, before the model resolves: a model folder (with weights when ``weights``)."""
    if model_path is not None:
        _check_folder(Path(model_path), "--model_path", weights)
    if model_path is not None and weights:
        _check_not_adapter(Path(model_path))


def _check_not_adapter(folder: Path) -> None:
    """A LoRA adapter a run wrote is not a model to train from: its base would load and train
    without it (a DPO after a LoRA finetune would start from the model before that finetune, and
    compare against it). Merged, it is a model like any other."""
    from cardtune.training.output import ADAPTER_CONFIG, adapter_base, is_adapter

    if not is_adapter(folder):
        return
    try:
        base = f"its base {adapter_base(folder)}"
    except (CardError, ValueError, OSError):
        base = "its base"
    merged = f"{str(folder).rstrip('/')}-merged"
    raise InputFileError(
        f"--model_path {folder}: a LoRA adapter ({ADAPTER_CONFIG}), not a model: training from it would train {base} "
        f"without the adapter. Merge it first, then train from the merged folder: cardtune merge --adapter {folder} "
        f"--output {merged}, and --model_path {merged}")


def check_model(resolved: Any, *, model_path: str | None, weights: bool, files: bool = True, cards: Any = ()) -> None:
    """The card's loader and collator exist; when the model's ``files`` are to be read and there
    is no ``--model_path``, the registered hf_path is a model folder (a local path) or, with the
    hub offline, a hub id in the local cache (with weights when ``weights``)."""
    check_components(resolved.card, None if resolved.derived else resolved.model_id, cards)
    if not files or resolved.card.loader == "demo" or model_path is not None:
        return  # the demo loader builds its own folder; --model_path is checked before resolving
    path = str(resolved.path)
    if Path(path).exists() or _looks_local(path):
        _check_folder(Path(path), f"model {resolved.model_id}: hf_path", weights)
    else:
        _check_hub(path, resolved.revision, resolved.model_id, weights)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _check_folder(folder: Path, named_by: str, weights: bool) -> None:
    if not folder.exists():
        raise InputFileError(f"{named_by} {folder}: no such folder")
    if not folder.is_dir():
        raise InputFileError(f"{named_by} {folder}: not a folder (give the model's folder, not one of its files)")
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise InputFileError(f"{named_by} {folder}: not a Hugging Face model folder (no config.json or "
                             "tokenizer_config.json)")
    if weights and not any(next(folder.glob(p), None) for p in WEIGHT_PATTERNS):
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "nothing"
        raise InputFileError(
            f"{named_by} {folder}: no model weights (no *.safetensors, *.bin or index file; it holds {held}): "
            "download the weights into it (`hf download REPO --local-dir DIR`), or point at the complete folder"
        )


def _check_hub(repo: str, revision: str | None, model_id: str, weights: bool) -> None:
    """Offline, a hub id must be in the local cache; online the loader fetches it."""
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if not is_offline_mode():
        return

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo, name, revision=revision), str)

    what = None
    if not cached("config.json") and not cached("tokenizer_config.json"):
        what = "is not in the local Hugging Face cache"
    elif weights and not any(cached(name) for name in _HUB_WEIGHT_FILES):
        what = "has no weights in the local Hugging Face cache"
    if what:
        raise InputFileError(
            f"model {model_id}: {repo} {what} and the hub is offline (HF_HUB_OFFLINE): download it where the hub "
            f"is reachable (`hf download {repo}`), or give --model_path a local copy of it"
        )
