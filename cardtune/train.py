"""Finetune a registered model: ``python train.py --model_id llava-1.5-7b --data_path d.json ...``.

The run, in order: arguments (command line over ``--config``), the model resolved to its card,
the tokenizer/processor with the card's fix-ups, every sample validated and encoded once
(``--bad_sample_policy``), the model loaded (dtype, attention kernel) and prepared (full,
LoRA, QLoRA, frozen parts), ``transformers.Trainer`` with cardtune's collator and batch
sampler, then a plain Hugging Face folder: weights or adapter, processor, the resolved card
(``cardtune_card.yaml``), the arguments (``cardtune_args.json``) and the loss curve.

``python train.py --model_id tiny-llava-demo`` trains the embedded demo with no other argument.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cardtune.collators.render_limit import RenderTimeout
from cardtune.collators.roles import TemplateProbeError
from cardtune.quiet import name_deepspeed_accelerator, plain_cardtune_warnings  # noqa: F401  (re-exported: tests, bench)
from cardtune.registry import CapabilityError, CardError, FamilyCard, InputFileError, UnknownModelError
from cardtune.training.arguments import (
    ArgumentError,
    Arguments,
    check_media_folders,
    parse_arguments,
    source_lines,
)
from cardtune.training.template import card_with_template
from cardtune.training.writes import DiskFullError, writing

log = logging.getLogger("cardtune.train")

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _say(args: Arguments | None, message: str) -> None:
    """Print on the main process only (every rank runs this code)."""
    if args is None or args.training.process_index == 0:
        print(message, flush=True)


# -- card -----------------------------------------------------------------------------------------
def resolve(args: Arguments) -> tuple[Any, dict[str, Any]]:
    """The model's card with ``--template`` applied, its folder, and its config overrides."""
    resolved, overrides = resolve_family(args)
    return dataclasses.replace(resolved, card=card_with_template(resolved.card, args.model.template)), overrides


def resolve_family(args: Arguments) -> tuple[Any, dict[str, Any]]:
    """The model's card as its family writes it (no ``--template``): the card the output keeps.

    ``--model_path`` alone on a folder an earlier run wrote reads the card it was trained with.
    A card read or derived from ``--model_path`` trusts the folder's code only with
    ``--trust_remote_code``; a registered card (the package's, or one of ``--cards``) says for itself.
    """
    from cardtune.loaders.resolve import Resolved, resolve_model
    from cardtune.registry import get_registry
    from cardtune.training.output import CARD_FILE, read_card, untrusted_code

    m = args.model
    refused = [] if m.trust_remote_code or m.model_path is None else [untrusted_code(m.model_path)]
    if m.model_id is None and m.model_path is not None and (Path(m.model_path) / CARD_FILE).is_file():
        card = read_card(m.model_path, trust_remote_code=m.trust_remote_code)
        note = f"card: {Path(m.model_path) / CARD_FILE} (the card this folder was trained with)"
        return Resolved(card.models[0].model_id, card, str(m.model_path), notes=[note, *filter(None, refused)]), {}
    resolved = resolve_model(m.model_id, m.model_path, m.cards)
    if m.trust_remote_code:
        resolved = dataclasses.replace(resolved, card=resolved.card.model_copy(update={"trust_remote_code": True}))
    elif resolved.derived:
        resolved.notes.extend(filter(None, refused))
    overrides = get_registry(m.cards).get(m.model_id).config_overrides if m.model_id else dict(resolved.card.config_overrides)
    return resolved, overrides


def folder_loader(resolved: Any) -> Any:
    """The loader of the resolved model's folder (see ``training.output.loader_for``)."""
    from cardtune.training.output import loader_for

    return loader_for(resolved.card, resolved.path, resolved.revision)


