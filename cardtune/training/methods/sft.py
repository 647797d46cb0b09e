"""``--method sft`` (the default): supervised finetuning, every answer of a conversation trained
(docs/MASKING.md), one sample or a packed row of several per item."""

from __future__ import annotations

from typing import Any

from cardtune.training.methods import register_method
from cardtune.training.methods.base import Method, TrainingData


@register_method("sft")
class Supervised(Method):
    help = "supervised finetuning: every assistant answer of each conversation trained"
    demo_files = ("train.json", "eval.json")
    demo_recipe = "demo.yaml"

    def data(self, splits: Any, encoder: Any, media: Any, prepared: Any, args: Any) -> TrainingData:
        from cardtune.training.data import PackedCollator, PackedDataset, TrainingDataset, failure_policy

        d = args.data
        card = encoder.card
        eval_dataset = (TrainingDataset(splits.eval.samples, media, encoder, failure_policy(splits.eval))
                        if splits.eval is not None else None)
        if not d.packing:
            train = TrainingDataset(splits.train.samples, media, encoder, failure_policy(splits.train))
            return TrainingData(train, eval_dataset, encoder.handler, splits.train.lengths, splits.train.media_flags)
        capacity = d.max_length or max(splits.train.lengths)
        packed = PackedDataset(splits.train, card, encoder, media, capacity)
        collator = PackedCollator(encoder.handler, prepared.attention, mask_dtype=prepared.model.dtype)
        note = f"packing: {len(splits.train.samples)} samples in {len(packed)} rows of at most {capacity} tokens"
        return TrainingData(packed, eval_dataset, collator, packed.lengths, packed.media_flags, note)

    def trainer(self, prepared: Any, arguments: Any, /, **common: Any) -> Any:
        from cardtune.training.trainer import CardtuneTrainer

        return CardtuneTrainer(**common)
