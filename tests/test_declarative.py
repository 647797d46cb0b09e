"""Declarative card templates and the plain template, rendered on the real tokenizers.

Every expected string is written out in full: a compiled template must render exactly what
the family's reference code builds (FastChat/LLaVA ``conv_vicuna_v1``, Qwen-VL's
``make_context``, phi-2's model card), and the masking engine must supervise exactly each
answer and its end of turn, the same tokens the template's ``{% generation %}`` blocks mark.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
from conftest import require_fixture
from jinja2 import TemplateError
from pydantic import ValidationError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
QUESTIONS = ("What is the capital of France?", "And of Italy?", "Thanks! Spell it.")
ANSWERS = ("Paris.", "Rome is the capital of Italy.", "R-O-M-E")


def conversation(system: str | None = None, parts: bool = False, turns: int = 3) -> list[dict[str, Any]]:
    def content(text: str) -> Any:
        return [{"type": "text", "text": text}] if parts else text

    messages = [{"role": "system", "content": content(system)}] if system is not None else []
    for q, a in list(zip(QUESTIONS, ANSWERS, strict=True))[:turns]:
        messages += [{"role": "user", "content": content(q)}, {"role": "assistant", "content": content(a)}]
    return messages


def render(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


def load(model_id: str) -> tuple[Any, Any]:
    """(card, loader) of a registered model applied to its fixture folder."""
    import cardtune.loaders.qwen_vl  # noqa: F401  (registers "qwen-vl")
    from cardtune.loaders.resolve import resolve_model

    resolved = resolve_model(model_id, require_fixture(model_id))
    return resolved.card, resolved.loader()


@functools.cache
def processing(model_id: str) -> tuple[Any, Any, Any]:
    """(card, Processing, loader) of a fixture, loaded once for this module; tests must not mutate it."""
    card, loader = load(model_id)
    return card, loader.load_processing(), loader


@pytest.fixture
def vicuna() -> Any:
    return processing("vicuna-7b-v1.5")[1].tokenizer


@pytest.fixture
def qwen_vl() -> Any:
    return processing("qwen-vl-chat")[1].tokenizer


@pytest.fixture
def phi2() -> Any:
    return processing("phi-2")[1].tokenizer


# -- vicuna v1 ----------------------------------------------------------------------------------
def test_vicuna_system_and_three_turns(vicuna: Any) -> None:
    assert render(vicuna, conversation("You are terse.")) == (
        "You are terse. USER: What is the capital of France? ASSISTANT: Paris.</s>"
        "USER: And of Italy? ASSISTANT: Rome is the capital of Italy.</s>"
        "USER: Thanks! Spell it. ASSISTANT: R-O-M-E</s>"
    )


def test_vicuna_card_pads_with_unk() -> None:
    report = processing("vicuna-7b-v1.5")[2].fixup_report
    assert report.ids == {"pad": 0, "unk": 0, "bos": 1, "eos": 2}
    assert report.assigned == {"pad": "<unk>"} and report.added == []


def test_vicuna_default_system_and_parts_content(vicuna: Any) -> None:
    expected = (
        f"{VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT: Paris.</s>"
        "USER: And of Italy? ASSISTANT: Rome is the capital of Italy.</s>"
        "USER: Thanks! Spell it. ASSISTANT: R-O-M-E</s>"
    )
    assert render(vicuna, conversation()) == expected
    assert render(vicuna, conversation(parts=True)) == expected


def test_vicuna_generation_prompt(vicuna: Any) -> None:
    messages = [*conversation(turns=1), {"role": "user", "content": "And of Italy?"}]
    assert render(vicuna, messages, add_generation_prompt=True) == (
        f"{VICUNA_SYSTEM} USER: What is the capital of France? ASSISTANT: Paris.</s>USER: And of Italy? ASSISTANT:"
    )


def test_unknown_role_is_refused(vicuna: Any) -> None:
    with pytest.raises(TemplateError) as info:
        render(vicuna, [{"role": "tool", "content": "42"}])
    assert str(info.value) == "unknown role tool: this template renders system, user and assistant"
    with pytest.raises(TemplateError) as info:
        render(vicuna, [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}])
    assert str(info.value) == "a system message must come first"


def supervised(model_id: str, messages: list[dict[str, Any]]) -> tuple[list[str], list[int], list[int]]:
    """The engine's supervised spans (decoded), its supervised positions, and the positions the
    compiled template's {% generation %} blocks mark in the same tokens."""
    from cardtune.collators.engine import ChatEncoder
    from cardtune.conversation import Sample, as_parts

    card, processed, _ = processing(model_id)
    tok = processed.tokenizer
    encoder = ChatEncoder(card, processed)
    sample = Sample("s", [{"role": m["role"], "content": as_parts(m["content"])} for m in messages])
    encoded = encoder.encode(sample)
    positions = [i for i, label in enumerate(encoded.labels) if label != -100]
    spans, start = [], None
    for i, label in enumerate([*encoded.labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            spans.append(tok.decode(encoded.input_ids[start:i]))
            start = None
    marked = tok.apply_chat_template(
        encoder.normalise(sample), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert marked["input_ids"] == encoded.input_ids[len(encoded.input_ids) - len(marked["input_ids"]) :]
    offset = len(encoded.input_ids) - len(marked["input_ids"])  # bos the engine adds
    return spans, positions, [offset + i for i, m in enumerate(marked["assistant_masks"]) if m]


def test_vicuna_masks_each_answer_and_its_eos() -> None:
    spans, positions, marked = supervised("vicuna-7b-v1.5", conversation("You are terse."))
    assert spans == ["Paris.</s>", "Rome is the capital of Italy.</s>", "R-O-M-E</s>"]
    assert positions == marked


# -- qwen-vl-chat: ChatML with image tags -------------------------------------------------------
def test_chatml_system_and_three_turns(qwen_vl: Any) -> None:
    assert render(qwen_vl, conversation("You are terse.")) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\nRome is the capital of Italy.<|im_end|>\n"
        "<|im_start|>user\nThanks! Spell it.<|im_end|>\n<|im_start|>assistant\nR-O-M-E<|im_end|>\n"
    )


def test_chatml_default_system_parts_and_generation_prompt(qwen_vl: Any) -> None:
    messages = [*conversation(parts=True, turns=1), {"role": "user", "content": "And of Italy?"}]
    assert render(qwen_vl, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_masks_each_answer_and_im_end() -> None:
    spans, positions, marked = supervised("qwen-vl-chat", conversation())
    assert spans == ["Paris.<|im_end|>", "Rome is the capital of Italy.<|im_end|>", "R-O-M-E<|im_end|>"]
    assert positions == marked


def test_qwen_vl_image_tags_number_images_across_the_conversation(qwen_vl: Any) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "/data/cat.jpg"},
                {"type": "image", "url": "https://example.com/dog.png"},
                {"type": "text", "text": "Compare them."},
            ],
        },
        {"role": "assistant", "content": "Both are pets."},
        {
            "role": "user",
            "content": [{"type": "image", "path": "imgs/bird.jpg"}, {"type": "text", "text": "And?"}],
        },
        {"role": "assistant", "content": "A bird."},
    ]
    text = render(qwen_vl, messages)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <img>/data/cat.jpg</img>\nPicture 2: <img>https://example.com/dog.png</img>\n"
        "Compare them.<|im_end|>\n<|im_start|>assistant\nBoth are pets.<|im_end|>\n"
        "<|im_start|>user\nPicture 3: <img>imgs/bird.jpg</img>\nAnd?<|im_end|>\n"
        "<|im_start|>assistant\nA bird.<|im_end|>\n"
    )
    # The tokenizer turns each path into the 256 ids the model reads it back from.
    ids = qwen_vl(text, add_special_tokens=False)["input_ids"]
    starts = [i for i, t in enumerate(ids) if t == 151857]
    assert len(starts) == 3 and [ids[s + 257] for s in starts] == [151858] * 3
    assert ids[starts[0] + 1 : starts[0] + 15] == [*b"/data/cat.jpg", 151859]
    with pytest.raises(TemplateError) as info:
        render(qwen_vl, [{"role": "user", "content": [{"type": "image"}]}])
    assert str(info.value) == 'image parts need their path ("image", "url" or "path") in this template'
    with pytest.raises(TemplateError) as info:
        render(qwen_vl, [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}])
    assert str(info.value) == "this template has no video placeholder (card: chat.declarative.video)"


