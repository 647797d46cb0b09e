"""Finetune a registered model: ``python train.py --model_id llava-1.5-7b ...``.

A thin entry point; everything lives in :mod:`cardtune.train` (also ``cardtune train``).
"""

from cardtune.train import main

if __name__ == "__main__":
    raise SystemExit(main())
