"""``--template``: the chat template a run (or a preview of it) renders with, applied to the card."""

from __future__ import annotations

from pathlib import Path

from cardtune.registry import FamilyCard
from cardtune.training.arguments import ArgumentError

TEMPLATE_KINDS = ("own", "plain", "declarative")


def card_with_template(card: FamilyCard, template: str | None) -> FamilyCard:
    """``template``: a kind the card schema knows (own, plain, declarative) or a Jinja file."""
    if not template:
        return card
    chat = card.chat.model_dump()
    if template in TEMPLATE_KINDS:
        chat.update(template=template, jinja=None)
        if template != "declarative":
            chat["declarative"] = None
        if template == "plain":
            chat["end_of_turn"] = None  # the plain template writes eos itself
    elif Path(template).is_file():
        chat.update(template="jinja", jinja=Path(template).read_text(encoding="utf-8"), declarative=None)
    else:
        raise ArgumentError(
            f"--template {template}: neither a template kind ({', '.join(TEMPLATE_KINDS)}) nor a Jinja file"
        )
    return FamilyCard.model_validate({**card.model_dump(), "chat": chat})