# -- phi-2: Instruct/Output, no system slot ------------------------------------------------------
def test_phi2_instruct_output(phi2: Any) -> None:
    assert render(phi2, conversation(turns=2)) == (
        "Instruct: What is the capital of France?\nOutput: Paris.<|endoftext|>"
        "Instruct: And of Italy?\nOutput: Rome is the capital of Italy.<|endoftext|>"
    )
    assert render(phi2, conversation(turns=1)[:1], add_generation_prompt=True) == (
        "Instruct: What is the capital of France?\nOutput:"
    )
    with pytest.raises(TemplateError) as info:
        render(phi2, conversation("sys", turns=1))
    assert str(info.value) == "this template has no system role (card: chat.declarative.system)"


def test_phi2_masks_answers_and_eos_although_pad_is_eos() -> None:
    # The engine folds the system prompt into the first instruction (phi-2 has no system slot).
    spans, positions, marked = supervised("phi-2", conversation("Be brief."))
    assert spans == [
        " Paris.<|endoftext|>",
        " Rome is the capital of Italy.<|endoftext|>",
        " R-O-M-E<|endoftext|>",
    ]
    assert positions == marked


# -- fastllm families: exact formats -------------------------------------------------------------
def compiled(family: str, tokenizer: Any = None) -> str:
    from cardtune.chat import compile_template
    from cardtune.registry import get_registry

    return compile_template(get_registry().families[family].chat.declarative, tokenizer)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "chinese-alpaca-2",
            "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n"
            "What is the capital of France? [/INST] Paris.</s><s>[INST] And of Italy? [/INST]",
        ),
        (
            "yulan-chat",
            "The following is a conversation between a human and an AI assistant namely YuLan, developed by "
            "GSAI, Renmin University of China. The AI assistant gives helpful, detailed, and polite answers to "
            "the user's questions.\n[|Human|]:What is the capital of France?\n[|AI|]:Paris.</s>\n"
            "[|Human|]:And of Italy?\n[|AI|]:",
        ),
        (
            "wizardcoder-python",
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nWhat is the capital of France?\n\n### Response:Paris.</s>\n"
            "### Instruction:\nAnd of Italy?\n\n### Response:",
        ),
        (
            "billa",
            "Human: What is the capital of France?\nAssistant: Paris.</s>\nHuman: And of Italy?\nAssistant: ",
        ),
    ],
)
def test_fastllm_family_formats(vicuna: Any, family: str, expected: str) -> None:
    messages = [*conversation(turns=1), {"role": "user", "content": "And of Italy?"}]
    text = vicuna.apply_chat_template(
        messages, chat_template=compiled(family), tokenize=False, add_generation_prompt=True
    )
    assert text == expected


