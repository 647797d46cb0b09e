"""`cardtune check --model-path` / `--models-dir`: a card applied to a real folder, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from cardtune.cli import main
from tests.conftest import MODELS, require_fixture

REPO = Path(__file__).resolve().parents[1]


def _lines(out: str) -> dict[str, list[str]]:
    """Check name -> its lines (status first), for one model's report."""
    found: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("  ") and ": " in line:
            status, rest = line.strip().split(None, 1)
            name, detail = rest.split(": ", 1)
            found.setdefault(name, []).append(f"{status} {detail}")
    return found


def test_llava_card_on_its_folder(capsys: pytest.CaptureFixture[str]) -> None:
    folder = require_fixture("llava-1.5-7b")
    assert main(["check", "llava-1.5-7b", "--model-path", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"llava-1.5-7b on {folder} (card: {REPO / 'configs/models/llava-1.5.yaml'})\n")
    got = _lines(out)
    assert got["special tokens"] == ["OK pad '<pad>' (32001), unk '<unk>' (0), bos '<s>' (1), eos '</s>' (2)"]
    assert got["bos"] == ["OK '<s>' (1) added by the tokenizer (the template writes none); the encoded probe starts with it once"]
    assert got["template"] == ["OK renders a system prompt and 3 turns"]
    assert got["role tokens"] == [
        "OK assistant header 'ASSISTANT:' [319, 1799, 9047, 13566, 29901], end of turn '</s>' [2] "
        "(appended to each answer: the template writes none); content as parts, system native"
    ]
    assert got["end of turn trained"] == ["OK 3/3 answers end with '</s>' in the labels"]
    assert got["masked-label round trip"][0].startswith("OK 3 answers supervised exactly (")
    # 336 px CLIP: 24 x 24 patches
    assert got["image"] == ["OK 1 image gives 576 image tokens (the processor's count: 576), 0 trained; answer supervised exactly"]
    assert out.endswith("ok: 1 model checked on their folders\n")


def test_bos_written_by_the_template_is_not_doubled(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "llama-2-7b-chat", "--model-path", str(require_fixture("llama-2-7b-chat"))]) == 0
    assert _lines(capsys.readouterr().out)["bos"] == [
        "OK '<s>' (1) written by the template and added by the tokenizer: tokenizing the render with "
        "add_special_tokens=True would double it; cardtune adds none; the encoded probe starts with it once"
    ]


def test_shared_tokens_and_pad_eos_are_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "phi-2", "--model-path", str(require_fixture("phi-2"))]) == 0
    got = _lines(capsys.readouterr().out)
    assert "OK shared (card allows it): bos = eos = unk" in got["special tokens"]
    assert ("OK pad == eos: padding must be found by the attention mask, never by id, or eos labels are lost"
            in got["special tokens"])
    assert got["end of turn trained"] == ["OK 3/3 answers end with '<|endoftext|>' in the labels"]


def _user_card(tmp_path: Path, builtin: str, family: str, edit: tuple[str, str]) -> Path:
    text = (REPO / "configs" / "models" / builtin).read_text()
    old_family = next(line for line in text.splitlines() if line.startswith("family: "))
    text = text.replace(old_family, f"family: {family}")
    ids = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("- model_id:")]
    for model_id in ids:
        text = text.replace(f"model_id: {model_id}\n", f"model_id: {family}-{model_id}\n")
    assert edit[0] in text
    (tmp_path / f"{family}.yaml").write_text(text.replace(*edit))
    return tmp_path


def test_a_card_that_drops_the_text_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """llava-1.5's template writes nothing for string content (FIELD_NOTES): a card forcing
    string content renders empty turns, and check says so and exits 1."""
    cards = _user_card(tmp_path, "llava-1.5.yaml", "broken-llava",
                       ('chat:\n  end_of_turn: "</s>"\n', 'chat:\n  end_of_turn: "</s>"\n  content: string\n'))
    rc = main(["check", "broken-llava-llava-1.5-7b", "--model-path", str(require_fixture("llava-1.5-7b")),
               "--cards", str(cards)])
    captured = capsys.readouterr()
    assert rc == 1
    got = _lines(captured.out)
    assert got["template"] == [
        "FAIL TemplateProbeError: the chat template does not write the messages' text with string content "
        "(a probe conversation renders 'USER: ASSISTANT: USER: ASSISTANT: '); "
        "set chat.content in the card, or fix the template"
    ]
    assert captured.err == "FAIL: 1 of 1 models failed: broken-llava-llava-1.5-7b\n"


