"""JSON data files read a chunk at a time (issue 13): the same samples and the same errors, to the
line and column, as parsing the whole file; which ``.json`` files are JSON Lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cardtune.data import formats
from cardtune.data.formats import load_samples
from cardtune.registry.errors import InputFileError

CHUNK_SIZES = (1, 2, 3, 7, 64, 1 << 20)


def rec(i: int | str, answer: str = "Fine.") -> dict:
    return {"id": f"s{i}" if isinstance(i, int) else i,
            "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": answer}]}


@pytest.fixture(params=CHUNK_SIZES)
def chunk_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(formats, "JSON_CHUNK_SIZE", request.param)
    return request.param


def read(path: Path) -> list[tuple[str, str, list]]:
    samples = load_samples(str(path))
    assert not samples.errors
    return [(s.id, s.source, s.messages) for s in samples]


def message(path: Path) -> str:
    with pytest.raises(InputFileError) as info:
        load_samples(str(path))
    return str(info.value)


def json_error(text: str) -> json.JSONDecodeError:
    with pytest.raises(json.JSONDecodeError) as info:
        json.loads(text)
    return info.value


# -- records split across chunks --------------------------------------------------------------
def test_records_split_across_chunks_read_as_whole(tmp_path: Path, chunk_size: int) -> None:
    records = [rec(i, "caf\u00e9 \U0001f600 \"quoted\" \\ back" * (i % 3)) for i in range(40)]
    records[7]["id"] = 123456789  # a number split between two chunks is one number
    records[8]["id"] = 1.5e30
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    assert path.stat().st_size > 40 * chunk_size or chunk_size == 1 << 20
    got = read(path)
    assert [i for i, _, _ in got] == [f"s{i}" for i in range(7)] + ["123456789", "1.5e+30"] + [f"s{i}" for i in range(9, 40)]
    assert [s for _, s, _ in got] == [f"{path}[{i}]" for i in range(40)]
    assert got[1][2][1]["content"] == [{"type": "text", "text": "caf\u00e9 \U0001f600 \"quoted\" \\ back"}]


@pytest.mark.parametrize("layout", ["compact", "pretty", "spaced", "crlf-tabs"])
def test_whitespace_and_separators_do_not_matter(tmp_path: Path, chunk_size: int, layout: str) -> None:
    records = [rec(i) for i in range(5)]
    text = {
        "compact": json.dumps(records, separators=(",", ":")),
        "pretty": json.dumps(records, indent=2),
        "spaced": " [ " + " , ".join(json.dumps(r) for r in records) + " ] \n\n",
        "crlf-tabs": "\r\n\t[\r\n\t" + ",\r\n\t".join(json.dumps(r, indent="\t") for r in records) + "\r\n]\r\n",
    }[layout]
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8", newline="")
    assert [i for i, _, _ in read(path)] == [f"s{i}" for i in range(5)]


@pytest.mark.parametrize("text", ["[]", " [ \n ] \n", '{"data": []}', '{\n  "data": [\n  ]\n}\n'])
def test_an_empty_list_is_no_samples(tmp_path: Path, chunk_size: int, text: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    samples = load_samples(str(path))
    assert (len(samples), samples.errors, samples.duplicate_ids) == (0, [], {})


def test_a_byte_order_mark_split_across_chunks_is_not_data(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([rec(0), rec(1)]).encode())
    assert [i for i, _, _ in read(path)] == ["s0", "s1"]


# -- the {"data": [...]} wrapper --------------------------------------------------------------
@pytest.mark.parametrize("indent", [None, 2])
def test_the_data_wrapper_with_other_keys_around_it(tmp_path: Path, chunk_size: int, indent: int | None) -> None:
    document = {"info": {"version": 2, "data": [1, 2]}, "d\u0061ta": [rec(i) for i in range(4)], "count": 4}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(document, indent=indent), encoding="utf-8")
    got = read(path)
    assert [(i, s) for i, s, _ in got] == [(f"s{i}", f"{path}[{i}]") for i in range(4)]


def test_a_pretty_printed_wrapper_is_a_document_not_json_lines(tmp_path: Path) -> None:
    """Its first line is "{": read as JSON Lines, every line of it was a bad record."""
    path = tmp_path / "d.json"
    path.write_text('{\n  "data": [\n    ' + ",\n    ".join(json.dumps(rec(i)) for i in range(3)) + "\n  ]\n}\n")
    assert [s for _, s, _ in read(path)] == [f"{path}[{i}]" for i in range(3)]


@pytest.mark.parametrize("text", [
    '{\n "data": 5\n}', '{\n "rows": [' + json.dumps(rec(0)) + "]\n}", "{\n}", "12345", '"text"', "null",
])
def test_a_document_that_holds_no_list_of_samples(tmp_path: Path, chunk_size: int, text: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text + "\n", encoding="utf-8")
    assert message(path) == f"{path}: a JSON data file is a list of samples (or JSONL, one per line)"


def test_the_data_key_twice_is_an_error(tmp_path: Path, chunk_size: int) -> None:
    """json would keep the last one; the first one's samples are read by then."""
    path = tmp_path / "d.json"
    path.write_text('{"data": [' + json.dumps(rec(0)) + '],\n "data": []}')
    assert message(path) == f"{path}: the key 'data' is written twice; a JSON data file holds one list of samples"


