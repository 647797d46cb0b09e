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
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cardtune.registry import CapabilityError, CardError, FamilyCard, UnknownModelError
from cardtune.training.arguments import ArgumentError, Arguments, parse_arguments

log = logging.getLogger("cardtune.train")

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _say(args: Arguments | None, message: str) -> None:
    """Print on the main process only (every rank runs this code)."""
    if args is None or args.training.process_index == 0:
        print(message, flush=True)


# -- card -----------------------------------------------------------------------------------------
def card_with_template(card: FamilyCard, template: str | None) -> FamilyCard:
    """``--template``: a kind the card schema knows (own, plain, declarative) or a Jinja file."""
    if not template:
        return card
    chat = card.chat.model_dump()
    kinds = ("own", "plain", "declarative")
    if template in kinds:
        chat.update(template=template, jinja=None)
        if template != "declarative":
            chat["declarative"] = None
        if template == "plain":
            chat["end_of_turn"] = None  # the plain template writes eos itself
    elif Path(template).is_file():
        chat.update(template="jinja", jinja=Path(template).read_text(encoding="utf-8"), declarative=None)
    else:
        raise ArgumentError(f"--template {template}: neither a template kind ({', '.join(kinds)}) nor a Jinja file")
    return FamilyCard.model_validate({**card.model_dump(), "chat": chat})


def resolve(args: Arguments) -> tuple[Any, dict[str, Any]]:
    """The model's card with ``--template`` applied, its folder, and its config overrides."""
    resolved, overrides = resolve_family(args)
    return dataclasses.replace(resolved, card=card_with_template(resolved.card, args.model.template)), overrides


def resolve_family(args: Arguments) -> tuple[Any, dict[str, Any]]:
    """The model's card as its family writes it (no ``--template``): the card the output keeps.

    ``--model_path`` alone on a folder an earlier run wrote reads the card it was trained with.
    """
    from cardtune.loaders.resolve import Resolved, resolve_model
    from cardtune.registry import get_registry
    from cardtune.training.output import CARD_FILE, read_card

    m = args.model
    if m.model_id is None and m.model_path is not None and (Path(m.model_path) / CARD_FILE).is_file():
        card = read_card(m.model_path)
        note = f"card: {Path(m.model_path) / CARD_FILE} (the card this folder was trained with)"
        return Resolved(card.models[0].model_id, card, str(m.model_path), notes=[note]), {}
    resolved = resolve_model(m.model_id, m.model_path, m.cards)
    overrides = get_registry(m.cards).get(m.model_id).config_overrides if m.model_id else dict(resolved.card.config_overrides)
    return resolved, overrides


def folder_loader(resolved: Any) -> Any:
    """The card's loader, unless it replaces the folder given (the demo loader builds its own):
    a local folder, e.g. an earlier stage's output, is a plain Hugging Face folder that the
    generic loader reads, as ``cardtune chat`` and ``merge`` do."""
    from cardtune.loaders.generic import GenericLoader

    loader = resolved.loader()
    if Path(resolved.path).is_dir() and Path(loader.path).resolve() != Path(resolved.path).resolve():
        return GenericLoader(resolved.card, resolved.path)
    return loader


# -- arguments the run settles ------------------------------------------------------------------
def settle_training_arguments(args: Arguments) -> list[str]:
    """Settings the run needs whatever the user wrote; returns what was changed and why."""
    t = args.training
    notes: list[str] = []
    if t.remove_unused_columns:
        # Items are encoded samples, not dataset columns: nothing to remove.
        t.remove_unused_columns = False
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
    return notes


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
    """What a run wrote and measured; ``trainer`` holds the trained model."""

    summary: dict[str, Any]
    trainer: Any
    args: Arguments


