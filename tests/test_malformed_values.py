"""Malformed values in data and mix files (issue 18, item 12): a value of the wrong type, text no
tokenizer takes, a structure too deep, a number out of range. Each is one line naming the file,
the record and the field (or the mix's line), counted with the rest, never a traceback; the
good records of the same file still load. Recipe values: tests/test_train_options.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cardtune.data.formats import load_samples
from cardtune.registry.errors import InputFileError

USER, ANSWER = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}
LLAVA_ANSWER = {"from": "gpt", "value": "ok"}


def openai(**record: object) -> str:
    return json.dumps({"messages": [USER, ANSWER], **record}, ensure_ascii=False)


# (what, the JSONL line, the field named, the reason, words of the detail)
RECORDS = [
    # a value of the wrong type
    ("role is a list", json.dumps({"messages": [{"role": ["user"], "content": "hi"}, ANSWER]}),
     "messages[0].role", "bad_format", "a role is text (system, user, assistant), got list: ['user']"),
    ("from is a list", json.dumps({"conversations": [{"from": ["human"], "value": "hi"}, LLAVA_ANSWER]}),
     "conversations[0].from", "bad_format", "a role is text (human, gpt, system), got list: ['human']"),
    ("id is a mapping", openai(id={"a": 1}), "id", "bad_format", "an id is text or a number, got dict: {'a': 1}"),
    ("id is not finite", openai(id=float("inf")), "id", "bad_format", "an id is text or a number, got float: inf"),
    ("content is a number", json.dumps({"messages": [{"role": "user", "content": 5}, ANSWER]}),
     "messages[0].content", "non_string_turn", "user turn text is int: 5"),
    ("content is null", json.dumps({"messages": [USER, {"role": "assistant", "content": None}]}),
     "messages[1].content", "non_string_turn", "assistant turn text is NoneType: None"),
    ("content is a list of numbers", json.dumps({"messages": [{"role": "user", "content": [1, 2]}, ANSWER]}),
     "messages[0].content[0]", "bad_format", "a content part is an object ({type: text, text: ...}, ...), got int: 1"),
    ("an image part's path is a number", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": 5}, {"type": "text", "text": "hi"}]}, ANSWER]}),
     "images[0]", "bad_format", "an image is a path (text), got int: 5"),
    ("an image is a list in a list", json.dumps({"image": [["a.png"]], "conversations": [
        {"from": "human", "value": "<image>hi"}, LLAVA_ANSWER]}),
     "images[0]", "bad_format", "an image is a path (text), got list: ['a.png']"),
    ("an image is a mapping of something else", json.dumps({"image": {"x": 1}, "conversations": [
        {"from": "human", "value": "<image>hi"}, LLAVA_ANSWER]}),
     "images[0]", "bad_format", "an image is a path, or {bytes, path} as datasets stores one; got a mapping of ['x']"),
    # text no tokenizer takes
    ("a lone surrogate", '{"messages": [{"role": "user", "content": "hi \\ud800 there"}, {"role": "assistant", '
     '"content": "ok"}]}', "messages[0].content", "bad_format",
     "the text holds a lone surrogate (\\ud800) at character 4: half of a UTF-16 pair, not a character"),
    ("a NUL in an answer", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
     '"content": "o\\u0000k"}]}', "messages[1].content", "bad_format",
     "the text holds a NUL character (\\u0000) at character 2: binary data in a text field?"),
    ("a NUL in an image path", json.dumps({"image": "a\u0000.png", "conversations": [
        {"from": "human", "value": "<image>hi"}, LLAVA_ANSWER]}),
     "images[0]", "bad_format", "the path holds a NUL character (\\u0000) at character 2"),
    ("a lone surrogate in the id", '{"id": "x\\udfff", "messages": [{"role": "user", "content": "hi"}, '
     '{"role": "assistant", "content": "ok"}]}', "id", "bad_format", "the id holds a lone surrogate (\\udfff)"),
    # a structure too deep
    ("a record nested 100,000 deep", '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "record", "bad_format",
     "lists and objects nested too deep to read"),
    ("an image path nested 10,000 deep", '{"image": ' + "[" * 10_000 + '"a.png"' + "]" * 10_000
     + ', "conversations": []}', "record", "bad_format", "lists and objects nested too deep to read"),
    ("an image path nested 900 deep", '{"image": ' + "[" * 900 + '"a.png"' + "]" * 900
     + ', "conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "ok"}]}',
     "images[0]", "bad_format", "an image is a path (text), got list: [[[...]]]"),
    # a number out of range
    ("an integer of 5,000 digits", '{"id": ' + "9" * 5000 + ', "messages": []}', "record", "bad_format",
     "a number of 5,000 digits: too long to read (at most 4,300)"),
]


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bad record, one a line, between good ones."""
    path = tmp_path_factory.mktemp("bad") / "data.jsonl"
    lines = [openai(id="good-first")] + [line for _, line, *_ in RECORDS] + [openai(id="good-last")]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(("what", "line", "field", "reason", "detail"), RECORDS, ids=[r[0] for r in RECORDS])
def test_a_malformed_value_is_one_error_naming_the_record_and_field(bad_file: Path, what: str, line: str, field: str,
                                                                   reason: str, detail: str) -> None:
    samples = load_samples(str(bad_file))
    lineno = 2 + [r[0] for r in RECORDS].index(what)
    found = [e for e in samples.errors if e.source == f"{bad_file}:{lineno}"]
    assert len(found) == 1, [str(e) for e in samples.errors]
    error = found[0]
    assert (error.field, error.reason) == (field, reason), str(error)
    assert detail in error.detail
    assert "\n" not in str(error) and str(error).encode("utf-8")  # one line, printable as UTF-8


