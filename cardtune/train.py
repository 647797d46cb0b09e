"""Finetune a registered model: ``python train.py --model_id llava-1.5-7b --data_path d.json ...``.

A run is its stages, in order; :func:`run` and :func:`train_in_held_folder` read as their table
of contents, each stage a function given what it needs:

1. :func:`check_run`: the arguments (command line over ``--config``), the model resolved to its
   card, and everything given checked before anything loads;
2. the output folder held (one run at a time) and :func:`resume_point`: where training starts;
3. :func:`open_encoding`: the tokenizer/processor with the card's fix-ups, and the encoder;
4. :func:`prepare_data`: every sample validated and encoded once (``--bad_sample_policy``);
5. :func:`prepare_model`: the model loaded (dtype, attention kernel) and prepared (full, LoRA,
   QLoRA, frozen parts);
6. :func:`build_trainer`: ``transformers.Trainer`` with the method's datasets, collator and loss;
7. :func:`fit`: training, then a plain Hugging Face folder: weights or adapter, processor, the
   resolved card (``cardtune_card.yaml``), the arguments (``cardtune_args.json``), the loss curve;
8. :func:`finish`: the run's summary, ``report.html`` and its closing lines.

What differs between training methods (``--method sft``, ``dpo``) is each method's own, in one
place (:mod:`cardtune.training.methods`): its datasets, collator, loss and logged figures.

``python train.py --model_id tiny-llava-demo`` trains the embedded demo with no other argument.

The module is longer than most (about 600 lines) because it is the list of stages itself: each
is short and reads the products of the ones before, and what they call lives below
(``training.settle``: the arguments the run settles; ``training.outcome``: how a run ends).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cardtune.chat.render_limit import RenderTimeout
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
from cardtune.training.outcome import card_data, card_yaml, closing, say
from cardtune.training.settle import (  # noqa: F401  (default_num_workers: re-exported for tests)
    check_engine,
    default_num_workers,
    settle_training_arguments,
)
from cardtune.training.template import card_with_template
from cardtune.training.writes import DiskFullError, writing

log = logging.getLogger("cardtune.train")


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


def demo_data(args: Arguments, card: FamilyCard, files: tuple[str, str] | None = None) -> str | None:
    """The demo dataset as default data for a ``loader: demo`` model; ``files``: its (train,
    eval) files for the run's method (default: the conversations)."""
    d = args.data
    if d.data_path is not None:
        return None
    if card.loader != "demo":
        raise ArgumentError("give --data_path (LLaVA or OpenAI-messages JSON/JSONL, or a mix YAML)")
    from cardtune.demo import EVAL_FILE, IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset

    train_file, eval_file = files or (TRAIN_FILE, EVAL_FILE)
    folder = ensure_demo_dataset()
    d.data_path = str(folder / train_file)
    if d.eval_data_path is None:
        d.eval_data_path = str(folder / eval_file)
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
        say(args, line)
    the_run = check_run(args, argv, started)
    from cardtune.training.lock import holding

    t = args.training
    # Held from here to the end (refused while another run holds it): also the check that it can be written.
    with holding(t.output_dir, t.process_index == 0, the_run.say):
        return train_in_held_folder(the_run)


def train_in_held_folder(the_run: Run) -> RunResult:
    """The run once its output folder is its own: where it starts, the data, the model, training."""
    from cardtune.training.optional_cache import usable_cache

    cache = usable_cache(the_run.args.data.data_cache, the_run.say)  # before any data is read
    start = resume_point(the_run)
    if start.finished:
        from cardtune.report.run import write_run_report
        from cardtune.training.outcome import finish_from_last_checkpoint

        return RunResult(finish_from_last_checkpoint(the_run.args, start.checkpoint, the_run.started,
                                                     write_run_report), None, the_run.args)
    encoding = open_encoding(the_run, start)
    splits = prepare_data(the_run, encoding, cache)
    prepared = prepare_model(the_run, encoding)
    training = build_trainer(the_run, encoding, splits, prepared, start)
    outcome = fit(the_run, training, encoding, start)
    return finish(the_run, training, encoding, splits, outcome, start)


@dataclasses.dataclass
class Run:
    """What every stage of one run reads: its arguments, method, resolved model and notes."""

    args: Arguments
    argv: list[str]
    method: Any
    resolved: Any
    overrides: dict[str, Any]
    family: Any
    """The model as its family writes it, where ``--template plain`` changed this run's card."""
    demo_folder: str | None
    notes: list[str]
    started: float

    def say(self, message: str) -> None:
        say(self.args, message)

    @property
    def main_process(self) -> bool:
        return self.args.training.process_index == 0

    @property
    def saved_card(self) -> FamilyCard:
        """The card the output keeps: plain is this run's pretraining format, and the next stage
        (conversations) loads the folder with the family's chat template."""
        return self.family.card if self.family is not None else self.resolved.card

    def card_data(self) -> dict[str, Any]:
        return card_data(self.saved_card, self.resolved.model_id)


