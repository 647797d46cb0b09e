"""MoE-tuning runs end to end on tiny models built from real fixture configs: what trains, what
the logs hold, what is saved (native or cardtune format) and how it loads, LoRA on experts and
its merge, later stages, resume, and a 2-process gloo run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from test_train import first_batch, image_dataset, logits, text_dataset, tiny_model, train
from test_train_accelerate import launch_env

from cardtune.training.arguments import RECIPE_DIR

REPO = Path(__file__).resolve().parents[1]
STAGE3 = str(RECIPE_DIR / "moe-llava" / "stage3.yaml")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llava-1.5-7b", tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return image_dataset(tmp_path_factory.mktemp("llava-data"), n=8)


def llava_run(llava_dir: Path, llava_data: tuple[Path, Path], out: Path, *argv: str) -> Any:
    data, images = llava_data
    return train(["--config", STAGE3, "--model_id", "llava-1.5-7b", "--model_path", str(llava_dir),
                  "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out),
                  "--per_device_train_batch_size", "4", "--warmup_steps", "0", *argv])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return transformers.LlavaForConditionalGeneration.from_pretrained(folder).state_dict()


@pytest.fixture(scope="module")
def stage3(llava_dir: Path, llava_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The stage-3 recipe (sparse layers, 4 experts, top-2, only experts and routers, activation
    checkpointing) for 20 steps on tiny llava-1.5."""
    return llava_run(llava_dir, llava_data, tmp_path_factory.mktemp("stage3") / "out", "--max_steps", "20",
                     "--learning_rate", "1e-3")


def test_stage3_trains_only_experts_and_routers(stage3: Any, llava_dir: Path) -> None:
    model = stage3.trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.experts." in n or ".mlp.router." in n for n in trainable)
    assert {n.split(".mlp.")[0] for n in trainable} == {"model.language_model.layers.0"}  # sparse of 2 layers
    assert stage3.trainer.args.activation_checkpointing
    base = _weights(llava_dir)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, base[name]), f"frozen {name} changed"


def test_stage3_experts_diverge_from_each_other_and_the_dense_ffn(stage3: Any, llava_dir: Path) -> None:
    block = stage3.trainer.model.model.language_model.layers[0].mlp
    dense = transformers.LlavaForConditionalGeneration.from_pretrained(llava_dir).model.language_model.layers[0].mlp
    experts = [dict(e.named_parameters()) for e in block.experts]
    for name, weight in dense.named_parameters():
        for i, expert in enumerate(experts):
            assert not torch.equal(expert[name], weight), (i, name)
            for other in experts[i + 1:]:
                assert not torch.equal(expert[name], other[name]), name


def test_stage3_logs_the_aux_loss_and_the_expert_load(stage3: Any) -> None:
    history = stage3.trainer.state.log_history
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 20 and all(h["aux_loss"] > 0 for h in steps)  # every step logged
    for h in steps:
        shares = [h[f"moe_load/layer_0/expert_{e}"] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-3) and 0 <= h["moe_load_cv"] < 2
        assert "moe_dropped" not in h  # dropless
    written = json.loads((Path(stage3.summary["output_dir"]) / "log_history.json").read_text())
    assert [h["aux_loss"] for h in written if "aux_loss" in h] == [h["aux_loss"] for h in steps]


def test_stage3_output_is_a_cardtune_moe_folder_that_reloads(stage3: Any) -> None:
    from cardtune.training.output import load_trained

    out = Path(stage3.summary["output_dir"])
    assert stage3.summary["moe"] == (
        "saved in cardtune's MoE format (config.json: cardtune_moe; cardtune chat, merge and train --model_path "
        "load it), not natively: a Mixtral has experts in every layer (--moe_layers dense); this model has them "
        "in layers 0")
    config = json.loads((out / "config.json").read_text())
    assert config["cardtune_moe"]["layers"] == [0] and config["cardtune_moe"]["num_experts"] == [4]
    batch = first_batch(stage3)
    reloaded = load_trained(out)
    torch.testing.assert_close(logits(reloaded.model, batch), logits(stage3.trainer.model, batch), rtol=0, atol=1e-5)
    checkpoint = json.loads((out / "checkpoint-20" / "config.json").read_text()) if (out / "checkpoint-20").is_dir() \
        else config
    assert "cardtune_moe" in checkpoint


