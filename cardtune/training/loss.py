"""The training loss without the whole logits: cross-entropy computed from the last hidden states
and the output embedding, a chunk of trained positions at a time, with its own backward.

The largest tensor of a step on a modern vocabulary is the logits (Gemma 3's 262k vocabulary ×
8k tokens is 8.6 GB in float32, before the copies cross-entropy and its gradient make). Here
the model runs with ``logits_to_keep`` selecting no position (its head projects nothing) and
``output_hidden_states``; the loss then takes only the positions whose shifted label is trained
(most of a VLM sample is image and prompt tokens) and projects them ``chunk_tokens`` at a time.
:class:`ChunkedTokenLogProbs` keeps no chunk's logits: backward projects each chunk again (the
loss is minus their sum; a preference loss sums them per sequence). Peak
memory is about one chunk's logits, not tokens × vocabulary.

It is the loss the model's own forward gives (transformers' ``ForCausalLMLoss``): labels shifted
by one, ``-100`` ignored, the sum divided by ``num_items_in_batch`` when the Trainer passes it,
else the mean; logits upcast to float32 after the head and its soft-capping or scaling, computed
in the model's dtype as the model does. The head is the model's own output-embedding module,
called as it is (tied embeddings, a peft ``lm_head`` with LoRA or a trained copy), so gradients
reach whatever it holds.

Which transform a model class applies after its head, and whether the rest of its loss is the
causal-LM cross-entropy, is not assumed from its config but shown at load on the real model
(:func:`probe_head`): a forward whose head output is replaced by known values shows what the
class does to them. A class that does anything else trains with its own loss, with a note.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 25
"""Logits per chunk (32M: 128 MiB in float32), so 128 tokens at a time on a 262k vocabulary."""


class HeadMismatch(Exception):
    """The model's head or loss is not one the chunked loss reproduces; the message says why."""


# -- what a model does after its head -------------------------------------------------------------
@dataclass(frozen=True)
class LogitTransform:
    """What a model class does to its head's output before the loss, in the model's dtype
    (the operations, in order, of the class's own forward)."""

    name: str
    value: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.name == "softcap":  # Gemma 2 / Gemma 3 text: final_logit_softcapping
            return torch.tanh(logits / self.value) * self.value
        if self.name == "multiply":  # Cohere: logit_scale
            return logits * self.value
        if self.name == "divide":  # Granite: logits_scaling
            return logits / self.value
        return logits

    def describe(self) -> str:
        if self.value is None:
            return ""
        return {"softcap": f"soft-capped at {self.value:g}", "multiply": f"logits × {self.value:g}",
                "divide": f"logits / {self.value:g}"}[self.name]