def check_run(args: Arguments, argv: list[str], started: float) -> Run:
    """The model resolved and everything given checked, before anything loads: the model folder
    and its weights, QLoRA and packing on this card, the media folders, the data paths; the
    training arguments the run settles."""
    from cardtune.inputs import check_data_paths, check_model, check_model_path
    from cardtune.training.methods import method_named

    method = method_named(args.tune.method)
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
    demo_folder = demo_data(args, card, method.demo_files)
    for data_path in (args.data.data_path, args.data.eval_data_path):
        if data_path is not None:
            check_data_paths(data_path)
    notes = settle_training_arguments(args) + list(resolved.notes)
    family = resolve_family(args)[0] if args.model.template == "plain" else None
    return Run(args, argv, method, resolved, overrides, family, demo_folder, notes, started)


@dataclasses.dataclass
class Start:
    """Where training starts: the checkpoint resumed (None: step 0) and what to say about it."""

    checkpoint: str | None
    lines: list[str]
    step: int = 0
    """The checkpoint's step (read now: checkpoint rotation may delete it during training)."""
    finished: bool = False
    """The checkpoint holds the run's last step: nothing is left to train."""


def resume_point(the_run: Run) -> Start:
    """Where the run starts, decided before anything is written into the output folder."""
    from cardtune.training.checkpoints import checkpoint_step, run_is_finished

    t = the_run.args.training
    checkpoint, lines = start_point(the_run.args, the_run.card_data())
    if checkpoint is None:
        return Start(None, lines)
    finished = run_is_finished(checkpoint, t.max_steps, t.num_train_epochs)
    if finished:
        for line in lines:
            the_run.say(line)
    return Start(checkpoint, lines, checkpoint_step(checkpoint), finished)


@dataclasses.dataclass
class Encoding:
    """The model's folder, its tokenizer/processor, and what encodes one record for the method."""

    loader: Any
    processing: Any
    saved_processing: Any
    """What the output folder keeps (the family's, where ``--template plain`` changed this run's)."""
    encoder: Any


def open_encoding(the_run: Run, start: Start) -> Encoding:
    """The seed and threads set, what the run trains said, the tokenizer/processor loaded with the
    card's fix-ups, and the method's encoder over the model's own chat template."""
    from transformers import set_seed

    from cardtune.data.max_length import length_note, limited_encoder
    from cardtune.training.model import cuda_available

    args, card, resolved, say = the_run.args, the_run.resolved.card, the_run.resolved, the_run.say
    t = args.training
    set_seed(t.seed)
    if args.model.cpu_threads and (t.use_cpu or not cuda_available()):
        import torch

        torch.set_num_threads(args.model.cpu_threads)
    loader = folder_loader(resolved)
    say(f"cardtune: {resolved.model_id} (family {card.family}) from {loader.path}")
    if card.status == "experimental":
        say(f"warning: family {card.family} is experimental (card: status: experimental)"
            + (f": {card.status_note}" if card.status_note else ""))
    if the_run.demo_folder:
        say(f"data: the demo dataset in {the_run.demo_folder}")
    for line in start.lines:
        say(line)

    try:
        processing = loader.load_processing()
    except OSError as exc:  # the hub unreachable, a folder missing its tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{loader.path}: cannot load the tokenizer/processor: {first}") from None
    the_run.notes.extend(processing.notes)
    saved_processing = folder_loader(the_run.family).load_processing() if the_run.family is not None else processing
    d = args.data
    engine = limited_encoder(card, processing, loader.path, max_length=d.max_length, revision=resolved.revision,
                             config_overrides=the_run.overrides, typed_control_tokens=d.typed_control_tokens)
    if d.max_length is None and engine.limit is not None:
        the_run.notes.append(f"length limit: {engine.limit.tokens} tokens ({engine.limit.origin}); a longer sample "
                             "is too_long (--max_length cuts such samples instead)")
    above_limit = length_note(d.max_length, engine.limit)
    if above_limit:
        the_run.notes.append(above_limit)
    return Encoding(loader, processing, saved_processing, the_run.method.encoder(engine))


@dataclasses.dataclass
class Splits:
    train: Any
    eval: Any | None


