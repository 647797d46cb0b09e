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
from cardtune.data.formats import SampleSet, SpilledBuffer, concat
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
    assert isinstance(store._buffer, SpilledBuffer) and store._buffer.nbytes > 14_000_000
    # the offsets (160 KB), one pickle at a time and the modules imported on first use: a small
    # share of the samples' 14+ MB, which the store held in memory before
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
