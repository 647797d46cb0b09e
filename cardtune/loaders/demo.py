"""The demo loader: the generic path, on the tiny LLaVA that cardtune builds locally."""

from __future__ import annotations

from cardtune.demo import ensure_demo_model
from cardtune.loaders import register_loader
from cardtune.loaders.generic import GenericLoader
from cardtune.registry.schema import FamilyCard


@register_loader("demo")
class DemoLoader(GenericLoader):
    """Ignores the card's hub path: the model folder is built (once, cached) by ``ensure_demo_model``."""

    def __init__(self, card: FamilyCard, path: str | None = None, revision: str | None = None) -> None:
        super().__init__(card, ensure_demo_model(), revision=None)
