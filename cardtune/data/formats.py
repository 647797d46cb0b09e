"""Data files to :class:`~cardtune.conversation.Sample`: LLaVA JSON/JSONL, OpenAI ``messages``,
any ``datasets.load_dataset`` source, and weighted mixes of several of them.

Records that cannot become a sample at all (invalid JSON, no conversation field, a turn that is
not an object) are kept as :class:`SampleError` (``bad_format``) in :attr:`SampleSet.errors`, so a
validation pass reports them with everything else instead of stopping at the first.
Problems a sample can carry (an unknown role, a non-string or empty turn) are kept in the sample
as they are, for :func:`cardtune.data.validate.validate` to name.

Samples are kept as data in one flat buffer (:mod:`cardtune.data.sample_store`).
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from cardtune.conversation import ROLES, Sample, as_parts, text_part
from cardtune.data.json_stream import JsonStream, NotJson, RepeatedKeys, UnreadableValue, too_much
from cardtune.data.media import not_regular
from cardtune.data.preferences import is_preference_record, preference_record
from cardtune.data.record_values import check_role, check_sample_values, sample_id_of, shown
from cardtune.data.sample_store import SampleSet, concat, encode_sample
from cardtune.errors import SampleError
from cardtune.registry.errors import InputFileError
from cardtune.registry.loader import load_yaml, not_utf8, read_text, validation_lines

PLACEHOLDERS = {"<image>": "image", "<video>": "video"}
Format = Literal["auto", "llava", "openai"]


# -- configuration a user writes ----------------------------------------------------------------
def _not_bool(value: Any) -> Any:
    """YAML's true is no number (pydantic would read it as 1)."""
    if isinstance(value, bool):
        raise ValueError(f"a number, not {str(value).lower()}")
    return value


def _plain_text(value: Any) -> Any:
    from cardtune.data.record_values import text_problem

    if isinstance(value, str) and (problem := text_problem(value)):
        raise ValueError(f"the text {problem}")
    return value


Number = Annotated[float, BeforeValidator(_not_bool)]
Count = Annotated[int, BeforeValidator(_not_bool)]
Text = Annotated[str, AfterValidator(_plain_text)]
MAX_MIX = 2**31 - 1
"""The most samples a mix may ask for (each is an index kept in memory)."""
MAX_REPEAT = 1000
"""A mix asking for more than this many passes over all its records is a mistake (1e14 samples of two records)."""


class DataSource(BaseModel):
    """One data file, folder or hub dataset, as written in ``--data`` or a mix YAML."""

    model_config = ConfigDict(extra="forbid")

    path: Text
    weight: Number | None = Field(default=None, gt=0, allow_inf_nan=False)
    format: Format = "auto"
    columns: dict[Text, Text] = Field(default_factory=dict)
    """Canonical field -> column name, e.g. ``{conversations: dialog, image: img_path}``."""
    split: Text = "train"
    user_key: Text = "human"
    assistant_key: Text = "gpt"
    system_key: Text = "system"


class DataMix(BaseModel):
    """Several sources mixed with weights: each weight is that source's share of the mix."""

    model_config = ConfigDict(extra="forbid")

    sources: list[DataSource] = Field(min_length=1)
    seed: Count = 0
    num_samples: Count | None = Field(default=None, gt=0, le=MAX_MIX)
    """Size of the mix; default: the sources' total size."""

    @field_validator("sources")
    @classmethod
    def _weights_all_or_none(cls, sources: list[DataSource]) -> list[DataSource]:
        given = [s.weight is not None for s in sources]
        if any(given) and not all(given):
            raise ValueError("give a weight to every source or to none")
        return sources

    @property
    def shares(self) -> list[float] | None:
        """Each source's share of the mix (the weights over their sum, computed without the sum
        overflowing), or None without weights."""
        if self.sources[0].weight is None:
            return None
        weights = [s.weight or 0.0 for s in self.sources]
        top = max(weights)
        scaled = [w / top for w in weights]
        return [w / sum(scaled) for w in scaled]


