"""Training arguments and the errors a run gives before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cardtune.registry import CapabilityError
from cardtune.training.arguments import RECIPE_DIR, ArgumentError, parse_arguments


def _recipe(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def test_command_line_overrides_the_config_file(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, model_id="llava-1.5-7b", use_lora=True, learning_rate=1e-3, lora_r=8,
                     per_device_train_batch_size=3)
    args = parse_arguments(["--config", str(recipe), "--learning_rate", "5e-4", "--lora_r=4", "--output_dir", "o"])
    assert args.training.learning_rate == 5e-4 and args.tune.lora_r == 4
    assert args.tune.use_lora is True and args.training.per_device_train_batch_size == 3
    assert args.sources["learning_rate"] == "command line" and args.sources["use_lora"] == str(recipe)
    assert args.model.model_id == "llava-1.5-7b" and args.training.output_dir == "o"


def test_output_dir_defaults_to_out_model_id() -> None:
    args = parse_arguments(["--model_id", "llava-1.5-7b", "--data_path", "d.json"])
    assert args.training.output_dir == str(Path("out") / "llava-1.5-7b")


def test_unknown_options_are_errors_with_suggestions(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match=r"unknown option --learning_rat .*--learning_rate"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--learning_rat", "1e-3"])
    with pytest.raises(ArgumentError, match=r"recipe.yaml: unknown argument 'lora_rank'.*--lora_r"):
        parse_arguments(["--config", str(_recipe(tmp_path, model_id="llava-1.5-7b", lora_rank=8))])


def test_inconsistent_choices_are_refused() -> None:
    with pytest.raises(ArgumentError, match="--q_lora .* --use_lora"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--q_lora"])
    with pytest.raises(ArgumentError, match="--train_llm is false"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--use_lora", "--no_train_llm"])
    with pytest.raises(ArgumentError, match="nothing to train"):
        parse_arguments(["--model_id", "llava-1.5-7b", "--no_train_llm", "--no_train_vision_projector"])
    with pytest.raises(ArgumentError, match="--model_id"):
        parse_arguments([])


def test_demo_recipe_applies_to_the_demo_model_only() -> None:
    demo = parse_arguments(["--model_id", "tiny-llava-demo", "--max_steps", "7"])
    assert demo.tune.use_lora and demo.training.max_steps == 7 and demo.sources["use_lora"] == "demo recipe"
    assert demo.training.output_dir == str(Path("out") / "tiny-llava-demo")
    other = parse_arguments(["--model_id", "llava-1.5-7b"])
    assert not other.tune.use_lora and other.training.max_steps == -1


def test_shipped_recipes_parse_and_open_with_their_command() -> None:
    recipes = sorted(RECIPE_DIR.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"full", "lora", "qlora", "projector-only", "demo", "demo-dpo", "dpo"}
    for path in recipes:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# python train.py"), path
        if path.stem not in ("demo", "demo-dpo"):  # the demo's own: applied by --model_id tiny-llava-demo
            assert f"--config configs/train/{path.name}" in first, path
            argv = first[2:].split()[2:]  # drop "python train.py"
            argv = [a.replace(f"configs/train/{path.name}", str(path)) for a in argv]
            if path.stem == "qlora":
                with pytest.raises(ArgumentError, match="CUDA"):
                    from cardtune.train import run

                    run(argv)
                continue
            args = parse_arguments(argv)
            assert args.model.model_id and args.data.data_path


def test_unknown_model_id_lists_close_matches(capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.train import main

    assert main(["--model_id", "llava-1.5-7", "--data_path", "x.json"]) == 2
    err = capsys.readouterr().err
    assert "unknown model id 'llava-1.5-7'" in err and "llava-1.5-7b" in err


def test_qlora_without_cuda_is_a_clear_error_before_loading(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.loaders.generic import GenericLoader
    from cardtune.train import main

    def must_not_load(*_: object, **__: object) -> None:
        raise AssertionError("loaded something before the QLoRA check")

    monkeypatch.setattr(GenericLoader, "load_model", must_not_load)
    monkeypatch.setattr(GenericLoader, "load_processing", must_not_load)
    assert main(["--model_id", "llava-1.5-7b", "--data_path", "x.json", "--use_lora", "--q_lora"]) == 2
    err = capsys.readouterr().err
    assert "--q_lora needs a CUDA GPU" in err and "Traceback" not in err


def test_unsupported_capability_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.train import run

    with pytest.raises(CapabilityError, match="packing"):
        run(["--model_id", "llava-1.5-7b", "--data_path", "x.json", "--packing"])


def test_template_override_switches_the_card() -> None:
    from cardtune.registry import get_registry
    from cardtune.train import card_with_template

    card = get_registry().get("llava-1.5-7b").family
    plain = card_with_template(card, "plain")
    assert plain.chat.template == "plain" and plain.chat.end_of_turn is None
    assert card_with_template(card, None) is card
    with pytest.raises(ArgumentError, match="neither a template kind"):
        card_with_template(card, "no-such-template")


def test_resume_auto_takes_the_latest_complete_checkpoint(tmp_path: Path) -> None:
    from cardtune.training.checkpoints import resolve_resume

    assert resolve_resume("auto", tmp_path)[0] is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-14").mkdir()
    (tmp_path / "checkpoint-14" / "trainer_state.json").write_text("{truncated")
    path, lines = resolve_resume("auto", tmp_path)
    assert path == str(tmp_path / "checkpoint-10")
    assert lines == [
        "resume: auto: passing over checkpoint-12: no trainer_state.json (its save did not finish)",
        "resume: auto: passing over checkpoint-14: trainer_state.json: not readable "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
        f"resume: auto: {tmp_path / 'checkpoint-10'} (the latest complete checkpoint)",
    ]
    assert resolve_resume(None, tmp_path) == (None, [])
    with pytest.raises(ArgumentError, match="--resume_from_checkpoint .*nope: no such checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_attention_and_dtype_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import torch

    from cardtune.registry import get_registry
    from cardtune.training import model as prep

    card = get_registry().get("llava-1.5-7b").family
    args = parse_arguments(["--model_id", "llava-1.5-7b"])
    monkeypatch.setattr(prep, "cuda_available", lambda: False)
    assert prep.choose_attention(None, card) == ("sdpa", "no CUDA device")
    assert prep.choose_dtype(args)[0] == torch.float32
    monkeypatch.setattr(prep, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert prep.choose_attention(None, card) == ("sdpa", "flash_attn is not installed")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert prep.choose_attention(None, card)[0] == "flash_attention_2"
    assert prep.choose_attention("eager", card) == ("eager", "--attn_implementation")
    assert prep.choose_dtype(args)[0] == torch.bfloat16


def test_cardtune_train_is_train_py(capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main as cli

    assert cli(["train", "--model_id", "llava-1.5-7", "--data_path", "x.json"]) == 2
    assert "close matches: llava-1.5-7b" in capsys.readouterr().err
