"""gpt-oss (harmony): what is trained, spelled out as text.

The ids are ``golden/gpt-oss-20b.json``, computed WITHOUT the engine by the reference of
``test_labels_golden`` (the folder's own template, its ``strftime_now("%Y-%m-%d")`` replaced by
the date the card renders; sentinel renders; the boundary rule), and ``test_labels_golden``
checks that the engine gives exactly them. Here the contract they encode is written out:

- every answer is trained through its own end: ``<|end|>`` for an earlier answer, ``<|return|>``
  for the last; the headers (``<|start|>assistant<|channel|>final<|message|>``) are not;
- the template renders reasoning (``thinking``; transformers fills it from ``reasoning_content``)
  for the LAST answer only, in the analysis channel. That answer is trained from right after the
  generation prompt ``<|start|>assistant`` (what the model writes itself when it reasons): the
  channel it opens, ``<|channel|>analysis<|message|>``, the reasoning, ``<|end|>``, the final
  header, the answer and ``<|return|>``; an earlier answer's reasoning is dropped by the template,
  so only that answer and its ``<|end|>`` are trained;
- the system block carries the card's fixed date, and the user's system prompt is a developer
  message (neither trained).
"""

from __future__ import annotations

import datetime
import functools
import json
from pathlib import Path
from typing import Any

import pytest
from test_labels_golden import (
    FAMILIES,
    HARMONY_DATE,
    IGNORE,
    build_encoder,
    cached_per_module,
    conversation,
    load_golden,
    load_reference,
)

MODEL = "gpt-oss-20b"
FINAL = "<|start|>assistant<|channel|>final<|message|>"
ANALYSIS = "<|start|>assistant<|channel|>analysis<|message|>"
OPENS = "<|channel|>analysis<|message|>"  # written by the model after the prompt <|start|>assistant

# The decoded supervised spans, by hand from the template text (chat_template.jinja).
EXPECTED = {
    # one answer
    "single_turn": ["The capital of France is Paris.<|return|>"],
    "reasoning_one_answer": [OPENS + "17 * 3 = 51.\nCheck: 51 / 3 = 17.<|end|>" + FINAL + "51.<|return|>"],
    # two answers
    "two_answers": ["Paris.<|end|>", "Rome.<|return|>"],
    "reasoning_last_of_two": ["Paris.<|end|>", OPENS + "Italy's capital is Rome; say so.<|end|>" + FINAL + "Rome.<|return|>"],
    "reasoning_two_answers": ["Paris.<|end|>", OPENS + "Italy's capital is Rome; say so.<|end|>" + FINAL + "Rome.<|return|>"],
    "reasoning_first_only": ["Paris.<|end|>", "Rome.<|return|>"],
    # three answers
    "system_3turns": ["Paris.<|end|>", "Rome.<|end|>", "Paris has more inhabitants than Rome.<|return|>"],
    "reasoning_three_answers": [
        "Paris.<|end|>", "Rome.<|end|>",
        OPENS + "City proper: Rome about 2.8 million, Paris about 2.1 million.\nSo Rome.<|end|>" + FINAL
        + "Rome, with about 2.8 million to Paris's 2.1 million.<|return|>",
    ],
}

SYSTEM_BLOCK = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
                "Knowledge cutoff: 2024-06\nCurrent date: 2024-07-26\n\nReasoning: medium\n\n"
                "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")


@functools.cache
def cases() -> dict[str, Any]:
    return load_golden(MODEL)["cases"]


encoders = cached_per_module(build_encoder)
references = cached_per_module(load_reference)


@pytest.mark.parametrize("case", EXPECTED)
def test_supervised_text(case):
    assert cases()[case]["supervised"] == EXPECTED[case]


def test_the_render_has_the_cards_date_and_the_system_prompt_as_developer_message():
    from cardtune.registry import get_registry

    assert get_registry().get(MODEL).family.chat.render_date == datetime.date.fromisoformat(HARMONY_DATE)
    three = cases()["system_3turns"]["rendered"]
    assert three.startswith(SYSTEM_BLOCK + "<|start|>developer<|message|># Instructions\n\nYou are a terse geography "
                            "tutor.\n\n<|end|><|start|>user<|message|>Capital of France?<|end|>" + FINAL + "Paris.<|end|>")
    assert three.endswith(FINAL + "Paris has more inhabitants than Rome.<|return|>")
    assert cases()["single_turn"]["rendered"] == (SYSTEM_BLOCK + "<|start|>user<|message|>What is the capital of "
                                                  "France?<|end|>" + FINAL + "The capital of France is Paris.<|return|>")