def prepare_data(the_run: Run, encoding: Encoding, cache: str | None) -> Splits:
    """Each split read, validated (every sample encoded once) and the policy applied; a split
    that would lose more than ``--max_skipped_share`` stops the run before step 1."""
    from cardtune.training.data import prepare_split

    args = the_run.args
    d, t = args.data, args.training
    split_kwargs = dict(card=the_run.resolved.card, image_folder=d.image_folder, video_folder=d.video_folder,
                        allow_absolute_paths=d.allow_absolute_paths, policy=d.bad_sample_policy,
                        output_dir=t.output_dir if the_run.main_process else None,
                        seed=t.seed, log=the_run.say, check_media=d.check_media, max_image_pixels=d.max_image_pixels,
                        num_workers=d.validation_workers, cache=cache,
                        role_keys={"user_key": d.user_key, "assistant_key": d.assistant_key},
                        settings=the_run.method.cache_settings())
    train_split = prepare_split("train", d.data_path, encoding.encoder, **split_kwargs)
    check_skipped_share("train", train_split.report, d.bad_sample_policy, d.max_skipped_share)
    eval_split = prepare_split("eval", d.eval_data_path, encoding.encoder, **split_kwargs) if d.eval_data_path else None
    if eval_split is not None:
        check_skipped_share("eval", eval_split.report, d.bad_sample_policy, d.max_skipped_share)
    if not train_split.samples:
        raise ArgumentError("no training sample left after validation")
    return Splits(train_split, eval_split)


def prepare_model(the_run: Run, encoding: Encoding) -> Any:
    """The model loaded and prepared as the card and the flags say; the run's notes said."""
    from cardtune.training.model import load_and_prepare

    args, say = the_run.args, the_run.say
    prepared = load_and_prepare(encoding.loader, the_run.resolved.card, args, the_run.overrides,
                                encoding.processing.tokenizer)
    the_run.notes.extend(prepared.notes)
    say(f"attention: {prepared.attention} ({prepared.attention_note})")
    say(f"dtype: {prepared.dtype_note}")
    if str(prepared.dtype) == "torch.bfloat16" and not args.training.fp16:
        args.training.bf16 = True  # bf16 weights: autocast the adapters' and the loss's matmuls to bf16 too
    for line in the_run.notes:
        say(f"note: {line}")
    return prepared


@dataclasses.dataclass
class Training:
    """The Trainer and what the run reads back from it at the end."""

    trainer: Any
    data: Any
    """The method's :class:`~cardtune.training.methods.TrainingData`."""
    prepared: Any
    card_files: Any
    loss_plot: Any
    guard: Any
    media: Any


def build_trainer(the_run: Run, encoding: Encoding, splits: Splits, prepared: Any, start: Start) -> Training:
    """The method's datasets, collator and Trainer, with the callbacks every run has (loss curve,
    a stop at numbers that are not finite, the card files in every checkpoint)."""
    from cardtune.evaluation.during_training import GenerationDuringTraining
    from cardtune.training.data import media_config
    from cardtune.training.model import format_parameter_table, parameter_table
    from cardtune.training.outcome import moe_adapter_files
    from cardtune.training.participation import text_only_warning
    from cardtune.training.trainer import CardFiles, LossPlotCallback, NonFiniteGuard

    args, say, card = the_run.args, the_run.say, the_run.resolved.card
    d, t = args.data, args.training
    media = media_config(card, d.image_folder, d.video_folder, d.max_image_pixels, d.allow_absolute_paths)
    data = the_run.method.data(splits, encoding.encoder, media, prepared, args)
    if data.note:
        say(data.note)
    model = prepared.model
    for line in the_run.method.describe(prepared, args):
        say(line)
    say("trainable parameters (before step 1):\n" + format_parameter_table(parameter_table(model, card), prepared.plan))
    text_only = text_only_warning(prepared.plan, splits.train.media_flags)
    if text_only:
        say(f"warning: {text_only}")
    card_files = CardFiles(card_yaml(the_run.saved_card, the_run.resolved.model_id, encoding.loader.path),
                           args.to_dict(), moe_adapter_files(prepared))
    loss_plot, guard = LossPlotCallback(), NonFiniteGuard()
    if start.checkpoint:
        from cardtune.training.checkpoints import run_differences
        from cardtune.training.fit import check_checkpoint_fits

        check_checkpoint_fits(start.checkpoint, model, run_differences(start.checkpoint, args.to_dict(), the_run.card_data()))
    eval_split = splits.eval
    generation = GenerationDuringTraining(
        eval_split.samples, args.run.eval_generate, getattr(encoding.encoder, "engine", encoding.encoder), media,
        max_new_tokens=args.run.eval_generate_max_new_tokens, batch_size=t.per_device_eval_batch_size,
        output_dir=t.output_dir if the_run.main_process else None,
        synced_gpus=t.world_size > 1) if args.run.eval_generate and eval_split is not None else None
    trainer = the_run.method.trainer(
        prepared, args,
        model=model,
        args=t,
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=encoding.saved_processing.processor or encoding.saved_processing.tokenizer,
        callbacks=[loss_plot, guard],
        lengths=data.lengths,
        media_flags=data.media_flags,
        group_by_length=d.group_by_length,
        card_files=card_files,
        moe=prepared.moe,
        loss=prepared.loss,
        card=card,
        generation=generation,
    )
    check_engine(trainer)
    return Training(trainer, data, prepared, card_files, loss_plot, guard, media)