def parse_data_arg(data: str | os.PathLike | DataMix | Sequence[Any], **source_defaults: Any) -> DataMix:
    """``--data``: ``a.json``, ``a.json:0.7,b.jsonl:0.3``, a ``.yaml`` mix, or a list of sources.

    ``source_defaults`` (``user_key``, ``columns``...) apply to sources that do not set them.
    """
    if isinstance(data, DataMix):
        return data
    if isinstance(data, (list, tuple)):
        return DataMix(sources=[_source(item, source_defaults) for item in data])
    text = str(data)
    if text.endswith((".yaml", ".yml")):
        return _read_mix(Path(text), source_defaults)
    sources = []
    for item in text.split(","):
        path, weight = item.strip(), None
        head, sep, tail = path.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        try:
            sources.append(_source({"path": path, "weight": weight}, source_defaults))
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InputFileError(f"--data {text}: {item.strip()}: {'.'.join(map(str, first['loc']))}: "
                                 f"{first['msg']}, got {first['input']!r:.40}") from None
    try:
        return DataMix(sources=sources)
    except ValidationError as exc:
        raise InputFileError(f"--data {text}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _source(item: Any, defaults: dict[str, Any]) -> DataSource:
    if isinstance(item, DataSource):
        return item
    if isinstance(item, (str, os.PathLike)):
        item = {"path": str(item)}
    return DataSource.model_validate({**defaults, **item})


def _read_mix(path: Path, defaults: dict[str, Any]) -> DataMix:
    """A mix YAML: errors at ``FILE:LINE: field``; paths relative to the file."""
    check_data_path(str(path))
    if not path.is_file():
        raise InputFileError(f"{path}: a folder, not a data mix file")
    loaded, root = load_yaml(read_text(path), str(path))
    if isinstance(loaded, list):  # a bare list of sources: its lines count as under 'sources'
        import yaml

        loaded = {"sources": loaded}
        key = yaml.ScalarNode("tag:yaml.org,2002:str", "sources", root.start_mark, root.start_mark)
        root = yaml.MappingNode("tag:yaml.org,2002:map", [(key, root)], root.start_mark, root.end_mark)
    if not isinstance(loaded, dict):
        raise InputFileError(f"{path}:1: a data mix is a list of sources or a mapping with 'sources'")
    sources = loaded.get("sources")
    if isinstance(sources, list):
        items = [{"path": s} if isinstance(s, str) else s for s in sources]
        loaded = {**loaded, "sources": [{**defaults, **s} if isinstance(s, dict) else s for s in items]}
    try:
        mix_spec = DataMix.model_validate(loaded)
    except ValidationError as exc:
        raise InputFileError(validation_lines(exc, root, str(path))) from None
    return mix_spec.model_copy(update={"sources": [_relative_to(s, path.parent) for s in mix_spec.sources]})


def _relative_to(source: DataSource, base: Path) -> DataSource:
    """Paths in a mix YAML are relative to the YAML file (hub names stay as they are)."""
    candidate = base / source.path
    if not Path(source.path).is_absolute() and (candidate.exists() or not looks_like_hub_name(source.path)):
        return source.model_copy(update={"path": str(candidate)})
    return source



# -- records to samples -------------------------------------------------------------------------
def _content_from_text(value: Any) -> list[dict[str, Any]]:
    # A non-string value is kept as it is, for validation to report as ``non_string_turn``.
    if not isinstance(value, str):
        return [text_part(value)]
    return as_parts(value, PLACEHOLDERS)


REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
"""Where data files put an assistant's reasoning (the think block of a reasoning model). The
sample keeps it as ``reasoning_content``; the engine hands it to the template under the name
the template reads."""


def _with_reasoning(message: dict[str, Any], raw: dict[str, Any], sample_id: str, field: str, source: str) -> dict[str, Any]:
    given = {k: raw[k] for k in REASONING_KEYS if raw.get(k) is not None}
    if not given:
        return message
    key, value = next(iter(given.items()))
    if message["role"] != "assistant":
        raise SampleError(sample_id, f"{field}.{key}", "bad_format", "only an assistant turn carries reasoning", source)
    if not isinstance(value, str):
        raise SampleError(sample_id, f"{field}.{key}", "bad_format", f"reasoning is text, got {type(value).__name__}", source)
    if any(v != value for v in given.values()):
        raise SampleError(sample_id, field, "bad_format", f"{' and '.join(given)} disagree; give one", source)
    return {**message, "reasoning_content": value} if value else message


def _as_list(value: Any, sample_id: str, field: str, source: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (str, dict)) or hasattr(value, "size"):  # a path, an HF image dict, a PIL image
        return [value]
    raise SampleError(sample_id, field, "bad_format", f"expected a path or a list of paths, got {type(value).__name__}", source)


def _media_fields(record: dict[str, Any], sample_id: str, source: str) -> tuple[list[Any], list[Any]]:
    images = _as_list(record.get("image", record.get("images")), sample_id, "image", source)
    videos = _as_list(record.get("video", record.get("videos")), sample_id, "video", source)
    return images, videos


def llava_record(record: dict[str, Any], sample_id: str, source: str, opts: DataSource) -> Sample:
    """``{"id", "image"/"video", "conversations": [{"from", "value"}], "system_prompt"?}``."""
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise SampleError(sample_id, "conversations", "bad_format", "'conversations' is not a list", source)
    roles = {opts.user_key: "user", opts.assistant_key: "assistant", opts.system_key: "system"}
    messages: list[dict[str, Any]] = []
    system_prompt = record.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise SampleError(sample_id, "system_prompt", "bad_format",
                          f"system_prompt is text, got {type(system_prompt).__name__}: {shown(system_prompt)}", source)
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": _content_from_text(system_prompt)})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(sample_id, f"conversations[{i}]", "bad_format", "a turn needs 'from' and 'value'", source)
        speaker = turn["from"]
        check_role(speaker, sample_id, f"conversations[{i}].from", source,
                   f"{opts.user_key}, {opts.assistant_key}, {opts.system_key}")
        role = roles.get(speaker, speaker if speaker in ROLES else str(speaker))
        message = {"role": role, "content": _content_from_text(turn["value"])}
        messages.append(_with_reasoning(message, turn, sample_id, f"conversations[{i}]", source))
    images, videos = _media_fields(record, sample_id, source)
    return Sample(sample_id, messages, images, videos, source)


def _part_payload(part: dict[str, Any]) -> Any:
    kind = part.get("type")
    if kind == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    return part.get(kind) or part.get("path") or part.get("url")


def openai_record(record: dict[str, Any], sample_id: str, source: str, opts: DataSource) -> Sample:
    """``{"id"?, "messages": [{"role", "content": str | parts}], "images"?, "videos"?}``.

    Media parts may carry their file (``{"type": "image", "image": path}``, ``image_url``) or
    not; those that do not (and ``<image>``/``<video>`` typed in text) take the record's
    top-level ``images`` / ``videos`` in order of appearance.
    """
    raw = record["messages"]
    if not isinstance(raw, list):
        raise SampleError(sample_id, "messages", "bad_format", "'messages' is not a list", source)
    top_images, top_videos = _media_fields(record, sample_id, source)
    queues = {"image": iter(top_images), "video": iter(top_videos)}
    media: dict[str, list[Any]] = {"image": [], "video": []}

    def place(kind: str, payload: Any) -> dict[str, Any]:
        payload = next(queues[kind], None) if payload is None else payload
        if payload is not None:
            media[kind].append(payload)
        return {"type": kind}

    messages: list[dict[str, Any]] = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or "role" not in message:
            raise SampleError(sample_id, f"messages[{i}]", "bad_format", "a message needs 'role' and 'content'", source)
        check_role(message["role"], sample_id, f"messages[{i}].role", source, "system, user, assistant")
        content = message.get("content")
        if isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    parts += as_parts(text, PLACEHOLDERS) if isinstance(text, str) else [text_part(text)]
                elif kind in ("image", "image_url", "video"):
                    parts.append({"type": "video" if kind == "video" else "image", "payload": _part_payload(part)})
                elif not isinstance(part, dict):
                    raise SampleError(sample_id, f"messages[{i}].content[{j}]", "bad_format",
                                      f"a content part is an object ({{type: text, text: ...}}, ...), got "
                                      f"{type(part).__name__}: {shown(part)}", source)
                else:
                    raise SampleError(
                        sample_id, f"messages[{i}].content[{j}]", "bad_format",
                        f"unknown content part {shown(kind)} (known: text, image, image_url, video)", source,
                    )
        else:
            parts = _content_from_text(content)
        parts = [place(p["type"], p.get("payload")) if p["type"] != "text" else p for p in parts]
        messages.append(_with_reasoning({"role": message["role"], "content": parts}, message, sample_id, f"messages[{i}]", source))
    # top-level media that no part took: kept, so the count mismatch is reported
    images = media["image"] + list(queues["image"])
    videos = media["video"] + list(queues["video"])
    return Sample(sample_id, messages, images, videos, source)


def record_to_sample(record: Any, index: int, source: str, opts: DataSource) -> Sample:
    """One record of any known format (a preference record, with ``chosen`` and ``rejected``,
    is read by :mod:`cardtune.data.preferences`); raises :class:`SampleError` (``bad_format``)
    otherwise."""
    if not isinstance(record, dict):
        raise SampleError(str(index), "record", "bad_format", f"a record is a JSON object, got {type(record).__name__}", source)
    if opts.columns:
        record = {**record, **{canon: record[col] for canon, col in opts.columns.items() if col in record}}
    sample_id = sample_id_of(record.get("id"), index, source)
    if is_preference_record(record):
        return preference_record(record, sample_id, source, opts)
    fmt = opts.format
    if fmt == "auto" and "conversations" in record and "messages" in record:
        raise SampleError(sample_id, "record", "bad_format", "holds both 'conversations' (LLaVA) and 'messages' "
                          "(OpenAI), and only one would be read: keep one (or set the source's format: llava or openai in a mix YAML)", source)
    if fmt == "auto":
        fmt = "llava" if "conversations" in record else "openai" if "messages" in record else "auto"
    if fmt == "llava" and "conversations" in record:
        sample = llava_record(record, sample_id, source, opts)
    elif fmt == "openai" and "messages" in record:
        sample = openai_record(record, sample_id, source, opts)
    else:
        sample = None
    if sample is not None:
        check_sample_values(sample)
        return sample
    wanted = {"auto": "'conversations' or 'messages'", "llava": "'conversations'", "openai": "'messages'"}[opts.format]
    raise SampleError(sample_id, "record", "bad_format", f"no {wanted} field (keys: {', '.join(map(str, record))})", source)


# -- files to records ---------------------------------------------------------------------------
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".yaml", ".yml", ".gz", ".zst")
"""A ``--data`` path ending so names a file, never a hub dataset."""