def test_the_last_answers_reasoning_is_in_the_analysis_channel_and_trained_after_the_prompt(references):
    one = cases()["reasoning_one_answer"]
    assert one["rendered"].endswith("<|start|>user<|message|>What is 17 * 3?<|end|>" + ANALYSIS
                                    + "17 * 3 = 51.\nCheck: 51 / 3 = 17.<|end|>" + FINAL + "51.<|return|>")
    ids, labels = one["input_ids"], one["labels"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    tok = references(MODEL).tokenizer
    # the generation prompt right before the first trained token (the channel the model opens),
    # masked with everything before it
    assert tok.convert_ids_to_tokens(ids[first - 3 : first + 3]) == [
        "<|end|>", "<|start|>", "assistant", "<|channel|>", "analysis", "<|message|>"]
    assert labels[:first] == [IGNORE] * first
    # one region, through <|return|>: the sequence's last token
    assert labels[first:] == ids[first:] and tok.convert_ids_to_tokens(ids[-1]) == "<|return|>"


def test_dropped_reasoning_is_neither_rendered_nor_trained():
    got = cases()
    assert "France: Paris." not in got["reasoning_two_answers"]["rendered"]
    assert "France: Paris." not in got["reasoning_first_only"]["rendered"]
    for dropped, same in (("reasoning_two_answers", "reasoning_last_of_two"), ("reasoning_first_only", "two_answers")):
        assert (got[dropped]["input_ids"], got[dropped]["labels"]) == (got[same]["input_ids"], got[same]["labels"])
    assert ANALYSIS not in got["two_answers"]["rendered"]


def test_thinking_and_reasoning_content_render_alike(references):
    """The template reads ``thinking``; transformers fills it from ``reasoning_content`` (which
    is why a Sample's ``reasoning_content`` reaches it)."""
    ref = references(MODEL)
    messages, _ = conversation("reasoning_three_answers", FAMILIES[MODEL])
    as_string = [{**m, "content": m["content"][0]["text"]} for m in messages]
    thinking = [{("thinking" if k == "reasoning_content" else k): v for k, v in m.items()} for m in as_string]
    assert ref.render(as_string) == ref.render(thinking) == cases()["reasoning_three_answers"]["rendered"]


@pytest.mark.parametrize("field", ["thinking", "reasoning_content"])
def test_a_messages_file_trains_the_golden(encoders, tmp_path: Path, field):
    """From a messages JSONL (reasoning under either name) through the engine: the golden ids."""
    from cardtune.data.formats import load_samples

    messages, _ = conversation("reasoning_three_answers", FAMILIES[MODEL])
    record = {"id": field, "messages": [
        {"role": m["role"], "content": m["content"][0]["text"],
         **({field: m["reasoning_content"]} if "reasoning_content" in m else {})} for m in messages]}
    (tmp_path / "h.jsonl").write_text(json.dumps(record) + "\n")
    (sample,) = load_samples(str(tmp_path / "h.jsonl"))
    got = encoders(MODEL).encode(sample)
    want = cases()["reasoning_three_answers"]
    assert (got.input_ids, got.labels) == (want["input_ids"], want["labels"])
    assert got.dropped_reasoning == 2  # the first two answers' reasoning: not rendered, not trained


def test_the_engine_counts_the_reasoning_the_template_drops(encoders):
    from cardtune.conversation import Sample

    for case, dropped in (("reasoning_one_answer", 0), ("reasoning_last_of_two", 0), ("reasoning_two_answers", 1),
                          ("reasoning_first_only", 1), ("two_answers", 0)):
        messages, _ = conversation(case, FAMILIES[MODEL])
        assert encoders(MODEL).encode(Sample(case, messages)).dropped_reasoning == dropped, case