def test_inline_system_given(vicuna: Any) -> None:
    text = vicuna.apply_chat_template(
        conversation("Be brief.", turns=1), chat_template=compiled("chinese-alpaca-2"), tokenize=False
    )
    assert (
        text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST] Paris.</s>"
    )


def test_families_writing_token_ids_need_the_tokenizer() -> None:
    from cardtune.registry import get_registry

    families = get_registry().families
    assert families["internlm-chat"].chat.declarative.token_literal_ids == [103028]
    assert families["xverse-chat"].chat.declarative.token_literal_ids == [3]
    with pytest.raises(ValueError) as info:
        compiled("internlm-chat")
    assert (
        str(info.value) == "'{token:103028}' writes token ids ({token:N}): compiling it needs the tokenizer"
    )


def test_separator_bos_and_a_default_system_that_is_not_emitted(vicuna: Any) -> None:
    from cardtune.chat import compile_template
    from cardtune.registry.schema import DeclarativeTemplate

    decl = DeclarativeTemplate(
        bos=True,
        system={"prefix": "S:", "default": "documented only", "emit_default": False},
        user={"prefix": "U:"},
        assistant={"prefix": "A:"},
        end_of_turn="</s>",
        separator="\n\n",
    )
    template = compile_template(decl)
    messages = [*conversation(turns=1), {"role": "user", "content": "And of Italy?"}]
    assert vicuna.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=True
    ) == ("<s>U:What is the capital of France?\n\nA:Paris.</s>\n\nU:And of Italy?\n\nA:")
    assert vicuna.apply_chat_template(
        conversation("Hi.", turns=1), chat_template=template, tokenize=False
    ) == ("<s>S:Hi.\n\nU:What is the capital of France?\n\nA:Paris.</s>")


