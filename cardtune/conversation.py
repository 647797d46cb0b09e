"""The one in-memory form of a training sample, whatever file format it came from.

Messages use the content-parts form that ``apply_chat_template`` reads::

    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}

Media parts carry no payload: the n-th image part of a sample refers to ``sample.images[n]``
(and likewise videos), so positions are kept while pixels load lazily.

The small types every layer passes around live here too: :class:`Media` (a sample's loaded
media) and :class:`Processing` (the tokenizer/processor bundle of one model), so data code never
imports the engine and the engine never imports the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass
class Sample:
    id: str
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)
    source: str = ""
    """Where the sample came from (``file:line`` or ``file[index]``), for error messages."""

    @property
    def assistant_texts(self) -> list[str]:
        return [message_text(m) for m in self.messages if m["role"] == "assistant"]

    def count_parts(self, kind: str) -> int:
        """Media parts of ``kind`` ("image", "video") in all messages; string content has none."""
        return sum(1 for m in self.messages if not isinstance(m["content"], str)
                   for p in m["content"] if p["type"] == kind)


REJECTED = "rejected"
"""A preference sample is the conversation with its chosen answer last; that last message holds
the rejected answer under this key, a message of its own (``{"role": "assistant", "content":
[...]}``). So a pair is read, stored, mixed, cached and reported as one sample, and its two
sequences are the two conversations :func:`preference_sides` gives."""


def is_preference(sample: Sample) -> bool:
    """Whether ``sample`` is a preference pair (its last answer has a rejected alternative)."""
    return bool(sample.messages) and isinstance(sample.messages[-1].get(REJECTED), dict)


def preference_sides(sample: Sample) -> tuple[Sample, Sample]:
    """The chosen and the rejected conversation of a preference sample: the same prompt (and
    media), each with its own last answer."""
    *prompt, last = sample.messages
    chosen = {k: v for k, v in last.items() if k != REJECTED}
    return (Sample(sample.id, [*prompt, chosen], sample.images, sample.videos, sample.source),
            Sample(sample.id, [*prompt, last[REJECTED]], sample.images, sample.videos, sample.source))


@dataclass
class Media:
    """Loaded media of one sample, in the order of its placeholders."""

    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


@dataclass
class Processing:
    """What turns a conversation into tensors for one model.

    ``processor`` is the Hugging Face processor, assembled from the image processor and the
    tokenizer where AutoProcessor cannot be built here (a video processor that needs
    torchvision); ``processor=None`` only where no image processor loads (remote code absent):
    images are then refused as ``unsupported_media``.
    """

    tokenizer: Any
    processor: Any | None = None
    image_processor: Any | None = None
    notes: tuple[str, ...] = ()
    video_unavailable: str | None = None
    """Why videos cannot be encoded on this machine (no video processor), or None."""
    image_unavailable: str | None = None
    """Why images cannot be encoded (no image processor loads), or None."""
    image_remote: bool = False
    """Images are unavailable because the image processor is remote code that is absent or not
    trusted (not something this machine could install)."""

    @property
    def renderer(self) -> Any:
        """The object whose ``apply_chat_template`` renders conversations."""
        return self.processor if self.processor is not None else self.tokenizer


def text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def message_text(message: dict[str, Any]) -> str:
    """The text of a message with media parts left out."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p["type"] == "text")


def join_text_parts(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Adjacent text parts of one message joined into one text part (media parts stay between).

    ``[{text: "Hello"}, {text: " world."}]`` is valid content, but templates that write a
    separator per part (llava-1.5 a space after each, llava-interleave a newline before each)
    would render the answer as something other than its text.
    """
    if isinstance(content, str) or len(content) < 2:
        return content
    out: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "text" and out and out[-1]["type"] == "text":
            out[-1] = {**out[-1], "text": out[-1]["text"] + part["text"]}
        else:
            out.append(part)
    return out


def as_parts(content: str | list[dict[str, Any]], placeholders: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Content as a list of parts; ``placeholders`` (e.g. ``{"<image>": "image"}``) become media parts.

    Text around a placeholder keeps its order, so ``"<image>\\nWhat?"`` gives an image part
    then the text ``"What?"``: one newline right after a placeholder, or right before one, is
    the placeholder's own separator (LLaVA data writes ``<image>\\n`` in front of the text, or
    ``\\n<image>`` behind it) and is dropped. All other text is kept exactly as written.
    """
    if not isinstance(content, str):
        return content
    placeholders = placeholders or {}
    parts: list[dict[str, Any]] = []
    rest = content
    while rest:
        hits = [(rest.find(tag), tag) for tag in placeholders if tag in rest]
        if not hits:
            parts.append(text_part(rest))
            break
        pos, tag = min(hits)
        before = rest[:pos]
        if before.endswith("\n"):
            before = before[:-1]
        if before:
            parts.append(text_part(before))
        parts.append({"type": placeholders[tag]})
        rest = rest[pos + len(tag) :]
        if rest.startswith("\n"):
            rest = rest[1:]
    return [p for p in parts if p["type"] != "text" or p["text"]]
