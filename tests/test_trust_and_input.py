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


# -- 1. trust comes from the keyboard, never from the model folder ------------------------------------
EVIL = '''import pathlib

pathlib.Path({marker!r}).write_text("the folder's code ran")

from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


def plant_code(folder: Path, marker: Path) -> None:
    """``folder``'s tokenizer declared as its own code (``auto_map``), which writes ``marker`` when imported."""
    (folder / "tokenization_evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def trusting_card(folder: Path) -> None:
    """A ``cardtune_card.yaml`` in ``folder``, as training writes it, that asks for trust."""
    import yaml

    from cardtune.registry import get_registry

    path = folder / "cardtune_card.yaml"
    if path.is_file():
        card = yaml.safe_load(path.read_text())
    else:
        card = get_registry().get(TEXT).family.model_dump(mode="json")
        card["models"] = [{"model_id": TEXT, "hf_path": str(folder)}]
    card["trust_remote_code"] = True
    path.write_text(yaml.safe_dump(card))


def refused(folder: Path) -> str:
    return (f"{folder} holds code of its own (tokenization_evil.py), which is not run; its cardtune_card.yaml says "
            "trust_remote_code: true, which counts only with --trust-remote-code: a model folder grants no trust. "
            "Read that code, then give --trust-remote-code to run it")


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a tiny llama-2-chat folder, a LoRA adapter trained on it for one step, text data)."""
    from test_train import text_dataset, tiny_model, train

    root = tmp_path_factory.mktemp("tiny-text")
    model = tiny_model(TEXT, root / "model")
    data = text_dataset(root)
    adapter = root / "adapter"
    train(["--model_id", TEXT, "--model_path", str(model), "--data_path", str(data), "--output_dir", str(adapter),
           "--use_lora", "--max_steps", "1", "--per_device_train_batch_size", "2"])
    return model, adapter, data


def test_chat_runs_no_code_a_model_folder_ships(tiny_text, tmp_path: Path, capsys) -> None:
    import shutil

    model, _, _ = tiny_text
    folder = tmp_path / "shared"
    shutil.copytree(model, folder)
    marker = tmp_path / "marker"
    plant_code(folder, marker)
    trusting_card(folder)
    rc = main(["chat", "--model", str(folder), "--prompt", "Hi", "--max_new_tokens", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert not marker.exists()
    assert f"cardtune chat: {refused(folder)}" in captured.err.splitlines()
    # the person at the keyboard may allow it
    main(["chat", "--model", str(folder), "--prompt", "Hi", "--max_new_tokens", "2", "--trust-remote-code"])
    assert marker.exists() and "holds code of its own" not in capsys.readouterr().err


def test_merge_and_train_run_no_code_a_model_folder_ships(tiny_text, tmp_path: Path, capfd) -> None:
    import shutil

    model, adapter, data = tiny_text
    shared = tmp_path / "adapter"
    shutil.copytree(adapter, shared)
    marker = tmp_path / "marker"
    plant_code(shared, marker)
    trusting_card(shared)
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(shared), "--output", str(out)]) == 0
    first = capfd.readouterr()
    assert not marker.exists()
    assert f"cardtune merge: {refused(shared)}" in first.err.splitlines()
    # 23: a second merge into the same folder replaces the adapter's files and says which
    assert main(["merge", "--adapter", str(shared), "--output", str(out)]) == 0
    saved = [line for line in capfd.readouterr().out.splitlines() if line.startswith("saved ")]
    assert saved == [line for line in first.out.splitlines() if line.startswith("saved ")]
    assert saved[0].startswith(f"saved {out} (LlamaForCausalLM; also ") and not saved[0].endswith("also )")

    from cardtune.train import main as train_main

    folder = tmp_path / "trained"
    shutil.copytree(model, folder)
    plant_code(folder, marker)
    trusting_card(folder)
    capfd.readouterr()
    rc = train_main(["--model_path", str(folder), "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                     "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
                     "--save_strategy", "no", "--disable_tqdm", "true"])
    assert rc == 0 and not marker.exists()
    assert refused(folder) in capfd.readouterr().out


# -- 2. nothing read back from the cache runs code or grants trust -----------------------------------
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_edited_data_cache_runs_no_code(tmp_path: Path, capfd) -> None:
    import pickle

    import numpy as np

    from cardtune.train import main as train_main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": f"t{k}", "conversations": _conv(f"Say {k}.", f"{k}.")} for k in range(4)]))
    cache = tmp_path / "cache"

    def run() -> tuple[int, str]:
        rc = train_main(["--model_id", "tiny-llava-demo", "--data_path", str(data), "--output_dir",
                         str(tmp_path / f"out{len(list(tmp_path.glob('out*')))}"), "--max_steps", "1",
                         "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--save_strategy", "no",
                         "--report_to", "none", "--disable_tqdm", "true", "--data_cache", str(cache)])
        return rc, capfd.readouterr().out

    assert run()[0] == 0
    (kept,) = [p for p in cache.iterdir() if (p / "report.json").is_file()]
    marker = tmp_path / "marker"
    blob = pickle.dumps(_RunsCode(marker))  # what pickle.loads would run: os.system
    np.save(kept / "buffer.npy", np.frombuffer(blob * 4, dtype=np.uint8))
    np.save(kept / "offsets.npy", np.arange(5, dtype=np.int64) * len(blob))
    rc, out = run()
    assert rc == 0 and not marker.exists()
    warnings = [line for line in out.splitlines() if "is not used" in line]
    assert warnings == [f"warning: the data cache {kept} is not used (buffer.npy is not the samples this cache "
                        "wrote: edited or damaged): the data is validated and kept again"]
    rc, out = run()  # kept again, and read back
    assert rc == 0 and "validated before; read from the cache" in out and not marker.exists()


def test_an_edited_derived_card_memo_grants_no_trust(tmp_path: Path, capsys, monkeypatch) -> None:
    import shutil

    monkeypatch.setenv("CARDTUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "folder"
    shutil.copytree(require_fixture(TEXT), folder)
    marker = tmp_path / "marker"
    plant_code(folder, marker)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": _conv("Hi", "Hello!")}) + "\n")
    assert main(["labels", "--model-path", str(folder), "--data", str(data)]) == 0
    assert not marker.exists()
    (memo,) = (tmp_path / "cache" / "derived-cards").glob("*.json")
    kept = json.loads(memo.read_text())
    kept["card"]["trust_remote_code"] = True
    memo.write_text(json.dumps(kept))
    first = capsys.readouterr().out
    assert main(["labels", "--model-path", str(folder), "--data", str(data)]) == 0
    assert not marker.exists()
    assert capsys.readouterr().out == first


# -- 4. a chat template that never ends ---------------------------------------------------------------
LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
         "{% endfor %}{% endfor %}{% endfor %}{{ messages[0]['content'] }}")


def test_a_template_that_never_ends_stops_labels_in_one_line(tmp_path: Path) -> None:
    import shutil
    import time

    folder = tmp_path / "looping"
    shutil.copytree(require_fixture(TEXT), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = LOOPS
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": _conv("Hi", "Hello!")}) + "\n")
    started = time.monotonic()
    # `cardtune labels --model-path FOLDER`, with the limit at 1 s instead of 10 (killed after 90 s: a hang fails)
    limit_1s = ("import sys\ntry:\n    import cardtune.chat.render_limit as limit\n    limit.RENDER_SECONDS = 1.0\n"
                "except ImportError:\n    pass\nfrom cardtune.cli import main\nsys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", limit_1s, "labels", "--model-path", str(folder), "--data", str(data)],
                          capture_output=True, text=True, timeout=90, cwd=REPO,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 2 and time.monotonic() - started < 60, done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"cardtune labels: {folder}: the chat template did not finish rendering one conversation in 1 s (it loops "
        "without end, or as good as): fix the template, or give --template FILE (another chat template)")
    assert "Traceback" not in done.stderr


def test_the_render_limit_leaves_signals_as_it_found_them() -> None:
    import signal

    from cardtune.chat import render_limit
    from cardtune.chat.render_limit import RenderTimeout, bounded

    def spin() -> None:
        while True:
            pass

    with pytest.raises(RenderTimeout, match="^folder: the chat template did not finish"):
        bounded(lambda: "folder", spin, 0.05)
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and render_limit._active is None
    assert bounded(lambda: "folder", lambda: "rendered") == "rendered"

    def mine(signum, frame):  # a handler of the program's own: its alarms are left alone
        raise AssertionError("not expected")

    before = signal.signal(signal.SIGALRM, mine)
    try:
        assert bounded(lambda: "folder", lambda: signal.getitimer(signal.ITIMER_REAL)[0]) == 0
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, before)


# -- 3. a checkpoint holding a crafted pickle ------------------------------------------------------------
def test_a_checkpoint_with_a_crafted_pickle_is_refused_in_one_line(tmp_path: Path, capfd) -> None:
    import shutil

    import torch

    from cardtune.train import main as train_main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"id": f"t{k}", "conversations": _conv(f"Say {k}.", f"{k}.")} for k in range(4)]))
    out = tmp_path / "out"
    argv = ["--model_id", "tiny-llava-demo", "--data_path", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "2", "--eval_strategy", "no", "--save_strategy", "steps",
            "--save_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--data_cache", "none"]
    assert train_main([*argv, "--max_steps", "1"]) == 0
    checkpoint = out / "checkpoint-1"
    kept = tmp_path / "kept"
    shutil.copytree(checkpoint, kept)
    marker = tmp_path / "marker"
    torch.save(_RunsCode(marker), checkpoint / "training_args.bin")  # never loaded on resume: no matter
    capfd.readouterr()
    for name in ("rng_state.pth", "optimizer.pt"):
        shutil.copy2(kept / name, checkpoint / name)
        torch.save({"state": _RunsCode(marker)}, checkpoint / name)
        for resume in (str(checkpoint), "auto"):
            rc = train_main([*argv, "--max_steps", "2", "--resume_from_checkpoint", resume])
            err = capfd.readouterr().err
            assert rc == 2 and not marker.exists() and "Traceback" not in err
            assert err.splitlines()[-1] == (
                f"train: {checkpoint}: {name}: it names posix.system, which a weights-only load refuses (the Trainer "
                "loads checkpoints weights-only: torch.load(weights_only=True)), so this checkpoint cannot be resumed: "
                "it was altered, or written by other software. Resume from a checkpoint this run wrote "
                "(--resume_from_checkpoint PATH), or start over without --resume_from_checkpoint")
        shutil.copy2(kept / name, checkpoint / name)
    assert train_main([*argv, "--max_steps", "2", "--resume_from_checkpoint", str(checkpoint)]) == 0
    assert not marker.exists()
