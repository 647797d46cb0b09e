"""The demo dataset: generated pictures of coloured shapes, with questions and answers.

Written as LLaVA-style JSON (``[{"id", "image", "conversations": [{"from", "value"}]}]``) with
an ``images/`` folder, so the demo exercises the same data path as a user's dataset. Every
image holds one shape of one colour on a white background; ``metadata.json`` records what was
drawn where, so tests can check each answer against the pixels.

A preference split for ``--method dpo`` (docs/PREFERENCE.md) asks the colour of pictures of its
own (held-out ones for its eval part): the chosen answer names the right colour, the rejected one
a wrong colour in the same words. Its training pairs are in LLaVA's preference form, its eval
pairs in TRL's conversational form, so the demo reads both.

The texts are also the training corpus of the demo tokenizer (:func:`corpus`), which is why
they live here as data rather than inside the generator.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardtune.demo.cache import build_once, cache_root, fingerprint

DATASET_NAME = "tiny-llava-demo-data"
TRAIN_FILE = "train.json"
EVAL_FILE = "eval.json"
PREFS_TRAIN_FILE = "prefs_train.json"
PREFS_EVAL_FILE = "prefs_eval.json"
IMAGE_DIR = "images"
METADATA_FILE = "metadata.json"
SEED = 1234
FORMAT = 2  # bump when the generator's logic changes (the constants below are hashed already)

CANVAS = 64
BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 10, "big": 18}  # the shape's half-width in pixels

SHAPE_QUESTIONS = (
    "What shape is in the image?",
    "What do you see in the image?",
    "What is shown in the picture?",
)
COLOUR_QUESTIONS = ("What colour is the shape?", "Which colour does the shape have?")
DESCRIBE_QUESTIONS = ("Describe the image.", "Describe the picture briefly.")
# A two-turn sample asks for the shape alone, then its colour; its own first question keeps
# every question's answer form unambiguous.
SHAPE_ONLY_QUESTION = "Which shape is it?"
FOLLOW_UP_QUESTION = "What colour is it?"
SAME_SHAPE_QUESTION = "Do the two images show the same shape?"
TEXT_ONLY: tuple[tuple[str, str], ...] = (
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a square have?", "A square has four sides."),
    ("Does a circle have corners?", "No, a circle has no corners."),
    ("What colour do you get by mixing blue and yellow?", "You get green."),
    ("Which colours are the primary colours of light?", "Red, green and blue."),
    ("Name a shape with three corners.", "A triangle."),
    ("Hello!", "Hello! Show me an image and I will tell you its shape and colour."),
    ("What can you do?", "I can tell you the shape and the colour in an image."),
)

# How many samples of each kind a split holds (train 320, eval 48).
SPLITS: dict[str, dict[str, int]] = {
    "train": {"single": 200, "two_turn": 64, "two_image": 24, "text": 32},
    "eval": {"single": 30, "two_turn": 8, "two_image": 4, "text": 6},
}
PREFERENCE_SPLITS: dict[str, int] = {"prefs_train": 256, "prefs_eval": 48}
"""Preference pairs per split, each on a picture of its own."""


@dataclass(frozen=True)
class Drawing:
    """What one image shows; ``center`` is a pixel inside the shape, in image coordinates."""

    file: str
    shape: str
    colour: str
    size: str
    center: tuple[int, int]


def _shape_answer(d: Drawing) -> str:
    return f"A {d.colour} {d.shape}."


def _colour_answer(d: Drawing) -> str:
    return f"It is {d.colour}."


def _describe_answer(d: Drawing) -> str:
    return f"A {d.size} {d.colour} {d.shape} on a white background."


def _same_shape_answer(a: Drawing, b: Drawing) -> str:
    if a.shape == b.shape:
        return f"Yes, both show a {a.shape}."
    return f"No, the first shows a {a.shape} and the second a {b.shape}."


def corpus() -> list[str]:
    """Every text the dataset can contain, plus the chat roles: the tokenizer's training text."""
    texts = ["user", "assistant", "system", "<image>\n"]
    texts += [*SHAPE_QUESTIONS, *COLOUR_QUESTIONS, *DESCRIBE_QUESTIONS]
    texts += [SHAPE_ONLY_QUESTION, FOLLOW_UP_QUESTION, SAME_SHAPE_QUESTION]
    texts += [text for pair in TEXT_ONLY for text in pair]
    for shape in SHAPES:
        for colour in COLOURS:
            for size in SIZES:
                d = Drawing("", shape, colour, size, (0, 0))
                texts += [_shape_answer(d), _colour_answer(d), _describe_answer(d), f"A {shape}."]
        for other in SHAPES:
            first, second = Drawing("", shape, "red", "big", (0, 0)), Drawing("", other, "red", "big", (0, 0))
            texts.append(_same_shape_answer(first, second))
    return texts


