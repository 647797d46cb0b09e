"""Preference records: a conversation whose last assistant turn has a chosen and a rejected answer.

Two forms are read, each from JSON, JSONL or any ``datasets`` source, as supervised records are:

- TRL's conversational form: ``{"prompt": [messages], "chosen": [{"role": "assistant",
  "content": ...}], "rejected": [...], "images"?: [...]}``; ``chosen``/``rejected`` may also be
  the answer's text alone, and ``prompt`` a string (one user turn). The messages are OpenAI's
  (:func:`~cardtune.data.formats.openai_record`): string or parts content, media parts, reasoning.
- LLaVA's: ``{"conversations": [turns up to the last human one], "chosen": ..., "rejected": ...,
  "image"/"images"?: ...}``, each answer a text, a ``{"from", "value"}`` turn or a one-turn list.
- TRL's implicit-prompt form: ``chosen`` and ``rejected`` whole conversations sharing every turn
  but the last (``trl-lib/ultrafeedback_binarized``; UltraFeedback's ``prompt`` text beside them
  is checked to be the shared turn).

Each becomes one :class:`~cardtune.conversation.Sample`: the conversation ending with the chosen
answer, which holds the rejected one (:data:`~cardtune.conversation.REJECTED`). What makes a pair
untrainable (empty answers, the same answer twice, an answer with media) is reported by
:func:`check_pair` with the record's id, as every other problem of a sample.
"""

from __future__ import annotations

from typing import Any

from cardtune.conversation import REJECTED, Sample, is_preference, preference_sides
from cardtune.data.record_values import check_sample_values, shown
from cardtune.errors import SampleError

KEYS = ("chosen", "rejected")


def is_preference_record(record: dict[str, Any]) -> bool:
    return any(key in record for key in KEYS)


def preference_record(record: dict[str, Any], sample_id: str, source: str, opts: Any) -> Sample:
    """One preference record of either form as a preference sample; ``bad_format`` otherwise."""
    from cardtune.data.formats import llava_record, openai_record

    missing = [key for key in KEYS if record.get(key) is None]
    if missing:
        what = "is null" if missing[0] in record else "is missing"
        raise SampleError(sample_id, missing[0], "bad_format",
                          f"a preference record has both 'chosen' and 'rejected'; its {missing[0]!r} {what}", source)
    if "prompt" in record and "conversations" in record:
        raise SampleError(sample_id, "record", "bad_format", "holds both 'prompt' (TRL) and 'conversations' (LLaVA) as "
                          "the prompt, and only one would be read: keep one", source)
    record = _split_shared_prefix(record, sample_id, source)
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list):
            raise SampleError(sample_id, "prompt", "bad_format",
                              f"'prompt' is a list of messages (or a user's text), got {type(prompt).__name__}: "
                              f"{shown(prompt)}", source)
        media = {k: record[k] for k in ("image", "images", "video", "videos") if k in record}
        sides = _both_sides(lambda key: openai_record(
            {"messages": [*prompt, _trl_answer(record[key], key, sample_id, source)], **media}, sample_id, source, opts))
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise SampleError(sample_id, "conversations", "bad_format", "'conversations' is not a list", source)
        sides = _both_sides(lambda key: llava_record(
            {**record, "conversations": [*turns, _llava_answer(record[key], key, opts, sample_id, source)]},
            sample_id, source, opts))
    else:
        raise SampleError(sample_id, "record", "bad_format", "a preference record holds its prompt under 'prompt' "
                          "(TRL: messages) or 'conversations' (LLaVA: turns up to the last human one)", source)
    chosen, rejected = sides
    *prompt_messages, answer = chosen.messages
    return Sample(sample_id, [*prompt_messages, {**answer, REJECTED: rejected.messages[-1]}], chosen.images,
                  chosen.videos, source)


def _both_sides(read: Any) -> list[Sample]:
    """The chosen and the rejected conversation, each read by ``read(key)`` and its values checked
    (:func:`~cardtune.data.record_values.check_sample_values`). A problem in the
    rejected answer names its field as :func:`check_pair` does (``messages[N].rejected...``): both
    conversations are read into the same message positions, and the prompt's are the chosen's."""
    chosen = read("chosen")
    check_sample_values(chosen)
    last = f"messages[{len(chosen.messages) - 1}]"
    try:
        rejected = read("rejected")
        check_sample_values(rejected)
    except SampleError as err:
        if err.field.startswith(last):
            err = SampleError(err.sample_id, f"{last}.{REJECTED}{err.field[len(last):]}", err.reason,
                              err.detail.replace("assistant turn text", "the rejected answer's text", 1), err.source)
        raise err from None
    return [chosen, rejected]


def _is_turn_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(m, dict) for m in value)