def run(argv: Sequence[str] | None = None) -> RunResult:
    """Train; returns where things were written, the run's figures and the trainer."""
    started = time.perf_counter()
    args = parse_arguments(argv)
    resolved, overrides = resolve(args)
    card = resolved.card
    if args.tune.q_lora:
        from cardtune.training.model import check_qlora_possible

        check_qlora_possible(card)  # before anything loads
    if args.data.packing:
        from cardtune.training.model import check_capability

        check_capability(card, "packing", "packing")  # unsupported: an error; experimental: a warning
    demo_folder = demo_data(args, card)
    notes = settle_training_arguments(args)
    for line in resolved.notes:
        notes.append(line)

    from transformers import set_seed

    from cardtune.collators.engine import ChatEncoder
    from cardtune.training.data import (
        PackedCollator,
        PackedDataset,
        conversation_dataset,
        media_config,
        prepare_split,
    )
    from cardtune.training.model import format_parameter_table, load_and_prepare, parameter_table
    from cardtune.training.trainer import (
        CardFilesCallback,
        CardtuneTrainer,
        LossPlotCallback,
        complete_checkpoints,
        resolve_resume,
    )

    t = args.training
    main_process = t.process_index == 0
    say = lambda message: _say(args, message)  # noqa: E731
    set_seed(t.seed)
    if args.model.cpu_threads and (t.use_cpu or not _cuda()):
        import torch

        torch.set_num_threads(args.model.cpu_threads)
    loader = folder_loader(resolved)
    say(f"cardtune: {resolved.model_id} (family {card.family}) from {loader.path}")
    if demo_folder:
        say(f"data: the demo dataset in {demo_folder}")
    for source in sorted(set(args.sources.values())):
        keys = sorted(k for k, v in args.sources.items() if v == source)
        say(f"arguments from {source}: {', '.join(keys)}")

    processing = loader.load_processing()
    for line in processing.notes:
        notes.append(line)
    saved_card, saved_processing = card, processing
    if args.model.template == "plain":
        # plain is this run's pretraining format: the output keeps the family's chat template,
        # so the next stage (conversations) loads the folder with the template it needs.
        family, _ = resolve_family(args)
        saved_card, saved_processing = family.card, folder_loader(family).load_processing()
    d = args.data
    encoder = ChatEncoder(card, processing, max_length=d.max_length)
    output_dir = t.output_dir
    split_kwargs = dict(card=card, image_folder=d.image_folder, video_folder=d.video_folder,
                        policy=d.bad_sample_policy, output_dir=output_dir if main_process else None,
                        seed=t.seed, log=say, check_media=d.check_media, max_image_pixels=d.max_image_pixels,
                        num_workers=d.validation_workers, cache=d.data_cache)
    train_split = prepare_split("train", d.data_path, encoder, **split_kwargs)
    eval_split = prepare_split("eval", d.eval_data_path, encoder, **split_kwargs) if d.eval_data_path else None
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

    media = media_config(card, d.image_folder, d.video_folder, d.max_image_pixels)
    if d.packing:
        capacity = d.max_length or max(train_split.lengths)
        train_dataset: Any = PackedDataset(train_split, card, encoder, media, capacity)
        lengths, media_flags = train_dataset.lengths, train_dataset.media_flags
        collator: Any = PackedCollator(encoder.handler, prepared.attention, mask_dtype=model.dtype)
        say(f"packing: {len(train_split.samples)} samples in {len(train_dataset)} rows of at most {capacity} tokens")
    else:
        train_dataset = conversation_dataset(train_split, card, encoder, d.image_folder, d.video_folder, d.max_image_pixels)
        lengths, media_flags = train_split.lengths, train_split.media_flags
        collator = encoder.handler
    eval_dataset = (conversation_dataset(eval_split, card, encoder, d.image_folder, d.video_folder, d.max_image_pixels)
                    if eval_split is not None else None)

    say("trainable parameters (before step 1):\n" + format_parameter_table(parameter_table(model, card), prepared.plan))
    card_yaml = _card_yaml(saved_card, resolved.model_id, loader.path)
    arguments = args.to_dict()
    card_files = CardFilesCallback(card_yaml, arguments)
    trainer = CardtuneTrainer(
        model=model,
        args=t,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=saved_processing.processor or saved_processing.tokenizer,
        callbacks=[card_files, LossPlotCallback()],
        lengths=lengths,
        media_flags=media_flags,
        group_by_length=d.group_by_length,
    )
    resume, resume_note = resolve_resume(t.resume_from_checkpoint, output_dir)
    if resume_note:
        say(resume_note)
    elif complete_checkpoints(output_dir):
        say(f"note: {output_dir} holds checkpoints from an earlier run; this run starts from step 0 "
            "(--resume_from_checkpoint auto continues the latest)")
    train_started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - train_started
    metrics: dict[str, Any] = dict(result.metrics)
    evaluated = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_dataset is not None and (not evaluated or evaluated[-1].get("step") != trainer.state.global_step):
        metrics.update(trainer.evaluate())
    elif evaluated:
        metrics["eval_loss"] = evaluated[-1]["eval_loss"]

    trainer.save_model(output_dir)
    if main_process:
        card_files.write(output_dir)
        if saved_processing.processor is None and saved_processing.image_processor is not None:
            saved_processing.image_processor.save_pretrained(output_dir)
    trainer.accelerator.wait_for_everyone()
    failed_in_training = train_dataset.failures.count()
    if failed_in_training:
        say(f"data: {failed_in_training} samples failed when decoded in training and were skipped "
            f"(ids in {train_split.skipped_file})")

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    out = Path(output_dir)
    summary = {
        "output_dir": str(out),
        "checkpoint": str(out),
        "plot": str(out / "loss.png"),
        "logs": str(out / "log_history.json"),
        "global_step": trainer.state.global_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_s": train_s,
        "skipped_in_training": failed_in_training,
        "wall_s": time.perf_counter() - started,
        "metrics": metrics,
    }
    say(_closing(summary, t))
    return RunResult(summary, trainer, args)


def _card_yaml(card: FamilyCard, model_id: str, weights: str) -> str:
    """The card as trained: the family with only this model's entry."""
    import yaml

    data = card.model_dump(mode="json", exclude_defaults=True)
    data["models"] = [m for m in data["models"] if m["model_id"] == model_id] or data["models"][:1]
    header = f"# The card this model was trained with: model id {model_id}, base weights from {weights}.\n"
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _closing(summary: dict[str, Any], t: Any) -> str:
    lines = ["", f"done: {summary['global_step']} steps in {summary['train_s']:.1f}s "
             f"(wall {summary['wall_s']:.1f}s)"]
    if summary["loss_first"] is not None:
        lines.append(f"loss: {summary['loss_first']:.3f} (first logged) -> {summary['loss_last']:.3f} (last logged)")
    if "eval_loss" in summary["metrics"]:
        lines.append(f"eval loss: {summary['metrics']['eval_loss']:.3f}")
    lines.append(f"checkpoint: {summary['checkpoint']}")
    lines.append(f"loss plot:  {summary['plot']}")
    logs = summary["logs"]
    if t.report_to and "tensorboard" in t.report_to:
        logs += f" (tensorboard: {t.logging_dir or Path(summary['output_dir']) / 'runs'})"
    lines.append(f"logs:       {logs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from cardtune.training.data import DataStop

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("default", category=UserWarning)
    try:
        run(argv)
    except DataStop as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    except (ArgumentError, CardError, UnknownModelError, CapabilityError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