def candidate_transforms(config: Any) -> list[LogitTransform]:
    """The transforms a class with this (text) config might apply; the probe says which one it does."""
    out = [LogitTransform("identity")]
    for attribute, name in (("final_logit_softcapping", "softcap"), ("logit_scale", "multiply"),
                            ("logits_scaling", "divide")):
        value = getattr(config, attribute, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            out.append(LogitTransform(name, float(value)))
    return out


@dataclass
class OutputHead:
    """The model's output embedding and what its class does around it, as the probe found them."""

    module: nn.Module
    transform: LogitTransform
    vocab_size: int
    uses_num_items: bool = True
    """Whether the model's loss divides by ``num_items_in_batch`` when given it."""
    aux_loss_coef: float | None = None
    """A router load-balancing loss the model adds to its loss (``output_router_logits``)."""
    chunk_tokens: int = 0
    stochastic: bool = field(init=False)
    """The head has dropout (LoRA dropout on lm_head): backward replays the forward's random numbers."""

    def __post_init__(self) -> None:
        if not self.chunk_tokens:
            self.chunk_tokens = max(1, CHUNK_ELEMENTS // self.vocab_size)
        self.stochastic = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.module.modules())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``hidden`` as the model computes them, upcast to float32 as its loss does."""
        return self.transform(self.module(hidden)).float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: set[int] = set()
        out = []
        for p in self.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def describe(self) -> str:
        extra = self.transform.describe()
        return f"{self.chunk_tokens} tokens at a time" + (f", {extra}" if extra else "")


# -- the loss -------------------------------------------------------------------------------------
@contextlib.contextmanager
def replayed_rng(state: tuple[torch.device, Any, Any] | None) -> Iterator[None]:
    """The random numbers of the forward again (dropout in the head), the caller's left as they were."""
    if state is None:
        yield
        return
    device, cpu, accelerator = state
    devices = [device] if accelerator is not None else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.set_rng_state(cpu)
        if accelerator is not None:
            torch.get_device_module(device).set_rng_state(accelerator, device)
        yield


def rng_state(device: torch.device) -> tuple[torch.device, Any, Any]:
    accelerator = torch.get_device_module(device).get_rng_state(device) if device.type != "cpu" else None
    return device, torch.get_rng_state(), accelerator


class ChunkedTokenLogProbs(torch.autograd.Function):
    """``log p(target)`` at each row of ``hidden`` (positions × hidden size), the logits made
    ``head.chunk_tokens`` rows at a time and dropped; backward makes each chunk's logits again (in
    the forward's autocast state and random numbers) for the gradients of ``hidden`` and of the
    head's trainable parameters (passed as ``params``)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, head: OutputHead,
                *params: torch.Tensor) -> torch.Tensor:
        device = hidden.device
        ctx.head = head
        ctx.autocast = (device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = rng_state(device) if head.stochastic and head.module.training else None
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=device)
        step = head.chunk_tokens
        for start in range(0, hidden.shape[0], step):
            logits = head.logits(hidden[start:start + step])
            out[start:start + step] = -F.cross_entropy(logits, targets[start:start + step], reduction="none")
            del logits
        ctx.save_for_backward(hidden, targets, *params)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, targets, *params = ctx.saved_tensors
        head: OutputHead = ctx.head
        want_hidden = ctx.needs_input_grad[0]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grads: list[torch.Tensor | None] = [None] * len(params)
        device_type, enabled, dtype = ctx.autocast
        step = head.chunk_tokens
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled), replayed_rng(ctx.rng):
            for start in range(0, hidden.shape[0], step):
                chunk = hidden[start:start + step].detach().requires_grad_(want_hidden)
                inputs = ([chunk] if want_hidden else []) + [params[i] for i in wanted]
                if not inputs:
                    continue
                logps = -F.cross_entropy(head.logits(chunk), targets[start:start + step], reduction="none")
                got = list(torch.autograd.grad(logps, inputs, grad_out[start:start + step], allow_unused=True))
                if want_hidden:
                    grad_hidden[start:start + step] = got.pop(0)
                for i, g in zip(wanted, got, strict=True):
                    if g is not None:
                        grads[i] = g if grads[i] is None else grads[i].add_(g)
                del logps, got
        return (grad_hidden, None, None, *grads)


def causal_lm_loss(hidden: torch.Tensor, labels: torch.Tensor | None, head: OutputHead,
                   num_items_in_batch: Any = None, shift_labels: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` of the logits ``head`` would make from ``hidden``
    (batch × positions × hidden size), computed only at the positions whose shifted label is
    trained and without ever holding their logits all at once."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    trained = shift_labels != IGNORE_INDEX
    total = -ChunkedTokenLogProbs.apply(hidden[trained], shift_labels[trained], head,
                                        *head.trainable_parameters()).sum()
    if num_items_in_batch is None or not head.uses_num_items:
        return total / trained.sum()  # the mean (NaN without a trained position, as the model's)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def no_positions(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device=like.device)


class ChunkedLossModel:
    """Calls the model as the Trainer would, returning its outputs with the chunked loss: the
    model runs without ``labels``, its head on no position, and the loss comes from its last
    hidden states (plus a router load-balancing loss the model would have added)."""

    def __init__(self, model: Any, head: OutputHead) -> None:
        self.model = model
        self.head = head

    @property
    def training(self) -> bool:
        return bool(self.model.training)

    def __call__(self, **inputs: Any) -> Any:
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        num_items_in_batch = inputs.pop("num_items_in_batch", None)
        anchor = next(v for v in inputs.values() if torch.is_tensor(v))
        outputs = self.model(**inputs, logits_to_keep=no_positions(anchor), output_hidden_states=True)
        loss = causal_lm_loss(outputs.hidden_states[-1], labels, self.head, num_items_in_batch, shift_labels)
        aux = outputs.get("aux_loss")
        if aux is not None and self.head.aux_loss_coef is not None:
            loss = loss + self.head.aux_loss_coef * aux.to(loss.device)
        outputs["loss"] = loss
        return outputs


# -- shown equal at load --------------------------------------------------------------------------
PROBE_IDS = (5, 11, 17, 23, 29, 31, 37, 41)
PROBE_NUM_ITEMS = 3


def _probe_logits(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Head outputs spread over ±40, different at each position: large enough that soft-capping
    or a scale cannot pass for the identity."""
    vocab = shape[-1]
    ramp = torch.linspace(-40.0, 40.0, vocab, device=device)
    rows = [ramp.roll(97 * t) for t in range(shape[-2])]
    return torch.stack(rows).expand(shape).to(dtype).contiguous()


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor, divisor: Any = None) -> torch.Tensor:
    shift = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    total = F.cross_entropy(flat, shift.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (divisor if divisor is not None else (shift != IGNORE_INDEX).sum())


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol)


@dataclass
class _Probe:
    own: Any
    """The model's outputs with labels, its head output replaced by :func:`_probe_logits`."""
    with_items: Any
    """The same with ``num_items_in_batch`` (None: its forward takes no such keyword)."""
    ours: Any
    """Its outputs with ``logits_to_keep`` selecting nothing and ``output_hidden_states``."""
    head_input: torch.Tensor | None
    head_output: torch.Tensor | None


