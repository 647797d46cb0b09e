"""Reading back what training wrote: a full model folder or a LoRA adapter folder, each with
its processor/tokenizer and the resolved card (``cardtune_card.yaml``).

Used by ``cardtune merge`` and ``cardtune chat``; a folder without a card (any Hugging Face
model) gets a card derived from its config, as ``--model_path`` does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cardtune.registry import CardError, FamilyCard

CARD_FILE = "cardtune_card.yaml"
ARGS_FILE = "cardtune_args.json"
ADAPTER_CONFIG = "adapter_config.json"
# Training artefacts that are not part of a model folder (kept out of a merged output).
_NOT_MODEL_FILES = {
    "README.md", "training_args.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json",
    "loss.png", "log_history.json", "skipped_samples.jsonl", "scaler.pt",
    "cardtune_moe.json",  # an adapter's MoE spec: a merged model carries it in config.json
}


def read_card(folder: str | Path, *, trust_remote_code: bool = False) -> FamilyCard:
    """The card ``folder`` was trained with (its ``cardtune_card.yaml``), else one derived from
    the folder. Its ``trust_remote_code`` is ``trust_remote_code`` (the command's
    ``--trust-remote-code``) whatever the folder's card says: a model folder is data someone may
    have shared, and trust comes only from the person running the command."""
    folder = Path(folder)
    file = folder / CARD_FILE
    if file.is_file():
        try:
            card = FamilyCard.model_validate(yaml.safe_load(file.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise CardError(f"{file}: not a valid card: {exc}") from None
    else:
        from cardtune.loaders.resolve import derive_card

        card = derive_card(folder)[0]
    return card.model_copy(update={"trust_remote_code": trust_remote_code})


def untrusted_code(folder: str | Path) -> str | None:
    """One line saying which code of ``folder`` is not run and how to allow it, when the folder
    declares code of its own (``auto_map``) or its card asks for trust; else None."""
    from cardtune.loaders.discover import read_folder

    folder = Path(folder)
    file = folder / CARD_FILE
    try:
        asked = file.is_file() and bool((yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("trust_remote_code"))
        code = read_folder(folder).remote_code
    except (OSError, ValueError, AttributeError, CardError):
        return None  # the folder's own problems are said where it loads
    if not asked and not _declares_code(folder):
        return None
    card = f"; its {CARD_FILE} says trust_remote_code: true, which counts only with --trust-remote-code" if asked else ""
    return (f"{folder} holds code of its own ({', '.join(code) or 'auto_map'}), which is not run{card}: a model "
            "folder grants no trust. Read that code, then give --trust-remote-code to run it")


def _declares_code(folder: Path) -> bool:
    names = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
    for name in names:
        try:
            config = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            return True
    return False


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> str:
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise CardError(f"{folder}/{ADAPTER_CONFIG}: no base_model_name_or_path")
    return base


def loader_for(card: FamilyCard, path: str | Path, revision: str | None = None) -> Any:
    """The card's loader on ``path``, unless that loader replaces the folder (the demo loader
    builds its own): a local folder, e.g. an earlier stage's output, is a plain Hugging Face
    folder that the generic loader reads."""
    from cardtune.loaders import LOADERS
    from cardtune.loaders.generic import GenericLoader

    loader = LOADERS[card.loader](card, str(path), revision)
    if Path(path).is_dir() and Path(loader.path).resolve() != Path(path).resolve():
        return GenericLoader(card, path)
    return loader


def load_folder_model(card: FamilyCard, loader: Any, *, dtype: Any = None) -> Any:
    """The loader's model, through the MoE class when its folder's config holds upcycled mixtures."""
    from cardtune.training.moe import folder_spec, load_moe_folder

    if folder_spec(loader.path) is not None:
        return load_moe_folder(card, loader.path, dtype=dtype)
    return loader.load_model(dtype=dtype)


@dataclass
class Trained:
    model: Any
    card: FamilyCard
    processing: Any  # cardtune.loaders.generic.Processing
    adapter: bool


def load_trained(folder: str | Path, *, dtype: Any = None, merge: bool = False, trust_remote_code: bool = False) -> Trained:
    """The model in ``folder`` (full, or base + adapter; ``merge`` folds the adapter in), with
    the processing saved beside it and the card it was trained with. The folder's code (and
    its base's) runs only with ``trust_remote_code``, the command's flag (:func:`read_card`)."""
    from cardtune.loaders.generic import GenericLoader
    from cardtune.training.fit import check_adapter_fits, check_has_weights
    from cardtune.training.moe import folder_spec, model_spec, upcycle

    folder = Path(folder)
    check_has_weights(folder)
    card = read_card(folder, trust_remote_code=trust_remote_code)
    base_loader = loader_for(card, adapter_base(folder)) if is_adapter(folder) else None
    # The folder's own tokenizer/processor: the one training saved, fix-ups included.
    with processing_folder(folder, base_loader.path if base_loader else None) as files:
        processing = GenericLoader(card, files).load_processing()
    if base_loader is not None:
        from peft import PeftModel

        base = load_folder_model(card, base_loader, dtype=dtype)
        rows = base.get_input_embeddings().weight.shape[0]
        if len(processing.tokenizer) > rows:
            base.resize_token_embeddings(len(processing.tokenizer))
        spec = folder_spec(folder)
        if spec is not None and model_spec(base) is None:
            # Upcycled by the run on a dense base: the experts' frozen weights are the FFN's
            # copies again, the adapter and the routers (modules_to_save) come from the folder.
            upcycle(base, spec)
        check_adapter_fits(folder, base, adapter_base(folder))
        from cardtune.training.peft_compat import peft_reading_checkpointing_alias

        with peft_reading_checkpointing_alias():
            model = PeftModel.from_pretrained(base, str(folder))
        if merge:
            model = model.merge_and_unload()
    else:
        model = load_folder_model(card, GenericLoader(card, folder), dtype=dtype)
    model.eval()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    return Trained(model, card, processing, is_adapter(folder) and not merge)


def side_files(source: str | Path) -> list[Path]:
    """Tokenizer, processor, template and card files of ``source`` (no weights, no adapter, no
    training state, no model config): what a merged folder takes from its adapter."""
    out = []
    for item in sorted(Path(source).iterdir()):
        name = item.name
        if (not item.is_file() or name in _NOT_MODEL_FILES or name.startswith("adapter_")
                or name.startswith("rng_state") or name.endswith((".safetensors", ".bin", ".pt", ".pth"))
                or name in ("config.json", "generation_config.json")):
            continue
        out.append(item)
    return out


def copy_side_files(source: str | Path, target: str | Path, written: Collection[str] = ()) -> list[str]:
    """:func:`side_files` of ``source`` into ``target``, but those named in ``written`` (what the
    caller wrote there itself). A file left by an earlier merge into ``target`` is replaced: it is
    another adapter's tokenizer or card."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for item in side_files(source):
        if item.name not in written:
            shutil.copy2(item, target / item.name)
            copied.append(item.name)
    return copied


@contextmanager
def processing_folder(folder: str | Path, base: str | None) -> Iterator[Path]:
    """Where ``folder``'s tokenizer/processor load from exactly as from its merged folder.

    A full model folder is its own. An adapter folder lacks the model's ``config.json``, by
    which ``AutoProcessor`` picks the processor class; without it a processor that cannot be
    built falls back to returning the bare tokenizer, so images would go unexpanded. The
    adapter's files are loaded from a temporary folder holding them (linked) and the base's
    ``config.json``: the files ``cardtune merge`` writes, minus the weights.
    """
    if base is None:
        yield Path(folder)
        return
    from transformers.utils import cached_file

    config = cached_file(base, "config.json")
    with tempfile.TemporaryDirectory(prefix="cardtune-adapter-processing-") as view:
        for item in side_files(folder):
            os.symlink(item.resolve(), Path(view) / item.name)
        os.symlink(Path(config).resolve(), Path(view) / "config.json")
        yield Path(view)
