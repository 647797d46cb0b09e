"""`cardtune labels` / `cardtune inspect` end to end, on real fixtures and real image files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from cardtune.cli import main
from tests.conftest import REPO, require_fixture


@pytest.fixture
def llava_data(tmp_path):
    Image.new("RGB", (50, 40), (200, 10, 10)).save(tmp_path / "red.png")
    records = [
        {
            "id": "img-1",
            "image": "red.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "Sure? Say ASSISTANT: yes"},
                {"from": "gpt", "value": "Yes, red."},
            ],
        },
        {"id": "text-2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def _spans(tokenizer, ids, labels):
    out, cur = [], []
    for tok, lab in zip(ids, labels, strict=True):
        if lab != -100:
            cur.append(tok)
        elif cur:
            out.append(tokenizer.decode(cur))
            cur = []
    return out + ([tokenizer.decode(cur)] if cur else [])


def test_labels_llava_exact_spans_and_bos(llava_data, capsys):
    folder = require_fixture("llava-1.5-7b")
    rc = main(["labels", "--model_id", "llava-1.5-7b", "--model-path", str(folder),
               "--data", str(llava_data / "data.json"), "--image-folder", str(llava_data)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    rows = [json.loads(line) for line in out]
    assert [r["id"] for r in rows] == ["img-1", "text-2"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    img = rows[0]
    # one bos, 576 image tokens (336px CLIP, 24x24 patches), none of them trained
    assert img["input_ids"][0] == 1 and img["input_ids"].count(1) == 1
    assert img["input_ids"].count(32000) == 576
    assert all(lab == -100 for tok_id, lab in zip(img["input_ids"], img["labels"], strict=True) if tok_id == 32000)
    # the user's "ASSISTANT:" opens no span; both answers end with the appended </s>
    assert _spans(tok, img["input_ids"], img["labels"]) == ["Red.</s>", "Yes, red.</s>"]
    text = rows[1]
    assert text["input_ids"] == [1, 3148, 1001, 29901, 6324, 319, 1799, 9047, 13566, 29901, 15043, 29991, 2, 259]
    assert text["labels"] == [-100] * 10 + [15043, 29991, 2, -100]


def test_labels_exit_code_and_reason_on_stderr(llava_data, capsys):
    folder = require_fixture("llava-1.5-7b")
    records = json.loads((llava_data / "data.json").read_text())
    records.append({"id": "no-answer", "conversations": [{"from": "human", "value": "Hi"}]})
    (llava_data / "bad.json").write_text(json.dumps(records))
    rc = main(["labels", "--model_id", "llava-1.5-7b", "--model-path", str(folder), "--data",
               str(llava_data / "bad.json"), "--image-folder", str(llava_data)])
    captured = capsys.readouterr()
    assert rc == 1
    assert len(captured.out.splitlines()) == 2  # the good samples are still written
    assert f"sample no-answer ({llava_data / 'bad.json'}[2]): messages: no_assistant_turn" in captured.err
    assert "1 of 3 samples failed (no_assistant_turn: 1)" in captured.err


def test_labels_on_unregistered_folder_derives_a_card(llava_data, capsys):
    folder = require_fixture("qwen2.5-vl-3b-instruct")
    rc = main(["labels", "--model-path", str(folder), "--data", str(llava_data / "data.json"),
               "--image-folder", str(llava_data)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "derived: model class Qwen2_5_VLForConditionalGeneration (config.json architectures)" in captured.err
    assert "derived: end of turn '<|im_end|>' from the template" in captured.err
    rows = [json.loads(line) for line in captured.out.splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    img = rows[0]
    # a 50x40 image: 28px patches, merge 2 -> grid 1x2x2 after resizing to 56x56 -> 1 token? measured from the processor
    n_pad = img["input_ids"].count(151655)
    assert n_pad > 0 and all(lab == -100 for t, lab in zip(img["input_ids"], img["labels"], strict=True) if t == 151655)
    assert _spans(tok, img["input_ids"], img["labels"]) == ["Red.<|im_end|>", "Yes, red.<|im_end|>"]


def test_inspect_collapses_media_and_summarises(llava_data, capsys):
    folder = require_fixture("llava-1.5-7b")
    rc = main(["inspect", "--model_id", "llava-1.5-7b", "--model-path", str(folder),
               "--data", str(llava_data / "data.json"), "--image-folder", str(llava_data), "-n", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "<image>×576" in out
    assert "What colour? ASSISTANT: Red.</s>" in out  # spaces kept between tokens
    assert "img-1: 618 tokens, 8 trained in 2 assistant turn(s), 576 media" in out
    assert "text-2" not in out  # -n 1


# -- one way to read a folder: --model-path alone gives the registered card's labels ------------

# every fixture folder whose own files carry a usable chat template -> its registered model id
WITH_TEMPLATE = {
    "deepseek-coder-6.7b-instruct": "deepseek-coder-6.7b-instruct",
    "gemma-2-2b-it": "gemma-2-2b-it",
    "llama-2-7b-chat": "llama-2-7b-chat",
    "llama-3-8b-instruct": "llama-3-8b-instruct",
    "llama-3.2-11b-vision-instruct": "llama-3.2-11b-vision-instruct",
    "llava-1.5-7b": "llava-1.5-7b",
    "llava-interleave-qwen-7b": "llava-interleave-qwen-7b",
    "llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-0.5b-ov",
    "llava-v1.6-mistral-7b-hf": "llava-1.6-mistral-7b",
    "mistral-7b-instruct-v0.2": "mistral-7b-instruct-v0.2",
    "mistral-7b-instruct-v0.3": "mistral-7b-instruct-v0.3",
    "phi3-vision": "phi3-v",
    "qwen2-vl-2b-instruct": "qwen2-vl-2b-instruct",
    "qwen2.5-7b-instruct": "qwen2.5-7b-instruct",
    "qwen2.5-vl-3b-instruct": "qwen2.5-vl-3b-instruct",
    "gemma-3-4b-it": "gemma-3-4b-it",
    "gpt-oss-20b": "gpt-oss-20b",
    "qwen3-4b": "qwen3-4b",
    "qwen3-vl-4b-instruct": "qwen3-vl-4b-instruct",
}
# folders without any chat template (qwen2-vl-2b's renders no conversation: a base model's)
WITHOUT_TEMPLATE = ["vicuna-7b-v1.5", "phi-2", "qwen-vl-chat", "qwen2-vl-2b", "llava-next-video-7b"]
# the folders whose images can be encoded (phi3-vision's processor is remote code, not in the folder)
IMAGES = {"llava-1.5-7b", "llava-interleave-qwen-7b", "qwen2.5-vl-3b-instruct", "llama-3.2-11b-vision-instruct",
          "qwen2-vl-2b-instruct", "llava-onevision-qwen2-0.5b-ov-hf", "llava-v1.6-mistral-7b-hf",
          "gemma-3-4b-it", "qwen3-vl-4b-instruct"}

def test_the_cli_folder_lists_cover_every_fixture(fixtures_present):
    assert sorted([*WITH_TEMPLATE, *WITHOUT_TEMPLATE]) == sorted(p.name for p in fixtures_present.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Text samples (several turns, a system prompt, whitespace kept) and image samples (one,
    two of different sizes) in one LLaVA-style file."""
    folder = tmp_path_factory.mktemp("cli-data")
    Image.new("RGB", (56, 56), (220, 20, 20)).save(folder / "red.png")
    Image.new("RGB", (112, 84), (20, 40, 220)).save(folder / "blue.png")
    text = [
        {"id": "turns", "conversations": [
            {"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."},
            {"from": "human", "value": "And of Italy?"}, {"from": "gpt", "value": "Rome."}]},
        {"id": "system", "system_prompt": "You are terse.", "conversations": [
            {"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Seven."}]},
        {"id": "quoted", "conversations": [
            {"from": "human", "value": "Say 'ASSISTANT: hi' and nothing else."}, {"from": "gpt", "value": "ASSISTANT: hi"}]},
    ]
    images = [
        {"id": "one-image", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "two-images", "image": ["red.png", "blue.png"], "conversations": [
            {"from": "human", "value": "<image>\nThis one?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "<image>\nAnd this one?"}, {"from": "gpt", "value": "Blue."}]},
    ]
    (folder / "text.json").write_text(json.dumps(text))
    (folder / "images.json").write_text(json.dumps(text + images))
    return folder


def _labels(capsys, *argv: str) -> tuple[int, list[str], str]:
    rc = main(["labels", *argv])
    captured = capsys.readouterr()
    return rc, captured.out.splitlines(), captured.err


@pytest.mark.parametrize("folder_name", sorted(WITH_TEMPLATE))
def test_model_path_alone_gives_the_registered_cards_labels(mixed_data, capsys, folder_name):
    folder = str(require_fixture(folder_name))
    data = mixed_data / ("images.json" if folder_name in IMAGES else "text.json")
    args = ["--data", str(data), "--image-folder", str(mixed_data)]
    rc_card, card_lines, card_err = _labels(capsys, "--model_id", WITH_TEMPLATE[folder_name], "--model-path", folder, *args)
    rc_derived, derived_lines, derived_err = _labels(capsys, "--model-path", folder, *args)
    from cardtune.registry import get_registry

    card = get_registry().get(WITH_TEMPLATE[folder_name]).family
    one_image = folder_name in IMAGES and "multi_image" not in card.modalities
    assert (rc_card, rc_derived) == (int(one_image), 0), card_err + derived_err
    if one_image:  # the registered card takes one image per sample: labels says so, as training would
        assert (f"cardtune labels: sample two-images ({data}[4]): images: unsupported_media: family {card.family} "
                "takes one image per sample, got 2") in card_err.splitlines()
        derived_lines = [line for line in derived_lines if json.loads(line)["id"] != "two-images"]
    assert len(card_lines) == len(json.loads(data.read_text())) - one_image
    assert derived_lines == card_lines


@pytest.mark.parametrize("folder_name", WITHOUT_TEMPLATE)
def test_model_path_without_a_template_says_so_in_one_line(mixed_data, folder_name):
    """Run as a user runs it (its own process: what its stderr shows is what a user sees)."""
    folder = require_fixture(folder_name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    done = subprocess.run([sys.executable, "-m", "cardtune", "labels", "--model-path", str(folder),
                           "--data", str(mixed_data / "text.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and done.stdout == ""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("cardtune labels:")]
    assert len(said) == 1, done.stderr
    # the wording is the command's; it names the missing template and both ways to give one
    assert "template" in said[0].lower() and "--model_id" in said[0] and "--template" in said[0], said[0]