@dataclasses.dataclass
class Outcome:
    metrics: dict[str, Any]
    train_s: float
    moe: Any


def fit(the_run: Run, training: Training, encoding: Encoding, start: Start) -> Outcome:
    """Train, evaluate at the last step, and write the final folder; a full disk, a number that
    is not finite and Ctrl-C end the run saying what was saved and what to do next."""
    from cardtune.training.checkpoints import complete_checkpoints
    from cardtune.training.faults import Interrupted, NonFiniteError
    from cardtune.training.outcome import (
        after_disk_full,
        after_nonfinite,
        being_written,
        continue_command,
        save_moe,
    )

    args, trainer, prepared = the_run.args, training.trainer, training.prepared
    output_dir = args.training.output_dir
    main_process = the_run.main_process
    train_started = time.perf_counter()
    try:
        with writing(output_dir, lambda: being_written(output_dir, trainer.state.global_step)):
            result = trainer.train(resume_from_checkpoint=start.checkpoint)
        training.guard.raise_if_stopped()
        train_s = time.perf_counter() - train_started
        metrics: dict[str, Any] = dict(result.metrics)
        evaluated = [h for h in trainer.state.log_history if "eval_loss" in h]
        if training.data.eval is not None and (not evaluated or evaluated[-1].get("step") != trainer.state.global_step):
            metrics.update(trainer.evaluate())
        elif evaluated:
            metrics["eval_loss"] = evaluated[-1]["eval_loss"]

        trainer.save_model(output_dir)  # with the card files
        card = the_run.resolved.card
        moe = save_moe(trainer, prepared, training.card_files, output_dir, card.model_class) if prepared.moe else None
        saved = encoding.saved_processing
        if main_process and saved.processor is None and saved.image_processor is not None:
            with writing(output_dir, "the image processor"):
                saved.image_processor.save_pretrained(output_dir)
    except DiskFullError as exc:
        exc.hint = after_disk_full(output_dir)
        raise
    except NonFiniteError as exc:
        exc.hint = after_nonfinite(args, the_run.argv, exc.step, trainer.cardtune_finite_saves)
        exc.quiet = not main_process
        raise
    except KeyboardInterrupt:
        saved_checkpoints = complete_checkpoints(output_dir)
        stop = Interrupted(trainer.state.global_step, saved_checkpoints[-1] if saved_checkpoints else None,
                           continue_command(args, the_run.argv, "auto"))
        stop.quiet = not main_process
        raise stop from None
    trainer.accelerator.wait_for_everyone()
    return Outcome(metrics, train_s, moe)


def finish(the_run: Run, training: Training, encoding: Encoding, splits: Splits, outcome: Outcome,
           start: Start) -> RunResult:
    """What training found in the data and the batches, the run's summary and report, and its
    closing lines."""
    args, say, trainer = the_run.args, the_run.say, training.trainer
    d, t = args.data, args.training
    failed_in_training = training.data.train.failures.count()
    if failed_in_training:
        say(f"data: {failed_in_training} samples failed when decoded in training and were skipped "
            f"(ids in {splits.train.skipped_file})")
    unreached = trainer.cardtune_participation.report()
    if unreached:
        say(f"note: {unreached}")

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    out = Path(t.output_dir)
    summary = {
        "output_dir": str(out),
        "checkpoint": str(out),
        "plot": str(training.loss_plot.plot) if training.loss_plot.plot else None,
        "logs": str(out / "log_history.json"),
        "global_step": trainer.state.global_step,
        "steps_run": trainer.state.global_step - start.step,
        "resumed_from": start.checkpoint,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "train_s": outcome.train_s,
        "skipped_in_training": failed_in_training,
        "wall_s": time.perf_counter() - the_run.started,
        "metrics": outcome.metrics,
        "moe": outcome.moe.note if outcome.moe else None,
    }
    if the_run.main_process:
        from cardtune.report.run import write_run_report

        report = write_run_report(out, history, splits={"train": splits.train, "eval": splits.eval},
                                  data_paths={"train": d.data_path, "eval": d.eval_data_path}, encoder=encoding.encoder,
                                  label_samples=splits.train.samples, media=training.media, warn=say)
        summary["report"] = str(report) if report else None
    say(closing(summary, t, the_run.method.closing_lines(history)))
    return RunResult(summary, trainer, args)


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
