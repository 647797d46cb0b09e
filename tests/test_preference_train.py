"""``--method dpo`` end to end on the demo model (issue 19).

Checked: the demo's preference run logs its figures for train and eval and closes with the
held-out preference accuracy; gradient accumulation sums over pairs (4 × 1 and 1 × 4 give the
same weights, and so do 1 × 3 and 2 + 1, where a mean of per-batch means would not); two gloo
processes give the weights of one process on the same pairs; the LoRA reference is the base
model's logits and the full-finetuning reference the initial weights' (the frozen parts shared);
a resumed run continues as if uninterrupted; arguments DPO cannot train are one line each.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--cpu_threads", "1"]
DPO = ["--model_id", "tiny-llava-demo", "--method", "dpo", *QUIET]
SGD = ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
       "--weight_decay", "0", "--group_by_length", "false", "--save_strategy", "no", "--data_cache", "none"]
TEXT_PAIR = {"id": "text-pair", "conversations": [{"from": "human", "value": "Does a circle have corners?"}],
             "chosen": "No, a circle has no corners.", "rejected": "A triangle has three sides."}


def prefs(folder: Path, n: int, text: bool = False) -> list[str]:
    """``--data_path``/``--image_folder`` for the first ``n`` demo training pairs (and a text-only pair)."""
    from cardtune.demo import IMAGE_DIR, PREFS_TRAIN_FILE, ensure_demo_dataset, ensure_demo_model

    demo = ensure_demo_dataset()
    ensure_demo_model()
    records = json.loads((demo / PREFS_TRAIN_FILE).read_text(encoding="utf-8"))[:n] + ([TEXT_PAIR] if text else [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prefs.json").write_text(json.dumps(records), encoding="utf-8")
    return ["--data_path", str(folder / "prefs.json"), "--image_folder", str(demo / IMAGE_DIR)]


def train(*argv: str) -> Any:
    from cardtune.train import run

    return run([*DPO, *argv])


def trained(result: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.trainer.model.named_parameters() if p.requires_grad}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=1e-5, atol=1e-6, msg=name)


def batch_of(result: Any, n: int) -> dict[str, Any]:
    trainer = result.trainer
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def base_model() -> Any:
    from transformers import LlavaForConditionalGeneration

    from cardtune.demo import ensure_demo_model

    return LlavaForConditionalGeneration.from_pretrained(ensure_demo_model()).eval()


# -- the demo ---------------------------------------------------------------------------------
def test_demo_preference_run_logs_its_figures_and_the_held_out_accuracy(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    result = train("--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4", "--save_strategy", "no")
    printed = capsys.readouterr().out
    assert "reference: the base model with its adapters disabled (no copy of the weights)" in printed
    assert "preference: DPO, beta 0.1; each pair's final answer trained" in printed
    history = json.loads((out / "log_history.json").read_text())
    figures = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "logps/accuracies")
    train_logs = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert len(train_logs) == 4 and all(set(figures) <= set(h) for h in train_logs)
    assert [h["step"] for h in evals] == [0, 4] and all({f"eval_{f}" for f in figures} <= set(h) for h in evals)
    start = evals[0]
    assert start["eval_loss"] == pytest.approx(0.6931, abs=1e-4)  # the policy is the reference at step 0
    assert start["eval_rewards/margins"] == 0 and start["eval_rewards/accuracies"] == 0
    assert f"preference accuracy (held-out pairs whose chosen answer the model gives the higher log-probability): " \
           f"{start['eval_logps/accuracies']:.3f} (step 0) -> {evals[-1]['eval_logps/accuracies']:.3f} (step 4)" in printed
    assert (out / "adapter_model.safetensors").is_file() and result.summary["global_step"] == 4
    report = (out / "report.html").read_text(encoding="utf-8")
    assert ": chosen</h3>" in report and ": rejected (the first" in report


# -- gradient accumulation and processes sum over pairs --------------------------------------
@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One SGD step on the same pairs batched differently: four pairs (one text-only) as 4 × 1
    and 1 × 4; three as 1 × 3 and 2 + 1 (where a mean of the two batches' means would weigh the
    lone pair double)."""
    folder = tmp_path_factory.mktemp("steps")
    four, three = prefs(folder / "four", 3, text=True), prefs(folder / "three", 3)
    runs: dict[str, Any] = {"folder": folder, "three": three}
    for name, data, per_device, accumulation in (("4x1", four, "4", "1"), ("1x4", four, "1", "4"),
                                                 ("1x3", three, "3", "1"), ("2+1", three, "2", "2")):
        runs[name] = train(*data, *SGD, "--output_dir", str(folder / name), "--max_steps", "1",
                           "--per_device_train_batch_size", per_device, "--gradient_accumulation_steps", accumulation)
    return runs


