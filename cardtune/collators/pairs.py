"""Preference pairs through the one engine: the chosen and the rejected conversation, each
rendered by the model's own template and labelled exactly (:mod:`cardtune.collators.engine`),
then only the final answer and its end of turn kept trained.

The prompt part of both sequences, every token before the final answer, must be the same ids:
it is checked on each pair, and a pair whose template renders the prompt depending on the answer
is a ``prompt_mismatch``, never trained. An answer whose first characters merge with the prompt's
last token (ChatML's header ends ``assistant\n``; an answer opening with a newline makes it
``\n\n``) parts the two sequences one token early: both answers are then scored from the ids
they share, the other side's answer taking that prompt token with it, as the supervised labels
train the merged token with its answer. No more than that one token moves.

Media are encoded once per pair. The chosen sequence goes through the processor (pixels, media
tokens expanded); the rejected one takes the chosen's expanded prompt and tokenizes only what
follows it: both renders are tokenized without expansion, their common prefix found, and the
chosen's tail checked to be the same ids expanded or not (then the expansion lies wholly in the
prompt). Per-image tensors are the chosen's own objects; a per-token tensor (Qwen2-VL's
``mm_token_type_ids``, Mllama's ``cross_attention_mask``) is the chosen's prompt rows with its
last row repeated over the rejected answer, where the chosen's answer rows are that row too.
Where any of this does not hold, the rejected sequence goes through the processor itself.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from cardtune.collators.engine import IGNORE_INDEX, Encoded
from cardtune.collators.media import is_per_token
from cardtune.conversation import Media, Sample, is_preference, preference_sides
from cardtune.errors import SampleError


@dataclass
class EncodedPair:
    """One preference pair as the model trains on it: two sequences sharing their first
    ``prompt_length`` ids, each labelled on its final answer only."""

    sample_id: str
    chosen: Encoded
    rejected: Encoded
    prompt_length: int
    reused_media: bool = field(default=False)
    """The rejected sequence took the chosen's media tensors (no second processor call)."""

    def __len__(self) -> int:
        """The longer sequence: what the pair's rows are padded to."""
        return max(len(self.chosen), len(self.rejected))

    @property
    def num_truncated(self) -> int:
        return self.chosen.num_truncated + self.rejected.num_truncated

    @property
    def typed_control_tokens(self) -> int:
        return max(self.chosen.typed_control_tokens, self.rejected.typed_control_tokens)

    @property
    def num_trained(self) -> int:
        return self.chosen.num_trained + self.rejected.num_trained