_UTF8_BOM = b"\xef\xbb\xbf"
JSON_CHUNK_SIZE = 1 << 20
"""Bytes of a JSON data file read at a time: reading one holds a chunk or so of its text and one
sample's objects, whatever the file's size."""


def _records(source: DataSource) -> Iterator[tuple[int, str, Any]]:
    """(index, where, record) for every record. A JSONL line that is not UTF-8 or not JSON is a
    ``SampleError`` for that line alone; a JSON list file that cannot be read is an
    :class:`InputFileError` naming the line and column."""
    path = Path(source.path)
    name = source.path
    if path.is_file() and (path.suffix == ".jsonl" or (path.suffix == ".json" and _is_json_lines(path))):
        yield from _json_lines(path, name)
        return
    if path.is_file() and path.suffix == ".json":
        for index, (record, repeated) in enumerate(_json_list(path, name)):
            where = f"{name}[{index}]"
            yield index, where, _repeated_keys_error(record, repeated, index, where) if repeated else record
        return
    yield from _hf_records(source)


def _repeated_keys_error(record: Any, repeated: list[str], index: int, where: str) -> SampleError:
    """A record some object of which writes a key twice: :mod:`json` would keep the last value
    without a word (a second ``"messages"`` replacing the first conversation)."""
    raw_id = record.get("id") if isinstance(record, dict) else None
    keys = ", ".join(f"'{k}'" for k in dict.fromkeys(repeated))
    return SampleError(str(raw_id) if raw_id not in (None, "") else str(index), repeated[0], "bad_format",
                       f"the key {keys} is written twice in one object (JSON would keep only the last); write it once",
                       where)


