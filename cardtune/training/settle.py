"""Training arguments the run settles whatever the user wrote, and the checks of what the
launch actually runs: data-loading workers, trackers, the NaN filter, evaluation without eval
data, DDP's unused-parameter search, and an accelerate engine that did not turn on.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from cardtune.training.arguments import ArgumentError, Arguments

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def settle_training_arguments(args: Arguments) -> list[str]:
    """Settings the run needs whatever the user wrote; returns what was changed and why."""
    t = args.training
    notes: list[str] = []
    if t.remove_unused_columns:
        # Items are encoded samples, not dataset columns: nothing to remove.
        t.remove_unused_columns = False
    if "logging_nan_inf_filter" not in args.sources:
        # The filter logs a NaN step's loss as the window's mean so far (0.0 over one step):
        # the logs carry the NaN instead, and the run stops there (training.faults).
        t.logging_nan_inf_filter = False
    if t.dataloader_pin_memory and not _cuda():
        t.dataloader_pin_memory = False  # pinning needs an accelerator
    requested = [r for r in (t.report_to or []) if r not in ("none", "all")]
    if "report_to" not in args.sources and not requested:
        if importlib.util.find_spec("tensorboard") is not None:
            t.report_to = ["tensorboard"]
            notes.append("report_to: tensorboard (installed)")
    else:
        missing = [r for r in requested if r in TRACKERS and importlib.util.find_spec(TRACKERS[r]) is None]
        if missing:
            t.report_to = [r for r in requested if r not in missing] or ["none"]
            notes.append(f"report_to: {', '.join(missing)} not installed; not reporting to it")
    notes += settle_evaluation(args)
    if "ddp_find_unused_parameters" not in args.sources:
        # Every trainable parameter takes part in every step (training.participation), so DDP
        # need not search the autograd graph for unused ones after each forward.
        t.ddp_find_unused_parameters = False
    if "dataloader_num_workers" not in args.sources:
        workers, why = default_num_workers(_cuda() and not t.use_cpu, _usable_cpus(), _local_processes())
        t.dataloader_num_workers = workers
        if workers:
            notes.append(f"dataloader_num_workers: {workers} ({why})")
    return notes


def settle_evaluation(args: Arguments) -> list[str]:
    """Evaluation follows the data given: a recipe's evaluation schedule without eval data is
    turned off (the demo recipe evaluates on the demo's own eval split); one asked for on
    the command line is an error."""
    from transformers.trainer_utils import IntervalStrategy

    t = args.training
    if args.data.eval_data_path is not None:
        return []
    notes = []
    if t.eval_on_start:  # an evaluation before step 1 (the DPO demo's "before")
        if args.sources.get("eval_on_start") == "command line":
            raise ArgumentError("--eval_on_start evaluates on --eval_data_path, which is not given: give it, or drop "
                                "--eval_on_start")
        t.eval_on_start = False
        notes.append(f"eval_on_start: false (the {args.sources.get('eval_on_start')} asks for an evaluation before "
                     "step 1, but no --eval_data_path is given)")
    if t.eval_strategy == IntervalStrategy.NO:
        return notes
    source = args.sources.get("eval_strategy", "the defaults")
    if source == "command line" or t.load_best_model_at_end:
        asked = "--load_best_model_at_end" if t.load_best_model_at_end else f"--eval_strategy {t.eval_strategy.value}"
        raise ArgumentError(f"{asked} evaluates on --eval_data_path, which is not given: give it, or drop {asked}")
    if args.run.eval_generate:
        raise ArgumentError("--eval_generate scores answers to eval samples: give --eval_data_path")
    t.eval_strategy = IntervalStrategy.NO
    t.do_eval = False
    return [*notes, f"eval_strategy: no (the {source} asks for evaluation, but no --eval_data_path is given)"]


ENGINES = {"FSDP": ("ACCELERATE_USE_FSDP", "is_fsdp_enabled"),
           "DeepSpeed": ("ACCELERATE_USE_DEEPSPEED", "is_deepspeed_enabled")}


def check_engine(trainer: Any) -> None:
    """The engine the accelerate config asked for (``accelerate launch`` says so in the
    processes' environment) is the one the Trainer's accelerator runs. accelerate 1.15 turns
    FSDP and DeepSpeed on only on accelerator devices: on CPU the same processes would train
    plain DDP over gloo, unsharded, without a word."""
    import os

    for engine, (env, enabled) in ENGINES.items():
        if os.environ.get(env, "false").lower() == "true" and not getattr(trainer, enabled, False):
            device = trainer.args.device.type
            raise ArgumentError(
                f"the accelerate config asks for {engine}, but accelerate did not turn it on: these processes run on "
                f"{device}, and accelerate runs {engine} only on GPUs (or other accelerators), so they would train "
                "unsharded DDP instead. On CPU, launch with configs/accelerate/cpu.yaml (DDP over gloo)"
            )


def default_num_workers(accelerator: bool, cpus: int, processes: int) -> tuple[int, str]:
    """Data-loading processes when nothing sets them: on an accelerator, the cores each
    training process can spare (at most 4); on CPU none, as training itself needs the cores."""
    if not accelerator:
        return 0, "training on CPU"
    spare = max(0, cpus // max(processes, 1) - 1)
    return min(4, spare), f"{cpus} CPU cores for {processes} training process{'es' if processes > 1 else ''}"


def _usable_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _local_processes() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
