"""A new user's first hour: own data on the demo model, a recipe that would skip most of its
data, what the closing summary says, experimental cards, data-loading workers, and the small
words of `check`, `list`, `add-model`, `labels`/`inspect`/`validate-data`."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from test_train import image_dataset, text_dataset, tiny_model

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--cpu_threads", "1"]
REPO = Path(__file__).resolve().parents[1]


def main_out(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    from cardtune.train import main

    code = main([*argv, *QUIET])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cardtune.cli import main

    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- item 17: own data on the demo model -------------------------------------------------------
def test_own_data_on_the_demo_model_trains_without_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = text_dataset(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = main_out(capsys, ["--model_id", "tiny-llava-demo", "--data_path", str(data), "--output_dir",
                                          str(out), "--max_steps", "2"])
    assert code == 0, err
    assert "note: eval_strategy: no (the demo recipe asks for evaluation, but no --eval_data_path is given)\n" in stdout
    history = json.loads((out / "log_history.json").read_text())
    assert not [h for h in history if "eval_loss" in h]


def test_evaluation_asked_without_eval_data_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = main_out(capsys, ["--model_id", "tiny-llava-demo", "--data_path", str(text_dataset(tmp_path)),
                                     "--output_dir", str(tmp_path / "out"), "--eval_strategy", "steps"])
    assert (code, err) == (2, "train: --eval_strategy steps evaluates on --eval_data_path, which is not given: give it, "
                              "or drop --eval_strategy steps\n")
    assert not (tmp_path / "out").exists()


# -- item 18: a recipe that skips most of its data ---------------------------------------------
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("llava-1.5-7b", tmp_path_factory.mktemp("llava") / "model")


def _projector_only(llava_dir: Path, data: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs/train/projector-only.yaml"), "--model_path", str(llava_dir),
            "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(out), *extra]


def test_projector_only_stops_when_it_would_skip_most_samples(llava_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    data, images = image_dataset(tmp_path, n=20, size=32)
    for i in range(4, 20):  # the folder given holds 4 of the 20 images
        (images / f"{i}.png").unlink()
    out = tmp_path / "out"
    code, _, err = main_out(capsys, _projector_only(llava_dir, data, images, out))
    assert code == 1 and "Traceback" not in err
    first, *table = err[err.index("train: "):].splitlines()
    assert first == (
        "train: the train data: 16 of 20 records have problems (80%), more than --max_skipped_share 0.1 (10%) lets "
        "--bad_sample_policy skip drop; nothing was trained. Fix the data or the media folders, or raise "
        "--max_skipped_share:")
    for i in range(4, 20):  # the data report, every skipped sample named
        assert any(line.startswith(f"img-{i} ") and "missing_media" in line for line in table), (i, table)
    assert table[-1] == "16 of 20 records have problems (missing_media 16)"
    assert sorted(out.iterdir()) == [out / "skipped_samples.jsonl"]  # the ids, and nothing trained
    assert len((out / "skipped_samples.jsonl").read_text().splitlines()) == 16
    code, stdout, err = main_out(capsys, _projector_only(llava_dir, data, images, tmp_path / "out2",
                                                         "--max_skipped_share", "0.9"))
    assert code == 0, err
    assert "data: skipped 16 of 20 records, kept 4" in stdout and (tmp_path / "out2" / "model.safetensors").is_file()


def test_a_missing_image_folder_is_an_error_before_anything_else(llava_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.loaders.generic import GenericLoader

    def must_not_load(*_: object, **__: object) -> None:
        raise AssertionError("loaded something before the image folder was checked")

    monkeypatch.setattr(GenericLoader, "load_processing", must_not_load)
    monkeypatch.setattr(GenericLoader, "load_model", must_not_load)
    data, images = image_dataset(tmp_path, n=2)
    out = tmp_path / "out"
    code, _, err = main_out(capsys, _projector_only(llava_dir, data, tmp_path / "imgaes", out))
    assert (code, err) == (2, f"train: --image_folder {tmp_path / 'imgaes'}: no such folder (media paths in the data "
                              "are relative to it)\n")
    assert not out.exists()


# -- item 19: the closing summary, status, workers --------------------------------------------
def test_closing_names_no_plot_when_nothing_was_logged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, stdout, _ = main_out(capsys, ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--output_dir",
                                        str(out), "--max_steps", "2", "--logging_steps", "10"])
    assert code == 0
    assert "\ndone: 2 steps in " in stdout
    assert (f"loss plot:  none (no loss was logged: --logging_steps 10)\nreport:     {out / 'report.html'}\n"
            f"logs:       {out / 'log_history.json'}\n") in stdout
    assert not (out / "loss.png").exists() and (out / "log_history.json").is_file()


def test_an_experimental_card_warns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    card = (REPO / "configs/models/tiny-llava-demo.yaml").read_text()
    card = card.replace("family: tiny-llava-demo", "family: my-demo\nstatus: experimental\n"
                        "status_note: its template is not verified").replace("model_id: tiny-llava-demo", "model_id: my-demo")
    (cards / "my-demo.yaml").write_text(card)
    code, stdout, _ = main_out(capsys, ["--model_id", "my-demo", "--cards", str(cards), "--eval_strategy", "no",
                                        "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert code == 0
    assert ("warning: family my-demo is experimental (card: status: experimental): its template is not verified\n"
            in stdout)
    code, stdout, _ = main_out(capsys, ["--model_id", "tiny-llava-demo", "--eval_strategy", "no",
                                        "--output_dir", str(tmp_path / "out2"), "--max_steps", "1"])
    assert code == 0 and "warning: family" not in stdout


def test_data_loading_workers_follow_the_machine() -> None:
    from cardtune.train import default_num_workers, settle_training_arguments
    from cardtune.training.arguments import RECIPE_DIR, parse_arguments

    assert default_num_workers(True, 2, 1) == (1, "2 CPU cores for 1 training process")
    assert default_num_workers(True, 32, 8) == (3, "32 CPU cores for 8 training processes")
    assert default_num_workers(True, 64, 1)[0] == 4
    assert default_num_workers(True, 1, 1)[0] == 0
    assert default_num_workers(False, 64, 1) == (0, "training on CPU")
    for recipe in RECIPE_DIR.glob("*.yaml"):
        assert "dataloader_num_workers" not in recipe.read_text(), recipe
    args = parse_arguments(["--config", str(RECIPE_DIR / "lora.yaml"), "--data_path", "d.json"])
    notes = settle_training_arguments(args)
    assert args.training.dataloader_num_workers == 0 and not any("dataloader_num_workers" in n for n in notes)
    args = parse_arguments(["--config", str(RECIPE_DIR / "lora.yaml"), "--data_path", "d.json",
                            "--dataloader_num_workers", "3"])
    settle_training_arguments(args)
    assert args.training.dataloader_num_workers == 3  # the user's word


def test_no_deprecation_warning_from_peft_on_a_lora_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main as cli_main
    from cardtune.train import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--output_dir", str(tmp_path / "out"),
             "--max_steps", "1", *QUIET])
        assert cli_main(["merge", "--adapter", str(tmp_path / "out"), "--output", str(tmp_path / "merged")]) == 0
        warnings.warn("`is_gradient_checkpointing` is deprecated (raised by this test)", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    # only the test's own: the filter covers peft's read, and only while peft wraps or loads
    assert messages == ["`is_gradient_checkpointing` is deprecated (raised by this test)"]


# -- item 19: the commands' small words -------------------------------------------------------
def test_counts_are_singular_for_one(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.registry import get_registry

    monkeypatch.delenv("COLUMNS", raising=False)  # (a test runner's width would fold the title)
    families = len(get_registry().families)
    assert cli(capsys, "check", "llava-1.5-7b") == (0, f"ok: 1 model id in {families} families\n", "")
    code, out, _ = cli(capsys, "list", "--family", "phi-2")
    assert code == 0 and out.startswith("1 model in 1 family\n"), out


def test_list_piped_keeps_each_row_on_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.registry import get_registry

    monkeypatch.delenv("COLUMNS", raising=False)
    code, out, _ = cli(capsys, "list")  # captured: not a terminal
    assert code == 0
    lines = out.splitlines()
    for spec in get_registry().models.values():
        row = next(line for line in lines if f"│ {spec.model_id} " in line)
        assert spec.hf_path in row and spec.family.family in row, row


def test_add_model_creates_a_cards_folder_that_does_not_exist_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import require_fixture

    cards = tmp_path / "new" / "cards"
    code, out, err = cli(capsys, "add-model", str(require_fixture("llama-2-7b-chat")), "--model_id", "my-llama",
                         "--family", "my-llama", "--cards", str(cards))
    assert code == 0, err
    assert f"wrote {cards / 'my-llama.yaml'}: new family my-llama, model id my-llama\n" in out
    assert (cards / "my-llama.yaml").is_file()
    assert cli(capsys, "show", "my-llama", "--cards", str(cards))[0] == 0


def test_labels_inspect_and_validate_data_take_the_template_train_takes(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE, ensure_demo_dataset
    from cardtune.train import run

    demo = ensure_demo_dataset()
    records = [r for r in json.loads((demo / TRAIN_FILE).read_text()) if "image" in r][:3]
    data = tmp_path / "three.json"
    data.write_text(json.dumps(records))
    images = str(demo / IMAGE_DIR)
    code, out, err = cli(capsys, "labels", "--model_id", "tiny-llava-demo", "--data", str(data), "--image-folder",
                         images, "--template", "plain")
    assert code == 0, err
    labelled = {row["id"]: row for row in map(json.loads, out.splitlines())}
    trained = run(["--model_id", "tiny-llava-demo", "--template", "plain", "--data_path", str(data), "--image_folder",
                   images, "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--eval_strategy", "no", *QUIET])
    dataset = trained.trainer.train_dataset
    items = {dataset[i].sample_id: dataset[i] for i in range(len(dataset))}
    assert sorted(labelled) == sorted(items) == sorted(r["id"] for r in records)
    for sample_id, item in items.items():
        assert labelled[sample_id]["input_ids"] == item.input_ids and labelled[sample_id]["labels"] == item.labels
    own = {row["id"]: row for row in map(json.loads, cli(capsys, "labels", "--model_id", "tiny-llava-demo", "--data",
                                                         str(data), "--image-folder", images)[1].splitlines())}
    assert all(own[i]["input_ids"] != labelled[i]["input_ids"] for i in own)  # plain is not the chat template
    code, out, _ = cli(capsys, "inspect", "--model_id", "tiny-llava-demo", "--data", str(data), "--image-folder", images,
                       "--template", "plain", "-n", "1")
    answer = records[0]["conversations"][1]["value"]
    assert code == 0 and f"\n<image>×16{answer}</s>\n{records[0]['id']}: 26 tokens, 10 trained" in out, out
    code, out, err = cli(capsys, "validate-data", "--model_id", "tiny-llava-demo", "--data", str(data),
                         "--image-folder", images, "--template", "plain")
    assert code == 0 and "ok: 3 records, no problems" in out
    assert cli(capsys, "validate-data", "--model_id", "tiny-llava-demo", "--data", str(data), "--template", "nope") == (
        2, "", "cardtune validate-data: --template nope: neither a template kind (own, plain, declarative) nor a Jinja "
               "file\n")


# -- item 19: the test suite's cache, and a demo folder left incomplete ------------------------
def test_the_suite_builds_the_demo_in_its_own_cache() -> None:
    from conftest import SESSION_CACHE

    from cardtune.demo import ensure_demo_model
    from cardtune.demo.cache import cache_root

    assert Path(os.environ["CARDTUNE_CACHE"]) == SESSION_CACHE == cache_root()
    assert not SESSION_CACHE.is_relative_to(Path.home() / ".cache")
    assert ensure_demo_model().parent == SESSION_CACHE


def test_an_incomplete_demo_folder_is_rebuilt(tmp_path: Path) -> None:
    from cardtune.demo import ensure_demo_model
    from cardtune.demo.build import MODEL_NAME, model_version
    from cardtune.demo.cache import COMPLETE_MARKER

    target = tmp_path / f"{MODEL_NAME}-{model_version()}"
    target.mkdir()
    (target / "processor_config.json").write_text("{}")  # what was once found: processor files only
    assert ensure_demo_model(tmp_path) == target
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", COMPLETE_MARKER} <= names
    assert json.loads((target / "processor_config.json").read_text())["processor_class"] == "LlavaProcessor"
    built = (target / "model.safetensors").stat().st_ino
    assert ensure_demo_model(tmp_path) == target and (target / "model.safetensors").stat().st_ino == built
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging or discarded folder left


def test_an_unknown_llava_role_says_how_to_map_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import require_fixture

    data = tmp_path / "roles.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi."},
                                                              {"from": "bot", "value": "Hello."}]}]))
    code, out, _ = cli(capsys, "validate-data", "--model_id", "llama-2-7b-chat", "--model-path",
                       str(require_fixture("llama-2-7b-chat")), "--data", str(data))
    assert code == 1
    assert ("unknown_role       role 'bot' (known: system, user, assistant; a LLaVA 'from' value maps to a role with "
            "--user-key/--assistant-key (train, labels, inspect, validate-data), or user_key/assistant_key/system_key "
            "of a source in a mix YAML)\n") in out, out
    code, out, _ = cli(capsys, "validate-data", "--model_id", "llama-2-7b-chat", "--model-path",
                       str(require_fixture("llama-2-7b-chat")), "--data", str(data), "--assistant-key", "bot")
    assert code == 0, out