def _json_lines(path: Path, name: str) -> Iterator[tuple[int, str, Any]]:
    # Read as bytes, decoded line by line: one bad byte costs its line, not the file.
    repeated = RepeatedKeys()
    decode = repeated.decoder().decode
    with path.open("rb") as f:
        index = 0
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_UTF8_BOM)
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            repeated.found.clear()
            try:
                record: Any = decode(raw.decode("utf-8").rstrip("\r\n"))  # a column on this line, not the next
                if repeated.found:
                    record = _repeated_keys_error(record, repeated.found, index, where)
            except UnicodeDecodeError as exc:
                detail = f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}; save the file as UTF-8"
                record = SampleError(_id_of_unreadable(raw, index), "record", "bad_format", detail, where)
            except json.JSONDecodeError as exc:
                detail = f"invalid JSON at column {exc.colno}: {_json_problem(exc)}"
                record = SampleError(str(index), "record", "bad_format", detail, where)
            except (RecursionError, ValueError) as exc:
                reason = too_much(exc)
                if reason is None:
                    raise
                record = SampleError(str(index), "record", "bad_format", reason, where)
            yield index, where, record
            index += 1


def _id_of_unreadable(raw: bytes, index: int) -> str:
    """The ``id`` of a JSONL line that is not UTF-8, when the rest of it parses; else its index."""
    try:
        record = json.loads(raw.decode("utf-8", errors="replace"))
    except (json.JSONDecodeError, RecursionError, ValueError):
        return str(index)
    try:
        return sample_id_of(record.get("id") if isinstance(record, dict) else None, index, "")
    except SampleError:
        return str(index)


