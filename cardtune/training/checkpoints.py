"""A run's output folder: which checkpoints are whole, which one a resume starts from, and
why one folder never holds two runs.

A checkpoint is *complete* when its ``trainer_state.json`` parses (the Trainer writes it last)
and every weights/state file in it reads back: safetensors headers cover their files, torch
files have their zip directory. ``auto`` resumes the latest complete checkpoint whose saved
``cardtune_args.json`` and card match this run in everything that shapes training; a run that
would start from step 0 in a folder holding another run refuses unless ``--overwrite_output_dir``,
which moves what the earlier run wrote into ``earlier-run-N/`` (the Trainer's checkpoint rotation
and ``auto`` only look at ``checkpoint-N`` folders at the top, so nothing of it is deleted or
resumed), and refuses a folder that holds anything else (the user's data, say).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from cardtune.data.validate import SKIPPED_FILE
from cardtune.training.arguments import ArgumentError, resume_requested
from cardtune.training.output import ARGS_FILE, CARD_FILE
from cardtune.training.weights_only import TORCH_FILES, check_weights_only

TRAINER_STATE = "trainer_state.json"
EARLIER_RUN = "earlier-run"

# Arguments that change where a run writes, what it logs, how fast it runs or how it is
# evaluated, but not the weights it trains; every other argument (model, card, data, LoRA,
# optimiser, schedule, batch size, seed, and any option added later) must match to resume.
_NOT_SHAPING_PREFIXES = ("logging_", "log_", "save_", "eval_", "per_device_eval_", "hub_", "dataloader_", "ddp_",
                         "fsdp", "torch_compile", "trackio_", "include_")
_NOT_SHAPING = frozenset({
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "config", "cards", "cpu_threads", "loss_impl",
    "trust_remote_code",
    "attn_implementation", "report_to", "run_name", "project", "disable_tqdm", "push_to_hub", "do_train", "do_eval",
    "do_predict", "prediction_loss_only", "metric_for_best_model", "greater_is_better", "load_best_model_at_end",
    "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "skip_memory_metrics", "debug", "local_rank", "use_cpu",
    "bf16", "fp16", "tf32", "deepspeed", "accelerator_config", "parallelism_config", "activation_checkpointing",
    "activation_checkpointing_kwargs", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "torch_empty_cache_steps", "enable_jit_checkpoint", "restore_callback_states_from_checkpoint",
    "remove_unused_columns", "use_cache", "use_liger_kernel", "liger_kernel_config", "full_determinism",
    "max_skipped_share", "validation_workers", "data_cache",
})


def shapes_training(name: str) -> bool:
    return name not in _NOT_SHAPING and not name.startswith(_NOT_SHAPING_PREFIXES)


# -- verifying a checkpoint -------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    problem: str | None = None
    """Why it cannot be resumed (None: complete)."""

    @property
    def complete(self) -> bool:
        return self.problem is None


def checkpoint_problem(folder: str | Path) -> str | None:
    """What makes ``folder`` unusable for a resume, or None when every file in it reads back.
    Cheap: only headers and zip directories are read, never the tensors."""
    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE} (its save did not finish)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE}: not readable ({exc})"
    for file in sorted(folder.iterdir()):
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        elif file.suffix in TORCH_FILES:
            problem = _torch_file_problem(file)
        elif file.name.endswith(".safetensors.index.json"):
            problem = _index_problem(file)
        else:
            continue
        if problem:
            return f"{file.name}: {problem}"
    return None


def _safetensors_problem(file: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            return None
    except (SafetensorError, OSError) as exc:
        return f"{exc} ({file.stat().st_size:,} bytes; truncated?)"


def _torch_file_problem(file: Path) -> str | None:
    # torch.save writes a zip archive whose directory is at the end: a cut file has none.
    try:
        with zipfile.ZipFile(file):
            return None
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a complete torch file ({exc}; {file.stat().st_size:,} bytes; truncated?)"


def _index_problem(file: Path) -> str | None:
    try:
        shards = set(json.loads(file.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        return f"not a readable index ({exc})"
    missing = sorted(s for s in shards if not (file.parent / s).is_file())
    return f"names missing shards: {', '.join(missing)}" if missing else None


def scan_checkpoints(output_dir: str | Path) -> list[Checkpoint]:
    """Every ``checkpoint-N`` folder directly in ``output_dir``, oldest first, each verified."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        step = child.name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        if child.is_dir() and child.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            found.append(Checkpoint(child, int(step), checkpoint_problem(child)))
    return sorted(found, key=lambda c: c.step)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders in ``output_dir``, oldest first."""
    return [c.path for c in scan_checkpoints(output_dir) if c.complete]


def trainer_state(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / TRAINER_STATE).read_text(encoding="utf-8"))


def checkpoint_step(folder: str | Path) -> int:
    """The global step a checkpoint was saved at (its trainer state)."""
    return int(trainer_state(folder)["global_step"])


def run_is_finished(checkpoint: str | Path, max_steps: int, num_train_epochs: float) -> bool:
    """Whether ``checkpoint`` already holds the last step of a run with these limits. The
    Trainer, resumed there, would train one step more before it looks at ``max_steps``."""
    state = trainer_state(checkpoint)
    step = int(state["global_step"])
    if max_steps > 0:
        return step >= max_steps
    return step >= int(state.get("max_steps") or 0) > 0 and num_train_epochs <= float(state.get("num_train_epochs") or 0)


# Training state, kept in checkpoints only: the rest of a checkpoint is a model folder.
_TRAINING_STATE = (TRAINER_STATE, "optimizer.pt", "scheduler.pt", "scaler.pt")


def finish_from(checkpoint: str | Path, output_dir: str | Path) -> list[str]:
    """The final folder of a run whose last step ``checkpoint`` holds: its model files (weights,
    processor, card files) copied into ``output_dir``; returns what was copied."""
    import shutil

    from cardtune.training.writes import writing

    target = Path(output_dir)
    copied = []
    with writing(target, f"the final folder (from {Path(checkpoint).name})"):
        for item in sorted(Path(checkpoint).iterdir()):
            if item.is_file() and item.name not in _TRAINING_STATE and not item.name.startswith("rng_state"):
                shutil.copy2(item, target / item.name)
                copied.append(item.name)
    return copied


# -- is it the same run? ------------------------------------------------------------------
def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix[:-1]} {saved!r} -> {current!r}"]


def run_differences(checkpoint: str | Path, arguments: dict[str, Any], card: dict[str, Any]) -> list[str] | None:
    """What differs between the run saved in ``checkpoint`` and this one, in the arguments
    that shape training and in the card; None when the checkpoint holds no saved arguments."""
    import yaml

    folder = Path(checkpoint)
    if not (folder / ARGS_FILE).is_file():
        return None
    saved = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8"))
    current = _normalised(arguments)
    # An option the saved run did not have yet is not compared (its behaviour then is unknown).
    keys = sorted(k for k in saved if shapes_training(k))
    diffs = [d for k in keys for d in _differences({k: saved.get(k)}, {k: current.get(k)})]
    if (folder / CARD_FILE).is_file():
        saved_card = yaml.safe_load((folder / CARD_FILE).read_text(encoding="utf-8")) or {}
        diffs += [f"card {d}" for d in _differences(saved_card, _normalised(card))]
    return diffs


# -- where a run starts ---------------------------------------------------------------------
def _is_auto(value: str | None) -> bool:
    return str(value).lower() in ("auto", "true", "latest")


def earlier_run_files(output_dir: str | Path, with_incomplete: bool = True) -> list[Path]:
    """What an earlier run left in ``output_dir``: its checkpoints (``with_incomplete``: also
    those whose save did not finish) and saved arguments; a folder with neither is only a folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    marks = [c.path for c in scan_checkpoints(folder) if with_incomplete or c.complete]
    if (folder / ARGS_FILE).is_file():
        marks.append(folder / ARGS_FILE)
    return marks


