"""Reasoning models: an assistant turn's ``reasoning_content``, rendered by a Qwen3-style template.

The public Qwen3 chat template (below, verbatim) is installed on the qwen2.5-7b-instruct fixture
tokenizer, whose ChatML tokens are the same (``<think>``/``</think>`` are plain text there; in
Qwen3 they are added, non-special tokens: the labels are on the same characters). That template
writes ``<think>\\n`` + reasoning + ``\\n</think>\\n\\n`` before an answer, only for the assistant turns
after the last user query, and writes an EMPTY ``<think>\\n\\n</think>\\n\\n`` before the last
answer when it has no reasoning; a reasoning it does not render (an earlier turn's) is dropped.

The contract, encoded by the independent reference here (the golden reference's machinery:
sentinel renders and the boundary rule):

- a turn whose reasoning the template renders: the think block + answer + ``<|im_end|>`` is
  supervised, exactly as the template writes it, from the end of the generation prompt on (what
  the model writes itself when it reasons). This release's generation prompt opens
  ``<think>\\n``, so that opener is not trained; the qwen3-4b folder's (the April 2025 release,
  reading ``enable_thinking``) ends with ``assistant\\n``, so there ``<think>\\n`` is;
- the empty think block the template inserts is NOT supervised (masked like the header), so a
  turn's supervised text is the same whether it is first or last;
- a reasoning the template drops is not supervised: only that turn's answer, as rendered.

Data files may call the field ``reasoning_content``, ``reasoning`` or ``thinking``; a Sample
carries it as ``reasoning_content`` on the assistant message.

The real qwen3-4b folder (its own template: the same messages loop, string content only) has
its reasoning cases frozen in ``golden/qwen3-4b.json`` by the golden reference, and the engine
checked against them in ``test_labels_golden``; the last tests here say, as text, that they
train what this contract says, on the same conversations. (gpt-oss's harmony reasoning:
``test_harmony``.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import require_fixture
from test_labels_golden import (
    ANY_SENTINEL,
    FAMILIES,
    IGNORE,
    SENTINEL,
    TEXT_SENTINEL,
    Region,
    assert_same_encoding,
    conversation,
    load_golden,
    supervise,
)

FOLDER = "qwen2.5-7b-instruct"
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
THINK_SENTINEL = "QZXTHINK{}QZX"
EOT = "<|im_end|>"

# The chat template of Qwen3 as published on the hub, copied verbatim from the
# tokenizer_config.json reproduced in akougkas/warpio-cli,
# warpio-docs/ai-docs/model_cards/qwen3:4b.md @ 8dde6d21c14ca1c2167e7f8c86370e54fdbbc537 (the
# "chat_template" value, JSON-decoded). Its messages loop (last_query_index, reasoning_content,
# the think block only after the last query, an empty one before the last answer) is the one of
# Qwen/Qwen3-8B's tokenizer_config.json (huggingface.co/Qwen/Qwen3-8B/blob/895c8d17.../
# tokenizer_config.json, as tyler-griggs/SkyRL skyrl-train/skyrl_train/utils/templates/README.md
# quotes it); only its generation prompt (never rendered for training) differs: this release opens
# '<think>\n', the April 2025 one reads enable_thinking.
QWEN3_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}'''


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}]}


def _answer(text: str, reasoning: str | None = None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


CASES: dict[str, list[dict[str, Any]]] = {
    "two_turns_no_reasoning": [
        _user("Capital of France?"), _answer("Paris."), _user("And of Italy?"), _answer("Rome."),
    ],
    "two_turns_reasoning_on_last": [
        _user("Capital of France?"), _answer("Paris."),
        _user("And of Italy?"), _answer("Rome.", "Italy's capital is Rome; say so."),
    ],
    "two_turns_reasoning_on_both": [
        _user("Capital of France?"), _answer("Paris.", "France: Paris."),
        _user("And of Italy?"), _answer("Rome.", "Italy's capital is Rome; say so."),
    ],
    "one_turn_reasoning": [
        _user("What is 17 * 3?"), _answer("51.", "17 * 3 = 51.\nCheck: 51 / 3 = 17."),
    ],
}

# What the reference must supervise, written out by hand from the template text above.
EXPECTED = {
    "two_turns_no_reasoning": ["Paris.<|im_end|>", "Rome.<|im_end|>"],
    "two_turns_reasoning_on_last": ["Paris.<|im_end|>", "Italy's capital is Rome; say so.\n</think>\n\nRome.<|im_end|>"],
    # the first turn's reasoning comes before the last user query: the template drops it
    "two_turns_reasoning_on_both": ["Paris.<|im_end|>", "Italy's capital is Rome; say so.\n</think>\n\nRome.<|im_end|>"],
    # (the generation prompt of this release holds <think>\n: the model never writes it)
    "one_turn_reasoning": ["17 * 3 = 51.\nCheck: 51 / 3 = 17.\n</think>\n\n51.<|im_end|>"],
}


def _as_template_reads(messages: list[dict[str, Any]], answers: list[str], reasonings: list[str | None],
                       others: list[str] | None = None) -> list[dict[str, Any]]:
    """String content (the template renders a list of parts as ''), reasoning_content kept;
    ``answers``/``reasonings`` (and ``others``) in place of the texts."""
    a, r, o = iter(answers), iter(reasonings), iter(others) if others is not None else None
    out = []
    for m in messages:
        text = "".join(p["text"] for p in m["content"] if p["type"] == "text")
        if m["role"] == "assistant":
            msg: dict[str, Any] = {"role": "assistant", "content": next(a)}
            reasoning = next(r)
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
            out.append(msg)
        else:
            out.append({"role": m["role"], "content": next(o) if o is not None else text})
    return out


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_fixture(FOLDER))


def reference(tok: Any, messages: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Render with the template three times (as is; with a sentinel per answer and reasoning;
    with one per every text too, for the headers), place each region, label by the boundary rule."""
    def render(ms: list[dict[str, Any]]) -> str:
        return tok.apply_chat_template(ms, tokenize=False, chat_template=QWEN3_TEMPLATE)

    answers = [m["content"][0]["text"] for m in messages if m["role"] == "assistant"]
    reasonings = [m.get("reasoning_content") for m in messages if m["role"] == "assistant"]
    a_marks = [SENTINEL.format(k) for k in range(len(answers))]
    r_marks = [THINK_SENTINEL.format(k) if r is not None else None for k, r in enumerate(reasonings)]
    n_other = sum(m["role"] != "assistant" for m in messages)
    rendered = render(_as_template_reads(messages, answers, reasonings))
    marked = render(_as_template_reads(messages, a_marks, r_marks))
    all_marked = render(_as_template_reads(messages, a_marks, r_marks, [TEXT_SENTINEL.format(k) for k in range(n_other)]))
    anchors = re.compile(ANY_SENTINEL.pattern + "|QZXTHINK\\d+QZX")

    regions, rebuilt, cursor = [], "", 0
    for k, (a_mark, r_mark) in enumerate(zip(a_marks, r_marks, strict=True)):
        at = marked.index(a_mark, cursor)
        thought = r_mark is not None and r_mark in marked
        if thought:  # the reasoning opens the region; <think>\n is the generation prompt's
            r_at = marked.index(r_mark, cursor)
            assert marked[r_at - len(THINK_OPEN) : r_at] == THINK_OPEN
            assert marked[r_at + len(r_mark) : at] == THINK_CLOSE
            rebuilt += marked[cursor:r_at]
            start = len(rebuilt)
            rebuilt += reasonings[k] + THINK_CLOSE
            h_at = all_marked.index(r_mark)
        else:
            rebuilt += marked[cursor:at]
            start = len(rebuilt)
            h_at = all_marked.index(a_mark)
        before = max((m.end() for m in anchors.finditer(all_marked, 0, h_at)), default=0)
        rebuilt += answers[k]
        regions.append(Region(start, len(rebuilt) + len(EOT), all_marked[before:h_at]))
        cursor = at + len(a_mark)
    rebuilt += marked[cursor:]
    assert rebuilt == rendered, f"{where}: the template writes the turns differently than assumed"
    out = supervise(tok, rendered, regions, add_bos=False, where=where)
    return {"rendered": rendered, **out}


