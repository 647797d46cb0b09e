"""The label view, as ``cardtune inspect`` shows it: each token of a sample, trained tokens
highlighted, masked ones dim, a run of media tokens as one ``<image>×576``, the sample's
images as small thumbnails. Shared by the run report and ``cardtune inspect`` (terminal and
``--html``).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from html import escape
from typing import Any

IGNORE_INDEX = -100
THUMBNAIL = 96


def token_runs(ids: list[int], labels: list[int], tokenizer: Any, media_token_ids: Iterable[int]) -> list[tuple[str, str]]:
    """``(text, kind)`` per token, ``kind`` one of ``trained``, ``masked``, ``media`` (a run of one
    media token, written ``<image>×576``)."""
    media = set(media_token_ids)
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(ids):
        if ids[i] in media:
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            out.append((f"{tokenizer.convert_ids_to_tokens(ids[i])}×{j - i}", "media"))
            i = j
            continue
        out.append((piece(tokenizer, ids[i - 1] if i else None, ids[i]), "trained" if labels[i] != IGNORE_INDEX else "masked"))
        i += 1
    return out


def piece(tokenizer: Any, prev: int | None, cur: int) -> str:
    """The text token ``cur`` adds after ``prev``: decoding a token alone drops its leading
    space in sentencepiece vocabularies, decoding the pair keeps it."""
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    if prev is None:
        return tokenizer.decode([cur], **kw)
    return tokenizer.decode([prev, cur], **kw)[len(tokenizer.decode([prev], **kw)) :]


def thumbnail(image: Any, size: int = THUMBNAIL) -> str | None:
    """A PIL image as a ``data:`` URI of a PNG at most ``size`` pixels a side; None for anything
    else (a path, where the family reads images by path; a video's frames: the first)."""
    if isinstance(image, list) and image:
        image = image[0]
    if not hasattr(image, "thumbnail"):
        return None
    small = image.convert("RGB").copy()
    small.thumbnail((size, size))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def sample_html(sample_id: str, encoded: Any, encoder: Any, media: Any = None, turns: int | None = None) -> str:
    """One sample's tokens as HTML, its summary line and its images' thumbnails."""
    runs = token_runs(encoded.input_ids, encoded.labels, encoder.tokenizer, encoder.media_token_ids)
    classes = {"trained": "t", "masked": "m", "media": "md"}
    body = "".join(f'<span class="{classes[kind]}">{escape(text).replace(chr(10), "↵" + chr(10))}</span>'
                   for text, kind in runs)
    images = [thumbnail(i) for i in (getattr(media, "images", None) or [])]
    thumbs = "".join(f'<img class="thumb" alt="image {n + 1}" src="{src}">' for n, src in enumerate(images) if src)
    num_media = sum(1 for t in encoded.input_ids if t in encoder.media_token_ids)
    summary = (f"{len(encoded.input_ids)} tokens, {encoded.num_trained} trained"
               + (f" in {turns} assistant turn(s)" if turns is not None else "") + f", {num_media} media"
               + (f", {encoded.num_truncated} truncated" if encoded.num_truncated else ""))
    return (f'<div class="sample"><h3>{escape(sample_id)}</h3>'
            + (f'<div class="thumbs">{thumbs}</div>' if thumbs else "")
            + f'<pre class="tokens">{body}</pre><p class="note">{escape(summary)}</p></div>')


def failed_html(sample_id: str, error: Any) -> str:
    return f'<div class="sample"><h3>{escape(sample_id)}</h3><p class="bad">FAILED {escape(str(error))}</p></div>'


LEGEND = ('<p class="note">Trained tokens <span class="t">highlighted</span>, masked tokens '
          '<span class="m">dim</span>, media runs <span class="md">collapsed×N</span>; ↵ is a newline.</p>')


def label_view(items: Iterable[tuple[Any, Any, Any]], encoder: Any) -> str:
    """HTML for ``(sample, Encoded, EncodedPair or SampleError, media)`` items (a sample may be
    None for a record that could not be read: its error names it)."""
    from cardtune.errors import SampleError

    parts = [LEGEND]
    for sample, result, media in items:
        sample_id = sample.id if sample is not None else getattr(result, "sample_id", "?")
        if isinstance(result, SampleError):
            parts.append(failed_html(sample_id, result))
            continue
        if hasattr(result, "rejected"):  # a preference pair: both sequences, the final answer trained in each
            parts.append(sample_html(f"{sample_id}: chosen", result.chosen, encoder, media, 1))
            parts.append(sample_html(f"{sample_id}: rejected (the first {result.prompt_length} tokens are the chosen's)",
                                     result.rejected, encoder, None, 1))
            continue
        turns = sum(1 for m in sample.messages if m["role"] == "assistant") if sample is not None else None
        parts.append(sample_html(sample_id, result, encoder, media, turns))
    return "".join(parts)
