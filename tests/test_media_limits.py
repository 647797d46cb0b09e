"""Images that are not what they seem: a decompression bomb is one sample's ``image_too_large``
error (validate-data, labels, inspect, train with skip), never Pillow's traceback; 16-bit
greyscale keeps its range instead of turning white."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cardtune.cli import main
from cardtune.data.media import MediaConfig, MediaProblem, open_image, read_image_header
from cardtune.datasets import load_samples, validate
from tests.conftest import require_fixture

MODEL = "llava-1.5-7b"
BOMB_SIDE = 20000


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (Pillow would need the whole bomb in memory to write it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def bomb_png(path: Path) -> None:
    """20000 x 20000 pixels (400 M, 1.2 GB as RGB) in a file of about 50 KB."""
    packer = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * (BOMB_SIDE // 8)
    body = b"".join(packer.compress(row) for _ in range(BOMB_SIDE)) + packer.flush()
    path.write_bytes(png(BOMB_SIDE, BOMB_SIDE, 1, 0, body))


@pytest.fixture(scope="module")
def bomb_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bomb")
    imgs = root / "imgs"
    imgs.mkdir()
    bomb_png(imgs / "bomb.png")
    Image.new("RGB", (40, 30), (0, 128, 255)).save(imgs / "fine.png")
    records = [
        {"id": "fine", "image": "fine.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "Blue."}]},
        {"id": "bomb", "image": "bomb.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "Black."}]},
    ]
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return data, imgs


LIMIT = "89,478,485"


def bomb_detail(imgs: Path, limit: str = LIMIT) -> str:
    return (f"{imgs / 'bomb.png'} is 20000x20000 = 400,000,000 pixels, over the limit of {limit} "
            "(downsize it, or raise max_image_pixels / --max_image_pixels)")


def test_bomb_is_refused_from_its_header(bomb_data) -> None:
    _, imgs = bomb_data
    for read in (read_image_header, open_image):
        with pytest.raises(MediaProblem) as info:
            read("bomb.png", MediaConfig(image_folder=str(imgs)))
        assert (info.value.reason, info.value.detail) == ("image_too_large", bomb_detail(imgs))
    # the limit is configurable, and its header is otherwise fine
    header = read_image_header("bomb.png", MediaConfig(image_folder=str(imgs), max_image_pixels=400_000_000))
    assert (header.format, header.size, header.frames) == ("PNG", (20000, 20000), 1)


@pytest.mark.parametrize("check_media", ["header", "full"])
def test_validate_reports_the_bomb_as_one_sample(bomb_data, check_media) -> None:
    data, imgs = bomb_data
    report = validate(load_samples(str(data)), image_folder=str(imgs), check_media=check_media, num_workers=0)
    assert [(p.error.sample_id, p.error.field, p.error.reason, p.error.detail, p.error.source) for p in report.problems] \
        == [("bomb", "images[0]", "image_too_large", bomb_detail(imgs), f"{data}:2")]
    smaller = validate(load_samples(str(data)), image_folder=str(imgs), check_media=check_media, max_image_pixels=1000,
                       num_workers=0)
    assert [p.error.sample_id for p in smaller.problems] == ["fine", "bomb"]
    assert "40x30 = 1,200 pixels, over the limit of 1,000" in smaller.problems[0].error.detail


def test_commands_name_the_bomb_and_keep_going(bomb_data, capsys) -> None:
    data, imgs = bomb_data
    base = ["--model_id", MODEL, "--model-path", str(require_fixture(MODEL)), "--data", str(data), "--image-folder", str(imgs)]
    assert main(["validate-data", *base, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [(e["id"], e["field"], e["reason"], e["detail"]) for e in out["errors"]] == [
        ("bomb", "images[0]", "image_too_large", bomb_detail(imgs))]
    assert main(["validate-data", *base, "--json", "--max-image-pixels", "100"]) == 1
    assert {e["id"] for e in json.loads(capsys.readouterr().out)["errors"]} == {"fine", "bomb"}
    assert main(["labels", *base]) == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == ["fine"]
    assert f"sample bomb ({data}:2): images[0]: image_too_large: {bomb_detail(imgs)}" in captured.err
    assert "Traceback" not in captured.err
    assert main(["inspect", *base]) == 1
    assert "image_too_large" in capsys.readouterr().out


def test_train_skip_drops_the_bomb_and_trains(bomb_data, tmp_path: Path, capsys) -> None:
    from cardtune.train import main as train_main

    data, imgs = bomb_data
    out = tmp_path / "out"
    rc = train_main(["--model_id", "tiny-llava-demo", "--data_path", str(data), "--image_folder", str(imgs),
                     "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1",
                     "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                     "--bad_sample_policy", "skip", "--max_skipped_share", "0.5", "--data_cache", "none"])
    assert rc == 0
    skipped = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert [(s["id"], [e["reason"] for e in s["errors"]]) for s in skipped] == [("bomb", ["image_too_large"])]
    assert "data: skipped 1 of 2 records, kept 1 (image_too_large 1)" in capsys.readouterr().out


# -- 16-bit greyscale -----------------------------------------------------------------------------
def test_16_bit_greyscale_keeps_its_range(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(1, 256).repeat(2, axis=0)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # mode I;16
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"
    rgb = np.asarray(open_image("ramp16.png", MediaConfig(image_folder=str(tmp_path))))
    assert rgb.shape == (2, 256, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == list(range(256))  # every level kept, in order (was: 2 values)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    # 16-bit RGB is read by Pillow at 8 bits per channel, range kept
    rows = b"".join(b"\x00" + np.stack([ramp[0]] * 3, axis=-1).astype(">u2").tobytes() for _ in range(2))
    (tmp_path / "rgb48.png").write_bytes(png(256, 2, 16, 2, zlib.compress(rows)))
    assert np.asarray(open_image("rgb48.png", MediaConfig(image_folder=str(tmp_path))))[0, :, 0].tolist() == list(range(256))


def test_float_images_are_refused_clearly(tmp_path: Path) -> None:
    Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)).save(tmp_path / "float.tif")
    with pytest.raises(MediaProblem) as info:
        open_image("float.tif", MediaConfig(image_folder=str(tmp_path)))
    assert (info.value.reason, info.value.detail) == (
        "unsupported_media", f"{tmp_path / 'float.tif'} is a 32-bit float image; save it as an 8- or 16-bit image")


# -- found only when decoded, in a DataLoader worker ----------------------------------------------
@pytest.fixture()
def truncated_data(tmp_path: Path) -> tuple[Path, Path]:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(3):
        Image.new("RGB", (64, 48), (80 * k, 0, 0)).save(imgs / f"{k}.png")
    whole = (imgs / "0.png").read_bytes()
    (imgs / "cut.png").write_bytes(whole[: len(whole) // 2])  # the header is intact: only decoding fails
    records = [{"id": f"ok{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]} for k in range(3)]
    records.insert(1, {"id": "cut", "image": "cut.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]})
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return data, imgs


def _train(data: Path, imgs: Path, out: Path, policy: str) -> int:
    from cardtune.train import main as train_main

    return train_main(["--model_id", "tiny-llava-demo", "--data_path", str(data), "--image_folder", str(imgs),
                       "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
                       "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
                       "--bad_sample_policy", policy, "--data_cache", "none", "--dataloader_num_workers", "1"])


def test_a_file_failing_in_the_dataloader_is_skipped_and_counted(truncated_data, tmp_path: Path, capfd) -> None:
    data, imgs = truncated_data
    out = tmp_path / "out"
    assert _train(data, imgs, out, "skip") == 0
    captured = capfd.readouterr()  # the worker process writes to the file descriptors
    assert "data (train): " + str(data) + ": ok: 4 records, no problems" in captured.out  # the header check passed it
    skipped = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert [(s["id"], s["source"], s["found"], [e["reason"] for e in s["errors"]]) for s in skipped] == [
        ("cut", f"{data}[1]", "training", ["corrupt_image"])]
    assert f"data: 1 samples failed when decoded in training and were skipped (ids in {out / 'skipped_samples.jsonl'})" \
        in captured.out
    assert f"data: skipped in training: sample cut ({data}[1]): images[0]: corrupt_image: {imgs / 'cut.png'} cannot be decoded" \
        in captured.err


def test_a_file_failing_in_the_dataloader_stops_the_run_naming_it(truncated_data, tmp_path: Path, capfd) -> None:
    data, imgs = truncated_data
    assert _train(data, imgs, tmp_path / "out", "error") == 1
    err = capfd.readouterr().err
    assert f"\ntrain: sample cut ({data}[1]) failed in training: images[0]: corrupt_image: {imgs / 'cut.png'} cannot be decoded" \
        in err
    assert "--check_media full finds it before step 1, --bad_sample_policy skip drops it)" in err
    assert "Traceback" not in err
