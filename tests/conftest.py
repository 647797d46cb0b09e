"""Shared test set-up: offline hub, and the real tokenizer/processor fixtures.

The fixtures live outside the repository (``../shared/fixtures`` or ``$CARDTUNE_FIXTURES``).
Tests that need them skip, saying why, only when the folder is absent (a user's clone);
``.ci/run`` refuses to run without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("CARDTUNE_FIXTURES", REPO.parent / "shared" / "fixtures")).resolve()
MODELS = FIXTURES / "models"

# Fixture folders whose name differs from the registered model id.
FIXTURE_OF_MODEL = {"phi3-v": "phi3-vision"}


def fixture_dir(model_id: str) -> Path | None:
    """The real HF files for ``model_id`` in the fixtures, or None when not held."""
    folder = MODELS / FIXTURE_OF_MODEL.get(model_id, model_id)
    return folder if folder.is_dir() else None


def require_fixture(name: str) -> Path:
    """The fixture folder ``name`` (a model id or folder name); skip when fixtures are absent."""
    if not MODELS.is_dir():
        pytest.skip(f"fixtures not found at {FIXTURES} (set CARDTUNE_FIXTURES)")
    folder = fixture_dir(name) or MODELS / name
    if not folder.is_dir():
        raise AssertionError(f"fixture folder {folder} is missing although {MODELS} exists")
    return folder


@pytest.fixture
def fixtures_present() -> Path:
    if not MODELS.is_dir():
        pytest.skip(f"fixtures not found at {FIXTURES} (set CARDTUNE_FIXTURES)")
    return MODELS
