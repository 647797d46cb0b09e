"""Trust and bad input (issue 18): trust comes only from the person at the keyboard, nothing read
back from a cache runs code or grants trust, and data that cannot be read is said, counted and
never hangs a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cardtune.cli import main
from tests.conftest import REPO, require_fixture

LLAVA = "llava-1.5-7b"
TEXT = "llama-2-7b-chat"


def _conv(question: str = "What colour?", answer: str = "Red.", image: bool = False) -> list[dict[str, str]]:
    return [{"from": "human", "value": ("<image>\n" if image else "") + question}, {"from": "gpt", "value": answer}]


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``cardtune ARGV`` in a fresh process, killed after ``timeout``: a hang fails the test."""
    return subprocess.run([sys.executable, "-m", "cardtune.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


# -- 5. only regular files are opened ------------------------------------------------------------
def test_a_fifo_given_as_image_video_or_data_is_refused_not_waited_on(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(imgs / "red.png")
    os.mkfifo(imgs / "pipe.png")
    os.mkfifo(imgs / "pipe.mp4")
    records = [{"id": "fine", "image": "red.png", "conversations": _conv(image=True)},
               {"id": "fifo", "image": "pipe.png", "conversations": _conv(image=True)},
               {"id": "fifo-video", "video": "pipe.mp4", "conversations": [
                   {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "A clip."}]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    for check in ("header", "full"):
        done = _cli("validate-data", "--model_id", "llava-onevision-0.5b-ov", "--no-encode", "--data", str(data),
                    "--image-folder", str(imgs), "--video-folder", str(imgs), "--check-media", check, "--json")
        assert done.returncode == 1, done.stderr
        errors = {(e["id"], e["field"], e["reason"], e["detail"]) for e in json.loads(done.stdout)["errors"]}
        assert errors == {
            ("fifo", "images[0]", "unreadable_media",
             f"{imgs / 'pipe.png'} is a FIFO (named pipe), not a file: only regular files are read"),
            ("fifo-video", "videos[0]", "unreadable_media",
             f"{imgs / 'pipe.mp4'} is a FIFO (named pipe), not a file: only regular files are read"),
        }, check
    os.mkfifo(tmp_path / "pipe.json")
    done = _cli("validate-data", "--model_id", LLAVA, "--no-encode", "--data", str(tmp_path / "pipe.json"))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"cardtune validate-data: {tmp_path / 'pipe.json'} is a FIFO (named pipe), not a file: "
                                   "only regular files are read")


# -- 9. what could not be read is said and counted ------------------------------------------------
@pytest.fixture
def half_broken(tmp_path: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join([
        json.dumps({"id": "a", "conversations": _conv("Hi", "Hello!")}),
        '{"id": "cut", "conversations": [',
        json.dumps({"id": "b", "conversations": _conv("Hey", "Hi!")}),
        "not json at all",
    ]) + "\n")
    return data


def test_labels_reports_and_counts_unreadable_records(half_broken: Path, capsys) -> None:
    rc = main(["labels", "--model_id", TEXT, "--model-path", str(require_fixture(TEXT)), "--data", str(half_broken)])
    captured = capsys.readouterr()
    assert rc == 1
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == ["a", "b"]
    err = captured.err.splitlines()
    assert f"cardtune labels: sample 1 ({half_broken}:2): record: bad_format: invalid JSON at column 33: " \
           "Expecting value" in err
    assert f"cardtune labels: sample 3 ({half_broken}:4): record: bad_format: invalid JSON at column 1: " \
           "Expecting value" in err
    assert err[-1] == "cardtune labels: 2 of 4 samples failed (bad_format: 2)"


def test_inspect_reports_and_counts_unreadable_records(half_broken: Path, capsys) -> None:
    rc = main(["inspect", "--model_id", TEXT, "--model-path", str(require_fixture(TEXT)), "--data", str(half_broken)])
    captured = capsys.readouterr()
    assert rc == 1
    assert f"FAILED sample 1 ({half_broken}:2): record: bad_format: invalid JSON" in captured.out
    assert "a: " in captured.out and "b: " in captured.out
    assert captured.err.splitlines()[-1] == "cardtune inspect: 2 of 4 samples failed (bad_format: 2)"


# -- 10. a key written twice, two conversation fields -------------------------------------------
def test_a_key_written_twice_or_two_conversation_fields_are_refused_naming_the_record(tmp_path: Path) -> None:
    from cardtune.data.formats import load_samples

    turn = '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]'
    other = '[{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]'
    lines = [f'{{"id": "twice", "messages": {turn}, "messages": {other}}}',
             '{"id": "deep", "messages": [{"role": "user", "role": "assistant", "content": "Hi"}]}',
             json.dumps({"id": "both", "messages": json.loads(turn), "conversations": _conv()}),
             json.dumps({"id": "fine", "messages": json.loads(turn)})]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    listed = tmp_path / "data.json"
    listed.write_text("[\n" + ",\n".join(lines) + "\n]")
    twice = "the key 'messages' is written twice in one object (JSON would keep only the last); write it once"
    both = ("holds both 'conversations' (LLaVA) and 'messages' (OpenAI), and only one would be read: keep one "
            "(or set the source's format: llava or openai in a mix YAML)")
    for path, where in ((jsonl, lambda i: f"{jsonl}:{i + 1}"), (listed, lambda i: f"{listed}[{i}]")):
        samples = load_samples(str(path))
        assert [s.id for s in samples] == ["fine"]
        assert [(e.sample_id, e.source, e.field, e.reason, e.detail) for e in samples.errors] == [
            ("twice", where(0), "messages", "bad_format", twice),
            ("deep", where(1), "role", "bad_format", twice.replace("'messages'", "'role'")),
            ("both", where(2), "record", "bad_format", both),
        ]
    done = main(["validate-data", "--model_id", TEXT, "--no-encode", "--data", str(jsonl)])
    assert done == 1


# -- 11. a sample failing in training is counted once ------------------------------------------------
def test_samples_failing_in_training_are_counted_and_listed_once(tmp_path: Path, capfd) -> None:
    from cardtune.train import main as train_main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 48), (90 * k, 0, 0)).save(imgs / f"{k}.png")
    whole = (imgs / "0.png").read_bytes()
    for name in ("cut1.png", "cut2.png"):  # headers intact: only decoding fails, in the DataLoader
        (imgs / name).write_bytes(whole[: len(whole) // 2])
    names = ["0.png", "cut1.png", "cut2.png", "1.png"]
    records = [{"id": Path(n).stem, "image": n, "conversations": _conv(image=True)} for n in names]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    rc = train_main(["--model_id", "tiny-llava-demo", "--data_path", str(data), "--image_folder", str(imgs),
                     "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                     "--bad_sample_policy", "skip", "--data_cache", "none", "--dataloader_num_workers", "1",
                     "--group_by_length", "false"])
    captured = capfd.readouterr()
    assert rc == 0, captured.err[-2000:]
    skipped = [json.loads(line)["id"] for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(skipped) == ["cut1", "cut2"]
    assert f"data: 2 samples failed when decoded in training and were skipped (ids in {out / 'skipped_samples.jsonl'})" \
        in captured.out
    assert captured.err.count("data: skipped in training: sample cut2 ") == 1


# -- 19. a text model's card on image data ------------------------------------------------------------
def test_labels_with_a_text_card_on_image_data_reports_each_sample(tmp_path: Path, capsys) -> None:
    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "red.png")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"id": "text", "conversations": _conv("Hi", "Hello!")},
        {"id": "img", "image": "red.png", "conversations": _conv(image=True)},
    ]) + "\n")
    for command in ("labels", "inspect"):
        rc = main([command, "--model_id", TEXT, "--model-path", str(require_fixture(TEXT)), "--data", str(data),
                   "--image-folder", str(tmp_path)])
        captured = capsys.readouterr()
        assert rc == 1
        assert "Traceback" not in captured.err
        line = f"sample img ({data}:2): images: unsupported_media: family llama-2-chat takes no images"
        if command == "labels":
            assert [json.loads(row)["id"] for row in captured.out.splitlines()] == ["text"]
            assert f"cardtune labels: {line}" in captured.err.splitlines()
        else:
            assert f"FAILED {line}" in captured.out and "text: " in captured.out
        assert captured.err.splitlines()[-1] == f"cardtune {command}: 1 of 2 samples failed (unsupported_media: 1)"


# -- 23. papercuts --------------------------------------------------------------------------------------
def test_a_forgotten_image_folder_is_hinted_once(tmp_path: Path, capsys, monkeypatch) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    records = []
    for k in range(3):
        Image.new("RGB", (20, 20), (80 * k, 0, 0)).save(imgs / f"{k}.png")
        records.append({"id": f"s{k}", "image": f"{k}.png", "conversations": _conv(image=True)})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hint = f"3 of 3 images are missing, and their paths are relative to the current folder ({elsewhere}): " \
           "did you forget --image_folder?"
    assert main(["validate-data", "--model_id", LLAVA, "--no-encode", "--data", str(data)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out.count(hint) == 1 and out[-1] == "3 of 3 records have problems (missing_media 3)"
    rc = main(["labels", "--model_id", LLAVA, "--model-path", str(require_fixture(LLAVA)), "--data", str(data)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and err.count(f"cardtune labels: {hint}") == 1
    # given the folder: no hint, and a clean report is one line, no empty table
    assert main(["validate-data", "--model_id", LLAVA, "--no-encode", "--data", str(data), "--image-folder",
                 str(imgs)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{LLAVA} (llava-1.5): {data}", "ok: 3 records, no problems"]
