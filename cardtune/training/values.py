"""The values options take, checked before anything uses them: a recipe's values for the type its
field has (a recipe is YAML, so ``learning_rate: fast`` or ``lora_r: {a: 1}`` arrive as they are
written, and argparse's conversion never sees them), and every option's final value, from a
recipe or the command line, for its range (``max_steps: -3``, ``lora_r: 1e20``, a NaN learning
rate). Each problem is one line naming the file and line, or the option, and what it takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cardtune.training.options import NO_DEFAULT, Option

MAX_INT = 2**63 - 1
"""The largest integer torch, numpy and the Trainer's step counters hold."""


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """``low`` itself is excluded."""
    high_open: bool = False
    also: tuple[Any, ...] = ()
    """Values outside the range that mean something (``max_steps -1``: train by epochs)."""
    what: str = ""

    def holds(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.what:
            return self.what
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {_number(self.low)}"
        high = "" if self.high is None else f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return "a number " + " and ".join(p for p in (low, high) if p)


def _number(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
SHARE = Range(0, 1, high_open=True)
STEPS_OR_RATIO = Range(0, low_open=True, what="a number of steps > 0 (below 1: a share of the run)")

RANGES: dict[str, Range] = {
    # cardtune's own
    "cpu_threads": Range(1, 4096), "max_length": Range(1, 2**31 - 1), "max_image_pixels": AT_LEAST_1,
    "validation_workers": Range(1, 4096), "max_skipped_share": Range(0, 1),
    "lora_r": Range(1, 65536), "lora_alpha": POSITIVE, "lora_dropout": SHARE,
    "router_aux_loss_coef": NON_NEGATIVE, "moe_top_k": AT_LEAST_1, "moe_capacity_factor": POSITIVE,
    "moe_eval_capacity_factor": POSITIVE, "moe_min_capacity": NON_NEGATIVE,
    "beta": POSITIVE, "label_smoothing": Range(0, 0.5, high_open=True), "simpo_gamma": NON_NEGATIVE,
    "sft_weight": NON_NEGATIVE,
    # transformers.TrainingArguments
    "learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": SHARE, "adam_beta2": SHARE, "adam_epsilon": POSITIVE,
    "num_train_epochs": Range(0, 1e9, low_open=True),
    "max_steps": Range(1, also=(-1,), what="a number of steps >= 1, or -1 (train --num_train_epochs)"),
    "per_device_train_batch_size": AT_LEAST_1, "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "eval_accumulation_steps": AT_LEAST_1,
    "warmup_steps": Range(0, what="a number of steps >= 0 (below 1: a share of the run)"),
    "logging_steps": STEPS_OR_RATIO, "save_steps": STEPS_OR_RATIO, "eval_steps": STEPS_OR_RATIO,
    "save_total_limit": NON_NEGATIVE, "dataloader_num_workers": NON_NEGATIVE,
    "dataloader_prefetch_factor": AT_LEAST_1, "label_smoothing_factor": SHARE,
    "seed": Range(0, 2**32 - 1, what="a whole number from 0 to 2**32 - 1"),
    "data_seed": Range(0, 2**32 - 1, what="a whole number from 0 to 2**32 - 1"),
}


class ValueProblem(ValueError):
    """A value of the wrong type or out of range; its text says what the option takes."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(option: Option) -> str:
    if option.choices:
        return "one of " + ", ".join(map(str, option.choices))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text",
             list: "a list", dict: "a mapping"}
    kinds = [names[t] for t in (bool, int, float, str, list, dict) if t in option.types]
    if int in option.types and float in option.types:
        kinds.remove("a whole number")
    return " or ".join(kinds) or "a value"


def recipe_value(option: Option, value: Any) -> Any:
    """``value`` as a recipe writes it, for ``option``: the value to use (text converted to a
    number as the command line would: YAML reads ``1e-3`` as text), or :class:`ValueProblem`."""
    types = option.types
    if object in types:
        return value
    if value is None:
        if type(None) in types or option.default is None or option.default is NO_DEFAULT:
            return value
        raise ValueProblem(f"needs a value: {_kind(option)}")
    if isinstance(value, bool):
        if bool in types:
            return value
        word = "yes" if value else "no"  # YAML 1.1 reads the words no and yes as false and true
        if word in option.choices:
            return word
        raise ValueProblem(f"{_kind(option)}, got {_shown(value)}")
    if option.choices:
        if value in option.choices:
            return value
        raise ValueProblem(f"{_kind(option)}, got {_shown(value)}")
    if isinstance(value, list) and list in types:
        item = option.item or str
        for element in value:
            if not isinstance(element, item) or isinstance(element, bool):
                raise ValueProblem(f"a list of {_kind(Option('', frozenset({item})))}, got {_shown(value)}")
        return value
    if isinstance(value, str) and list in types and str not in types:
        return [value]  # one value where a list goes, as the command line takes it
    if isinstance(value, dict) and dict in types:
        return value
    if isinstance(value, str) and str in types:
        return value
    if int in types and float not in types:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueProblem(f"{_kind(option)}, got {_shown(value)}")
    if float in types:
        if isinstance(value, (int, float)):
            return value
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueProblem(f"{_kind(option)}, got {_shown(value)}")
    raise ValueProblem(f"{_kind(option)}, got {_shown(value)}")


def range_problem(name: str, value: Any) -> str | None:
    """What ``value`` of option ``name`` (from any source) should be, when it is out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(value, int) and abs(value) > MAX_INT:
        return f"too large (at most {MAX_INT:,})"
    limits = RANGES.get(name)
    if limits is not None and not limits.holds(value):
        return limits.describe()
    return None


def shown(value: Any) -> str:
    """A value as a problem names it: ``1e+300``, ``-3``, the first digits of a long one."""
    if isinstance(value, float):
        return f"{value:g}"
    return _shown(value)