def test_accumulation_weighs_every_pair_the_same(steps: dict[str, Any]) -> None:
    assert_same_weights(trained(steps["4x1"]), trained(steps["1x4"]))
    assert_same_weights(trained(steps["1x3"]), trained(steps["2+1"]))
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in trained(steps["1x3"]).items())  # the step moved them


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate command is not on PATH")
def test_two_processes_sum_over_every_ranks_pairs(steps: dict[str, Any]) -> None:
    """Two gloo processes on three pairs, two on one rank and one on the other (accelerate's
    even_batches off: by default it would repeat a pair to fill the second rank's batch): the
    weights of one process taking the three at once (an average of the ranks' means would weigh
    the lone pair double)."""
    from safetensors.torch import load_file
    from test_train_accelerate import launch_env

    folder = steps["folder"]
    out = folder / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--config_file",
           str(REPO / "configs" / "accelerate" / "cpu.yaml"), str(REPO / "train.py"), *DPO, *steps["three"],
           *SGD, "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
           "--accelerator_config", json.dumps({"even_batches": False})]
    done = subprocess.run(cmd, cwd=folder, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    one = load_file(folder / "1x3" / "adapter_model.safetensors")
    two = load_file(out / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# -- the reference ----------------------------------------------------------------------------
def test_lora_reference_is_the_base_models_logits(steps: dict[str, Any]) -> None:
    assert_reference_is_the_base(steps["4x1"])


def test_vision_lora_reference_is_the_base_models_logits(tmp_path: Path) -> None:
    """Adapters on the vision tower too (and the language model's, and the projector in full)."""
    result = train(*prefs(tmp_path, 4), *SGD, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                   "--per_device_train_batch_size", "4", "--train_vision_encoder", "--use_vision_lora")
    assert any("vision_tower" in n and "lora_B" in n for n in trained(result))
    assert_reference_is_the_base(result)


def assert_reference_is_the_base(result: Any) -> None:
    from cardtune.training.logprobs import sequence_log_probs

    batch = batch_of(result, 4)
    labels = batch.pop("labels")
    peft, base = result.trainer.model.eval(), base_model()
    with torch.no_grad():
        with peft.disable_adapter():
            reference = peft(**batch).logits
        policy = peft(**batch).logits
        want = base(**batch).logits
        objective = result.trainer.cardtune_objective
        ref_logps, _ = objective.reference.log_probs(peft, batch, labels, objective.head)
        base_logps = sequence_log_probs(base, batch, labels, None)[0]
    torch.testing.assert_close(reference, want, rtol=1e-5, atol=1e-5)
    assert (policy - want).abs().max() > 1e-2  # the adapters and the projector did move
    torch.testing.assert_close(ref_logps, base_logps, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("flags,copied", [((), "every trained parameter"), (("--no_train_llm",), "the projector")])
def test_full_finetuning_reference_is_the_initial_weights(tmp_path: Path, flags: tuple[str, ...], copied: str) -> None:
    from cardtune.training.logprobs import sequence_log_probs
    from cardtune.training.preference.reference import InitialWeights

    result = train(*prefs(tmp_path, 4), *SGD, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                   "--per_device_train_batch_size", "4", "--use_lora", "false", *flags)
    objective = result.trainer.cardtune_objective
    assert isinstance(objective.reference, InitialWeights)
    trained_numel = sum(p.numel() for p in result.trainer.model.parameters() if p.requires_grad)
    assert objective.reference.numel == trained_numel  # a copy of the trained parameters only
    if copied == "the projector":
        assert trained_numel == sum(p.numel() for p in result.trainer.model.model.multi_modal_projector.parameters())
    batch = batch_of(result, 4)
    labels = batch.pop("labels")
    model, base = result.trainer.model.eval(), base_model()
    with torch.no_grad():
        ref_logps, _ = objective.reference.log_probs(model, batch, labels, objective.head)
        base_logps = sequence_log_probs(base, batch, labels, None)[0]
        policy_logps = sequence_log_probs(model, batch, labels, None)[0]
    torch.testing.assert_close(ref_logps, base_logps, rtol=1e-5, atol=1e-4)
    assert (policy_logps - base_logps).abs().max() > 1e-2


def test_a_resumed_run_continues_as_if_uninterrupted(tmp_path: Path) -> None:
    """Full finetuning (the reference is the initial weights, taken before the checkpoint loads)."""
    data = prefs(tmp_path, 6)
    common = [*data, "--use_lora", "false", "--max_steps", "4", "--per_device_train_batch_size", "2",
              "--learning_rate", "1e-3", "--group_by_length", "false", "--data_cache", "none"]
    whole = train(*common, "--output_dir", str(tmp_path / "whole"), "--save_strategy", "steps", "--save_steps", "2")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(*common, "--output_dir", str(tmp_path / "resumed"), "--save_strategy", "steps", "--save_steps",
                    "2", "--resume_from_checkpoint", "auto")
    assert resumed.summary["resumed_from"].endswith("checkpoint-2") and resumed.summary["steps_run"] == 2
    assert_same_weights(trained(whole), trained(resumed))
    losses = lambda r: [h["loss"] for h in r.trainer.state.log_history if "loss" in h]  # noqa: E731
    assert losses(resumed)[-2:] == pytest.approx(losses(whole)[-2:], rel=1e-5)


# -- what DPO refuses --------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--method", "dpo", "--packing"], "--packing packs conversations (--method sft)"),
    (["--beta", "0.2"], "--beta: options of --method dpo, but this run's method is sft"),
    (["--method", "dpo", "--label_smoothing_factor", "0.1"], "--label_smoothing_factor smooths the supervised loss"),
    (["--method", "dpo", "--preference_loss", "ipo", "--label_smoothing", "0.1"], "the ipo loss has none"),
    (["--method", "dpo", "--label_smoothing", "0.5"], "--label_smoothing 0.5: a number >= 0 and < 0.5"),
])
def test_what_dpo_cannot_train_is_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.train import main

    assert main(["--model_id", "tiny-llava-demo", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_an_adapter_folder_is_merged_before_it_is_trained_from(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A LoRA finetune's output given as --model_path (the usual start of DPO) would load its
    base without the adapter (it was a transformers traceback: no model_type): one line that says
    how to merge it."""
    from cardtune.train import main

    adapter = tmp_path / "sft-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base",
                                                             "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    (adapter / "tokenizer_config.json").write_text("{}")
    assert main(["--model_path", str(adapter), "--method", "dpo", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"train: --model_path {adapter}: a LoRA adapter (adapter_config.json), not a model: training from "
                   "it would train its base /models/base without the adapter. Merge it first, then train from the "
                   f"merged folder: cardtune merge --adapter {adapter} --output {adapter}-merged, and --model_path "
                   f"{adapter}-merged"]
    assert not (tmp_path / "out").exists()


def test_a_sharded_full_finetune_is_refused_before_anything_loads(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Under ZeRO-3 (or FSDP) the reference is the base with adapters disabled: without LoRA the
    run stops at once (SimPO, which has no reference, goes on)."""
    import cardtune.training.loss as loss
    from cardtune.training.arguments import parse_arguments

    monkeypatch.setattr(loss, "sharding_engine", lambda training_args: "DeepSpeed ZeRO-3")
    from cardtune.train import main

    assert main(["--model_id", "tiny-llava-demo", "--method", "dpo", "--use_lora", "false"]) == 2
    assert "--method dpo under DeepSpeed ZeRO-3: the reference model is the base with LoRA adapters disabled" in \
        capsys.readouterr().err
    parse_arguments(["--model_id", "tiny-llava-demo", "--method", "dpo", "--use_lora", "false",
                     "--preference_loss", "simpo"])
    parse_arguments(["--model_id", "tiny-llava-demo", "--method", "dpo"])  # the demo recipe's LoRA


def test_supervised_data_under_dpo_and_pairs_under_sft_are_reported(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset
    from cardtune.train import main

    demo = ensure_demo_dataset()
    code = main([*DPO, "--data_path", str(demo / TRAIN_FILE), "--image_folder", str(demo / IMAGE_DIR),
                 "--output_dir", str(tmp_path / "a"), "--max_steps", "1", "--data_cache", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "not a preference record: give its 'chosen' and 'rejected' answers" in err
    code = main(["--model_id", "tiny-llava-demo", *QUIET, *prefs(tmp_path, 2), "--output_dir", str(tmp_path / "b"),
                 "--max_steps", "1", "--data_cache", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "a preference record (chosen and rejected answers): train it with --method dpo" in err


@pytest.mark.parametrize("stage,flags,reference", [
    (3, (), "the base model with its adapters disabled"),
    (2, ("--use_lora", "false"), "the trained parameters' initial values"),
])
def test_two_process_deepspeed_runs(stage: int, flags: tuple[str, ...], reference: str, tmp_path: Path) -> None:
    """The shipped ZeRO-3 and ZeRO-2 configs, 2 processes on DeepSpeed's CPU accelerator: LoRA under
    ZeRO-3 (its reference the same sharded model with the adapters off), full finetuning under
    ZeRO-2 (the initial weights swapped in). The rewards move apart: the reference is not the policy."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed; it runs on CPU)")
    from test_train_accelerate import launch_env

    from cardtune.demo import ensure_demo_dataset, ensure_demo_model

    ensure_demo_dataset()
    ensure_demo_model()  # built once here, not by both ranks at once
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", "0", "--config_file",
           f"configs/accelerate/deepspeed_zero{stage}.yaml", "--num_processes", "2", "train.py", *DPO, *flags,
           "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4", "--save_strategy", "no"]
    done = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert f"reference: {reference}" in done.stdout
    evals = [h for h in json.loads((out / "log_history.json").read_text()) if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 4]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3) and evals[-1]["eval_rewards/margins"] != 0