def _draw(rng: random.Random, file: str) -> tuple[Drawing, Any]:
    from PIL import Image, ImageDraw

    shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
    r = SIZES[size]
    margin = r + 2
    cx, cy = rng.randint(margin, CANVAS - 1 - margin), rng.randint(margin, CANVAS - 1 - margin)
    image = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
    pen = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:  # an upward triangle whose centroid is (cx, cy)
        pen.polygon([(cx, cy - r), (cx - r, cy + r // 2), (cx + r, cy + r // 2)], fill=fill)
    return Drawing(file, shape, colour, size, (cx, cy)), image


def _turn(human: str, gpt: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]


def _split(name: str, rng: random.Random, image_dir: Path) -> tuple[list[dict[str, Any]], list[Drawing]]:
    drawings: list[Drawing] = []

    def new_drawing() -> Drawing:
        drawing, image = _draw(rng, f"{name}_{len(drawings):04d}.png")
        image.save(image_dir / drawing.file)
        drawings.append(drawing)
        return drawing

    kinds = [kind for kind, count in SPLITS[name].items() for _ in range(count)]
    rng.shuffle(kinds)
    samples: list[dict[str, Any]] = []
    for index, kind in enumerate(kinds):
        sample: dict[str, Any] = {"id": f"demo-{name}-{index:04d}"}
        if kind == "single":
            d = new_drawing()
            question, answer = rng.choice(
                [(q, _shape_answer(d)) for q in SHAPE_QUESTIONS]
                + [(q, _colour_answer(d)) for q in COLOUR_QUESTIONS]
                + [(q, _describe_answer(d)) for q in DESCRIBE_QUESTIONS]
            )
            sample["image"] = d.file
            sample["conversations"] = _turn(f"<image>\n{question}", answer)
        elif kind == "two_turn":
            d = new_drawing()
            sample["image"] = d.file
            sample["conversations"] = _turn(f"<image>\n{SHAPE_ONLY_QUESTION}", f"A {d.shape}.") + _turn(
                FOLLOW_UP_QUESTION, _colour_answer(d)
            )
        elif kind == "two_image":
            a, b = new_drawing(), new_drawing()
            sample["image"] = [a.file, b.file]
            sample["conversations"] = _turn(
                f"<image>\n<image>\n{SAME_SHAPE_QUESTION}", _same_shape_answer(a, b)
            )
        else:
            sample["conversations"] = _turn(*rng.choice(TEXT_ONLY))
        samples.append(sample)
    return samples, drawings


def _preference_split(name: str, rng: random.Random, image_dir: Path) -> tuple[list[dict[str, Any]], list[Drawing]]:
    """Pairs asking a picture's colour (or what it shows): the right colour chosen, a wrong one
    rejected, in the same words. The training split in LLaVA's preference form, eval in TRL's."""
    samples: list[dict[str, Any]] = []
    drawings: list[Drawing] = []
    for index in range(PREFERENCE_SPLITS[name]):
        d, image = _draw(rng, f"{name}_{index:04d}.png")
        image.save(image_dir / d.file)
        drawings.append(d)
        wrong = rng.choice([c for c in COLOURS if c != d.colour])
        question, answer = rng.choice([(q, _colour_answer) for q in COLOUR_QUESTIONS]
                                      + [(q, _shape_answer) for q in SHAPE_QUESTIONS])
        chosen, rejected = answer(d), answer(Drawing(d.file, d.shape, wrong, d.size, d.center))
        sample_id = f"demo-{name}-{index:04d}"
        if name == "prefs_train":
            samples.append({"id": sample_id, "image": d.file,
                            "conversations": [{"from": "human", "value": f"<image>\n{question}"}],
                            "chosen": chosen, "rejected": rejected})
        else:
            samples.append({"id": sample_id, "images": [d.file],
                            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                            "chosen": [{"role": "assistant", "content": chosen}],
                            "rejected": [{"role": "assistant", "content": rejected}]})
    return samples, drawings


def _write(folder: Path) -> None:
    rng = random.Random(SEED)
    image_dir = folder / IMAGE_DIR
    image_dir.mkdir()
    metadata: dict[str, dict[str, Any]] = {}
    splits = [(name, file, _split) for name, file in (("train", TRAIN_FILE), ("eval", EVAL_FILE))]
    splits += [(name, file, _preference_split) for name, file in (("prefs_train", PREFS_TRAIN_FILE),
                                                                 ("prefs_eval", PREFS_EVAL_FILE))]
    for name, file, make in splits:  # in this order: the conversations are drawn first, as before
        samples, drawings = make(name, rng, image_dir)
        (folder / file).write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
        metadata.update(
            {
                d.file: {"shape": d.shape, "colour": d.colour, "size": d.size, "center": list(d.center)}
                for d in drawings
            }
        )
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n", encoding="utf-8")


def dataset_version() -> str:
    """``v<FORMAT>-<hash of the constants and texts>``: the cache folder's suffix."""
    return f"v{FORMAT}-{fingerprint(SEED, CANVAS, BACKGROUND, COLOURS, SIZES, SPLITS, PREFERENCE_SPLITS, corpus())}"


def ensure_demo_dataset(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo dataset folder, generated on first use and cached.

    Holds ``train.json`` (320 samples), ``eval.json`` (48), the preference pairs
    ``prefs_train.json`` (256) and ``prefs_eval.json`` (48), ``images/`` (the paths in the JSON
    are relative to it) and ``metadata.json`` (image file -> shape, colour, size, center).
    Sample kinds: one image and one question; one image and two turns; two images; text only.
    """
    target = cache_root(cache_dir) / f"{DATASET_NAME}-{dataset_version()}"
    return build_once(target, _write)