def test_the_good_records_around_them_load(bad_file: Path) -> None:
    samples = load_samples(str(bad_file))
    assert [s.id for s in samples] == ["good-first", "good-last"]
    assert len(samples.errors) == len(RECORDS)


def test_validate_data_reports_them_all_and_exits_1(bad_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the command a user runs: a table row each, printed as UTF-8, no traceback."""
    from cardtune.cli import main

    code = main(["validate-data", "--model_id", "tiny-llava-demo", "--data", str(bad_file), "--no-encode"])
    printed = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in printed.err
    assert f"{len(RECORDS)} of {len(RECORDS) + 2} records have problems" in printed.out + printed.err
    printed.out.encode("utf-8")


@pytest.mark.parametrize(("text", "said"), [
    ("[" + "[" * 100_000 + "]" * 100_000 + "]", ":1:2: record 0: lists and objects nested too deep to read"),
    ('[{"messages": []},\n {"id": ' + "9" * 5000 + "}]", ":2:2: record 1: a number of 5,000 digits: too long to read "
     "(at most 4,300); a JSON list cannot be read past it (JSONL can: one record a line, each read alone)"),
])
def test_a_json_list_file_stops_at_a_record_it_cannot_read(tmp_path: Path, text: str, said: str) -> None:
    """A JSON list is read a record at a time: where the unreadable record ends is unknown, so the
    file stops there, naming its line, column and record (was RecursionError / a line naming nothing)."""
    path = tmp_path / "data.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        load_samples(str(path))
    assert str(info.value).startswith(f"{path}{said}"), str(info.value)


MIXES = [
    ("weight: -1", "sources[0].weight: Input should be greater than 0"),
    ("weight: .nan", "sources[0].weight: Input should be greater than 0"),
    ("weight: 1e309", "sources[0].weight: Input should be a finite number"),
    ("weight: .inf", "sources[0].weight: Input should be a finite number"),
    ("weight: heavy", "sources[0].weight: input should be a valid number, unable to parse string as a number, got "
     "'heavy'"),
    ("weight: true", "sources[0].weight: a number, not true"),
    ("weight: [1]", "sources[0].weight: input should be a valid number, got [1]"),
    ("path: \"a\\0.jsonl\"", "sources[0].path: the text holds a NUL character (\\u0000) at character 2: binary data "
     "in a text field?"),
]


@pytest.mark.parametrize(("line", "said"), MIXES, ids=[m[0] for m in MIXES])
def test_a_bad_value_in_a_mix_is_one_line_at_its_line(tmp_path: Path, line: str, said: str) -> None:
    (tmp_path / "a.jsonl").write_text(openai() + "\n", encoding="utf-8")
    key = line.split(":")[0]
    first = line if key == "path" else "path: a.jsonl"
    weight = f"\n    {line}" if key != "path" else "\n    weight: 1"
    mix = tmp_path / "mix.yaml"
    mix.write_text(f"sources:\n  - {first}{weight}\n  - path: a.jsonl\n    weight: 1\n", encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        load_samples(str(mix))
    line_no = 2 if key == "path" else 3
    assert str(info.value) == f"{mix}:{line_no}: {said}"


def test_weights_that_overflow_their_sum_still_mix(tmp_path: Path) -> None:
    """1e308 + 1e308 is infinite: shares are computed without that sum (was 'cannot convert float
    NaN to integer')."""
    (tmp_path / "a.jsonl").write_text(openai(id="a") + "\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(openai(id="b") + "\n", encoding="utf-8")
    mix = tmp_path / "mix.yaml"
    mix.write_text("num_samples: 4\nsources:\n  - {path: a.jsonl, weight: 1.0e+308}\n"
                   "  - {path: b.jsonl, weight: 1.0e+308}\n", encoding="utf-8")
    assert sorted(s.id for s in load_samples(str(mix))) == ["a", "a", "b", "b"]


def test_a_mix_asking_for_more_samples_than_it_can_hold_is_one_line(tmp_path: Path) -> None:
    """num_samples 10^14 of one record was a MemoryError."""
    (tmp_path / "a.jsonl").write_text(openai() + "\n", encoding="utf-8")
    mix = tmp_path / "mix.yaml"
    mix.write_text("num_samples: 100000000000000\nsources:\n  - a.jsonl\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"mix.yaml:1: num_samples: Input should be less than or equal to "):
        load_samples(str(mix))
    mix.write_text("num_samples: 2000\nsources:\n  - a.jsonl\n", encoding="utf-8")
    with pytest.raises(InputFileError, match=r"num_samples 2,000 from 1 records would repeat each about 2,000 times"):
        load_samples(str(mix))


@pytest.mark.parametrize(("data", "said"), [
    ("a.jsonl:nan,a.jsonl:1", "a.jsonl:nan: weight: Input should be greater than 0, got nan"),
    ("a.jsonl:1e309,a.jsonl:1", "a.jsonl:1e309: weight: Input should be a finite number, got inf"),
    ("a.jsonl:0.5,a.jsonl", "give a weight to every source or to none"),
])
def test_a_bad_weight_on_the_command_line_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: str,
                                                      said: str) -> None:
    """``--data a.jsonl:0.7,b.jsonl:0.3``: was a pydantic ValidationError traceback."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text(openai() + "\n", encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        load_samples(data)
    assert str(info.value) == f"--data {data}: {said}"