class _JsonDocument:
    """A JSON data file read a chunk at a time: its samples are the elements of its top-level
    list, or of the list under its top-level ``"data"`` key."""

    def __init__(self, file: BinaryIO) -> None:
        self.stream = JsonStream(file, JSON_CHUNK_SIZE)
        self.has_list = False

    def samples(self) -> Iterator[Any]:
        """Every sample, as the document's top-level value is parsed (not what may follow it)."""
        stream = self.stream
        first = stream.next_char()
        if first == "[":
            self.has_list = True
            yield from stream.array()
        elif first == "{":
            seen = False
            for key in stream.object_keys():
                if key != "data":
                    stream.value()
                    continue
                if seen:  # json keeps the last, but the first one's samples are already read
                    raise _RepeatedData
                seen = True
                self.has_list = stream.next_char() == "["
                if self.has_list:
                    yield from stream.array()
                else:
                    stream.value()
        else:
            stream.value()


class _RepeatedData(Exception):
    """A second top-level ``"data"`` key."""


def _json_list(path: Path, name: str) -> Iterator[tuple[Any, list[str]]]:
    """The samples of a JSON data file, one at a time, each with the keys it writes twice in
    one object; it is never held whole. A file that is not UTF-8 JSON is parsed whole again, to
    name the line, column and reason as :mod:`json` does."""
    with path.open("rb") as f:
        document = _JsonDocument(f)
        read = 0
        try:
            for record in document.samples():
                yield record, list(document.stream.repeated_keys.found)
                read += 1
            document.stream.expect_end()
        except UnreadableValue as exc:  # where the next record ends is unknown: the file stops here
            raise InputFileError(f"{name}:{_line_column(path, exc.pos)}: record {read}: {exc.reason}; a JSON list "
                                 "cannot be read past it (JSONL can: one record a line, each read alone)") from None
        except NotJson:
            _json_document(path, name)
            raise AssertionError(f"{name}: read in chunks it is not JSON, read whole it is") from None
        except _RepeatedData:
            raise InputFileError(f"{name}: the key 'data' is written twice; a JSON data file holds one list of samples") from None
    if not document.has_list:
        raise InputFileError(f"{name}: a JSON data file is a list of samples (or JSONL, one per line)")


