"""Role tokens derived from a chat template by rendering probe conversations.

Nothing here is written per family: the assistant header and the end-of-turn sequence are
read off the model's own template, as rendered and tokenized in context, and a card may
override either. See docs/MASKING.md for the method.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any

from cardtune.chat.render_limit import render_chat
from cardtune.registry.schema import ChatSpec

# Probe contents: plain words that tokenize as whole pieces in every vocabulary here, each
# unique in the render, so their character positions mark the turn boundaries.
_SYS, _U1, _A1, _U2, _A2 = "Probe system text.", "First question.", "Alpha answer.", "Second question.", "Omega answer."
_REASONING, _EARLIER_REASONING = "Probe reasoning steps.", "Earlier reasoning steps."
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
"""Message fields templates read an assistant's reasoning from, tried in this order: Qwen3,
DeepSeek-R1 and GLM read ``reasoning_content``, gpt-oss reads ``thinking``."""


class TemplateProbeError(ValueError):
    """The chat template cannot be used for supervised training as it is."""


NO_TEMPLATE = (
    "{where} has no chat template, so cardtune cannot know the format the model was trained with: "
    "give --model_id of a registered family that carries one (`cardtune list`), or --template FILE "
    "(a Jinja chat template), or write chat.declarative in a card (docs/TEMPLATES.md)"
)


@dataclass(frozen=True)
class RoleTokens:
    """Where assistant turns begin and end, in token ids as they occur in a rendered conversation."""

    assistant_header: tuple[int, ...]
    end_of_turn: tuple[int, ...]
    appended_end_of_turn: str | None
    """Text appended to every answer when the template itself emits no end-of-turn token."""
    content: str  # "string" or "parts"
    system: str  # "native", "fold" or "reject"
    bos_id: int | None
    tokenizer_adds_bos: bool
    template_writes_bos: bool
    system_with_media: str = "native"
    """``fold`` where the template refuses or drops a system prompt beside media (Llama-3.2-Vision)."""
    system_content: str = "parts"
    """The content form of a kept system prompt: a template may read parts for users and a
    string for the system (Llama-3.2-Vision)."""
    trailing_header: bool = False
    """The template writes an empty assistant header after the last turn (the original Llama-3
    template ignores ``add_generation_prompt``): never a turn of its own, never trained."""
    reasoning_field: str | None = None
    """The message field the template renders an assistant's reasoning from, or None."""
    inserted_before_last: tuple[int, ...] = ()
    """Ids the template writes between the header and the LAST answer only (Qwen3's empty
    ``<think>\\n\\n</think>\\n\\n``): masked like the header wherever they appear."""
    end_of_turn_forms: tuple[tuple[int, ...], ...] = ()
    """Every end of turn the template writes, the last answer's (``end_of_turn``) first: harmony
    (gpt-oss) ends the last answer with ``<|return|>`` and every earlier one with ``<|end|>``.
    Each answer is trained up to and including its own."""
    reasoning_header: tuple[int, ...] = ()
    """Where a reasoning answer starts otherwise than after the answer's header: after the
    generation prompt (harmony's ``<|start|>assistant``, before ``<|channel|>analysis``; GLM's
    ``<|assistant|>``, before ``\n<think>``). The span holds the reasoning and the answer's
    header inside it (the model must switch channels itself). Empty where it starts after the
    answer's header (Qwen3's ``<think>`` block follows it)."""
    after_last: tuple[str, str] | None = None
    """(the template's tail, the end of turn) where the template ends an answer only when a turn
    follows: the end is written after the last answer, before the tail."""
    answer_lead: int = 0
    """The last ids of ``assistant_header`` that the model writes itself: the template's
    generation prompt ends before them (functionary v3.2 prompts ``>>>`` and writes each answer
    ``>>>all\n...``). Trained with the answer."""
    notes: list[str] = field(default_factory=list, compare=False)

    @property
    def closings(self) -> tuple[tuple[int, ...], ...]:
        """The end-of-turn forms, ``end_of_turn`` first."""
        return self.end_of_turn_forms or (self.end_of_turn,)

    def closing_before(self, ids: list[int], end: int) -> int:
        """The length of the end-of-turn form ``ids[:end]`` ends with (the longest), or 0."""
        found = [len(c) for c in self.closings if 0 < len(c) <= end and tuple(ids[end - len(c) : end]) == c]
        return max(found, default=0)


