"""The run's data and what it leaves behind: validation before step 1 (policy error / skip),
packing that changes no logits, eval loss, added tokens, and chatting with the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from test_train import logits, text_dataset, tiny_model, train

DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no"]


def _dirty_data(folder: Path) -> tuple[Path, Path]:
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True)
    records = []
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        records.append({"id": f"good-{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": f"It is {colour}."}]})
    records.append({"id": "bad-missing", "image": "nope.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "It is red."}]})
    records.append({"id": "bad-empty", "conversations": [
        {"from": "human", "value": "Hello!"}, {"from": "gpt", "value": ""}]})
    path = folder / "dirty.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path, images


def test_policy_error_stops_before_step_1_with_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.train import main

    data, images = _dirty_data(tmp_path)
    out = tmp_path / "out"
    code = main([*DEMO, "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "bad-missing" in err and "missing_media" in err and "bad-empty" in err and "empty_answer" in err
    assert "--bad_sample_policy skip" in err
    assert not (out / "adapter_model.safetensors").exists() and not list(out.glob("checkpoint-*"))


def test_policy_skip_drops_exactly_the_reported_samples(tmp_path: Path) -> None:
    data, images = _dirty_data(tmp_path)
    out = tmp_path / "out"
    result = train([*DEMO, "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out),
                    "--bad_sample_policy", "skip", "--max_skipped_share", "0.5", "--max_steps", "2",
                    "--per_device_train_batch_size", "2"])
    skipped = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert sorted(s["id"] for s in skipped) == ["bad-empty", "bad-missing"]
    kept = result.trainer.train_dataset
    assert sorted(kept[i].sample_id for i in range(len(kept))) == [f"good-{i}" for i in range(4)]


def test_packed_rows_give_the_logits_of_unpacked_samples() -> None:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.datasets import pack
    from cardtune.train import demo_data, resolve
    from cardtune.training.arguments import parse_arguments
    from cardtune.training.data import PackedCollator, conversation_dataset, prepare_split

    args = parse_arguments(["--model_id", "tiny-llava-demo"])
    resolved, _ = resolve(args)
    demo_data(args, resolved.card)
    loader = resolved.loader()
    encoder = ChatEncoder(resolved.card, loader.load_processing())
    split = prepare_split("train", args.data.data_path, encoder, resolved.card, image_folder=args.data.image_folder,
                          video_folder=None, policy="error", output_dir=None, seed=0, log=lambda _: None)
    dataset = conversation_dataset(split, resolved.card, encoder, args.data.image_folder, None)
    items = [dataset[i] for i in range(4)]
    assert any(item.media_tensors for item in items) and any(not item.media_tensors for item in items)
    model = loader.load_model(attn_implementation="sdpa")
    (row,) = pack(items, 1024)
    packed = logits(model, PackedCollator(encoder.handler, "sdpa")([row]))[0]
    by_id = {item.sample_id: item for item in items}
    start = 0
    for sample_id, n in zip(row.sample_ids, row.seq_lens, strict=True):
        alone = logits(model, encoder.handler([by_id[sample_id]]))[0]
        torch.testing.assert_close(packed[start : start + n], alone, rtol=1e-4, atol=1e-4)
        start += n


def test_demo_defaults_eval_loss_and_chat(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main as cli
    from cardtune.demo import IMAGE_DIR, ensure_demo_dataset

    out = tmp_path / "demo"
    result = train(["--model_id", "tiny-llava-demo", "--output_dir", str(out), "--max_steps", "30",
                    "--eval_steps", "15"])
    history = result.trainer.state.log_history
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert len(evals) == 2 and evals[1] < evals[0]  # the demo's eval split, evaluated every 15 steps
    assert result.summary["metrics"]["eval_loss"] == evals[-1]
    capsys.readouterr()
    image = sorted((ensure_demo_dataset() / IMAGE_DIR).iterdir())[0]
    assert cli(["chat", "--model", str(out), "--image", str(image), "--prompt", "What shape is in the image?",
                "--max_new_tokens", "8"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "<|im_end|>" not in answer


def test_added_tokens_resize_embeddings_and_train_with_lora(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.training.output import load_trained

    model_dir = tiny_model("llama-2-7b-chat", tmp_path / "llama")
    cards = tmp_path / "cards"
    cards.mkdir()
    card = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/models/llama-2-chat.yaml").read_text())
    card["family"] = "llama-2-chat-newpad"
    card["chat"] = {"special_tokens": {"pad": "<|pad|>"}}
    card["models"] = [{"model_id": "llama-newpad", "hf_path": str(model_dir)}]
    (cards / "newpad.yaml").write_text(yaml.safe_dump(card))
    data = text_dataset(tmp_path)
    out = tmp_path / "out"
    result = train(["--model_id", "llama-newpad", "--cards", str(cards), "--data_path", str(data), "--output_dir",
                    str(out), "--use_lora", "--max_steps", "2", "--per_device_train_batch_size", "2"])
    said = capsys.readouterr().out
    assert "resized token embeddings 32000 -> 32001" in said and "'<|pad|>'" in said
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [32000]} or config["trainable_token_indices"] == [32000]
    batch = result.trainer.data_collator([result.trainer.train_dataset[0]])
    reloaded = load_trained(out)
    torch.testing.assert_close(logits(reloaded.model, batch), logits(result.trainer.model, batch), rtol=1e-4, atol=1e-4)


def test_template_plain_trains_captions_and_eos_only(tmp_path: Path) -> None:
    """Projector pretraining (`--template plain`): each row is bos, image tokens, the caption and
    eos; exactly the caption and eos are trained. The folder keeps the family's chat template
    (plain applies to this run only), so a next stage can train conversations on it."""
    out = tmp_path / "plain"
    result = train([*DEMO, "--template", "plain", "--max_steps", "2", "--output_dir", str(out)])
    data = result.trainer.train_dataset
    tok = result.trainer.processing_class.tokenizer if hasattr(result.trainer.processing_class, "tokenizer") \
        else result.trainer.processing_class
    image_id = tok.convert_tokens_to_ids("<image>")
    for i in range(min(len(data), 8)):
        e = data[i]
        trained = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != -100]
        first_text = next(k for k, t in enumerate(e.input_ids) if t not in (image_id, tok.bos_token_id))
        assert all(t in (image_id, tok.bos_token_id) for t in e.input_ids[:first_text])
        assert e.labels[first_text:] == e.input_ids[first_text:]  # caption + eos, all of it
        # every answer ends with its eos, trained (the demo has two-turn samples)
        assert trained[-1] == tok.eos_token_id and trained.count(tok.eos_token_id) == e.input_ids.count(tok.eos_token_id)
    from cardtune.demo.build import CHAT_TEMPLATE

    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    saved = yaml.safe_load((out / "cardtune_card.yaml").read_text())
    assert "template" not in saved.get("chat", {})  # the family's own (the default), not plain
    assert json.loads((out / "cardtune_args.json").read_text())["template"] == "plain"