def trained_runs(labels: list[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of trained positions (one per assistant answer)."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


class PairEncoder:
    """Encodes a preference sample into an :class:`EncodedPair`; everything else (card,
    tokenizer, media token ids, length limit) is its engine's, a
    :class:`~cardtune.collators.engine.ChatEncoder` (or one that counts image tokens from
    headers, for validation: :meth:`with_engine`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.engine, name)

    def with_engine(self, engine: Any) -> PairEncoder:
        return PairEncoder(engine)

    def encode(self, sample: Sample, media: Media | None = None) -> EncodedPair:
        if not is_preference(sample):
            raise SampleError(sample.id, "record", "bad_format",
                              "not a preference record: give its 'chosen' and 'rejected' answers (docs/PREFERENCE.md)",
                              sample.source)
        chosen_side, rejected_side = preference_sides(sample)
        recorder = _Recording(self.engine.handler)
        chosen = self._engine_with(recorder).encode(chosen_side, media)
        reexpanded = _Reexpanded(self.engine.handler, recorder)
        rejected = self._engine_with(reexpanded).encode(rejected_side, media)
        starts = (self._final_answer(chosen, chosen_side), self._final_answer(rejected, rejected_side))
        start = min(*starts, _shared(chosen.input_ids, rejected.input_ids))
        if any(own - start > 1 for own in starts):
            raise SampleError(sample.id, "messages", "prompt_mismatch", self._mismatch(chosen, rejected, *starts),
                              sample.source)
        for encoded, own in ((chosen, starts[0]), (rejected, starts[1])):
            encoded.labels[:start] = [IGNORE_INDEX] * start
            # The prompt's last token, where the other side's answer merged into it: scored here
            # too, so that both answers are scored from the same prompt ids.
            encoded.labels[start:own] = encoded.input_ids[start:own]
        return EncodedPair(sample.id, chosen, rejected, start, reused_media=reexpanded.reused)

    def _engine_with(self, handler: Any) -> Any:
        engine = copy.copy(self.engine)  # every setting kept (max_length, typed control tokens, ...)
        engine.handler = handler
        return engine

    @staticmethod
    def _final_answer(encoded: Encoded, side: Sample) -> int:
        """Where the final answer's trained tokens start; the answer cut away is ``too_long``."""
        runs = trained_runs(encoded.labels)
        answers = sum(1 for m in side.messages if m["role"] == "assistant")
        if len(runs) < answers:
            raise SampleError(side.id, "messages", "too_long",
                              f"the final answer is cut away by the length limit ({len(encoded.input_ids)} tokens kept)",
                              side.source)
        return runs[-1][0]

    def _mismatch(self, chosen: Encoded, rejected: Encoded, start_c: int, start_r: int) -> str:
        a, b = chosen.input_ids[:start_c], rejected.input_ids[:start_r]
        at = _shared(a, b)
        decode = self.engine.tokenizer.decode
        return (f"the prompt's tokens differ between the chosen and the rejected sequence at token {at} "
                f"({decode(a[at:at + 4])!r} vs {decode(b[at:at + 4])!r}; prompt {len(a)} vs {len(b)} tokens): "
                "the template renders the prompt depending on the answer (only the prompt's last token may merge "
                "with an answer)")


def _shared(a: list[int], b: list[int]) -> int:
    """How many ids ``a`` and ``b`` share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


class _Recording:
    """The family's media handler, keeping what its last media call was given and returned."""

    def __init__(self, handler: Any) -> None:
        self._handler = handler
        self.call: tuple[str, bool, list[int], dict[str, Any]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def tokenize(self, text: str, sample: Sample, media: Media | None, *, sanitize: bool = False) -> Any:
        ids, tensors = self._handler.tokenize(text, sample, media, sanitize=sanitize)
        self.call = (text, sanitize, ids, tensors)
        return ids, tensors


class _Reexpanded:
    """The family's media handler for the rejected sequence: the chosen's expanded prompt and
    media tensors, then the rejected render's own tokens (see the module)."""

    def __init__(self, handler: Any, chosen: _Recording) -> None:
        self._handler = handler
        self._chosen = chosen
        self.reused = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handler, name)

    def tokenize(self, text: str, sample: Sample, media: Media | None, *, sanitize: bool = False) -> Any:
        reused = self._reuse(text, sample, media, sanitize) if self._chosen.call is not None else None
        if reused is None:
            return self._handler.tokenize(text, sample, media, sanitize=sanitize)
        self.reused = True
        return reused

    def _reuse(self, text: str, sample: Sample, media: Media | None, sanitize: bool) -> Any:
        chosen_text, chosen_sanitize, chosen_ids, tensors = self._chosen.call  # type: ignore[misc]
        if media is None or not (media.images or media.videos) or not self._handler.card.load_image:
            return None  # nothing the processor would expand
        self._handler.check_media(text, sample, media)  # as the processor path checks it
        (plain_chosen,) = self._handler.tokenize_batch([chosen_text], sanitize=chosen_sanitize)
        (plain,) = self._handler.tokenize_batch([text], sanitize=sanitize)
        common = _shared(plain_chosen, plain)
        tail = len(plain_chosen) - common
        prefix = len(chosen_ids) - tail
        if prefix <= 0 or chosen_ids[prefix:] != plain_chosen[common:]:
            return None  # the expansion reaches past the common prefix
        grown = len(plain) - common
        out: dict[str, Any] = {}
        for key, tensor in tensors.items():
            if not is_per_token(tensor, len(chosen_ids)):
                out[key] = tensor  # one per image or patch: the very tensors of the chosen
                continue
            if tail and not bool((tensor[:, prefix:] == tensor[:, prefix - 1 : prefix]).all()):
                return None  # the chosen's answer rows are not its last prompt row repeated
            out[key] = _grown(tensor, prefix, grown)
        return chosen_ids[:prefix] + plain[common:], out


def _grown(tensor: Any, prefix: int, grown: int) -> Any:
    """A per-token tensor's first ``prefix`` rows, then its last of them ``grown`` times."""
    import torch

    last = tensor[:, prefix - 1 : prefix]
    return torch.cat([tensor[:, :prefix], last.expand(-1, grown, *tensor.shape[2:])], dim=1)


class PairCollator:
    """Pairs to one batch: every chosen sequence, then every rejected one (rows ``i`` and
    ``i + pairs``), padded as the family's collator pads conversations."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    def __call__(self, pairs: list[EncodedPair]) -> dict[str, Any]:
        return self.handler([p.chosen for p in pairs] + [p.rejected for p in pairs])
