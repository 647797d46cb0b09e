"""Runs that lie, and training faults (issue 18, items 6, 7, 8, 13, 14, 15, 16): a NaN run
stops and saves nothing that is not finite; one run per output folder; --overwrite_output_dir
moves only what a run wrote; weights that do not fit, read-only folders, a full cache disk and
Ctrl-C are each a line or two, never a traceback. Runs are the demo model, a few steps."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cardtune.training.checkpoints import complete_checkpoints
from cardtune.training.lock import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cardtune.train import main

    capsys.readouterr()
    code = main([*DEMO, *argv])
    captured = capsys.readouterr()
    return code, captured.out, _from_cardtune(captured.err)


def _from_cardtune(err: str) -> str:
    """stderr from cardtune's own first line on (transformers' weight-loading bars come before)."""
    lines = err.split("\n")
    first = next((k for k, line in enumerate(lines) if line.startswith(("train: ", "cardtune "))), 0)
    return "\n".join(lines[first:])


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cardtune.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, _from_cardtune(captured.err)


def tree(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def finite_file(file: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    return all(bool(torch.isfinite(t).all()) for t in load_file(str(file)).values())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step LoRA run (rank 16) with checkpoints at steps 2 and 4; tests copy it."""
    from cardtune.train import run

    out = tmp_path_factory.mktemp("finished") / "out"
    run([*DEMO, "--output_dir", str(out), "--max_steps", "4"])
    return out


def copy_of(finished: Path, tmp_path: Path, name: str = "out") -> Path:
    out = tmp_path / name
    shutil.copytree(finished, out)
    return out


# -- item 6: a run whose numbers stop being finite ------------------------------------------------
def test_nan_training_stops_through_train_py_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    """lr 1e10 on the demo: step 2 (the first past warm-up's zero) makes the gradient of step 3
    NaN. The run stops there: exit 1, the step, what, the last good checkpoint and the command
    that goes on from it; no final weights, no checkpoint after it."""
    out = tmp_path / "out"
    argv = [*DEMO, "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "1e10"]
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    command = shlex.join(["python", str(REPO / "train.py"), *argv, "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert done.stderr.endswith(
        "train: stopped at step 3: the gradient norm (nan) is not finite; nothing that is not finite was saved, and "
        "no final model was written\n"
        f"The last good checkpoint is {out / 'checkpoint-2'}; to go on from it with a lower --learning_rate, say "
        f"(this run's: 1e+10): {command}\n"), done.stderr[-2000:]
    assert "done:" not in done.stdout and "0.000" not in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "log_history.json", "loss.png"]
    assert finite_file(out / "checkpoint-2" / "adapter_model.safetensors")


def test_weights_gone_non_finite_between_logs_are_never_saved(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Logged every 5 steps, saved every 2: the weights are NaN by the step-4 save, which is
    refused before anything of checkpoint-4 is written."""
    out = tmp_path / "out"
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "1e10",
                         "--logging_steps", "5")
    assert code == 1 and "Traceback" not in err
    assert err.startswith("train: stopped at step 4: the trainable weights are not finite; nothing that is not "
                          "finite was saved, and no final model was written\n"
                          f"The last good checkpoint is {out / 'checkpoint-2'}; "), err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert finite_file(out / "checkpoint-2" / "adapter_model.safetensors")


def test_a_nan_loss_is_logged_as_nan_not_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """transformers' logging_nan_inf_filter logged a NaN step's loss as the mean of the window's
    earlier steps (0.0 in a window of one): how the closing said `-> 0.000`. The loss of steps
    1-4 holds step 4's NaN, and nothing was saved before the stop."""
    out = tmp_path / "out"
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "6", "--learning_rate", "1e10",
                         "--logging_steps", "4", "--save_steps", "5")
    assert code == 1
    assert err == ("train: stopped at step 4: the loss (nan) and the gradient norm (nan) are not finite; nothing "
                   "that is not finite was saved, and no final model was written\n"
                   "No checkpoint was saved before step 4: start over with a lower --learning_rate, say "
                   "(this run's: 1e+10).\n")
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 1 and losses[0] != losses[0]  # NaN


def test_a_non_finite_checkpoint_another_run_left_is_never_the_last_good_one(finished: Path, tmp_path: Path) -> None:
    """This run's own saves were checked when written; a checkpoint it did not write (an older
    cardtune's, say) is read back before it is named."""
    import torch
    from safetensors.torch import load_file, save_file

    from cardtune.training.faults import last_good_checkpoint

    out = copy_of(finished, tmp_path)
    file = out / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(file), metadata={"format": "pt"})
    assert last_good_checkpoint(out, 5) == out / "checkpoint-2"
    assert last_good_checkpoint(out, 5, checked={4}) == out / "checkpoint-4"  # saved (and checked) by this run
    assert last_good_checkpoint(out, 4) == out / "checkpoint-2" and last_good_checkpoint(out, 2) is None


