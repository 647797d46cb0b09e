"""Preference pairs through the one engine (issue 19), on every fixture family with a template.

For the golden cases of tests/test_labels_golden.py (their ids were computed without the engine),
a pair is the case's conversation as the chosen side and the same prompt with another final
answer as the rejected side. Checked per family, text cases and (for the VLMs) image cases:

- the chosen sequence is exactly the golden ids, labelled on the final answer only (the earlier
  answers of a multi-turn prompt are prompt);
- the prompt part, every token before the final answer, is the same ids on both sides;
- the rejected sequence is exactly what the engine gives that conversation on its own (its own
  processor call), ids, labels and media tensors, although the pair encodes the media once.

And a template whose prompt rendering depends on the answer is a ``prompt_mismatch``, never
trained; an answer merging with the prompt's last token is scored from the ids both sides share.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_labels_golden import (  # noqa: F401  (fixtures)
    FAMILIES,
    IMAGE_CASES,
    VLMS,
    _not_ready,
    conversation,
    encoders,
    golden,
    make_image,
    references,
)

IGNORE = -100
GROUP_ITEMS_BY = "model_id"  # model by model (tests/conftest.py)
REJECTED_ANSWER = "Not that one: a different answer, with more words."
PAIR_CASES = ["system_3turns", "cjk_emoji", "two_images", "system_one_image"]


def _params() -> list[Any]:
    out = []
    for model_id in FAMILIES:
        not_ready = _not_ready(model_id)
        for case in PAIR_CASES:
            if case in IMAGE_CASES and model_id not in VLMS:
                continue
            marks = [pytest.mark.skip(reason=not_ready)] if not_ready else []
            out.append(pytest.param(model_id, case, id=f"{model_id}/{case}", marks=marks))
    return out


def _pair(messages: list[dict[str, Any]], rejected: str, images: list[str], sample_id: str) -> Any:
    from cardtune.conversation import REJECTED, Sample

    *prompt, chosen = messages
    answer = {"role": "assistant", "content": [{"type": "text", "text": rejected}]}
    return Sample(sample_id, [*prompt, {**chosen, REJECTED: answer}], images=list(images))


def _final_only(labels: list[int]) -> list[int]:
    from cardtune.collators.pairs import trained_runs

    start = trained_runs(labels)[-1][0]
    return [IGNORE] * start + labels[start:]


@pytest.mark.parametrize("model_id,case", _params())
def test_pair_prompt_is_the_same_tokens_and_each_side_is_exact(encoders, golden, model_id, case):  # noqa: F811
    from cardtune.collators.pairs import PairEncoder
    from cardtune.conversation import Media, preference_sides

    encoder = encoders(model_id)
    messages, images = conversation(case, FAMILIES[model_id])
    sample = _pair(messages, REJECTED_ANSWER, images, f"{model_id}/{case}")
    media = Media(images=[make_image(n) for n in images])
    pair = PairEncoder(encoder).encode(sample, media)

    want = golden(model_id)[case]
    assert pair.chosen.input_ids == want["input_ids"]
    assert pair.chosen.labels == _final_only(want["labels"])
    start = pair.prompt_length
    assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
    assert all(label == IGNORE for label in pair.rejected.labels[:start] + pair.chosen.labels[:start])
    assert pair.chosen.labels[start] != IGNORE and pair.rejected.labels[start] != IGNORE

    alone = encoder.encode(preference_sides(sample)[1], Media(images=[make_image(n) for n in images]))
    assert pair.rejected.input_ids == alone.input_ids
    assert pair.rejected.labels == _final_only(alone.labels)
    trained = [t for t, label in zip(pair.rejected.input_ids, pair.rejected.labels, strict=True) if label != IGNORE]
    assert REJECTED_ANSWER.strip() in encoder.tokenizer.decode(trained)
    if images:
        assert pair.reused_media, f"{model_id}: the rejected side went through the processor again"
        assert sorted(pair.rejected.media_tensors) == sorted(alone.media_tensors)
        for key, tensor in alone.media_tensors.items():
            assert torch.equal(pair.rejected.media_tensors[key], tensor), key
        per_image = [k for k, t in pair.chosen.media_tensors.items() if t.dim() < 2 or t.shape[1] != len(pair.chosen)]
        assert all(pair.rejected.media_tensors[k] is pair.chosen.media_tensors[k] for k in per_image)


def test_a_template_whose_prompt_depends_on_the_answer_is_reported(encoders):  # noqa: F811
    """A template that writes the last answer's length into its system line renders the prompt
    differently on each side: the pair is ``prompt_mismatch``, naming the first token that differs."""
    from cardtune.collators.engine import ChatEncoder as Engine
    from cardtune.collators.pairs import PairEncoder
    from cardtune.errors import SampleError

    engine = encoders("qwen2.5-7b-instruct")
    template = ("{{ 'Answer of ' ~ (messages[-1]['content'] | length) ~ ' characters.\\n' }}"
                + engine.processing.tokenizer.chat_template)
    processing = engine.processing
    tokenizer = processing.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        leaky = Engine(engine.card, processing)
        messages, _ = conversation("single_turn", FAMILIES["qwen2.5-7b-instruct"])
        with pytest.raises(SampleError) as found:
            PairEncoder(leaky).encode(_pair(messages, "No.", [], "leaky"))
    finally:
        tokenizer.chat_template = saved
    assert found.value.reason == "prompt_mismatch" and "at token 4 (" in found.value.detail, found.value  # 31 vs 3


def test_an_answer_merging_with_the_header_is_scored_from_the_shared_ids(encoders):  # noqa: F811
    """ChatML's header ends ``assistant\n``: an answer starting with a newline merges with it into
    one token ``\n\n``, so the sequences part one token before the rejected answer. Both answers
    are scored from the ids they share: the chosen's merged token, the rejected's header newline
    and answer (as supervised labels train the merged token with its answer)."""
    from cardtune.collators.engine import IGNORE_INDEX
    from cardtune.collators.pairs import PairEncoder

    encoder = encoders("qwen2.5-7b-instruct")
    tokenizer = encoder.processing.tokenizer
    messages, _ = conversation("single_turn", FAMILIES["qwen2.5-7b-instruct"])
    prompt = messages[:-1]
    for chosen, rejected in (("\nYes.", "No."), ("Yes.", "\nNo.")):
        pair = PairEncoder(encoder).encode(_pair([*prompt, {"role": "assistant", "content": chosen}], rejected, [],
                                                 "merged"))
        start = pair.prompt_length
        assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
        assert tokenizer.decode(pair.chosen.input_ids[:start]).endswith("<|im_start|>assistant")
        for side, answer in ((pair.chosen, chosen), (pair.rejected, rejected)):
            assert side.labels[:start] == [IGNORE_INDEX] * start
            trained = [t for t in side.labels if t != IGNORE_INDEX]
            assert trained == side.input_ids[start:start + len(trained)]
            assert tokenizer.decode(trained) == "\n" + answer + "<|im_end|>"
        merged = pair.chosen if chosen.startswith("\n") else pair.rejected
        assert tokenizer.convert_ids_to_tokens(merged.input_ids[start]) == "ĊĊ"


def test_a_final_answer_cut_away_is_too_long_not_an_earlier_answer_trained(encoders):  # noqa: F811
    import copy

    from cardtune.collators.pairs import PairEncoder
    from cardtune.errors import SampleError

    engine = encoders("qwen2.5-7b-instruct")
    messages, _ = conversation("system_3turns", FAMILIES["qwen2.5-7b-instruct"])
    whole = PairEncoder(engine).encode(_pair(messages, "No.", [], "long"))
    short = copy.copy(engine)
    short.max_length = whole.prompt_length - 1
    with pytest.raises(SampleError) as found:
        PairEncoder(short).encode(_pair(messages, "No.", [], "long"))
    assert found.value.reason == "too_long" and "final answer" in found.value.detail
