"""Validation that loses nothing: every bad input is reported with its exact reason, field and
sample id, the good samples of the same file still load, and ``skip`` drops exactly those
reported. Encoder checks run the real masking engine on the real llava-1.5 processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from cardtune.cli import main
from cardtune.datasets import (
    ConversationDataset,
    DataValidationError,
    apply_policy,
    load_samples,
    validate,
)
from tests.conftest import require_fixture

MODEL = "llava-1.5-7b"


def user(text, *media: str) -> dict:
    return {"from": "human", "value": "".join(f"<{m}>\n" for m in media) + text if isinstance(text, str) else text}


def gpt(text) -> dict:
    return {"from": "gpt", "value": text}


def rec(sample_id: str, *turns: dict, image=None, video=None) -> dict:
    r = {"id": sample_id, "conversations": list(turns)}
    if image is not None:
        r["image"] = image
    if video is not None:
        r["video"] = video
    return r


GOOD = ["good-image", "good-text", "good-two-images", "good-system"]

# (record or raw line, expected (id, field, reason) problems)
CASES: list[tuple[object, list[tuple[str, str, str]]]] = [
    (rec("good-image", user("What colour?", "image"), gpt("Red."), image="red.png"), []),
    (rec("missing", user("q", "image"), gpt("a"), image="nope.png"), [("missing", "images[0]", "missing_media")]),
    (rec("truncated", user("q", "image"), gpt("a"), image="truncated.png"), [("truncated", "images[0]", "corrupt_image")]),
    (rec("not-image", user("q", "image"), gpt("a"), image="text.png"), [("not-image", "images[0]", "corrupt_image")]),
    (rec("folder", user("q", "image"), gpt("a"), image="sub"), [("folder", "images[0]", "unreadable_media")]),
    (rec("escape", user("q", "image"), gpt("a"), image="../outside.png"), [("escape", "images[0]", "path_escape")]),
    ("ABSOLUTE", [("absolute", "images[0]", "path_escape")]),
    (rec("good-text", user("Hi"), gpt("Hello.")), []),
    (rec("two-placeholders", user("q", "image", "image"), gpt("a"), image="red.png"),
     [("two-placeholders", "images", "placeholder_mismatch")]),
    (rec("no-placeholder", user("q"), gpt("a"), image="red.png"), [("no-placeholder", "images", "placeholder_mismatch")]),
    (rec("empty-user", user("   "), gpt("a")), [("empty-user", "messages[0].content", "empty_turn")]),
    (rec("null-user", user(None), gpt("a")), [("null-user", "messages[0].content", "non_string_turn")]),
    (rec("list-answer", user("q"), gpt(["a"])), [("list-answer", "messages[1].content", "non_string_turn")]),
    (rec("two-users", user("q"), user("q2"), gpt("a")), [("two-users", "messages[1].role", "roles_not_alternating")]),
    (rec("starts-gpt", gpt("a"), user("q"), gpt("b")), [("starts-gpt", "messages[0].role", "roles_not_alternating")]),
    (rec("bot", user("q"), {"from": "bot", "value": "a"}),
     [("bot", "messages[1].role", "unknown_role"), ("bot", "messages", "no_assistant_turn")]),
    (rec("empty-answer", user("q"), gpt(" \n ")), [("empty-answer", "messages[1].content", "empty_answer")]),
    (rec("no-answer", user("q")), [("no-answer", "messages", "no_assistant_turn")]),
    (rec("video", user("q", "video"), gpt("a"), video="clip.mp4"),
     [("video", "videos", "unsupported_media"), ("video", "videos[0]", "missing_media")]),
    (rec("good-two-images", user("Compare.", "image", "image"), gpt("Same."), image=["red.png", "exif6.jpg"]), []),
    ("[1, 2]", [("20", "record", "bad_format")]),
    ("{broken json", [("21", "record", "bad_format")]),
    ({"id": "no-conversation", "text": "x"}, [("no-conversation", "record", "bad_format")]),
    (rec("bad-turn", user("q"), "just a string"), [("bad-turn", "conversations[1]", "bad_format")]),
    ({"id": "good-system", "system_prompt": "Be brief.", "conversations": [user("q"), gpt("a")]}, []),
]


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dirty")
    imgs = root / "imgs"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (30, 20), (255, 0, 0)).save(imgs / "red.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 0, 255)).save(imgs / "exif6.jpg", exif=exif)
    good = (imgs / "red.png").read_bytes()
    (imgs / "truncated.png").write_bytes(good[: len(good) // 2])
    (imgs / "text.png").write_text("not an image")
    Image.new("RGB", (4, 4)).save(root / "outside.png")
    lines = []
    for record, _ in CASES:
        if record == "ABSOLUTE":
            record = rec("absolute", user("q", "image"), gpt("a"), image=str(root / "outside.png"))
        lines.append(record if isinstance(record, str) else json.dumps(record))
    data = root / "dirty.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, imgs


def expected_problems(data: Path) -> list[tuple[str, str, str, str]]:
    return [(i, f, r, f"{data}:{line}") for line, (_, probs) in enumerate(CASES, start=1) for (i, f, r) in probs]


def found(report) -> list[tuple[str, str, str, str]]:
    return [(p.error.sample_id, p.error.field, p.error.reason, p.error.source) for p in report.problems]


def test_every_bad_input_reported_with_reason_field_and_id(dirty, llava_card) -> None:
    data, imgs = dirty
    samples = load_samples(str(data))
    report = validate(samples, card=llava_card, image_folder=str(imgs), check_media="full")
    assert sorted(found(report)) == sorted(expected_problems(data))
    assert report.num_records == len(CASES) and not report.ok
    assert report.counts["bad_format"] == 4 and report.counts["corrupt_image"] == 2
    assert report.num_bad == len(CASES) - len(GOOD)
    # the good samples of the same file load, media included
    ds = ConversationDataset.for_card(samples, llava_card, image_folder=str(imgs))
    good = [ds[i] for i in range(len(ds)) if ds.samples[i].id in GOOD]
    assert [item.sample.id for item in good] == GOOD
    assert good[2].media.images[1].size == (20, 40)  # EXIF-rotated


# Only decoding finds a truncated file whose header is intact: the DataLoader does, in training.
ONLY_DECODING_FINDS = {("truncated", "images[0]", "corrupt_image")}


def test_header_check_reports_everything_but_what_only_decoding_finds(dirty, llava_card) -> None:
    data, imgs = dirty
    report = validate(load_samples(str(data)), card=llava_card, image_folder=str(imgs))  # check_media="header"
    assert sorted(found(report)) == sorted(p for p in expected_problems(data) if p[:3] not in ONLY_DECODING_FINDS)


@pytest.mark.parametrize("check_media", ["header", "full"])
def test_workers_report_the_same(dirty, llava_card, check_media) -> None:
    data, imgs = dirty
    samples = load_samples(str(data))
    serial = validate(samples, card=llava_card, image_folder=str(imgs), check_media=check_media, num_workers=0)
    parallel = validate(samples, card=llava_card, image_folder=str(imgs), check_media=check_media, num_workers=2)
    assert parallel.to_dict() == serial.to_dict() and parallel.lengths == serial.lengths


def test_skip_drops_exactly_the_reported_samples(dirty, llava_card, tmp_path: Path) -> None:
    data, imgs = dirty
    samples = load_samples(str(data))
    report = validate(samples, card=llava_card, image_folder=str(imgs), check_media="full")
    lines: list[str] = []
    kept = apply_policy(report, samples, "skip", tmp_path, log=lines.append)
    assert [s.id for s in kept] == GOOD
    skipped = [json.loads(line) for line in (tmp_path / "skipped_samples.jsonl").read_text().splitlines()]
    assert len(skipped) + len(kept) == report.num_records
    assert {(s["id"], s["source"]) for s in skipped} == {(i, src) for i, _, _, src in expected_problems(data)}
    bot = next(s for s in skipped if s["id"] == "bot")
    assert [e["reason"] for e in bot["errors"]] == ["unknown_role", "no_assistant_turn"]
    assert lines and f"skipped {len(skipped)} of {len(CASES)}" in lines[0]
    with pytest.raises(DataValidationError) as info:
        apply_policy(report, samples, "error", tmp_path)
    assert "missing_media" in str(info.value) and "two-placeholders" in str(info.value)
    clean = validate(kept, card=llava_card, image_folder=str(imgs))
    assert clean.ok and apply_policy(clean, kept, "error") is kept


def test_upsampled_repeats_are_reported_and_dropped_each_time(dirty, llava_card, tmp_path: Path) -> None:
    data, imgs = dirty
    (tmp_path / "small.jsonl").write_text("\n".join(json.dumps(r) for r, _ in CASES[:3]) + "\n")
    mixed = load_samples(str(tmp_path / "small.jsonl")).take([0, 1, 2, 1, 0])  # as a weighted mix repeats
    report = validate(mixed, card=llava_card, image_folder=str(imgs), check_media="full")
    assert [p.index for p in report.problems] == [1, 2, 3]
    assert [s.id for s in apply_policy(report, mixed, "skip", log=lambda _: None)] == ["good-image", "good-image"]
    parallel = validate(mixed, card=llava_card, image_folder=str(imgs), check_media="full", num_workers=2)
    assert parallel.to_dict() == report.to_dict() and parallel.lengths == report.lengths


# -- with the real engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_processing():
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model(MODEL, require_fixture(MODEL))
    return resolved.card, load_processing(resolved)


@pytest.fixture(scope="module")
def llava_card():
    from cardtune.registry import get_registry

    return get_registry().get(MODEL).family


def _encoder(card, processing, max_length=None, **chat):
    from cardtune.collators.engine import ChatEncoder

    if chat:
        card = card.model_copy(update={"chat": card.chat.model_copy(update=chat)})
    return ChatEncoder(card, processing, max_length=max_length)


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_encoder_checks_length_labels_and_truncation(dirty, llava_processing, tmp_path: Path) -> None:
    card, processing = llava_processing
    _, imgs = dirty
    long_answer = "This answer goes on and on. " * 20
    data = _write(tmp_path / "d.jsonl", [
        rec("short", user("What?", "image"), gpt("Red."), image="red.png"),                  # 594 tokens
        rec("long-answer", user("What?", "image"), gpt(long_answer), image="red.png"),       # cut after the image
        rec("long-question", user("Why? " * 60, "image"), gpt("Because."), image="red.png"),  # answer cut away
        rec("two-images", user("Compare.", "image", "image"), gpt("Same."), image=["red.png", "red.png"]),
        rec("text", user("Hi"), gpt("Hello.")),
    ])
    samples = load_samples(data)
    report = validate(samples, _encoder(card, processing, max_length=640), image_folder=str(imgs))
    assert [(p.error.sample_id, p.error.reason) for p in report.problems] == [
        ("long-question", "empty_labels"),
        ("two-images", "too_long"),  # 2 x 576 image tokens: truncation would cut media
    ]
    assert report.num_truncated == 1  # long-answer: kept, text cut after its image
    assert report.problems[1].error.source == f"{data}:4"


def test_encoder_template_and_label_contract_errors(llava_processing, tmp_path: Path) -> None:
    card, processing = llava_processing
    data = _write(tmp_path / "d.jsonl", [
        {"id": "sys", "system_prompt": "Be brief.", "conversations": [user("q"), gpt("a")]},
        rec("plain", user("q"), gpt("a")),
    ])
    samples = load_samples(data)
    refused = validate(samples, _encoder(card, processing, system="reject"))
    assert [(p.error.sample_id, p.error.field, p.error.reason) for p in refused.problems] == [
        ("sys", "messages[0]", "template_error")]
    # a card whose assistant header is not in the template: no answer can be located
    wrong = validate(samples, _encoder(card, processing, assistant_header="BOT:"))
    assert {(p.error.sample_id, p.error.reason) for p in wrong.problems} == {("sys", "label_contract"), ("plain", "label_contract")}


# -- the command --------------------------------------------------------------------------------
def test_validate_data_command_json(dirty, capsys) -> None:
    data, imgs = dirty
    rc = main(["validate-data", "--model_id", MODEL, "--model-path", str(require_fixture(MODEL)),
               "--data", str(data), "--image-folder", str(imgs), "--max-length", "2048", "--json", "--check-media", "full"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["ok"] is False and out["model_id"] == MODEL
    assert sorted((e["id"], e["field"], e["reason"], e["source"]) for e in out["errors"]) == sorted(expected_problems(data))
    assert sum(out["counts"].values()) == len(out["errors"])


def test_validate_data_command_table_and_clean_exit(dirty, capsys, tmp_path: Path) -> None:
    data, imgs = dirty
    rc = main(["validate-data", "--model_id", MODEL, "--no-encode", "--data", str(data), "--image-folder", str(imgs),
               "--check-media", "full"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "two-placeholders" in out and "placeholder_mismatch" in out and f"{len(CASES) - len(GOOD)} of {len(CASES)}" in out
    clean = _write(tmp_path / "clean.jsonl", [rec("a", user("q", "image"), gpt("x"), image="red.png")])
    rc = main(["validate-data", "--model_id", MODEL, "--no-encode", "--data", clean, "--image-folder", str(imgs)])
    assert rc == 0 and "ok: 1 records" in capsys.readouterr().out