# -- item 7: one run per output folder ----------------------------------------------------------
def test_a_folder_held_by_a_live_run_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": owner.pid, "host": socket.gethostname(), "since": time.time() + 1}
        (out / LOCK_FILE).write_text(json.dumps(lock))
        code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "1")
    finally:
        owner.kill()
        owner.wait()
    assert code == 1
    from cardtune.training.lock import describe

    assert err == (f"train: {out} is in use by another run ({describe(lock)}): wait for it to finish, or use another "
                   "--output_dir\n")
    assert "data (train)" not in stdout  # refused before any heavy work
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the owner's lock is left alone


def test_the_lock_of_a_dead_run_is_taken_over_and_a_run_releases_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.training.lock import describe, take

    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = {"pid": int(gone.stdout), "host": socket.gethostname(), "since": time.time() - 60}
    (out / LOCK_FILE).write_text(json.dumps(lock))
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "1")
    assert code == 0, err
    assert f"{out}: taking over the lock of a run that is no longer running ({describe(lock)})\n" in stdout
    assert not (out / LOCK_FILE).exists()  # released at the end
    # A refused run (here: the folder holds an earlier run) releases it too.
    code, _, err = train(capsys, "--output_dir", str(out), "--max_steps", "1")
    assert code == 2 and "holds an earlier run" in err
    assert not (out / LOCK_FILE).exists()
    held = take(out)  # while this process holds it, another process is refused, naming this one
    try:
        other = subprocess.run([sys.executable, "-c", "import sys; from cardtune.training.lock import take; "
                                "take(sys.argv[1])", str(out)], capture_output=True, text=True, env=ENV)
    finally:
        held.release()
    assert f"FolderInUseError: {out} is in use by another run (pid {os.getpid()} on " in other.stderr
    assert not (out / LOCK_FILE).exists()


# -- item 8: --overwrite_output_dir moves only what a run wrote -----------------------------------
def test_overwrite_refuses_a_folder_holding_other_files(finished: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("my notes\n")
    (out / "images").mkdir()
    (out / "images" / "a.png").write_bytes(b"png")
    (out / "train.json").write_text("[]")
    (out / "README.md").write_text("# my project\n")
    (out / "eval").mkdir()  # a name a run writes too (its eval split's skipped samples), holding the user's data
    (out / "eval" / "questions.json").write_text("[]")
    before = tree(out)
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "2", "--overwrite_output_dir")
    assert code == 2
    assert err == (f"train: --overwrite_output_dir: {out} holds an earlier run and files no run wrote (README.md, "
                   "eval/, images/, notes.txt and 1 more): only a run's own files are moved aside, so it stays as it "
                   "is; move those files elsewhere, or use another --output_dir\n")
    assert tree(out) == before and not (out / "earlier-run-1").exists()
    # What the earlier run wrote, including the model card README.md peft writes (front matter).
    from cardtune.training.checkpoints import run_output

    (out / "README.md").unlink()
    shutil.copy2(out / "checkpoint-2" / "README.md", out / "README.md")
    ours, others = run_output(out)
    assert [p.name for p in others] == ["eval", "images", "notes.txt", "train.json"]
    assert {p.name for p in ours} == {p.name for p in finished.iterdir()}
    # With the user's files gone, the earlier run is moved aside, every file of it.
    for name in ("notes.txt", "images", "train.json", "eval"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    run_files = tree(out)
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "2", "--overwrite_output_dir")
    assert code == 0, err
    assert tree(out / "earlier-run-1") == run_files


# -- item 13: weights that do not fit -------------------------------------------------------------
def test_resume_from_a_checkpoint_of_another_lora_rank_is_one_line(finished: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    checkpoint = out / "checkpoint-2"
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "4", "--lora_r", "8",
                              "--resume_from_checkpoint", str(checkpoint))
    assert code == 2 and "Traceback" not in err
    base = finished_base(finished)
    assert err == (f"train: --resume_from_checkpoint {checkpoint}: its weights do not fit this run's model: "
                   "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight is [16, 256] there, "
                   "[8, 256] here; 27 more; it was trained with other settings (lora_r 16 -> 8); its base: "
                   f"{base} (model id tiny-llava-demo; cardtune_card.yaml)\n")


