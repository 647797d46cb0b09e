"""Scores of a generated answer against its reference.

- ``exact_match``: the answer is the reference (surrounding whitespace aside);
- ``normalized_match``: equal once case-folded, punctuation removed and whitespace collapsed
  ("It is red." and "it is red" match);
- ``chrf``: chrF (character n-gram F-score, sacrebleu): overlap for answers that are close but
  not equal. Chosen over ROUGE (``rouge-score``) because it needs no word tokenizer: rouge-score's
  default tokenizer keeps only ASCII letters and digits, so a Chinese or Japanese answer scores 0
  against anything, while chrF reads characters in any script. sacrebleu is the reference
  implementation of BLEU and chrF in machine translation (WMT), maintained, pure Python, and
  its scores are comparable across papers;
- ``bleu``: corpus BLEU (sacrebleu, its default 13a tokenizer), for comparison with the literature
  (on one-sentence answers chrF is the steadier of the two);
- a user's scorer, by import path ``module:function``: ``function(prediction, reference)``
  returns a number (or bool), or a dict of named numbers; each is averaged over the samples.
"""

from __future__ import annotations

import importlib
import os
import sys
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any

BUILTIN = ("exact_match", "normalized_match", "chrf")


class ScorerError(ValueError):
    """A ``--scorer`` that cannot be imported or returns something that is not a score."""


def normalize(text: str) -> str:
    """Case-folded, punctuation removed (every Unicode punctuation character), whitespace collapsed."""
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.casefold())
    return " ".join(kept.split())


def load_scorer(path: str) -> Callable[[str, str], Any]:
    """``module:function`` (``module`` importable, or a module in the current folder)."""
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ScorerError(f"--scorer {path}: give module:function (e.g. my_scores:keyword_hit)")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a scorer file next to the data, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScorerError(f"--scorer {path}: cannot import {module_name}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ScorerError(f"--scorer {path}: {module_name} has no function {name}")
    return function


class Scorer:
    """Per-sample scores and the metrics over a set of predictions."""

    def __init__(self, user: Iterable[str] = ()) -> None:
        from sacrebleu.metrics import CHRF

        self._chrf = CHRF()
        self.user = [(path, load_scorer(path)) for path in user]

    def score(self, prediction: str, reference: str) -> dict[str, float]:
        scores = {
            "exact_match": float(prediction.strip() == reference.strip()),
            "normalized_match": float(normalize(prediction) == normalize(reference)),
            "chrf": round(self._chrf.sentence_score(prediction, [reference]).score, 4),
        }
        for path, function in self.user:
            scores.update(self._user_scores(path, function(prediction, reference)))
        return scores

    @staticmethod
    def _user_scores(path: str, value: Any) -> dict[str, float]:
        name = path.partition(":")[2]
        items = value.items() if isinstance(value, dict) else [(name, value)]
        out = {}
        for key, v in items:
            if key in BUILTIN:
                raise ScorerError(f"--scorer {path}: {key!r} is a built-in score; name it otherwise")
            if isinstance(v, bool):
                v = float(v)
            if not isinstance(v, (int, float)):
                raise ScorerError(f"--scorer {path}: returned {type(v).__name__} for {key!r}, not a number")
            out[str(key)] = float(v)
        return out

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics over ``records`` (predictions.jsonl lines): the mean of every per-sample
        score, corpus chrF and BLEU; samples that failed before generation are counted apart."""
        from sacrebleu.metrics import BLEU, CHRF

        scored = [r for r in records if "prediction" in r]
        metrics: dict[str, Any] = {"samples": len(scored), "failed": len(records) - len(scored)}
        if not scored:
            return metrics
        names = list(dict.fromkeys(k for r in scored for k in r.get("scores", {})))
        for name in names:
            values = [r["scores"][name] for r in scored if name in r.get("scores", {})]
            metrics[name] = round(sum(values) / len(values), 4)
        predictions = [r["prediction"] for r in scored]
        references = [[r["reference"] for r in scored]]
        metrics["chrf"] = round(CHRF().corpus_score(predictions, references).score, 4)
        metrics["bleu"] = round(BLEU().corpus_score(predictions, references).score, 4)
        tokens = [r["generated_tokens"] for r in scored if "generated_tokens" in r]
        if tokens:
            metrics["mean_generated_tokens"] = round(sum(tokens) / len(tokens), 2)
        return metrics
