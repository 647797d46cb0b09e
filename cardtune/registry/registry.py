"""The registry: model ids resolved to their family card, built from the YAML cards."""

from __future__ import annotations

import difflib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cardtune.registry.errors import CardError, UnknownModelError
from cardtune.registry.loader import (
    BUILTIN_CARD_DIR,
    card_dirs,
    describe,
    dotted,
    field_location,
    iter_card_files,
    load_card_or_entries,
)
from cardtune.registry.schema import FamilyCard, FamilyEntries, ModelEntry


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
        """Add a family and its model ids, all or nothing: a family or model id defined before
        is an error naming both definitions (see :func:`_clash`)."""
        if card.family in self.families:
            raise _clash(
                f"family '{card.family}'",
                (source, ("family",)),
                (self.family_sources[card.family], ("family",)),
            )
        for i, entry in enumerate(card.models):
            if entry.model_id in self.models:
                raise _clash(
                    f"model id '{entry.model_id}'",
                    (source, ("models", i, "model_id")),
                    _definition(self.models[entry.model_id]),
                )
        self.families[card.family] = card
        self.family_sources[card.family] = source
        for entry in card.models:
            self.models[entry.model_id] = _spec(card, entry, source)

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
        """Add a model id of a family already here, checked by the card schema's rules."""
        try:
            entry = ModelEntry(
                model_id=model_id,
                hf_path=model_hf_path,
                revision=revision,
                config_overrides=config_overrides or {},
            )
        except ValidationError as exc:
            raise CardError(
                "\n".join(f"{source}: {dotted(err['loc'])}: {describe(err)}" for err in exc.errors())
            ) from None
        if model_id in self.models:
            raise _clash(
                f"model id '{model_id}'", (source, ("model_id",)), _definition(self.models[model_id])
            )
        if model_family_id not in self.families:
            raise CardError(
                f"{source}: model '{model_id}' names unknown family '{model_family_id}'"
                f"{_suggest(model_family_id, self.families)}"
            )
        spec = _spec(self.families[model_family_id], entry, source)
        self.models[model_id] = spec
        return spec

    def load_dirs(self, dirs: Iterable[Path]) -> None:
        problems = self.load_files(iter_card_files(dirs))
        if problems:
            raise CardError(problems[0])

    def load_files(self, paths: Iterable[Path]) -> list[str]:
        """Add each card file; entries files (``family`` and ``models`` only) once every card is
        in, whichever folder defines their family. Returns the problems, one per file."""
        problems: list[str] = []
        entries: list[tuple[FamilyEntries, str]] = []
        for path in paths:
            try:
                found = load_card_or_entries(path)
                if isinstance(found, FamilyEntries):
                    entries.append((found, str(path)))
                else:
                    self.add_family(found, str(path))
            except CardError as exc:
                problems.append(str(exc))
        for found, source in entries:
            try:
                self.add_entries(found, source)
            except CardError as exc:
                problems.append(str(exc))
        return problems

    def add_entries(self, entries: FamilyEntries, source: str) -> None:
        if entries.family not in self.families:
            raise CardError(f"{field_location(source, ('family',))}: family: '{entries.family}' is not defined by any "
                            f"card{_suggest(entries.family, self.families)} (an entries file adds model ids to a "
                            "family defined in another card file)")
        for entry in entries.models:
            self.register_model(entry.model_id, entries.family, entry.hf_path, revision=entry.revision,
                                config_overrides=entry.config_overrides, source=source)

    # -- lookup ---------------------------------------------------------------------------
    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModelError(
                f"unknown model id '{model_id}'{_suggest(model_id, self.models)}; "
                "`cardtune list` shows every registered id"
            ) from None

    def field_location(self, family_id: str, field: str | Sequence[str | int]) -> str:
        """``FILE:LINE`` where ``family_id``'s card writes ``field`` (``"loader"``,
        ``"models[0].hf_path"``), for messages in the ``FILE:LINE: field: message`` form.
        A field the card leaves out gets its nearest written parent's line (1 at the top);
        a family added from Python gives its source alone."""
        return field_location(self.family_sources[family_id], field)

    def multimodal_keywords(self) -> dict[str, list[str]]:
        return {name: card.multimodal_keywords for name, card in self.families.items() if card.is_multimodal}


def _spec(card: FamilyCard, entry: ModelEntry, source: str) -> ModelSpec:
    return ModelSpec(
        model_id=entry.model_id,
        family=card,
        hf_path=entry.hf_path,
        revision=entry.revision,
        config_overrides={**card.config_overrides, **entry.config_overrides},
        source=source,
    )


Definition = tuple[str, tuple[str | int, ...]]
"""Where something is defined: a source (a card file or ``<python>``) and the field there."""


def _definition(spec: ModelSpec) -> Definition:
    ids = [m.model_id for m in spec.family.models]
    if spec.model_id in ids:
        return spec.source, ("models", ids.index(spec.model_id), "model_id")
    return spec.source, ("model_id",)  # registered with register_model


def _is_builtin(source: str) -> bool:
    return not source.startswith("<") and Path(source).resolve().parent == BUILTIN_CARD_DIR


def _clash(what: str, new: Definition, first: Definition) -> CardError:
    """``what`` is defined twice. The error names the definition being added, at its line and
    field, and where the first one is; a user's card clashing with a built-in one is the one
    named whichever was read first (user folders are read before the built-in folder)."""
    if _is_builtin(new[0]) and not _is_builtin(first[0]) and not first[0].startswith("<"):
        new, first = first, new
    (source, path), (first_source, first_path) = new, first
    return CardError(
        f"{field_location(source, path)}: {dotted(path)}: {what} is already defined in "
        f"{field_location(first_source, first_path)}"
    )


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    return f" (close matches: {', '.join(close)})" if close else ""


_CACHE: dict[tuple[str, ...], Registry] = {}
_REGISTERED: list[dict[str, Any]] = []


def get_registry(extra_dirs: Iterable[str | os.PathLike] = ()) -> Registry:
    """The registry of ``extra_dirs``, ``$CARDTUNE_CARDS`` and the built-in cards, plus every model
    added with :func:`register_model`. Built once per folder set and kept: asking for another
    set (a ``--cards`` command) leaves the others, and what was registered in them, as they are."""
    dirs = card_dirs(extra_dirs)
    key = tuple(str(d.resolve()) for d in dirs)
    registry = _CACHE.get(key)
    if registry is None:
        registry = Registry()
        registry.load_dirs(dirs)
        for kwargs in _REGISTERED:
            registry.register_model(**kwargs)
        _CACHE[key] = registry
    return registry


def register_model(
    model_id: str,
    model_family_id: str,
    model_hf_path: str,
    *,
    revision: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> ModelSpec:
    """Register a model id of an existing family (the seeds' entry point).

    It goes into the default registry (:func:`get_registry` without folders) at once, and into
    every registry of other folders too: those kept so far are dropped, to be rebuilt with it
    on their next use.
    """
    kwargs: dict[str, Any] = {
        "model_id": model_id,
        "model_family_id": model_family_id,
        "model_hf_path": model_hf_path,
        "revision": revision,
        "config_overrides": dict(config_overrides or {}),
    }
    default = get_registry()
    spec = default.register_model(**kwargs)
    _REGISTERED.append(kwargs)
    for key in [k for k, registry in _CACHE.items() if registry is not default]:
        del _CACHE[key]
    return spec
