"""Data formats to samples, media loading (EXIF, multi-image order, video), confined paths,
and a lazily built dataset of 50k samples whose memory stays flat."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
from PIL import Image

from cardtune.conversation import Media
from cardtune.data.media import MediaProblem
from cardtune.datasets import (
    ConversationDataset,
    LoadedSample,
    MediaConfig,
    SampleSet,
    load_media,
    load_samples,
    load_video,
    open_image,
    resolve_path,
)
from cardtune.errors import SampleError

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (24, 16), rgb).save(folder / f"{name}.png")
    # stored 40 wide x 20 high, EXIF orientation 6 (rotate 90 clockwise to display): shown 20 x 40
    rotated = Image.new("RGB", (40, 20), (255, 255, 0))
    rotated.paste((0, 0, 0), (0, 0, 10, 20))  # a black left edge: displayed at the top
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "exif6.jpg", exif=exif)
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(folder / "alpha.png")
    Image.new("L", (8, 8), 7).save(folder / "gray.png")
    good = (folder / "red.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "not_an_image.png").write_text("hello")
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def turn(who: str, text) -> dict:
    return {"from": who, "value": text}


# -- LLaVA -------------------------------------------------------------------------------------
def test_llava_json_list(tmp_path: Path) -> None:
    data = [
        {"id": "a", "image": "red.png", "system_prompt": "Be brief.",
         "conversations": [turn("human", "<image>\n  What colour?  "), turn("gpt", "  Red.\n"),
                           turn("human", "Sure?"), turn("gpt", "Yes.")]},
        {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")]},  # no id: its index
        {"id": 7, "video": ["clip.mp4"], "conversations": [turn("human", "<video>Describe"), turn("gpt", "A clip")]},
    ]
    (tmp_path / "d.json").write_text(json.dumps(data))
    samples = load_samples(str(tmp_path / "d.json"))
    assert len(samples) == 3 and samples.errors == []
    a, b, c = samples
    assert a.id == "a" and a.source == f"{tmp_path / 'd.json'}[0]"
    assert a.images == ["red.png"]
    assert a.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        # the text as written: only the newline after <image> belongs to the placeholder
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  What colour?  "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "  Red.\n"}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
    ]
    assert b.id == "1" and b.source.endswith("d.json[1]")
    assert c.id == "7" and c.videos == ["clip.mp4"]
    assert c.messages[0]["content"] == [{"type": "video"}, {"type": "text", "text": "Describe"}]


def test_llava_custom_role_keys_and_jsonl_sources(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"id": "x", "conversations": [turn("user_q", "Q"), turn("bot_a", "A")]},
        "",
        "{not json",
        {"id": "y", "conversations": [turn("user_q", "Q2"), turn("bot_a", "A2")]},
    ])
    samples = load_samples(str(path), user_key="user_q", assistant_key="bot_a")
    assert [s.id for s in samples] == ["x", "y"]
    assert [s.source for s in samples] == [f"{path}:1", f"{path}:4"]
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant"]
    (bad,) = samples.errors
    assert (bad.reason, bad.field, bad.source, bad.sample_id) == ("bad_format", "record", f"{path}:3", "1")


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"id": "a", "conversations": [turn("human", "q"), turn("gpt", "a")]}] * 2)
    assert [s.source for s in load_samples(str(path))] == [f"{path}:1", f"{path}:2"]


def test_text_is_kept_as_written_and_reasoning_read_under_any_field_name(tmp_path: Path) -> None:
    answers = ["  Sure.", "Done.   ", "\tTabbed", "\n```py\nx = 1\n```\n", "Line\n\n"]
    path = write_jsonl(tmp_path / "w.jsonl", [
        {"id": f"w{i}", "messages": [{"role": "user", "content": " q\t"}, {"role": "assistant", "content": a}]}
        for i, a in enumerate(answers)
    ] + [
        {"id": key, "messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "A.", key: "\nStep 1.\n"}]}
        for key in ("reasoning_content", "reasoning", "thinking")
    ] + [
        {"id": "both", "messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "A.", "reasoning": "x", "thinking": "y"}]},
        {"id": "user", "messages": [{"role": "user", "content": "q", "thinking": "x"}, {"role": "assistant", "content": "A."}]},
    ])
    samples = load_samples(str(path))
    assert [s.messages[1]["content"][0]["text"] for s in list(samples)[:5]] == answers
    assert all(s.messages[0]["content"][0]["text"] == " q\t" for s in list(samples)[:5])
    assert [s.messages[1]["reasoning_content"] for s in list(samples)[5:]] == ["\nStep 1.\n"] * 3
    assert [(e.sample_id, e.field, e.reason, e.detail) for e in samples.errors] == [
        ("both", "messages[1]", "bad_format", "reasoning and thinking disagree; give one"),
        ("user", "messages[0].thinking", "bad_format", "only an assistant turn carries reasoning"),
    ]
    llava = tmp_path / "l.json"
    llava.write_text(json.dumps([{"id": "l", "conversations": [turn("human", "What?\n<image>"),
                                                               {"from": "gpt", "value": " Red. ", "reasoning": "Look."}]}]))
    (sample,) = load_samples(str(llava))
    assert sample.messages[0]["content"] == [{"type": "text", "text": "What?"}, {"type": "image"}]
    assert sample.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": " Red. "}],
                                  "reasoning_content": "Look."}


def test_multi_image_placeholders_keep_their_positions(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps([{
        "id": "m", "image": ["red.png", "green.png", "blue.png"],
        "conversations": [turn("human", "Left <image> middle <image>\nand right <image>"), turn("gpt", "ok"),
                          ]}]))
    (sample,) = load_samples(str(tmp_path / "d.json"))
    assert sample.messages[0]["content"] == [
        {"type": "text", "text": "Left "}, {"type": "image"}, {"type": "text", "text": " middle "},
        {"type": "image"}, {"type": "text", "text": "and right "}, {"type": "image"},
    ]
    write_images(tmp_path / "imgs")
    media = load_media(sample, MediaConfig(image_folder=str(tmp_path / "imgs")))
    assert [im.getpixel((0, 0)) for im in media.images] == [COLORS["red"], COLORS["green"], COLORS["blue"]]


# -- OpenAI messages ----------------------------------------------------------------------------
def test_openai_messages_string_and_parts(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"id": "s", "messages": [{"role": "system", "content": " sys "}, {"role": "user", "content": "hi "},
                                 {"role": "assistant", "content": " hello"}]},
        {"id": "p", "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Compare "}, {"type": "image", "image": "red.png"},
                {"type": "text", "text": " with "},
                {"type": "image_url", "image_url": {"url": "green.png"}},
                {"type": "video", "video": "clip.mp4"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Different."}]}]},
        # parts without payload and <image> typed in text take top-level images, in order
        {"id": "t", "images": ["red.png", "blue.png"], "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<image> and"}, {"type": "image"}]},
            {"role": "assistant", "content": "x"}]},
        {"id": "u", "messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]},
    ])
    samples = load_samples(str(path))
    s, p, t = samples
    assert s.messages[0] == {"role": "system", "content": [{"type": "text", "text": " sys "}]}
    assert s.messages[2]["content"] == [{"type": "text", "text": " hello"}]
    assert p.images == ["red.png", "green.png"] and p.videos == ["clip.mp4"]
    assert [x["type"] for x in p.messages[0]["content"]] == ["text", "image", "text", "image", "video"]
    assert t.images == ["red.png", "blue.png"]
    assert [x["type"] for x in t.messages[0]["content"]] == ["image", "text", "image"]
    (bad,) = samples.errors
    assert (bad.sample_id, bad.field, bad.reason) == ("u", "messages[0].content[0]", "bad_format")


# -- datasets.load_dataset sources and mixes ----------------------------------------------------
def test_parquet_with_column_mapping(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [{"uid": f"r{i}", "img": "red.png", "dialog": [{"from": "human", "value": f"<image>\nq{i}"},
                                                           {"from": "gpt", "value": f"a{i}"}]} for i in range(3)]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    samples = load_samples(str(tmp_path / "d.parquet"), columns={"id": "uid", "image": "img", "conversations": "dialog"})
    assert [s.id for s in samples] == ["r0", "r1", "r2"]
    assert samples[2].source == f"{tmp_path / 'd.parquet'}[2]"
    assert samples[1].images == ["red.png"] and samples[1].assistant_texts == ["a1"]


def _llava_rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "conversations": [turn("human", "q"), turn("gpt", "a")]} for i in range(n)]


def test_weighted_mix_is_deterministic(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_llava_rows("a", 100)))
    write_jsonl(tmp_path / "b.jsonl", _llava_rows("b", 20))
    spec = f"{tmp_path / 'a.json'}:0.7,{tmp_path / 'b.jsonl'}:0.3"
    mixed = load_samples(spec, seed=3)
    ids = [s.id for s in mixed]
    assert len(ids) == 120
    assert sum(i.startswith("a") for i in ids) == 84 and sum(i.startswith("b") for i in ids) == 36
    assert len({i for i in ids if i.startswith("b")}) == 20  # upsampled: every b sample at least once
    assert ids == [s.id for s in load_samples(spec, seed=3)]
    assert ids != [s.id for s in load_samples(spec, seed=4)]
    # the same mix as YAML, paths relative to the YAML file
    (tmp_path / "mix.yaml").write_text("seed: 3\nsources:\n  - {path: a.json, weight: 0.7}\n  - {path: b.jsonl, weight: 0.3}\n")
    assert [s.id for s in load_samples(str(tmp_path / "mix.yaml"))] == ids
    # no weights: plain concatenation, file order kept
    assert [s.id for s in load_samples(f"{tmp_path / 'b.jsonl'},{tmp_path / 'a.json'}")][:2] == ["b0", "b1"]


def test_weights_all_or_none(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(_llava_rows("a", 2)))
    with pytest.raises(ValueError, match="every source or to none"):
        load_samples(f"{tmp_path / 'a.json'}:0.5,{tmp_path / 'a.json'}")


# -- media --------------------------------------------------------------------------------------
def test_images_rgb_with_exif_orientation(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs")
    cfg = MediaConfig(image_folder=str(folder))
    upright = open_image("exif6.jpg", cfg)
    assert upright.size == (20, 40) and upright.mode == "RGB"
    top, bottom = upright.getpixel((10, 2)), upright.getpixel((10, 37))
    assert max(top) < 60 and bottom[0] > 200 and bottom[1] > 200  # the black edge is now on top
    assert open_image("alpha.png", cfg).mode == "RGB"
    assert open_image("gray.png", cfg).mode == "RGB"


@pytest.mark.parametrize(
    ("ref", "reason"),
    [("truncated.png", "corrupt_image"), ("not_an_image.png", "corrupt_image"), ("nope.png", "missing_media"),
     ("../outside.png", "path_escape"), (".", "unreadable_media")],
)
def test_bad_image_reasons(tmp_path: Path, ref: str, reason: str) -> None:
    folder = write_images(tmp_path / "imgs")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    from cardtune.conversation import Sample

    sample = Sample("s1", [], images=["red.png", ref], source="f.json[3]")
    with pytest.raises(SampleError) as info:
        load_media(sample, MediaConfig(image_folder=str(folder)))
    e = info.value
    assert (e.sample_id, e.field, e.reason, e.source) == ("s1", "images[1]", reason, "f.json[3]")


def test_paths_are_confined(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")
    assert resolve_path("sub/../red.png", str(folder)) == folder / "red.png"
    assert resolve_path(str(folder / "red.png"), str(folder)) == folder / "red.png"  # absolute, inside
    for escape in ("../outside.png", "sub/../../outside.png", str(tmp_path / "outside.png")):
        with pytest.raises(MediaProblem) as info:
            resolve_path(escape, str(folder))
        assert info.value.reason == "path_escape"
    # the prefix trick: imgs_evil is not inside imgs
    with pytest.raises(MediaProblem):
        resolve_path(str(tmp_path / "imgs_evil" / "x.png"), str(folder))
    assert resolve_path(str(tmp_path / "outside.png"), str(folder), allow_absolute=True) == tmp_path / "outside.png"
    with pytest.raises(MediaProblem):  # a relative escape stays refused even when absolute paths are allowed
        resolve_path("../outside.png", str(folder), allow_absolute=True)


def test_load_image_false_family_gets_paths(tmp_path: Path) -> None:
    from cardtune.conversation import Sample
    from cardtune.registry import get_registry

    card = get_registry().get("qwen-vl-chat").family
    assert card.load_image is False
    folder = write_images(tmp_path / "imgs")
    cfg = MediaConfig.from_card(card, image_folder=str(folder))
    media = load_media(Sample("q", [], images=["red.png", "blue.png"]), cfg)
    assert media.images == [str(folder / "red.png"), str(folder / "blue.png")]


def _write_video(path: Path, frames: int = 20, size: int = 32) -> None:
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            # frame i is a flat grey of level 10*i: the level tells which frame was sampled
            array = np.full((size, size, 3), 10 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_video_sampled_uniformly(tmp_path: Path) -> None:
    _write_video(tmp_path / "clip.mp4")
    frames = load_video("clip.mp4", MediaConfig(video_folder=str(tmp_path), num_frames=4))
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    levels = [round(f.getpixel((16, 16))[0] / 10) for f in frames]
    assert levels == [2, 7, 12, 17]  # centres of 4 equal segments of 20 frames
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 100)
    from cardtune.conversation import Sample

    with pytest.raises(SampleError) as info:
        load_media(Sample("v", [], videos=["broken.mp4"]), MediaConfig(video_folder=str(tmp_path)))
    assert (info.value.field, info.value.reason) == ("videos[0]", "unreadable_media")


def test_video_as_folder_of_frames(tmp_path: Path) -> None:
    folder = tmp_path / "frames" / "clip1"
    folder.mkdir(parents=True)
    for i in range(10):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i:03d}.png")
    frames = load_video("clip1", MediaConfig(video_folder=str(tmp_path / "frames"), num_frames=5))
    assert [f.getpixel((0, 0))[0] // 20 for f in frames] == [1, 3, 5, 7, 9]


# -- the lazy dataset ---------------------------------------------------------------------------
def test_dataset_items_load_media_lazily(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "imgs")
    (tmp_path / "d.json").write_text(json.dumps([
        {"id": "img", "image": "red.png", "conversations": [turn("human", "<image>\nq"), turn("gpt", "a")]},
        {"id": "txt", "conversations": [turn("human", "q"), turn("gpt", "a")]},
    ]))
    ds = ConversationDataset(load_samples(str(tmp_path / "d.json")), MediaConfig(image_folder=str(folder)))
    first, second = ds[0], ds[1]
    assert isinstance(first, LoadedSample) and isinstance(first.media, Media)
    assert first.media.images[0].getpixel((0, 0)) == COLORS["red"]
    assert second.media is None
    assert ds.media_flags() == [True, False]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_50k_samples_lazily_keep_memory_flat(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (336, 336), (1, 2, 3)).save(folder / "big.png")  # 330 KB decoded
    with (tmp_path / "big.jsonl").open("w") as f:
        for i in range(50_000):
            f.write(json.dumps({"id": f"s{i}", "image": "big.png", "conversations": [
                {"from": "human", "value": f"<image>\nQuestion number {i} about this picture?"},
                {"from": "gpt", "value": f"Answer number {i}, a sentence of moderate length."}]}) + "\n")
    gc.collect()
    before = _rss_mb()
    ds = ConversationDataset(load_samples(str(tmp_path / "big.jsonl")), MediaConfig(image_folder=str(folder)))
    gc.collect()
    built = _rss_mb()
    for i in range(0, 50_000, 250):  # 200 items, each with a decoded image
        item = ds[i]
        assert item.sample.id == f"s{i}" and item.media.images[0].size == (336, 336)
    del item
    gc.collect()
    after = _rss_mb()
    assert len(ds) == 50_000
    # eager decoding would hold 50k x 330 KB = 16 GB; the pickled samples take ~15 MB
    assert built - before < 120, f"building took {built - before:.0f} MB"
    assert after - built < 40, f"reading 200 items grew RSS by {after - built:.0f} MB"


def test_sample_set_round_trip_and_take() -> None:
    from cardtune.conversation import Sample

    samples = [Sample(str(i), [{"role": "user", "content": [{"type": "text", "text": str(i)}]}]) for i in range(5)]
    store = SampleSet.from_samples(samples)
    assert list(store) == samples and store[-1] == samples[4]
    picked = store.take([4, 0, 4])
    assert [s.id for s in picked] == ["4", "0", "4"]
    assert picked.storage_index(2) == 4
    with pytest.raises(IndexError):
        store[5]


def test_multi_image_positions_in_rendered_tokens(tmp_path: Path) -> None:
    """Qwen2.5-VL renders images where they stand: each image's token run (its length set by
    its size) sits between the texts around its placeholder, in order."""
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model
    from tests.conftest import require_fixture

    resolved = resolve_model("qwen2.5-vl-3b-instruct", require_fixture("qwen2.5-vl-3b-instruct"))
    encoder = ChatEncoder(resolved.card, load_processing(resolved))
    Image.new("RGB", (112, 112), (0, 0, 255)).save(tmp_path / "big.png")  # 16 tokens
    Image.new("RGB", (56, 56), (255, 0, 0)).save(tmp_path / "small.png")  # 4 tokens
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": "m", "images": ["small.png", "big.png", "small.png"], "messages": [
        {"role": "user", "content": "Alpha <image> Bravo <image> Charlie <image> Delta"},
        {"role": "assistant", "content": "Echo"}]}])
    (sample,) = load_samples(str(path))
    encoded = encoder.encode(sample, load_media(sample, MediaConfig(image_folder=str(tmp_path))))
    ids = encoded.input_ids
    runs, k = [], 0
    while k < len(ids):  # (start, length) of each run of media tokens
        if ids[k] in encoder.media_token_ids:
            start = k
            while k < len(ids) and ids[k] in encoder.media_token_ids:
                k += 1
            runs.append((start, k - start))
        k += 1
    assert [n for _, n in runs] == [4, 16, 4]
    text = encoder.tokenizer.decode
    assert "Alpha" in text(ids[: runs[0][0]]) and "Bravo" not in text(ids[: runs[0][0]])
    assert "Bravo" in text(ids[runs[0][0] : runs[1][0]])
    assert "Charlie" in text(ids[runs[1][0] : runs[2][0]])
    assert "Delta" in text(ids[runs[2][0] :]) and encoded.num_trained > 0