def _run_probe(model: Any, module: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> _Probe:
    seen: dict[str, torch.Tensor] = {}

    def replace(_module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        seen.setdefault("input", args[0].detach())
        seen["output"] = _probe_logits(out.shape, out.dtype, out.device)
        return seen["output"]

    was_training = model.training
    model.eval()
    handle = module.register_forward_hook(replace)
    try:
        with torch.no_grad():
            own = model(input_ids=ids, labels=labels)
            try:
                with_items = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(PROBE_NUM_ITEMS))
            except TypeError:
                with_items = None  # a forward without **kwargs: the Trainer never passes it either
            handle.remove()
            ours = model(input_ids=ids, logits_to_keep=no_positions(ids), output_hidden_states=True)
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HeadMismatch(f"its forward refused the probe ({type(exc).__name__}: {first[:160]})") from None
    finally:
        handle.remove()
        model.train(was_training)
    return _Probe(own, with_items, ours, seen.get("input"), seen.get("output"))


def probe_head(model: Any) -> OutputHead:
    """The model's :class:`OutputHead`, shown on the model itself by three forwards of 8 tokens:
    with labels, its head output replaced by known values (the logits it returns show what the
    class does after its head, its loss the loss function); the same with ``num_items_in_batch``;
    with ``logits_to_keep`` selecting nothing (its last hidden states must be exactly what the
    head read). Raises :class:`HeadMismatch` saying what differs."""
    module = model.get_output_embeddings()
    if module is None:
        raise HeadMismatch("the model has no output embedding (get_output_embeddings)")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype = next(module.parameters()).dtype
    ids = torch.tensor([PROBE_IDS], device=next(module.parameters()).device)
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    probe = _run_probe(model, module, ids, labels)

    replaced = probe.head_output
    if replaced is None:
        raise HeadMismatch("its forward does not call its output embedding")
    if getattr(probe.ours, "logits", None) is None or probe.ours.logits.numel() != 0:
        raise HeadMismatch("its forward does not take logits_to_keep to skip the output embedding")
    hidden = (getattr(probe.ours, "hidden_states", None) or [None])[-1]
    if hidden is None or not _close(hidden, probe.head_input, dtype):
        raise HeadMismatch("its last hidden states (output_hidden_states) are not what its output embedding reads")
    own = probe.own
    transform = next((t for t in candidate_transforms(config) if _close(t(replaced), own.logits, dtype)), None)
    if transform is None:
        raise HeadMismatch("its forward changes the logits after the output embedding in a way cardtune does "
                           "not reproduce")
    aux = own.get("aux_loss")
    coef = getattr(config, "router_aux_loss_coef", None) if aux is not None else None
    if aux is not None and coef is None:
        raise HeadMismatch("its loss adds an auxiliary loss whose weight the config does not name")
    extra = coef * aux if aux is not None else 0.0
    logits = transform(replaced)
    if own.loss is None or not _close(own.loss, _reference_loss(logits, labels) + extra, torch.float32):
        raise HeadMismatch("its loss is not the causal-LM cross-entropy of its logits")
    uses_num_items = True
    if probe.with_items is not None:
        divided = _reference_loss(logits, labels, PROBE_NUM_ITEMS) + extra
        if not _close(probe.with_items.loss, divided, torch.float32):
            if not _close(probe.with_items.loss, own.loss, torch.float32):
                raise HeadMismatch("its loss uses num_items_in_batch in a way cardtune does not reproduce")
            uses_num_items = False
    return OutputHead(module, transform, vocab_size=replaced.shape[-1], uses_num_items=uses_num_items,
                      aux_loss_coef=coef)


def sharding_engine(training_args: Any) -> str | None:
    """DeepSpeed ZeRO-3 or FSDP, which shard the output embedding's weight: gathered around the
    module's own forward, not around the projections backward makes again."""
    import os

    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3"
    if getattr(training_args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    return None


def choose_loss(model: Any, requested: str, training_args: Any = None,
                label_smoothing: float = 0.0) -> tuple[OutputHead | None, str]:
    """The head for the chunked loss (None: the model's own loss) and the run's note saying which."""
    if requested == "model":
        return None, "loss: the model's own (--loss_impl model)"
    why = None
    engine = sharding_engine(training_args) if training_args is not None else None
    if engine:
        why = f"{engine} shards the output embedding"
    elif label_smoothing:
        why = "label smoothing is the Trainer's, on the full logits"
    if why is None:
        try:
            head = probe_head(model)
        except HeadMismatch as exc:
            why = str(exc)
        else:
            return head, (f"loss: chunked cross-entropy from the last hidden states, trained positions only, "
                          f"{head.describe()} (the model's own loss, shown equal at load; --loss_impl model turns it off)")
    return None, f"loss: the model's own ({why}; the chunked loss is not used)"


__all__ = ["CHUNK_ELEMENTS", "ChunkedTokenLogProbs", "ChunkedLossModel", "HeadMismatch", "LogitTransform",
           "OutputHead", "causal_lm_loss", "choose_loss", "probe_head", "sharding_engine"]
