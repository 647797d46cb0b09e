"""The embedded demo: model folder, tokenizer, template, processor and dataset, built offline."""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from pathlib import Path

import pytest

from cardtune.demo import (
    CHAT_TEMPLATE,
    EVAL_FILE,
    IMAGE_DIR,
    IMAGE_TOKEN,
    IMAGE_TOKENS_PER_IMAGE,
    METADATA_FILE,
    PREFS_EVAL_FILE,
    PREFS_TRAIN_FILE,
    TRAIN_FILE,
    ensure_demo_dataset,
    ensure_demo_model,
)
from cardtune.demo import build as demo_build
from cardtune.demo import data as demo_data


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cardtune-cache")


@pytest.fixture(scope="module")
def model_dir(cache: Path) -> Path:
    return ensure_demo_model(cache)


@pytest.fixture(scope="module")
def data_dir(cache: Path) -> Path:
    return ensure_demo_dataset(cache)


@pytest.fixture(scope="module")
def processor(model_dir: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir: Path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(model_dir).eval()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _image(colour: str = "red"):
    from PIL import Image

    return Image.new("RGB", (64, 64), demo_data.COLOURS[colour])


# -- the model folder --------------------------------------------------------------------------
def test_folder_is_a_plain_hf_model(model_dir: Path, cache: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, LlavaProcessor

    assert model_dir.parent == cache and model_dir.name.startswith("tiny-llava-demo-v")
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in model_dir.iterdir()
    }
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
    )
    assert (
        len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id})
        == 4
    )
    assert model.config.text_config.vocab_size == len(tokenizer)
    processor = AutoProcessor.from_pretrained(model_dir)
    assert isinstance(processor, LlavaProcessor)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    end_of_turn = tokenizer.convert_tokens_to_ids(demo_build.END_OF_TURN)
    assert end_of_turn in model.generation_config.eos_token_id


def test_loader_resolves_to_the_built_folder(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.loaders import LOADERS
    from cardtune.registry import get_registry

    monkeypatch.setenv("CARDTUNE_CACHE", str(cache))
    spec = get_registry().get("tiny-llava-demo")
    assert spec.family.loader == "demo"
    loader = LOADERS["demo"](spec.family, spec.hf_path, spec.revision)
    assert Path(loader.path) == ensure_demo_model(cache)
    processing = loader.load_processing()
    assert processing.processor is not None and processing.tokenizer.padding_side == "right"


def test_processor_expands_image_to_model_features(processor, model) -> None:
    import torch

    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == model.config.image_token_index
    single = processor(
        text=f"{IMAGE_TOKEN}\nWhat shape is in the image?", images=[_image()], return_tensors="pt"
    )
    assert int((single["input_ids"] == image_id).sum()) == IMAGE_TOKENS_PER_IMAGE == 16
    with torch.no_grad():
        features = model.get_image_features(pixel_values=single["pixel_values"])
    features = features.pooler_output if hasattr(features, "pooler_output") else features
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    assert features.reshape(-1, model.config.text_config.hidden_size).shape[0] == IMAGE_TOKENS_PER_IMAGE

    conversations = [
        [
            {"role": "user", "content": "<image>\nWhat shape is in the image?"},
            {"role": "assistant", "content": "A red circle."},
        ],
        [
            {"role": "user", "content": "<image>\n<image>\nDo the two images show the same shape?"},
            {"role": "assistant", "content": "Yes, both show a circle."},
        ],
    ]
    texts = [processor.apply_chat_template(c, tokenize=False) for c in conversations]
    batch = processor(
        text=texts, images=[_image("red"), _image("blue"), _image("green")], padding=True, return_tensors="pt"
    )
    assert (batch["input_ids"] == image_id).sum(dim=1).tolist() == [16, 32]
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    assert math.isfinite(loss.item())


# -- tokenizer and template --------------------------------------------------------------------
def test_tokenizer_round_trips_the_demo_texts(processor, data_dir: Path) -> None:
    tokenizer = processor.tokenizer
    texts = list(demo_data.corpus())
    for file in (TRAIN_FILE, EVAL_FILE):
        texts += [t["value"] for s in json.loads((data_dir / file).read_text()) for t in s["conversations"]]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    # No bos is added on encode, so a rendered conversation never starts with a doubled one.
    assert tokenizer("A red circle.")["input_ids"] == tokenizer.encode(
        "A red circle.", add_special_tokens=False
    )
    for token in demo_build.SPECIAL_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    # Whole words, not bytes: the BPE was trained on the demo's texts.
    assert len(tokenizer.encode(" circle", add_special_tokens=False)) == 1


def test_chat_template_renders_two_turns(processor) -> None:
    expected = (
        "<|im_start|>user\n<image>\nWhich shape is it?<|im_end|>\n"
        "<|im_start|>assistant\nA circle.<|im_end|>\n"
        "<|im_start|>user\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nIt is red.<|im_end|>\n"
    )
    as_strings = [
        {"role": "user", "content": "<image>\nWhich shape is it?"},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "What colour is it?"},
        {"role": "assistant", "content": "It is red."},
    ]
    as_parts = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": "It is red."},
    ]
    for renderer in (processor, processor.tokenizer):
        assert renderer.chat_template == CHAT_TEMPLATE
        assert renderer.apply_chat_template(as_strings, tokenize=False) == expected
        assert renderer.apply_chat_template(as_parts, tokenize=False) == expected
    prompt = processor.apply_chat_template(as_strings[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}, *as_strings[:2]]
    assert processor.apply_chat_template(system, tokenize=False).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )


