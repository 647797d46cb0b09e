"""One output folder, one run: ``auto`` resumes only this run's own complete checkpoints, a
fresh run never mixes with (or rotates away) an earlier one, and a full disk is one clear error
after which ``auto`` still continues. Runs are the demo model on the demo data, a few steps."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

# The demo model on the demo data, every step logged, no eval.
DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]


def train(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cardtune.train import main

    code = main([*DEMO, *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _steps(history: list[dict]) -> list[int]:
    return [h["step"] for h in history if "loss" in h]


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its sha256: what is on disk, byte for byte."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4; tests copy it."""
    from cardtune.train import run

    out = tmp_path_factory.mktemp("finished") / "out"
    run([*DEMO, "--output_dir", str(out), "--max_steps", "4"])
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


# -- item 10: another run's checkpoints ------------------------------------------------------
def test_auto_refuses_another_runs_checkpoint_naming_the_differences(finished: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    before = tree(out)
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "4", "--resume_from_checkpoint", "auto",
                              "--learning_rate", "1e-3", "--lora_r", "8")
    assert code == 2
    assert err == (
        f"train: {out} holds another run: checkpoint-4 was trained with different settings "
        "(learning_rate 0.002 -> 0.001; lora_r 16 -> 8). Resume it with its own settings, start over with "
        "--overwrite_output_dir (without --resume_from_checkpoint), use another --output_dir, or name the checkpoint "
        f"(--resume_from_checkpoint {out / 'checkpoint-4'}) to continue it with these settings on purpose\n"
    )
    assert tree(out) == before  # nothing written, nothing loaded into it


def test_auto_compares_the_card_and_the_data(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    data = tmp_path / "other.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hello!"},
                                                              {"from": "gpt", "value": "Hi."}]}]))
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "4", "--resume_from_checkpoint", "auto",
                         "--data_path", str(data))
    assert code == 2 and f"data_path '{json.loads((out / 'cardtune_args.json').read_text())['data_path']}' -> " \
                          f"'{data}'" in err
    # A card edited between the runs (here a copy of the demo's under its own id).
    cards = tmp_path / "cards"
    cards.mkdir()
    card = (Path(__file__).resolve().parents[1] / "configs/models/tiny-llava-demo.yaml").read_text()
    card = card.replace("family: tiny-llava-demo", "family: my-demo").replace("model_id: tiny-llava-demo", "model_id: my-demo")
    (cards / "my-demo.yaml").write_text(card)
    mine = ["--model_id", "my-demo", "--cards", str(cards), "--output_dir", str(tmp_path / "mine"), "--max_steps", "2"]
    assert train(capsys, *mine)[0] == 0
    edited = tmp_path / "edited"  # another folder: the registry of a folder set is read once per process
    edited.mkdir()
    (edited / "my-demo.yaml").write_text(card.replace("family: my-demo", "family: my-demo\ncapabilities: {packing: unsupported}"))
    mine[mine.index(str(cards))] = str(edited)
    code, _, err = train(capsys, *mine, "--resume_from_checkpoint", "auto")
    assert code == 2 and "(card capabilities None -> {'packing': 'unsupported'})" in err, err