_STRFTIME = re.compile(r"""strftime_now\(\s*(['"])(.*?)\1\s*\)""")


def frozen_template(template: str, date: datetime.date) -> str:
    """``template`` with each ``strftime_now("FORMAT")`` (Llama-3.x's "Today Date:") replaced by
    ``date`` in that format, so a sample renders the same on every day and caches stay valid.
    (transformers turns callables passed to a template into strings, so the clock itself cannot
    be replaced; the template's call is.)"""
    moment = datetime.datetime.combine(date, datetime.time())
    return _STRFTIME.sub(lambda m: json.dumps(moment.strftime(m.group(2))), template)


def template_kwargs(renderer: Any, chat: ChatSpec) -> dict[str, Any]:
    """Arguments every render passes: the template with its date frozen, where it writes one."""
    template = getattr(renderer, "chat_template", None)
    if isinstance(template, str) and "strftime_now" in template:
        return {"chat_template": frozen_template(template, chat.render_date)}
    return {}


def _conv(system: bool, content: str, *, image: bool = False, reasoning: str | None = None,
          reasoning_first: bool = False) -> list[dict[str, Any]]:
    """The probe conversation; ``reasoning``: the field the last answer's reasoning is given in
    (and the first answer's too, with ``reasoning_first``)."""
    def msg(role: str, text: str) -> dict[str, Any]:
        return {"role": role, "content": text if content == "string" else [{"type": "text", "text": text}]}

    msgs = [msg("system", _SYS)] if system else []
    first = msg("user", _U1)
    if image:
        first["content"] = [{"type": "image"}, *first["content"]]
    answer, last = msg("assistant", _A1), msg("assistant", _A2)
    if reasoning:
        last[reasoning] = _REASONING
        if reasoning_first:
            answer[reasoning] = _EARLIER_REASONING
    return msgs + [first, answer, msg("user", _U2), last]


class _Renderer:
    """``apply_chat_template`` to text, with the variables every render passes."""

    def __init__(self, renderer: Any, chat: ChatSpec) -> None:
        self.renderer = renderer
        self.kwargs = template_kwargs(renderer, chat)

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        return render_chat(self.renderer, messages, self.kwargs)

    def renders(self, content: str) -> bool:
        try:
            text = self(_conv(False, content))
        except Exception:  # noqa: BLE001 - any template failure means "this form is not accepted"
            return False
        # a list rendered as data (repr or tojson: GigaChat3) is not a template reading parts
        return _A1 in text and _U2 in text and "'type'" not in text and '"type"' not in text

    def generation_prompt(self, messages: list[dict[str, Any]]) -> str:
        """What the template writes to prompt an answer after ``messages`` ("" where it cannot
        be told, or where it ignores ``add_generation_prompt``)."""
        try:
            bare = self(messages)
            prompted = render_chat(self.renderer, messages, {**self.kwargs, "add_generation_prompt": True})
        except Exception:  # noqa: BLE001
            return ""
        return prompted[len(bare):] if prompted.startswith(bare) else ""