# -- {token:N} literal ids ----------------------------------------------------------------------
def test_token_literals_resolve_to_exact_ids() -> None:
    from cardtune.chat import compile_template
    from cardtune.registry import CardError
    from cardtune.registry.schema import DeclarativeTemplate

    vicuna = load("vicuna-7b-v1.5")[1].load_tokenizer()  # its own: it gains a special token
    before = len(vicuna)
    # 1799 is "SS", a regular piece whose string is its text (like InternLM's <eoa>): registered
    # at its own id, it tokenizes to that id even where the text alone would merge differently.
    decl = DeclarativeTemplate(
        user={"prefix": "Q{token:1799}:"}, assistant={"prefix": "A:"}, end_of_turn="{token:2}"
    )
    template = compile_template(decl, vicuna)
    text = vicuna.apply_chat_template(conversation(turns=1), chat_template=template, tokenize=False)
    assert text == "QSS:What is the capital of France?A:Paris.</s>"
    ids = vicuna(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [660, 1799, 29901] and ids[-1] == 2
    assert vicuna.added_tokens_decoder[1799].special
    assert len(vicuna) == before and vicuna.decode([1799]) == "SS"  # no new id, same decoding
    # 13 is the byte token <0x0A>: its string is not its text, so it cannot be written by id.
    with pytest.raises(CardError) as info:
        compile_template(DeclarativeTemplate(user={"suffix": "{token:13}"}, end_of_turn="</s>"), vicuna)
    assert str(info.value) == (
        "{token:13} is '<0x0A>', a regular token that decodes to '\\n': a template writes text, "
        "so write the text instead"
    )


def test_token_literal_out_of_range(vicuna: Any) -> None:
    from cardtune.chat import resolve_token_literals
    from cardtune.registry import CardError

    with pytest.raises(CardError) as info:
        resolve_token_literals("x{token:32000}", vicuna)
    assert str(info.value) == "{token:32000}: no such id (the tokenizer has 32000 tokens)"


def test_jinja_special_characters_stay_literal(vicuna: Any) -> None:
    from cardtune.chat import compile_template
    from cardtune.registry.schema import DeclarativeTemplate

    odd = "{{ x }} {% raw %} 'q' \"dq\" \\n \\ é 🦙\t"
    decl = DeclarativeTemplate(user={"prefix": odd, "suffix": "\n"}, end_of_turn="</s>")
    text = vicuna.apply_chat_template(
        conversation(turns=1), chat_template=compile_template(decl), tokenize=False
    )
    assert text == f"{odd}What is the capital of France?\nParis.</s>"


# -- the plain template --------------------------------------------------------------------------
def test_plain_template(vicuna: Any) -> None:
    from cardtune.chat import plain_template

    template = plain_template("<image>", "</s>")
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ]
    assert (
        vicuna.apply_chat_template(messages, chat_template=template, tokenize=False)
        == "<image>A red square.</s>"
    )
    strings = [
        {"role": "user", "content": "<image>\n<image>\nCompare."},
        {"role": "assistant", "content": "Two squares."},
    ]
    assert (
        vicuna.apply_chat_template(strings, chat_template=template, tokenize=False)
        == "<image><image>Two squares.</s>"
    )
    marked = vicuna.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    supervised_ids = [t for t, m in zip(marked["input_ids"], marked["assistant_masks"], strict=True) if m]
    assert vicuna.decode(supervised_ids) == "A red square.</s>"
    with pytest.raises(TemplateError):
        vicuna.apply_chat_template(
            [{"role": "user", "content": [{"type": "video"}]}], chat_template=template, tokenize=False
        )