def resolve_resume(value: str | None, output_dir: str | Path, arguments: dict[str, Any] | None = None,
                   card: dict[str, Any] | None = None) -> tuple[str | None, list[str]]:
    """(checkpoint to resume from or None, lines to print).

    ``auto``: the latest complete checkpoint in ``output_dir`` (incomplete ones after it are
    named and passed over), refused when its saved run differs from ``arguments``/``card``.
    A folder path: that checkpoint, refused when incomplete; differences are printed only
    (naming a checkpoint is the way to continue it with changed arguments on purpose).
    """
    if not resume_requested(value):
        return None, []
    if not _is_auto(value):
        folder = Path(str(value))
        if not folder.is_dir():
            raise ArgumentError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
        problem = checkpoint_problem(folder)
        if problem:
            raise ArgumentError(f"--resume_from_checkpoint {value}: incomplete checkpoint: {problem}")
        check_weights_only(folder)
        lines = [f"resume: {value}"]
        diffs = run_differences(folder, arguments, card) if arguments is not None else None
        if diffs:
            lines.append(f"note: this run differs from the one saved in {value}: {'; '.join(diffs)}")
        return str(folder), lines
    scanned = scan_checkpoints(output_dir)
    complete = [c for c in scanned if c.complete]
    lines = [f"resume: auto: passing over {c.path.name}: {c.problem}" for c in scanned
             if not c.complete and (not complete or c.step > complete[-1].step)]
    if not complete:
        return None, [*lines, f"resume: auto: no complete checkpoint in {output_dir}; starting from step 0"]
    latest = complete[-1].path
    check_weights_only(latest)
    if arguments is not None:
        diffs = run_differences(latest, arguments, card or {})
        if diffs is None:
            raise ArgumentError(
                f"{output_dir}: {latest.name} holds no {ARGS_FILE}, so it cannot be checked against this run; "
                f"name it to resume it anyway (--resume_from_checkpoint {latest}), or use another --output_dir"
            )
        if diffs:
            raise ArgumentError(
                f"{output_dir} holds another run: {latest.name} was trained with different settings "
                f"({'; '.join(diffs)}). Resume it with its own settings, start over with --overwrite_output_dir "
                f"(without --resume_from_checkpoint), use another --output_dir, or name the checkpoint "
                f"(--resume_from_checkpoint {latest}) to continue it with these settings on purpose"
            )
    if lines:
        lines.append(f"resume: auto: {latest} (the latest complete checkpoint)")
    else:
        lines.append(f"resume: auto: {latest}")
    return str(latest), lines


