"""`cardtune labels` / `cardtune inspect` end to end, on real fixtures and real image files."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cardtune.cli import main
from tests.conftest import require_fixture


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
