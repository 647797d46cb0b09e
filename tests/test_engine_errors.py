"""SampleError crosses process boundaries: a worker process (validation's pool, a DataLoader
worker returning errors as values) sends it back pickled, and it must arrive with every field."""

from __future__ import annotations

import multiprocessing
import pickle


def test_sample_error_pickles():
    from cardtune.errors import SampleError

    for err in (SampleError("s-7", "images[1]", "missing_media", "imgs/b.png does not exist", "train.jsonl:8"),
                SampleError("s-8", "messages", "no_assistant_turn")):
        err.index = 3  # attributes set later travel too
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is SampleError
        assert (back.sample_id, back.field, back.reason, back.detail, back.source) == (
            err.sample_id, err.field, err.reason, err.detail, err.source)
        assert str(back) == str(err) and back.args == err.args and back.index == 3
        assert back.to_dict() == err.to_dict()


def _fail(sample_id: str) -> None:
    from cardtune.errors import SampleError

    raise SampleError(sample_id, "messages", "label_contract", "spans differ", "d.jsonl:2")


def test_sample_error_raised_in_a_worker_process_arrives_whole():
    from cardtune.errors import SampleError

    with multiprocessing.get_context("fork").Pool(1) as pool:
        try:
            pool.apply_async(_fail, ("w-1",)).get(timeout=60)  # an unpicklable error hangs the pool
        except SampleError as err:
            got = err
    assert (got.sample_id, got.field, got.reason, got.detail, got.source) == (
        "w-1", "messages", "label_contract", "spans differ", "d.jsonl:2")
    assert str(got) == "sample w-1 (d.jsonl:2): messages: label_contract: spans differ"
