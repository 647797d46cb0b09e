"""The longest sequence a model takes, and an encoder that refuses longer samples.

Without ``--max_length`` a sample of any length used to pass validation, and step 1 then tried
to allocate for a million tokens. The limit defaults to the model's own: its config's position
count (the text config's, for a vision-language model), else the tokenizer's
``model_max_length`` when that is a real number (transformers writes 1e30 for "unknown"). A
longer sample is ``too_long``, naming its length, the limit and where the limit came from: it is
not cut, since cutting is what ``--max_length`` asks for (text cut after the last media token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardtune.collators.engine import ChatEncoder, Encoded
from cardtune.errors import SampleError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx", "seq_length", "max_seq_len")
"""Config keys that hold how many positions a model has, by the name each family uses."""
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
"""Where a vision-language model's config keeps its language model's part."""
UNSET_MODEL_MAX_LENGTH = 10**12
"""A tokenizer ``model_max_length`` at or above this is transformers' "not set" (int(1e30))."""


@dataclass(frozen=True)
class LengthLimit:
    tokens: int
    origin: str
    """Where the number came from, for messages: ``config.json text_config.max_position_embeddings``."""


def model_length_limit(path: str, tokenizer: Any, *, revision: str | None = None,
                       config_overrides: dict[str, Any] | None = None) -> LengthLimit | None:
    """The longest sequence the model at ``path`` (a folder, or a hub id in the local cache)
    takes; None when neither its config nor its tokenizer says."""
    config = _config_dict(path, revision)
    for key, value in (config_overrides or {}).items():
        _set(config, key, value)
    for part in (*TEXT_CONFIG_KEYS, None):
        section = config.get(part) if part else config
        if not isinstance(section, dict):
            continue
        for key in POSITION_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return LengthLimit(value, f"config.json {part + '.' if part else ''}{key}")
    default = _class_default(config)
    if default is not None:
        return default
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < UNSET_MODEL_MAX_LENGTH:
        return LengthLimit(value, "the tokenizer's model_max_length")
    return None


def _config_dict(path: str, revision: str | None) -> dict[str, Any]:
    """config.json of a local folder, or of a hub id from the local cache (no download here)."""
    file: Any = Path(path) / "config.json"
    if not file.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            file = try_to_load_from_cache(path, "config.json", revision=revision)
        except ValueError:  # not a valid repo id
            return {}
        if not isinstance(file, str):
            return {}
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _set(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = config.setdefault(name, {})
        if not isinstance(config, dict):
            return
    config[leaf] = value


def _class_default(config: dict[str, Any]) -> LengthLimit | None:
    """A config that leaves the positions to its class's default (llava-onevision's text
    config): the transformers config class says, for model types transformers knows (a
    remote-code config is never imported here)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None
    try:
        text = AutoConfig.for_model(**config).get_text_config()
    except Exception:  # noqa: BLE001 - a config its own class refuses: no default to read
        return None
    for key in POSITION_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return LengthLimit(value, f"{type(text).__name__}'s default {key}; config.json does not set it")
    return None


class LimitedChatEncoder(ChatEncoder):
    """A :class:`ChatEncoder` that, without ``max_length``, refuses samples longer than
    ``limit`` (``too_long``) instead of passing them to a model that cannot take them."""

    def __init__(self, card: Any, processing: Any, *, limit: LengthLimit | None,
                 max_length: int | None = None, **kwargs: Any) -> None:
        super().__init__(card, processing, max_length=max_length, **kwargs)
        self.limit = limit

    def label(self, sample: Any, ids: list[int], tensors: dict[str, Any], **kwargs: Any) -> Encoded:
        if self.max_length is None and self.limit is not None and len(ids) > self.limit.tokens:
            raise SampleError(
                sample.id, "messages", "too_long",
                f"{len(ids)} tokens > {self.limit.tokens}, the longest this model takes ({self.limit.origin}); "
                "shorten or split the sample, or give --max_length to cut text after its last media token",
                sample.source,
            )
        return super().label(sample, ids, tensors, **kwargs)


def length_note(max_length: int | None, limit: LengthLimit | None) -> str | None:
    """A ``--max_length`` above what the model takes: said, not refused (rope scaling may
    stretch a model past its config)."""
    if max_length is None or limit is None or max_length <= limit.tokens:
        return None
    return (f"--max_length {max_length} is above the {limit.tokens} positions this model has ({limit.origin}); "
            "longer samples need rope scaling in the card's config_overrides")


def limited_encoder(card: Any, processing: Any, path: str, *, max_length: int | None = None,
                    revision: str | None = None, config_overrides: dict[str, Any] | None = None,
                    **engine_options: Any) -> LimitedChatEncoder:
    """The encoder training and the data commands use: ``max_length`` when given, else the
    model's own limit (read from the folder or hub cache at ``path``). ``engine_options`` go to
    :class:`ChatEncoder` as they are."""
    limit = model_length_limit(path, processing.tokenizer, revision=revision, config_overrides=config_overrides)
    return LimitedChatEncoder(card, processing, limit=limit, max_length=max_length, **engine_options)