def finished_base(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_merge_onto_another_base_names_both(finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The adapter's adapter_config.json points at a model of another width: one line naming
    the tensor, the base given and the one it was trained on."""
    import torch
    import transformers

    base = finished_base(finished)
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    config = transformers.AutoConfig.from_pretrained(other)
    config.text_config.intermediate_size = 192
    torch.manual_seed(0)
    getattr(transformers, config.architectures[0])(config).save_pretrained(other)
    adapter = copy_of(finished, tmp_path, "adapter")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(other)
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    code, _, err = cli(capsys, "merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged"))
    assert code == 2 and "Traceback" not in err
    assert err == (f"cardtune merge: {adapter}: the adapter does not fit its base {other} (adapter_config.json: "
                   "base_model_name_or_path): base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight "
                   "is [16, 256], the base needs a layer of 192 inputs; 5 more; it was trained on "
                   f"{base} (model id tiny-llava-demo; cardtune_card.yaml)\n")
    assert not (tmp_path / "merged").exists()


def test_chat_on_a_folder_without_weights_is_one_line(finished: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = copy_of(finished, tmp_path)
    (out / "adapter_model.safetensors").unlink()
    code, _, err = cli(capsys, "chat", "--model", str(out), "--prompt", "hi")
    assert code == 2
    assert err == (f"cardtune chat: {out}: no adapter weights (adapter_model.safetensors or adapter_model.bin); it "
                   "holds README.md, adapter_config.json, cardtune_args.json, cardtune_card.yaml, chat_template.jinja, "
                   f"checkpoint-2; its latest complete checkpoint is {out / 'checkpoint-4'}\n")
    stopped = tmp_path / "stopped"  # what a run stopped before its final save leaves
    stopped.mkdir()
    (stopped / "log_history.json").write_text("[]")
    code, _, err = cli(capsys, "chat", "--model", str(stopped), "--prompt", "hi")
    assert code == 2 and err == (f"cardtune chat: {stopped}: no model weights (model.safetensors, its shards or "
                                 "pytorch_model.bin); it holds log_history.json; give a folder written by training "
                                 "or merge\n")


# -- item 14: folders that cannot be written --------------------------------------------------------
@pytest.fixture
def read_only_folder(tmp_path: Path):
    """A folder nobody can write into: a read-only tmpfs as root (root writes past any mode
    bits), a folder of mode 0o555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"as root, chmod does not stop writes, and no read-only tmpfs can be mounted here: "
                    f"{done.stderr.strip()}")
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_an_output_folder_that_cannot_be_written_is_refused_before_anything_loads(
        tmp_path: Path, read_only_folder: tuple[Path, str], capsys: pytest.CaptureFixture[str]) -> None:
    folder, why = read_only_folder
    code, stdout, err = train(capsys, "--output_dir", str(folder / "out"), "--max_steps", "1")
    assert code == 2
    assert err == f"train: --output_dir {folder / 'out'}: cannot write there ({why}): give a folder you can write to\n"
    assert "data (train)" not in stdout and "trainable parameters" not in stdout
    code, stdout, err = train(capsys, "--output_dir", str(folder), "--max_steps", "1")
    assert code == 2 and err == f"train: --output_dir {folder}: cannot write there ({why}): give a folder you can write to\n"
    # A path under a file (any user): mkdir says what is wrong.
    (tmp_path / "a-file").write_text("x")
    code, _, err = train(capsys, "--output_dir", str(tmp_path / "a-file" / "out"), "--max_steps", "1")
    assert code == 2 and err == (f"train: --output_dir {tmp_path / 'a-file' / 'out'}: cannot write there (Not a "
                                 "directory): give a folder you can write to\n")


def test_a_cache_that_cannot_be_written_is_one_warning(tmp_path: Path, read_only_folder: tuple[Path, str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A data cache path that is a file: the run trains without the cache, saying so once; a
    read-only one likewise."""
    cache = tmp_path / "cache-is-a-file"
    cache.write_text("x")
    out = tmp_path / "out"
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "1", "--data_cache", str(cache))
    assert code == 0, err
    warning = (f"warning: the data cache {cache} cannot be written (File exists): this run goes on without it "
               "(--data_cache DIR names another folder, --data_cache none turns it off)\n")
    assert stdout.count(warning) == 1 and "kept in the cache" not in stdout
    assert (out / "adapter_model.safetensors").is_file()
    from cardtune.training.optional_cache import usable_cache

    folder, why = read_only_folder
    said: list[str] = []
    assert usable_cache(str(folder / "cache"), said.append) == "none"
    assert said == [f"warning: the data cache {folder / 'cache'} cannot be written ({why}): this run goes on without "
                    "it (--data_cache DIR names another folder, --data_cache none turns it off)"]
    assert usable_cache(str(tmp_path / "fine"), said.append) == str(tmp_path / "fine") and len(said) == 1


# -- item 15: the cache's disk fills up ----------------------------------------------------------
def test_a_full_cache_disk_names_the_cache_and_its_free_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Saving the data cache finds no space: the warning names the cache's folder and that
    device's free space (not the output folder's), and the run trains without it."""
    import shutil as shutil_module

    from cardtune.training import data_cache

    cache = tmp_path / "cache"
    real_usage = shutil_module.disk_usage

    def usage(path: str | os.PathLike[str]) -> object:
        real = real_usage(path)
        small = Path(path).resolve().is_relative_to(cache.resolve())
        return type(real)(real.total, real.used, 3 * 2**20 if small else 900 * 2**20)

    def full(folder: Path, *args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data_cache, "save", full)
    monkeypatch.setattr("cardtune.training.writes.shutil.disk_usage", usage)
    out = tmp_path / "out"
    code, stdout, err = train(capsys, "--output_dir", str(out), "--max_steps", "1", "--data_cache", str(cache))
    assert code == 0, err
    lines = [line for line in stdout.splitlines() if line.startswith("warning: data (train)")]
    assert len(lines) == 1
    start = f"warning: data (train): no space left on device while writing the data cache in {cache}{os.sep}"
    assert lines[0].startswith(start), lines
    assert lines[0].endswith(" (3.0 MiB free) (OSError: [Errno 28] No space left on device); the cache is optional: "
                             "this run goes on without it")
    assert "skipped samples" not in stdout + err and str(out) not in lines[0]
    assert (out / "adapter_model.safetensors").is_file()


# -- item 16: Ctrl-C --------------------------------------------------------------------------------
def test_ctrl_c_says_what_was_saved_and_the_command_that_continues(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [*DEMO, "--output_dir", str(out), "--max_steps", "12", "--save_steps", "1"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not complete_checkpoints(out):
            assert proc.poll() is None, f"training ended before its first checkpoint: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = complete_checkpoints(out)[-1]
    step = int(last.name.rsplit("-", 1)[1])
    first, second = err.rstrip("\n").split("\n")[-2:]
    assert first.startswith("train: interrupted at step ") and first.endswith(
        f" (Ctrl-C); the last complete checkpoint is {last}")
    assert int(first.split()[4]) in (step, step + 1)  # a step may end between the save and the signal
    command = shlex.join(["python", str(REPO / "train.py"), *argv, "--resume_from_checkpoint", "auto"])
    assert second == f"to continue: {command}"
    assert not (out / LOCK_FILE).exists() and not (out / "adapter_model.safetensors").exists()
    # The command continues the run to its end.
    done = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resume: auto: {last}" in done.stdout and "global step 12" in done.stdout


def test_ctrl_c_during_data_validation_is_one_line(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group: validation's worker processes leave
    it to the run (each printed 'Process ForkPoolWorker-N:' and its traceback)."""
    data = tmp_path / "many.json"
    data.write_text(json.dumps([{"id": f"s{i}", "conversations": [
        {"from": "human", "value": f"Tell me about number {i}. " * 5},
        {"from": "gpt", "value": f"It is {i}. " * 8}]} for i in range(40000)]), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *DEMO, "--data_path", str(data), "--data_cache",
                             "none", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    try:
        deadline = time.monotonic() + 240
        while not children.read_text().split():  # validation's workers are the run's only children
            assert proc.poll() is None, f"the run ended before validating: {proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "validation did not start within the time limit"
            time.sleep(0.02)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "ForkPoolWorker" not in err and "Traceback" not in err, err[-3000:]
    assert err.rstrip("\n").split("\n")[-1] == "train: interrupted (Ctrl-C) before training started; nothing new was saved"