# -- errors: where json.loads of the whole file puts them -------------------------------------
def test_a_syntax_error_after_many_chunks_names_the_line_and_column(tmp_path: Path, chunk_size: int) -> None:
    text = json.dumps([rec(i) for i in range(30)], indent=2)
    at = text.index('"s25"')
    text = text[:at] + '"s25" "' + text[at + len('"s25"'):]  # a string where a ':' or ',' belongs
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    error = json_error(text)
    line = text.count("\n", 0, at) + 1
    # '    "id": "s25" "': the value at column 11, the stray quote at 17
    assert (error.lineno, error.colno, error.msg) == (line, 17, "Expecting ',' delimiter")
    assert message(path) == f"{path}:{line}:17: invalid JSON: Expecting ',' delimiter"


@pytest.mark.parametrize(("bad", "expected"), [
    ("[{}, {},]", None),  # a trailing comma: json's words for it changed in Python 3.13
    ("[{} {}]", "1:5: invalid JSON: Expecting ',' delimiter"),
    ("[,{}]", "1:2: invalid JSON: Expecting value"),
    ("[{}],", "1:5: invalid JSON: Extra data"),
    ("[{}] []", "1:6: invalid JSON: Extra data"),
    ('{"data": [{}]} x', "1:16: invalid JSON: Extra data"),
    ('{"data" [{}]}', "1:9: invalid JSON: Expecting ':' delimiter"),
    ("{data: []}", "1:2: invalid JSON: Expecting property name enclosed in double quotes"),
    ("[1e5x]", "1:5: invalid JSON: Expecting ',' delimiter"),
    ("[-Infinityx]", "1:11: invalid JSON: Expecting ',' delimiter"),
])
def test_syntax_errors_read_as_json_reads_them(tmp_path: Path, chunk_size: int, bad: str, expected: str | None) -> None:
    text = (" " * 40 + "\n") * 3 + bad
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    error = json_error(text)
    assert message(path) == f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}"
    if expected is not None:
        line, column, rest = expected.split(":", 2)
        assert message(path) == f"{path}:{int(line) + 3}:{column}:{rest}"


