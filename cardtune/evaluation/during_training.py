"""``--eval_generate N``: the first N eval samples answered and scored at each evaluation.

Called by the Trainer's log of an evaluation (``eval_loss``), its metrics join that same log
entry, ``eval_exact_match``, ``eval_normalized_match``, ``eval_chrf`` (so ``log_history.json``,
tensorboard and wandb get them beside the eval loss, and ``--metric_for_best_model
exact_match`` can pick a checkpoint by them). Each evaluation's answers are appended to
``generations.jsonl`` in the output folder, with the step, for the run's report.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cardtune.conversation import Sample
from cardtune.errors import SampleError
from cardtune.evaluation.generate import GenerationSettings, Generator
from cardtune.evaluation.metrics import Scorer
from cardtune.evaluation.prompts import Prompt, prompt_for

GENERATIONS_FILE = "generations.jsonl"
LOGGED = ("exact_match", "normalized_match", "chrf")


class GenerationDuringTraining:
    """Scores the model's answers to a fixed set of eval samples; see the module."""

    def __init__(self, samples: Sequence[Sample], count: int, encoder: Any, media: Any, *, max_new_tokens: int = 64,
                 batch_size: int = 8, output_dir: str | Path | None = None, synced_gpus: bool = False) -> None:
        """The first ``count`` of ``samples`` (the eval split) are asked."""
        self.samples = [samples[i] for i in range(min(count, len(samples)))]
        # The whole conversation is encoded to find where its last answer starts: a run's
        # --max_length cut would leave no answer to start from.
        self.encoder = copy.copy(encoder)
        self.encoder.max_length = None
        self.media = media
        self.settings = GenerationSettings(max_new_tokens=max_new_tokens)
        self.synced_gpus = synced_gpus
        self.batch_size = batch_size
        self.file = Path(output_dir) / GENERATIONS_FILE if output_dir is not None else None
        self.scorer = Scorer()
        self._prompts: list[Prompt] | None = None
        self.failed: list[SampleError] = []

    def prompts(self) -> list[Prompt]:
        """Built once, at the first evaluation (media loaded then, kept for the later ones)."""
        from cardtune.data.media import load_media

        if self._prompts is None:
            self._prompts = []
            for sample in self.samples:
                try:
                    self._prompts.append(prompt_for(self.encoder, sample, load_media(sample, self.media)))
                except SampleError as exc:
                    self.failed.append(exc)
            if self.failed and self.file is not None:  # said once, by the main process
                print(f"note: --eval_generate: {len(self.failed)} of {len(self.samples)} eval samples cannot be asked "
                      f"and are left out ({self.failed[0]})", file=sys.stderr, flush=True)
        return self._prompts

    def __call__(self, model: Any, step: int) -> dict[str, float]:
        prompts = self.prompts()
        if not prompts:
            return {}
        generator = Generator(model, self.encoder, self.settings, synced_gpus=self.synced_gpus)
        records = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            for prompt, answer in zip(chunk, generator.generate(chunk), strict=True):
                records.append({"step": step, "id": prompt.sample_id, "prompt": prompt.text,
                                "reference": prompt.reference, "prediction": answer.text,
                                "scores": self.scorer.score(answer.text, prompt.reference)})
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            with self.file.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        metrics = self.scorer.summarise(records)
        return {f"eval_{name}": metrics[name] for name in LOGGED if name in metrics}


def read_generations(output_dir: str | Path) -> dict[int, list[dict[str, Any]]]:
    """``generations.jsonl`` by step (a step written twice, by a run and its resume: the later)."""
    file = Path(output_dir) / GENERATIONS_FILE
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    if not file.is_file():
        return {}
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step.setdefault(record["step"], {})[str(record.get("id"))] = record
    return {step: list(records.values()) for step, records in sorted(by_step.items())}
