"""`cardtune add-model` on every fixture folder: the scaffolded card passes `check` and gives the
same input ids and labels as the hand-written card, and the same freeze groups."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from cardtune.cli import main
from tests.conftest import MODELS, require_fixture

# fixture folder -> (the hand-written card's model id, --like when the folder cannot tell all)
FOLDERS: dict[str, tuple[str, str | None]] = {
    "deepseek-coder-6.7b-instruct": ("deepseek-coder-6.7b-instruct", None),
    "llama-2-7b-chat": ("llama-2-7b-chat", None),
    "llava-1.5-7b": ("llava-1.5-7b", None),
    "llava-interleave-qwen-7b": ("llava-interleave-qwen-7b", None),
    "mistral-7b-instruct-v0.2": ("mistral-7b-instruct-v0.2", None),
    "mistral-7b-instruct-v0.3": ("mistral-7b-instruct-v0.3", None),
    "qwen2.5-7b-instruct": ("qwen2.5-7b-instruct", None),
    "qwen2.5-vl-3b-instruct": ("qwen2.5-vl-3b-instruct", None),
    "gemma-2-2b-it": ("gemma-2-2b-it", None),
    "llama-3-8b-instruct": ("llama-3-8b-instruct", None),
    "llama-3.2-11b-vision-instruct": ("llama-3.2-11b-vision-instruct", None),
    "llava-onevision-qwen2-0.5b-ov-hf": ("llava-onevision-0.5b-ov", None),
    "llava-v1.6-mistral-7b-hf": ("llava-1.6-mistral-7b", None),
    "qwen2-vl-2b-instruct": ("qwen2-vl-2b-instruct", None),
    # the 2025-26 generation: harmony channels and two ends of turn, think blocks, an image
    # placeholder the processor expands into other tokens
    "gemma-3-4b-it": ("gemma-3-4b-it", None),
    "gpt-oss-20b": ("gpt-oss-20b", None),
    "qwen3-4b": ("qwen3-4b", None),
    "qwen3-vl-4b-instruct": ("qwen3-vl-4b-instruct", None),
    # no chat template in the folder: the format comes from a family
    "vicuna-7b-v1.5": ("vicuna-7b-v1.5", "vicuna-v1.5"),
    "qwen2-vl-2b": ("qwen2-vl-2b", "qwen2-vl-base"),  # its template renders nothing
    "llava-next-video-7b": ("llava-next-video-7b", "llava-next-video"),  # an older snapshot: no template
    # no template, and remote code that is not in the folder (no meta model for the keywords)
    "phi-2": ("phi-2", "phi-2"),
    "qwen-vl-chat": ("qwen-vl-chat", "qwen-vl"),
    # its own template, but remote code that is not in the folder
    "phi3-vision": ("phi3-v", "phi3-v"),
}


def test_every_fixture_folder_is_covered() -> None:
    if not MODELS.is_dir():
        pytest.skip(f"fixtures not found at {MODELS}")
    assert sorted(p.name for p in MODELS.iterdir() if p.is_dir()) == sorted(FOLDERS)


@functools.cache
def _added(folder_name: str, cards: str) -> tuple[int, str, str]:
    """Run add-model once per folder into ``cards``; (exit code, stdout, card path)."""
    import contextlib
    import io

    model_id = f"added-{folder_name}"
    like = FOLDERS[folder_name][1]
    argv = ["add-model", str(require_fixture(folder_name)), "--model_id", model_id, "--cards", cards]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(argv + (["--like", like] if like else []))
    return rc, out.getvalue(), str(Path(cards) / f"{model_id}.yaml")


@pytest.fixture(scope="module")
def cards_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("user-cards"))


def _conversations(multimodal: bool) -> list[tuple[Any, list[Any]]]:
    from cardtune.conversation import Sample

    def t(text: str) -> dict[str, str]:
        return {"type": "text", "text": text}

    out = [
        (Sample("sys-3-turns", [
            {"role": "system", "content": [t("You are brief.")]},
            {"role": "user", "content": [t("Name a prime.")]},
            {"role": "assistant", "content": [t("Seven.")]},
            {"role": "user", "content": [t("Another?")]},
            {"role": "assistant", "content": [t("Eleven is prime too.")]},
            {"role": "user", "content": [t("Last one.")]},
            {"role": "assistant", "content": [t("Thirteen.")]},
        ]), []),
        (Sample("one-turn", [
            {"role": "user", "content": [t("Say 'ASSISTANT: hi' and nothing else.")]},
            {"role": "assistant", "content": [t("ASSISTANT: hi")]},
        ]), []),
    ]
    if multimodal:
        red, blue = Image.new("RGB", (60, 40), (220, 20, 20)), Image.new("RGB", (32, 64), (20, 20, 220))
        out.append((Sample("two-images", [
            {"role": "user", "content": [{"type": "image"}, t("What colour?")]},
            {"role": "assistant", "content": [t("Red.")]},
            {"role": "user", "content": [{"type": "image"}, t("And this one?")]},
            {"role": "assistant", "content": [t("Blue.")]},
        ], images=["red.png", "blue.png"]), [red, blue]))
    return out


def _encoder(card: Any, folder: Path) -> Any:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders import LOADERS

    return ChatEncoder(card, LOADERS[card.loader](card, folder).load_processing())


@pytest.mark.parametrize("folder_name", sorted(FOLDERS))
def test_added_card_passes_check_and_labels_like_the_hand_written_card(folder_name: str, cards_dir: str) -> None:
    from cardtune.collators.engine import IGNORE_INDEX
    from cardtune.conversation import Media
    from cardtune.errors import SampleError
    from cardtune.registry import get_registry
    from cardtune.registry.loader import load_card_file

    folder = require_fixture(folder_name)
    rc, out, path = _added(folder_name, cards_dir)
    assert rc == 0, out
    assert f"wrote {path}: new family added-{folder_name}, model id added-{folder_name}" in out
    assert "FAIL" not in out and "  OK   end of turn trained: 3/3" in out
    card = load_card_file(Path(path))
    assert card.status == "experimental" and card.models[0].hf_path  # a scaffold is never "supported" yet

    hand = get_registry().get(FOLDERS[folder_name][0]).family
    # a scaffold cannot tell whether a model was trained on several images or on videos: it
    # claims multi_image for every image model, and video where it finds a video token
    claimed = {"multi_image", "video"}
    assert [m for m in card.modalities if m not in claimed] == [m for m in hand.modalities if m not in claimed]
    assert "multi_image" in card.modalities or "image" not in card.modalities
    ours, theirs = _encoder(card, folder), _encoder(hand, folder)
    images_ok = ours.processing.processor is not None or ours.processing.image_processor is not None
    for sample, images in _conversations(card.is_multimodal and card.load_image and images_ok):
        media = Media(images=images) if images else None
        try:
            want = theirs.encode(sample, media)
        except SampleError as exc:  # a sample the hand card refuses must be refused alike
            with pytest.raises(SampleError) as got:
                ours.encode(sample, media)
            assert got.value.reason == exc.reason
            continue
        got = ours.encode(sample, media)
        assert (got.input_ids, got.labels) == (want.input_ids, want.labels), f"{folder_name}/{sample.id}"
        assert any(lab != IGNORE_INDEX for lab in got.labels)


def _freeze_groups(card: Any, model: Any) -> dict[str, str | None]:
    from cardtune.training.model import group_of

    return {name: group_of(name, card) for name, _ in model.named_parameters()}


@pytest.mark.parametrize("folder_name", ["llava-1.5-7b", "llava-interleave-qwen-7b", "qwen2.5-vl-3b-instruct",
                                         "qwen2-vl-2b", "vicuna-7b-v1.5", "mistral-7b-instruct-v0.3"])
def test_discovered_keywords_freeze_the_same_parameters(folder_name: str, cards_dir: str) -> None:
    """The keywords read off the meta model put every parameter in the same group as the hand card's."""
    from cardtune.loaders.discover import build_on_meta
    from cardtune.registry import get_registry
    from cardtune.registry.loader import load_card_file

    rc, out, path = _added(folder_name, cards_dir)
    assert rc == 0, out
    card = load_card_file(Path(path))
    hand = get_registry().get(FOLDERS[folder_name][0]).family
    model = build_on_meta(require_fixture(folder_name), card.model_class, False)
    ours, theirs = _freeze_groups(card, model), _freeze_groups(hand, model)
    assert ours == theirs
    assert None not in ours.values()  # every parameter has a group
    if card.is_multimodal:
        assert {"vision_encoder", "vision_projector", "llm"} <= set(ours.values())


