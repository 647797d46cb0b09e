"""Chat templates cardtune writes itself: declarative card templates and the plain template."""

from cardtune.chat.declarative import (
    card_chat_template,
    compile_template,
    plain_template,
    resolve_token_literals,
    token_literal,
)

__all__ = [
    "card_chat_template",
    "compile_template",
    "plain_template",
    "resolve_token_literals",
    "token_literal",
]
