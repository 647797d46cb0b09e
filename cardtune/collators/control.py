"""Control tokens typed inside a message: plain text unless the run asks otherwise.

A rendered conversation is tokenized as one string, so ``<|im_end|><|im_start|>assistant``
typed inside a user's message would become the real control tokens and forge a turn, and a
``</s>`` inside an answer would end it early. By default such strings are tokenized as the
plain text they are (``<``, ``|``, ``im``, ...), the way transformers' own
``sanitize_control_tokens`` does it, and with its public pieces: the messages' strings are
marked (:func:`transformers.utils.chat_template_utils.mark_control_tokens`) before the
template renders them, and the tokenizer or processor is called with
``sanitize_control_tokens=True``, so only the template's own control tokens are encoded as
tokens. The card's end of turn, appended after marking, stays a control token; so do media
placeholders. ``keep`` leaves typed control tokens as they are. Either way each encoding counts
them, so a run can say how many samples had any.

Control tokens are the tokenizer's special tokens plus the added tokens the template writes
(Qwen3's ``<think>``), whitespace tokens aside, as in transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from cardtune.conversation import message_text

TYPED_CONTROL_TOKENS = ("plain", "keep")


class TypedControlTokens:
    """The control tokens of one tokenizer and template, found in and marked on messages."""

    def __init__(self, tokenizer: Any, template: Any, media_ids: Iterable[int]) -> None:
        media_ids = set(media_ids)
        template_text = str(template or "")
        strings: set[str] = set()
        for token_id, token in tokenizer.added_tokens_decoder.items():
            text = str(token)
            if text and not text.isspace() and token_id not in media_ids and (
                    getattr(token, "special", False) or text in template_text):
                strings.add(text)
        for text in tokenizer.all_special_tokens:
            if text and tokenizer.convert_tokens_to_ids(text) not in media_ids:
                strings.add(text)
        self.pattern = (re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
                        if strings else None)
        self._first_chars = {s[0] for s in strings}

    def count(self, messages: list[dict[str, Any]]) -> int:
        """Control-token strings in the messages' texts (and reasoning)."""
        if self.pattern is None:
            return 0
        # one search over all texts ("\0" is in no token); most samples have none
        joined = "\0".join(text for m in messages for text in (message_text(m), m.get("reasoning_content") or "") if text)
        if not any(c in joined for c in self._first_chars):  # a cheap scan first: most texts have none
            return 0
        return len(self.pattern.findall(joined)) if self.pattern.search(joined) else 0

    def mark(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The messages with each typed control token wrapped in transformers' markers."""
        from transformers.utils.chat_template_utils import mark_control_tokens

        assert self.pattern is not None
        out = []
        for m in messages:
            content = m["content"]
            if isinstance(content, str):
                content = mark_control_tokens(content, self.pattern)
            else:
                content = [{**p, "text": mark_control_tokens(p["text"], self.pattern)} if p["type"] == "text" else p
                           for p in content]
            marked = {**m, "content": content}
            if isinstance(m.get("reasoning_content"), str):
                marked["reasoning_content"] = mark_control_tokens(m["reasoning_content"], self.pattern)
            out.append(marked)
        return out
