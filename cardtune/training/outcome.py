"""How a run ends: its closing lines, the final folder of a run resumed at its last step, the
MoE model's final folder, the card files it writes, and what to do next after a full disk, a
number that is not finite or Ctrl-C.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cardtune.registry import FamilyCard
from cardtune.training.arguments import Arguments
from cardtune.training.writes import writing


def say(args: Arguments | None, message: str) -> None:
    """Print on the main process only (every rank runs this code)."""
    if args is None or args.training.process_index == 0:
        print(message, flush=True)


def finish_from_last_checkpoint(args: Arguments, checkpoint: str, started: float,
                                write_report: Callable[..., Path | None]) -> dict[str, Any]:
    """A resume from the run's last step (its final save failed, say) trains nothing: the
    final folder is the checkpoint's model files, with the loss curve of its history and the
    page ``write_report(out, history, warn=...)`` writes (the report layer sits above training).
    Returns the run's summary."""
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
        say(args, f"resume: {Path(checkpoint).name} holds the run's last step ({state['global_step']}): nothing "
             f"left to train; the final folder is written from it ({', '.join(copied)})")
        report = write_report(out, history, warn=lambda message: say(args, message))
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    summary = {
        "output_dir": str(out), "checkpoint": str(out), "plot": str(plot) if t.process_index == 0 and plot else None,
        "logs": str(out / LOG_FILE), "global_step": state["global_step"], "steps_run": 0, "resumed_from": checkpoint,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "train_s": 0.0, "skipped_in_training": 0, "wall_s": time.perf_counter() - started, "metrics": {},
        "report": str(report) if t.process_index == 0 and report else None,
    }
    say(args, closing(summary, t))
    return summary


def being_written(output_dir: str, step: int) -> str:
    from cardtune.training.checkpoints import checkpoint_problem

    folder = Path(output_dir) / f"checkpoint-{step}"
    if folder.is_dir() and checkpoint_problem(folder):
        return f"{folder.name} (left incomplete: it is never resumed; delete it to free its space)"
    return "the run's logs and checkpoints"


def after_disk_full(output_dir: str) -> str:
    from cardtune.training.checkpoints import complete_checkpoints

    done = complete_checkpoints(output_dir)
    start = f"continues from {done[-1].name}" if done else "starts over (no checkpoint was completed)"
    return f"Free some space there, then the same command with --resume_from_checkpoint auto {start}."


def continue_command(args: Arguments, argv: list[str], resume: str) -> str:
    from cardtune.training.faults import train_command

    from_recipe = args.run.overwrite_output_dir and args.sources.get("overwrite_output_dir") != "command line"
    return train_command(argv, resume=resume, overwrite_from_recipe=from_recipe)


def after_nonfinite(args: Arguments, argv: list[str], step: int, checked: set[int]) -> str:
    from cardtune.training.faults import last_good_checkpoint

    lr = f"a lower --learning_rate, say (this run's: {args.training.learning_rate:g})"
    good = last_good_checkpoint(args.training.output_dir, step, checked)
    if good is None:
        return f"No checkpoint was saved before step {step}: start over with {lr}."
    return (f"The last good checkpoint is {good}; to go on from it with {lr}: "
            f"{continue_command(args, argv, str(good))}")


def moe_adapter_files(prepared: Any) -> dict[str, str] | None:
    """An adapter over an upcycled model carries its MoE spec (the base folder is dense)."""
    if prepared.moe is None or not prepared.plan.uses_lora:
        return None
    from cardtune.training.moe import SPEC_FILE

    return {SPEC_FILE: prepared.moe.model_dump_json(indent=2) + "\n"}


def save_moe(trainer: Any, prepared: Any, card_files: Any, output_dir: str, card_class: str) -> Any:
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


def card_data(card: FamilyCard, model_id: str) -> dict[str, Any]:
    """The card as trained: the family with only this model's entry."""
    data = card.model_dump(mode="json", exclude_defaults=True)
    data["models"] = [m for m in data["models"] if m["model_id"] == model_id] or data["models"][:1]
    return data


def card_yaml(card: FamilyCard, model_id: str, weights: str) -> str:
    import yaml

    header = f"# The card this model was trained with: model id {model_id}, base weights from {weights}.\n"
    return header + yaml.safe_dump(card_data(card, model_id), sort_keys=False, allow_unicode=True)


def closing(summary: dict[str, Any], t: Any, figures: list[str] | tuple[str, ...] = ()) -> str:
    """The run's closing lines; ``figures``: what its method says of its logged figures."""
    run, step = summary["steps_run"], summary["global_step"]
    steps = f"{run} step{'s' if run != 1 else ''}"
    if summary["resumed_from"]:
        steps += f" (global step {step}, resumed from {Path(summary['resumed_from']).name})"
    lines = ["", f"done: {steps} in {summary['train_s']:.1f}s (wall {summary['wall_s']:.1f}s)"]
    if summary["loss_first"] is not None:
        lines.append(f"loss: {summary['loss_first']:.3f} (first logged) -> {summary['loss_last']:.3f} (last logged)")
    if "eval_loss" in summary["metrics"]:
        lines.append(f"eval loss: {summary['metrics']['eval_loss']:.3f}")
    lines += figures
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
