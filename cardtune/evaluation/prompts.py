"""A sample's generation prompt and its reference answer, exactly as training sees them.

The prompt is what training feeds the model before the first trained token of the sample's
last answer: the conversation is encoded by the engine as in training (normalisation, the
card's template and its frozen date, media expanded by the same processor), and cut where
that answer's label span starts. So the prompt ends with whatever training put between the
last user turn and the answer: the template's generation header, an empty think block a
template inserts before a last answer only (Qwen3), a channel header (gpt-oss's
``<|channel|>final<|message|>``), a newline merged with the one the template writes before
the content (llava-interleave's ``\\n\\n``). The template's bare generation prompt
(``add_generation_prompt``) stops before some of these, so a model finetuned here would be
asked something it never saw in training.

``cardtune chat`` builds its prompts here too (its turn has a placeholder answer), so chat and
``cardtune eval`` see the same tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cardtune.conversation import Media, Sample, is_preference, message_text, preference_sides
from cardtune.errors import SampleError

IGNORE_INDEX = -100


@dataclass
class Prompt:
    """One generation request: its tokens and media tensors, and a readable form of them."""

    sample_id: str
    input_ids: list[int]
    tensors: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    """The prompt's tokens decoded, each run of media tokens written once with its count
    (``<image>×576``)."""
    reference: str = ""
    """The last assistant turn's text ("" for a chat turn, which has none)."""
    num_images: int = 0


def up_to_last_answer(sample: Sample) -> Sample:
    """The sample cut after its last assistant turn, with the media its kept turns name."""
    last = max((i for i, m in enumerate(sample.messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise SampleError(sample.id, "messages", "no_assistant_turn", "nothing to compare a generated answer with",
                          sample.source)
    if last + 1 == len(sample.messages):
        return sample
    cut = dataclasses.replace(sample, messages=sample.messages[: last + 1])
    return dataclasses.replace(cut, images=sample.images[: cut.count_parts("image")],
                               videos=sample.videos[: cut.count_parts("video")])


def cut_media(media: Media | None, sample: Sample) -> Media | None:
    """``media`` loaded for a whole sample, cut to the media parts ``sample`` (a cut of it) holds."""
    if media is None:
        return None
    images, videos = sample.count_parts("image"), sample.count_parts("video")
    if len(media.images) == images and len(media.videos) == videos:
        return media
    return Media(images=list(media.images[:images]), videos=list(media.videos[:videos])) if images or videos else None


def last_answer_start(labels: list[int]) -> int | None:
    """Index of the first trained token of the last label span, None when nothing is trained."""
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if not end:
        return None
    start = end - 1
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start


def build_prompt(encoder: Any, sample: Sample, media: Media | None) -> Prompt:
    """The prompt for ``sample``'s last assistant turn (``sample`` ends with it): the training
    tokens before that answer's first trained token, and the media tensors. A
    :class:`SampleError` where the sample cannot be encoded, or its images would not be seen
    (a processor that returned no pixel values: generating then would answer from one
    unexpanded placeholder token)."""
    from cardtune.collators.media import is_per_token

    encoded = encoder.encode(sample, media)
    start = last_answer_start(encoded.labels)
    if start is None or encoded.num_truncated:
        raise SampleError(sample.id, "messages", "too_long", "the last answer does not fit: no prompt before it",
                          sample.source)
    n = len(encoded.input_ids)
    tensors = {k: v[:, :start] if is_per_token(v, n) else v for k, v in encoded.media_tensors.items()}
    images = len(media.images) if media is not None else 0
    if images and encoder.card.load_image and not tensors:
        why = "; ".join(encoder.processing.notes) or "its processor returned no image tensors"
        raise SampleError(sample.id, "images", "unsupported_media",
                          f"the image(s) were not turned into pixel values, so the model would not see them ({why})",
                          sample.source)
    ids = encoded.input_ids[:start]
    text = readable(ids, encoder.tokenizer, encoder.media_token_ids)
    return Prompt(sample.id, ids, tensors, text, message_text(sample.messages[-1]), images)


def prompt_for(encoder: Any, sample: Sample, media: Media | None) -> Prompt:
    """:func:`build_prompt` for a data sample: cut after its last answer, which is the reference
    (of a preference pair, the chosen answer)."""
    if is_preference(sample):
        sample = preference_sides(sample)[0]
    cut = up_to_last_answer(sample)
    return build_prompt(encoder, cut, media if cut is sample else cut_media(media, cut))


def readable(ids: list[int], tokenizer: Any, media_token_ids: set[int] | frozenset[int]) -> str:
    """``ids`` decoded with special tokens, each run of one media token as ``<image>×576``."""
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    pieces: list[str] = []
    run_start = 0
    i = 0
    while i < len(ids):
        if ids[i] in media_token_ids:
            pieces.append(tokenizer.decode(ids[run_start:i], **kw))
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            pieces.append(f"{tokenizer.convert_ids_to_tokens(ids[i])}×{j - i}" if j - i > 1
                          else tokenizer.convert_ids_to_tokens(ids[i]))
            run_start = i = j
            continue
        i += 1
    pieces.append(tokenizer.decode(ids[run_start:], **kw))
    return "".join(pieces)
