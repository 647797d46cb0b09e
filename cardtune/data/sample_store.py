"""The sample store: samples kept as data, one after another in one flat buffer.

Each sample is one JSON document (``[id, messages, images, videos, source]``): reading one back
is :func:`json.loads`, which runs no code whatever the bytes say, so a buffer saved in the data
cache (``$CARDTUNE_CACHE``), or edited there, can hold nothing but data. Values JSON does not
have are tagged objects: bytes (an HF image's ``{"bytes": ...}``) as base64, a PIL image (what
an HF ``Image`` column decodes to) as its mode, size, palette, info and raw pixels, as PIL's own
pickling keeps it; a value of any other type makes its record a ``bad_format`` error. JSON reads a
sample back faster than pickle did (about 13 vs 19 us on the bench's LLaVA records) and stores it
in fewer bytes (337 vs 410).

The buffer is an unlinked temporary file read a sample at a time (:class:`SpilledBuffer`), or an
array memory-mapped from the data cache: DataLoader and validation workers forked from the
training process share it without copying (a list of Python objects is copied page by page as
reference counts change), and memory per sample does not grow with the number of samples.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cardtune.conversation import Sample
from cardtune.errors import SampleError
from cardtune.registry.errors import InputFileError

TAG = "\x00cardtune"
"""The key of a tagged value. A key no data file writes by accident (it starts with NUL); a
sample whose own data writes it is refused rather than misread."""
_TAG_IN_TEXT = b'"\\u0000cardtune"'  # how json.dumps writes TAG (control characters escaped)


# -- one sample as bytes --------------------------------------------------------------------------
class _Tagger:
    """``json.dumps``' ``default``: the values JSON does not have, as tagged objects; counts them."""

    def __init__(self, sample: Sample) -> None:
        self.sample = sample
        self.made = 0

    def tag(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.made += 1
        return {TAG: kind, **fields}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.tag("bytes", base64=base64.b64encode(value).decode("ascii"))
        if isinstance(value, np.generic):  # a number or string of a numpy-backed column
            return value.item()
        pil = sys.modules.get("PIL.Image")  # not imported: the value is no PIL image
        if pil is not None and isinstance(value, pil.Image):
            return self.image(value)
        raise SampleError(self.sample.id, "record", "bad_format",
                          f"holds a value of type {type(value).__module__}.{type(value).__qualname__}, which cardtune "
                          "does not keep (text, numbers, lists, objects, bytes and images are kept)", self.sample.source)

    def image(self, image: Any) -> dict[str, Any]:
        palette = image.getpalette() if image.mode in ("P", "PA", "L", "LA") else None
        info = {str(k): v for k, v in ((k, self.info_value(v)) for k, v in image.info.items()) if v is not None}
        return self.tag("image", mode=image.mode, size=list(image.size), palette=palette, info=info,
                        pixels=base64.b64encode(image.tobytes()).decode("ascii"))

    def info_value(self, value: Any) -> Any:
        """An image's info entry (dpi, exif, icc_profile, transparency...) as JSON, tuples kept as
        tuples (Pillow reads some so); None for one that is not plain data (it is left out)."""
        if isinstance(value, (str, int, float, bool)):
            return value
        if isinstance(value, (bytes, bytearray)):
            return self(value)
        if isinstance(value, (tuple, list)):
            items = [self.info_value(v) for v in value]
            if any(v is None for v in items):
                return None
            return self.tag("tuple", items=items) if isinstance(value, tuple) else items
        try:  # a rational (TIFF and EXIF resolutions)
            return float(value)
        except (TypeError, ValueError):
            return None


def encode_sample(sample: Sample) -> bytes:
    """``sample`` as one JSON document; a :class:`SampleError` (``bad_format``) for a value of a
    type the store does not keep."""
    tagger = _Tagger(sample)
    text = json.dumps([sample.id, sample.messages, sample.images, sample.videos, sample.source],
                      separators=(",", ":"), default=tagger).encode("ascii")
    if tagger.made and text.count(_TAG_IN_TEXT) != tagger.made or not tagger.made and _TAG_IN_TEXT in text:
        raise SampleError(sample.id, "record", "bad_format", f"writes {TAG!r}, a key cardtune keeps for itself",
                          sample.source)
    return text


def decode_sample(blob: bytes) -> Sample:
    """The sample :func:`encode_sample` wrote; a ``ValueError`` for bytes it did not write."""
    values = json.loads(blob, object_hook=_untag) if _TAG_IN_TEXT in blob else json.loads(blob)
    if not isinstance(values, list) or len(values) != 5:
        raise ValueError("not a stored sample")
    return Sample(*values)


def _untag(obj: dict[str, Any]) -> Any:
    kind = obj.get(TAG)
    if kind is None:
        return obj
    if kind == "bytes":
        return base64.b64decode(obj["base64"], validate=True)
    if kind == "tuple":
        return tuple(obj["items"])
    if kind == "image":
        return _image(obj)
    raise ValueError(f"unknown stored value {kind!r}")


def _image(obj: dict[str, Any]) -> Any:
    from PIL import Image

    pixels = base64.b64decode(obj["pixels"], validate=True)
    width, height = obj["size"]
    if not (isinstance(width, int) and isinstance(height, int)) or width * height > 8 * len(pixels) + 8:
        raise ValueError("a stored image's size does not match its pixels")
    image = Image.frombytes(obj["mode"], (width, height), pixels)
    if obj["palette"]:
        image.putpalette(obj["palette"])
    image.info.update(obj["info"])
    return image


# -- the store ----------------------------------------------------------------------------------
class SpilledBuffer:
    """Encoded samples in an unlinked temporary file (``$TMPDIR``), read back one sample at a time
    (``os.pread``): what a set holds lives in the page cache, not in the memory of any process,
    so reading a dataset of N records costs the same memory for every N. Processes forked from
    this one (validation workers, DataLoader workers) read the same file; pickled (a spawned
    worker), it becomes the bytes themselves."""

    CHUNK = 1 << 22

    def __init__(self) -> None:
        import tempfile

        self._file = tempfile.TemporaryFile(prefix="cardtune-samples-")
        self.nbytes = 0

    def append(self, blob: bytes) -> None:
        try:
            self._file.write(blob)
        except OSError as exc:
            raise self._full(exc) from None
        self.nbytes += len(blob)

    def close_writing(self) -> SpilledBuffer:
        try:
            self._file.flush()
        except OSError as exc:
            raise self._full(exc) from None
        return self

    def _full(self, exc: OSError) -> Exception:
        import tempfile

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        return InputFileError(
            f"{tempfile.gettempdir()}: no space left for the samples read from the data "
            f"({self.nbytes / 2**20:,.0f} MiB written): set TMPDIR to a folder with room")

    def __getitem__(self, span: slice) -> bytes:
        return os.pread(self._file.fileno(), span.stop - span.start, span.start)

    def chunks(self) -> Iterator[bytes]:
        for start in range(0, self.nbytes, self.CHUNK):
            yield self[start : min(start + self.CHUNK, self.nbytes)]

    def __reduce__(self) -> tuple[Any, ...]:
        return np.frombuffer, (b"".join(self.chunks()), np.uint8)


def buffer_chunks(buffer: Any) -> Iterator[Any]:
    """A sample buffer's bytes a few MiB at a time (a spilled file, or an array, mapped or not)."""
    if isinstance(buffer, SpilledBuffer):
        yield from buffer.chunks()
        return
    for start in range(0, len(buffer), SpilledBuffer.CHUNK):
        yield buffer[start : start + SpilledBuffer.CHUNK]


class SampleSet(Sequence[Sample]):
    """Samples (encoded, one after another in one buffer: a :class:`SpilledBuffer` as read, an
    array memory-mapped from the data cache) plus the records that could not become samples."""

    def __init__(
        self,
        buffer: Any,
        offsets: np.ndarray,
        errors: list[SampleError] | None = None,
        order: np.ndarray | None = None,
        duplicate_ids: dict[str, list[str]] | None = None,
    ) -> None:
        self._buffer = buffer
        self._offsets = offsets
        self._order = order
        self.errors: list[SampleError] = list(errors or [])
        self.duplicate_ids: dict[str, list[str]] = dict(duplicate_ids or {})
        """An ``id`` written by more than one record of one file -> where each is (``file:line``)."""

    @classmethod
    def from_samples(cls, samples: Iterable[Sample], errors: Iterable[SampleError] = ()) -> SampleSet:
        return cls.from_encoded((encode_sample(s) for s in samples), errors)

    @classmethod
    def from_encoded(cls, blobs: Iterable[bytes], errors: Iterable[SampleError] = ()) -> SampleSet:
        """The samples :func:`encode_sample` wrote, in order."""
        buffer = SpilledBuffer()
        offsets = array("q", [0])
        for blob in blobs:
            buffer.append(blob)
            offsets.append(buffer.nbytes)
        return cls(buffer.close_writing(), np.frombuffer(offsets, dtype=np.int64), list(errors))

    def __len__(self) -> int:
        return len(self._order) if self._order is not None else len(self._offsets) - 1

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("SampleSet does not slice; use take(indices)")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = int(self._order[index]) if self._order is not None else index
        return decode_sample(bytes(self._buffer[int(self._offsets[i]) : int(self._offsets[i + 1])]))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def storage_index(self, index: int) -> int:
        """Which stored record position ``index`` is (repeats of an upsampled record share one)."""
        return int(self._order[index]) if self._order is not None else index

    def take(self, indices: Sequence[int]) -> SampleSet:
        """The samples at ``indices`` (repeats allowed), sharing this set's buffer."""
        base = self._order if self._order is not None else np.arange(len(self._offsets) - 1)
        return SampleSet(self._buffer, self._offsets, self.errors, base[np.asarray(indices, dtype=np.int64)],
                         self.duplicate_ids)

    def save_buffer(self, path: Path) -> None:
        """The encoded samples as one ``.npy`` array of bytes (``np.load(mmap_mode="r")`` reads it
        back), written a chunk at a time: saving costs no memory either."""
        size = int(self._offsets[-1])
        with path.open("wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
            for chunk in buffer_chunks(self._buffer):
                f.write(chunk)


def concat(sets: Sequence[SampleSet]) -> SampleSet:
    if len(sets) == 1:  # one source: its buffer as it is, not a copy of it
        return sets[0]
    buffer = SpilledBuffer()
    offsets, errors, orders, count = [np.zeros(1, dtype=np.int64)], [], [], 0
    duplicate_ids: dict[str, list[str]] = {}
    for s in sets:
        for sample_id, wheres in s.duplicate_ids.items():
            duplicate_ids.setdefault(sample_id, []).extend(wheres)
        offsets.append(s._offsets[1:] + buffer.nbytes)
        for chunk in buffer_chunks(s._buffer):
            buffer.append(bytes(chunk))
        orders.append((s._order if s._order is not None else np.arange(len(s._offsets) - 1)) + count)
        count += len(s._offsets) - 1
        errors += s.errors
    order = np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)
    return SampleSet(buffer.close_writing(), np.concatenate(offsets), errors, order, duplicate_ids)
