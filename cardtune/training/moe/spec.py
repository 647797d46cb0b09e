"""What a user asks for (the recipe's ``moe:`` section, the ``--moe_*`` options) and what an
upcycled model is (:class:`MoESpec`, saved with it so it loads again).

No torch here: recipes are checked before anything heavy is imported.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

LAYER_MODES = ("sparse", "dense", "first_half", "second_half")
TRAIN_MODES = ("only_moe", "all", "lora")
SPEC_KEY = "cardtune_moe"
"""The key under which a full model's ``config.json`` holds its :class:`MoESpec`."""
SPEC_FILE = "cardtune_moe.json"
"""An adapter folder's :class:`MoESpec` (its base model is the dense one)."""


class MoEError(ValueError):
    """A mixture-of-experts request that cannot be carried out on this model or card."""


class MoESection(BaseModel):
    """The ``moe:`` section of a training recipe; each key is also a command-line option
    (``layers`` is ``--moe_layers``, ``router_aux_loss_coef`` is itself, the others ``--moe_KEY``)."""

    model_config = ConfigDict(extra="forbid")

    layers: str | list[int]
    num_experts: int | list[int] = 4
    top_k: int = Field(default=2, ge=1)
    router_aux_loss_coef: float = Field(default=0.01, ge=0)
    train: Literal["only_moe", "all", "lora"] = "only_moe"
    capacity_factor: float | None = Field(default=None, gt=0)
    eval_capacity_factor: float | None = Field(default=None, gt=0)
    min_capacity: int = Field(default=4, ge=0)
    use_residual: bool = False

    @field_validator("layers")
    @classmethod
    def _layers_shape(cls, value: str | list[int]) -> str | list[int]:
        if isinstance(value, str):
            parse_layers(value)
        return value

    def arguments(self) -> dict[str, Any]:
        """The section as the flat argument names of the command line."""
        out: dict[str, Any] = {}
        for key in self.model_fields_set | {"layers"}:
            value = getattr(self, key)
            if key in ("layers", "num_experts") and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            out[key if key == "router_aux_loss_coef" else f"moe_{key}"] = str(value) if key == "num_experts" else value
        return out


def section_arguments(section: Any, where: str) -> dict[str, Any]:
    """A recipe's ``moe:`` mapping as arguments; errors name the file and the key."""
    if not isinstance(section, dict):
        raise MoEError(f"{where}: moe: a mapping of MoE options (layers, num_experts, top_k, ...)")
    try:
        return MoESection.model_validate(section).arguments()
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "moe"
        known = ", ".join(MoESection.model_fields)
        extra = f" (known: {known})" if first["type"] == "extra_forbidden" else ""
        raise MoEError(f"{where}: moe.{key}: {first['msg']}{extra}") from None


def parse_layers(value: str) -> str | list[int]:
    """A layer mode name, or explicit decoder-layer indices ``0,2,4``."""
    if value in LAYER_MODES:
        return value
    try:
        indices = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise MoEError(f"--moe_layers {value}: one of {', '.join(LAYER_MODES)}, or layer indices like 0,2,4") from None
    if not indices or any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise MoEError(f"--moe_layers {value}: layer indices must be distinct and >= 0")
    return sorted(indices)


def parse_num_experts(value: str) -> list[int]:
    """One number for every MoE layer, or one per MoE layer (``4,4,8``)."""
    try:
        counts = [int(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise MoEError(f"--moe_num_experts {value}: a number, or one number per MoE layer (4,4,8)") from None
    if not counts or any(c < 2 for c in counts):
        raise MoEError(f"--moe_num_experts {value}: a mixture needs at least 2 experts per layer")
    return counts


def choose_layers(layers: str | list[int], available: list[int]) -> list[int]:
    """The decoder layers to upcycle, MoE-LLaVA's way: ``sparse`` every other layer from the
    first, ``dense`` all, ``first_half``/``second_half``, or the indices given."""
    n = len(available)
    if layers == "dense":
        return list(available)
    if layers == "sparse":
        return available[::2]
    if layers == "first_half":
        return available[: n // 2]
    if layers == "second_half":
        return available[n // 2 :]
    missing = [i for i in layers if i not in available]
    if missing:
        raise MoEError(f"--moe_layers: the model has no decoder layer {', '.join(map(str, missing))} "
                       f"(its layers with an MLP are {available[0]}..{available[-1]})")
    return list(layers)


class MoESpec(BaseModel):
    """An upcycled model's mixtures: which FFNs were replaced and how each routes.

    ``modules`` are the replaced FFNs' names in the (unwrapped) Hugging Face model, ``layers``
    their decoder-layer indices out of ``num_layers``.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    modules: list[str]
    layers: list[int]
    num_layers: int
    num_experts: list[int]
    top_k: int
    router_aux_loss_coef: float
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    min_capacity: int = 4
    use_residual: bool = False

    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    def describe(self) -> str:
        experts = (str(self.num_experts[0]) if len(set(self.num_experts)) == 1
                   else "/".join(map(str, self.num_experts)))
        routing = "dropless" if self.dropless else f"capacity factor {self.capacity_factor}"
        residual = ", residual FFN" if self.use_residual else ""
        return (f"{len(self.layers)} of {self.num_layers} layers ({','.join(map(str, self.layers))}) x {experts} "
                f"experts, top-{self.top_k}, {routing}{residual}")
