"""Training end to end on tiny models built from the real ``config.json`` files in the fixtures,
shrunk to 1-2 layers with random weights, next to the real tokenizer/processor files (copied
into tmp_path at test time).

Checked: LoRA and full finetuning lower the loss on a tiny overfit set; frozen parameters stay
bit-identical and trainable ones change; save -> load gives the same logits; merge gives the
adapter model's logits; projector-only trains only the projector; the output folder holds the
card, the arguments and the loss plot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import require_fixture

# -- tiny models --------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _shrink_text(cfg: Any, hidden: int = 32, heads: int = 2, kv_heads: int = 1, layers: int = 2) -> None:
    cfg.hidden_size = hidden
    cfg.intermediate_size = hidden * 2
    cfg.num_hidden_layers = layers
    cfg.num_attention_heads = heads
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = kv_heads
    cfg.head_dim = hidden // heads
    # Wider than the real 0.02: with 32-wide hidden states and a frozen random lm_head, logits
    # from 0.02-scale weights stay near zero, and adapters alone could barely move the loss.
    cfg.initializer_range = 0.2
    if hasattr(cfg, "max_window_layers"):
        cfg.max_window_layers = layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "mrope_section" in rope:
        half = cfg.head_dim // 2  # the sections split the rotary half of a head
        rope["mrope_section"] = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]


def tiny_model(fixture: str, dest: Path, *, seed: int = 0) -> Path:
    """``dest``: the fixture's real tokenizer/processor files plus a shrunk random model."""
    import transformers
    from transformers import AutoConfig

    source = require_fixture(fixture)
    config = AutoConfig.from_pretrained(source)
    text = getattr(config, "text_config", None) or config
    _shrink_text(text)
    vision = getattr(config, "vision_config", None)
    if vision is not None:
        if config.model_type.startswith("qwen2"):
            vision.depth = 1
            vision.hidden_size = 32
            vision.intermediate_size = 64
            vision.num_heads = 2
            vision.out_hidden_size = text.hidden_size
            vision.fullatt_block_indexes = [0]
        else:  # CLIP-like towers
            vision.hidden_size = 32
            vision.intermediate_size = 64
            vision.num_hidden_layers = 2
            vision.num_attention_heads = 2
            vision.projection_dim = 32
    cls = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = cls(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    for item in source.iterdir():
        if item.is_file() and item.name not in ("config.json", *_WEIGHT_FILES) and not (dest / item.name).exists():
            shutil.copy2(item, dest / item.name)
    return dest


# -- tiny data ----------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}


def image_dataset(folder: Path, n: int = 4, size: int = 56) -> tuple[Path, Path]:
    """LLaVA JSON: one solid-colour image and one question per sample; (json, image folder)."""
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        Image.new("RGB", (size, size), rgb).save(images / f"{i}.png")
        records.append({
            "id": f"img-{i}",
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is this?"},
                {"from": "gpt", "value": f"It is {name}."},
            ],
        })
    path = folder / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, images


def text_dataset(folder: Path, n: int = 4) -> Path:
    records = [
        {"id": f"txt-{i}", "conversations": [
            {"from": "human", "value": f"Say the word number {i}."},
            {"from": "gpt", "value": ["Alpha", "Bravo", "Charlie", "Delta"][i % 4] + " it is."},
        ]}
        for i in range(n)
    ]
    path = folder / "text.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def train(argv: list[str]) -> Any:
    from cardtune.train import run

    return run([*argv, "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
                "--logging_steps", "1", "--cpu_threads", "1"])


def logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def first_batch(result: Any) -> dict[str, Any]:
    trainer = result.trainer
    items = [trainer.train_dataset[i] for i in range(min(2, len(trainer.train_dataset)))]
    return trainer.data_collator(items)


def lora_wrapped(model: Any) -> list[str]:
    """Names of the modules that carry LoRA adapters (peft may shorten the names it saves)."""
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)]


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llava-1.5-7b", tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def llava_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return image_dataset(tmp_path_factory.mktemp("llava-data"))