def test_plain_template_from_the_card() -> None:
    from cardtune.chat import card_chat_template, plain_template
    from cardtune.registry import get_registry

    card, loader = load("llava-1.5-7b")
    tok = loader.load_tokenizer()
    assert card_chat_template(card, tok, template="plain") == plain_template("<image>", "</s>")
    with pytest.raises(Exception) as info:
        card_chat_template(get_registry().families["vicuna-v1.5"], tok, template="plain")
    assert str(info.value) == "family vicuna-v1.5: the plain template needs media.image_token in the card"


# -- schema --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("chat", "message"),
    [
        ({"template": "declarative"}, "template: declarative needs a 'declarative' block"),
        (
            {"declarative": {"end_of_turn": "</s>"}},
            "'declarative' is only read when template: declarative",
        ),
        (
            {"template": "declarative", "declarative": {"end_of_turn": "</s>"}, "end_of_turn": "</s>"},
            "template: declarative writes its own end of turn (declarative.end_of_turn); remove 'end_of_turn'",
        ),
        (
            {"template": "declarative", "declarative": {"end_of_turn": "</s>", "user": {"prefix": "{n}"}}},
            "user.prefix: '{n}' and '{path}' are only read in 'image' and 'video'",
        ),
        (
            {"template": "declarative", "declarative": {"end_of_turn": ""}},
            "String should have at least 1 character",
        ),
    ],
)
def test_schema_refuses(chat: dict[str, Any], message: str) -> None:
    from cardtune.registry.schema import ChatSpec

    with pytest.raises(ValidationError) as info:
        ChatSpec(**chat)
    assert message in str(info.value)


@pytest.mark.parametrize("model_id", ["llava-1.5-7b", "qwen2.5-vl-3b-instruct"])
def test_template_plain_reaches_the_encoder(model_id: str) -> None:
    """``--template plain`` (training) wins over the folder's template, whether the processor is
    built (llava) or not (qwen2.5-vl without torchvision: the tokenizer renders)."""
    from PIL import Image

    from cardtune.collators.engine import IGNORE_INDEX, ChatEncoder
    from cardtune.conversation import Media, Sample
    from cardtune.loaders.resolve import resolve_model
    from cardtune.train import card_with_template

    resolved = resolve_model(model_id, require_fixture(model_id))
    card = card_with_template(resolved.card, "plain")
    loader = type(resolved.loader())(card, resolved.path)
    enc = ChatEncoder(card, loader.load_processing())
    sample = Sample("cap", [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
    ])
    image_token, eos = card.media.image_token, enc.tokenizer.eos_token
    assert enc.render(sample) == f"{image_token}A red square.{eos}"
    e = enc.encode(sample, Media(images=[Image.new("RGB", (56, 56), (200, 20, 20))]))
    tok = enc.tokenizer
    supervised = [t for t, lab in zip(e.input_ids, e.labels, strict=True) if lab != IGNORE_INDEX]
    assert supervised == tok("A red square.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    image_id = tok.convert_tokens_to_ids(image_token)
    first_text = next(i for i, t in enumerate(e.input_ids) if t != image_id and t != tok.bos_token_id)
    assert e.input_ids.count(image_id) > 1  # expanded
    assert e.labels[first_text:] == e.input_ids[first_text:]  # caption + eos, nothing else
