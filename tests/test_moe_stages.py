"""The MoE-LLaVA stages chained on the embedded demo: each stage trains from the folder the
previous one wrote (``--model_path``)."""

from __future__ import annotations

from pathlib import Path

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