def test_written_card_reads_back_with_review_notes(cards_dir: str) -> None:
    rc, out, path = _added("qwen-vl-chat", cards_dir)
    text = Path(path).read_text()
    raw = yaml.safe_load(text)
    assert raw["loader"] == "qwen-vl" and raw["load_image"] is False
    # its model class is remote code: never trusted without --trust-remote-code, and said so
    assert "trust_remote_code" not in raw
    assert "QWenLMHeadModel is remote code (configuration_qwen.py, modeling_qwen.py, tokenization_qwen.py), not run" in out
    assert "give --trust-remote-code to use it (after reading it)" in out
    # the fix-ups MoE-LLaVA applies by hand, recommended from the tokenizer and its configs
    assert raw["chat"]["special_tokens"] == {"eos": "<|endoftext|>", "pad": "<|extra_0|>"}
    assert raw["chat"]["template"] == "declarative"
    assert "# Review before a pull request:" in text
    assert "module keywords come from qwen-vl: check them against the model's parameter names" in out
    assert raw["models"] == [{"model_id": "added-qwen-vl-chat",
                              "hf_path": str(require_fixture("qwen-vl-chat").resolve())}]


def test_recommended_special_tokens() -> None:
    from transformers import AutoTokenizer

    from cardtune.scaffold import recommend_special_tokens

    vicuna = require_fixture("vicuna-7b-v1.5")  # pads with <unk> as shipped (special_tokens_map)
    assert recommend_special_tokens(AutoTokenizer.from_pretrained(vicuna), vicuna) == ({}, [], [])
    llama = require_fixture("llama-2-7b-chat")  # no pad: unk, distinct from eos, pads
    fix, said, review = recommend_special_tokens(AutoTokenizer.from_pretrained(llama), llama)
    assert fix == {"pad": "<unk>"} and review == []
    assert said == ["pad '<unk>': the tokenizer has none; unk pads (never trained: masked)"]
    phi2 = require_fixture("phi-2")
    fix, said, review = recommend_special_tokens(AutoTokenizer.from_pretrained(phi2), phi2)
    assert fix == {"allow_shared": True, "pad": "<|endoftext|>"}
    assert review[0].startswith("bos/eos/unk share a token as shipped")
    qwen = require_fixture("qwen2.5-7b-instruct")
    assert recommend_special_tokens(AutoTokenizer.from_pretrained(qwen), qwen)[0] == {}


