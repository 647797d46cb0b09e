"""The FIELD_NOTES checklist, item by item: how finetuning toolkits get labels wrong.

One test per numbered failure mode of ``../shared/FIELD_NOTES.md`` that concerns masking
(1-9, 11-13; 10 is a batch sampler concern), each named after it and run on the real
tokenizers and processors of the fixtures. Exact ids per family are in
``test_labels_golden.py``; here each failure mode is checked as a property, with the raw
Hugging Face behaviour asserted next to it where it shows why the failure mode exists.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from conftest import require_fixture

IGNORE = -100

# The text that ends an assistant turn and is trained, per registered model with a template.
EOT = {
    "llava-1.5-7b": "</s>",
    "llava-interleave-qwen-7b": "<|im_end|>",
    "qwen2.5-vl-3b-instruct": "<|im_end|>",
    "qwen2-vl-2b": "<|im_end|>",
    "phi3-v": "<|end|>",
    "llama-2-7b-chat": " </s>",
    "qwen2.5-7b-instruct": "<|im_end|>",
    "mistral-7b-instruct-v0.2": "</s>",
    "mistral-7b-instruct-v0.3": "</s>",
    "deepseek-coder-6.7b-instruct": "\n<|EOT|>",
    # cards that declare their template (the folders ship none)
    "vicuna-7b-v1.5": "</s>",
    "phi-2": "<|endoftext|>",
    "qwen-vl-chat": "<|im_end|>",
}
DECLARATIVE = ["vicuna-7b-v1.5", "phi-2", "qwen-vl-chat"]


def not_ready(model_id: str) -> str | None:
    """Why a declarative card cannot be encoded yet (its template or loader still to come)."""
    if model_id not in DECLARATIVE:
        return None
    from cardtune.loaders import LOADERS
    from cardtune.registry import get_registry

    card = get_registry().get(model_id).family
    if card.chat.template != "declarative":
        return f"card {card.family} declares no template yet"
    if card.loader not in LOADERS:
        return f"loader {card.loader!r} of card {card.family} is not registered yet"
    return None


def models(*ids: str) -> list[Any]:
    return [pytest.param(m, id=m, marks=[pytest.mark.skip(reason=r)] if (r := not_ready(m)) else [])
            for m in (ids or EOT)]


MODELS = models()
VLMS = ["llava-1.5-7b", "llava-interleave-qwen-7b", "qwen2.5-vl-3b-instruct", "qwen2-vl-2b"]
IMAGE_TOKEN = {"llava-1.5-7b": "<image>", "llava-interleave-qwen-7b": "<image>",
               "qwen2.5-vl-3b-instruct": "<|image_pad|>", "qwen2-vl-2b": "<|image_pad|>"}
# templates trim answers (llama-2 `.strip()`, mistral v0.3 `|trim`)
TRIMS = {"llama-2-7b-chat", "mistral-7b-instruct-v0.3"}


@pytest.fixture(scope="module")
def encoder() -> Callable[..., Any]:
    """``encoder(model_id, max_length=None)``: processing loaded once per model per module."""
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    loaded: dict[str, Any] = {}

    def get(model_id: str, max_length: int | None = None, card: Any = None) -> Any:
        if model_id not in loaded:
            r = resolve_model(model_id, require_fixture(model_id))
            loaded[model_id] = (r.card, load_processing(r))
        base_card, processing = loaded[model_id]
        return ChatEncoder(card or base_card, processing, max_length=max_length)

    return get


def sample(sample_id: str, *turns: Any, system: str | None = None):
    """A Sample from alternating user/assistant texts; a tuple ``(n_images, text)`` for a user
    turn puts that many image parts before its text."""
    from cardtune.conversation import Sample

    messages = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        images, text = turn if isinstance(turn, tuple) else (0, turn)
        messages.append({"role": role, "content": [*({"type": "image"} for _ in range(images)),
                                                   {"type": "text", "text": text}]})
    return Sample(sample_id, messages)


def image(w: int, h: int, colour=(200, 30, 30)):
    from PIL import Image

    return Image.new("RGB", (w, h), colour)


def media(*images):
    from cardtune.conversation import Media

    return Media(images=list(images))


def spans(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            out.append((start, i))
            start = None
    return out


def supervised(enc: Any, e: Any) -> list[str]:
    """Each supervised span of an encoded sample, decoded."""
    return [enc.tokenizer.decode(e.input_ids[s:t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for s, t in spans(e.labels)]


def expected(model_id: str, *answers: str) -> list[str]:
    return [(a.strip() if model_id in TRIMS else a) + EOT[model_id] for a in answers]


# the template's space before an answer, kept by a byte-level decode of the answer's first token
# (a sentencepiece decode drops it: llava's "ASSISTANT: A" decodes "A")
LEAD = {"phi-2": " "}


def assert_exact(enc: Any, e: Any, model_id: str, *answers: str) -> None:
    got = [t.removeprefix(LEAD.get(model_id, "")) for t in supervised(enc, e)]
    assert got == expected(model_id, *answers), f"{model_id}: supervised {got!r}"
    assert all(lab in (IGNORE, i) for i, lab in zip(e.input_ids, e.labels, strict=True))


THREE_TURNS = ("Capital of France?", "Paris.", "And of Italy?", "Rome.", "Which is larger?", "Paris is larger.")


# -- 1 ------------------------------------------------------------------------------------------


BOS_RULE = {  # who writes bos in the final ids, as the model was trained
    "llava-1.5-7b": "tokenizer", "phi3-v": "tokenizer",
    "llama-2-7b-chat": "template_each_turn", "mistral-7b-instruct-v0.2": "template",
    "mistral-7b-instruct-v0.3": "template", "deepseek-coder-6.7b-instruct": "template",
    "llava-interleave-qwen-7b": None, "qwen2.5-vl-3b-instruct": None, "qwen2-vl-2b": None,
    "qwen2.5-7b-instruct": None,
    "vicuna-7b-v1.5": "tokenizer", "phi-2": None, "qwen-vl-chat": None,
}


@pytest.mark.parametrize("model_id", MODELS)
def test_01_bos_present_absent_or_doubled(encoder, model_id):
    enc = encoder(model_id)
    tok = enc.tokenizer
    s = sample(f"{model_id}-bos", *THREE_TURNS)
    e = enc.encode(s)
    rule = BOS_RULE[model_id]
    if rule is None:
        if model_id == "phi-2":  # bos == eos == <|endoftext|>: the model was trained without bos
            assert tok.bos_token_id == tok.eos_token_id
            assert e.input_ids[0] != tok.bos_token_id
            assert e.input_ids.count(tok.eos_token_id) == 3  # the three ends of turn, nothing more
            return
        if model_id != "qwen-vl-chat":
            assert tok.bos_token is None, "Qwen2 tokenizers have no bos"
        assert 151643 not in e.input_ids  # <|endoftext|> is not smuggled in as a bos
        assert e.input_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # Qwen-VL-Chat had no bos either
        return
    bos = tok.bos_token_id
    assert e.input_ids[0] == bos and e.input_ids[1] != bos, "bos missing or doubled at the start"
    assert e.labels[0] == IGNORE
    # llama-2-chat's template opens every [INST] with <s>: one per user turn, never two in a row
    want = 3 if rule == "template_each_turn" else 1
    assert e.input_ids.count(bos) == want
    assert all(not (a == b == bos) for a, b in zip(e.input_ids, e.input_ids[1:], strict=False))
    if rule.startswith("template"):
        # the raw failure mode: tokenizing the template's text with special tokens doubles bos
        text = enc.render(s)
        raw = tok(text)["input_ids"]
        if model_id != "deepseek-coder-6.7b-instruct":  # its tokenizer adds none (SOURCES.md)
            assert raw[:2] == [bos, bos]
    else:
        # the raw failure mode: apply_chat_template(tokenize=True) does not add it
        raw = tok.apply_chat_template(enc.normalise(s), tokenize=True,
                                      chat_template=enc.processing.renderer.chat_template)["input_ids"]
        assert bos not in raw


# -- 2 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_02_end_of_turn_is_supervised(encoder, model_id):
    enc = encoder(model_id)
    tok = enc.tokenizer
    e = enc.encode(sample(f"{model_id}-eot", *THREE_TURNS))
    assert_exact(enc, e, model_id, *THREE_TURNS[1::2])
    eot_last = tok(EOT[model_id], add_special_tokens=False)["input_ids"][-1]
    for _, t in spans(e.labels):
        assert e.labels[t - 1] == eot_last, f"span does not end with {EOT[model_id]!r}"
    if model_id == "phi3-v":  # eos is <|endoftext|>, a turn ends with <|end|>: the latter is trained
        assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id not in e.labels
    if model_id == "llava-1.5-7b":
        # the template itself writes no end of turn: the card's </s> is in the input too
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(require_fixture(model_id))
        raw = proc.apply_chat_template(sample("raw", *THREE_TURNS).messages, tokenize=False)
        assert "</s>" not in raw
        assert e.input_ids.count(tok.eos_token_id) == 3


# -- 3 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id,pad", [
    ("phi3-v", "shipped"),  # pad == eos == <|endoftext|>, a turn ends with <|end|>
    ("llava-1.5-7b", "shipped"),
    ("mistral-7b-instruct-v0.2", "shipped"),
    ("llama-2-7b-chat", "shipped"),
    # pad forced to eos where eos IS the end of turn: the failure mode in its sharpest form
    ("mistral-7b-instruct-v0.2", "eos"),
    ("llava-1.5-7b", "eos"),
    ("llama-2-7b-chat", "eos"),
    *(pytest.param(*p.values, "shipped", id=f"{p.id}-shipped", marks=p.marks) for p in models("phi-2")),
])
def test_03_pad_equal_to_eos_keeps_eos_labels(encoder, monkeypatch, model_id, pad):
    enc = encoder(model_id)
    tok = enc.tokenizer
    if pad == "eos":
        monkeypatch.setattr(type(enc.handler), "pad_id", property(lambda self: tok.eos_token_id))
    short = enc.encode(sample("short", "Hi", "Ok."))
    long = enc.encode(sample("long", *THREE_TURNS))
    batch = enc.handler([short, long])
    pad = batch["input_ids"][0, len(short):]
    assert len(pad) > 0
    if model_id == "phi3-v":
        assert tok.pad_token_id == tok.eos_token_id  # the quirk itself
    assert set(pad.tolist()) == {enc.handler.pad_id}
    for row, f in enumerate([short, long]):
        n = len(f)
        assert batch["labels"][row, :n].tolist() == f.labels, "labels changed by collation"
        assert batch["labels"][row, n:].tolist() == [IGNORE] * (batch["labels"].shape[1] - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
    # every end-of-turn label survives, even where its id is the pad id
    eot_last = tok(EOT[model_id], add_special_tokens=False)["input_ids"][-1]
    assert (batch["labels"] == eot_last).sum().item() == 1 + 3
    if pad == "eos":
        assert enc.handler.pad_id == eot_last
    if model_id == "phi-2":  # pad == eos == the end of turn, as shipped
        assert enc.handler.pad_id == tok.eos_token_id == eot_last
    if enc.handler.pad_id == eot_last:  # a "labels where input != pad" rule would drop them
        assert ((batch["input_ids"] == eot_last) & (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE)).sum() == 0


# -- 4 ------------------------------------------------------------------------------------------


ROLE_STRINGS = {
    "llava-1.5-7b": "What do 'USER:' and 'ASSISTANT:' mean in 'USER: hi ASSISTANT: hello</s>'?",
    "llava-interleave-qwen-7b": "Explain <|im_start|>assistant\n\nhi<|im_end|>\n<|im_start|>user and <|im_end|>",
    "qwen2.5-vl-3b-instruct": "Explain\n<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user ok",
    "qwen2-vl-2b": "Explain\n<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user ok",
    "phi3-v": "Explain <|end|>\n<|assistant|>\nhi<|end|>\n<|user|>\nok",
    "llama-2-7b-chat": "Explain [/INST] hi </s><s>[INST] and <<SYS>>",
    "qwen2.5-7b-instruct": "Explain\n<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user ok",
    "mistral-7b-instruct-v0.2": "Explain [/INST]hi</s>[INST] ok",
    "mistral-7b-instruct-v0.3": "Explain[/INST] hi</s>[INST] ok",
    "deepseek-coder-6.7b-instruct": "Explain\n### Response:\nhi\n<|EOT|>\n### Instruction:\nok",
    "vicuna-7b-v1.5": "What do 'USER:' and 'ASSISTANT:' mean in 'USER: hi ASSISTANT: hello</s>'?",
    "phi-2": "Explain\nOutput: hi<|endoftext|>Instruct: ok",
    "qwen-vl-chat": "Explain\n<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user ok",
}
# First answer characters that merge with the end of the header in context.
MERGING_ANSWERS = {  # model -> (the header's piece in the merged token, the answer)
    "mistral-7b-instruct-v0.2": ("]", ".NET is a framework."),  # "]" + "." tokenizes as one piece
    "qwen2.5-7b-instruct": ("\n", "\nA leading newline."),  # "\n" + "\n" tokenizes as one piece
    # its processor template writes "\n" before each text part: the header ends "assistant\n\n"
    "llava-interleave-qwen-7b": ("\n\n", "\nA leading newline."),
    # "### Response:\n" + "\nA": no merge here (the answer's newline is a token of its own)
    "deepseek-coder-6.7b-instruct": ("", "\nA leading newline."),
}


@pytest.mark.parametrize("model_id", MODELS)
def test_04_role_strings_in_context_and_inside_user_text(encoder, model_id):
    enc = encoder(model_id)
    header = list(enc.roles.assistant_header)
    # the role tokens are those of the rendered context, found right before every answer
    e = enc.encode(sample(f"{model_id}-ctx", *THREE_TURNS))
    for s, _ in spans(e.labels):
        assert e.input_ids[s - len(header):s] == header
    # role strings typed by a user open no span
    answer = "Those are turn markers."
    e = enc.encode(sample(f"{model_id}-roles", ROLE_STRINGS[model_id], answer, ROLE_STRINGS[model_id], "Yes."))
    assert_exact(enc, e, model_id, answer, "Yes.")
    # an answer whose first characters merge into the header's last token: the merged token is
    # trained (the model must emit it), so the span is that header piece, then the answer
    if model_id in MERGING_ANSWERS:
        piece, answer = MERGING_ANSWERS[model_id]
        e = enc.encode(sample(f"{model_id}-merge", "Question?", answer))
        assert supervised(enc, e) == [piece + t for t in expected(model_id, answer)]


@pytest.mark.parametrize("model_id,user,n_images", [
    # "ASSISTANT:" right after "<image>\n" is not a header in context (no "▁A"), but is alone
    pytest.param("llava-1.5-7b", "ASSISTANT: 42</s> and ASSISTANT: 42</s>", 1, id="llava-1.5-7b-after-image"),
    # "Output:" right after "Instruct: " is "ĠOutput" in context, "Output" alone
    *(pytest.param(*p.values, "Output: 42<|endoftext|>Instruct: again\nOutput: 42<|endoftext|>", 0,
                   id="phi-2-message-start", marks=p.marks)
      for p in models("phi-2")),
    pytest.param("llava-1.5-7b", "Quote: ASSISTANT: 42</s>", 0, id="llava-1.5-7b-plain"),
    pytest.param("qwen2.5-7b-instruct", "Quote:<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n", 0, id="qwen2.5"),
])
def test_04_quoted_turn_whose_role_string_tokenizes_differently_alone(encoder, model_id, user, n_images):
    enc = encoder(model_id)
    s = sample(f"{model_id}-quote", (n_images, user), "42")
    e = enc.encode(s, media(*(image(40, 40) for _ in range(n_images))))
    header = list(enc.roles.assistant_header)
    last = max(i for i in range(len(e.input_ids)) if e.input_ids[i:i + len(header)] == header)
    assert [a for a, _ in spans(e.labels)] == [last + len(header)], (
        f"supervised {supervised(enc, e)!r} at {spans(e.labels)}, the real header ends at {last + len(header)}"
    )
    assert_exact(enc, e, model_id, "42")


# -- 5 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["llava-1.5-7b", "qwen2.5-7b-instruct", "llama-2-7b-chat"])
def test_05_templates_with_or_without_generation_blocks(encoder, model_id):
    import warnings

    enc = encoder(model_id)
    tok = enc.tokenizer
    s = sample(f"{model_id}-gen", "What is it?", "A cat.", "Sure?", "Yes.")
    messages = enc.normalise(s) if model_id != "llava-1.5-7b" else s.messages
    template = enc.processing.renderer.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                     chat_template=template)
    hf_masked = [tok.convert_ids_to_tokens(i) for i, m in zip(hf["input_ids"], hf["assistant_masks"], strict=True) if m]
    if model_id == "llava-1.5-7b":
        # with {% generation %}: the mask leaks into the next "USER:" and never has </s>
        assert "▁US" in hf_masked and "</s>" not in hf_masked
    else:
        assert hf_masked == []  # no {% generation %}: an all-zero mask
    e = enc.encode(s)
    assert_exact(enc, e, model_id, "A cat.", "Yes.")


# -- 6 ------------------------------------------------------------------------------------------


# (width, height) -> tokens: llava 336/14 = 24² = 576; interleave SigLIP 384/14 = 27² = 729;
# qwen2-vl (h/28)·(w/28): 56x56 -> 4, 112x84 -> 12 (size-dependent, like anyres)
EXPANSION = {
    "llava-1.5-7b": (576, 576), "llava-interleave-qwen-7b": (729, 729),
    "qwen2.5-vl-3b-instruct": (4, 12), "qwen2-vl-2b": (4, 12),
}


def runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    out, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            out.append((start, i - start))
            start = None
    return out


@pytest.mark.parametrize("model_id", VLMS)
def test_06_labels_aligned_after_media_expansion(encoder, model_id):
    enc = encoder(model_id)
    tok = enc.tokenizer
    token = tok.convert_tokens_to_ids(IMAGE_TOKEN[model_id])
    s = sample(f"{model_id}-expand", (1, "First?"), "A red square.", (1, "Second?"), "A blue rectangle.")
    e = enc.encode(s, media(image(56, 56), image(112, 84, (20, 40, 220))))
    assert len(e.labels) == len(e.input_ids)
    assert [n for _, n in runs(e.input_ids, token)] == list(EXPANSION[model_id])
    assert all(lab == IGNORE for i, lab in zip(e.input_ids, e.labels, strict=True) if i == token)
    assert_exact(enc, e, model_id, "A red square.", "A blue rectangle.")
    # each answer comes after its own image
    (a, _), (b, _) = runs(e.input_ids, token)
    (s1, _), (s2, _) = spans(e.labels)
    assert a < s1 < b < s2


def _mismatch_params() -> list[Any]:
    out = []
    for model_id in VLMS:
        for case, placeholders, images in (("image_part_without_image", 1, 0),
                                           ("image_without_placeholder", 0, 1),
                                           ("two_images_one_placeholder", 1, 2)):
            out.append(pytest.param(model_id, placeholders, images, id=f"{model_id}-{case}"))
    return out


@pytest.mark.parametrize("model_id,placeholders,n_images", _mismatch_params())
def test_06_media_placeholders_must_match_the_media(encoder, model_id, placeholders, n_images):
    from cardtune.errors import SampleError

    s = sample("mismatch-9", (placeholders, "What is it?"), "Red.")
    with pytest.raises(SampleError) as err:
        encoder(model_id).encode(s, media(*(image(56, 56) for _ in range(n_images))))
    assert err.value.reason == "placeholder_mismatch" and err.value.sample_id == "mismatch-9"


# -- 7 ------------------------------------------------------------------------------------------


def test_07_truncation_never_cuts_media_nor_trains_nothing(encoder):
    from cardtune.errors import SampleError

    # text only: every answer cut away -> empty_labels, naming the sample
    enc = encoder("qwen2.5-7b-instruct", max_length=12)
    with pytest.raises(SampleError) as err:
        enc.encode(sample("long-question", "A very long question " * 10, "Short."))
    assert err.value.reason == "empty_labels" and err.value.sample_id == "long-question"

    model_id = "llava-1.5-7b"
    s = sample("img", (1, "What is it?"), "A red square, drawn on a plain background.")
    full = encoder(model_id).encode(s, media(image(56, 56)))
    token = encoder(model_id).tokenizer.convert_tokens_to_ids("<image>")
    (first, count), = runs(full.input_ids, token)
    answer_start = spans(full.labels)[0][0]
    # a cut inside the image tokens -> too_long (features would not match tokens)
    with pytest.raises(SampleError) as err:
        encoder(model_id, max_length=first + count // 2).encode(s, media(image(56, 56)))
    assert err.value.reason == "too_long" and err.value.sample_id == "img"
    # a cut after the image but before the answer -> empty_labels
    with pytest.raises(SampleError) as err:
        encoder(model_id, max_length=first + count + 1).encode(s, media(image(56, 56)))
    assert err.value.reason == "empty_labels"
    # a cut inside the answer keeps the whole image and the answer's start
    keep = answer_start + 3
    e = encoder(model_id, max_length=keep).encode(s, media(image(56, 56)))
    assert e.input_ids == full.input_ids[:keep] and e.labels == full.labels[:keep]
    assert e.num_truncated == len(full) - keep and e.num_trained == 3
    assert e.input_ids.count(token) == 576 and e.media_tensors["pixel_values"].shape[0] == 1

    # qwen2-vl, two images: a cut between them would drop the second image's tokens -> too_long
    model_id = "qwen2-vl-2b"
    s = sample("two", (1, "First?"), "Red.", (1, "Second?"), "Blue.")
    imgs = (image(56, 56), image(112, 84))
    full = encoder(model_id).encode(s, media(*imgs))
    token = encoder(model_id).tokenizer.convert_tokens_to_ids("<|image_pad|>")
    (_, _), (second, _) = runs(full.input_ids, token)
    with pytest.raises(SampleError) as err:
        encoder(model_id, max_length=second - 1).encode(s, media(*imgs))
    assert err.value.reason == "too_long"


# -- 8 ------------------------------------------------------------------------------------------


SYSTEM = "You are a terse tutor."
SYSTEM_CASES = {
    # model -> (system given?, start of the engine's render)
    "mistral-7b-instruct-v0.2": (True, f"<s>[INST] {SYSTEM}\n\nQ1 [/INST]A1</s>[INST] Q2 [/INST]A2</s>"),
    "mistral-7b-instruct-v0.3": (True, f"<s>[INST] {SYSTEM}\n\nQ1[/INST] A1</s>[INST] Q2[/INST] A2</s>"),
    "llama-2-7b-chat": (True, f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nQ1 [/INST] A1 </s>"),
    "llava-1.5-7b": (True, f"{SYSTEM} USER: Q1 ASSISTANT: A1</s> "),
    "qwen2.5-vl-3b-instruct": (True, f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nQ1"),
    "qwen2.5-7b-instruct": (False, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
                                   "You are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1"),
    "qwen2.5-vl-3b-instruct/default": (False, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"),
    # its processor template (the one used with images) injects no default, unlike its tokenizer's
    "llava-interleave-qwen-7b/default": (False, "<|im_start|>user\n\nQ1<|im_end|>\n"),
    "deepseek-coder-6.7b-instruct/default": (False, "<｜begin▁of▁sentence｜>You are an AI programming assistant"),
}


@pytest.mark.parametrize("case", list(SYSTEM_CASES))
def test_08_system_prompt_absent_default_refused_or_dropped(encoder, case):
    model_id = case.split("/")[0]
    enc = encoder(model_id)
    with_system, start = SYSTEM_CASES[case]
    s = sample(f"{case}-sys", "Q1", "A1", "Q2", "A2", system=SYSTEM if with_system else None)
    text = enc.render(s)
    assert text.startswith(start), text
    e = enc.encode(s)
    assert_exact(enc, e, model_id, "A1", "A2")  # the system prompt is never trained
    if with_system:
        assert text.count(SYSTEM) == 1
        assert "You are a helpful assistant." not in text  # a given system replaces the default
    raw_messages = enc.handler.format_messages(s.messages, enc.roles.content)
    if model_id == "mistral-7b-instruct-v0.2":  # the template itself refuses a system role
        with pytest.raises(Exception, match="roles must alternate|Only user and assistant"):
            enc.processing.renderer.apply_chat_template(raw_messages, tokenize=False)
    if model_id == "mistral-7b-instruct-v0.3":  # the template itself drops it when the last turn is an answer
        assert SYSTEM not in enc.processing.renderer.apply_chat_template(raw_messages, tokenize=False)


# -- 9 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", MODELS)
def test_09_multi_turn_every_turn_and_later_images(encoder, model_id):
    enc = encoder(model_id)
    answers = ["One.", "Two.", "Three.", "Four."]
    turns = [x for i, a in enumerate(answers) for x in (f"Question {i}?", a)]
    e = enc.encode(sample(f"{model_id}-4turns", *turns))
    assert_exact(enc, e, model_id, *answers)  # eot after every turn, not only the last
    if model_id not in VLMS:
        return
    # an image attached to the second user turn only: counted once, placed there
    token = enc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[model_id])
    s = sample(f"{model_id}-later", "Hello?", "Hi.", (1, "And this?"), "A red square.")
    e = enc.encode(s, media(image(56, 56)))
    (at, n), = runs(e.input_ids, token)
    assert n == EXPANSION[model_id][0]
    (s1, _), (s2, _) = spans(e.labels)
    assert s1 < at < s2
    assert_exact(enc, e, model_id, "Hi.", "A red square.")
    pv = e.media_tensors["pixel_values"]
    assert pv.shape[0] == (1 if pv.dim() == 4 else 16)  # one image, not one copy per turn
    # two images in two turns, collated with a text-only sample: pixel rows = images, once each
    two = enc.encode(sample("two", (1, "A?"), "Red.", (1, "B?"), "Blue."), media(image(56, 56), image(112, 84)))
    batch = enc.handler([e, two, enc.encode(sample("text", "Hi", "Ok."))])
    if "image_grid_thw" in batch:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4], [1, 6, 8]]
        assert batch["pixel_values"].shape[0] == 16 + 16 + 48
    else:
        assert batch["pixel_values"].shape[0] == 3


# -- 11 -----------------------------------------------------------------------------------------


def test_11_no_sample_is_masked_whole_silently(encoder):
    from cardtune.errors import SampleError

    # a header that never matches (a wrong card): an error naming the sample, not all -100
    model_id = "qwen2.5-7b-instruct"
    base = encoder(model_id).card
    wrong = base.model_copy(update={"chat": base.chat.model_copy(update={"assistant_header": "<|im_start|>bot\n"})})
    with pytest.raises(SampleError) as err:
        encoder(model_id, card=wrong).encode(sample("mismatch-7", "Q?", "A."))
    assert err.value.reason == "label_contract" and err.value.sample_id == "mismatch-7"
    assert "mismatch-7" in str(err.value)
    # no assistant turn: an error naming the sample
    for model_id in ("llava-1.5-7b", "qwen2.5-7b-instruct", "llama-2-7b-chat"):
        from cardtune.conversation import Sample

        s = Sample("no-answer-42", [{"role": "user", "content": "Only a question?"}])
        with pytest.raises(SampleError) as err:
            encoder(model_id).encode(s)
        assert err.value.reason == "no_assistant_turn" and err.value.sample_id == "no-answer-42"
        assert "no-answer-42" in str(err.value)
    # whatever comes back has trained tokens, and every one of them is an answer's
    for model_id in (m for m in EOT if not not_ready(m)):
        e = encoder(model_id).encode(sample("ok", "Q?", "A."))
        assert e.num_trained > 0
        assert_exact(encoder(model_id), e, model_id, "A.")


# -- 12 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["llava-1.5-7b", "qwen2-vl-2b", "llava-interleave-qwen-7b"])
def test_12_padding_side_is_right_for_training(encoder, model_id):
    import json

    folder = require_fixture(model_id)
    shipped = json.loads((folder / "tokenizer_config.json").read_text()).get("padding_side")
    if model_id != "llava-interleave-qwen-7b":
        assert shipped == "left"  # what the folder says, for generation
    enc = encoder(model_id)
    assert enc.tokenizer.padding_side == "right"
    a = enc.encode(sample("a", "Hi", "Ok."))
    b = enc.encode(sample("b", *THREE_TURNS))
    batch = enc.handler([a, b])
    n, width = len(a), batch["input_ids"].shape[1]
    assert batch["input_ids"][0, :n].tolist() == a.input_ids  # real tokens first
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, n:].tolist() == [IGNORE] * (width - n)
    assert batch["attention_mask"][1].tolist() == [1] * width


# -- 13 -----------------------------------------------------------------------------------------


def test_13_llava_string_content_is_rendered(encoder):
    from transformers import AutoProcessor

    from cardtune.conversation import Sample

    model_id = "llava-1.5-7b"
    strings = Sample("strings", [{"role": "user", "content": "What is the capital of France?"},
                                 {"role": "assistant", "content": "Paris."}])
    # the raw quirk: the template drops string content
    proc = AutoProcessor.from_pretrained(require_fixture(model_id))
    assert proc.apply_chat_template(strings.messages, tokenize=False) == "USER: ASSISTANT: "
    enc = encoder(model_id)
    assert enc.render(strings) == "USER: What is the capital of France? ASSISTANT: Paris.</s> "
    e = enc.encode(strings)
    assert_exact(enc, e, model_id, "Paris.")
    parts = enc.encode(sample("parts", "What is the capital of France?", "Paris."))
    assert (e.input_ids, e.labels) == (parts.input_ids, parts.labels)


# llava-1.5 / llava-interleave write a separator per text part (' ' after each / '\n' before each):
# adjacent text parts are joined into one before rendering, so the answer renders as its text
@pytest.mark.parametrize("model_id", VLMS + ["qwen2.5-7b-instruct", "phi3-v", "llama-2-7b-chat", "deepseek-coder-6.7b-instruct"])
def test_13_answer_in_several_text_parts_is_trained(encoder, model_id):
    from cardtune.conversation import Sample

    enc = encoder(model_id)
    s = Sample("parts-answer", [
        {"role": "user", "content": [{"type": "text", "text": "Greet the world."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " world."}]},
    ])
    e = enc.encode(s)
    assert_exact(enc, e, model_id, "Hello world.")


# -- not a FIELD_NOTES item, but a promise of the card ----------------------------------------


def test_phi3_v_images_are_refused_until_its_processor_exists(encoder):
    from cardtune.errors import SampleError

    enc = encoder("phi3-v")
    with pytest.raises(SampleError) as err:
        enc.encode(sample("phi3-img", (1, "What is it?"), "A square."), media(image(56, 56)))
    assert err.value.reason == "unsupported_media" and err.value.sample_id == "phi3-img"
