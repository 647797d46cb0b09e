"""The embedded demo: a tiny LLaVA and a shapes-and-colours dataset, both generated locally.

``python train.py --model_id tiny-llava-demo`` trains it on a fresh machine with no download.
Importing this package is cheap; torch, transformers and Pillow are imported when a folder
is first built.
"""

from cardtune.demo.build import (
    CHAT_TEMPLATE,
    END_OF_TURN,
    IMAGE_TOKEN,
    IMAGE_TOKENS_PER_IMAGE,
    ensure_demo_model,
)
from cardtune.demo.data import (
    EVAL_FILE,
    IMAGE_DIR,
    METADATA_FILE,
    PREFS_EVAL_FILE,
    PREFS_TRAIN_FILE,
    TRAIN_FILE,
    ensure_demo_dataset,
)

__all__ = [
    "CHAT_TEMPLATE",
    "END_OF_TURN",
    "EVAL_FILE",
    "IMAGE_DIR",
    "IMAGE_TOKEN",
    "IMAGE_TOKENS_PER_IMAGE",
    "METADATA_FILE",
    "PREFS_EVAL_FILE",
    "PREFS_TRAIN_FILE",
    "TRAIN_FILE",
    "ensure_demo_dataset",
    "ensure_demo_model",
]
