"""The data's own text, not a trimmed copy: whitespace and merged boundaries, exactly.

Answers with leading/trailing spaces, tabs and newlines, answers starting with ``[``, ``<`` or
``\\n``, and user texts ending with spaces or newlines, on eight templates. The expected ids and
labels come from the independent reference of ``test_labels_golden`` (the model's own template,
sentinel renders, the boundary rule): the text is kept as written and changed only where the
template itself trims (llama-2 ``.strip()``, ``|trim`` of mistral v0.3, llama-3 and gemma);
a token where the header and the answer's first characters merge (ChatML ``assistant\\n`` +
``\\n`` -> ``\\n\\n``, mistral v0.2 ``[/INST]`` + ``[`` -> ``][``) is supervised, being the first
token the model must emit. Then the engine (``ChatEncoder.encode``) must give exactly those ids
and labels, and the data loader must hand the engine the text as the file holds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_labels_golden import (
    FAMILIES,
    assert_same_encoding,
    build_encoder,
    cached_per_module,
    load_reference,
    reference_of,
)

GROUP_ITEMS_BY = "model_id"  # run this module's tests model by model (tests/conftest.py)

MODELS = ["qwen2.5-7b-instruct", "mistral-7b-instruct-v0.2", "mistral-7b-instruct-v0.3", "llama-2-7b-chat",
          "llava-1.5-7b", "llama-3-8b-instruct", "gemma-2-2b-it", "deepseek-coder-6.7b-instruct"]


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _answer(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _turns(*texts: str) -> list[dict[str, Any]]:
    return [_user(t) if i % 2 == 0 else _answer(t) for i, t in enumerate(texts)]


CASES: dict[str, list[dict[str, Any]]] = {
    "leading_spaces": _turns("Say yes.", "  Sure."),
    "trailing_spaces": _turns("Finish.", "Done.   "),
    "leading_tab": _turns("Indent it.", "\tTabbed"),
    "leading_newline_code": _turns("Code?", "\n```python\nprint(1)\n```"),
    "leading_newline_list": _turns("List two.", "\n- one\n- two"),
    "trailing_newline": _turns("Answer me.", "Answer.\n"),
    "newlines_and_spaces_around": _turns("Pad it.", " \n padded \n "),
    "starts_with_bracket": _turns("A list?", "[1, 2, 3] is a list."),
    "starts_with_angle": _turns("Some HTML?", "<b>bold</b> text"),
    "user_trailing_spaces": _turns("Question?   ", "Fine."),
    "user_trailing_newlines": _turns("Question?\n\n", "Fine."),
    "user_leading_newline": _turns("\nQuestion?", "Fine."),
    "two_turns_mixed": _turns("First?", "\n- a\n- b", "Second?  ", "  [x] done\t"),
}


def _params() -> list[Any]:
    return [pytest.param(m, case, id=f"{m}/{case}") for m in MODELS for case in CASES]


references = cached_per_module(load_reference)
encoders = cached_per_module(build_encoder)


@pytest.mark.parametrize("model_id", MODELS)
def test_reference_keeps_the_text_as_the_template_writes_it(references, model_id):
    """The reference itself: what it supervises is the answer as the template writes it."""
    fam = FAMILIES[model_id]
    ref = references(model_id)
    for case, messages in CASES.items():
        want = reference_of(ref, messages, [], where=f"{model_id}/{case}")
        answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
        for text, answer in zip(want["texts"], answers, strict=True):
            assert text.endswith(fam.form(answer) + fam.eot), (case, text)


def test_merged_boundaries_are_supervised(references):
    """The boundary rule, spelled out on the three merges the brief names."""
    qwen = reference_of(references("qwen2.5-7b-instruct"), CASES["leading_newline_list"], [], where="qwen")
    assert qwen["supervised"] == ["\n\n- one\n- two<|im_end|>"]  # "assistant\n" + "\n-" -> "\n\n"
    mistral = references("mistral-7b-instruct-v0.2")
    bracket = reference_of(mistral, CASES["starts_with_bracket"], [], where="mistral-[")
    angle = reference_of(mistral, CASES["starts_with_angle"], [], where="mistral-<")
    assert bracket["supervised"] == ["][1, 2, 3] is a list.</s>"]  # "[/INST]" + "[" -> "]["
    assert angle["supervised"] == ["]<b>bold</b> text</s>"]  # "[/INST]" + "<" -> "]<"
    tok = mistral.tokenizer
    first = [next(i for i, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != -100) for r in (bracket, angle)]
    assert tok.convert_ids_to_tokens(first) == ["][", "]<"]


@pytest.mark.parametrize("model_id,case", _params())
def test_engine_gives_the_reference_ids(references, encoders, model_id, case):
    from cardtune.conversation import Sample

    want = reference_of(references(model_id), CASES[case], [], where=f"{model_id}/{case}")
    enc = encoders(model_id)
    got = enc.encode(Sample(f"{model_id}/{case}", CASES[case]))
    assert_same_encoding(enc.tokenizer, got, want, f"{model_id}/{case}")


# -- the data loader keeps the text as the file holds it ------------------------------------------

ANSWERS = ["  Sure.", "Done.   ", "\tTabbed", "\n- one\n- two", "Answer.\n", "[1] x", "<b>y</b>"]
QUESTIONS = ["Say yes.  ", "Finish.\n", "\nIndent it.", "List two.", "Answer me.\t", "A list?", "HTML?"]


def _assert_texts_as_written(sample: Any, questions: list[str], answers: list[str]) -> None:
    texts = [(m["role"], "".join(p["text"] for p in m["content"] if p["type"] == "text")) for m in sample.messages]
    want = [r for q, a in zip(questions, answers, strict=True) for r in (("user", q), ("assistant", a))]
    assert texts == want, texts


def test_llava_json_texts_reach_the_sample_as_written(tmp_path: Path):
    from cardtune.data.formats import load_samples

    conversations = [t for q, a in zip(QUESTIONS, ANSWERS, strict=True)
                     for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    # an image placeholder's own line ("<image>\n") is the format's, not the text's
    image_record = {"id": "img", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\n  What colour?\n"}, {"from": "gpt", "value": " Red. "}]}
    (tmp_path / "d.json").write_text(json.dumps([{"id": "ws", "conversations": conversations}, image_record]))
    samples = list(load_samples(str(tmp_path / "d.json")))
    _assert_texts_as_written(samples[0], QUESTIONS, ANSWERS)
    assert samples[1].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "  What colour?\n"}]
    assert samples[1].messages[1]["content"] == [{"type": "text", "text": " Red. "}]


def test_messages_jsonl_texts_reach_the_sample_as_written(tmp_path: Path):
    from cardtune.data.formats import load_samples

    string_content = [m for q, a in zip(QUESTIONS, ANSWERS, strict=True)
                      for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    parts_content = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in string_content]
    lines = [json.dumps({"id": "str", "messages": string_content}), json.dumps({"id": "parts", "messages": parts_content})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    for sample in load_samples(str(tmp_path / "d.jsonl")):
        _assert_texts_as_written(sample, QUESTIONS, ANSWERS)
