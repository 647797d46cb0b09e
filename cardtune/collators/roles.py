"""Role tokens derived from a chat template by rendering probe conversations.

Nothing here is written per family: the assistant header and the end-of-turn sequence are
read off the model's own template, as rendered and tokenized in context, and a card may
override either. See docs/MASKING.md for the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cardtune.registry.schema import ChatSpec

# Probe contents: plain words that tokenize as whole pieces in every vocabulary here, each
# unique in the render, so their character positions mark the turn boundaries.
_SYS, _U1, _A1, _U2, _A2 = "Probe system text.", "First question.", "Alpha answer.", "Second question.", "Omega answer."


class TemplateProbeError(ValueError):
    """The chat template cannot be used for supervised training as it is."""


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
    notes: list[str] = field(default_factory=list, compare=False)


def _conv(system: bool, content: str) -> list[dict[str, Any]]:
    def msg(role: str, text: str) -> dict[str, Any]:
        return {"role": role, "content": text if content == "string" else [{"type": "text", "text": text}]}

    msgs = [msg("system", _SYS)] if system else []
    return msgs + [msg("user", _U1), msg("assistant", _A1), msg("user", _U2), msg("assistant", _A2)]


def _render(renderer: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return renderer.apply_chat_template(messages, tokenize=False, **kwargs)


def _renders(renderer: Any, content: str) -> bool:
    try:
        text = _render(renderer, _conv(False, content))
    except Exception:  # noqa: BLE001 - any template failure means "this form is not accepted"
        return False
    return _A1 in text and _U2 in text and "'type'" not in text


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


def _plain_role_tokens(renderer: Any, tokenizer: Any) -> RoleTokens:
    """The plain template (projector pretraining) has no roles: each caption follows its
    media tokens and ends with eos. No header: the engine starts a span after the media."""
    eos = tokenizer.eos_token
    if not eos:
        raise TemplateProbeError("the plain template needs an eos token (set chat.special_tokens.eos)")
    text = _render(renderer, _conv(False, "parts"))
    if text != f"{_A1}{eos}{_A2}{eos}":
        raise TemplateProbeError(f"the installed template is not the plain template: a probe renders {text[:120]!r}")
    eot = tuple(tokenizer(eos, add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    notes = ["plain template: media, then each caption and its eos; no roles, no system prompt"]
    return RoleTokens((), eot, None, "parts", "native", bos_id, adds_bos, False, notes)


def derive_role_tokens(renderer: Any, tokenizer: Any, chat: ChatSpec) -> RoleTokens:
    notes: list[str] = []
    if chat.template == "plain":
        return _plain_role_tokens(renderer, tokenizer)
    # 1. Content form: string or list of parts, whichever the template renders.
    if chat.content != "auto":
        content = chat.content
    elif _renders(renderer, "parts"):
        content = "parts"
    elif _renders(renderer, "string"):
        content = "string"
    else:
        raise TemplateProbeError(
            "the chat template renders neither string nor list-of-parts content of a user/assistant "
            "conversation (is it a chat template? a base model's template may render nothing)"
        )
    notes.append(f"content form: {content}")

    # 2. System prompts: kept, folded into the first user turn, or refused.
    system = chat.system
    if system == "auto":
        try:
            text = _render(renderer, _conv(True, content))
            system = "native" if _SYS in text else "fold"
            if system == "fold":
                notes.append("the template drops the system prompt of a conversation ending with an answer: folded into the first user turn")
        except Exception:  # noqa: BLE001
            system = "fold"
            notes.append("the template refuses a system role: folded into the first user turn")
    if system == "reject":
        notes.append("system prompts are refused (card: system: reject)")

    text = _render(renderer, _conv(False, content))
    if any(t not in text for t in (_U1, _A1, _U2, _A2)):
        raise TemplateProbeError(
            f"the chat template does not write the messages' text with {content} content (a probe "
            f"conversation renders {text[:120]!r}); set chat.content in the card, or fix the template"
        )
    u1_end = text.index(_U1) + len(_U1)
    a1_start = text.index(_A1)
    a2_end = text.index(_A2) + len(_A2)
    tail = text[a2_end:]

    # 3. End of turn: what the template writes after an answer, up to its last special token.
    specials = _special_strings(tokenizer)
    appended: str | None = None
    if chat.end_of_turn:
        eot_text = "".join(chat.end_of_turn)
        if not tail.lstrip().startswith(eot_text.strip()):
            appended = eot_text
            notes.append(f"end of turn {eot_text!r} from the card, appended to every answer (the template writes {tail!r})")
        else:
            notes.append(f"end of turn {eot_text!r} from the card")
    else:
        cut = max((tail.rfind(s) + len(s) for s in specials if s in tail), default=-1)
        if cut > 0:
            eot_text = tail[:cut]
            notes.append(f"end of turn {eot_text!r} from the template")
        elif tokenizer.eos_token:
            appended = eot_text = tokenizer.eos_token
            notes.append(f"the template writes no end-of-turn token: eos {eot_text!r} appended to every answer")
        else:
            raise TemplateProbeError("the template writes no end-of-turn token and the tokenizer has no eos; set chat.end_of_turn in the card")

    # 4. Tokenize the probe in context to read the ids of the header and end-of-turn.
    if appended:
        text = _render(renderer, _with_appended(_conv(False, content), appended))
        u1_end = text.index(_U1) + len(_U1)
        a1_start = text.index(_A1)
        a2_end = text.index(_A2) + len(_A2)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
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

    # 5. bos: who writes it.
    bos_id = tokenizer.bos_token_id
    probe = tokenizer("a").input_ids
    adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    writes_bos = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    notes.append(
        "bos: "
        + ("none" if bos_id is None else "written by the template" if writes_bos else "added by cardtune (the tokenizer adds it)" if adds_bos else "not used")
    )
    return RoleTokens(header, eot, appended, content, system, bos_id, adds_bos, writes_bos, notes)


def _with_appended(messages: list[dict[str, Any]], eot: str) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        if m["role"] == "assistant":
            c = m["content"]
            c = c + eot if isinstance(c, str) else [*c[:-1], {"type": "text", "text": c[-1]["text"] + eot}]
            m = {**m, "content": c}
        out.append(m)
    return out
