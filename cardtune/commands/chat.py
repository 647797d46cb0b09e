"""``cardtune chat``: talk to a trained model with its own chat template.

One-shot with ``--prompt``; otherwise interactive (one line per user turn, the conversation is
kept; ``/image PATH`` attaches an image to the next turn, ``/reset`` starts over, Ctrl-D quits).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cardtune.cli import Handler, command


class ChatError(RuntimeError):
    """The model cannot be asked this (its processing here cannot take the images)."""


class ChatSession:
    """A conversation with one model: render with its template, generate, keep the turns."""

    def __init__(self, folder: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 system: str | None = None, trust_remote_code: bool = False) -> None:
        from cardtune.collators.engine import ChatEncoder
        from cardtune.training.output import load_trained

        self.folder = folder
        from cardtune.quiet import no_weight_bars

        with no_weight_bars():
            trained = load_trained(folder, merge=True, trust_remote_code=trust_remote_code)
        self.model = trained.model
        self.card = trained.card
        self.processing = trained.processing
        self.encoder = ChatEncoder(trained.card, trained.processing)
        self.tokenizer = trained.processing.tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.images: list[Any] = []

    def stop_ids(self) -> list[int]:
        from cardtune.evaluation.generate import stop_ids

        return stop_ids(self.tokenizer, self.encoder.roles, self.model)

    def ask(self, prompt: str, image_paths: list[str] | None = None) -> str:
        import os

        import torch

        from cardtune.conversation import Media, Sample
        from cardtune.data.media import MediaConfig, MediaProblem, open_image
        from cardtune.errors import SampleError

        try:  # as training opens them: regular files only (a FIFO would wait forever), EXIF orientation applied
            images = [open_image(os.path.abspath(p), MediaConfig(allow_absolute_paths=True)) for p in image_paths or []]
        except MediaProblem as exc:
            raise ChatError(exc.detail) from None
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
        self.messages.append({"role": "user", "content": content})
        self.images += images
        messages = ([{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else [])
        messages += self.messages
        # The turn is encoded as training encodes a conversation, with a placeholder answer:
        # the prompt is what training puts before an answer's first trained token.
        sample = Sample("chat", messages + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
                        images=list(self.images))
        media = Media(images=list(self.images)) if self.images else None
        try:
            ids, tensors = self._prompt(sample, media)
        except (SampleError, ChatError) as exc:
            self.messages.pop()  # the turn was not asked: the conversation stays as it was
            del self.images[len(self.images) - len(images):]
            if isinstance(exc, ChatError):
                raise
            raise ChatError(f"{self.folder}: {exc.detail or exc.reason}") from None
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        inputs.update({k: v.to(self.model.device) for k, v in tensors.items()})
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids()[0]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids(),
                                      pad_token_id=pad, **sampling)
        answer = self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer

    def _prompt(self, sample: Any, media: Any) -> tuple[list[int], dict[str, Any]]:
        """The turn's prompt ids and media tensors (:func:`cardtune.evaluation.prompts.build_prompt`,
        as ``cardtune eval``); where an earlier answer of the model cannot be located as training
        would (an empty one, say), the template's generation prompt after the conversation."""
        from cardtune.errors import SampleError
        from cardtune.evaluation.prompts import build_prompt

        try:
            prompt = build_prompt(self.encoder, sample, media)
            return prompt.input_ids, prompt.tensors
        except SampleError as exc:
            if exc.reason not in ("label_contract", "empty_labels", "empty_answer"):
                raise
        text = self.encoder.render_prompt(self.encoder.normalise(sample, media)[:-1])
        ids, tensors = self.encoder.tokenize(text, sample, media)
        if self.images and self.card.load_image and not tensors:
            why = "; ".join(self.processing.notes) or "its processor returned no image tensors"
            raise ChatError(f"{self.folder}: the image(s) were not turned into pixel values, so the model "
                            f"would not see them ({why})")
        return ids, tensors

    def reset(self) -> None:
        self.messages.clear()
        self.images.clear()


def add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", "--trust_remote_code", dest="trust_remote_code", action="store_true",
                   help="run the Python code the model folder ships (auto_map: its tokenizer, processor or model "
                   "classes); read it first. Without it that code is never run, whatever the folder's "
                   "cardtune_card.yaml says")


def say_untrusted_code(args: argparse.Namespace, folder: str) -> None:
    """Without --trust-remote-code, one line naming the folder's code that is not run."""
    from cardtune.training.output import untrusted_code

    note = None if args.trust_remote_code else untrusted_code(folder)
    if note:
        print(f"cardtune {args.command}: {note}", file=sys.stderr)


@command("chat", "chat with a trained model (its own template); one-shot with --prompt, else interactive")
def _configure_chat(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--model", required=True, metavar="DIR", help="a folder written by training or merge")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image for the first turn (repeatable)")
    p.add_argument("--prompt", help="ask once, print the answer and exit")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    add_trust_arg(p)

    def run(args: argparse.Namespace) -> int:
        say_untrusted_code(args, args.model)
        session = ChatSession(args.model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              system=args.system, trust_remote_code=args.trust_remote_code)
        if args.prompt is not None:
            try:
                print(session.ask(args.prompt, args.image))
            except ChatError as exc:
                print(f"cardtune chat: {exc}", file=sys.stderr)
                return 1
            return 0
        pending = list(args.image)
        print(f"chatting with {args.model} ({session.card.family}); /image PATH, /reset, Ctrl-D to quit", file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not line:
                continue
            if line.startswith("/image "):
                pending.append(line.split(" ", 1)[1].strip())
                continue
            if line == "/reset":
                session.reset()
                continue
            try:
                print(f"model> {session.ask(line, pending)}")
            except ChatError as exc:
                print(f"cardtune chat: {exc}", file=sys.stderr)
            pending = []

    return run
