"""The validated-data cache: a second run on the same data reads it (same samples, report and
lengths) and says so; any change to what shapes the result validates again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import require_fixture

MODEL = "llava-1.5-7b"


@pytest.fixture(scope="module")
def encoder():
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model(MODEL, require_fixture(MODEL))
    return ChatEncoder(resolved.card, load_processing(resolved))


@pytest.fixture()
def data(tmp_path: Path) -> tuple[Path, Path]:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.new("RGB", (64, 48), (200, 0, 0)).save(imgs / "red.png")
    records = [
        {"id": "a", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                          {"from": "gpt", "value": "Red."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there."}]},
        {"id": "bad", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                             {"from": "gpt", "value": "Red."}]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records))
    return path, imgs


def _prepare(encoder, data: Path, imgs: Path, cache: Path, out: Path, lines: list[str], **kw):
    from cardtune.training.data import prepare_split

    return prepare_split("train", str(data), encoder, encoder.card, image_folder=str(imgs), video_folder=None,
                         policy="skip", output_dir=str(out), seed=0, log=lines.append, cache=str(cache), **kw)


def test_second_run_reads_the_cache(encoder, data, tmp_path: Path) -> None:
    path, imgs = data
    cache, out = tmp_path / "cache", tmp_path / "out"
    first_log: list[str] = []
    first = _prepare(encoder, path, imgs, cache, out, first_log)
    assert not first.cached and any(line.startswith("data (train): kept in the cache ") for line in first_log)
    (out / "skipped_samples.jsonl").unlink()
    second_log: list[str] = []
    second = _prepare(encoder, path, imgs, cache, out, second_log)
    assert second.cached
    folder = next(p for p in cache.iterdir() if not p.name.startswith("."))
    assert f"data (train): {path}: validated before; read from the cache {folder}" in second_log
    assert [s.id for s in second.samples] == [s.id for s in first.samples] == ["a", "b"]
    assert second.samples[0] == first.samples[0]
    from cardtune.datasets import ConversationDataset

    decoded = ConversationDataset.for_card(second.samples, encoder.card, encoder, image_folder=str(imgs))
    assert second.lengths == first.lengths == [len(decoded[0].input_ids), len(decoded[1].input_ids)]
    assert second.media_flags == [True, False]
    assert second.report.to_dict() == first.report.to_dict()
    # the skip report is written again from the cached report
    skipped = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert [(s["id"], s["errors"][0]["reason"]) for s in skipped] == [("bad", "missing_media")]
    assert [line for line in second_log if "skipped 1 of 3" in line]


def test_any_change_validates_again(encoder, data, tmp_path: Path) -> None:
    path, imgs = data
    cache, out = tmp_path / "cache", tmp_path / "out"
    assert not _prepare(encoder, path, imgs, cache, out, []).cached
    assert _prepare(encoder, path, imgs, cache, out, []).cached
    # an argument that shapes encoding
    assert not _prepare(encoder, path, imgs, cache, out, [], check_media="full").cached
    assert not _prepare(encoder, path, imgs, cache, out, [], max_image_pixels=10**6).cached
    # the card
    from cardtune.collators.engine import ChatEncoder

    other = ChatEncoder(encoder.card.model_copy(update={"description": "changed"}), encoder.processing)
    assert not _prepare(other, path, imgs, cache, out, []).cached
    # a media file replaced (another size: another token count for anyres families)
    Image.new("RGB", (640, 480), (200, 0, 0)).save(imgs / "red.png")
    os.utime(imgs / "red.png", ns=(1, 1))
    assert not _prepare(encoder, path, imgs, cache, out, []).cached
    assert _prepare(encoder, path, imgs, cache, out, []).cached
    # the data file's bytes
    path.write_text(path.read_text().replace("Hello there.", "Hello."))
    changed = _prepare(encoder, path, imgs, cache, out, [])
    assert not changed.cached and changed.samples[1].assistant_texts == ["Hello."]
    # cardtune's own code (the engine) is part of the key
    from cardtune.training import data_cache

    key = data_cache.split_key(str(path), encoder.card, encoder.tokenizer.name_or_path, {"x": 1})
    real = data_cache.code_fingerprint
    try:
        data_cache.code_fingerprint = lambda: "another engine"
        assert data_cache.split_key(str(path), encoder.card, encoder.tokenizer.name_or_path, {"x": 1}) != key
    finally:
        data_cache.code_fingerprint = real
    # no cache at all
    assert not _prepare(encoder, path, imgs, Path("none"), out, []).cached


def test_train_says_it_used_the_cache(tmp_path: Path, capsys) -> None:
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset
    from cardtune.train import main

    demo = ensure_demo_dataset()
    argv = ["--model_id", "tiny-llava-demo", "--data_path", str(demo / TRAIN_FILE), "--image_folder", str(demo / IMAGE_DIR),
            "--max_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none",
            "--disable_tqdm", "true", "--data_cache", str(tmp_path / "cache")]
    assert main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert "validated before" not in capsys.readouterr().out
    assert main([*argv, "--output_dir", str(tmp_path / "b")]) == 0
    assert f"data (train): {demo / TRAIN_FILE}: validated before; read from the cache" in capsys.readouterr().out


def test_a_data_folder_is_keyed_by_its_bytes_however_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a model folder's big files are keyed by size and mtime; a data folder's are read."""
    from cardtune import hashing
    from cardtune.training import data_cache

    monkeypatch.setattr(hashing, "LARGE_FILE", 16)
    folder = tmp_path / "data"
    folder.mkdir()
    shard = folder / "train.jsonl"
    shard.write_text('{"id": "a"}\n' * 10)
    before = data_cache.data_fingerprint(str(folder))
    stat = shard.stat()
    shard.write_text('{"id": "b"}\n' * 10)  # same size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert data_cache.data_fingerprint(str(folder)) != before
