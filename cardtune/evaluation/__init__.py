"""Generation evaluation: does the finetuned model answer better?

For each sample, the conversation up to its last user turn is rendered exactly as training
renders it (the engine's normalisation, the card's template with its frozen date, the media
expanded by the same processor) and followed by the generation prompt; the model generates
in left-padded batches until one of its own end-of-turn tokens, and the answer is scored
against the sample's last assistant turn.

- :mod:`~cardtune.evaluation.prompts`: a sample's prompt and reference (``cardtune chat`` builds
  its prompts here too, so both see the same tokens);
- :mod:`~cardtune.evaluation.generate`: batched generation with left padding and stop tokens;
- :mod:`~cardtune.evaluation.metrics`: exact match, normalised match, chrF and BLEU
  (sacrebleu), and user scorers by import path;
- :mod:`~cardtune.evaluation.run`: ``cardtune eval``'s loop: predictions.jsonl (resumable),
  metrics.json;
- :mod:`~cardtune.evaluation.during_training`: ``--eval_generate N``, scored at each evaluation.

Layer: above ``data/`` and ``collators/``, below ``training/`` (which calls it during a run).
"""