def test_a_later_stage_continues_the_saved_mixtures(stage3: Any, llava_data: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    saved = Path(stage3.summary["output_dir"])
    capsys.readouterr()
    later = llava_run(saved, llava_data, tmp_path / "later", "--max_steps", "1", "--learning_rate", "0")
    assert "note: moe: " + str(saved) + " holds an upcycled model: 1 of 2 layers (0) x 4 experts" in capsys.readouterr().out
    before, after = _moe_state(saved), _moe_state(tmp_path / "later")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(h.get("aux_loss") for h in later.trainer.state.log_history)
    from cardtune.train import main

    assert main(["--config", STAGE3, "--model_id", "llava-1.5-7b", "--model_path", str(saved), "--data_path",
                 str(llava_data[0]), "--image_folder", str(llava_data[1]), "--moe_num_experts", "8",
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.endswith(
        "train: the model is already upcycled (1 of 2 layers (0) x 4 experts, top-2, dropless); these options "
        "describe another one: --moe_num_experts [8] (the model has [4])\n")


def _moe_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(folder / "model.safetensors").items() if ".experts." in k or ".router." in k}


def test_lora_on_experts_saves_an_adapter_that_merges_into_a_mixtral(llava_dir: Path, llava_data: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    from cardtune.cli import main as cli
    from cardtune.training.output import load_trained

    out = tmp_path / "lora"
    result = llava_run(llava_dir, llava_data, out, "--moe_layers", "dense", "--moe_train", "lora", "--max_steps", "6",
                       "--learning_rate", "2e-2", "--lora_r", "4", "--lora_dropout", "0")
    model = result.trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable)
    assert all((".experts." in n and "lora_" in n) or (".router.modules_to_save." in n) for n in trainable), trainable
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["modules_to_save"]) == ["model.language_model.layers.0.mlp.router",
                                                  "model.language_model.layers.1.mlp.router"]
    assert json.loads((out / "cardtune_moe.json").read_text())["layers"] == [0, 1]
    assert result.summary["moe"].startswith("saved as a LoRA adapter over the dense base, with cardtune_moe.json")
    batch = first_batch(result)
    trained = logits(model, batch)
    torch.testing.assert_close(logits(load_trained(out).model, batch), trained, rtol=1e-4, atol=1e-4)
    merged = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    assert not (merged / "adapter_config.json").exists() and not (merged / "cardtune_moe.json").exists()
    native = transformers.LlavaForConditionalGeneration.from_pretrained(merged)
    assert native.config.text_config.model_type == "mixtral"
    torch.testing.assert_close(logits(native, batch), trained, rtol=1e-4, atol=1e-4)


def test_lora_on_attention_and_experts_then_merge_in_cardtune_format(tmp_path: Path) -> None:
    from cardtune.cli import main as cli
    from cardtune.training.output import load_trained

    model_dir = tiny_model("qwen2.5-7b-instruct", tmp_path / "qwen")
    out = tmp_path / "out"
    result = train(["--model_id", "qwen2.5-7b-instruct", "--model_path", str(model_dir), "--data_path",
                    str(text_dataset(tmp_path)), "--output_dir", str(out), "--moe_layers", "1", "--moe_train", "all",
                    "--use_lora", "--moe_use_residual", "--max_steps", "3", "--per_device_train_batch_size", "2",
                    "--learning_rate", "1e-2", "--lora_dropout", "0"])
    wrapped = {n.rsplit(".", 1)[0] for n, p in result.trainer.model.named_parameters() if "lora_A" in n}
    assert any(".self_attn." in n for n in wrapped) and any(".mlp.experts." in n for n in wrapped)
    assert not any(".router" in n or ".coefficient" in n for n in wrapped)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.1.mlp.router" in adapter["modules_to_save"]
    assert "model.layers.1.mlp.coefficient" in adapter["modules_to_save"]
    batch = first_batch(result)
    trained = logits(result.trainer.model, batch)
    merged = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["cardtune_moe"]["use_residual"] is True
    torch.testing.assert_close(logits(load_trained(merged).model, batch), trained, rtol=1e-4, atol=1e-4)


def test_full_qwen2_moe_tuning_saves_a_qwen2_moe_that_plain_transformers_loads(tmp_path: Path) -> None:
    import yaml

    model_dir = tiny_model("qwen2.5-7b-instruct", tmp_path / "qwen", )
    out = tmp_path / "out"
    result = train(["--model_id", "qwen2.5-7b-instruct", "--model_path", str(model_dir), "--data_path",
                    str(text_dataset(tmp_path)), "--output_dir", str(out), "--moe_layers", "sparse",
                    "--moe_train", "all", "--moe_num_experts", "3", "--max_steps", "3",
                    "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"])
    assert all(p.requires_grad for p in result.trainer.model.parameters())
    assert result.summary["moe"] == "saved as Qwen2-MoE: loads with plain transformers (Qwen2MoeForCausalLM.from_pretrained)"
    native = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(native).__name__ == "Qwen2MoeForCausalLM" and native.config.mlp_only_layers == [1]
    batch = first_batch(result)
    torch.testing.assert_close(logits(native, batch), logits(result.trainer.model, batch), rtol=0, atol=1e-5)
    card = yaml.safe_load((out / "cardtune_card.yaml").read_text())
    assert card["model_class"] == "Qwen2MoeForCausalLM"
    from cardtune.training.output import load_trained

    assert type(load_trained(out).model).__name__ == "Qwen2MoeForCausalLM"  # what chat and merge load


DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--use_lora", "false", "--moe_layers", "dense"]


def test_resume_continues_an_moe_run(tmp_path: Path) -> None:
    """The resumed run upcycles its base again and loads the checkpoint's experts and routers:
    steps 3-4 give the uninterrupted run's loss and aux loss. (A text model: transformers 5.24's
    Trainer resumes a full LLaVA from a checkpoint without its key renames, dense or not.)"""
    from cardtune.train import run

    model_dir = tiny_model("qwen2.5-7b-instruct", tmp_path / "qwen")
    argv = ["--model_id", "qwen2.5-7b-instruct", "--model_path", str(model_dir), "--data_path",
            str(text_dataset(tmp_path, n=16)), "--moe_layers", "sparse", "--max_steps", "4", "--save_strategy", "steps",
            "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--logging_steps",
            "1", "--disable_tqdm", "true", "--report_to", "none"]

    def losses(result: Any) -> dict[int, tuple[float, float]]:
        return {h["step"]: (h["loss"], h["aux_loss"]) for h in result.trainer.state.log_history if "loss" in h}

    whole = run([*argv, "--output_dir", str(tmp_path / "whole")])
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = run([*argv, "--output_dir", str(resumed_dir), "--resume_from_checkpoint", "auto"])
    reference, continued = losses(whole), losses(resumed)
    assert sorted(continued) == [1, 2, 3, 4]
    for step in (3, 4):
        assert continued[step] == pytest.approx(reference[step], rel=1e-4, abs=1e-4), (step, continued, reference)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_two_process_gloo_moe_run(tmp_path: Path) -> None:
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset, ensure_demo_model

    data = ensure_demo_dataset()
    ensure_demo_model()  # built once here, not by both ranks at once
    out = tmp_path / "out"
    cmd = ["accelerate", "launch", "--main_process_port", "0", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"),
           str(REPO / "train.py"), *DEMO, "--data_path", str(data / TRAIN_FILE), "--image_folder",
           str(data / IMAGE_DIR), "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no",
           "--activation_checkpointing", "true"]
    if torch.cuda.is_available():  # this test is the CPU (gloo) path
        cmd += ["--use_cpu", "true"]
    env = launch_env()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "moe: saved as Mixtral (the text_config of LlavaForConditionalGeneration)" in done.stdout
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and all(h["aux_loss"] > 0 for h in steps)
    assert all(sum(h[f"moe_load/layer_{layer}/expert_{e}"] for e in range(4)) == pytest.approx(1.0, abs=1e-3)
               for h in steps for layer in (0, 1))
    native = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert native.config.text_config.model_type == "mixtral"


@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_zero_moe_run(stage: int, tmp_path: Path) -> None:
    """The shipped ZeRO-2/3 configs (2 processes here) train an upcycled model: every expert runs on
    every forward, so the ranks gather the same modules in the same order."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed; it runs on CPU)")
    from cardtune.demo import ensure_demo_dataset, ensure_demo_model
    from cardtune.training.moe import moe_blocks
    from cardtune.training.output import load_trained

    ensure_demo_dataset()
    ensure_demo_model()  # built once here, not by both ranks at once
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--config_file",
           f"configs/accelerate/deepspeed_zero{stage}.yaml", "--num_processes", "2", "train.py", *DEMO,
           "--moe_layers", "sparse", "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if h.get("aux_loss", 0) > 0] == [1, 2, 3]
    assert [name for name, _ in moe_blocks(load_trained(out).model)] == ["model.language_model.layers.0.mlp"]