# -- arguments the run settles ------------------------------------------------------------------
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
    if args.data.eval_data_path is not None or t.eval_strategy == IntervalStrategy.NO:
        return []
    source = args.sources.get("eval_strategy", "the defaults")
    if source == "command line" or t.load_best_model_at_end:
        asked = "--load_best_model_at_end" if t.load_best_model_at_end else f"--eval_strategy {t.eval_strategy.value}"
        raise ArgumentError(f"{asked} evaluates on --eval_data_path, which is not given: give it, or drop {asked}")
    if args.run.eval_generate:
        raise ArgumentError("--eval_generate scores answers to eval samples: give --eval_data_path")
    t.eval_strategy = IntervalStrategy.NO
    t.do_eval = False
    return [f"eval_strategy: no (the {source} asks for evaluation, but no --eval_data_path is given)"]


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


def demo_data(args: Arguments, card: FamilyCard) -> str | None:
    """The demo dataset as default data for a ``loader: demo`` model."""
    d = args.data
    if d.data_path is not None:
        return None
    if card.loader != "demo":
        raise ArgumentError("give --data_path (LLaVA or OpenAI-messages JSON/JSONL, or a mix YAML)")
    from cardtune.demo import EVAL_FILE, IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset

    folder = ensure_demo_dataset()
    d.data_path = str(folder / TRAIN_FILE)
    if d.eval_data_path is None:
        d.eval_data_path = str(folder / EVAL_FILE)
    if d.image_folder is None:
        d.image_folder = str(folder / IMAGE_DIR)
    return str(folder)


# -- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class RunResult:
    """What a run wrote and measured; ``trainer`` holds the trained model (None when a resume
    found the run already at its last step)."""

    summary: dict[str, Any]
    trainer: Any
    args: Arguments