def test_same_run_resumes_and_a_named_checkpoint_is_the_way_to_change_settings(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-4")
    # Logging, saving and reporting do not shape training: the run resumes.
    code, stdout, _ = train(capsys, "--output_dir", str(out), "--max_steps", "4", "--resume_from_checkpoint", "auto",
                            "--logging_steps", "2", "--save_total_limit", "1")
    assert code == 0 and f"resume: auto: {out / 'checkpoint-2'}\n" in stdout
    assert "done: 2 steps (global step 4, resumed from checkpoint-2)" in stdout
    named = out / "checkpoint-4"
    code, stdout, _ = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--resume_from_checkpoint", str(named))
    assert code == 0
    assert f"note: this run differs from the one saved in {named}: max_steps 4 -> 6\n" in stdout
    assert "done: 2 steps (global step 6, resumed from checkpoint-4)" in stdout


def test_fresh_run_into_a_used_folder_refuses(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    before = tree(out)
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "4")
    assert code == 2
    assert err == (
        f"train: {out} holds an earlier run (checkpoint-2, checkpoint-4, cardtune_args.json): continue it with "
        "--resume_from_checkpoint auto, start over with --overwrite_output_dir (the earlier run is moved to "
        f"{out / 'earlier-run-N'}, nothing is deleted), or use another --output_dir\n"
    )
    assert tree(out) == before
    code, _, err = train(capsys, "--output_dir", str(out), "--overwrite_output_dir", "--resume_from_checkpoint", "auto")
    assert code == 2 and err == ("train: --overwrite_output_dir starts over, --resume_from_checkpoint continues: "
                                 "choose one\n")


def test_overwrite_moves_the_earlier_run_aside_and_rotation_never_touches_it(
        finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    before = tree(out)
    # Saving every step with a limit of 1 rotates this run's own checkpoints away, not the earlier run's.
    code, stdout, _ = train(capsys, "--output_dir", str(out), "--max_steps", "3", "--overwrite_output_dir",
                            "--save_steps", "1", "--save_total_limit", "1")
    assert code == 0
    assert f"--overwrite_output_dir: the earlier run in {out} was moved to {out / 'earlier-run-1'}\n" in stdout
    assert tree(out / "earlier-run-1") == before  # every file of it, byte for byte
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    # A second start over keeps the first moved run too.
    code, stdout, _ = train(capsys, "--output_dir", str(out), "--max_steps", "2", "--overwrite_output_dir")
    assert code == 0 and tree(out / "earlier-run-1") == before
    assert sorted(p.name for p in (out / "earlier-run-2").glob("checkpoint-*")) == ["checkpoint-3"]


# -- item 11: a truncated checkpoint --------------------------------------------------------
def _truncate(file: Path) -> int:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return len(data) // 2


def test_auto_passes_over_a_checkpoint_with_truncated_weights(finished: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    size = _truncate(out / "checkpoint-4" / "adapter_model.safetensors")
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "4", "--resume_from_checkpoint", "auto")
    assert code == 0, err
    assert (f"resume: auto: passing over checkpoint-4: adapter_model.safetensors: Error while deserializing header: "
            f"incomplete metadata, file not fully covered ({size:,} bytes; truncated?)\n"
            f"resume: auto: {out / 'checkpoint-2'} (the latest complete checkpoint)\n") in stdout
    assert "done: 2 steps (global step 4, resumed from checkpoint-2)" in stdout
    from safetensors import safe_open

    with safe_open(str(out / "checkpoint-4" / "adapter_model.safetensors"), framework="pt") as f:
        assert list(f.keys())  # step 4 saved again, whole


def test_checkpoint_problems_name_the_file(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.training.checkpoints import checkpoint_problem, complete_checkpoints

    out = copy_of(finished, tmp_path)
    assert checkpoint_problem(out / "checkpoint-4") is None
    size = _truncate(out / "checkpoint-4" / "optimizer.pt")
    assert checkpoint_problem(out / "checkpoint-4") == (
        f"optimizer.pt: not a complete torch file (File is not a zip file; {size:,} bytes; truncated?)")
    assert complete_checkpoints(out) == [out / "checkpoint-2"]
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "4",
                         "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert code == 2 and err == (f"train: --resume_from_checkpoint {out / 'checkpoint-4'}: incomplete checkpoint: "
                                 f"optimizer.pt: not a complete torch file (File is not a zip file; {size:,} bytes; "
                                 "truncated?)\n")
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\x08")
    assert checkpoint_problem(out / "checkpoint-2") == (
        "adapter_model.safetensors: Error while deserializing header: header too small (1 bytes; truncated?)")
    # Nothing complete to resume: auto would start over, but the folder holds the finished run.
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "2", "--resume_from_checkpoint", "auto")
    assert code == 2 and err == (
        f"train: {out} holds an earlier run (cardtune_args.json; no checkpoint to resume): start over with "
        f"--overwrite_output_dir (the earlier run is moved to {out / 'earlier-run-N'}, nothing is deleted), "
        "or use another --output_dir\n")


# -- item 12: disk full -----------------------------------------------------------------------
def _fill(folder: Path) -> Path:
    """Take every free byte of ``folder``'s filesystem; the filler file is returned."""
    filler = folder / "filler.bin"
    block = b"\0" * 2**16
    with filler.open("wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 8 MiB tmpfs (root only; skipped elsewhere): a disk that really fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; test_disk_full_at_the_save_boundary covers the rest")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_disk_that_fills_up_is_one_clear_error_and_auto_continues(small_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.training.trainer import CardFiles

    out = small_disk / "out"
    filler: list[Path] = []
    write = CardFiles.write

    def fill_while_saving_step_4(self: CardFiles, folder: str | Path) -> None:
        write(self, folder)
        if Path(folder).name == "checkpoint-4" and not filler:
            filler.append(_fill(small_disk))  # the rest of checkpoint-4 (optimizer, ...) finds a full disk

    monkeypatch.setattr(CardFiles, "write", fill_while_saving_step_4)
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "6")
    assert code == 1 and "Traceback" not in err, err
    first, hint = err.strip().split("\n")[-2:]
    # torch.save's own error names no errno: the disk it found full tells what it was
    assert first.startswith(f"train: no space left on device while writing checkpoint-4 (left incomplete: it is never "
                            f"resumed; delete it to free its space) in {out} (0.0 MiB free) (RuntimeError: [enforce "
                            "fail at inline_container.cc:"), first
    assert hint == "Free some space there, then the same command with --resume_from_checkpoint auto continues from checkpoint-2."
    assert not (out / "adapter_model.safetensors").exists()
    monkeypatch.setattr(CardFiles, "write", write)
    filler[0].unlink()
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--resume_from_checkpoint", "auto")
    assert code == 0, err
    assert "resume: auto: passing over checkpoint-4: no trainer_state.json (its save did not finish)\n" in stdout
    assert "done: 4 steps (global step 6, resumed from checkpoint-2)" in stdout
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6


def test_disk_full_at_the_save_boundary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Without root: the exact error safetensors raises on a full disk, at the Trainer's public
    ``save_model``, for the step-4 checkpoint and then for the final folder."""
    from safetensors import SafetensorError
    from transformers import Trainer

    out = tmp_path / "out"
    real_save = Trainer.save_model
    full_at = {str(out / "checkpoint-4")}

    def save_model(self: Trainer, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if str(output_dir) in full_at:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(self, output_dir, _internal_call=_internal_call)

    monkeypatch.setattr(Trainer, "save_model", save_model)
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "6")
    assert code == 1 and "Traceback" not in err
    err = err[err.index("train: "):]  # after the progress bars of loading
    assert err.startswith(f"train: no space left on device while writing the model weights in {out / 'checkpoint-4'} (")
    assert err.endswith("MiB free) (SafetensorError: Error while serializing: I/O error: No space left on device "
                        "(os error 28))\nFree some space there, then the same command with --resume_from_checkpoint "
                        "auto continues from checkpoint-2.\n")
    full_at.clear()
    full_at.add(str(out))  # this time checkpoint-4 is saved, and the final folder's save fails
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--resume_from_checkpoint", "auto",
                              "--save_steps", "4")
    assert code == 1 and f"train: no space left on device while writing the model weights in {out} (" in err
    # The Trainer saved the last step before the final folder: a resume trains nothing more.
    assert err.endswith("continues from checkpoint-6.\n")
    full_at.clear()
    code, stdout, _ = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--resume_from_checkpoint", "auto")
    assert code == 0
    assert ("resume: checkpoint-6 holds the run's last step (6): nothing left to train; the final folder is written "
            "from it (README.md, adapter_config.json, adapter_model.safetensors, cardtune_args.json, cardtune_card.yaml, "
            "chat_template.jinja, processor_config.json, tokenizer.json, tokenizer_config.json, training_args.bin)\n"
            ) in stdout
    assert "done: 0 steps (global step 6, resumed from checkpoint-6)" in stdout
    assert tree(out / "checkpoint-6")["adapter_model.safetensors"] == tree(out)["adapter_model.safetensors"]
    assert sorted(_steps(json.loads((out / "log_history.json").read_text()))) == [1, 2, 3, 4, 5, 6]
    assert (out / "loss.png").is_file()


def test_disk_full_is_recognised_in_each_writers_words(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    from cardtune.training.writes import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device", "x"), tmp_path)
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                        tmp_path)
    # torch.save's zip writer reports no errno: a disk with room left makes it another error
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                            tmp_path)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied", "x"), tmp_path)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("while saving") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer, tmp_path)