@pytest.fixture(scope="module")
def llava_lora(llava_dir: Path, llava_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A LoRA run on tiny llava-1.5, with the weights before training."""
    from cardtune.loaders.resolve import resolve_model

    data, images = llava_data
    out = tmp_path_factory.mktemp("llava-lora") / "out"
    before = resolve_model("llava-1.5-7b", llava_dir).loader().load_model()
    initial = snapshot(before)
    result = train(["--model_id", "llava-1.5-7b", "--model_path", str(llava_dir), "--data_path", str(data),
                    "--image_folder", str(images), "--output_dir", str(out), "--use_lora",
                    "--max_steps", "8", "--per_device_train_batch_size", "4", "--learning_rate", "5e-2",
                    "--lora_r", "8", "--lora_dropout", "0", "--warmup_steps", "0"])
    return result, initial


def _losses(result: Any) -> list[float]:
    return [h["loss"] for h in result.trainer.state.log_history if "loss" in h]


def test_lora_loss_falls_and_only_adapters_and_projector_change(llava_lora: Any) -> None:
    result, initial = llava_lora
    losses = _losses(result)
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    model = result.trainer.model
    changed, frozen_checked = 0, 0
    for name, param in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            if param.requires_grad:
                key = name.replace(".modules_to_save.default", "")
                key = key.replace("base_model.model.", "", 1)
                if "lora_B" in name or key in initial:
                    changed += int(not torch.equal(param, initial.get(key, torch.zeros_like(param))))
            continue
        key = name.replace("base_model.model.", "", 1).replace(".base_layer", "").replace(".original_module", "")
        assert not param.requires_grad, name
        assert torch.equal(param, initial[key]), f"frozen {name} changed"
        frozen_checked += 1
    assert changed > 0 and frozen_checked > 10
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)  # projector trained in full by default
    assert not any("vision_tower" in n for n in trainable)
    assert not any("lm_head" in n and "lora" in n for n in trainable)


def test_lora_targets_are_llm_linears_never_lm_head_or_vision(llava_lora: Any) -> None:
    result, _ = llava_lora
    targets = lora_wrapped(result.trainer.model)
    assert targets and all(".language_model." in t for t in targets)
    assert not any("lm_head" in t or "vision_tower" in t or "projector" in t for t in targets)
    assert {t.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_output_folder_is_a_plain_hf_folder_with_card_args_and_plot(llava_lora: Any) -> None:
    result, _ = llava_lora
    out = Path(result.summary["output_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "cardtune_card.yaml", "cardtune_args.json",
                 "loss.png", "log_history.json", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    args = json.loads((out / "cardtune_args.json").read_text())
    assert args["model_id"] == "llava-1.5-7b" and args["use_lora"] is True and args["max_steps"] == 8
    from cardtune.training.output import read_card

    assert read_card(out).family == "llava-1.5"


def test_adapter_save_load_and_merge_give_the_same_logits(llava_lora: Any, tmp_path: Path) -> None:
    from transformers import LlavaForConditionalGeneration

    from cardtune.cli import main as cli
    from cardtune.training.output import load_trained

    result, _ = llava_lora
    out = Path(result.summary["output_dir"])
    batch = first_batch(result)
    trained = logits(result.trainer.model, batch)
    # transformers' own from_pretrained reads the adapter folder (peft integration)
    plain = LlavaForConditionalGeneration.from_pretrained(out)
    torch.testing.assert_close(logits(plain, batch), trained, rtol=1e-4, atol=1e-4)
    reloaded = load_trained(out)
    assert reloaded.adapter
    torch.testing.assert_close(logits(reloaded.model, batch), trained, rtol=1e-4, atol=1e-4)
    merged_dir = tmp_path / "merged"
    assert cli(["merge", "--adapter", str(out), "--output", str(merged_dir)]) == 0
    assert not (merged_dir / "adapter_config.json").exists()
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir)
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-3, atol=1e-3)


def test_full_finetune_text_model_loss_falls_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama-2-7b-chat", tmp_path / "llama")
    data = text_dataset(tmp_path)
    out = tmp_path / "out"
    result = train(["--model_id", "llama-2-7b-chat", "--model_path", str(model_dir), "--data_path", str(data),
                    "--output_dir", str(out), "--max_steps", "10", "--per_device_train_batch_size", "4",
                    "--learning_rate", "5e-3", "--warmup_steps", "0"])
    losses = _losses(result)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.7 * losses[0], losses
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    batch = first_batch(result)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, batch), logits(result.trainer.model, batch), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in result.trainer.model.parameters())


def test_projector_only_pretraining_changes_only_the_projector(llava_dir: Path, llava_data: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    from cardtune.loaders.resolve import resolve_model

    data, images = llava_data
    initial = snapshot(resolve_model("llava-1.5-7b", llava_dir).loader().load_model())
    result = train(["--model_id", "llava-1.5-7b", "--model_path", str(llava_dir), "--data_path", str(data),
                    "--image_folder", str(images), "--output_dir", str(tmp_path / "out"),
                    "--no_train_llm", "--train_vision_projector", "--max_steps", "3",
                    "--per_device_train_batch_size", "4", "--learning_rate", "1e-2"])
    for name, param in result.trainer.model.named_parameters():
        same = torch.equal(param, initial[name])
        if "multi_modal_projector" in name:
            assert param.requires_grad and not same, name
        else:
            assert not param.requires_grad and same, name


def test_qwen2_5_vl_lora_steps(tmp_path: Path) -> None:
    model_dir = tiny_model("qwen2.5-vl-3b-instruct", tmp_path / "qwen")
    data, images = image_dataset(tmp_path, n=4, size=56)
    result = train(["--model_id", "qwen2.5-vl-3b-instruct", "--model_path", str(model_dir), "--data_path", str(data),
                    "--image_folder", str(images), "--output_dir", str(tmp_path / "out"), "--use_lora",
                    "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"])
    losses = _losses(result)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert all(".language_model." in t for t in lora_wrapped(result.trainer.model))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.visual.merger"]


def test_vision_lora_targets_vision_and_llm_linears(llava_dir: Path, llava_data: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    data, images = llava_data
    result = train(["--model_id", "llava-1.5-7b", "--model_path", str(llava_dir), "--data_path", str(data),
                    "--image_folder", str(images), "--output_dir", str(tmp_path / "out"), "--use_lora",
                    "--train_vision_encoder", "--use_vision_lora", "--max_steps", "1",
                    "--per_device_train_batch_size", "2"])
    targets = lora_wrapped(result.trainer.model)
    assert any(".vision_tower." in t for t in targets) and any(".language_model." in t for t in targets)
    assert not any("projector" in t or "lm_head" in t for t in targets)
    trainable = [n for n, p in result.trainer.model.named_parameters() if p.requires_grad]
    assert any("vision_tower" in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n and "lora_" not in n for n in trainable)
