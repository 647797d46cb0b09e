"""The model card schema: what one YAML file under ``configs/models/`` may say.

Every model a user writes is a pydantic model with ``extra="forbid"``, so a misspelt key is an
error at load time instead of a silently ignored setting.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

Modality = Literal["text", "image", "multi_image", "video"]
CapabilityState = Literal["supported", "experimental", "unsupported"]
SystemPolicy = Literal["auto", "native", "fold", "reject"]
ContentForm = Literal["auto", "string", "parts"]

_MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MODEL_ID_RULE = "a model id is lowercase letters, digits, '.', '_' or '-', e.g. 'llava-1.5-7b'"


def card_rule_error(loc: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error of a rule spanning several fields, located at the field to fix.

    ``loc`` is relative to the model whose validator raises it; pydantic reports such an error
    at that model's own location, so the loader appends ``ctx["loc"]`` to find the field's line.
    """
    return PydanticCustomError("card_rule", "{message}", {"message": message, "loc": loc})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Strict):
    """One model id of a family: where its weights live on the hub."""

    model_id: str
    hf_path: str
    revision: str | None = None
    config_overrides: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model_id")
    @classmethod
    def _model_id_shape(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError(MODEL_ID_RULE)
        return value


class ModuleKeywords(_Strict):
    """Module-name keywords per component: the freeze-lists.

    A keyword matches a parameter when it equals a dotted run of the parameter's name
    (``visual.merger`` matches ``model.visual.merger.mlp.0.weight``).
    """

    vision_encoder: list[str] = Field(default_factory=list)
    vision_projector: list[str] = Field(default_factory=list)
    llm: list[str] = Field(default_factory=list)
    others: list[str] = Field(default_factory=list)
    llm_mlp: list[str] = Field(default_factory=list)
    """The FFN (MLP) module of each language-model decoder layer: a keyword matching the end of
    its name (``mlp`` for ``model.layers.3.mlp``), inside the ``llm`` keywords and outside the
    vision ones. MoE upcycling replaces these modules; not a freeze group."""

    @model_validator(mode="after")
    def _llm_mlp_inside_the_llm(self) -> ModuleKeywords:
        vision = set(self.vision_encoder) | set(self.vision_projector)
        for i, keyword in enumerate(self.llm_mlp):
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", keyword):
                raise card_rule_error(("llm_mlp", i), f"'{keyword}': a module name or dotted run of names, e.g. 'mlp'")
            if keyword in vision:
                raise card_rule_error(("llm_mlp", i), f"'{keyword}' is also a vision keyword")
        return self


class SpecialTokens(_Strict):
    """Special-token fix-ups applied to the tokenizer by the loader.

    Each value is a token string. A token the vocabulary lacks is added (and the embeddings
    resized); an existing one is assigned to the role.
    """

    pad: str | None = None
    unk: str | None = None
    bos: str | None = None
    eos: str | None = None
    allow_shared: bool = False


TOKEN_LITERAL = re.compile(r"\{token:(\d+)\}")


class RoleFormat(_Strict):
    """Text written around one message of a role in a declarative template."""

    prefix: str = ""
    suffix: str = ""


class SystemFormat(RoleFormat):
    """The system slot. ``default`` is written when a conversation has no system message
    (unless ``emit_default`` is false: then it documents the inference prompt only).
    ``inline`` writes the system block inside the first user message, after its prefix
    (Llama-2's ``[INST] <<SYS>>...<</SYS>>``)."""

    default: str | None = None
    emit_default: bool = True
    inline: bool = False


class DeclarativeTemplate(_Strict):
    """A chat template described as data; compiled to Jinja by ``cardtune.chat``.

    A system or user message renders as ``prefix + content + suffix`` of its role, an
    assistant message as ``prefix + content + end_of_turn + suffix``: the answer and its end
    of turn are what training supervises. ``separator`` goes between consecutive messages
    (and before the generation prompt, which defaults to the assistant prefix). Any string
    may hold ``{token:N}``, the token of id N, resolved against the tokenizer when installed.
    ``image``/``video`` render one media part and may use ``{n}`` (its 1-based index in the
    conversation) and ``{path}`` (the part's path or url).
    """

    bos: bool = False
    system: SystemFormat | None = None
    user: RoleFormat = Field(default_factory=RoleFormat)
    assistant: RoleFormat = Field(default_factory=RoleFormat)
    end_of_turn: str = Field(min_length=1)
    separator: str = ""
    generation_prompt: str | None = None
    image: str | None = None
    video: str | None = None

    @model_validator(mode="after")
    def _media_fields_only_in_media(self) -> DeclarativeTemplate:
        for name, text in self._texts():
            if name not in ("image", "video") and ("{n}" in text or "{path}" in text):
                raise ValueError(f"{name}: '{{n}}' and '{{path}}' are only read in 'image' and 'video'")
        return self

    def _texts(self) -> list[tuple[str, str]]:
        texts = [
            ("end_of_turn", self.end_of_turn),
            ("separator", self.separator),
            ("generation_prompt", self.generation_prompt),
            ("image", self.image),
            ("video", self.video),
        ]
        for role in ("system", "user", "assistant"):
            fmt = getattr(self, role)
            if fmt is not None:
                texts += [(f"{role}.prefix", fmt.prefix), (f"{role}.suffix", fmt.suffix)]
        if self.system is not None:
            texts.append(("system.default", self.system.default))
        return [(name, text) for name, text in texts if text]

    @property
    def token_literal_ids(self) -> list[int]:
        """Every id written as ``{token:N}``, in order of first appearance."""
        ids: list[int] = []
        for _, text in self._texts():
            ids += [int(m) for m in TOKEN_LITERAL.findall(text) if int(m) not in ids]
        return ids


class ChatSpec(_Strict):
    """How conversations are rendered and where assistant turns begin and end.

    ``template``: ``own`` keeps the tokenizer's template, ``jinja`` installs ``jinja``,
    ``declarative`` compiles ``declarative``, ``plain`` installs the projector-pretraining
    template (media placeholders, then the caption and eos).
    """

    template: Literal["own", "jinja", "declarative", "plain"] = "own"
    jinja: str | None = None
    declarative: DeclarativeTemplate | None = None
    end_of_turn: list[str] | None = None
    assistant_header: str | None = None
    system: SystemPolicy = "auto"
    content: ContentForm = "auto"
    special_tokens: SpecialTokens = Field(default_factory=SpecialTokens)
    render_date: datetime.date = datetime.date(2024, 7, 26)
    """The day a template that writes today's date (``strftime_now``: Llama-3.x's "Today Date:")
    renders, so labels never depend on the day a run starts (and cached encodings stay valid).
    The default is Llama-3.2's own fallback date."""

    @field_validator("end_of_turn", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _template_source_given_when_asked(self) -> ChatSpec:
        if self.template == "jinja" and not self.jinja:
            raise ValueError("template: jinja needs the template text in 'jinja'")
        if self.template != "jinja" and self.jinja:
            raise ValueError("'jinja' is only read when template: jinja")
        if self.template == "declarative" and self.declarative is None:
            raise ValueError("template: declarative needs a 'declarative' block")
        if self.template != "declarative" and self.declarative is not None:
            raise ValueError("'declarative' is only read when template: declarative")
        if self.template in ("declarative", "plain") and self.end_of_turn:
            # These templates write the end-of-turn text themselves; a card-level one would
            # be appended a second time.
            where = "declarative.end_of_turn" if self.template == "declarative" else "eos"
            raise ValueError(f"template: {self.template} writes its own end of turn ({where}); remove 'end_of_turn'")
        return self


class Capabilities(_Strict):
    lora: CapabilityState = "supported"
    qlora: CapabilityState = "supported"
    flash_attention: CapabilityState = "supported"
    packing: CapabilityState = "experimental"
    video: CapabilityState = "unsupported"


class MediaSpec(_Strict):
    """Media tokens: the token each image (video) becomes in ``input_ids``, and what the chat
    template writes for one where that is another string."""

    image_token: str | None = None
    """The token an image is expanded into, repeated once per feature the model scatters in
    (``config.json``'s ``image_token_index``); never trained."""
    video_token: str | None = None
    image_placeholder: str | None = None
    """What the chat template writes for one image, which the processor expands, where it is not
    ``image_token``: Gemma 3 writes ``<start_of_image>``, which its processor turns into
    ``<start_of_image>`` + 256 ``<image_soft_token>`` + ``<end_of_image>``."""
    video_placeholder: str | None = None
    num_frames: int = Field(default=8, ge=1)

    def placeholder(self, kind: str) -> str | None:
        """What the template writes for one ``kind`` ("image" or "video") part."""
        if kind == "image":
            return self.image_placeholder or self.image_token
        return self.video_placeholder or self.video_token


class FamilyEntries(_Strict):
    """More model ids of a family whose card is defined in another file (a user's folder adding
    checkpoints to a built-in family, without copying or editing its card)."""

    family: str
    models: list[ModelEntry] = Field(min_length=1)


class FamilyCard(_Strict):
    """One model family: everything cardtune needs to load, render, mask and train it."""

    family: str
    description: str = ""
    status: Literal["supported", "experimental"] = "supported"
    status_note: str = ""
    model_class: str
    loader: str = "generic"
    collator: str = "default"
    processor_class: str | None = None
    trust_remote_code: bool = False
    modalities: list[Modality] = Field(default_factory=lambda: ["text"])
    load_image: bool = True
    modules: ModuleKeywords = Field(default_factory=ModuleKeywords)
    chat: ChatSpec = Field(default_factory=ChatSpec)
    media: MediaSpec = Field(default_factory=MediaSpec)
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    capabilities: Capabilities = Field(default_factory=Capabilities)
    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("family")
    @classmethod
    def _family_shape(cls, value: str) -> str:
        if not _MODEL_ID.match(value):
            raise ValueError("a family id is lowercase letters, digits, '.', '_' or '-', e.g. 'llava-1.5'")
        return value

    @property
    def is_multimodal(self) -> bool:
        return any(m != "text" for m in self.modalities)

    @model_validator(mode="after")
    def _consistent(self) -> FamilyCard:
        """Rules across fields; each error names the field to change (see :func:`card_rule_error`)."""
        if "text" not in self.modalities:
            raise card_rule_error(("modalities",), "must include 'text'")
        kind = "multimodal" if self.is_multimodal else "text"
        needed = ("vision_encoder", "vision_projector", "llm") if self.is_multimodal else ("llm",)
        missing = [k for k in needed if not getattr(self.modules, k)]
        if missing:
            raise card_rule_error(("modules",), f"a {kind} family needs module keywords for {', '.join(missing)}")
        if self.capabilities.video != "unsupported" and "video" not in self.modalities:
            raise card_rule_error(
                ("capabilities", "video"),
                f"'{self.capabilities.video}' needs 'video' in modalities (or set it to 'unsupported')",
            )
        first: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            if entry.model_id in first:
                raise card_rule_error(
                    ("models", i, "model_id"),
                    f"model id '{entry.model_id}' is listed twice (first as models[{first[entry.model_id]}])",
                )
            first[entry.model_id] = i
        return self

    @property
    def multimodal_keywords(self) -> list[str]:
        """The flat freeze-list of the seeds: vision encoder and projector keywords."""
        return [*self.modules.vision_encoder, *self.modules.vision_projector]
