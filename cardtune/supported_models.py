"""The seeds' module: ``MODEL_REGISTRY``, ``MODEL_FAMILIES`` and ``MULTIMODAL_KEYWORDS``, from the cards.

The tables are read-only live views of the default registry, :func:`cardtune.registry.get_registry`
without folders: the built-in cards plus the folders in ``$CARDTUNE_CARDS`` (checked at import,
so a broken card fails the import). A model added later with :func:`register_model` appears in
all of them, also after registries of other folders (the CLI's ``--cards``) were built.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from cardtune.registry import get_registry, register_model

get_registry()  # a broken card is an import error


class _View(Mapping[str, Any]):
    """A read-only mapping computed from the registry on each access."""

    def __init__(self, build: Callable[[], dict[str, Any]]) -> None:
        self._build = build

    def __getitem__(self, key: str) -> Any:
        return self._build()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return repr(self._build())


MODEL_REGISTRY = _View(lambda: get_registry().models)
"""model id -> :class:`cardtune.registry.ModelSpec` (family card, hf path, revision)."""

MODEL_FAMILIES = _View(lambda: {m: spec.family_id for m, spec in get_registry().models.items()})
"""model id -> family id, as in the seeds."""

MODEL_HF_PATH = _View(lambda: {m: spec.hf_path for m, spec in get_registry().models.items()})

MULTIMODAL_KEYWORDS = _View(lambda: get_registry().multimodal_keywords())
"""family id -> vision encoder + projector keywords (frozen by default, excluded from LLM LoRA)."""

__all__ = ["MODEL_FAMILIES", "MODEL_HF_PATH", "MODEL_REGISTRY", "MULTIMODAL_KEYWORDS", "register_model"]
