"""What a command keeps between runs so that it starts fast: the tokenizer class AutoTokenizer
chose for a folder, and a derived card. Each memo must give exactly what working it out again
gives, and anything that could change the answer must be a miss."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODELS, REPO, require_fixture

from cardtune.hashing import FolderMemo
from cardtune.loaders.generic import GenericLoader, TokenizerClassMemo
from cardtune.registry import FamilyCard

# Every real folder the generic loader reads (qwen-vl-chat has its own tokenizer class).
FOLDERS = sorted(p.name for p in MODELS.iterdir() if p.is_dir() and p.name != "qwen-vl-chat") if MODELS.is_dir() else []
PROBE_TEXTS = ["Hello world", "  two  spaces\tand a tab\n\nnewlines", "日本語のテキスト, émigré, 🙂",
               "<s>[INST] typed <|im_start|> markers </s>", ""]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("CARDTUNE_CACHE", str(folder))
    return folder


def card_for(folder: Path) -> FamilyCard:
    return FamilyCard.model_validate({
        "family": "probe", "model_class": "AutoModelForCausalLM", "modules": {"llm": ["model"]},
        "chat": {"special_tokens": {"allow_shared": True}},
        "models": [{"model_id": "probe", "hf_path": str(folder)}],
    })


def fingerprint(tokenizer) -> dict:
    """What a tokenizer does, as plain data: class, vocabulary, special and added tokens, its
    template and settings, and its ids for awkward texts with and without special tokens."""
    return {
        "class": type(tokenizer).__name__,
        "vocab": tokenizer.get_vocab(),
        "added": {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
        "special": tokenizer.special_tokens_map,
        "template": tokenizer.chat_template,
        "settings": {k: str(v) for k, v in tokenizer.init_kwargs.items()},
        "max_length": tokenizer.model_max_length,
        "ids": [tokenizer(t, add_special_tokens=s)["input_ids"] for t in PROBE_TEXTS for s in (False, True)],
        "decoded": [tokenizer.decode(tokenizer(t)["input_ids"]) for t in PROBE_TEXTS],
    }


def refuse_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoTokenizer

    def refused(*args, **kwargs):
        raise AssertionError("AutoTokenizer was asked although a memo was kept")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refused)


@pytest.mark.parametrize("name", FOLDERS)
def test_the_kept_class_loads_the_tokenizer_autotokenizer_loads(name: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = require_fixture(name)
    first = GenericLoader(card_for(folder), folder).load_tokenizer()
    (kept,) = (cache / "tokenizer-classes").glob("*.json")
    assert json.loads(kept.read_text())["class"] == type(first).__name__
    refuse_auto(monkeypatch)
    second = GenericLoader(card_for(folder), folder).load_tokenizer()
    assert fingerprint(second) == fingerprint(first)


def test_a_changed_file_decides_again(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    shutil.copytree(require_fixture("mistral-7b-instruct-v0.3"), folder)
    GenericLoader(card_for(folder), folder).load_tokenizer()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 4096
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    calls = []
    real = AutoTokenizer.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        calls.append(args[0])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counted))
    tokenizer = GenericLoader(card_for(folder), folder).load_tokenizer()
    assert calls == [str(folder)] and tokenizer.model_max_length == 4096
    assert len(list((cache / "tokenizer-classes").glob("*.json"))) == 2
    GenericLoader(card_for(folder), folder).load_tokenizer()
    assert calls == [str(folder)]  # the new files' memo, now kept


@pytest.mark.parametrize("content", ['{"class": "os"}', '{"class": "AutoModel"}', '{"class": 3}', "not json", '{"class": "NoSuchTokenizer"}'])
def test_a_memo_that_does_not_name_a_loadable_class_is_passed_over(content: str, cache: Path) -> None:
    folder = require_fixture("mistral-7b-instruct-v0.3")
    memo = TokenizerClassMemo.of(str(folder), {"trust_remote_code": False})
    memo.memo.file.parent.mkdir(parents=True)
    memo.memo.file.write_text(content)
    tokenizer = GenericLoader(card_for(folder), folder).load_tokenizer()
    assert tokenizer("Hello")["input_ids"] == [1, 23325]
    assert json.loads(memo.memo.file.read_text())["class"] == type(tokenizer).__name__  # written again


def test_nothing_is_kept_for_remote_code_or_a_hub_id(cache: Path) -> None:
    folder = require_fixture("mistral-7b-instruct-v0.3")
    assert TokenizerClassMemo.of(str(folder), {"trust_remote_code": True}) is None
    assert TokenizerClassMemo.of("mistralai/Mistral-7B-Instruct-v0.3", {"trust_remote_code": False}) is None
    assert FolderMemo.of("tokenizer-classes", cache / "no-such-folder") is None


def test_an_unwritable_cache_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CARDTUNE_CACHE", str(blocker))
    folder = require_fixture("mistral-7b-instruct-v0.3")
    assert GenericLoader(card_for(folder), folder).load_tokenizer()("Hello")["input_ids"] == [1, 23325]


def test_a_derived_card_is_kept_with_what_was_said(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.loaders import discover
    from cardtune.loaders.resolve import derive_card

    folder = require_fixture("llama-3-8b-instruct")
    card, notes = derive_card(folder)
    assert any("meta device" in n for n in notes)

    def refused(*args, **kwargs):
        raise AssertionError("discovery ran again although the derived card was kept")

    monkeypatch.setattr(discover, "module_keywords", refused)
    again, notes_again = derive_card(folder)
    assert again == card and notes_again == notes


def test_labels_on_a_kept_text_model_never_imports_torch(cache: Path, tmp_path: Path) -> None:
    """The command's start-up: AutoTokenizer imports every model config and with them torch
    (about 2 s); with the class kept, ``labels`` of a text model imports neither."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    folder = require_fixture("llama-3-8b-instruct")
    script = ("import sys\nfrom cardtune.cli import main\n"
              f"rc = main(['labels', '--model_id', 'llama-3-8b-instruct', '--model-path', {str(folder)!r}, '--data', {str(data)!r}])\n"
              "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
              "sys.exit(rc)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and '"labels"' in runs[0].stdout
    assert runs[0].stderr.splitlines()[-1] == "torch imported"  # the first run: AutoTokenizer decides
    assert runs[1].stderr.splitlines()[-1] == "torch not imported"


def test_a_large_file_in_the_folder_is_keyed_by_its_size_and_time(cache: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A big file that is not known as weights is not read on every command; changing it is still a miss."""
    from cardtune import hashing

    folder = tmp_path / "model"
    shutil.copytree(require_fixture("mistral-7b-instruct-v0.3"), folder)
    (folder / "archive.tar").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(hashing, "LARGE_FILE", 1024)
    read: list[str] = []
    real = hashing.hash_file
    monkeypatch.setattr(hashing, "hash_file", lambda h, path: (read.append(path.name), real(h, path))[1])
    first = FolderMemo.of("probe", folder).file
    assert "archive.tar" not in read and "tokenizer_config.json" not in read  # over 1 KiB here: stat only
    assert "special_tokens_map.json" in read
    os.utime(folder / "archive.tar", ns=(1, 1))
    assert FolderMemo.of("probe", folder).file != first
