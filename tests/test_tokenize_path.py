"""The batch path calls the tokenizers backend directly where that is exactly what the
tokenizer's own call does, and goes through the tokenizer wherever it is not: a backend with
truncation or padding set, special-token splitting, a class that encodes its own way."""

from __future__ import annotations

import pytest
from conftest import MODELS, require_fixture

from cardtune.collators.engine import TextView
from cardtune.collators.media import DefaultCollator
from cardtune.conversation import Processing
from cardtune.loaders.generic import GenericLoader
from cardtune.registry import FamilyCard

FOLDERS = sorted(p.name for p in MODELS.iterdir() if p.is_dir() and p.name != "qwen-vl-chat") if MODELS.is_dir() else []
TEXTS = ["<s>[INST] Hello [/INST] Hi there</s>", "  two  spaces\tand a tab\n\nnewlines " * 20,
         "日本語のテキスト, émigré, 🙂 <|im_start|>assistant\n<|eot_id|>", "", "<image>\nWhat is it?"]


def collator(name: str):
    folder = require_fixture(name)
    card = FamilyCard.model_validate({
        "family": "probe", "model_class": "AutoModelForCausalLM", "modules": {"llm": ["model"]},
        "chat": {"special_tokens": {"allow_shared": True}}, "models": [{"model_id": "probe", "hf_path": str(folder)}],
    })
    tokenizer = GenericLoader(card, folder).load_tokenizer()
    return DefaultCollator(card, Processing(tokenizer)), tokenizer


def through_the_tokenizer(tokenizer, texts):
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [list(map(tuple, o)) for o in enc["offset_mapping"]]


@pytest.mark.parametrize("name", FOLDERS)
def test_ids_and_offsets_are_the_tokenizers_own(name: str) -> None:
    handler, tokenizer = collator(name)
    ids, encodings = handler.tokenize_batch_with_offsets(TEXTS)
    assert (ids, [list(map(tuple, e.offsets)) for e in encodings]) == through_the_tokenizer(tokenizer, TEXTS)
    assert handler.tokenize_batch(TEXTS) == ids
    # what a span check reads: the text under any run of tokens, asked of the encoding a token at a time
    for text, e in zip(TEXTS, encodings, strict=True):
        view, listed = TextView(text, e), TextView(text, e.offsets)
        runs = [(a, b) for a in range(len(e.ids)) for b in range(a, min(len(e.ids), a + 6) + 1)]
        assert [view.chars(a, b) for a, b in runs] == [listed.chars(a, b) for a, b in runs]
    assert handler._plain_backend() is tokenizer.backend_tokenizer  # every fast folder here takes the direct path


def test_a_backend_with_truncation_set_goes_through_the_tokenizer() -> None:
    handler, tokenizer = collator("llama-3-8b-instruct")
    tokenizer.backend_tokenizer.enable_truncation(8)  # as a tokenizer.json with "truncation" set loads
    assert handler._plain_backend() is None
    ids, _ = handler.tokenize_batch_with_offsets([TEXTS[1]])
    assert len(ids[0]) == len(tokenizer(TEXTS[1], add_special_tokens=False)["input_ids"]) > 8
    tokenizer.backend_tokenizer.enable_truncation(8)
    assert handler.tokenize_batch([TEXTS[1]]) == ids


def test_a_backend_with_padding_set_goes_through_the_tokenizer() -> None:
    handler, tokenizer = collator("mistral-7b-instruct-v0.3")
    tokenizer.backend_tokenizer.enable_padding(length=64)
    assert handler._plain_backend() is None
    ids, _ = handler.tokenize_batch_with_offsets(["Hello"])
    assert ids == [[23325]]


def test_split_special_tokens_is_honoured() -> None:
    handler, tokenizer = collator("qwen2.5-7b-instruct")
    tokenizer.split_special_tokens = True
    assert handler._plain_backend() is None
    ids, _ = handler.tokenize_batch_with_offsets(["<|im_start|>"])
    assert ids[0] == tokenizer("<|im_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(ids[0]) > 1  # typed as text, not the control token


def test_a_class_that_encodes_its_own_way_is_called_as_itself() -> None:
    from cardtune.loaders.qwen_vl import QwenVLLoader
    from cardtune.registry import get_registry

    card = get_registry().get("qwen-vl-chat").family
    tokenizer = QwenVLLoader(card, require_fixture("qwen-vl-chat")).load_tokenizer()
    handler = DefaultCollator(card, Processing(tokenizer))
    assert handler._plain_backend() is None
    text = "Picture 1: <img>a.jpg</img>\nWhat is it?"
    assert handler.tokenize_batch_with_offsets([text])[0] == tokenizer([text], add_special_tokens=False)["input_ids"]



def test_a_transformers_class_with_its_own_call_is_called_as_itself() -> None:
    """Classes that override the call (seamless-m4t, lasr) or the encode (Code Llama's infilling)
    are never bypassed, whatever their backend."""
    handler, tokenizer = collator("llama-3-8b-instruct")
    base = type(tokenizer)
    for name in ("__call__", "_encode_plus"):
        def own(self, *args, _name=name, **kwargs):
            return getattr(base, _name)(self, *args, **kwargs)

        tokenizer.__class__ = type("Own", (base,), {name: own})
        assert handler._plain_backend() is None, name
    tokenizer.__class__ = base
    assert handler._plain_backend() is tokenizer.backend_tokenizer