def check_fresh_start(output_dir: str | Path, overwrite: bool, with_incomplete: bool = True) -> None:
    """A run from step 0 into a folder holding an earlier run: refused unless ``overwrite``.
    ``with_incomplete=False``: checkpoints whose save did not finish do not count (``auto``
    found nothing to resume and starts over)."""
    marks = earlier_run_files(output_dir, with_incomplete)
    if not marks:
        return
    if overwrite:
        others = run_output(output_dir)[1]
        if others:
            raise ArgumentError(
                f"--overwrite_output_dir: {output_dir} holds an earlier run and files no run wrote "
                f"({_few(others)}): only a run's own files are moved aside, so it stays as it is; move those "
                "files elsewhere, or use another --output_dir"
            )
        return
    resumable = any(c.complete for c in scan_checkpoints(output_dir))
    names = ", ".join(p.name for p in marks[-4:])
    continue_it = "continue it with --resume_from_checkpoint auto, " if resumable else ""
    raise ArgumentError(
        f"{output_dir} holds an earlier run ({names}{'' if resumable else '; no checkpoint to resume'}): "
        f"{continue_it}start over with --overwrite_output_dir (the earlier run is moved to "
        f"{Path(output_dir) / (EARLIER_RUN + '-N')}, nothing is deleted), or use another --output_dir"
    )


def move_earlier_run(output_dir: str | Path) -> Path | None:
    """What runs wrote in ``output_dir`` (:func:`run_output`), into a new ``earlier-run-N``."""
    folder = Path(output_dir)
    if not earlier_run_files(folder):
        return None
    n = 1
    while (folder / f"{EARLIER_RUN}-{n}").exists():
        n += 1
    target = folder / f"{EARLIER_RUN}-{n}"
    target.mkdir()
    for item in run_output(folder)[0]:
        item.rename(target / item.name)
    return target


# -- what a run writes ----------------------------------------------------------------------
# Directly in output_dir, besides the files of its checkpoints, which its final save writes too.
_RUN_FILES = frozenset({
    ARGS_FILE, CARD_FILE, "cardtune_moe.json", SKIPPED_FILE, "training_args.bin",
    TRAINER_STATE, "config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "vocab.json", "merges.txt", "tokenizer.model", "model.safetensors.index.json", "pytorch_model.bin.index.json",
    "report.html", "data_report.json", "generations.jsonl",  # the run's report (cardtune.report)
})
# eval-*: `cardtune eval` of the run's model, written beside it by default
_RUN_PATTERNS = ("model*.safetensors", "adapter_model.*", "pytorch_model*.bin", "tmp-checkpoint-*", "eval-*")
_MODEL_CARD = "README.md"  # transformers' and peft's model card: a user's README.md is not one
# Folders of common names, the run's only while they hold nothing else: the eval split's skipped
# samples, tensorboard's event files (the default logging_dir).
_RUN_FOLDERS = {"eval": SKIPPED_FILE, "runs": "events.out.tfevents.*"}


def run_output(output_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(what runs wrote, everything else) directly in ``output_dir``, each sorted; moved earlier
    runs and the lock of the run that holds the folder are neither. A run writes its
    checkpoints, logs, card files and final folder (the files its checkpoints hold, whatever
    the model: remote code, processor files); a model card README.md only with front matter."""
    from cardtune.training.lock import LOCK_FILE
    from cardtune.training.trainer import LOG_FILE, LOSS_PLOT

    folder = Path(output_dir)
    checkpoints = [c.path for c in scan_checkpoints(folder)]
    in_checkpoints = {f.name for c in checkpoints for f in c.iterdir()} - {_MODEL_CARD}
    ours, others = [], []
    for item in sorted(folder.iterdir()):
        name = item.name
        if name == LOCK_FILE or (item.is_dir() and name.startswith(EARLIER_RUN + "-")):
            continue
        if (item in checkpoints or name in _RUN_FILES or name in (LOG_FILE, LOSS_PLOT) or name in in_checkpoints
                or any(item.match(p) for p in _RUN_PATTERNS) or (name == _MODEL_CARD and _is_model_card(item))
                or (name in _RUN_FOLDERS and item.is_dir() and _only_holds(item, _RUN_FOLDERS[name]))):
            ours.append(item)
        else:
            others.append(item)
    return ours, others


def _only_holds(folder: Path, pattern: str) -> bool:
    return all(f.match(pattern) for f in folder.rglob("*") if not f.is_dir())


def _is_model_card(file: Path) -> bool:
    try:
        with file.open(encoding="utf-8") as f:
            return f.readline().rstrip() == "---"
    except (OSError, UnicodeDecodeError):
        return False


def _few(paths: list[Path], limit: int = 4) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:limit]]
    return ", ".join(names) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