# -- the dataset -------------------------------------------------------------------------------
COLOUR_WORDS = re.compile(r"\b(red|green|blue|yellow)\b")
SHAPE_WORDS = re.compile(r"\b(circle|square|triangle)\b")


def test_dataset_matches_its_pictures(data_dir: Path) -> None:
    from PIL import Image

    metadata = json.loads((data_dir / METADATA_FILE).read_text())
    counts = {"train": 320, "eval": 48}
    seen_images: set[str] = set()
    for split, file in (("train", TRAIN_FILE), ("eval", EVAL_FILE)):
        samples = json.loads((data_dir / file).read_text())
        assert len(samples) == counts[split]
        assert len({s["id"] for s in samples}) == len(samples)
        kinds = {"text": 0, "one": 0, "two_turn": 0, "two_image": 0}
        for sample in samples:
            images = sample.get("image", [])
            images = [images] if isinstance(images, str) else images
            turns = sample["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].count("<image>") == len(images)
            assert not any("<image>" in t["value"] for t in turns[1:])
            kinds[
                "text"
                if not images
                else "two_image"
                if len(images) == 2
                else "two_turn"
                if len(turns) == 4
                else "one"
            ] += 1
            drawn = [metadata[name] for name in images]
            for name, meta in zip(images, drawn, strict=True):
                seen_images.add(name)
                with Image.open(data_dir / IMAGE_DIR / name) as image:
                    assert image.size == (demo_data.CANVAS, demo_data.CANVAS)
                    assert (
                        image.convert("RGB").getpixel(tuple(meta["center"]))
                        == demo_data.COLOURS[meta["colour"]]
                    )
                    assert image.convert("RGB").getpixel((0, 0)) == demo_data.BACKGROUND
            if not images:
                continue
            for answer in (t["value"] for t in turns if t["from"] == "gpt"):
                assert set(COLOUR_WORDS.findall(answer)) <= {m["colour"] for m in drawn}, (
                    sample["id"],
                    answer,
                )
                assert set(SHAPE_WORDS.findall(answer)) <= {m["shape"] for m in drawn}, (sample["id"], answer)
            if len(images) == 1 and len(turns) == 4:
                assert turns[3]["value"] == f"It is {drawn[0]['colour']}."
        assert all(kinds.values()), kinds
    conversations = {name for name in metadata if not name.startswith("prefs_")}
    assert seen_images == conversations and conversations <= {p.name for p in (data_dir / IMAGE_DIR).iterdir()}


def test_preference_pairs_name_the_right_colour_and_a_wrong_one(data_dir: Path) -> None:
    """The preference split (--method dpo): each pair on a picture of its own, the chosen answer
    the right colour, the rejected one the same words with another colour; LLaVA's form for
    training, TRL's for eval; every image of the folder belongs to one split or the other."""
    metadata = json.loads((data_dir / METADATA_FILE).read_text())
    seen: set[str] = set()
    for file, count in ((PREFS_TRAIN_FILE, 256), (PREFS_EVAL_FILE, 48)):
        pairs = json.loads((data_dir / file).read_text())
        assert len(pairs) == count and len({p["id"] for p in pairs}) == count
        for pair in pairs:
            image = pair["image"] if "conversations" in pair else pair["images"][0]
            chosen, rejected = pair["chosen"], pair["rejected"]
            if "prompt" in pair:  # TRL's form
                chosen, rejected = chosen[0]["content"], rejected[0]["content"]
            colour = metadata[image]["colour"]
            assert COLOUR_WORDS.findall(chosen) == [colour]
            (wrong,) = COLOUR_WORDS.findall(rejected)
            assert wrong != colour and rejected == chosen.replace(colour, wrong)
            assert image not in seen
            seen.add(image)
    conversations = {name for name in metadata if not name.startswith("prefs_")}
    assert seen | conversations == set(metadata) == {p.name for p in (data_dir / IMAGE_DIR).iterdir()}


# -- caching and determinism -------------------------------------------------------------------
def test_second_call_reuses_the_cache(cache: Path, model_dir: Path, data_dir: Path) -> None:
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert ensure_demo_model(cache) == model_dir
    assert ensure_demo_dataset(cache) == data_dir
    assert time.perf_counter() - started < 0.5
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_build_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    again.mkdir()
    demo_build.write_demo_model(again)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert _sha256(again / name) == _sha256(model_dir / name), name
    other_seed = tmp_path / "other-seed"
    other_seed.mkdir()
    demo_build.write_demo_model(other_seed, demo_build.DemoModelSpec(seed=1))
    assert _sha256(other_seed / "model.safetensors") != _sha256(model_dir / "model.safetensors")


def test_a_build_that_wrote_no_weights_is_never_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an FSDP launch transformers' save_pretrained writes no config or weights on ranks
    other than 0: a folder built that way is an error, not a cached demo model."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", lambda self, folder, **kwargs: None)
    with pytest.raises(RuntimeError, match="building the demo model wrote no config.json or weights into"):
        ensure_demo_model(tmp_path)
    assert list(tmp_path.iterdir()) == []
