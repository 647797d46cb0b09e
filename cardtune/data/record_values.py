"""What the values of a data record may be, checked as the record becomes a sample, so a value
of the wrong type or text no tokenizer takes is a ``bad_format`` error naming the record and
the field, never a traceback later (a role that is a list was ``TypeError: unhashable type``, a
NUL in an image path ``ValueError: embedded null byte``, a lone surrogate in an answer reached
the tokenizer and came back as a template error).

A turn's text that is not a string stays in the sample, for validation to report as
``non_string_turn``.
"""

from __future__ import annotations

import math
import numbers
import re
import reprlib
from typing import Any

from cardtune.conversation import Sample
from cardtune.errors import SampleError

_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """What makes ``text`` something no tokenizer takes as it is, or None: a lone UTF-16
    surrogate (``\\ud800`` written in JSON without its pair: not a character, and not
    encodable as UTF-8) or a NUL (binary bytes in a text field)."""
    found = _NOT_TEXT.search(text)
    if found is None:
        return None
    char = found.group()
    if char == "\x00":
        return f"holds a NUL character (\\u0000) at character {found.start() + 1}: binary data in a text field?"
    return (f"holds a lone surrogate (\\u{ord(char):04x}) at character {found.start() + 1}: half of a UTF-16 pair, "
            "not a character")


def printable(text: str) -> str:
    """``text`` with what cannot be printed as UTF-8 escaped (a record's id in a report)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 2, 40, 40, 4, 4


def shown(value: Any) -> str:
    """A value as an error shows it: a few levels and characters of it (a list nested 900 deep
    would take repr to its recursion limit)."""
    return printable(_SHORT.repr(value))


def sample_id_of(raw: Any, index: int, source: str) -> str:
    """A record's id: text or a finite number; the record's index when it has none."""
    if raw is None or raw == "":
        return str(index)
    if isinstance(raw, str):
        problem = text_problem(raw)
        if problem:
            raise SampleError(printable(raw), "id", "bad_format", f"the id {problem}", source)
        return raw
    if isinstance(raw, numbers.Integral) and not isinstance(raw, bool):
        return str(int(raw))
    if isinstance(raw, float) and math.isfinite(raw):
        return str(raw)
    raise SampleError(str(index), "id", "bad_format",
                      f"an id is text or a number, got {type(raw).__name__}: {shown(raw)}", source)


def check_role(value: Any, sample_id: str, field: str, source: str, known: str) -> None:
    if not isinstance(value, str):
        raise SampleError(sample_id, field, "bad_format",
                          f"a role is text ({known}), got {type(value).__name__}: {shown(value)}", source)


def check_sample_values(sample: Sample) -> None:
    """Every role and text of ``sample`` is text a tokenizer takes, and every media item a file
    path, an image as ``datasets`` stores one (``{bytes, path}``) or an image object."""
    for i, message in enumerate(sample.messages):
        for key in ("role", "reasoning_content"):
            value = message.get(key)
            if isinstance(value, str) and (problem := text_problem(value)):
                raise SampleError(sample.id, f"messages[{i}].{key}", "bad_format", f"the text {problem}", sample.source)
        content = message["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            if part.get("type") != "text":
                continue
            text = part.get("text")
            if not isinstance(text, str):  # said here, shortly: a list nested 900 deep has no printable repr
                raise SampleError(sample.id, f"messages[{i}].content", "non_string_turn",
                                  f"{message['role']} turn text is {type(text).__name__}: {shown(text)}", sample.source)
            if problem := text_problem(text):
                raise SampleError(sample.id, f"messages[{i}].content", "bad_format", f"the text {problem}",
                                  sample.source)
    for kind, items in (("images", sample.images), ("videos", sample.videos)):
        for k, item in enumerate(items):
            problem = media_problem(item, kind == "videos")
            if problem:
                raise SampleError(sample.id, f"{kind}[{k}]", "bad_format", problem, sample.source)


def media_problem(item: Any, video: bool) -> str | None:
    """What is wrong with one media item of a record, or None."""
    if isinstance(item, str):
        problem = text_problem(item)
        return f"the path {problem}" if problem else None
    if isinstance(item, dict):
        if not {"bytes", "path"} & set(item) or set(item) - {"bytes", "path"}:
            return f"an image is a path, or {{bytes, path}} as datasets stores one; got a mapping of {shown(sorted(item))}"
        path, data = item.get("path"), item.get("bytes")
        if path is not None and not isinstance(path, str):
            return f"path: a path (text), got {type(path).__name__}: {shown(path)}"
        if data is not None and not isinstance(data, (bytes, bytearray, str)):
            return f"bytes: the file's bytes, got {type(data).__name__}"
        return media_problem(path, video) if isinstance(path, str) else None
    if video and isinstance(item, list) and all(isinstance(frame, str) for frame in item):
        return next((f"a frame's path {p}" for p in map(text_problem, item) if p), None)  # a video as its frames
    if hasattr(item, "size") and hasattr(item, "mode"):  # an image object (a datasets Image column)
        return None
    what = "a video is a path, or a list of its frames' paths" if video else "an image is a path (text)"
    return f"{what}, got {type(item).__name__}: {shown(item)}"