def test_a_second_byte_order_mark(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" * 2 + b"[]")
    assert message(path) == f"{path}:1:1: invalid JSON: Unexpected UTF-8 BOM (decode using utf-8-sig)"


def test_a_file_cut_short_after_many_chunks(tmp_path: Path, chunk_size: int) -> None:
    text = json.dumps([rec(i) for i in range(20)], indent=1)
    path = tmp_path / "d.json"
    inside = text[: text.index("Question 17") + 4]  # in a string: an unterminated string, where it starts
    path.write_text(inside, encoding="utf-8")
    line, column = inside.count("\n") + 1, inside.rindex('"') - inside.rindex("\n")
    assert (json_error(inside).lineno, json_error(inside).colno) == (line, column)
    assert message(path) == f"{path}:{line}:{column}: invalid JSON: Unterminated string; the file ends at line {line}: is it cut short?"
    after = text[: text.index("}", text.index('"s17"')) + 2] + "\n  \n"  # after a comma, then blank lines
    path.write_text(after, encoding="utf-8")
    end_line = after.rstrip().count("\n") + 1
    assert (json_error(after).lineno, json_error(after).colno) == (end_line + 2, 1)
    assert message(path) == (f"{path}:{end_line + 2}:1: invalid JSON: Expecting value; "
                             f"the file ends at line {end_line}: is it cut short?")


def test_a_bad_byte_is_named_even_after_an_earlier_syntax_error(tmp_path: Path, chunk_size: int) -> None:
    """As when the file was decoded whole before parsing: the bytes are checked first."""
    body = json.dumps([rec(i) for i in range(12)], indent=1).encode()
    at = body.index(b"Question 10")
    path = tmp_path / "d.json"
    path.write_bytes(body[:20] + b"}" + body[20:at] + b"Qu\xe9stion" + body[at + len(b"Question"):])
    offset = path.read_bytes().index(b"\xe9")
    line = path.read_bytes().count(b"\n", 0, offset) + 1
    column = offset - path.read_bytes().rindex(b"\n", 0, offset)
    assert message(path) == (f"{path}:{line}: not UTF-8 text: byte 0xe9 at column {column} (byte offset {offset}); "
                             "save the file as UTF-8")


def test_a_multibyte_character_cut_at_the_end_of_the_file(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"id": "caf\xc3')
    assert message(path) == f"{path}:1: not UTF-8 text: byte 0xc3 at column 13 (byte offset 12); save the file as UTF-8"


# -- which .json files are JSON Lines ---------------------------------------------------------
def test_a_one_line_wrapper_is_a_document(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [rec(0), rec(1)]}) + "\n")
    assert [s for _, s, _ in read(path)] == [f"{path}[0]", f"{path}[1]"]


def test_json_lines_in_a_json_file(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_text("\n".join(json.dumps(r) for r in (rec(0), rec(1), {"data": [rec(2)]})) + "\n")
    samples = load_samples(str(path))
    assert [(s.id, s.source) for s in samples] == [("s0", f"{path}:1"), ("s1", f"{path}:2")]
    (error,) = samples.errors
    assert (error.source, error.detail) == (f"{path}:3", "no 'conversations' or 'messages' field (keys: data)")
    # a first line that is itself a wrapper, with more lines after it: still one record per line
    path.write_text(json.dumps({"data": [rec(0)]}) + "\n" + json.dumps(rec(1)) + "\n")
    assert [s.source for s in load_samples(str(path))] == [f"{path}:2"]


def test_json_lines_in_a_json_file_whose_first_line_is_broken(tmp_path: Path, chunk_size: int) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"id": "s0", "conversations": [}\n' + json.dumps(rec(1)) + "\n")
    samples = load_samples(str(path))
    assert [s.source for s in samples] == [f"{path}:2"]
    (error,) = samples.errors
    assert (error.source, error.detail) == (f"{path}:1", "invalid JSON at column 32: Expecting value")


# -- the sample store -------------------------------------------------------------------------
def test_duplicate_ids_across_samples_and_bad_records(tmp_path: Path) -> None:
    records = [rec(0), rec(1), {"id": "s0", "conversations": "not a list"}, rec(2), rec(1), rec(0), {"id": 7, "x": 1},
               {"id": "7", "conversations": []}, {"conversations": []}, {"conversations": []}, {"id": "", "conversations": []}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    samples = load_samples(str(path))
    assert samples.duplicate_ids == {"s0": [f"{path}[0]", f"{path}[2]", f"{path}[5]"], "s1": [f"{path}[1]", f"{path}[4]"],
                                     "7": [f"{path}[6]", f"{path}[7]"]}
    assert list(samples.duplicate_ids) == ["s0", "s1", "7"]
    assert [s.id for s in samples] == ["s0", "s1", "s2", "s1", "s0", "7", "8", "9", "10"]


def test_a_sample_set_of_nothing() -> None:
    store = formats.SampleSet.from_samples([])
    assert len(store) == 0 and list(store) == [] and store._offsets.tolist() == [0]
