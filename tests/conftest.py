"""Shared test set-up: offline hub, and the real tokenizer/processor fixtures.

The fixtures live outside the repository (``../shared/fixtures`` or ``$CARDTUNE_FIXTURES``).
Tests that need them skip, saying why, only when the folder is absent (a user's clone);
``.ci/run`` refuses to run without it.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The demo model and data are built into a cache of this session's own, never the user's
# ~/.cache/cardtune (nor a $CARDTUNE_CACHE they set); subprocesses inherit it.
# Made once per session: a test importing ``tests.conftest``, or a worker process unpickling a
# test's function, runs this module again and keeps the session's folder.
_SESSION_ENV = "_CARDTUNE_TEST_SESSION_CACHE"
_made_here = not (os.environ.get(_SESSION_ENV) and Path(os.environ[_SESSION_ENV]).is_dir())
if _made_here:
    os.environ[_SESSION_ENV] = tempfile.mkdtemp(prefix="cardtune-test-cache-")
SESSION_CACHE = Path(os.environ[_SESSION_ENV])
os.environ["CARDTUNE_CACHE"] = str(SESSION_CACHE)

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of a module that sets ``GROUP_ITEMS_BY = "PARAM"`` run grouped by that
    parameter's value (in the order values first appear, each test's own order kept): with its
    per-module caches bounded, every model loads once and only a couple stay in memory."""
    start = 0
    while start < len(items):
        module = items[start].module
        end = start
        while end < len(items) and items[end].module is module:
            end += 1
        name = getattr(module, "GROUP_ITEMS_BY", None)
        if name:
            block = items[start:end]
            order: dict[Any, int] = {}
            for item in block:
                order.setdefault(_param(item, name), len(order))
            items[start:end] = sorted(block, key=lambda item: order[_param(item, name)])
        start = end


def _param(item: pytest.Item, name: str) -> Any:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get(name) if callspec is not None else None


@pytest.fixture(scope="module", autouse=True)
def _memory_back_after_each_module() -> Any:
    """What a module loaded (tokenizers of 262k-token vocabularies, tiny models) given back to
    the system when it ends, so the suite's memory is one module's, not the sum of them all."""
    yield
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the memory is reused all the same
            pass


def pytest_unconfigure(config: pytest.Config) -> None:
    if _made_here:  # a pytest run inside a test leaves its parent's folder alone
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)
