"""The sample store: samples read from a data file live in an unlinked temporary file, read back
one at a time, so reading N records does not cost memory in N; forked workers, spawned workers
(pickled) and the data cache all read the same samples."""

from __future__ import annotations

import errno
import multiprocessing
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from cardtune.conversation import Sample
from cardtune.data.sample_store import SampleSet, SpilledBuffer, concat
from cardtune.registry.errors import InputFileError


def samples(n: int, tag: str = "s") -> list[Sample]:
    return [Sample(f"{tag}{i}", [{"role": "user", "content": f"question {i} " + "x" * (i % 50)},
                                 {"role": "assistant", "content": f"answer {i}"}], images=[f"img_{i % 7}.jpg"],
                   source=f"d.json[{i}]") for i in range(n)]


def as_tuples(items) -> list[tuple]:
    return [(s.id, s.messages, s.images, s.source) for s in items]


def test_reading_many_samples_holds_none_of_them_in_memory() -> None:
    made = [Sample(s.id, s.messages + [{"role": "user", "content": "y" * 500}], s.images, source=s.source)
            for s in samples(20_000)]
    tracemalloc.start()
    try:
        store = SampleSet.from_samples(iter(made))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(store._buffer, SpilledBuffer) and store._buffer.nbytes > 13_000_000
    # the offsets (160 KB), one sample at a time and the modules imported on first use: a small
    # share of the samples' 13+ MB, which the store held in memory before
    assert peak < store._buffer.nbytes / 5
    assert as_tuples(store) == as_tuples(made)
    assert as_tuples([store[-1], store[0]]) == as_tuples([made[-1], made[0]])


def _read_in_child(store: SampleSet, indices: list[int], queue) -> None:
    queue.put([store[i].id for i in indices])


def test_a_forked_worker_reads_the_same_samples() -> None:
    store = SampleSet.from_samples(samples(500))
    queue = multiprocessing.get_context("fork").Queue()
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(store, [0, 250, 499], queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert got == ["s0", "s250", "s499"] and child.exitcode == 0


def test_a_pickled_set_carries_its_samples() -> None:
    store = SampleSet.from_samples(samples(300)).take([5, 5, 299, 0])
    again = pickle.loads(pickle.dumps(store))
    assert isinstance(again._buffer, np.ndarray)
    assert [s.id for s in again] == ["s5", "s5", "s299", "s0"]


def test_concat_and_the_saved_buffer_read_back_the_same(tmp_path: Path) -> None:
    a, b = SampleSet.from_samples(samples(40, "a")), SampleSet.from_samples(samples(30, "b"))
    both = concat([a.take([39, 0]), b])
    assert [s.id for s in both] == ["a39", "a0"] + [f"b{i}" for i in range(30)]
    both.save_buffer(tmp_path / "buffer.npy")
    mapped = SampleSet(np.load(tmp_path / "buffer.npy", mmap_mode="r"), both._offsets, order=both._order)
    assert as_tuples(mapped) == as_tuples(both)
    assert concat([mapped, a]).__len__() == 72 and concat([mapped, a])[71].id == "a39"


def test_an_empty_set() -> None:
    empty = SampleSet.from_samples([])
    assert len(empty) == 0 and list(empty) == [] and empty._buffer.nbytes == 0



class _FullFile:
    def write(self, blob: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass


def test_a_full_temporary_folder_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.TemporaryFile", lambda **kwargs: _FullFile())
    monkeypatch.setattr("tempfile.gettempdir", lambda: "/tmp/small")
    with pytest.raises(InputFileError) as err:
        SampleSet.from_samples(samples(3))
    assert str(err.value) == ("/tmp/small: no space left for the samples read from the data (0 MiB written): "
                              "set TMPDIR to a folder with room")


# -- samples kept as data ----------------------------------------------------------------------
def test_samples_are_kept_as_json_and_read_back_exactly() -> None:
    import datetime

    from PIL import Image

    from cardtune.data.sample_store import decode_sample, encode_sample
    from cardtune.errors import SampleError

    rgb = Image.new("RGB", (5, 3), (10, 20, 30))
    rgb.info.update({"dpi": (72.0, 72.0), "exif": b"Exif\x00\x00MM", "comment": "made here"})
    palette = Image.new("P", (4, 4), 2)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    palette.info["transparency"] = 0
    deep = Image.new("I;16", (3, 2), 40000)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\ud800 lone, ünïcode, \x00"}]},
                {"role": "assistant", "content": [{"type": "text", "text": np.float32(1.5)}]}]
    sample = Sample("s", messages, images=[rgb, palette, deep, {"bytes": b"\x89PNG\x00", "path": None}, "a.png"],
                    videos=[["f0.png", "f1.png"]], source="d.parquet[3]")
    blob = encode_sample(sample)
    assert b"pickle" not in blob and blob.isascii()
    back = decode_sample(blob)
    assert (back.id, back.videos, back.source) == ("s", [["f0.png", "f1.png"]], "d.parquet[3]")
    assert back.messages[0] == messages[0] and back.messages[1]["content"][0]["text"] == 1.5
    for before, after in zip(sample.images[:3], back.images[:3], strict=True):
        assert (after.mode, after.size, after.tobytes()) == (before.mode, before.size, before.tobytes())
    assert back.images[0].info == rgb.info and back.images[1].getpalette() == palette.getpalette()
    assert back.images[1].info["transparency"] == 0
    assert back.images[3:] == [{"bytes": b"\x89PNG\x00", "path": None}, "a.png"]
    with pytest.raises(SampleError) as info:
        encode_sample(Sample("when", [{"role": "user", "content": datetime.date(2024, 1, 1)}], source="d.parquet[4]"))
    assert str(info.value) == ("sample when (d.parquet[4]): record: bad_format: holds a value of type datetime.date, "
                               "which cardtune does not keep (text, numbers, lists, objects, bytes and images are kept)")
    with pytest.raises(SampleError, match="a key cardtune keeps for itself"):
        encode_sample(Sample("tag", [{"role": "user", "content": "x", "\x00cardtune": "bytes"}]))
    with pytest.raises(ValueError):
        decode_sample(b'["s",[],[{"\\u0000cardtune":"image","mode":"RGB","size":[100000,100000],"palette":null,'
                      b'"info":{},"pixels":""}],[],""]')
