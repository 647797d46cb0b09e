"""Whether saved weights fit the model they are about to be loaded into, from the safetensors
headers alone (``safe_open``: names and shapes, no tensor read), before anything is loaded.

A checkpoint of another LoRA rank, an adapter over another base, a folder without weights:
each is one line naming the tensor, both shapes, and the base the weights were trained on,
instead of torch's ``Error(s) in loading state_dict`` or an ``OSError`` from deep in
transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cardtune.registry.errors import InputFileError
from cardtune.training.output import ADAPTER_CONFIG, CARD_FILE

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_PEFT_PREFIX = "base_model.model."
_CARD_BASE = re.compile(r"^# The card this model was trained with: model id (.+?), base weights from (.+)\.$")


def saved_shapes(folder: str | Path, names: tuple[str, ...] | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in ``folder``'s safetensors files (``names``: only those files, and
    shards named like them)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        if names is not None and not any(file.name == n or file.name.startswith(n.split(".")[0] + "-") for n in names):
            continue
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def trained_on(folder: str | Path) -> str | None:
    """The base a trained folder's weights came from, as its card says (written by training)."""
    card = Path(folder) / CARD_FILE
    if not card.is_file():
        return None
    first = card.read_text(encoding="utf-8").split("\n", 1)[0]
    match = _CARD_BASE.match(first)
    return f"{match.group(2)} (model id {match.group(1)}; {CARD_FILE})" if match else None


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _mismatch_line(mismatches: list[tuple[str, str, str]]) -> str:
    name, saved, here = mismatches[0]
    more = f"; {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
    return f"{name} is {saved} there, {here} here{more}"


# -- a checkpoint into this run's model -----------------------------------------------------
def expected_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of ``model`` holds, by the names it saves them under."""
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    return {k: tuple(v.shape) for k, v in state.items()}


def checkpoint_mismatches(checkpoint: str | Path, model: Any) -> list[tuple[str, str, str]]:
    """(tensor, saved shape, shape here) for every tensor of ``checkpoint`` this model holds with
    another shape; empty when its weights are not safetensors (nothing to read cheaply)."""
    saved = saved_shapes(checkpoint, ADAPTER_WEIGHTS if hasattr(model, "peft_config") else MODEL_WEIGHTS)
    here = expected_shapes(model)
    return [(k, _shape(saved[k]), _shape(here[k])) for k in sorted(saved) if k in here and saved[k] != here[k]]


def check_checkpoint_fits(checkpoint: str | Path, model: Any, differences: list[str] | None) -> None:
    """A checkpoint whose weights have other shapes than this run's model (another LoRA rank,
    another base) is an error before the Trainer loads it. ``differences``: how its saved run
    differs from this one, to say why."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return  # the parameters are partitioned placeholders until the engine gathers them
    mismatches = checkpoint_mismatches(checkpoint, model)
    if not mismatches:
        return
    from cardtune.training.arguments import ArgumentError

    why = f"; it was trained with other settings ({'; '.join(differences)})" if differences else ""
    base = trained_on(checkpoint)
    raise ArgumentError(
        f"--resume_from_checkpoint {checkpoint}: its weights do not fit this run's model: "
        f"{_mismatch_line(mismatches)}{why}" + (f"; its base: {base}" if base else "")
    )


# -- an adapter over a base -----------------------------------------------------------------
def adapter_mismatches(folder: str | Path, base: Any) -> list[tuple[str, str, str]]:
    """(tensor, saved shape, what the base needs) for each tensor of ``folder``'s adapter that
    does not fit ``base``: a LoRA matrix against its layer's inputs or outputs, a module
    trained in full against the base's own tensor, a module the base does not have."""
    out = []
    params = dict(base.named_parameters())
    for key, shape in sorted(saved_shapes(folder, ("adapter_model.safetensors",)).items()):
        name = key.removeprefix(_PEFT_PREFIX)
        if ".lora_" in name:
            module_name, _, part = name.partition(".lora_")
            try:
                module = base.get_submodule(module_name)
            except AttributeError:
                out.append((key, _shape(shape), "no such module in the base"))
                continue
            rows, cols = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if rows is None or cols is None:
                continue  # not a linear layer: peft checks the rest when it loads
            if part.startswith("A.") and shape[-1] != cols:
                out.append((key, _shape(shape), f"a layer of {cols} inputs"))
            elif part.startswith("B.") and shape[0] != rows:
                out.append((key, _shape(shape), f"a layer of {rows} outputs"))
        elif name in params and tuple(params[name].shape) != shape:
            out.append((key, _shape(shape), _shape(tuple(params[name].shape))))
    return out


def check_adapter_fits(folder: str | Path, base: Any, base_path: str) -> None:
    """An adapter whose tensors do not fit the base it is loaded onto is one line naming the
    tensor, the base given (``adapter_config.json``) and the base it was trained on."""
    mismatches = adapter_mismatches(folder, base)
    if not mismatches:
        return
    name, saved, needs = mismatches[0]
    more = f"; {len(mismatches) - 1} more" if len(mismatches) > 1 else ""
    base_note = trained_on(folder)
    trained = (f"; it was trained on {base_note}" if base_note else "")
    raise InputFileError(
        f"{folder}: the adapter does not fit its base {base_path} ({ADAPTER_CONFIG}: base_model_name_or_path): "
        f"{name} is {saved}, the base needs {needs}{more}{trained}"
    )


# -- a folder with weights -------------------------------------------------------------------
def check_has_weights(folder: str | Path) -> None:
    """A trained or merged folder holds its adapter or model weights; one that does not (a run
    stopped before its final save) names what it holds, and its checkpoints."""
    from cardtune.training.checkpoints import complete_checkpoints

    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder")
    adapter = (folder / ADAPTER_CONFIG).is_file()
    wanted = ADAPTER_WEIGHTS if adapter else MODEL_WEIGHTS
    if any((folder / n).is_file() for n in wanted) or (not adapter and next(folder.glob("model-*.safetensors"), None)):
        return
    held = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:6]) or "nothing"
    checkpoints = complete_checkpoints(folder)
    hint = (f"; its latest complete checkpoint is {checkpoints[-1]}" if checkpoints
            else "; give a folder written by training or merge")
    what = (f"adapter weights ({' or '.join(ADAPTER_WEIGHTS)})" if adapter
            else "model weights (model.safetensors, its shards or pytorch_model.bin)")
    raise InputFileError(f"{folder}: no {what}; it holds {held}{hint}")