def _special_strings(tokenizer: Any) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _token_span(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """Indices [i, j) of the tokens lying wholly inside characters [start, end)."""
    inside = [i for i, (s, e) in enumerate(offsets) if s >= start and e <= end and e > s]
    if not inside:
        return 0, 0
    return inside[0], inside[-1] + 1


def _bos(tokenizer: Any, text: str) -> tuple[int | None, bool, bool]:
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    writes_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    return bos_id, adds_bos, writes_bos


def _plain_role_tokens(render: _Renderer, tokenizer: Any) -> RoleTokens:
    """The plain template (projector pretraining) has no roles: each caption follows its
    media tokens and ends with eos. No header: the engine starts a span after the media."""
    eos = tokenizer.eos_token
    if not eos:
        raise TemplateProbeError("the plain template needs an eos token (set chat.special_tokens.eos)")
    text = render(_conv(False, "parts"))
    if text != f"{_A1}{eos}{_A2}{eos}":
        raise TemplateProbeError(f"the installed template is not the plain template: a probe renders {text[:120]!r}")
    eot = tuple(tokenizer(eos, add_special_tokens=False)["input_ids"])
    bos_id, adds_bos, _ = _bos(tokenizer, "")
    notes = ["plain template: media, then each caption and its eos; no roles, no system prompt"]
    return RoleTokens((), eot, None, "parts", "native", bos_id, adds_bos, False, notes=notes)


def derive_role_tokens(renderer: Any, tokenizer: Any, chat: ChatSpec, *, media: bool = False) -> RoleTokens:
    """Read the template's roles off probe renders. ``media``: the family takes images, so a
    system prompt is also probed beside an image."""
    if getattr(renderer, "chat_template", None) is None:
        raise TemplateProbeError(NO_TEMPLATE.format(where="the model folder"))
    render = _Renderer(renderer, chat)
    notes: list[str] = []
    if chat.template == "plain":
        return _plain_role_tokens(render, tokenizer)
    # 1. Content form: string or list of parts, whichever the template renders.
    if chat.content != "auto":
        content = chat.content
    elif render.renders("parts"):
        content = "parts"
    elif render.renders("string"):
        content = "string"
    else:
        raise TemplateProbeError(
            "the chat template renders neither string nor list-of-parts content of a user/assistant "
            "conversation (is it a chat template? a base model's template may render nothing): give "
            "--model_id of a registered family that carries one (`cardtune list`), or --template FILE "
            "(a Jinja chat template), or write chat.declarative in a card (docs/TEMPLATES.md)"
        )
    notes.append(f"content form: {content}")

    # 2. System prompts: kept, folded into the first user turn, or refused; and beside media.
    system, system_content = (chat.system, content) if chat.system != "auto" else _system_policy(render, content, False, notes)
    if system == "reject":
        notes.append("system prompts are refused (card: chat.system: reject)")
    system_with_media = system
    if media and system == "native" and content == "parts":
        system_with_media, _ = _system_policy(render, content, True, notes)

    text = render(_conv(False, content))
    if any(t not in text for t in (_U1, _A1, _U2, _A2)):
        raise TemplateProbeError(
            f"the chat template does not write the messages' text with {content} content (a probe "
            f"conversation renders {text[:120]!r}); set chat.content in the card, or fix the template"
        )
    u1_end = text.index(_U1) + len(_U1)
    a1_start = text.index(_A1)
    a2_end = text.index(_A2) + len(_A2)
    tail = text[a2_end:]

    # 3. End of turn: what the template writes after an answer, up to and including its first
    # special token (the token the model must emit to stop). Up to the first, not the last: a
    # template may write more after the last answer (Llama-3 writes the next header).
    specials = _special_strings(tokenizer)
    eos = tokenizer.eos_token
    appended: str | None = None
    after_last: tuple[str, str] | None = None
    if chat.end_of_turn:
        eot_text = "".join(chat.end_of_turn)
        if not tail.lstrip().startswith(eot_text.strip()):
            appended = eot_text
            notes.append(f"end of turn {eot_text!r} from the card, appended to every answer (the template writes {tail!r})")
        else:
            notes.append(f"end of turn {eot_text!r} from the card")
    else:
        closing, earlier = _turn_ends(tail, text[a1_start + len(_A1) : text.index(_U2)], specials, eos)
        if closing is not None and earlier is not None and eos and closing.endswith(eos) and not earlier.endswith(eos):
            # eos written once, after the whole conversation (Phi-3.5: <|end|>\n<|endoftext|> after
            # the last answer only) ends the conversation, not a turn: the turn ends as the others do
            closing = _first_closing(tail, specials)
        if closing is not None:
            eot_text = closing
            notes.append(f"end of turn {eot_text!r} from the template")
        elif earlier is not None:
            # The template ends an answer only when a turn follows (GLM's next <|user|>, the
            # <|assistant_end|> of Apertus): the last answer gets that same end, written after
            # it (outside its text: a template that trims content still trims it), never eos
            # inside every answer.
            after_last, eot_text = (tail, earlier), earlier
            notes.append(f"the template ends an answer with {earlier!r} only when a turn follows: written after "
                         "the last answer too (the model must emit it to stop)")
        elif tokenizer.eos_token:
            appended = eot_text = tokenizer.eos_token
            notes.append(f"the template writes no end-of-turn token: eos {eot_text!r} appended to every answer")
        else:
            raise TemplateProbeError("the template writes no end-of-turn token and the tokenizer has no eos; set chat.end_of_turn in the card")

    # 4. Tokenize the probe in context to read the ids of the header and end-of-turn.
    if appended:
        text = render(_with_appended(_conv(False, content), appended))
        u1_end = text.index(_U1) + len(_U1)
        a1_start = text.index(_A1)
        a2_end = text.index(_A2) + len(_A2)
    if after_last is not None:
        text = close_last_answer(text, after_last)
    # An earlier answer may end otherwise than the last (harmony: <|end|> vs <|return|>): its end
    # of turn is read the same way, up to the first special token after it.
    a1_end = a1_start + len(_A1)
    earlier_text = None if chat.end_of_turn or appended else _turn_ends(
        text[a2_end:], text[a1_end : text.index(_U2)], specials, eos)[1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if chat.assistant_header:
        header = tuple(tokenizer(chat.assistant_header, add_special_tokens=False)["input_ids"])
        notes.append(f"assistant header {chat.assistant_header!r} from the card")
    else:
        i, j = _token_span(offsets, u1_end, a1_start)
        header = tuple(ids[i:j])
        # Leading whitespace tokens may merge with the user's last characters in real data.
        while len(header) > 1 and not tokenizer.decode(header[:1]).strip():
            header = header[1:]
        notes.append(f"assistant header {tokenizer.decode(header)!r} (ids {list(header)}) from the template")
    if not header:
        raise TemplateProbeError("could not find an assistant header between a user turn and its answer")
    i, j = _token_span(offsets, a2_end, a2_end + len(eot_text))
    eot = tuple(ids[i:j]) or tuple(tokenizer(eot_text, add_special_tokens=False)["input_ids"])
    forms = (eot,)
    if earlier_text is not None:
        i, j = _token_span(offsets, a1_end, a1_end + len(earlier_text))
        earlier = tuple(ids[i:j])
        if earlier and earlier != eot:
            forms = (eot, earlier)
            notes.append(f"earlier answers end with {earlier_text!r}, the last one with {eot_text!r}: "
                         "each answer is trained up to its own")
    lead = _answer_lead(render, content, text, offsets, u1_end, a1_start, len(header))
    trailing = len(ids) > len(header) and tuple(ids[-len(header):]) == header
    if trailing:
        notes.append("the template writes an empty assistant header after the last turn: never trained")

    # 5. What the template writes before the last answer only, and reasoning.
    inserted = _inserted_before_last(text, ids, offsets, header, tokenizer, _A1, _A2)
    if inserted:
        notes.append(f"the template writes {tokenizer.decode(inserted)!r} before the last answer only: masked like the header")
    reasoning_field = next((f for f in REASONING_FIELDS if _REASONING in _try(render, _conv(False, content, reasoning=f))), None)
    reasoning_header: tuple[int, ...] = ()
    if reasoning_field:
        reasoning_header, said = _reasoning_layout(render, tokenizer, content, reasoning_field, header, appended, after_last)
        notes.append(said)

    if lead and reasoning_field:
        # where the template writes an answer's reasoning between the prompt and the answer (GLM's
        # <|assistant|> then \n<think></think>\n), what follows the prompt is an empty reasoning
        # block, laid out (and masked when empty) as reasoning is, not a lead
        probe = _try(render, _conv(False, content, reasoning=reasoning_field))
        if probe.find(_U2) < probe.find(_REASONING) < probe.find(_A2):
            lead = 0
    if lead:
        notes.append(f"the generation prompt ends before {tokenizer.decode(header[-lead:])!r}, which the "
                     "template writes before every answer: the model writes it, so it is trained")

    # 6. bos: who writes it.
    bos_id, adds_bos, writes_bos = _bos(tokenizer, text)
    notes.append(
        "bos: "
        + ("none" if bos_id is None else "written by the template" if writes_bos else "added by cardtune (the tokenizer adds it)" if adds_bos else "not used")
    )
    return RoleTokens(header, eot, appended, content, system, bos_id, adds_bos, writes_bos,
                      system_with_media, system_content, trailing, reasoning_field, inserted,
                      forms, reasoning_header, after_last, lead, notes)


def _answer_lead(render: _Renderer, content: str, text: str, offsets: list[tuple[int, int]],
                 u1_end: int, a1_start: int, header_len: int) -> int:
    """How many of the header's last tokens follow the end of the generation prompt: what the
    template writes between a user turn and an answer is the generation prompt and then, where
    the prompt stops short of the answer's text, characters the model writes itself. 0 where the
    generation prompt reaches the answer (or goes past it: Qwen3's prompt opens ``<think>\n``),
    and where its end falls inside a token."""
    prompt = render.generation_prompt(_conv(False, content)[:1])
    before = text[u1_end:a1_start]
    at = before.rfind(prompt) if prompt else -1
    if at < 0 or at + len(prompt) == len(before):
        return 0
    boundary = u1_end + at + len(prompt)
    i, j = _token_span(offsets, boundary, a1_start)
    if i == j or offsets[i][0] != boundary:
        return 0
    return min(j - i, header_len - 1)


def close_last_answer(text: str, after_last: tuple[str, str]) -> str:
    """``text`` (a conversation ending with an answer) with the end of turn the template writes
    only between turns inserted after the last answer, before the template's own ``tail``."""
    tail, closing = after_last
    if not text.endswith(tail):
        return text
    return text[: len(text) - len(tail)] + closing + tail


def _turn_ends(tail: str, between: str, specials: list[str], eos: str | None) -> tuple[str | None, str | None]:
    """The end of turn after the last answer (``tail``) and after an earlier one (``between``,
    up to the next user's text). Through eos across the template's own text too (Kimi-K3 closes
    an answer ``<|close|>response<|sep|><|close|>message<|sep|><|end_of_msg|>``: tag names between
    the special tokens) where that whole stretch is the same after every answer: then it is the
    template's constant close of a turn, not the start of what follows."""
    closing, earlier = _first_closing(tail, specials, eos), _first_closing(between, specials, eos)
    wide = _first_closing(tail, specials, eos, across_text=True)
    if wide is not None and wide != closing and wide == _first_closing(between, specials, eos, across_text=True):
        return wide, wide
    return closing, earlier


def _first_closing(after: str, specials: list[str], eos: str | None = None, *, across_text: bool = False) -> str | None:
    """The text after an answer up to and including its first special token (the token the
    model must emit to stop), or None where none follows. Where that token is not eos and more
    special tokens follow it, at once or across whitespace only, up to eos, through eos (Command
    R7B writes ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``, Apriel ``\n<|end|>\n</s>``, and
    generation stops on eos)."""
    found = [(after.find(s), -len(s), s) for s in specials if s in after]
    if not found:
        return None
    at, _, special = min(found)
    end = at + len(special)
    if across_text:
        through = after.find(eos, end) if eos and special != eos else -1
        return after[: through + len(eos)] if through >= 0 else None
    if eos and special != eos:
        j = end
        while True:
            while j < len(after) and after[j].isspace():
                j += 1
            following = next((s for s in specials if after.startswith(s, j)), None)
            if following is None:
                break
            j += len(following)
            if following == eos:
                return after[:j]
    return after[:end]


def _reasoning_layout(
    render: _Renderer, tokenizer: Any, content: str, field_name: str, header: tuple[int, ...], appended: str | None,
    after_last: tuple[str, str] | None = None,
) -> tuple[tuple[int, ...], str]:
    """(the reasoning header, the note saying what is trained) for a template that renders
    reasoning from ``field_name``, and whether earlier answers keep their reasoning (Qwen3 and
    harmony drop it from history).

    A reasoning answer is trained from the end of the generation prompt on: what the model
    writes itself when it reasons (Qwen3's ``<think>``, GLM's ``\n<think>``, harmony's
    ``<|channel|>analysis<|message|>``), and not what the prompt already holds (a Thinking
    release's ``<think>\n``). The reasoning header is the ids between the last question and
    there, or none where they are the answer's own header."""
    messages = _conv(False, content, reasoning=field_name, reasoning_first=True)
    text = render(_with_appended(messages, appended) if appended else messages)
    if after_last is not None:
        text = close_last_answer(text, after_last)
    start, after_question = text.index(_REASONING), text.index(_U2) + len(_U2)
    prompt, at = render.generation_prompt(messages[:-1]), -1
    for form in dict.fromkeys((prompt, prompt.strip())):
        at = text.rfind(form, after_question, start) if form.strip() else -1
        if at >= 0:
            prompt = form
            break
    lead_end = at + len(prompt) if at >= 0 else start
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    i, j = _token_span(enc["offset_mapping"], after_question, lead_end)
    lead = tuple(list(enc["input_ids"])[i:j])
    while len(lead) > 1 and not tokenizer.decode(lead[:1]).strip():
        lead = lead[1:]
    if at >= 0:
        own = lead if lead and lead != header else ()
    else:  # no generation prompt to go by: the header, and an opening tag after it, trained
        own = tuple(lead) if lead and lead[: len(header)] != header else ()
    where = (f"trained from the end of the generation prompt {tokenizer.decode(own)!r} on, with the answer's "
             "header between them" if own else "trained with its answer")
    scope = ("in every answer" if _EARLIER_REASONING in text else
             "in the last answer only (the template drops it from earlier turns, whose answers are trained alone)")
    return own, f"reasoning: rendered from the message field {field_name!r} {scope}, {where}"


def _try(render: _Renderer, messages: list[dict[str, Any]]) -> str:
    try:
        return render(messages)
    except Exception:  # noqa: BLE001 - a template that refuses the field renders nothing of it
        return ""


def _system_policy(render: _Renderer, content: str, image: bool, notes: list[str]) -> tuple[str, str]:
    """(policy, the content form of a system message). Some templates read list-of-parts user
    content but a string system prompt (Llama-3.2-Vision trims it as a string)."""
    beside = " beside an image" if image else ""
    forms = [content, "string"] if content == "parts" else [content]
    refused = False
    for form in forms:
        messages = _conv(True, content, image=image)
        if form != content:
            messages[0] = {"role": "system", "content": _SYS}
        try:
            text = render(messages)
        except Exception:  # noqa: BLE001
            refused = True
            continue
        if _SYS in text and "'type'" not in text:
            if form != content:
                notes.append("the template reads a system prompt as a string: system content as a string")
            return "native", form
    if refused:
        notes.append(f"the template refuses a system prompt{beside}: folded into the first user turn")
    else:
        notes.append(f"the template drops the system prompt{beside} of a conversation ending with an answer: "
                     "folded into the first user turn")
    return "fold", content


def _inserted_before_last(
    text: str, ids: list[int], offsets: list[tuple[int, int]], header: tuple[int, ...], tokenizer: Any,
    first_answer: str, last_answer: str,
) -> tuple[int, ...]:
    """Tokens between the last answer's header and the answer that the first answer's header
    is not followed by (an empty think block), in context; () when the turns look alike."""
    def after_header(answer: str) -> tuple[int, int] | None:
        start = text.index(answer)
        # the answer's header: its last occurrence wholly before the answer's first character
        ends = [k + len(header) for k in range(len(ids) - len(header) + 1)
                if tuple(ids[k:k + len(header)]) == header and offsets[k + len(header) - 1][1] <= start]
        if not ends:
            return None
        first = next((t for t, (s, e) in enumerate(offsets) if e > s and s >= start), len(ids))
        return ends[-1], first

    a, b = after_header(first_answer), after_header(last_answer)
    if a is None or b is None or b[1] - b[0] <= a[1] - a[0]:
        return ()
    return tuple(ids[b[0] + (a[1] - a[0]) : b[1]])


def _with_appended(messages: list[dict[str, Any]], eot: str) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m["role"] == "assistant":
            c = m["content"]
            c = c + eot if isinstance(c, str) else [*c[:-1], {"type": "text", "text": c[-1]["text"] + eot}]
            m = {**m, "content": c}
        out.append(m)
    return out
