"""Model cards: schema, YAML loading, ``register_model`` and lookup."""

from cardtune.registry.errors import CapabilityError, CardError, InputFileError, UnknownModelError
from cardtune.registry.loader import (
    BUILTIN_CARD_DIR,
    CARDS_ENV,
    field_line,
    field_location,
    load_card_file,
    parse_card,
)
from cardtune.registry.registry import ModelSpec, Registry, get_registry, register_model
from cardtune.registry.schema import FamilyCard

__all__ = [
    "BUILTIN_CARD_DIR",
    "CARDS_ENV",
    "CapabilityError",
    "CardError",
    "FamilyCard",
    "InputFileError",
    "ModelSpec",
    "Registry",
    "UnknownModelError",
    "field_line",
    "field_location",
    "get_registry",
    "load_card_file",
    "parse_card",
    "register_model",
]
