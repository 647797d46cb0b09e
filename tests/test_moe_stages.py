"""The MoE-LLaVA stages chained on the embedded demo: each stage trains from the folder the
previous one wrote (``--model_path``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import train

DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no"]


def _projector(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "model.safetensors").items() if "multi_modal_projector" in k}


def test_plain_stage_output_trains_conversations_next(tmp_path: Path) -> None:
    """Stage 1 (``--template plain``, projector only) writes a folder that stage 2 loads with the
    family's chat template and starts from: with a zero learning rate its output equals stage 1's."""
    from cardtune.demo import ensure_demo_model

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    train([*DEMO, "--template", "plain", "--use_lora", "false", "--train_llm", "false", "--max_steps", "2",
           "--learning_rate", "1e-2", "--output_dir", str(stage1)])
    base, pretrained = _projector(ensure_demo_model()), _projector(stage1)
    assert base.keys() == pretrained.keys() and any(not torch.equal(base[k], pretrained[k]) for k in base)
    result = train([*DEMO, "--model_path", str(stage1), "--use_lora", "false", "--max_steps", "1",
                    "--learning_rate", "0", "--output_dir", str(stage2)])
    assert result.trainer.processing_class.chat_template == (stage1 / "chat_template.jinja").read_text()
    continued = _projector(stage2)
    assert all(torch.equal(continued[k], pretrained[k]) for k in pretrained)


def test_three_moe_llava_stages_on_the_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped stage recipes chained on the demo (a few steps each): projector pretraining,
    full finetuning, MoE-tuning; the stage-3 folder chats."""
    from cardtune.cli import main as cli
    from cardtune.demo import IMAGE_DIR, ensure_demo_dataset
    from cardtune.training.arguments import RECIPE_DIR

    stages = [tmp_path / f"stage{n}" for n in (1, 2, 3)]
    for n, out in enumerate(stages, start=1):
        argv = ["--model_id", "tiny-llava-demo", "--config", str(RECIPE_DIR / "moe-llava" / f"stage{n}.yaml"),
                "--output_dir", str(out), "--max_steps", "3", "--eval_strategy", "no"]
        if n > 1:
            argv += ["--model_path", str(stages[n - 2])]
        result = train(argv)
        assert result.trainer.state.global_step == 3
    trainable = {n.split(".mlp.")[-1].split(".")[0] for n, p in result.trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {"experts", "router"}
    assert result.summary["moe"].startswith("saved in cardtune's MoE format")
    capsys.readouterr()
    image = sorted((ensure_demo_dataset() / IMAGE_DIR).iterdir())[0]
    assert cli(["chat", "--model", str(stages[2]), "--image", str(image), "--prompt", "What shape is in the image?",
                "--max_new_tokens", "6"]) == 0
    assert capsys.readouterr().out.strip()
