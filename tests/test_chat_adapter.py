"""``cardtune chat`` on a LoRA adapter folder sees images exactly as on its merged folder, for a
family whose processor cannot be built here (Qwen2.5-VL without torchvision: the collator
expands ``<|image_pad|>``); and chat never generates from an unexpanded placeholder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_train import image_dataset, tiny_model, train


@pytest.fixture(scope="module")
def qwen_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(adapter folder, its merged folder, an image)."""
    from cardtune.cli import main as cli

    tmp = tmp_path_factory.mktemp("qwen-chat")
    model_dir = tiny_model("qwen2.5-vl-3b-instruct", tmp / "qwen")
    data, images = image_dataset(tmp, n=2, size=56)
    out = tmp / "adapter"
    train(["--model_id", "qwen2.5-vl-3b-instruct", "--model_path", str(model_dir), "--data_path", str(data),
           "--image_folder", str(images), "--output_dir", str(out), "--use_lora", "--max_steps", "1",
           "--per_device_train_batch_size", "2"])
    merged = tmp / "merged"
    assert cli(["merge", "--adapter", str(out), "--output", str(merged)]) == 0
    return out, merged, images / "0.png"


def _asked(folder: Path, image: Path) -> tuple[dict[str, Any], str]:
    """What ``generate`` receives for one question with one image, and the answer."""
    from cardtune.commands.chat import ChatSession

    session = ChatSession(str(folder), max_new_tokens=4)
    seen: dict[str, Any] = {}
    generate = session.model.generate

    def recording(**inputs: Any) -> Any:
        seen.update(inputs)
        return generate(**inputs)

    session.model.generate = recording
    answer = session.ask("What colour is this?", [str(image)])
    return seen, answer


def test_adapter_chat_expands_the_image_like_the_merged_folder(qwen_adapter: tuple[Path, Path, Path]) -> None:
    adapter, merged, image = qwen_adapter
    from_adapter, answer = _asked(adapter, image)
    from_merged, merged_answer = _asked(merged, image)
    pad = 151655  # <|image_pad|>
    ids = from_adapter["input_ids"][0].tolist()
    # 56x56 -> a 4x4 grid of 14px patches, merged 2x2: 4 image tokens, and the pixels with them
    assert ids.count(pad) == 4 and from_adapter["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert tuple(from_adapter["pixel_values"].shape) == (16, 1176)
    assert ids == from_merged["input_ids"][0].tolist()
    assert from_adapter["pixel_values"].equal(from_merged["pixel_values"])
    assert answer == merged_answer


def test_chat_refuses_to_generate_from_an_unexpanded_image(qwen_adapter: tuple[Path, Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A processing that leaves the image unexpanded (before: the adapter folder alone gave the
    bare tokenizer, which drops the image without a word): chat stops, never generates."""
    from cardtune.cli import main as cli
    from cardtune.collators.media import DefaultCollator

    adapter, _, image = qwen_adapter

    def no_pixels(self: Any, text: str, sample: Any, images: list, videos: list, sanitize: bool = False) -> Any:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"], {}

    monkeypatch.setattr(DefaultCollator, "_tokenize_media", no_pixels)
    generated = []
    import transformers

    monkeypatch.setattr(transformers.GenerationMixin, "generate", lambda *a, **k: generated.append(1))
    capsys.readouterr()
    code = cli(["chat", "--model", str(adapter), "--image", str(image), "--prompt", "What colour is this?"])
    err = capsys.readouterr().err
    assert code == 1 and not generated
    assert f"cardtune chat: {adapter}: the image(s) were not turned into pixel values, so the model would not see them (" in err, err
