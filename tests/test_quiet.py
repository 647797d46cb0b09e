"""Noise on every run (issue 18, item 22): a line a user sees either helps them or is not printed.
Each command runs in a fresh process, as a user runs it (transformers warns once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_fixture

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cardtune(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cardtune.cli", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


def data_file(folder: Path) -> Path:
    path = folder / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "messages": [{"role": "user", "content": "Hello, world."},
                                                        {"role": "assistant", "content": "Hi, there!"}]}) + "\n",
                    encoding="utf-8")
    return path


def test_llama3_labels_say_nothing_about_tokenization_spaces(tmp_path: Path) -> None:
    """llama-3's tokenizer_config.json sets clean_up_tokenization_spaces, which transformers
    ignores on a BPE tokenizer with a warning at the first decode (was printed on every run)."""
    folder = require_fixture("llama-3-8b-instruct")
    done = cardtune("labels", "--model_id", "llama-3-8b-instruct", "--model-path", str(folder), "--data",
                    str(data_file(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr
    assert json.loads(done.stdout)["id"] == "a"


def test_a_qwen2_vl_processor_without_torchvision_is_one_line(tmp_path: Path) -> None:
    """cardtune assembles the processor itself where AutoProcessor needs torchvision: the user
    reads that line, not the ImportError it worked around."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: AutoProcessor builds the processor")
    folder = require_fixture("qwen2-vl-2b-instruct")
    done = cardtune("labels", "--model_id", "qwen2-vl-2b-instruct", "--model-path", str(folder), "--data",
                    str(data_file(tmp_path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("cardtune: assembled Qwen2VLProcessor from its image processor (Qwen2VLImageProcessorPil) "
                           "and tokenizer (torchvision is not installed: no videos)\n")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cardtune.train import run

    out = tmp_path_factory.mktemp("quiet") / "adapter"
    run(["--model_id", "tiny-llava-demo", "--max_steps", "1", "--output_dir", str(out), "--eval_strategy", "no",
         "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"])
    return out


def test_one_shot_chat_prints_the_answer_only(adapter: Path, tmp_path: Path) -> None:
    """No "Loading weights" bars before the answer (they were drawn on stderr at every start)."""
    done = cardtune("chat", "--model", str(adapter), "--prompt", "What colour is it?", "--max_new_tokens", "4",
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.strip()


def test_merge_prints_its_own_lines_only(adapter: Path, tmp_path: Path) -> None:
    """No DeepSpeed accelerator warning (deepspeed is imported by accelerate whenever installed),
    no weight-loading or shard-writing bars: what was merged and where it was saved."""
    out = tmp_path / "merged"
    done = cardtune("merge", "--adapter", str(adapter), "--output", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"merged {adapter} into its base ")
    assert (out / "model.safetensors").is_file()


def test_cardtune_warnings_are_one_line() -> None:
    """A capability the card marks experimental: ``warning: ...``, not Python's FILE:LINE:
    Category: message and the source line that raised it."""
    import warnings

    from cardtune.quiet import plain_cardtune_warnings
    from cardtune.training.model import CapabilityWarning

    plain_cardtune_warnings()
    shown = warnings.formatwarning(CapabilityWarning("family x: packing is experimental"), CapabilityWarning,
                                   "/x/train.py", 238, "check_capability(card)")
    assert shown == "warning: family x: packing is experimental\n"
    other = warnings.formatwarning(UserWarning("theirs"), UserWarning, "/x/lib.py", 3, "warn()")
    assert other.startswith("/x/lib.py:3: UserWarning: theirs")
