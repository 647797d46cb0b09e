"""``--method dpo``: preference tuning on pairs of a chosen and a rejected answer to one prompt
(docs/PREFERENCE.md). Each pair is two sequences through the one engine, labelled on the final
answer only, the prompt part checked equal (:mod:`cardtune.collators.pairs`); the loss is one of
:mod:`cardtune.training.preference.losses` against the model at step 0
(:mod:`cardtune.training.preference.reference`), summed over pairs
(:mod:`cardtune.training.preference.trainer`).
"""

from __future__ import annotations

from typing import Any

from cardtune.training.methods import register_method
from cardtune.training.methods.base import Method, TrainingData

LOSS_NAMES = {"sigmoid": "DPO", "robust": "robust DPO", "ipo": "IPO", "simpo": "SimPO (no reference)"}


@register_method("dpo")
class Preference(Method):
    help = "preference tuning: the chosen answer preferred to the rejected one (DPO, IPO, SimPO)"
    options = ("preference_loss", "beta", "label_smoothing", "simpo_gamma", "sft_weight")
    demo_files = ("prefs_train.json", "prefs_eval.json")
    demo_recipe = "demo-dpo.yaml"

    def check(self, args: Any) -> None:
        from cardtune.training.arguments import ArgumentError

        if args.data.packing:
            raise ArgumentError("--packing packs conversations (--method sft); the two sequences of a preference pair "
                                "are batched side by side, not packed", ("packing", "method"))
        if args.training.label_smoothing_factor:
            raise ArgumentError("--label_smoothing_factor smooths the supervised loss; a preference loss takes "
                                "--label_smoothing (the share of flipped pairs)", ("label_smoothing_factor", "method"))
        p = args.preference
        if p.label_smoothing and p.preference_loss == "ipo":
            raise ArgumentError("--label_smoothing: the ipo loss has none (sigmoid, robust and simpo do)",
                                ("label_smoothing", "preference_loss"))
        if "simpo_gamma" in args.sources and p.preference_loss != "simpo":
            raise ArgumentError(f"--simpo_gamma is SimPO's margin; the loss is {p.preference_loss}",
                                ("simpo_gamma", "preference_loss"))
        from cardtune.training.loss import sharding_engine

        engine = sharding_engine(args.training)
        lora = args.tune.use_lora or (args.tune.use_vision_lora and args.tune.train_vision_encoder)
        if engine and not lora and p.preference_loss != "simpo":
            raise ArgumentError(
                f"--method dpo under {engine}: the reference model is the base with LoRA adapters disabled (add "
                "--use_lora); without adapters it is the trained weights' initial values, which a sharded model "
                "cannot swap in. Or --preference_loss simpo, which needs no reference", ("method", "use_lora"))

    def encoder(self, engine: Any) -> Any:
        from cardtune.collators.pairs import PairEncoder

        return PairEncoder(engine)

    def cache_settings(self) -> dict[str, Any]:
        return {"method": "dpo"}  # a pair's problems and length are not its chosen conversation's

    def data(self, splits: Any, encoder: Any, media: Any, prepared: Any, args: Any) -> TrainingData:
        from cardtune.collators.pairs import PairCollator
        from cardtune.training.data import TrainingDataset, failure_policy

        def dataset(split: Any) -> Any:
            return TrainingDataset(split.samples, media, encoder, failure_policy(split))

        train = splits.train
        return TrainingData(dataset(train), dataset(splits.eval) if splits.eval is not None else None,
                            PairCollator(encoder.handler), train.lengths, train.media_flags)

    def describe(self, prepared: Any, arguments: Any) -> list[str]:
        p = arguments.preference
        loss = f"{LOSS_NAMES[p.preference_loss]}, beta {p.beta:g}"
        if p.label_smoothing:
            loss += f", label smoothing {p.label_smoothing:g}"
        if p.preference_loss == "simpo":
            loss += f", gamma {p.simpo_gamma:g}"
        if p.sft_weight:
            loss += f", plus {p.sft_weight:g} x the chosen answer's NLL"
        lines = [f"preference: {loss}; each pair's final answer trained, its prompt checked the same tokens on both "
                 "sides"]
        if _loss(arguments).needs_reference:
            from cardtune.training.preference.reference import describe_reference

            lines.append(f"reference: {describe_reference(prepared.model)}")
        return lines

    def trainer(self, prepared: Any, arguments: Any, /, **common: Any) -> Any:
        from cardtune.training.preference.reference import reference_for
        from cardtune.training.preference.trainer import PreferenceObjective, PreferenceTrainer

        loss = _loss(arguments)
        reference = reference_for(prepared.model) if loss.needs_reference else None
        return PreferenceTrainer(**common, objective=PreferenceObjective(loss, prepared.loss, reference))

    def closing_lines(self, history: list[dict[str, Any]]) -> list[str]:
        for prefix, split in (("eval_", "held-out"), ("", "training")):
            logged = [h for h in history if f"{prefix}logps/accuracies" in h]
            if not logged:
                continue
            first, last = logged[0], logged[-1]
            key = f"{prefix}logps/accuracies"
            shown = [f"{h[key]:.3f} (step {h.get('step', 0)})" for h in ((first, last) if first is not last else (last,))]
            return [f"preference accuracy ({split} pairs whose chosen answer the model gives the higher log-probability): "
                    + " -> ".join(shown),
                    f"reward accuracy: {last[f'{prefix}rewards/accuracies']:.3f}, margin "
                    f"{last[f'{prefix}rewards/margins']:.3f} (step {last.get('step', 0)})"]
        return []


def _loss(arguments: Any) -> Any:
    """The run's preference loss, as its arguments give it."""
    from cardtune.training.preference.losses import PreferenceLoss

    p = arguments.preference
    return PreferenceLoss(p.preference_loss, p.beta, p.label_smoothing, p.simpo_gamma, p.sft_weight)
