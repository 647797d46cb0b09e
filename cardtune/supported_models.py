"""The seeds' module: ``MODEL_REGISTRY``, ``MODEL_FAMILIES`` and ``MULTIMODAL_KEYWORDS``, from the cards.

Built from the built-in cards plus the folders in ``$CARDTUNE_CARDS`` at import time; the CLI's
``--cards`` folders go through :func:`cardtune.registry.get_registry` instead.
"""

from cardtune.registry import get_registry, register_model

_registry = get_registry()

MODEL_REGISTRY = _registry.models
"""model id -> :class:`cardtune.registry.ModelSpec` (family card, hf path, revision)."""

MODEL_FAMILIES = {model_id: spec.family_id for model_id, spec in _registry.models.items()}
"""model id -> family id, as in the seeds."""

MODEL_HF_PATH = {model_id: spec.hf_path for model_id, spec in _registry.models.items()}

MULTIMODAL_KEYWORDS = _registry.multimodal_keywords()
"""family id -> vision encoder + projector keywords (frozen by default, excluded from LLM LoRA)."""

__all__ = ["MODEL_FAMILIES", "MODEL_HF_PATH", "MODEL_REGISTRY", "MULTIMODAL_KEYWORDS", "register_model"]
