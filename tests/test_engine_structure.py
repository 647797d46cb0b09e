"""Which header opens which answer is read off the rendered conversation, on every family.

A user message quoting whole assistant turns (header + the very answer + end of turn) must
never take the labels, wherever the quote sits (a later turn, quoting earlier and later
answers), whatever whitespace the template strips around it, and a header typed inside an
answer is not a turn either. Also: an image part with no image is refused on the text-only
fast path too.
"""

from __future__ import annotations

from typing import Any

import pytest
from conftest import require_fixture
from test_labels_contract import EOT, assert_exact, not_ready, spans
from test_labels_golden import FAMILIES

# the families the contract tests know (their end of turn in EOT); the folders added in 2026-12
# are covered by the golden, whitespace and reasoning tests
STRUCTURE_FAMILIES = [m for m in FAMILIES if m in EOT]
MODELS = [pytest.param(m, id=m, marks=[pytest.mark.skip(reason=r)] if (r := not_ready(m)) else [])
          for m in STRUCTURE_FAMILIES]


@pytest.fixture(scope="module")
def encoder() -> Any:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    loaded: dict[str, Any] = {}

    def get(model_id: str) -> Any:
        if model_id not in loaded:
            r = resolve_model(model_id, require_fixture(model_id))
            loaded[model_id] = ChatEncoder(r.card, load_processing(r))
        return loaded[model_id]

    return get


def conversation(sample_id: str, *texts: str) -> Any:
    from cardtune.conversation import Sample

    roles = ("user", "assistant")
    return Sample(sample_id, [{"role": roles[i % 2], "content": [{"type": "text", "text": t}]}
                              for i, t in enumerate(texts)])


def first_index_after(enc: Any, ids: list[int], marker: str) -> int:
    """The smallest i such that ids[:i] decodes to a text containing ``marker``."""
    for i in range(1, len(ids) + 1):
        if marker in enc.tokenizer.decode(ids[:i], skip_special_tokens=False):
            return i
    raise AssertionError(f"{marker!r} not in the encoded sample")


@pytest.mark.parametrize("model_id", MODELS)
def test_quotes_of_both_answers_in_a_later_turn(encoder, model_id):
    enc = encoder(model_id)
    quote = FAMILIES[model_id].role_strings
    a1, a2 = "Paris.", "Rome."
    # the second user turn quotes a whole turn with the SECOND answer, then one with the FIRST
    user2 = f"Startmark {quote.format(a2)} and {quote.format(a1)} Endmark"
    s = conversation(f"{model_id}-later", "Capital of France?", a1, user2, a2)
    e = enc.encode(s)
    assert_exact(enc, e, model_id, a1, a2)
    (s1, t1), (s2, _) = spans(e.labels)
    assert t1 < first_index_after(enc, e.input_ids, "Startmark"), "the first answer was taken from the quote"
    assert s2 >= first_index_after(enc, e.input_ids, "Endmark"), "the second answer was taken from the quote"


@pytest.mark.parametrize("model_id", MODELS)
def test_quote_with_whitespace_the_template_strips(encoder, model_id):
    # texts with surrounding whitespace (a Sample built in code; data files are stripped on load)
    enc = encoder(model_id)
    quote = FAMILIES[model_id].role_strings.format("42")
    s = conversation(f"{model_id}-ws", f"  {quote} Endmark \n", "42")
    e = enc.encode(s)
    assert_exact(enc, e, model_id, "42")
    ((s1, _),) = spans(e.labels)
    assert s1 >= first_index_after(enc, e.input_ids, "Endmark")


@pytest.mark.parametrize("model_id", MODELS)
def test_quote_opening_with_the_header_itself(encoder, model_id):
    # the header as the message's very first characters tokenizes differently alone than in
    # context for some tokenizers (phi-2: "Output" vs "ĠOutput"): read off the context
    enc = encoder(model_id)
    h = enc.tokenizer.decode(list(enc.roles.assistant_header), skip_special_tokens=False)
    quote = f"{h}42{EOT[model_id]} and {h} 42{EOT[model_id]}"
    e = enc.encode(conversation(f"{model_id}-header-first", f"{quote} Endmark", "42"))
    assert_exact(enc, e, model_id, "42")
    ((s1, _),) = spans(e.labels)
    assert s1 >= first_index_after(enc, e.input_ids, "Endmark")


def test_header_typed_inside_an_answer(encoder):
    tried = []
    for model_id in STRUCTURE_FAMILIES:
        enc = None if not_ready(model_id) else encoder(model_id)
        if enc is None:
            continue
        header = enc.tokenizer.decode(list(enc.roles.assistant_header), skip_special_tokens=False).strip()
        if EOT[model_id].strip() in header:  # ChatML-like: the header holds the end of turn
            continue
        a1 = f"The marker is {header} and nothing else."
        e = enc.encode(conversation(f"{model_id}-in-answer", "What is the marker?", a1, "Again?", "Yes."))
        assert_exact(enc, e, model_id, a1, "Yes.")
        tried.append(model_id)
    assert len(tried) >= 5, tried


def test_regions_found_in_every_family(encoder):
    """The alignment the structure rests on succeeds on every family's template (no silent
    fall-back to trying headers in order)."""
    from cardtune.conversation import message_text

    for model_id in STRUCTURE_FAMILIES:
        if not_ready(model_id):
            continue
        enc = encoder(model_id)
        quote = FAMILIES[model_id].role_strings.format("42")
        s = conversation("r", "Q?", "A.", f" {quote} ", "42")
        messages = enc.normalise(s)
        text = enc.render(s)
        regions = enc._text_regions(messages, text)
        assert regions is not None, model_id
        for start, end, k in regions:
            assert text[start:end].strip() == message_text(messages[k]).strip(), model_id


def test_unaligned_template_falls_back_to_trying_headers_in_order(encoder, monkeypatch):
    enc = encoder("qwen2.5-7b-instruct")
    monkeypatch.setattr(type(enc), "_text_regions", lambda self, messages, text: None)
    quote = FAMILIES["qwen2.5-7b-instruct"].role_strings.format("Fake.")
    e = enc.encode(conversation("fallback", quote, "Real answer."))
    assert_exact(enc, e, "qwen2.5-7b-instruct", "Real answer.")


@pytest.mark.parametrize("model_id", ["llava-1.5-7b", "qwen2-vl-2b"])
def test_image_part_without_image_on_the_batch_path(encoder, model_id):
    from cardtune.conversation import Sample
    from cardtune.errors import SampleError

    enc = encoder(model_id)
    bad = Sample("no-pixels", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                               {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}])
    good = conversation("fine", "Hi", "Ok.")
    e_bad, e_good = enc.encode_batch([bad, good])
    assert isinstance(e_bad, SampleError) and (e_bad.reason, e_bad.sample_id, e_bad.field) == (
        "placeholder_mismatch", "no-pixels", "images")
    assert e_good.input_ids == enc.encode(good).input_ids
    # an image token typed in the text counts too: the processor would expand it
    token = enc.card.media.image_token
    typed = conversation("typed", f"What does {token} mean?", "A placeholder.")
    with pytest.raises(SampleError) as err:
        enc.encode(typed)
    assert err.value.reason == "placeholder_mismatch" and "rendered text" in err.value.detail