@pytest.mark.parametrize("case", CASES)
def test_reference_supervises_the_think_block_as_rendered(tokenizer, case):
    got = reference(tokenizer, CASES[case], case)
    assert got["texts"] == EXPECTED[case]
    assert got["supervised"] == EXPECTED[case]
    if case == "two_turns_no_reasoning":  # the empty block before the last answer: rendered, masked
        assert got["rendered"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nRome.<|im_end|>\n")
    if case == "two_turns_reasoning_on_both":
        assert "France: Paris." not in got["rendered"]


def test_a_turn_supervises_the_same_text_first_or_last(tokenizer):
    """The empty think block is the template's (masked): "Paris." trains the same in both places."""
    last = reference(tokenizer, CASES["two_turns_no_reasoning"][:2], "last")
    first = reference(tokenizer, CASES["two_turns_no_reasoning"], "first")
    assert "<think>\n\n</think>\n\nParis." in last["rendered"]
    assert last["texts"] == first["texts"][:1] == ["Paris.<|im_end|>"]


_encoders: dict[str, Any] = {}


def qwen3_style_encoder() -> Any:
    """The engine on a card that installs the Qwen3 template (template: jinja) on the fixture."""
    if "qwen3" not in _encoders:
        from cardtune.collators.engine import ChatEncoder
        from cardtune.loaders import LOADERS
        from cardtune.registry import get_registry

        base = get_registry().get(FOLDER).family
        card = base.model_copy(update={"chat": base.chat.model_copy(update={"template": "jinja", "jinja": QWEN3_TEMPLATE})})
        processing = LOADERS[card.loader](card, require_fixture(FOLDER)).load_processing()
        _encoders["qwen3"] = ChatEncoder(card, processing)
    return _encoders["qwen3"]


@pytest.mark.parametrize("case", CASES)
def test_engine_gives_the_reference_ids(tokenizer, case):
    from cardtune.conversation import Sample

    want = reference(tokenizer, CASES[case], case)
    enc = qwen3_style_encoder()
    got = enc.encode(Sample(case, CASES[case]))
    assert_same_encoding(enc.tokenizer, got, want, case)


def test_reasoning_fields_of_a_messages_file_reach_the_sample(tmp_path: Path):
    from cardtune.data.formats import load_samples

    thought = "Italy's capital is Rome.\nSay so."
    records = [
        {"id": key, "messages": [{"role": "user", "content": "And of Italy?"},
                                 {"role": "assistant", "content": "Rome.", key: thought}]}
        for key in ("reasoning_content", "reasoning", "thinking")
    ]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = list(load_samples(str(tmp_path / "r.jsonl")))
    assert [s.id for s in samples] == ["reasoning_content", "reasoning", "thinking"]
    for s in samples:
        assistant = s.messages[1]
        assert assistant["role"] == "assistant" and assistant["content"] == [{"type": "text", "text": "Rome."}]
        assert assistant.get("reasoning_content") == thought, s.id


# -- the real Qwen3 folder (golden/qwen3-4b.json) ---------------------------------------------

# golden case of qwen3-4b -> the conversation of CASES above it is
SAME_CONVERSATION = {
    "two_answers": "two_turns_no_reasoning",
    "reasoning_last_of_two": "two_turns_reasoning_on_last",
    "reasoning_two_answers": "two_turns_reasoning_on_both",
    "reasoning_one_answer": "one_turn_reasoning",
}
QWEN3_EXPECTED = {
    # the folder's generation prompt ends "assistant\n": the model writes <think>\n itself, trained
    **{case: [s if s.startswith("Paris.") or theirs == "two_turns_no_reasoning" else "<think>\n" + s
              for s in EXPECTED[theirs]] for case, theirs in SAME_CONVERSATION.items()},
    "single_turn": ["The capital of France is Paris.<|im_end|>"],  # the empty think block before it: masked
    "reasoning_first_only": ["Paris.<|im_end|>", "Rome.<|im_end|>"],  # dropped, and an empty block before Rome.
    "reasoning_three_answers": [
        "Paris.<|im_end|>", "Rome.<|im_end|>",
        "<think>\nCity proper: Rome about 2.8 million, Paris about 2.1 million.\nSo Rome.\n</think>\n\n"
        "Rome, with about 2.8 million to Paris's 2.1 million.<|im_end|>",
    ],
}


@pytest.mark.parametrize("case", QWEN3_EXPECTED)
def test_the_qwen3_folder_trains_what_the_contract_says(case):
    if case in SAME_CONVERSATION:
        assert conversation(case, FAMILIES["qwen3-4b"])[0] == CASES[SAME_CONVERSATION[case]]
    assert load_golden("qwen3-4b")["cases"][case]["supervised"] == QWEN3_EXPECTED[case]


def test_the_qwen3_folder_masks_its_empty_think_block():
    golden = load_golden("qwen3-4b")["cases"]
    two = golden["two_answers"]
    assert two["rendered"].endswith("<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
                                    "<|im_start|>assistant\n<think>\n\n</think>\n\nRome.<|im_end|>\n")
    think_open, think_close = 151667, 151668  # <think>, </think>: added tokens, not special
    for case, trained in (("two_answers", False), ("reasoning_first_only", False), ("reasoning_last_of_two", True)):
        ids, labels = golden[case]["input_ids"], golden[case]["labels"]
        at = [ids.index(think_open), ids.index(think_close)]
        assert [labels[i] != IGNORE for i in at] == [trained, trained], case
    assert "France: Paris." not in golden["reasoning_two_answers"]["rendered"]
