"""The generic loader: tokenizer, processor and model of any family, driven by its card."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

from cardtune.conversation import Processing
from cardtune.loaders import register_loader
from cardtune.registry.errors import CardError
from cardtune.registry.schema import FamilyCard

log = logging.getLogger(__name__)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def folder_chat_template(folder: Path) -> str | None:
    """The processor-level template a model folder ships (chat_template.jinja or .json)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return read_json(folder / "chat_template.json").get("chat_template")


class TokenizerClassMemo:
    """The tokenizer class AutoTokenizer chose for a local folder (a :class:`~cardtune.hashing.FolderMemo`).

    AutoTokenizer decides the class from config.json, tokenizer_config.json, tokenizer.json and
    the folder's path, then calls ``<class>.from_pretrained(path)``; deciding imports every
    model config, and with them torch. The memo keeps only that decision: a later load calls
    the same ``from_pretrained`` of the same class directly, and anything that could change the
    decision (a file of the folder, the loading arguments, transformers' version) is a miss.
    Only classes that are attributes of ``transformers`` are kept (never remote code), and a
    memo that no longer loads is passed over.
    """

    def __init__(self, path: str, kwargs: dict[str, Any], memo: Any) -> None:
        self.path, self.kwargs, self.memo = path, kwargs, memo

    @classmethod
    def of(cls, path: str, kwargs: dict[str, Any]) -> TokenizerClassMemo | None:
        from cardtune.hashing import FolderMemo

        if kwargs.get("trust_remote_code"):
            return None
        memo = FolderMemo.of("tokenizer-classes", path, kwargs)
        return cls(path, kwargs, memo) if memo is not None else None

    def load(self) -> Any:
        """The tokenizer, loaded with the class kept; None without a (usable) memo."""
        import transformers

        kept = self.memo.load()
        name = kept.get("class") if isinstance(kept, dict) else None
        tokenizer_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if not isinstance(tokenizer_class, type) or not issubclass(tokenizer_class, transformers.PreTrainedTokenizerBase):
            return None  # an edited memo names no tokenizer class; the loading arguments are never the memo's
        try:
            return tokenizer_class.from_pretrained(self.path, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - whatever changed, AutoTokenizer decides again
            log.info("tokenizer class %s kept for %s did not load (%s)", name, self.path, _first_line(exc))
            return None

    def store(self, tokenizer: Any) -> None:
        import transformers

        name = type(tokenizer).__name__
        if getattr(transformers, name, None) is type(tokenizer):  # never a cardtune or remote-code subclass
            self.memo.store({"class": name, "path": self.path})


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
        """The folder's tokenizer, natively unless the card trusts remote code.

        transformers 5 resolves the tokenizer from config.json's ``model_type`` first; where that
        fails (llava-interleave: the tokenizers backend, which needs a tokenizer.json the folder
        lacks; a ``model_type`` transformers does not know, as for remote-code families), the
        class tokenizer_config.json declares is loaded when transformers has it, else the
        folder's tokenizer.json through the tokenizers backend. Remote code never runs here
        unless the card says ``trust_remote_code: true``. The class chosen for a local folder is
        remembered (:class:`TokenizerClassMemo`), so later loads skip AutoTokenizer's import of
        the model configs, which imports torch: about 2 s of every CLI start.
        """
        memo = TokenizerClassMemo.of(self.path, self._kwargs())
        tokenizer = memo.load() if memo is not None else None
        if tokenizer is None:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(self.path, **self._kwargs())
            except Exception as auto_error:  # noqa: BLE001 - any failure: try the native fallbacks
                tokenizer = self._native_tokenizer(auto_error)
            if memo is not None:
                memo.store(tokenizer)
        return self._finish_tokenizer(tokenizer)

    def _native_tokenizer(self, auto_error: Exception) -> Any:
        import transformers

        folder = Path(self.path)
        declared = read_json(folder / "tokenizer_config.json").get("tokenizer_class") or ""
        candidates = [getattr(transformers, declared, None)]
        if (folder / "tokenizer.json").is_file():
            candidates.append(getattr(transformers, "TokenizersBackend", None) or transformers.PreTrainedTokenizerFast)
        tried = []
        for cls in (c for c in candidates if c is not None):
            try:
                tokenizer = cls.from_pretrained(self.path, **self._kwargs())
            except Exception as exc:  # noqa: BLE001
                tried.append(f"{cls.__name__}: {_first_line(exc)}")
                continue
            log.info("AutoTokenizer failed for %s (%s); loaded %s", self.path, _first_line(auto_error), cls.__name__)
            return tokenizer
        remote = "" if self.card.trust_remote_code else (
            " (its tokenizer may be remote code, which cardtune runs only for a card with trust_remote_code: true)"
            if declared and not hasattr(transformers, declared) else "")
        raise CardError(
            f"{self.path}: no tokenizer loads: AutoTokenizer: {_first_line(auto_error)}"
            + "".join(f"; {t}" for t in tried) + (f"; the declared {declared} is not a transformers class"
                                                   if declared and not hasattr(transformers, declared) else "")
            + remote
        )

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
        from cardtune.quiet import bpe_cleanup_off

        bpe_cleanup_off(tokenizer)
        return tokenizer

    def _apply_chat_template(self, target: Any) -> None:
        from cardtune.chat import card_chat_template

        template = card_chat_template(self.card, getattr(target, "tokenizer", target))
        if template is not None:
            target.chat_template = template

    # -- processor --------------------------------------------------------------------------
    def load_processing(self) -> Processing:
        """Tokenizer, and for a family that takes images, the processor.

        The template that renders is the card's (jinja, declarative, plain), else the
        processor's own, else the tokenizer's: older llava-hf snapshots ship a processor with
        no template, and their tokenizer's is the one the model was trained with. Where
        AutoProcessor cannot be built here (its video processor needs torchvision, which these
        CPU machines lack), the processor class is assembled from the image processor (PIL
        backend) and the tokenizer, so images work everywhere and videos say what is missing.
        """
        tokenizer = self.load_tokenizer()
        if not self.card.is_multimodal or not self.card.load_image:
            return Processing(tokenizer=tokenizer)
        from transformers import AutoProcessor

        notes: list[str] = []
        processor = image_processor = None
        video = None
        try:
            processor = AutoProcessor.from_pretrained(self.path, **self._kwargs())
            if not hasattr(processor, "image_processor"):
                # AutoProcessor gives the bare tokenizer for a folder it cannot tell (no config.json)
                raise TypeError(f"AutoProcessor gave a {type(processor).__name__}, not a processor")
            processor.tokenizer = tokenizer
            image_processor = processor.image_processor
        except Exception as exc:  # noqa: BLE001 - ImportError (torchvision), RecursionError, OSError...
            failed = f"AutoProcessor failed ({type(exc).__name__}: {_first_line(exc)})"
            video = f"video needs the video processor of {self.card.family}, which cannot be built here ({_first_line(exc)})"
            try:
                image_processor = self._load_image_processor()
            except Exception as exc2:  # noqa: BLE001 - e.g. phi3-v: remote code not in the folder
                notes.append(failed)
                notes.append(f"no image processor ({type(exc2).__name__}); text-only encoding until one is available")
                self._install_folder_template(tokenizer)
                remote = self._image_processor_is_remote()
                why = (f"the image processor is remote code ({remote}) that {'is not trusted' if not self.card.trust_remote_code else 'does not load'}"
                       if remote else self._why_no_image_processor(exc2))
                return Processing(tokenizer, None, None, tuple(notes), video, why, bool(remote))
            # Recovered: one line saying what is missing, not the ImportError cardtune worked around.
            why = ("torchvision is not installed: no videos" if "orchvision" in str(exc)
                   else f"AutoProcessor: {type(exc).__name__}: {_first_line(exc)}")
            processor = self._assemble_processor(tokenizer, image_processor, notes, why)
            if processor is None:
                notes.insert(0, failed)
        if processor is None:
            self._install_folder_template(tokenizer)
            return Processing(tokenizer, None, image_processor, tuple(notes), video)
        self._settings_from_config(processor, notes)
        if getattr(processor, "video_processor", None) is None and video is None and "video" in self.card.modalities:
            video = f"the processor of {self.card.family} has no video processor here"
        self._apply_chat_template(processor)
        if processor.chat_template is None and self.card.chat.template == "own":
            processor.chat_template = tokenizer.chat_template
            if tokenizer.chat_template is not None:
                notes.append("the processor has no chat template: the tokenizer's renders")
        return Processing(tokenizer, processor, image_processor, tuple(notes), video)

    def _settings_from_config(self, processor: Any, notes: list[str]) -> None:
        """Processor settings a folder's processor_config.json leaves out (older snapshots):
        ``num_additional_image_tokens`` measured on the vision tower (CLIP's class token: without
        it every image is one token short of the model's features), then unset ones
        (``patch_size``, ``vision_feature_select_strategy`` of the llava-next processors: without
        them an image cannot be expanded) from the model config by the same name."""
        config = read_json(Path(self.path) / "config.json")
        places = [config, config.get("vision_config") or {}]
        filled = []
        written = read_json(Path(self.path) / "processor_config.json")
        if "num_additional_image_tokens" in vars(processor) and "num_additional_image_tokens" not in written:
            extra = self._vision_extra_tokens()
            if extra is not None and extra != processor.num_additional_image_tokens:
                processor.num_additional_image_tokens = extra
                filled.append(f"num_additional_image_tokens={extra} (the vision tower's, measured)")
        for name, value in vars(processor).items():
            if value is None and not name.startswith("_"):
                found = next((c[name] for c in places if c.get(name) is not None), None)
                if isinstance(found, (int, float, str)):
                    setattr(processor, name, found)
                    filled.append(f"{name}={found!r}")
        if filled:
            notes.append(f"processor settings the folder leaves out: {', '.join(filled)}")

    def _vision_extra_tokens(self) -> int | None:
        """Tokens the vision tower outputs beyond its patches (1 for CLIP's class token, 0 for
        SigLIP), from a forward pass on the meta device (no weights, no memory)."""
        import torch
        from transformers import AutoConfig, AutoModel

        try:
            vision = AutoConfig.from_pretrained(self.path, **self._kwargs()).vision_config
            with torch.device("meta"):
                tower = AutoModel.from_config(vision)
                pixels = torch.empty(1, vision.num_channels, vision.image_size, vision.image_size)
                tokens = tower(pixel_values=pixels).last_hidden_state.shape[1]
            return int(tokens - (vision.image_size // vision.patch_size) ** 2)
        except Exception:  # noqa: BLE001 - a tower that cannot run on meta: the processor's default
            return None

    def _install_folder_template(self, tokenizer: Any) -> None:
        """With no processor, the tokenizer renders: give it the processor-level template the
        folder ships (it is the one that writes media). A card template is already installed."""
        if self.card.chat.template == "own":
            template = folder_chat_template(Path(self.path))
            if template:
                tokenizer.chat_template = template

    def _why_no_image_processor(self, exc: BaseException) -> str:
        name = read_json(Path(self.path) / "preprocessor_config.json").get("image_processor_type") or "its image processor"
        if "torchvision" in str(exc).lower():
            return (f"no image processor loads here: {name} needs torchvision, which is not installed, and transformers "
                    "has no PIL version of it")
        return f"no image processor loads here ({type(exc).__name__}: {_first_line(exc)})"

    def _image_processor_is_remote(self) -> str | None:
        """The image processor class the folder names, where transformers has no such class
        (remote code), else None."""
        import transformers

        config = read_json(Path(self.path) / "preprocessor_config.json")
        name = config.get("image_processor_type") or ""
        auto = (config.get("auto_map") or {}).get("AutoImageProcessor")
        if auto or (name and getattr(transformers, name, None) is None):
            return str(auto or name)
        return None

    def _load_image_processor(self) -> Any:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(self.path, **self._kwargs())
        except ImportError:
            # The fast (torchvision) image processor is unavailable: use the PIL one.
            return AutoImageProcessor.from_pretrained(self.path, backend="pil", **self._kwargs())

    def _processor_class_name(self) -> str | None:
        folder = Path(self.path)
        for name in (
            self.card.processor_class,
            read_json(folder / "processor_config.json").get("processor_class"),
            read_json(folder / "preprocessor_config.json").get("processor_class"),
            read_json(folder / "tokenizer_config.json").get("processor_class"),
        ):
            if name:
                return name
        model_type = read_json(folder / "config.json").get("model_type")
        if model_type:
            from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

            return PROCESSOR_MAPPING_NAMES.get(model_type)
        return None

    def _assemble_processor(self, tokenizer: Any, image_processor: Any, notes: list[str], why: str) -> Any | None:
        import transformers

        folder = Path(self.path)
        name = self._processor_class_name()
        cls = getattr(transformers, name or "", None)
        if cls is None:
            notes.append("no processor class to assemble" + (f" ({name} is not a transformers class)" if name else ""))
            return None
        kwargs = {k: v for k, v in read_json(folder / "processor_config.json").items() if k != "processor_class"}
        template = folder_chat_template(folder) if self.card.chat.template == "own" else None
        try:
            processor = _without_video(cls)(
                image_processor=image_processor, tokenizer=tokenizer, chat_template=template, **_video_slot(cls), **kwargs
            )
        except Exception as exc:  # noqa: BLE001
            notes.append(f"{name} could not be assembled ({type(exc).__name__}: {_first_line(exc)})")
            return None
        processor.assembled_kwargs = kwargs
        notes.append(f"assembled {name} from its image processor ({type(image_processor).__name__}) and tokenizer ({why})")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _video_slot(cls: type) -> dict[str, Any]:
    """``video_processor=None`` for a processor class that has that slot."""
    return {"video_processor": None} if "video_processor" in cls.get_attributes() else {}


@functools.cache
def _without_video(cls: type) -> type:
    """``cls`` accepting ``video_processor=None``: the processors of image+video families
    (onevision, qwen2-vl, llava-next-video) check every slot's class, and the video one
    cannot exist without torchvision. Images are unaffected; videos are refused before the
    processor is called (:attr:`Processing.video_unavailable`)."""

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        assembled_kwargs: dict[str, Any] = {}

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> list[str]:
            """What exists is saved as the processor's own save would write it: the tokenizer,
            the image processor, the chat template and processor_config.json (the Trainer
            saves its processing class with every checkpoint); there is no video processor."""
            folder = Path(save_directory)
            folder.mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(folder)
            self.image_processor.save_pretrained(folder)
            if isinstance(self.chat_template, str):
                (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            config = folder / "processor_config.json"
            config.write_text(json.dumps({"processor_class": cls.__name__, **self.assembled_kwargs}, indent=2) + "\n",
                              encoding="utf-8")
            return [str(config)]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def _set_config_value(config: Any, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    target = config
    for name in parents:
        target = getattr(target, name, None)
        if target is None:
            raise CardError(f"config_overrides: {key}: the config has no sub-config {name!r}")
    setattr(target, leaf, value)
