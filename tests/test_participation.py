"""A batch that reaches no trainable parameter (issue 18, items 18 and 24): projector-only
training on text-only batches runs, says so before step 1 and counts them; under DDP a rank
whose batch holds no image, while the vision tower, the projector or experts train, neither
hangs nor errs, and DDP searches for no unused parameters."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from cardtune.training.model import group_of

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--save_strategy", "no"]


def demo_subset(folder: Path, images: int, texts: int) -> tuple[Path, Path]:
    """``images`` image samples and ``texts`` text-only samples of the demo's training data."""
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset

    demo = ensure_demo_dataset()
    records = json.loads((demo / TRAIN_FILE).read_text(encoding="utf-8"))
    with_image = [r for r in records if "image" in r and isinstance(r["image"], str)][:images]
    text_only = [r for r in records if "image" not in r and "images" not in r][:texts]
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.json"
    data.write_text(json.dumps(with_image + text_only), encoding="utf-8")
    return data, demo / IMAGE_DIR


def test_projector_only_on_text_only_batches_skips_them_and_says_so(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Length grouping gathers the (shorter) text-only samples into batches of their own: with
    the language model frozen nothing trainable is on their path. Such a step runs (was
    ``RuntimeError: element 0 of tensors does not require grad``), changes no weight, and the run
    warns before step 1 and counts them at the end."""
    from cardtune.demo import ensure_demo_model
    from cardtune.train import main

    data, images = demo_subset(tmp_path, images=4, texts=4)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([*DEMO, "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out),
                 "--no_train_llm", "--use_lora", "false", "--per_device_train_batch_size", "4",
                 "--group_by_length", "true", "--max_steps", "4", "--learning_rate", "1e-2"])
    printed = capsys.readouterr()
    assert code == 0, printed.out[-2000:] + printed.err[-3000:]
    warning = ("warning: 4 of 8 training samples hold no image or video, and only the vision projector trains (the "
               "language model is frozen): those samples train nothing. Projector pretraining (stage 1) is "
               "image-caption data; drop them, or train the language model too")
    assert warning in printed.out
    assert printed.out.index(warning) < printed.out.index("done: 4 steps")
    assert ("note: 2 of 4 training batches reached no trainable parameter (text only, while only vision parts "
            "train): their loss was logged, and they trained nothing") in printed.out
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    # the projector learned (from the image batches); nothing else did
    from transformers import LlavaForConditionalGeneration

    from cardtune.training.output import load_trained

    trained = load_trained(out).model
    base = LlavaForConditionalGeneration.from_pretrained(ensure_demo_model())
    card = _demo_card()
    before = dict(base.named_parameters())
    for name, param in trained.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (group_of(name, card) == "vision_projector"), name


def _demo_card() -> Any:
    from cardtune.registry import get_registry

    return get_registry().get("tiny-llava-demo").family


# Rank 0's batch of odd steps and rank 1's of even steps are text-only (the sampler is the test's
# own); each rank records the ids of the samples it reads (test_train_accelerate.traced_launch).
TEXT_ONLY_ON_ONE_RANK = """
from cardtune.data import batching

def text_only_on_one_rank(self):
    media = [i for i, m in enumerate(self.media) if m]
    text = [i for i, m in enumerate(self.media) if not m]
    b = self.batch_size
    for step in range(len(self) // 2):
        image_batch = media[(step * b) % len(media):][:b] or media[:b]
        text_batch = text[(step * b) % len(text):][:b] or text[:b]
        yield from ([text_batch, image_batch] if step % 2 == 0 else [image_batch, text_batch])

batching.LengthGroupedBatchSampler.__iter__ = text_only_on_one_rank
"""

MODES = {
    "projector-only": ["--no_train_llm", "--use_lora", "false", "--activation_checkpointing", "true"],
    "vision-lora": ["--train_vision_encoder", "--use_vision_lora"],
    "moe": ["--moe_layers", "sparse", "--moe_train", "all", "--activation_checkpointing", "true"],
}


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_rank_with_a_text_only_batch(mode: str, tmp_path: Path) -> None:
    """Two gloo processes, one of whose batches holds no image at every step, while what trains
    includes the projector (and the vision LoRA, or the experts): the run completes, DDP was
    built without find_unused_parameters (no graph search each step, no warning per rank), and
    the trained parts moved on both ranks alike (the saved weights are rank 0's)."""
    from test_train_accelerate import launch_env, traced_launch

    from cardtune.demo import ensure_demo_model

    ensure_demo_model()  # built once here, not by both ranks at once
    data, images = demo_subset(tmp_path / "data", images=8, texts=8)
    trace = tmp_path / "trace"
    script = traced_launch(tmp_path / "launch.py", trace, TEXT_ONLY_ON_ONE_RANK)
    out = tmp_path / "out"
    cmd = ["accelerate", "launch", "--main_process_port", "0", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"), str(script),
           *DEMO, "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out),
           "--per_device_train_batch_size", "2", "--max_steps", "2", "--learning_rate", "1e-2", *MODES[mode]]
    if torch.cuda.is_available():  # this test is the CPU (gloo) path
        cmd += ["--use_cpu", "true"]
    done = subprocess.run(cmd, cwd=tmp_path, env=launch_env(), capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "find_unused_parameters" not in done.stderr
    assert json.loads((out / "cardtune_args.json").read_text())["ddp_find_unused_parameters"] is False
    kinds = {r["id"]: "text" if r.get("image") is None else "image" for r in json.loads(data.read_text())}
    read = {rank: [kinds[i] for i in (trace / f"rank{rank}.txt").read_text().split()] for rank in (0, 1)}
    assert read[0][:4] == ["text", "text", "image", "image"] and read[1][:4] == ["image", "image", "text", "text"]
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_single_process_runs_touch_nothing() -> None:
    """Without DDP nothing is added to the loss: a run is the same as before."""
    from cardtune.training.participation import Participation

    model = torch.nn.Linear(2, 2)
    guard = Participation(model, _demo_card(), distributed=False)
    loss = model(torch.ones(1, 2)).sum()
    assert guard(loss) is loss and guard.report() is None
    frozen = torch.ones(()) * 3
    skipped = guard(frozen)
    skipped.backward()  # runs: nothing to train on this batch
    assert model.weight.grad is None and guard.unreached == 1


def test_the_touch_reaches_every_parameter_outside_the_language_model() -> None:
    """Under DDP the loss carries a zero that each trainable vision or projector parameter is
    part of, so every one gets a gradient (zero where the batch did not reach it)."""
    from transformers import LlavaForConditionalGeneration

    from cardtune.demo import ensure_demo_model
    from cardtune.training.participation import Participation

    model = LlavaForConditionalGeneration.from_pretrained(ensure_demo_model())
    card = _demo_card()
    for name, param in model.named_parameters():
        param.requires_grad_(group_of(name, card) in ("vision_projector", "vision_encoder"))
    guard = Participation(model, card, distributed=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    loss = model(input_ids=ids, labels=ids).loss  # text only: the tower and projector are off its path
    assert not loss.requires_grad
    touched = guard(loss)
    touched.backward()
    assert touched.item() == loss.item()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and not param.grad.any(), name