def run(argv: Sequence[str] | None = None) -> RunResult:
    """Train; returns where things were written, the run's figures and the trainer."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    for line in source_lines(args):  # first: every later error is about values whose source is said
        _say(args, line)
    from cardtune.inputs import check_data_paths, check_model, check_model_path

    check_model_path(args.model.model_path, weights=True)  # before anything loads
    resolved, overrides = resolve(args)
    card = resolved.card
    if args.tune.q_lora:
        from cardtune.training.model import check_qlora_possible

        check_qlora_possible(card)  # before anything loads
    if args.data.packing:
        from cardtune.training.model import check_capability

        check_capability(card, "packing", "packing")  # unsupported: an error; experimental: a warning
    check_model(resolved, model_path=args.model.model_path, weights=True, cards=args.model.cards)
    check_media_folders(args)
    demo_folder = demo_data(args, card)
    for data_path in (args.data.data_path, args.data.eval_data_path):
        if data_path is not None:
            check_data_paths(data_path)
    notes = settle_training_arguments(args)
    for line in resolved.notes:
        notes.append(line)
    from cardtune.training.lock import holding

    t = args.training
    # Held from here to the end (refused while another run holds it): also the check that it can be written.
    with holding(t.output_dir, t.process_index == 0, lambda message: _say(args, message)):
        return train_in_held_folder(args, argv, resolved, overrides, demo_folder, notes, started)


def train_in_held_folder(args: Arguments, argv: list[str], resolved: Any, overrides: dict[str, Any],
                         demo_folder: str | None, notes: list[str], started: float) -> RunResult:
    """The run once its output folder is its own: where it starts, the data, the model, training."""
    from cardtune.training.optional_cache import usable_cache

    card = resolved.card
    t = args.training
    output_dir = t.output_dir
    say = lambda message: _say(args, message)  # noqa: E731
    cache = usable_cache(args.data.data_cache, say)  # before any data is read
    # plain is this run's pretraining format: the output keeps the family's chat template, so
    # the next stage (conversations) loads the folder with the template it needs.
    family = resolve_family(args)[0] if args.model.template == "plain" else None
    saved_card = family.card if family is not None else card
    # Where the run starts, decided before anything is written into output_dir.
    resume, resume_lines = start_point(args, _card_data(saved_card, resolved.model_id))
    from cardtune.training.checkpoints import checkpoint_step, complete_checkpoints, run_is_finished

    if resume and run_is_finished(resume, t.max_steps, t.num_train_epochs):
        for line in resume_lines:
            say(line)
        return finish_from_last_checkpoint(args, resume, started)

    from transformers import set_seed

    from cardtune.data.max_length import length_note, limited_encoder
    from cardtune.training.data import (
        PackedCollator,
        PackedDataset,
        conversation_dataset,
        media_config,
        prepare_split,
    )
    from cardtune.training.faults import Interrupted, NonFiniteError
    from cardtune.training.model import format_parameter_table, load_and_prepare, parameter_table
    from cardtune.training.participation import text_only_warning
    from cardtune.training.trainer import CardFiles, CardtuneTrainer, LossPlotCallback, NonFiniteGuard

    main_process = t.process_index == 0
    set_seed(t.seed)
    if args.model.cpu_threads and (t.use_cpu or not _cuda()):
        import torch

        torch.set_num_threads(args.model.cpu_threads)
    loader = folder_loader(resolved)
    say(f"cardtune: {resolved.model_id} (family {card.family}) from {loader.path}")
    if card.status == "experimental":
        say(f"warning: family {card.family} is experimental (card: status: experimental)"
            + (f": {card.status_note}" if card.status_note else ""))
    if demo_folder:
        say(f"data: the demo dataset in {demo_folder}")
    for line in resume_lines:
        say(line)

    try:
        processing = loader.load_processing()
    except OSError as exc:  # the hub unreachable, a folder missing its tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{loader.path}: cannot load the tokenizer/processor: {first}") from None
    for line in processing.notes:
        notes.append(line)
    saved_processing = folder_loader(family).load_processing() if family is not None else processing
    d = args.data
    encoder = limited_encoder(card, processing, loader.path, max_length=d.max_length,
                              revision=resolved.revision, config_overrides=overrides,
                              typed_control_tokens=d.typed_control_tokens)
    if d.max_length is None and encoder.limit is not None:
        notes.append(f"length limit: {encoder.limit.tokens} tokens ({encoder.limit.origin}); a longer sample is "
                     "too_long (--max_length cuts such samples instead)")
    above_limit = length_note(d.max_length, encoder.limit)
    if above_limit:
        notes.append(above_limit)
    split_kwargs = dict(card=card, image_folder=d.image_folder, video_folder=d.video_folder,
                        allow_absolute_paths=d.allow_absolute_paths, policy=d.bad_sample_policy,
                        output_dir=output_dir if main_process else None,
                        seed=t.seed, log=say, check_media=d.check_media, max_image_pixels=d.max_image_pixels,
                        num_workers=d.validation_workers, cache=cache,
                        role_keys={"user_key": d.user_key, "assistant_key": d.assistant_key})
    train_split = prepare_split("train", d.data_path, encoder, **split_kwargs)
    check_skipped_share("train", train_split.report, d.bad_sample_policy, d.max_skipped_share)
    eval_split = prepare_split("eval", d.eval_data_path, encoder, **split_kwargs) if d.eval_data_path else None
    if eval_split is not None:
        check_skipped_share("eval", eval_split.report, d.bad_sample_policy, d.max_skipped_share)
    if not train_split.samples:
        raise ArgumentError("no training sample left after validation")

    prepared = load_and_prepare(loader, card, args, overrides, processing.tokenizer)
    model = prepared.model
    notes += prepared.notes
    say(f"attention: {prepared.attention} ({prepared.attention_note})")
    say(f"dtype: {prepared.dtype_note}")
    if str(prepared.dtype) == "torch.bfloat16" and not t.fp16:
        t.bf16 = True  # bf16 weights: autocast the adapters' and the loss's matmuls to bf16 too
    for line in notes:
        say(f"note: {line}")

    media = media_config(card, d.image_folder, d.video_folder, d.max_image_pixels, d.allow_absolute_paths)
    if d.packing:
        capacity = d.max_length or max(train_split.lengths)
        train_dataset: Any = PackedDataset(train_split, card, encoder, media, capacity)
        lengths, media_flags = train_dataset.lengths, train_dataset.media_flags
        collator: Any = PackedCollator(encoder.handler, prepared.attention, mask_dtype=model.dtype)
        say(f"packing: {len(train_split.samples)} samples in {len(train_dataset)} rows of at most {capacity} tokens")
    else:
        train_dataset = conversation_dataset(train_split, card, encoder, d.image_folder, d.video_folder,
                                             d.max_image_pixels, d.allow_absolute_paths)
        lengths, media_flags = train_split.lengths, train_split.media_flags
        collator = encoder.handler
    eval_dataset = (conversation_dataset(eval_split, card, encoder, d.image_folder, d.video_folder,
                                         d.max_image_pixels, d.allow_absolute_paths)
                    if eval_split is not None else None)

    say("trainable parameters (before step 1):\n" + format_parameter_table(parameter_table(model, card), prepared.plan))
    text_only = text_only_warning(prepared.plan, train_split.media_flags)
    if text_only:
        say(f"warning: {text_only}")
    card_files = CardFiles(_card_yaml(saved_card, resolved.model_id, loader.path), args.to_dict(),
                           _moe_adapter_files(prepared))
    loss_plot = LossPlotCallback()
    guard = NonFiniteGuard()
    if resume:
        from cardtune.training.checkpoints import run_differences
        from cardtune.training.fit import check_checkpoint_fits

        check_checkpoint_fits(resume, model, run_differences(resume, args.to_dict(), _card_data(saved_card, resolved.model_id)))
    from cardtune.evaluation.during_training import GenerationDuringTraining

    generation = GenerationDuringTraining(
        eval_split.samples, args.run.eval_generate, encoder, media, max_new_tokens=args.run.eval_generate_max_new_tokens,
        batch_size=t.per_device_eval_batch_size, output_dir=output_dir if main_process else None,
        synced_gpus=t.world_size > 1) if args.run.eval_generate and eval_split is not None else None
    trainer = CardtuneTrainer(
        model=model,
        args=t,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=saved_processing.processor or saved_processing.tokenizer,
        callbacks=[loss_plot, guard],
        lengths=lengths,
        media_flags=media_flags,
        group_by_length=d.group_by_length,
        card_files=card_files,
        moe=prepared.moe,
        loss=prepared.loss,
        card=card,
        generation=generation,
    )
    check_engine(trainer)
    start_step = checkpoint_step(resume) if resume else 0
    train_started = time.perf_counter()
    try:
        with writing(output_dir, lambda: _being_written(output_dir, trainer.state.global_step)):
            result = trainer.train(resume_from_checkpoint=resume)
        guard.raise_if_stopped()
        train_s = time.perf_counter() - train_started
        metrics: dict[str, Any] = dict(result.metrics)
        evaluated = [h for h in trainer.state.log_history if "eval_loss" in h]
        if eval_dataset is not None and (not evaluated or evaluated[-1].get("step") != trainer.state.global_step):
            metrics.update(trainer.evaluate())
        elif evaluated:
            metrics["eval_loss"] = evaluated[-1]["eval_loss"]

        trainer.save_model(output_dir)  # with the card files
        moe_output = _save_moe(trainer, prepared, card_files, output_dir, card.model_class) if prepared.moe else None
        if main_process and saved_processing.processor is None and saved_processing.image_processor is not None:
            with writing(output_dir, "the image processor"):
                saved_processing.image_processor.save_pretrained(output_dir)
    except DiskFullError as exc:
        exc.hint = _after_disk_full(output_dir)
        raise
    except NonFiniteError as exc:
        exc.hint = _after_nonfinite(args, argv, exc.step, trainer.cardtune_finite_saves)
        exc.quiet = not main_process
        raise
    except KeyboardInterrupt:
        saved = complete_checkpoints(output_dir)
        stop = Interrupted(trainer.state.global_step, saved[-1] if saved else None, _continue_command(args, argv, "auto"))
        stop.quiet = not main_process
        raise stop from None
    trainer.accelerator.wait_for_everyone()
    failed_in_training = train_dataset.failures.count()
    if failed_in_training:
        say(f"data: {failed_in_training} samples failed when decoded in training and were skipped "
            f"(ids in {train_split.skipped_file})")

    unreached = trainer.cardtune_participation.report()
    if unreached:
        say(f"note: {unreached}")

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    out = Path(output_dir)
    summary = {
        "output_dir": str(out),
        "checkpoint": str(out),
        "plot": str(loss_plot.plot) if loss_plot.plot else None,
        "logs": str(out / "log_history.json"),
        "global_step": trainer.state.global_step,
        "steps_run": trainer.state.global_step - start_step,
        "resumed_from": resume,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_s": train_s,
        "skipped_in_training": failed_in_training,
        "wall_s": time.perf_counter() - started,
        "metrics": metrics,
        "moe": moe_output.note if moe_output else None,
    }
    if main_process:
        from cardtune.report.run import write_run_report

        report = write_run_report(out, history, splits={"train": train_split, "eval": eval_split},
                                  data_paths={"train": d.data_path, "eval": d.eval_data_path}, encoder=encoder,
                                  label_samples=train_split.samples, media=media, warn=say)
        summary["report"] = str(report) if report else None
    say(_closing(summary, t))
    return RunResult(summary, trainer, args)


# -- the output folder --------------------------------------------------------------------------
def finish_from_last_checkpoint(args: Arguments, checkpoint: str, started: float) -> RunResult:
    """A resume from the run's last step (its final save failed, say) trains nothing: the
    final folder is the checkpoint's model files, with the loss curve of its history."""
    from cardtune.training.checkpoints import finish_from, trainer_state
    from cardtune.training.trainer import LOG_FILE, LOSS_PLOT, plot_loss

    t = args.training
    out = Path(t.output_dir)
    state = trainer_state(checkpoint)
    if t.process_index == 0:
        copied = finish_from(checkpoint, out)
        history = state.get("log_history", [])
        with writing(out, f"{LOG_FILE} and {LOSS_PLOT}"):
            (out / LOG_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
            plot = plot_loss(history, out / LOSS_PLOT)
        _say(args, f"resume: {Path(checkpoint).name} holds the run's last step ({state['global_step']}): nothing "
             f"left to train; the final folder is written from it ({', '.join(copied)})")
        from cardtune.report.run import write_run_report

        report = write_run_report(out, history, warn=lambda message: _say(args, message))
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    summary = {
        "output_dir": str(out), "checkpoint": str(out), "plot": str(plot) if t.process_index == 0 and plot else None,
        "logs": str(out / LOG_FILE), "global_step": state["global_step"], "steps_run": 0, "resumed_from": checkpoint,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "train_s": 0.0, "skipped_in_training": 0, "wall_s": time.perf_counter() - started, "metrics": {},
        "report": str(report) if t.process_index == 0 and report else None,
    }
    _say(args, _closing(summary, t))
    return RunResult(summary, None, args)


def start_point(args: Arguments, card_data: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(checkpoint to resume from, lines to print): ``--resume_from_checkpoint`` checked against
    this run, or a fresh start, refused in a folder holding an earlier run unless
    ``--overwrite_output_dir`` (which moves the earlier run aside first)."""
    from cardtune.training.arguments import resume_requested
    from cardtune.training.checkpoints import check_fresh_start, move_earlier_run, resolve_resume

    t = args.training
    resume, lines = resolve_resume(t.resume_from_checkpoint, t.output_dir, args.to_dict(), card_data)
    if resume is not None:
        return resume, lines
    # `auto` with nothing complete to resume starts over; what an interrupted save left is no run.
    check_fresh_start(t.output_dir, args.run.overwrite_output_dir,
                      with_incomplete=not resume_requested(t.resume_from_checkpoint))
    if args.run.overwrite_output_dir:
        with t.main_process_first(local=t.save_on_each_node, desc="moving the earlier run aside"):
            moved = move_earlier_run(t.output_dir) if t.should_save else None
        if moved is not None:
            lines.append(f"--overwrite_output_dir: the earlier run in {t.output_dir} was moved to {moved}")
    return None, lines


def _being_written(output_dir: str, step: int) -> str:
    from cardtune.training.checkpoints import checkpoint_problem

    folder = Path(output_dir) / f"checkpoint-{step}"
    if folder.is_dir() and checkpoint_problem(folder):
        return f"{folder.name} (left incomplete: it is never resumed; delete it to free its space)"
    return "the run's logs and checkpoints"


def _after_disk_full(output_dir: str) -> str:
    from cardtune.training.checkpoints import complete_checkpoints

    done = complete_checkpoints(output_dir)
    start = f"continues from {done[-1].name}" if done else "starts over (no checkpoint was completed)"
    return f"Free some space there, then the same command with --resume_from_checkpoint auto {start}."


def _continue_command(args: Arguments, argv: list[str], resume: str) -> str:
    from cardtune.training.faults import train_command

    from_recipe = args.run.overwrite_output_dir and args.sources.get("overwrite_output_dir") != "command line"
    return train_command(argv, resume=resume, overwrite_from_recipe=from_recipe)


def _after_nonfinite(args: Arguments, argv: list[str], step: int, checked: set[int]) -> str:
    from cardtune.training.faults import last_good_checkpoint

    lr = f"a lower --learning_rate, say (this run's: {args.training.learning_rate:g})"
    good = last_good_checkpoint(args.training.output_dir, step, checked)
    if good is None:
        return f"No checkpoint was saved before step {step}: start over with {lr}."
    return (f"The last good checkpoint is {good}; to go on from it with {lr}: "
            f"{_continue_command(args, argv, str(good))}")


class SkipLimitError(RuntimeError):
    """``--bad_sample_policy skip`` would drop more of a split than ``--max_skipped_share``."""


def check_skipped_share(split: str, report: Any, policy: str, share: float) -> None:
    """Skipping is for the odd broken sample: a share above ``share`` means the data or an
    argument is wrong (a mistyped --image_folder loses every image), and nothing is trained."""
    if policy != "skip" or not report.num_records or report.num_bad / report.num_records <= share:
        return
    raise SkipLimitError(
        f"the {split} data: {report.num_bad} of {report.num_records} records have problems "
        f"({report.num_bad / report.num_records:.0%}), more than --max_skipped_share {share:g} ({share:.0%}) lets "
        "--bad_sample_policy skip drop; nothing was trained. Fix the data or the media folders, or raise "
        f"--max_skipped_share:\n{report.format_table(limit=20)}"
    )


def _moe_adapter_files(prepared: Any) -> dict[str, str] | None:
    """An adapter over an upcycled model carries its MoE spec (the base folder is dense)."""
    if prepared.moe is None or not prepared.plan.uses_lora:
        return None
    from cardtune.training.moe import SPEC_FILE

    return {SPEC_FILE: prepared.moe.model_dump_json(indent=2) + "\n"}


def _save_moe(trainer: Any, prepared: Any, card_files: Any, output_dir: str, card_class: str) -> Any:
    """The upcycled model's final folder: native where an architecture fits (docs/MOE.md)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from cardtune.training.moe.output import adapter_output, card_with_class, save_full_model

    if prepared.plan.uses_lora:
        return adapter_output()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # every rank: gathered under ZeRO-3
    if is_deepspeed_zero3_enabled():
        # Training is over: rank 0 builds the native model alone, which transformers would
        # otherwise partition across the ranks (a collective the others never join).
        unset_hf_deepspeed_config()
    saved = None
    if trainer.args.process_index == 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        with writing(output_dir, "the model in its MoE architecture"):
            saved = save_full_model(model, prepared.moe, output_dir, state=state, card_class=card_class, written=True)
            if saved.model_class:  # a text model saved as Mixtral / Qwen2-MoE: its card names the class
                card_files.card_yaml = card_with_class(card_files.card_yaml, saved.model_class)
                card_files.write(output_dir)
    trainer.accelerator.wait_for_everyone()
    return saved


def _card_data(card: FamilyCard, model_id: str) -> dict[str, Any]:
    """The card as trained: the family with only this model's entry."""
    data = card.model_dump(mode="json", exclude_defaults=True)
    data["models"] = [m for m in data["models"] if m["model_id"] == model_id] or data["models"][:1]
    return data


def _card_yaml(card: FamilyCard, model_id: str, weights: str) -> str:
    import yaml

    header = f"# The card this model was trained with: model id {model_id}, base weights from {weights}.\n"
    return header + yaml.safe_dump(_card_data(card, model_id), sort_keys=False, allow_unicode=True)


def _closing(summary: dict[str, Any], t: Any) -> str:
    run, step = summary["steps_run"], summary["global_step"]
    steps = f"{run} step{'s' if run != 1 else ''}"
    if summary["resumed_from"]:
        steps += f" (global step {step}, resumed from {Path(summary['resumed_from']).name})"
    lines = ["", f"done: {steps} in {summary['train_s']:.1f}s (wall {summary['wall_s']:.1f}s)"]
    if summary["loss_first"] is not None:
        lines.append(f"loss: {summary['loss_first']:.3f} (first logged) -> {summary['loss_last']:.3f} (last logged)")
    if "eval_loss" in summary["metrics"]:
        lines.append(f"eval loss: {summary['metrics']['eval_loss']:.3f}")
    if summary.get("moe"):
        lines.append(f"moe: {summary['moe']}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    if summary["plot"]:
        lines.append(f"loss plot:  {summary['plot']}")
    else:
        lines.append(f"loss plot:  none (no loss was logged: --logging_steps {t.logging_steps:g})")
    if summary.get("report"):
        lines.append(f"report:     {summary['report']}")
    logs = summary["logs"]
    if t.report_to and "tensorboard" in t.report_to:
        logs += f" (tensorboard: {t.logging_dir or Path(summary['output_dir']) / 'runs'})"
    lines.append(f"logs:       {logs}")
    return "\n".join(lines)


def _data_stop() -> type[BaseException]:
    """``DataStop``, once the module that raises it is loaded: importing it imports torch, which
    ``--help`` and an unknown option are answered without (an except clause is evaluated only
    when an exception reaches it)."""
    module = sys.modules.get("cardtune.training.data")
    return module.DataStop if module is not None else SkipLimitError


def main(argv: Sequence[str] | None = None) -> int:
    from cardtune.training.faults import Interrupted, NonFiniteError
    from cardtune.training.lock import FolderInUseError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default", category=UserWarning)
    plain_cardtune_warnings()
    try:
        run(argv)
        _leave_the_process_group()
    except (_data_stop(), SkipLimitError, DiskFullError, NonFiniteError, FolderInUseError) as exc:
        if not getattr(exc, "quiet", False):
            print(f"train: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        if not getattr(exc, "quiet", False):
            print(f"train: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("train: interrupted (Ctrl-C) before training started; nothing new was saved", file=sys.stderr)
        return 130
    except (ArgumentError, CardError, UnknownModelError, CapabilityError, TemplateProbeError, InputFileError,
            RenderTimeout) as exc:
        for line in getattr(exc, "context", ()):  # where the values came from, before what is wrong with them
            print(line, flush=True)
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


def _leave_the_process_group() -> None:
    """Every rank leaves a multi-process run together (a barrier, then the group torn down):
    a rank that exits while another still writes the final folder can abort in its exit
    ("terminate called without an active exception") and fail the launch."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
