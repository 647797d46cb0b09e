"""Chat templates written as data in a card, compiled to ordinary Hugging Face Jinja templates.

A compiled template is a normal chat template: messages with ``role`` and ``content`` (a
string, or a list of ``{type: text|image|video}`` parts), ``add_generation_prompt``, and each
assistant answer followed by its end-of-turn text. Answers and their end of turn sit inside
``{% generation %}`` blocks, so ``return_assistant_tokens_mask`` works on them too. The
masking engine needs nothing else: it reads the header and end-of-turn off the renders.

Literal token ids (``{token:N}``, fastllm's ``<FLM_FIX_TOKEN_N>``) are resolved against the
tokenizer when the template is installed: a template renders text, so the token must come
back as exactly id N wherever that text is tokenized. Special and added tokens do. A regular
token whose string is its own text (InternLM's ``<eoa>``, a sentencepiece user symbol) is
registered as a special token at its existing id, which changes neither the vocabulary nor
how the id decodes. A regular token whose string is not its text (Llama's ``<0x0A>`` for
"\n", byte-level ``Ċ``, ``▁word``) cannot be written by id: the card writes the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from cardtune.registry.errors import CardError
from cardtune.registry.schema import TOKEN_LITERAL, DeclarativeTemplate, FamilyCard

_MEDIA_FIELD = re.compile(r"\{n\}|\{path\}")
_HEADER = "{#- compiled by cardtune from a declarative card template: edit the card, not this -#}"


def _lit(text: str) -> str:
    """``text`` as a Jinja string literal (JSON's escapes are Jinja's, non-ASCII kept raw)."""
    return json.dumps(text, ensure_ascii=False)


def _out(text: str | None) -> str:
    return "{{- " + _lit(text) + " -}}" if text else ""


def resolve_token_literals(text: str, tokenizer: Any | None) -> str:
    """``text`` with every ``{token:N}`` replaced by a string that tokenizes to exactly id N."""
    if not TOKEN_LITERAL.search(text):
        return text
    if tokenizer is None:
        raise ValueError(f"{text!r} writes token ids ({{token:N}}): compiling it needs the tokenizer")
    return TOKEN_LITERAL.sub(lambda m: token_literal(tokenizer, int(m.group(1))), text)


def token_literal(tokenizer: Any, token_id: int) -> str:
    """The string of token ``token_id``, registered so that it tokenizes back to that id alone."""
    from transformers import AddedToken

    if not 0 <= token_id < len(tokenizer):
        raise CardError(f"{{token:{token_id}}}: no such id (the tokenizer has {len(tokenizer)} tokens)")
    token = tokenizer.convert_ids_to_tokens(token_id)
    if token_id not in tokenizer.added_tokens_decoder:
        text = tokenizer.decode([token_id])
        if text != token:
            raise CardError(
                f"{{token:{token_id}}} is {token!r}, a regular token that decodes to {text!r}: "
                "a template writes text, so write the text instead"
            )
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        raise CardError(
            f"{{token:{token_id}}}: its token {token!r} does not tokenize back to id {token_id}; "
            "write the text instead"
        )
    return token


def _media_expr(text: str, counter: str) -> str:
    """Jinja that writes one media part: ``{n}`` is its index, ``{path}`` its path or url."""
    pieces: list[str] = []
    pos = 0
    for m in _MEDIA_FIELD.finditer(text):
        if m.start() > pos:
            pieces.append(_lit(text[pos : m.start()]))
        pieces.append(f"ns.{counter}|string" if m.group() == "{n}" else "media_path")
        pos = m.end()
    if pos < len(text):
        pieces.append(_lit(text[pos:]))
    return "{{- " + " ~ ".join(pieces) + " -}}"


def _media_branch(kind: str, placeholder: str | None) -> list[str]:
    if placeholder is None:
        return [
            f"{{%- elif part.type == '{kind}' -%}}",
            f"{{{{- raise_exception('this template has no {kind} placeholder (card: chat.declarative.{kind})') -}}}}",
        ]
    lines = [f"{{%- elif part.type == '{kind}' -%}}", f"{{%- set ns.{kind} = ns.{kind} + 1 -%}}"]
    if "{path}" in placeholder:
        lines += [
            f"{{%- set media_path = part.{kind} if part.{kind} is string else (part.url or part.path or '') -%}}",
            "{%- if not media_path -%}",
            f'{{{{- raise_exception(\'{kind} parts need their path ("{kind}", "url" or "path") in this template\') -}}}}',
            "{%- endif -%}",
        ]
    return [*lines, _media_expr(placeholder, kind)]


def _content_macro(image: str | None, video: str | None) -> list[str]:
    """A Jinja macro that writes one message's content: a string, or text/image/video parts.
    ``ns`` counts media across the conversation for ``{n}``."""
    return [
        "{%- macro render_content(content, ns) -%}",
        "{%- if content is string -%}",
        "{{- content -}}",
        "{%- elif content is not none -%}",
        "{%- for part in content -%}",
        "{%- if part.type == 'text' -%}",
        "{{- part.text -}}",
        *_media_branch("image", image),
        *_media_branch("video", video),
        "{%- else -%}",
        "{{- raise_exception('unknown content part type ' ~ part.type ~ ' (text, image or video)') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- endmacro -%}",
    ]


def compile_template(decl: DeclarativeTemplate, tokenizer: Any | None = None) -> str:
    """The Jinja chat template that ``decl`` describes.

    ``tokenizer`` resolves ``{token:N}`` literals (and may gain special tokens at existing
    ids for them, see the module notes); it is needed only when the card writes some.
    """

    def r(text: str | None) -> str:
        return resolve_token_literals(text, tokenizer) if text else ""

    system, user, assistant = decl.system, decl.user, decl.assistant
    separator = r(decl.separator)
    generation_prompt = r(decl.generation_prompt if decl.generation_prompt is not None else assistant.prefix)
    content = "{{- render_content(message.content, ns) -}}"
    # ``ns.started``: something was written, so the next message is preceded by the separator.
    sep = ["{%- if ns.started -%}", _out(separator), "{%- endif -%}"] if separator else []
    start = [*sep, "{%- set ns.started = true -%}"]

    lines = [
        _HEADER,
        *_content_macro(r(decl.image) or None, r(decl.video) or None),
        "{%- set ns = namespace(image=0, video=0, started=false, system=none) -%}",
    ]
    if decl.bos:
        lines.append("{{- bos_token -}}")
    if system is not None:
        sys_open, sys_close = _lit(r(system.prefix)), _lit(r(system.suffix))
        default = r(system.default) if system.default and system.emit_default else ""
        lines += [
            "{%- if messages and messages[0].role == 'system' -%}",
            "{%- set ns.system = render_content(messages[0].content, ns) -%}",
            *(["{%- else -%}", "{%- set ns.system = " + _lit(default) + " -%}"] if default else []),
            "{%- endif -%}",
        ]
        system_block = [
            "{%- if ns.system is not none -%}",
            "{{- " + sys_open + " ~ ns.system ~ " + sys_close + " -}}",
            "{%- set ns.system = none -%}",
            "{%- endif -%}",
        ]
        if not system.inline:
            lines += ["{%- if ns.system is not none -%}", *start, *system_block, "{%- endif -%}"]
    lines += [
        "{%- for message in messages -%}",
        "{%- if message.role == 'system' -%}",
        "{%- if not loop.first -%}",
        "{{- raise_exception('a system message must come first') -}}",
        "{%- endif -%}",
    ]
    if system is None:
        lines.append(
            "{{- raise_exception('this template has no system role (card: chat.declarative.system)') -}}"
        )
    lines += [
        "{%- elif message.role == 'user' -%}",
        *start,
        _out(r(user.prefix)),
        *(system_block if system is not None and system.inline else []),
        content,
        _out(r(user.suffix)),
        "{%- elif message.role == 'assistant' -%}",
        *start,
        _out(r(assistant.prefix)),
        "{%- generation -%}",
        content,
        _out(r(decl.end_of_turn)),
        "{%- endgeneration -%}",
        _out(r(assistant.suffix)),
        "{%- else -%}",
        "{{- raise_exception('unknown role ' ~ message.role ~ ': this template renders system, user and assistant') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if generation_prompt:
        lines += ["{%- if add_generation_prompt -%}", *sep, _out(generation_prompt), "{%- endif -%}"]
    return "\n".join(line for line in lines if line) + "\n"


def plain_template(image_token: str, eos: str, video_token: str | None = None) -> str:
    """The projector-pretraining template: each user turn writes only its media placeholders
    (no text, no roles), each assistant turn its caption followed by ``eos``.

    String user content writes ``image_token`` once per occurrence of it in the text.
    System messages are dropped; there is no generation prompt.
    """
    if not image_token or not eos:
        raise ValueError("plain_template needs an image token and an eos token")
    video = (
        ["{%- elif part.type == 'video' -%}", _out(video_token)]
        if video_token
        else [
            "{%- elif part.type == 'video' -%}",
            "{{- raise_exception('this plain template has no video token') -}}",
        ]
    )
    lines = [
        "{#- cardtune plain template (projector pretraining): media, then caption and eos -#}",
        "{%- for message in messages -%}",
        "{%- if message.role == 'user' -%}",
        "{%- if message.content is string -%}",
        "{{- " + _lit(image_token) + " * message.content.count(" + _lit(image_token) + ") -}}",
        "{%- elif message.content is not none -%}",
        "{%- for part in message.content -%}",
        "{%- if part.type == 'image' -%}",
        _out(image_token),
        *video,
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "{%- elif message.role == 'assistant' -%}",
        "{%- generation -%}",
        "{%- if message.content is string -%}",
        "{{- message.content -}}",
        "{%- elif message.content is not none -%}",
        "{%- for part in message.content if part.type == 'text' -%}",
        "{{- part.text -}}",
        "{%- endfor -%}",
        "{%- endif -%}",
        _out(eos),
        "{%- endgeneration -%}",
        "{%- elif message.role != 'system' -%}",
        "{{- raise_exception('unknown role ' ~ message.role ~ ': the plain template renders user and assistant') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines) + "\n"


def card_chat_template(card: FamilyCard, tokenizer: Any, template: str | None = None) -> str | None:
    """The chat template the card asks to install on ``tokenizer`` (and its processor), or
    None to keep the model's own. ``template`` overrides ``card.chat.template`` (``--template
    plain`` at training time). Call after the special-token fix-ups: ``plain`` writes eos."""
    chat = card.chat
    kind = template or chat.template
    if kind == "own":
        return None
    if kind == "jinja":
        return chat.jinja
    if kind == "declarative":
        if chat.declarative is None:
            raise CardError(
                f"family {card.family}: template declarative but the card has no chat.declarative block"
            )
        return compile_template(chat.declarative, tokenizer)
    if kind == "plain":
        image_token = card.media.placeholder("image")
        if not image_token:
            raise CardError(f"family {card.family}: the plain template needs media.image_token in the card")
        if not tokenizer.eos_token:
            raise CardError(
                f"family {card.family}: the plain template needs an eos token (set chat.special_tokens.eos)"
            )
        return plain_template(image_token, tokenizer.eos_token, card.media.placeholder("video"))
    raise CardError(f"family {card.family}: unknown chat template kind {kind!r}")