def _split_shared_prefix(record: dict[str, Any], sample_id: str, source: str) -> dict[str, Any]:
    """TRL's implicit-prompt form: ``chosen`` and ``rejected`` are whole conversations (OpenAI
    messages, or LLaVA's ``from``/``value`` turns) that share every message up to the answers.
    The shared messages become the prompt (``prompt``, or ``conversations`` for LLaVA turns) and
    each side's last message its answer, as TRL's ``extract_prompt`` reads them. A ``prompt`` given
    beside them (UltraFeedback writes the user's text there too) must be those shared messages.
    Sides that differ before their last message are not a pair of answers to one prompt:
    ``bad_format``, naming where they part."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not (_is_turn_list(chosen) and _is_turn_list(rejected)):
        return record
    llava = all("from" in m and "role" not in m for m in (*chosen, *rejected))
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    shared = min(shared, len(chosen) - 1, len(rejected) - 1)
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if len(side) - shared > 1:
            raise SampleError(sample_id, f"{key}[{shared}]", "bad_format",
                              f"'chosen' and 'rejected' are whole conversations that part at message {shared}, "
                              f"{len(side) - shared} messages before the end of '{key}': a pair is one prompt and two "
                              "final answers (give the shared turns under 'prompt', each answer alone)", source)
    prefix = chosen[:shared]
    if "prompt" in record:
        given = record["prompt"]
        given = [{"role": "user", "content": given}] if isinstance(given, str) else given
        spoken = [(m.get("role"), m.get("content")) for m in prefix]
        if llava or not isinstance(given, list) or spoken != [
                (m.get("role"), m.get("content")) if isinstance(m, dict) else m for m in given]:
            raise SampleError(sample_id, "prompt", "bad_format",
                              f"'chosen' and 'rejected' are whole conversations, and the {shared} message(s) they "
                              "share before their answers are not 'prompt': give the prompt once (under 'prompt', each answer alone) "
                              "or leave 'prompt' out", source)
    rest = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    if llava:
        return {**rest, "conversations": prefix, "chosen": chosen[-1], "rejected": rejected[-1]}
    return {**rest, "prompt": prefix, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


def _trl_answer(value: Any, key: str, sample_id: str, source: str) -> dict[str, Any]:
    """TRL's answer: one assistant message in a list, the message itself, or its text."""
    if isinstance(value, list):
        if len(value) != 1:
            raise SampleError(sample_id, key, "bad_format",
                              f"'{key}' is one assistant message (the prompt goes under 'prompt'), got {len(value)} "
                              "messages", source)
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise SampleError(sample_id, f"{key}[0].role", "bad_format",
                              f"'{key}' is an assistant message, got role {shown(value.get('role'))}", source)
        return {**value, "role": "assistant"}
    return {"role": "assistant", "content": value}


def _llava_answer(value: Any, key: str, opts: Any, sample_id: str, source: str) -> dict[str, Any]:
    """LLaVA's answer: its text, a ``{"from", "value"}`` turn or a list of that one turn."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if "value" not in value:
            raise SampleError(sample_id, key, "bad_format", f"'{key}' is a turn with 'from' and 'value', or its text",
                              source)
        return {**value, "from": value.get("from", opts.assistant_key)}
    if isinstance(value, list):
        raise SampleError(sample_id, key, "bad_format", f"'{key}' is one answer, got {len(value)} turns", source)
    return {"from": opts.assistant_key, "value": value}


def check_pair(sample: Sample) -> list[SampleError]:
    """What makes a preference pair untrainable beyond its conversation's structure (which
    :func:`~cardtune.data.validate.check_structure` checks with the chosen answer last): a
    rejected answer that is not an assistant's text (empty, not a string), an answer holding
    media, or the same answer twice (nothing to prefer)."""
    if not is_preference(sample):
        return []
    errs: list[SampleError] = []
    at = len(sample.messages) - 1
    chosen, rejected = (side.messages[-1] for side in preference_sides(sample))

    def err(field: str, reason: str, detail: str) -> None:
        errs.append(SampleError(sample.id, f"messages[{at}]{field}", reason, detail, sample.source))

    for key, message, field in (("chosen", chosen, ""), ("rejected", rejected, f".{REJECTED}")):
        content = message.get("content")
        parts = [] if isinstance(content, str) else list(content or [])
        if any(isinstance(p, dict) and p.get("type") in ("image", "video") for p in parts):
            err(f"{field}.content", "bad_format", f"the {key} answer holds media; media go in the prompt")
    if rejected.get("role") != "assistant":
        err(f".{REJECTED}.role", "bad_format", f"the rejected answer is an assistant's, got role {shown(rejected.get('role'))}")
    content = rejected.get("content")
    texts = [content] if isinstance(content, str) else [p.get("text") for p in content or [] if p.get("type") == "text"]
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        err(f".{REJECTED}.content", "non_string_turn", f"the rejected answer's text is {type(bad[0]).__name__}: "
            f"{shown(bad[0])}")
    elif not "".join(texts).strip():
        err(f".{REJECTED}.content", "empty_answer", "the rejected answer is empty")
    elif not errs and _same(chosen, rejected):
        err(f".{REJECTED}", "same_answers", f"both answers are {str(_text_of(chosen))[:60]!r}")
    return errs


def _text_of(message: dict[str, Any]) -> Any:
    """A message's text (its text parts joined), or its parts as they are where one is not text."""
    content = message.get("content")
    texts = [content] if isinstance(content, str) else [p.get("text") for p in content or [] if p.get("type") == "text"]
    return "".join(texts) if all(isinstance(t, str) for t in texts) else texts


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _text_of(a) == _text_of(b) and (a.get("reasoning_content") or "") == (b.get("reasoning_content") or "")
