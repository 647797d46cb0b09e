"""The generic loader: tokenizer, processor and model of any family, driven by its card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cardtune.conversation import Processing
from cardtune.loaders import register_loader
from cardtune.registry.errors import CardError
from cardtune.registry.schema import FamilyCard

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _folder_chat_template(folder: Path) -> str | None:
    """The processor-level template a model folder ships (chat_template.jinja or .json)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


@register_loader("generic")
class GenericLoader:
    """Loads from a local folder or a hub path; ``card`` decides templates and fix-ups."""

    def __init__(self, card: FamilyCard, path: str | Path, revision: str | None = None) -> None:
        self.card = card
        self.path = str(path)
        self.revision = revision

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"trust_remote_code": self.card.trust_remote_code}
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs

    # -- tokenizer --------------------------------------------------------------------------
    def load_tokenizer(self) -> Any:
        import transformers
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, **self._kwargs())
        except (ValueError, OSError) as auto_error:
            # transformers 5 resolves the tokenizer from config.json's model_type first; for
            # llava-interleave that is the tokenizers backend, which needs tokenizer.json even
            # though the folder ships vocab.json + merges.txt for the declared class.
            declared = _read_json(Path(self.path) / "tokenizer_config.json").get("tokenizer_class")
            cls = getattr(transformers, declared or "", None) if declared else None
            if cls is None:
                raise auto_error
            tokenizer = cls.from_pretrained(self.path, **self._kwargs())
            log.info("AutoTokenizer failed for %s; loaded the declared %s", self.path, declared)
        return self._finish_tokenizer(tokenizer)

    def _finish_tokenizer(self, tokenizer: Any) -> Any:
        """The card's special-token fix-ups, then its chat template (``plain`` writes eos)."""
        from cardtune.loaders.fixups import apply_special_token_fixups

        self.fixup_report = apply_special_token_fixups(
            tokenizer, self.card.chat.special_tokens, where=f"family {self.card.family}: chat.special_tokens"
        )
        for line in self.fixup_report.lines():
            log.info("%s: %s", self.card.family, line)
        self._apply_chat_template(tokenizer)
        # Training pads on the right whatever the folder says (llava-hf ships "left" for
        # generation); the attention mask then marks exactly the real tokens.
        tokenizer.padding_side = "right"
        return tokenizer

    def _apply_chat_template(self, target: Any) -> None:
        from cardtune.chat import card_chat_template

        template = card_chat_template(self.card, getattr(target, "tokenizer", target))
        if template is not None:
            target.chat_template = template

    # -- processor --------------------------------------------------------------------------
    def load_processing(self) -> Processing:
        tokenizer = self.load_tokenizer()
        if not self.card.is_multimodal or not self.card.load_image:
            return Processing(tokenizer=tokenizer)
        from transformers import AutoProcessor

        notes: list[str] = []
        try:
            processor = AutoProcessor.from_pretrained(self.path, **self._kwargs())
            processor.tokenizer = tokenizer
            self._apply_chat_template(processor)
            return Processing(tokenizer, processor, getattr(processor, "image_processor", None))
        except (ImportError, ValueError, OSError, TypeError) as exc:
            notes.append(f"AutoProcessor failed ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})")
        try:
            image_processor = self._load_image_processor()
        except (ImportError, ValueError, OSError) as exc:
            # e.g. phi3-v: a remote-code image processor whose code is not in the folder.
            notes.append(f"no image processor ({type(exc).__name__}); text-only encoding until one is available")
            return Processing(tokenizer, None, None, tuple(notes))
        processor = self._assemble_processor(tokenizer, image_processor, notes)
        if processor is None and self.card.chat.template == "own":
            # The tokenizer renders: give it the processor-level template the folder ships.
            # A card template (jinja, declarative, plain) is already installed and wins.
            template = _folder_chat_template(Path(self.path))
            if template:
                tokenizer.chat_template = template
        return Processing(tokenizer, processor, image_processor, tuple(notes))

    def _load_image_processor(self) -> Any:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.path, **self._kwargs())
        except ImportError:
            # The fast (torchvision) image processor is unavailable: use the PIL one.
            return AutoImageProcessor.from_pretrained(self.path, backend="pil", **self._kwargs())

    def _assemble_processor(self, tokenizer: Any, image_processor: Any, notes: list[str]) -> Any | None:
        import transformers

        folder = Path(self.path)
        name = self.card.processor_class or _read_json(folder / "processor_config.json").get("processor_class")
        cls = getattr(transformers, name or "", None)
        if cls is None:
            notes.append("no processor class to assemble; the family collator expands media tokens")
            return None
        kwargs = {k: v for k, v in _read_json(folder / "processor_config.json").items() if k != "processor_class"}
        if self.card.chat.template == "own":
            template = _folder_chat_template(folder) or tokenizer.chat_template
        else:
            template = tokenizer.chat_template  # the card's, installed by load_tokenizer
        try:
            processor = cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **kwargs)
        except (ImportError, TypeError, ValueError, AttributeError) as exc:
            notes.append(f"{name} could not be assembled ({type(exc).__name__}); the family collator expands media tokens")
            return None
        notes.append(f"assembled {name} from its image processor and tokenizer")
        return processor

    # -- model ------------------------------------------------------------------------------
    def load_model(
        self,
        *,
        dtype: Any = None,
        attn_implementation: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        quantization_config: Any = None,
        device_map: Any = None,
    ) -> Any:
        """The card's ``model_class`` loaded from ``self.path``.

        ``config_overrides`` (the card's, then the model entry's) are set on the config before
        the weights load; a dotted key reaches into a sub-config (``text_config.rope_theta``).
        A class that transformers lacks is only looked up through the folder's ``auto_map``
        when the card trusts remote code.
        """
        import transformers
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path, **self._kwargs())
        for key, value in {**self.card.config_overrides, **(config_overrides or {})}.items():
            _set_config_value(config, key, value)
        cls = getattr(transformers, self.card.model_class, None)
        if cls is None:
            if not self.card.trust_remote_code:
                raise CardError(
                    f"card {self.card.family}: model_class {self.card.model_class} is not a transformers class "
                    "and the card does not set trust_remote_code: true"
                )
            cls = transformers.AutoModelForCausalLM  # the folder's auto_map names the remote class
        kwargs: dict[str, Any] = {"config": config, **self._kwargs()}
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if device_map is not None:
            kwargs["device_map"] = device_map
        return cls.from_pretrained(self.path, **kwargs)


def _set_config_value(config: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    target = config
    for name in parents:
        target = getattr(target, name, None)
        if target is None:
            raise CardError(f"config_overrides: {key}: the config has no sub-config {name!r}")
    setattr(target, leaf, value)
