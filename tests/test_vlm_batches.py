"""Every vision-language family's batches reach its model as the model wants them.

A batch mixes an image sample, a text-only sample and a two-turn image sample of another size.
For each family that loads here, a tiny model built from the fixture's real config must give,
for every row of the batch, the logits it gives that sample alone (compared as the last hidden
states its head projects, which decide them): the collator pads per-token
tensors (Qwen2-VL's ``mm_token_type_ids``, Mllama's ``cross_attention_mask``) to the batch,
gives per-sample tensors (Mllama's ``pixel_values``) one row per sample, and concatenates
per-image ones (llava, anyres patches), text-only rows included. The loss is finite and no
image token is trained.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import require_fixture
from test_train import _shrink_text

IGNORE = -100

# fixture folder -> registered model id
FAMILIES = {
    "llava-1.5-7b": "llava-1.5-7b",
    "qwen2-vl-2b-instruct": "qwen2-vl-2b-instruct",
    "qwen2.5-vl-3b-instruct": "qwen2.5-vl-3b-instruct",
    "llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision-0.5b-ov",
    "llava-v1.6-mistral-7b-hf": "llava-1.6-mistral-7b",
    "llava-next-video-7b": "llava-next-video-7b",
    "llama-3.2-11b-vision-instruct": "llama-3.2-11b-vision-instruct",
    # bidirectional attention inside each image (token_type_ids); a placeholder the processor expands
    "gemma-3-4b-it": "gemma-3-4b-it",
    # DeepStack: vision features added into early language-model layers
    "qwen3-vl-4b-instruct": "qwen3-vl-4b-instruct",
}


def _shrink_vision(config: Any) -> None:
    vision = config.vision_config
    if config.model_type.startswith("qwen2"):
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 1, 32, 64, 2
        vision.out_hidden_size = config.text_config.hidden_size
        vision.fullatt_block_indexes = [0]
    elif config.model_type == "qwen3_vl":
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 32, 64, 2
        vision.out_hidden_size = config.text_config.hidden_size
        vision.deepstack_visual_indexes = [0]
    elif config.model_type == "mllama":
        vision.hidden_size, vision.intermediate_size, vision.attention_heads = 32, 64, 2
        vision.num_hidden_layers, vision.num_global_layers = 2, 1
        vision.intermediate_layers_indices = [0, 1]
        vision.vision_output_dim = vision.hidden_size * (len(vision.intermediate_layers_indices) + 1)
        config.text_config.cross_attention_layers = [1]
    else:  # CLIP / SigLIP towers
        vision.hidden_size, vision.intermediate_size = 32, 64
        vision.num_hidden_layers, vision.num_attention_heads = 2, 2
        vision.projection_dim = 32


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache: dict[str, tuple[Any, Any]] = {}

    def get(folder: str) -> tuple[Any, Any]:
        if folder not in cache:
            import transformers
            from transformers import AutoConfig

            from cardtune.collators.engine import ChatEncoder
            from cardtune.loaders.resolve import load_processing, resolve_model

            resolved = resolve_model(FAMILIES[folder], require_fixture(folder))
            config = AutoConfig.from_pretrained(require_fixture(folder))
            _shrink_text(config.text_config, layers=2)
            _shrink_vision(config)
            torch.manual_seed(0)
            model = getattr(transformers, resolved.card.model_class)(config).float().eval()
            cache[folder] = (ChatEncoder(resolved.card, load_processing(resolved)), model)
        return cache[folder]

    return get


def _samples() -> list[tuple[Any, Any]]:
    from PIL import Image

    from cardtune.conversation import Media, Sample

    def t(text: str) -> dict[str, str]:
        return {"type": "text", "text": text}

    red = Image.new("RGB", (56, 56), (220, 20, 20))
    blue = Image.new("RGB", (84, 112), (20, 40, 220))
    return [
        (Sample("image", [{"role": "user", "content": [{"type": "image"}, t("What colour?")]},
                          {"role": "assistant", "content": [t("Red.")]}], images=["red"]), Media(images=[red])),
        (Sample("text", [{"role": "user", "content": [t("A question without an image?")]},
                         {"role": "assistant", "content": [t("An answer.")]}]), None),
        (Sample("two-turns", [{"role": "user", "content": [{"type": "image"}, t("And this one?")]},
                              {"role": "assistant", "content": [t("Blue, and taller than wide.")]},
                              {"role": "user", "content": [t("Sure?")]},
                              {"role": "assistant", "content": [t("Yes.")]}], images=["blue"]), Media(images=[blue])),
    ]


def _last_hidden(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The states the model's head projects, every position: equal states give equal logits,
    without holding a 152k-262k vocabulary's logits for every token of an anyres image."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return model(**inputs, logits_to_keep=torch.zeros(0, dtype=torch.long), output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("folder", list(FAMILIES))
def test_a_mixed_batch_gives_each_sample_its_own_logits(built: Any, folder: str) -> None:
    from cardtune.training.loss import causal_lm_loss, probe_head

    encoder, model = built(folder)
    encoded = [encoder.encode(sample, media) for sample, media in _samples()]
    batch = encoder.handler(encoded)
    assert batch["input_ids"].shape[0] == 3
    with torch.no_grad():
        states = _last_hidden(model, batch)
        assert torch.isfinite(causal_lm_loss(states, batch["labels"], probe_head(model)))
        for row, e in enumerate(encoded):
            alone = _last_hidden(model, encoder.handler([e]))
            n = len(e.input_ids)
            assert torch.allclose(states[row, :n], alone[0, :n], atol=1e-4), (folder, e.sample_id)
    media = encoder.media_token_ids
    labels = batch["labels"]
    assert not any(int(t) in media for t in batch["input_ids"][labels != IGNORE])


def test_per_token_tensors_are_padded_to_the_batch_and_cut_with_the_ids(built: Any) -> None:
    """Mllama: cross_attention_mask has a row per token; a text-only row gets zeros, and
    truncation (text after the last image) cuts the mask with the ids."""
    encoder, _ = built("llama-3.2-11b-vision-instruct")
    (image, media), (text, _), _ = _samples()
    a, b = encoder.encode(image, media), encoder.encode(text)
    batch = encoder.handler([a, b])
    mask = batch["cross_attention_mask"]
    assert mask.shape[:2] == batch["input_ids"].shape
    assert mask[1].sum() == 0 and mask[0, : len(a.input_ids)].sum() > 0
    assert batch["pixel_values"].shape[0] == 2 and batch["pixel_values"][1].abs().sum() == 0
    from cardtune.collators.engine import ChatEncoder

    short = ChatEncoder(encoder.card, encoder.processing, max_length=len(a.input_ids) - 2)
    cut = short.encode(image, media)
    assert len(cut.input_ids) == len(a.input_ids) - 2
    assert cut.media_tensors["cross_attention_mask"].shape[1] == len(cut.input_ids)


def test_videos_say_what_is_missing_here(built: Any) -> None:
    """A family whose video processor needs torchvision: images work, a video is refused naming
    the sample and what to install (never the processor's own traceback)."""
    import importlib.util

    from PIL import Image

    from cardtune.conversation import Media, Sample
    from cardtune.errors import SampleError

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: videos can be encoded here")
    encoder, _ = built("llava-onevision-qwen2-0.5b-ov-hf")
    sample = Sample("clip", [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                             {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]}], videos=["v"])
    with pytest.raises(SampleError) as info:
        encoder.encode(sample, Media(videos=[[Image.new("RGB", (32, 32))] * 4]))
    assert (info.value.sample_id, info.value.reason) == ("clip", "unsupported_media")
    assert info.value.detail.endswith("install torchvision for videos")
    assert "LlavaOnevisionVideoProcessor requires the Torchvision library" in info.value.detail
