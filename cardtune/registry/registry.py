"""The registry: model ids resolved to their family card, built from the YAML cards."""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardtune.registry.errors import CardError, UnknownModelError
from cardtune.registry.loader import card_dirs, iter_card_files, load_card_file
from cardtune.registry.schema import FamilyCard


@dataclass(frozen=True)
class ModelSpec:
    """A registered model id: its family card plus where the weights live."""

    model_id: str
    family: FamilyCard
    hf_path: str
    revision: str | None = None
    config_overrides: dict[str, Any] = field(default_factory=dict)
    source: str = "<python>"

    @property
    def family_id(self) -> str:
        return self.family.family


class Registry:
    def __init__(self) -> None:
        self.families: OrderedDict[str, FamilyCard] = OrderedDict()
        self.family_sources: dict[str, str] = {}
        self.models: OrderedDict[str, ModelSpec] = OrderedDict()

    # -- building -------------------------------------------------------------------------
    def add_family(self, card: FamilyCard, source: str = "<python>") -> None:
        if card.family in self.families:
            raise CardError(
                f"{source}: family '{card.family}' is already defined in {self.family_sources[card.family]}"
            )
        self.families[card.family] = card
        self.family_sources[card.family] = source
        for entry in card.models:
            self.register_model(
                entry.model_id,
                card.family,
                entry.hf_path,
                revision=entry.revision,
                config_overrides=entry.config_overrides,
                source=source,
            )

    def register_model(
        self,
        model_id: str,
        model_family_id: str,
        model_hf_path: str,
        *,
        revision: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        source: str = "<python>",
    ) -> ModelSpec:
        if model_id in self.models:
            raise CardError(
                f"{source}: duplicate model id '{model_id}' (already registered by {self.models[model_id].source})"
            )
        if model_family_id not in self.families:
            raise CardError(
                f"{source}: model '{model_id}' names unknown family '{model_family_id}'"
                f"{_suggest(model_family_id, self.families)}"
            )
        card = self.families[model_family_id]
        spec = ModelSpec(
            model_id=model_id,
            family=card,
            hf_path=model_hf_path,
            revision=revision,
            config_overrides={**card.config_overrides, **(config_overrides or {})},
            source=source,
        )
        self.models[model_id] = spec
        return spec

    def load_dirs(self, dirs: Iterable[Path]) -> None:
        for path in iter_card_files(dirs):
            self.add_family(load_card_file(path), str(path))

    # -- lookup ---------------------------------------------------------------------------
    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModelError(
                f"unknown model id '{model_id}'{_suggest(model_id, self.models)}; "
                "`cardtune list` shows every registered id"
            ) from None

    def multimodal_keywords(self) -> dict[str, list[str]]:
        return {name: card.multimodal_keywords for name, card in self.families.items() if card.is_multimodal}


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    return f" (close matches: {', '.join(close)})" if close else ""


_DEFAULT: Registry | None = None
_DEFAULT_KEY: tuple[str, ...] | None = None


def get_registry(extra_dirs: Iterable[str | os.PathLike] = ()) -> Registry:
    """The registry of the built-in cards plus ``extra_dirs`` and ``$CARDTUNE_CARDS``, cached."""
    global _DEFAULT, _DEFAULT_KEY
    dirs = card_dirs(extra_dirs)
    key = tuple(str(d.resolve()) for d in dirs)
    if _DEFAULT is None or key != _DEFAULT_KEY:
        registry = Registry()
        registry.load_dirs(dirs)
        _DEFAULT, _DEFAULT_KEY = registry, key
    return _DEFAULT


def register_model(
    model_id: str,
    model_family_id: str,
    model_hf_path: str,
    *,
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> ModelSpec:
    """Register a model id of an existing family in the default registry (the seeds' entry point)."""
    return get_registry().register_model(
        model_id, model_family_id, model_hf_path, revision=revision, config_overrides=config_overrides
    )
