"""``cardtune labels`` and ``cardtune inspect``: the exact labels a model would train on."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

from cardtune.cli import Handler, command


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_id", "--model-id", dest="model_id", help="a registered model id")
    p.add_argument(
        "--model-path", "--model_path", dest="model_path",
        help="a local Hugging Face model folder; alone, its card is derived from the folder; "
        "with --model_id, the registered card is applied to it",
    )
    p.add_argument(
        "--template", help="the chat template to render with, as train's --template: own, plain (projector "
        "pretraining), declarative, or a Jinja file",
    )


def resolve_with_template(args: argparse.Namespace) -> Any:
    """The model, its card switched to ``--template`` exactly as a training run switches it."""
    import dataclasses

    from cardtune.loaders.resolve import resolve_model
    from cardtune.registry import CardError
    from cardtune.training.arguments import ArgumentError
    from cardtune.training.template import card_with_template

    resolved = resolve_model(args.model_id, args.model_path, args.cards)
    try:
        return dataclasses.replace(resolved, card=card_with_template(resolved.card, args.template))
    except ArgumentError as exc:
        raise CardError(str(exc)) from None


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="JSON/JSONL file (LLaVA-style or OpenAI messages), or a mix")
    p.add_argument("--image-folder", "--image_folder", dest="image_folder")
    p.add_argument("--video-folder", "--video_folder", dest="video_folder")
    p.add_argument("--allow-absolute-paths", "--allow_absolute_paths", dest="allow_absolute_paths", action="store_true",
                   help="accept absolute media paths outside the folders")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int,
                   help="longest sequence in tokens; longer samples are cut after their media "
                   "(default: refuse samples longer than the model takes)")
    p.add_argument("--user-key", "--user_key", dest="user_key", default="human",
                   help="LLaVA-format 'from' value of user turns (default: human)")
    p.add_argument("--assistant-key", "--assistant_key", dest="assistant_key", default="gpt",
                   help="LLaVA-format 'from' value of assistant turns (default: gpt)")
    p.add_argument("--typed-control-tokens", "--typed_control_tokens", dest="typed_control_tokens",
                   choices=["plain", "keep"], default="plain",
                   help="control-token strings typed inside a message (<|im_end|>, </s>): plain (default) encodes "
                   "them as the text they are; keep leaves them control tokens")


def resolve_checked(args: argparse.Namespace, *, loads: bool = True) -> Any:
    """The model resolved, after the data paths and the model folder were checked to exist (a
    missing one is one line, exit 2, before anything loads). ``loads``: the tokenizer will be
    loaded, so a hub id must be reachable or cached."""
    from cardtune.inputs import check_data_paths, check_model, check_model_path

    check_data_paths(args.data)
    check_model_path(args.model_path, weights=False)
    resolved = resolve_with_template(args)
    check_model(resolved, model_path=args.model_path, weights=False, files=loads, cards=args.cards)
    return resolved


def open_encoder(args: argparse.Namespace) -> tuple[Any, Any]:
    """(resolved model, encoder); says on stderr what was derived for an unregistered folder.
    Without ``--max-length`` the encoder refuses samples longer than the model takes."""
    from cardtune.data.max_length import length_note, limited_encoder
    from cardtune.registry import get_registry
    from cardtune.registry.errors import InputFileError

    resolved = resolve_checked(args)
    loader = resolved.loader()
    try:
        processing = loader.load_processing()
    except OSError as exc:  # the hub unreachable, a folder missing its tokenizer files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputFileError(f"{loader.path}: cannot load the tokenizer/processor: {first}") from None
    overrides = (get_registry(args.cards).get(args.model_id).config_overrides if args.model_id
                 else resolved.card.config_overrides)
    encoder = limited_encoder(resolved.card, processing, loader.path, max_length=getattr(args, "max_length", None),
                              revision=resolved.revision, config_overrides=overrides,
                              typed_control_tokens=getattr(args, "typed_control_tokens", "plain"))
    notes = [*resolved.notes, *processing.notes, *(encoder.roles.notes if resolved.derived else [])]
    if resolved.derived or processing.notes:
        for note in notes:
            print(f"cardtune: derived: {note}" if resolved.derived else f"cardtune: {note}", file=sys.stderr)
    note = length_note(encoder.max_length, encoder.limit)
    if note:
        print(f"cardtune: {note}", file=sys.stderr)
    return resolved, encoder


def encoded_samples(args: argparse.Namespace, resolved: Any, encoder: Any, limit: int | None = None) -> Iterator[Any]:
    """(sample, Encoded or SampleError) for each sample of ``--data``, media loaded lazily; first
    each record that could not be read as a sample, as (None, its SampleError). ``limit``: the
    first so many samples (every unreadable record is still reported)."""
    from cardtune.data.formats import load_samples
    from cardtune.data.validate import media_folder_hint

    samples = load_samples(args.data, user_key=args.user_key, assistant_key=args.assistant_key)
    for error in samples.errors:
        yield None, error
    check = SampleCheck(resolved.card, encoder, image_folder=args.image_folder, video_folder=args.video_folder,
                        allow_absolute_paths=args.allow_absolute_paths)
    for n, sample in enumerate(samples):
        if limit is not None and n >= limit:
            return
        yield sample, check(sample)
    hint = media_folder_hint(check.failures, samples, image_folder=args.image_folder, video_folder=args.video_folder)
    if hint:
        print(f"cardtune {args.command}: {hint}", file=sys.stderr)


class SampleCheck:
    """One sample as training encodes it: the media kinds the card takes, then the media
    loaded, then the encoder (a preference pair's, :class:`~cardtune.collators.pairs.PairEncoder`,
    for a record with chosen and rejected answers); every failure is the sample's
    :class:`SampleError` (a processor or template failing on it is ``template_error``, as
    validation reports it), never a traceback."""

    def __init__(self, card: Any, encoder: Any, **media: Any) -> None:
        from cardtune.collators.pairs import PairEncoder
        from cardtune.data.media import MediaConfig

        self.card = card
        self.encoder = encoder
        self.pairs = PairEncoder(encoder)
        self.media = MediaConfig.from_card(card, **media)
        self.failures: list[Any] = []

    def __call__(self, sample: Any) -> Any:
        from cardtune.conversation import is_preference
        from cardtune.data.media import load_media
        from cardtune.data.validate import check_modalities
        from cardtune.errors import SampleError

        try:
            unsupported = check_modalities(sample, self.card)
            if unsupported:
                raise unsupported[0]
            encoder = self.pairs if is_preference(sample) else self.encoder
            return encoder.encode(sample, load_media(sample, self.media))
        except SampleError as exc:
            self.failures.append(exc)
            return exc
        except Exception as exc:  # noqa: BLE001 - a processor or template failing on this one sample
            error = SampleError(sample.id, "messages", "template_error", f"encoding failed: {type(exc).__name__}: {exc}",
                                sample.source)
            self.failures.append(error)
            return error


def failure_summary(failed: Counter[str], total: int) -> str:
    counts = ", ".join(f"{k}: {v}" for k, v in failed.most_common())
    return f"{sum(failed.values())} of {total} samples failed ({counts})"


def label_record(sample_id: str, encoded: Any) -> dict[str, Any]:
    """What ``labels`` writes of one sample; of a preference pair, both sequences and the length
    of the prompt they share."""
    if hasattr(encoded, "rejected"):
        return {"id": sample_id, "prompt_length": encoded.prompt_length,
                **{side: {"input_ids": e.input_ids, "labels": e.labels}
                   for side, e in (("chosen", encoded.chosen), ("rejected", encoded.rejected))}}
    return {"id": sample_id, "input_ids": encoded.input_ids, "labels": encoded.labels}


@command("labels", "print input_ids and labels of each sample as JSON lines (exit 1 if any sample fails)")
def _configure_labels(p: argparse.ArgumentParser) -> Handler:
    add_model_args(p)
    add_data_args(p)

    def run(args: argparse.Namespace) -> int:
        from cardtune.errors import SampleError

        resolved, encoder = open_encoder(args)
        failed: Counter[str] = Counter()
        total = 0
        for sample, result in encoded_samples(args, resolved, encoder):
            total += 1
            if isinstance(result, SampleError):
                failed[result.reason] += 1
                print(f"cardtune labels: {result}", file=sys.stderr)
                continue
            sys.stdout.write(json.dumps(label_record(sample.id, result)) + "\n")
        if failed:
            print(f"cardtune labels: {failure_summary(failed, total)}", file=sys.stderr)
            return 1
        return 0

    return run


@command("inspect", "show each token coloured: trained highlighted, masked dim, media collapsed")
def _configure_inspect(p: argparse.ArgumentParser) -> Handler:
    add_model_args(p)
    add_data_args(p)
    p.add_argument("-n", type=int, default=5, help="how many samples to show (default 5)")
    p.add_argument("--html", metavar="FILE", help="also write the view as one self-contained HTML page "
                   "(images as thumbnails), to share a masking question")

    def run(args: argparse.Namespace) -> int:
        from rich.console import Console
        from rich.markup import escape

        from cardtune.errors import SampleError

        console = Console(highlight=False, soft_wrap=True)
        resolved, encoder = open_encoder(args)
        failed: Counter[str] = Counter()
        total = 0
        shown: list[tuple[Any, Any, Any]] = []
        for sample, result in encoded_samples(args, resolved, encoder, limit=args.n):
            total += 1
            if args.html:
                shown.append((sample, result, _media_of(args, resolved.card, sample, result)))
            console.rule(f"sample {sample.id if sample is not None else result.sample_id}")
            if isinstance(result, SampleError):
                failed[result.reason] += 1
                console.print(f"[bold red]FAILED[/] {escape(str(result))}")
                continue
            if hasattr(result, "rejected"):  # a preference pair: both sequences
                for side, encoded in (("chosen", result.chosen), ("rejected", result.rejected)):
                    console.print(f"[bold]{side}[/]")
                    console.print(render_tokens(encoded, encoder))
                    console.print(summary_line(f"{sample.id} ({side})", encoded, encoder, 1))
                console.print(f"[bold]{sample.id}[/]: the first {result.prompt_length} tokens, the prompt, are the same "
                              "on both sides; only each final answer is trained")
                continue
            console.print(render_tokens(result, encoder))
            turns = sum(1 for m in sample.messages if m["role"] == "assistant")
            console.print(summary_line(sample.id, result, encoder, turns))
        if args.html:
            write_label_page(args.html, shown, encoder, f"cardtune inspect: {resolved.model_id}", args.data)
            print(f"cardtune inspect: wrote {args.html}", file=sys.stderr)
        if failed:
            print(f"cardtune inspect: {failure_summary(failed, total)}", file=sys.stderr)
            return 1
        return 0

    return run


def summary_line(name: str, encoded: Any, encoder: Any, turns: int) -> str:
    from rich.markup import escape

    return (f"[bold]{escape(name)}[/]: {len(encoded.input_ids)} tokens, {encoded.num_trained} trained "
            f"in {turns} assistant turn(s), {sum(1 for t in encoded.input_ids if t in encoder.media_token_ids)} media"
            + (f", {encoded.num_truncated} truncated" if encoded.num_truncated else ""))


def render_tokens(encoded: Any, encoder: Any) -> Any:
    """A rich Text of the sample: trained tokens on green, masked dim, media runs collapsed."""
    from rich.text import Text

    from cardtune.report.labels import token_runs

    styles = {"trained": "black on green", "masked": "dim", "media": "bold magenta"}
    out = Text()
    for text, kind in token_runs(encoded.input_ids, encoded.labels, encoder.tokenizer, encoder.media_token_ids):
        out.append(text.replace("\n", "↵\n") if kind != "media" else text, style=styles[kind])
    return out


def _media_of(args: argparse.Namespace, card: Any, sample: Any, result: Any) -> Any:
    """The sample's images for the thumbnails (None for a failed or unreadable sample)."""
    from cardtune.data.media import MediaConfig, load_media
    from cardtune.errors import SampleError

    if sample is None or isinstance(result, SampleError) or not (sample.images or sample.videos):
        return None
    config = MediaConfig.from_card(card, image_folder=args.image_folder, video_folder=args.video_folder,
                                   allow_absolute_paths=args.allow_absolute_paths)
    try:
        return load_media(sample, config)
    except SampleError:
        return None


def write_label_page(path: str, items: list[tuple[Any, Any, Any]], encoder: Any, title: str, data: str) -> None:
    """The label view alone, as one self-contained page."""
    from pathlib import Path

    from cardtune.report.labels import label_view
    from cardtune.report.page import Section, page

    html = page(title, str(data), [Section("labels", "Labels", label_view(items, encoder))])
    Path(path).write_text(html, encoding="utf-8")
