"""The 2025-26 generation breaks assumptions an engine can make; each test here names the
property of a template, processor or folder that the engine now reads instead of assuming:

- a template may end earlier answers otherwise than the last (harmony: ``<|end|>`` /
  ``<|return|>``), and write reasoning under a header of its own (the analysis channel);
- what a template writes for an image may not be the token the processor expands it into
  (Gemma 3's ``<start_of_image>`` becomes 256 ``<image_soft_token>``);
- a processor may tokenize without offsets (Idefics3 / SmolVLM count image tokens with
  ``char_to_token``), which transformers' sanitizing path does not give;
- a folder may nest its parts (omni: a thinker, a talker, a vocoder) or hang them off the
  model itself (Llama 4: no base model), and an image processor may need torchvision.

Folders the fixtures do not hold are built here from transformers' own classes, around a real
fixture tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, require_fixture
from test_labels_golden import _spans_text

IGNORE = -100


def _cli(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``cardtune ARGV`` in its own process: what its stderr shows is what a user sees."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    return subprocess.run([sys.executable, "-m", "cardtune", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _encoder(folder: Path, model_id: str | None = None) -> Any:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model(model_id, folder)
    return ChatEncoder(resolved.card, load_processing(resolved))


def _sample(sid: str, *turns: tuple[str, str], images: int = 0, reasoning: dict[int, str] | None = None) -> Any:
    from cardtune.conversation import Sample

    messages: list[dict[str, Any]] = []
    for k, (question, answer) in enumerate(turns):
        parts = [{"type": "image"}] * (images if k == 0 else 0) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": parts})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        if reasoning and k in reasoning:
            messages[-1]["reasoning_content"] = reasoning[k]
    return Sample(sid, messages, images=[f"img{i}.png" for i in range(images)])


# -- harmony: two ends of turn and a reasoning header ------------------------------------------

def test_harmony_trains_each_answer_to_its_own_end_and_the_reasoning_through_the_final_header() -> None:
    encoder = _encoder(require_fixture("gpt-oss-20b"), "gpt-oss-20b")
    tok, roles = encoder.tokenizer, encoder.roles
    ids_of = tok.convert_tokens_to_ids
    assert roles.closings == ((ids_of("<|return|>"),), (ids_of("<|end|>"),))
    assert tok.decode(roles.reasoning_header) == "<|end|><|start|>assistant"  # the generation prompt
    three = encoder.encode(_sample("three", ("One?", "1."), ("Two?", "2."), ("Three?", "3.")))
    assert _spans_text(tok, three.input_ids, three.labels) == ["1.<|end|>", "2.<|end|>", "3.<|return|>"]
    # reasoning: the template renders the last answer's only, in the analysis channel
    thought = encoder.encode(_sample("thought", ("Two?", "2."), ("Three?", "3."),
                                     reasoning={0: "Dropped by the template.", 1: "One more than two."}))
    assert _spans_text(tok, thought.input_ids, thought.labels) == [
        "2.<|end|>",
        "<|channel|>analysis<|message|>One more than two.<|end|><|start|>assistant<|channel|>final<|message|>3.<|return|>"]
    assert thought.dropped_reasoning == 1
    assert "Dropped by the template." not in tok.decode(thought.input_ids)


def test_harmony_says_what_it_trains_of_reasoning() -> None:
    encoder = _encoder(require_fixture("gpt-oss-20b"), "gpt-oss-20b")
    said = [n for n in encoder.roles.notes if n.startswith("reasoning:")]
    assert said == ["reasoning: rendered from the message field 'reasoning_content' in the last answer only (the template "
                    "drops it from earlier turns, whose answers are trained alone), trained from the end of the generation "
                    "prompt '<|end|><|start|>assistant' on, with the answer's header between them"]


# A ChatML template that ends the last answer with the tokenizer's eos instead of <|im_end|>: no
# family is named anywhere, the ends are read off the template by position.
LAST_ENDS_WITH_EOS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last %}<|endoftext|>{% else %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_ends_of_turn_are_read_by_position_from_any_template() -> None:
    import dataclasses

    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model
    from cardtune.registry.schema import ChatSpec

    resolved = resolve_model("qwen2.5-7b-instruct", require_fixture("qwen2.5-7b-instruct"))
    card = resolved.card.model_copy(update={"chat": ChatSpec(template="jinja", jinja=LAST_ENDS_WITH_EOS)})
    encoder = ChatEncoder(card, load_processing(dataclasses.replace(resolved, card=card)))
    tok = encoder.tokenizer
    encoded = encoder.encode(_sample("two", ("A?", "Alpha."), ("B?", "Beta.")))
    assert _spans_text(tok, encoded.input_ids, encoded.labels) == ["Alpha.<|im_end|>", "Beta.<|endoftext|>"]


# -- Gemma 3: the placeholder a template writes is not the token it becomes ---------------------

def test_gemma3_derived_card_reads_the_placeholder_and_the_token_apart(tmp_path: Path) -> None:
    from PIL import Image

    from cardtune.conversation import Media

    folder = require_fixture("gemma-3-4b-it")
    derived = _encoder(folder)
    assert (derived.card.media.image_token, derived.card.media.image_placeholder) == ("<image_soft_token>", "<start_of_image>")
    registered = _encoder(folder, "gemma-3-4b-it")
    sample = _sample("one-image", ("What colour?", "Red."), images=1)
    media = Media(images=[Image.new("RGB", (64, 48), (220, 20, 20))])
    got, want = derived.encode(sample, media), registered.encode(sample, media)
    assert (got.input_ids, got.labels) == (want.input_ids, want.labels)
    tok = derived.tokenizer
    soft, boi, eoi = (tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>"))
    ids = got.input_ids
    assert ids.count(soft) == 256 and ids.count(boi) == 1 and ids.count(eoi) == 1
    assert ids[ids.index(boi) + 1 : ids.index(eoi)] == [soft] * 256
    assert _spans_text(tok, ids, got.labels) == ["Red.<end_of_turn>"]
    # bidirectional attention inside the image: token_type_ids mark exactly its soft tokens
    types = got.media_tensors["token_type_ids"][0].tolist()
    assert [i for i, t in enumerate(types) if t] == [i for i, t in enumerate(ids) if t == soft]


# -- a processor that tokenizes without offsets ---------------------------------------------------

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smolvlm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SmolVLM-style folder: transformers' Idefics3 processor (its PIL image processor) around
    the real qwen2.5 tokenizer with Idefics3's added tokens, the SmolVLM template, a tiny config."""
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    dest = tmp_path_factory.mktemp("smolvlm")
    tok = AutoTokenizer.from_pretrained(require_fixture("qwen2.5-7b-instruct"))
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                          "<end_of_utterance>", "<global-img>"]})
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=False)
    Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE).save_pretrained(dest)
    config = Idefics3Config(
        text_config={"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tok)},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=1)
    config.architectures = ["Idefics3ForConditionalGeneration"]
    config.save_pretrained(dest)
    return dest


def test_a_processor_without_offsets_still_takes_typed_control_tokens_as_text(smolvlm_folder: Path) -> None:
    """Idefics3's processor asks the tokenizer's output for ``char_to_token``, which the
    sanitizing path does not give: the image is expanded first, then the text sanitized."""
    from PIL import Image

    from cardtune.conversation import Media

    encoder = _encoder(smolvlm_folder)
    tok = encoder.tokenizer
    red = Media(images=[Image.new("RGB", (40, 30), (200, 10, 10))])
    plain = encoder.encode(_sample("plain", ("What colour?", "Red."), images=1), red)
    typed = encoder.encode(_sample("typed", ("What is <end_of_utterance> here?", "Red."), images=1), red)
    image = tok.convert_tokens_to_ids("<image>")
    assert plain.input_ids.count(image) == typed.input_ids.count(image) == 4
    assert typed.typed_control_tokens == 1
    # the typed string is its plain-text ids, the template's own <end_of_utterance> a token
    as_text = tok("<end_of_utterance>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(as_text) > 1
    at = typed.input_ids.index(as_text[0])
    assert typed.input_ids[at : at + len(as_text)] == as_text
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert typed.input_ids.count(eou) == plain.input_ids.count(eou) == 2
    # (the template writes "Assistant: "; its space and the answer are one token)
    assert _spans_text(tok, typed.input_ids, typed.labels) == [" Red.<end_of_utterance>"]
    assert set(typed.media_tensors) == set(plain.media_tensors) and "pixel_values" in typed.media_tensors


# -- folders whose parts are nested, or hang off the model itself -------------------------------

@pytest.fixture(scope="module")
def omni_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2.5-Omni-style folder: transformers' default config (thinker, talker, token2wav)
    beside the real qwen2.5 tokenizer files."""
    from transformers import Qwen2_5OmniConfig

    dest = tmp_path_factory.mktemp("omni")
    config = Qwen2_5OmniConfig().to_dict()
    config["architectures"] = ["Qwen2_5OmniForConditionalGeneration"]
    (dest / "config.json").write_text(json.dumps(config))
    source = require_fixture("qwen2.5-7b-instruct")
    for f in source.iterdir():
        if f.name != "config.json":
            shutil.copy(f, dest / f.name)
    return dest


@pytest.mark.parametrize("command", ["labels", "add-model"])
def test_an_omni_folder_is_refused_in_one_line_naming_its_parts(omni_folder: Path, tmp_path: Path, command: str) -> None:
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]))
    argv = (["labels", "--model-path", str(omni_folder), "--data", str(data)] if command == "labels" else
            ["add-model", str(omni_folder), "--model_id", "my-omni", "--cards", str(tmp_path / "cards")])
    done = _cli(*argv)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        f"cardtune {command}: {omni_folder}: cardtune cannot train a qwen2_5_omni model: it is neither a causal "
        "language model nor an image-text-to-text model (transformers serves it as: multimodal-lm, text-to-waveform); "
        "its parts: thinker, talker, token2wav; its thinker (qwen2_5_omni_thinker) is an image-text-to-text model: "
        "save it as a folder of its own (its weights and config) to train it\n")
    assert not (tmp_path / "cards").exists()


def test_nested_configs_give_the_media_tokens(omni_folder: Path) -> None:
    from cardtune.loaders.discover import FolderFacts, media_tokens, nested_configs

    config = json.loads((omni_folder / "config.json").read_text())
    assert [c.get("model_type") for c in nested_configs(config)][:4] == [
        "qwen2_5_omni", "qwen2_5_omni_thinker", "qwen2_5_omni_talker", "qwen2_5_omni_token2wav"]

    class Tok:  # a vocabulary large enough for the thinker's ids
        def __len__(self) -> int:
            return 152_000

        def convert_ids_to_tokens(self, i: int) -> str:
            return f"<id {i}>"

    facts = FolderFacts(omni_folder, config, "X", [], "generic", False)
    media, _ = media_tokens(facts, Tok())
    thinker = config["thinker_config"]
    assert media == {"image_token": f"<id {thinker['image_token_index']}>", "video_token": f"<id {thinker['video_token_index']}>"}


@pytest.fixture(scope="module")
def llama4_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-4-style folder: no base model (vision_model, multi_modal_projector and
    language_model hang off the model), an image processor that exists only for torchvision."""
    from transformers import AutoTokenizer, Llama4Config

    dest = tmp_path_factory.mktemp("llama4")
    tok = AutoTokenizer.from_pretrained(require_fixture("llama-3-8b-instruct"))
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>"]})
    tok.save_pretrained(dest)
    config = Llama4Config(
        text_config={"hidden_size": 32, "intermediate_size": 64, "intermediate_size_mlp": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": len(tok),
                     "num_local_experts": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 56, "patch_size": 14, "projector_input_dim": 32, "projector_output_dim": 32,
                       "vision_output_dim": 32},
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    config.architectures = ["Llama4ForConditionalGeneration"]
    config.save_pretrained(dest)
    (dest / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Llama4ImageProcessor", "processor_class": "Llama4Processor", "size": {"height": 56, "width": 56}}))
    return dest


def test_parts_that_hang_off_the_model_are_told_apart(llama4_folder: Path) -> None:
    from cardtune.loaders.resolve import derive_card

    card, _ = derive_card(llama4_folder)
    modules = card.modules
    assert modules.vision_encoder and all(k.startswith("vision_model.") for k in modules.vision_encoder)
    assert "multi_modal_projector" in modules.vision_projector and modules.llm == ["language_model"]


def test_an_image_processor_that_needs_torchvision_fails_the_image_check(llama4_folder: Path) -> None:
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: this image processor can be built here")
    done = _cli("check", "--model-path", str(llama4_folder))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "  OK   masked-label round trip" in "\n".join(lines)  # the text passes ...
    image = [line for line in lines if line.startswith("  FAIL image: ")]  # ... the image path does not
    assert image == ["  FAIL image: images cannot be encoded: no image processor loads here: Llama4ImageProcessor needs "
                     "torchvision, which is not installed, and transformers has no PIL version of it (images are "
                     "refused as unsupported_media)"]
    assert "Traceback" not in done.stderr


# -- they train -----------------------------------------------------------------------------------

def _tiny(fixture: str, dest: Path) -> Path:
    """The fixture's real tokenizer/processor files and config, shrunk to a random tiny model
    (its experts and vision tower too; gpt-oss's MXFP4 quantization dropped: tiny weights are fp32)."""
    import shutil as sh

    import torch
    import transformers
    from test_train import _shrink_text
    from transformers import AutoConfig

    source = require_fixture(fixture)
    config = AutoConfig.from_pretrained(source)
    text = getattr(config, "text_config", None) or config
    _shrink_text(text)
    if hasattr(text, "num_local_experts"):
        text.num_local_experts, text.num_experts_per_tok = 4, 2
    vision = getattr(config, "vision_config", None)
    if vision is not None and config.model_type == "qwen3_vl":
        vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 32, 64, 2
        vision.out_hidden_size, vision.deepstack_visual_indexes = text.hidden_size, [0]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch.manual_seed(0)
    getattr(transformers, config.architectures[0])(config).save_pretrained(dest)
    for f in source.iterdir():
        if f.is_file() and not (dest / f.name).exists():
            sh.copy2(f, dest / f.name)
    return dest


def test_gpt_oss_trains_with_eager_attention_where_it_has_no_sdpa(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_train import text_dataset, train

    model = _tiny("gpt-oss-20b", tmp_path / "model")
    (tmp_path / "data").mkdir()
    result = train(["--model_id", "gpt-oss-20b", "--model_path", str(model), "--data_path",
                    str(text_dataset(tmp_path / "data")), "--output_dir", str(tmp_path / "out"), "--use_lora",
                    "--max_steps", "2", "--per_device_train_batch_size", "2"])
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    said = capsys.readouterr()
    assert "attention: eager (the model has no sdpa attention in transformers)" in (said.out + said.err).splitlines()


def test_qwen3_vl_trains_on_images_with_lora(tmp_path: Path) -> None:
    from test_train import image_dataset, train

    model = _tiny("qwen3-vl-4b-instruct", tmp_path / "model")
    data, images = image_dataset(tmp_path / "data")
    result = train(["--model_id", "qwen3-vl-4b-instruct", "--model_path", str(model), "--data_path", str(data),
                    "--image_folder", str(images), "--output_dir", str(tmp_path / "out"), "--use_lora",
                    "--max_steps", "2", "--per_device_train_batch_size", "2"])
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss for loss in losses)


@pytest.mark.parametrize("model_id, ends", [("qwen2.5-7b-instruct", ["<|im_end|>", "<|im_end|>"]),
                                            ("gpt-oss-20b", ["<|end|>", "<|return|>"])])
def test_two_answers_in_a_row_are_both_trained(model_id: str, ends: list[str]) -> None:
    """The assistant header a template writes begins with the end of the turn before it
    (``<|im_end|>\\n<|im_start|>assistant\\n``): after an answer, that end is the answer's own."""
    from cardtune.conversation import Sample

    encoder = _encoder(require_fixture(model_id), model_id)
    sample = Sample("in-a-row", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                 {"role": "assistant", "content": "Again."}])
    encoded = encoder.encode(sample)
    assert _spans_text(encoder.tokenizer, encoded.input_ids, encoded.labels) == ["Hello." + ends[0], "Again." + ends[1]]