def _json_document(path: Path, name: str) -> Any:
    """A JSON file parsed whole: an :class:`InputFileError` at ``FILE:LINE:COL`` when it is not
    UTF-8 JSON (``is it cut short?`` when it ends inside the document)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{name}:{not_utf8(raw, exc.start)}; save the file as UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        end = len(text.rstrip())
        cut = exc.pos >= end or exc.msg.startswith("Unterminated string")
        hint = f"; the file ends at line {text.count(chr(10), 0, end) + 1}: is it cut short?" if cut else ""
        raise InputFileError(f"{name}:{exc.lineno}:{exc.colno}: invalid JSON: {_json_problem(exc)}{hint}") from None


def _line_column(path: Path, pos: int) -> str:
    """``LINE:COLUMN`` of character ``pos`` of a UTF-8 file (past its byte-order mark)."""
    text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")[:pos]
    return f"{text.count(chr(10)) + 1}:{pos - (text.rfind(chr(10)) + 1) + 1}"


def _json_problem(exc: json.JSONDecodeError) -> str:
    """The decoder's words without their dangling "at" (it appends the position to them)."""
    return exc.msg.removesuffix(" at").removesuffix(" starting")


def _is_json_lines(path: Path) -> bool:
    """A ``.json`` file holding one object per line (a common naming) is read as JSONL: its first
    line holds one whole JSON object, or a broken one (that line is reported, the rest loads),
    unless that object is all the file holds and its ``"data"`` is the list of samples. A
    document whose first line does not close it (a pretty-printed ``{"data": [...]}``) is not."""
    with path.open("rb") as f:
        document = _JsonDocument(f)
        stream = document.stream
        try:
            if stream.next_char() != "{":
                return False
            for _ in document.samples():
                if stream.past_first_line():
                    return False
            if stream.past_first_line():
                return False
            return not document.has_list or stream.next_char() != ""
        except (NotJson, UnreadableValue) as exc:
            return not stream.past_first_line(exc.pos)
        except _RepeatedData:
            return not stream.past_first_line()


def _hf_records(source: DataSource) -> Iterator[tuple[int, str, Any]]:
    """Any ``datasets.load_dataset`` source: a parquet/json/csv file or folder, or a hub name."""
    path = Path(source.path)
    builders = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
    if path.is_file() and path.suffix not in builders:
        raise InputFileError(f"{source.path}: unknown data file type (known: .json, .jsonl, .parquet, .csv, .arrow)")
    check_data_path(source.path)
    from datasets import load_dataset

    if path.is_file():
        dataset = load_dataset(builders[path.suffix], data_files=str(path), split=source.split)
    elif path.exists():
        dataset = load_dataset(source.path, split=source.split)
    else:
        try:
            dataset = load_dataset(source.path, split=source.split)
        except (OSError, ValueError) as exc:  # offline, no such dataset, no such split
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputFileError(
                f"{source.path}: no such local file or folder, and no hub dataset could be loaded ({first})"
            ) from None
    for index, row in enumerate(dataset):
        yield index, f"{source.path}[{index}]", row


def looks_like_hub_name(name: str) -> bool:
    """``name`` or ``org/name`` without a data file suffix: a hub dataset id, if not a local path."""
    parts = name.split("/")
    return (1 <= len(parts) <= 2 and all(re.fullmatch(r"[\w.-]+", p) for p in parts)
            and not name.startswith((".", "~")) and not name.lower().endswith(DATA_FILE_SUFFIXES))


def check_data_path(path: str) -> None:
    """A path that is neither on disk nor a hub dataset id is ``no such file`` (it never goes to
    the hub), with the names close to it in its folder. Only regular files and folders are
    read: a FIFO or a device would block the reader, or feed it without end."""
    if Path(path).exists():
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise InputFileError(f"{path} is {not_regular(mode)}, not a file: only regular files are read")
        return
    if looks_like_hub_name(path):
        return
    folder = Path(path).parent
    names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
    import difflib

    close = difflib.get_close_matches(Path(path).name, names, n=3, cutoff=0.6)
    where = f" (did you mean: {', '.join(str(folder / c) if str(folder) != '.' else c for c in close)}?)" if close else ""
    raise InputFileError(f"no such file: {path}{where}")


def check_data_paths(data: str | os.PathLike | DataMix | Sequence[Any], **source_defaults: Any) -> DataMix:
    """``--data`` parsed and every local source checked to exist, before anything loads."""
    spec = parse_data_arg(data, **source_defaults)
    for source in spec.sources:
        check_data_path(source.path)
    return spec


