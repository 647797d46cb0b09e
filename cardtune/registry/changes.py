"""``cardtune check --changed-since REF``: the model ids a change to the cards touched.

A pull request is checked on the models it adds or edits, not on every registered one. The
change is read in the git repository of the current folder (the clone of the pull request):
each card file of a card folder inside it is read at ``REF`` (``git show``) and as it is now.
A model id is changed when its entry is new or differs, or when a field of its family does
(the template, the special tokens: every id of the family then). Card folders outside that
repository (an installed cardtune's built-in cards, another clone) are not part of the change.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from cardtune.registry.errors import CardError
from cardtune.registry.loader import iter_card_files


def changed_model_ids(ref: str, dirs: Iterable[Path], cwd: Path | None = None) -> list[str]:
    """The ids whose entry or family fields differ between git ``ref`` and the working tree,
    for the card folders of ``dirs`` inside the git repository of ``cwd``; sorted."""
    cwd = Path.cwd() if cwd is None else cwd
    top = _git(cwd, ref, "rev-parse", "--show-toplevel")
    if top is None:
        raise CardError(f"--changed-since {ref}: {cwd} is not in a git repository: run it in the clone of the change")
    top_dir = Path(top).resolve()
    if _git(top_dir, ref, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") is None:
        raise CardError(f"--changed-since {ref}: no such commit in {top_dir} (fetch it: `git fetch origin`)")
    inside = [d.resolve() for d in dirs if d.resolve().is_relative_to(top_dir)]
    if not inside:
        raise CardError(f"--changed-since {ref}: no card folder is inside the git repository {top_dir} (give --cards DIR)")
    before: dict[str, Any] = {}
    now: dict[str, Any] = {}
    for folder in inside:
        rel = folder.relative_to(top_dir).as_posix()
        listed = _git(top_dir, ref, "ls-tree", "--name-only", ref, "--", f"{rel}/" if rel != "." else ".") or ""
        for path in listed.splitlines():
            if path.endswith((".yaml", ".yml")):
                before.update(_entries(_git(top_dir, ref, "show", f"{ref}:{path}")))
        for path in iter_card_files([folder]):
            now.update(_entries(path.read_text(encoding="utf-8")))
    return sorted(model_id for model_id, entry in now.items() if before.get(model_id) != entry)


def _entries(text: str | None) -> dict[str, Any]:
    """model id -> (its family's fields, its entry), as the card's YAML writes them."""
    try:
        card = yaml.safe_load(text or "")
    except yaml.YAMLError:
        return {}  # unreadable: every id the file holds now counts as changed
    if not isinstance(card, dict) or not isinstance(card.get("models"), list):
        return {}
    family = {key: value for key, value in card.items() if key != "models"}
    return {e["model_id"]: (family, e) for e in card["models"] if isinstance(e, dict) and "model_id" in e}


def _git(folder: Path, ref: str, *argv: str) -> str | None:
    """``git -C folder argv``'s output, None when git says no."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *argv], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise CardError(f"--changed-since {ref}: git is not installed") from None
    return done.stdout.strip() if done.returncode == 0 else None