# -- what add-model cannot tell, it says ----------------------------------------------------------
def test_folder_without_template_needs_like(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = require_fixture("vicuna-7b-v1.5")
    rc = main(["add-model", str(folder), "--model_id", "my-vicuna", "--cards", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(
        f"cardtune add-model: {folder}: the folder ships no chat template. cardtune cannot invent the format "
        "a model was trained with: give --like FAMILY to take a registered family's template (families with "
        "templates of their own: "
    )
    assert "vicuna-v1.5" in err and list(tmp_path.iterdir()) == []  # nothing written


def test_remote_code_vlm_without_code_needs_like(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = require_fixture("qwen-vl-chat")
    rc = main(["add-model", str(folder), "--model_id", "my-qwen-vl", "--cards", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err == (
        f"cardtune add-model: {folder}: the model cannot be built on the meta device (QWenLMHeadModel is remote "
        "code (configuration_qwen.py, modeling_qwen.py, tokenization_qwen.py), not run without trust), so its vision, "
        "projector and language-model modules are unknown; give --like FAMILY to take a family's keywords, or "
        "--trust-remote-code to build it with its code, or write the card by hand\n"
    )


def test_remote_code_runs_only_with_trust_remote_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder whose config names remote code: add-model (even --dry-run) imports none of it
    unless --trust-remote-code is given; only then does the card trust it."""
    import shutil

    source = require_fixture("qwen2.5-7b-instruct")
    folder = tmp_path / "evil"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    marker = tmp_path / "remote-code-ran"
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedConfig\n\n\nclass EvilConfig(PreTrainedConfig):\n    model_type = 'evil'\n"
    )
    (folder / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["EvilForCausalLM"], "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    }))
    (tmp_path / "cards").mkdir()
    argv = ["add-model", str(folder), "--model_id", "evil-7b", "--cards", str(tmp_path / "cards")]
    for extra in (["--dry-run"], []):
        rc = main(argv + extra)
        out = capsys.readouterr().out
        assert rc == 0, out
        assert not marker.exists()
        assert "trust_remote_code" not in out.split("check:")[0].replace("drop trust_remote_code", "")
        assert "EvilForCausalLM is remote code (configuration_evil.py, modeling_evil.py), not run" in out
    written = yaml.safe_load((tmp_path / "cards" / "evil-7b.yaml").read_text())
    assert "trust_remote_code" not in written and written["modules"] == {"llm": ["model", "lm_head"]}
    rc = main(argv[:3] + ["evil-8b", *argv[4:], "--dry-run", "--trust-remote-code"])
    out = capsys.readouterr().out
    assert marker.read_text() == "ran"  # asked for: it ran
    assert "trust_remote_code: true" in out


def test_registered_id_and_existing_file_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(require_fixture("qwen2.5-7b-instruct"))
    assert main(["add-model", folder, "--model_id", "qwen2.5-7b-instruct", "--cards", str(tmp_path)]) == 2
    assert "model id 'qwen2.5-7b-instruct' is already registered (in " in capsys.readouterr().err
    assert main(["add-model", folder, "--model_id", "Qwen Local", "--cards", str(tmp_path)]) == 2
    assert "a model id is lowercase letters" in capsys.readouterr().err
    (tmp_path / "mine.yaml").write_text("# my notes\n")
    assert main(["add-model", folder, "--model_id", "x", "--family", "mine", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"cardtune add-model: {tmp_path / 'mine.yaml'} exists; give --force to overwrite it, "
        "or --family to choose another name\n"
    )
    assert (tmp_path / "mine.yaml").read_text() == "# my notes\n"


def test_dry_run_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(require_fixture("mistral-7b-instruct-v0.3"))
    assert main(["add-model", folder, "--model_id", "dry", "--cards", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    card = yaml.safe_load(out[: out.index("check: ")])
    assert card["family"] == "dry" and card["model_class"] == "MistralForCausalLM"
    assert card["modules"] == {"llm": ["model", "lm_head"], "llm_mlp": ["mlp"]} and card["chat"] == {"special_tokens": {"pad": "<unk>"}}


def test_entry_added_to_an_existing_family_keeps_its_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.registry.loader import load_card_file

    builtin = Path(__file__).resolve().parents[1] / "configs" / "models" / "qwen2-instruct.yaml"
    text = builtin.read_text().replace("family: qwen2-instruct", "family: my-qwen2")
    for model_id in [line.split(":", 1)[1].strip() for line in text.splitlines() if "model_id:" in line]:
        text = text.replace(f"model_id: {model_id}\n", f"model_id: my-{model_id}\n")
    card_file = tmp_path / "my-qwen2.yaml"
    card_file.write_text(text)
    folder = str(require_fixture("qwen2.5-7b-instruct"))
    rc = main(["add-model", folder, "--model_id", "my-local-qwen", "--family", "my-qwen2", "--cards", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"added my-local-qwen to family my-qwen2 in {card_file}" in out
    new_text = card_file.read_text()
    assert new_text.startswith(text.rstrip("\n") + "\n")  # the old text, comments and all, is kept
    assert new_text[len(text.rstrip("\n")) + 1 :] == f"  - model_id: my-local-qwen\n    hf_path: {json.dumps(str(Path(folder).resolve()))}\n"
    card = load_card_file(card_file)
    assert card.models[-1].model_id == "my-local-qwen"
    assert "  OK   masked-label round trip: 3 answers supervised exactly" in out


def test_missing_folder_and_offline_hub_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-model", str(tmp_path / "nope"), "--model_id", "x"]) == 2
    assert capsys.readouterr().err == f"cardtune add-model: {tmp_path / 'nope'}: no such model folder (and not a hub id: org/name)\n"
    assert main(["add-model", "someorg/somemodel", "--model_id", "x"]) == 2  # HF_HUB_OFFLINE=1 in tests
    err = capsys.readouterr().err
    assert err.startswith("cardtune add-model: someorg/somemodel: not a local folder, and its config and tokenizer "
                          "files could not be downloaded (")
    assert err.endswith("); download the folder and pass its path\n")


def test_an_entry_for_a_built_in_family_goes_to_the_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--family F --cards DIR`` with a built-in F: the package's own card is never written; the
    new id goes into an entries file of F in DIR, which the registry reads with DIR."""
    from cardtune.registry import get_registry

    builtin = Path(__file__).resolve().parents[1] / "configs" / "models" / "qwen2-instruct.yaml"
    before = builtin.read_bytes()
    folder = str(require_fixture("qwen2.5-7b-instruct"))
    cards = tmp_path / "cards"
    for model_id in ("my-qwen-a", "my-qwen-b"):
        rc = main(["add-model", folder, "--model_id", model_id, "--family", "qwen2-instruct", "--cards", str(cards)])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert f"added {model_id} to family qwen2-instruct in {cards / 'qwen2-instruct.yaml'}" in out
    assert builtin.read_bytes() == before
    entries = yaml.safe_load((cards / "qwen2-instruct.yaml").read_text())
    assert entries == {"family": "qwen2-instruct", "models": [
        {"model_id": "my-qwen-a", "hf_path": folder}, {"model_id": "my-qwen-b", "hf_path": folder}]}
    registry = get_registry([cards])
    assert registry.get("my-qwen-b").family is registry.families["qwen2-instruct"]
    assert registry.get("my-qwen-b").source == str(cards / "qwen2-instruct.yaml")
    # an entries file of a family no card defines is one line naming the file
    (cards / "other.yaml").write_text("family: no-such-family\nmodels:\n  - model_id: x\n    hf_path: a/b\n")
    assert main(["check", "--cards", str(cards)]) == 1
    assert capsys.readouterr().err == (f"FAIL {cards / 'other.yaml'}:1: family: 'no-such-family' is not defined by any "
                                       "card (an entries file adds model ids to a family defined in another card file)\n")