def read_source(source: DataSource) -> SampleSet:
    """Every record of one source as a sample, or as a ``bad_format`` error; ids that records
    of this source write more than once are kept in ``duplicate_ids`` (a warning: reports name
    each record by its line too, so training goes on)."""
    errors: list[SampleError] = []
    id_column = source.columns.get("id", "id")
    # Per record that writes an id: its hash and where the record went (a sample's index, or ~ an
    # error's), 16 bytes rather than the id and its place as Python strings.
    id_hashes, id_slots = array("q"), array("q")
    kept = 0

    def encoded() -> Iterator[bytes]:
        nonlocal kept
        for index, where, record in _records(source):
            if isinstance(record, SampleError):
                errors.append(record)
                continue
            raw_id = record.get(id_column, record.get("id")) if isinstance(record, dict) else None
            try:
                blob = encode_sample(record_to_sample(record, index, where, source))
            except SampleError as exc:
                slot = ~len(errors)
                errors.append(exc)
            else:
                slot, kept = kept, kept + 1
                yield blob
            if raw_id not in (None, ""):
                id_hashes.append(hash(str(raw_id)))
                id_slots.append(slot)

    result = SampleSet.from_encoded(encoded())
    result.errors = errors
    result.duplicate_ids = _duplicate_ids(result, np.frombuffer(id_hashes, dtype=np.int64), id_slots)
    return result


def _duplicate_ids(samples: SampleSet, hashes: np.ndarray, slots: Sequence[int]) -> dict[str, list[str]]:
    """Ids written by more than one record -> where each record is, in order. Only records whose
    id's hash repeats are looked at; the id and place of each are its sample's (or error's), which
    :func:`record_to_sample` names by the record's id and ``where``."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    written: dict[str, list[str]] = {}
    for k in np.flatnonzero(counts[inverse] > 1).tolist():
        slot = slots[k]
        found = samples[slot] if slot >= 0 else samples.errors[~slot]
        written.setdefault(found.id if isinstance(found, Sample) else found.sample_id, []).append(found.source)
    return {i: wheres for i, wheres in written.items() if len(wheres) > 1}


def mix(sets: Sequence[SampleSet], weights: Sequence[float] | None, seed: int = 0, num_samples: int | None = None) -> SampleSet:
    """Sources concatenated, or resampled to the weights' shares of ``num_samples`` (default the
    total). A source asked for more than it holds repeats whole passes first; the choice and the
    final order depend only on ``seed``."""
    if weights is None and num_samples is None:
        return concat(sets)
    sizes = [len(s) for s in sets]
    total = num_samples or sum(sizes)
    weights = list(weights) if weights is not None else [float(n) for n in sizes]
    top = max(weights) or 1.0
    shares = [w / top for w in weights]  # a sum of weights near the largest float overflows
    norm = sum(shares) or 1.0
    rng = random.Random(seed)
    offsets = np.cumsum([0, *sizes])
    chosen: list[int] = []
    for k, (size, weight) in enumerate(zip(sizes, shares, strict=True)):
        want = round(total * weight / norm)
        if size == 0:
            if want:
                raise ValueError(f"data source {k} is empty but has weight {weight}")
            continue
        passes, rest = divmod(want, size)
        picks = list(range(size)) * passes + sorted(rng.sample(range(size), rest))
        chosen += [int(offsets[k]) + i for i in picks]
    rng.shuffle(chosen)
    return concat(sets).take(chosen)


def load_samples(
    data: str | os.PathLike | DataMix | Sequence[Any],
    *,
    seed: int | None = None,
    **source_defaults: Any,
) -> SampleSet:
    """Read ``--data`` (one source, ``a.json:0.7,b.jsonl:0.3``, a mix YAML or a list) into samples.

    ``source_defaults`` set ``format``, ``columns``, ``user_key``, ``assistant_key``,
    ``system_key`` or ``split`` for sources that do not set their own.
    """
    spec = parse_data_arg(data, **source_defaults)
    sets = [read_source(s) for s in spec.sources]
    records = sum(len(s) for s in sets)
    if spec.num_samples and spec.num_samples > MAX_REPEAT * max(records, 1):
        raise InputFileError(f"{data}: num_samples {spec.num_samples:,} from {records:,} records would repeat each about "
                             f"{spec.num_samples // max(records, 1):,} times (at most {MAX_REPEAT:,}): is it a typo?")
    return mix(sets, spec.shares, spec.seed if seed is None else seed, spec.num_samples)