def test_a_wrong_assistant_header_fails_the_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cards = _user_card(tmp_path, "qwen2-instruct.yaml", "badheader",
                       ("model_class: Qwen2ForCausalLM\n", "model_class: Qwen2ForCausalLM\nchat:\n  assistant_header: \"<|im_start|>user\\n\"\n"))
    rc = main(["check", "badheader-qwen2.5-7b-instruct", "--model-path", str(require_fixture("qwen2.5-7b-instruct")),
               "--cards", str(cards)])
    assert rc == 1
    got = _lines(capsys.readouterr().out)
    assert got["masked-label round trip"][0].startswith("FAIL ")
    assert got["masked-label round trip"][0].endswith("whose span decodes to the answer 'Mars.'")


def test_missing_pad_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cards = _user_card(tmp_path, "llama-2-chat.yaml", "nopad", ('chat:\n  special_tokens:\n    pad: "<unk>"\n', ""))
    rc = main(["check", "nopad-llama-2-7b-chat", "--model-path", str(require_fixture("llama-2-7b-chat")),
               "--cards", str(cards)])
    assert rc == 0
    assert "WARN no pad token: set chat.special_tokens.pad in the card" in _lines(capsys.readouterr().out)["special tokens"]


def test_derived_card_of_an_unregistered_folder(capsys: pytest.CaptureFixture[str]) -> None:
    folder = require_fixture("qwen2.5-7b-instruct")
    assert main(["check", "--model-path", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"qwen2.5-7b-instruct on {folder} (card: derived from the folder)\n" in out
    assert _lines(out)["end of turn trained"] == ["OK 3/3 answers end with '<|im_end|>' in the labels"]


def test_base_model_template_fails_when_derived(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--model-path", str(require_fixture("qwen2-vl-2b"))]) == 1
    assert _lines(capsys.readouterr().out)["template"][0].startswith(
        "FAIL TemplateProbeError: the chat template renders neither string nor list-of-parts content"
    )


def test_every_fixture_with_a_card_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """What CI runs: every registered model whose folder is among the fixtures."""
    if not MODELS.is_dir():
        pytest.skip(f"fixtures not found at {MODELS}")
    rc = main(["check", "--models-dir", str(MODELS)])
    out = capsys.readouterr().out
    assert rc == 0, out
    reports = [line for line in out.splitlines() if " on " in line and "(card: " in line]
    assert len(reports) == 24  # phi3-vision is matched through its config's _name_or_path
    assert any(r.startswith("phi3-v on ") for r in reports)
    assert out.count("OK   end of turn trained: 3/3") == 24
    assert "FAIL" not in out and "skip " not in out
    # every image model encodes an image with the processor's own token count, but phi3-v,
    # whose remote-code processor is not in its folder (a WARN, said why)
    assert out.count("OK   image: ") == 12
    assert out.count("WARN") == 1 and ("WARN image: images cannot be encoded: the image processor is remote code "
                                       "(image_processing_phi3_v.Phi3VImageProcessor) that does not load") in out
    # harmony: both ends of turn, each answer trained up to its own
    assert ("OK   end of turn trained: 3/3 answers end with '<|return|>' or '<|end|>' in the labels") in out


def test_check_model_path_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = str(require_fixture("qwen2.5-7b-instruct"))
    assert main(["check", "qwen2.5-7b-instruct", "phi-2", "--model-path", folder]) == 2
    assert capsys.readouterr().err == "cardtune check: --model-path checks one model: give at most one MODEL_ID\n"
    assert main(["check", "--models-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"cardtune check: --models-dir {tmp_path}: no folder is named after a registered model\n"
