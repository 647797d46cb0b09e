"""A real two-process data-parallel run (gloo, CPU) on the demo model, launched by
``accelerate launch`` with the shipped config: it completes and the ranks see different data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# train.py with each rank writing the ids of the samples it reads (the trace is the test's own),
# after the test's own ``setup`` code (another test's sampler).
LAUNCH = """
import os, sys
sys.path.insert(0, {repo!r})
from cardtune import datasets
{setup}
read = datasets.ConversationDataset.__getitem__
def traced(self, index):
    item = read(self, index)
    with open(os.path.join({trace!r}, "rank" + os.environ["RANK"] + ".txt"), "a") as f:
        f.write(item.sample_id + "\\n")
    return item
datasets.ConversationDataset.__getitem__ = traced
from cardtune.train import main
sys.exit(main())
"""


def traced_launch(script: Path, trace: Path, setup: str = "") -> Path:
    """``script``: train.py for ``accelerate launch``, each rank tracing its samples into ``trace``."""
    trace.mkdir()
    script.write_text(LAUNCH.format(repo=str(REPO), trace=str(trace), setup=setup), encoding="utf-8")
    return script


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of an ``accelerate launch`` from a test: offline, one thread per process,
    and this interpreter's ``accelerate`` first on PATH."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **extra}


def test_accelerate_config_files_load() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    configs = {p.stem: ClusterConfig.from_yaml_file(str(p)) for p in (REPO / "configs" / "accelerate").glob("*.yaml")}
    assert set(configs) >= {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp", "cpu"}
    for name in ("deepspeed_zero2", "deepspeed_zero3"):
        ds = REPO / configs[name].deepspeed_config["deepspeed_config_file"]
        stage = json.loads(ds.read_text())["zero_optimization"]["stage"]
        assert stage == int(name[-1])
    for path in (REPO / "configs" / "accelerate").glob("*.yaml"):
        assert path.read_text().startswith(f"# accelerate launch --config_file configs/accelerate/{path.name} train.py")


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_two_process_cpu_run_completes_and_ranks_see_different_data(tmp_path: Path) -> None:
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset

    data = ensure_demo_dataset()
    trace = tmp_path / "trace"
    script = traced_launch(tmp_path / "launch.py", trace)
    out = tmp_path / "out"
    cmd = ["accelerate", "launch", "--main_process_port", "0", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"), str(script),
           "--model_id", "tiny-llava-demo", "--data_path", str(data / TRAIN_FILE), "--image_folder", str(data / IMAGE_DIR),
           "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
           "--report_to", "none"]
    import torch

    if torch.cuda.is_available():  # this test is the CPU (gloo) path
        cmd += ["--use_cpu", "true"]
    env = launch_env()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if not torch.cuda.is_available():
        assert "arguments from no CUDA in a multi-process launch: use_cpu" in done.stdout
    seen = {rank: (trace / f"rank{rank}.txt").read_text().split() for rank in (0, 1)}
    assert len(seen[0]) >= 16 and len(seen[1]) >= 16  # 4 steps of 4 samples each
    assert not set(seen[0]) & set(seen[1]), "both ranks read the same samples"
    history = json.loads((out / "log_history.json").read_text())
    assert max(h["step"] for h in history if "loss" in h) == 4
    # 2 ranks x 4 samples per step over the 320 demo samples: the epoch counter is global
    assert [h for h in history if "loss" in h][0]["epoch"] == pytest.approx(8 / 320)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_parse_with_deepspeed(stage: int, tmp_path: Path) -> None:
    """The shipped ZeRO JSONs, their "auto" values filled by the Trainer's own code, are accepted
    by DeepSpeed's config parser (deepspeed installs on a CPU machine: pip install 'cardtune[gpu]'
    builds no ops)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed; no GPU needed to parse)")
    from types import SimpleNamespace

    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    hf = HfTrainerDeepSpeedConfig(str(REPO / "configs" / "deepspeed" / f"zero{stage}.json"))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=1e-4, max_grad_norm=0.5, report_to="none")
    hf.trainer_config_process(args)
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), num_training_steps=10)
    parsed = DeepSpeedConfig(hf.config)
    assert parsed.zero_optimization_stage == stage
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps, parsed.train_batch_size) == (4, 2, 8)
    assert parsed.gradient_clipping == 0.5
    assert parsed.zero_config.gather_16bit_weights_on_model_save is (stage == 3)


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_an_fsdp_config_on_cpu_is_refused_not_trained_as_ddp(tmp_path: Path) -> None:
    """accelerate 1.15 turns FSDP on only on accelerator devices: on CPU the shipped FSDP config
    would train unsharded DDP without a word. Each rank says so in one line and nothing trains;
    the demo model, built by rank 0 first (under FSDP, transformers writes no weights on other
    ranks), is complete."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine runs FSDP for real")
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset

    data = ensure_demo_dataset()
    cache = tmp_path / "cache"  # an empty model cache: the ranks build the demo model themselves
    shutil.copytree(data, cache / data.name)
    out = tmp_path / "out"
    cmd = ["accelerate", "launch", "--main_process_port", "0", "--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
           "--num_processes", "2", str(REPO / "train.py"), "--model_id", "tiny-llava-demo",
           "--data_path", str(cache / data.name / TRAIN_FILE),
           "--image_folder", str(cache / data.name / IMAGE_DIR), "--output_dir", str(out), "--max_steps", "2",
           "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true", "--report_to", "none"]
    env = launch_env(CARDTUNE_CACHE=str(cache))
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    line = ("train: the accelerate config asks for FSDP, but accelerate did not turn it on: these processes run on "
            "cpu, and accelerate runs FSDP only on GPUs (or other accelerators), so they would train unsharded DDP "
            "instead. On CPU, launch with configs/accelerate/cpu.yaml (DDP over gloo)")
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count(line) == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Unrecognized model" not in done.stderr
    assert not (out / "log_history.json").exists() and not (out / "adapter_model.safetensors").exists()
    (model,) = cache.glob("tiny-llava-demo-v*")
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()


def test_deepspeed_on_a_machine_without_an_accelerator_says_nothing_false() -> None:
    """accelerate imports deepspeed in every run once it is installed; on CPU deepspeed then warns
    that it 'was unable to detect' an accelerator. The run names the CPU accelerator instead."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    import torch

    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator: deepspeed detects it")
    code = ("import os\nfrom cardtune.train import name_deepspeed_accelerator\nname_deepspeed_accelerator()\n"
            "import deepspeed\nfrom deepspeed.accelerator import get_accelerator\n"
            "print(os.environ['DS_ACCELERATOR'], get_accelerator().device_name())\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cpu", "cpu"]
    assert "unable to detect" not in done.stdout + done.stderr
