"""`cardtune list`, `show` and `check`: output, exit codes and the exact error text users see."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from cardtune.cli import main
from cardtune.registry import BUILTIN_CARD_DIR, CARDS_ENV, parse_card

REPO = Path(__file__).resolve().parents[1]
RAW_CARDS = {
    p.stem: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted(BUILTIN_CARD_DIR.glob("*.yaml"))
}
EXPECTED_IDS = [m["model_id"] for raw in RAW_CARDS.values() for m in raw["models"]]
# What the `cardtune` console script runs; `python -m cardtune.cli` is tested on its own below.
CLI = [sys.executable, "-c", "import sys; from cardtune.cli import main; sys.exit(main(sys.argv[1:]))"]

TEXT_CARD = """
family: my-fam
model_class: LlamaForCausalLM
modules:
  llm: [model, lm_head]
models:
  - model_id: my-model
    hf_path: me/my-model
"""


@pytest.fixture(autouse=True)
def _no_user_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CARDS_ENV, raising=False)


def write_card(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != CARDS_ENV}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)


# -- list ----------------------------------------------------------------------------------------
def list_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict]:
    rc, out, err = cli(capsys, "list", "--json", *args)
    assert (rc, err) == (0, "")
    return json.loads(out)


def test_list_json_has_every_id(capsys: pytest.CaptureFixture[str]) -> None:
    rows = list_json(capsys)
    assert [r["model_id"] for r in rows] == EXPECTED_IDS
    llava = next(r for r in rows if r["model_id"] == "llava-1.5-7b")
    assert llava == {
        "model_id": "llava-1.5-7b",
        "family": "llava-1.5",
        "hf_path": "llava-hf/llava-1.5-7b-hf",
        "status": "supported",
        "modalities": ["text", "image", "multi_image"],
        "capabilities": {
            "lora": "supported",
            "qlora": "supported",
            "flash_attention": "supported",
            "packing": "unsupported",
            "video": "unsupported",
        },
        "source": str(BUILTIN_CARD_DIR / "llava-1.5.yaml"),
    }


def test_list_family_filter(capsys: pytest.CaptureFixture[str]) -> None:
    assert [r["model_id"] for r in list_json(capsys, "--family", "llava-1.5")] == [
        "llava-1.5-7b",
        "llava-1.5-13b",
    ]
    assert {r["family"] for r in list_json(capsys, "--family", "qwen2-vl-base")} == {"qwen2-vl-base"}


def test_list_modality_filter(capsys: pytest.CaptureFixture[str]) -> None:
    video_families = {f for f, raw in RAW_CARDS.items() if "video" in raw.get("modalities", ["text"])}
    expected = [m["model_id"] for f in video_families for m in RAW_CARDS[f]["models"]]
    rows = list_json(capsys, "--modality", "video")
    assert sorted(r["model_id"] for r in rows) == sorted(expected)
    assert {"llava-next-video", "llava-onevision", "qwen2-vl", "qwen2.5-vl"} <= {r["family"] for r in rows}
    assert [r["model_id"] for r in list_json(capsys, "--modality", "text")] == EXPECTED_IDS
    assert list_json(capsys, "--family", "llava-1.5", "--modality", "video") == []


def test_list_unknown_family(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "list", "--family", "nope")
    assert rc == 2 and out == ""
    families = ", ".join(RAW_CARDS)  # the files sort as the families do
    assert err == f"cardtune list: unknown family 'nope'; families: {families}\n"


def test_list_unknown_modality_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["list", "--modality", "audio"])
    assert info.value.code == 2
    assert "argument --modality: invalid choice: 'audio'" in capsys.readouterr().err


def test_list_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, err = cli(capsys, "list")
    assert (rc, err) == (0, "")
    n_families = len(RAW_CARDS)
    assert f"{len(EXPECTED_IDS)} models in {n_families} families" in out
    for model_id in EXPECTED_IDS:
        assert model_id in out
    assert "qwen2-instruct" in out and "text,image,multi_image,video" in out


def test_list_table_at_80_columns_shows_every_column(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    rc, out, _ = cli(capsys, "list")
    assert rc == 0
    assert "family" in out and "lora" in out


# -- show ----------------------------------------------------------------------------------------
def test_show_prints_the_resolved_card(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "show", "llava-1.5-7b")
    assert (rc, err) == (0, "")
    assert out.splitlines()[0] == f"# llava-1.5-7b: from {BUILTIN_CARD_DIR / 'llava-1.5.yaml'}"
    card = yaml.safe_load(out)
    assert card["family"] == "llava-1.5"
    assert card["capabilities"] == {
        "lora": "supported",
        "qlora": "supported",
        "flash_attention": "supported",
        "packing": "unsupported",
        "video": "unsupported",
    }
    assert card["chat"]["end_of_turn"] == ["</s>"] and card["chat"]["system"] == "auto"
    assert card["loader"] == "generic" and card["trust_remote_code"] is False
    assert card["media"] == {"image_token": "<image>", "video_token": None, "image_placeholder": None,
                             "video_placeholder": None, "num_frames": 8}
    assert card["models"] == [
        {
            "model_id": "llava-1.5-7b",
            "hf_path": "llava-hf/llava-1.5-7b-hf",
            "revision": None,
            "config_overrides": {},
        }
    ]
    # What `show` prints is itself a valid card: a starting point for a user's own.
    assert parse_card(out, "shown.yaml").family == "llava-1.5"


def test_show_qwen2_vl_base_keeps_its_jinja_template(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = cli(capsys, "show", "qwen2-vl-2b")
    assert rc == 0
    card = parse_card(out, "shown.yaml")
    assert card.chat.template == "jinja" and card.chat.jinja.startswith("{%- for message in messages -%}")


def test_show_unknown_id(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "show", "llava-1.5-7")
    assert rc == 2 and out == ""
    assert err == (
        "cardtune show: unknown model id 'llava-1.5-7' (close matches: llava-1.5-7b, llava-1.5-13b, "
        "llava-1.6-vicuna-7b, llava-1.6-mistral-7b, llava-1.6-vicuna-13b); `cardtune list` shows every registered id\n"
    )


# -- check ---------------------------------------------------------------------------------------
def test_check_builtin_cards(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "check")
    assert err == ""
    assert (rc, out) == (0, f"ok: {len(EXPECTED_IDS)} model ids in {len(RAW_CARDS)} families\n")


@pytest.fixture(scope="module")
def builtin_failures() -> list[str]:
    """`cardtune check`'s complaints about the built-in cards alone (none, when they are right).

    The tests of user cards below compare against this, so that a problem in a built-in card
    fails test_check_builtin_cards only, not every test that runs `check`.
    """
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        main(["check"])
    return err.getvalue().splitlines()


def check_lines(err: str, folder: Path, builtin_failures: list[str]) -> list[str]:
    """The FAIL lines naming ``folder``; every other line must be one the built-in cards give anyway."""
    lines = err.splitlines()
    assert all(line.startswith("FAIL ") for line in lines), err
    assert [line for line in lines if str(folder) not in line] == builtin_failures
    return [line for line in lines if str(folder) in line]


def test_check_given_ids(capsys: pytest.CaptureFixture[str], builtin_failures: list[str]) -> None:
    rc, out, err = cli(capsys, "check", "llava-1.5-7b", "qwen2-vl-2b")
    assert err.splitlines() == builtin_failures
    if not builtin_failures:
        assert (rc, out) == (0, f"ok: 2 model ids in {len(RAW_CARDS)} families\n")


def test_check_unknown_id(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "check", "llava-1.5-7")
    assert rc == 1 and out == ""
    assert (
        "FAIL unknown model id 'llava-1.5-7' (close matches: llava-1.5-7b, llava-1.5-13b, llava-1.6-vicuna-7b, "
        "llava-1.6-mistral-7b, llava-1.6-vicuna-13b); `cardtune list` shows every registered id"
    ) in err.splitlines()


def test_check_accepts_a_good_user_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str]
) -> None:
    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    rc, out, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert check_lines(err, tmp_path, builtin_failures) == []
    if not builtin_failures:
        assert (rc, out) == (0, f"ok: {len(EXPECTED_IDS) + 1} model ids in {len(RAW_CARDS) + 1} families\n")


BROKEN = {
    "unknown_top_key": (
        TEXT_CARD.replace(
            "model_class: LlamaForCausalLM\n", "model_class: LlamaForCausalLM\ndescriptoin: x\n"
        ),
        "{p}:3: descriptoin: unknown key",
    ),
    "unknown_nested_key": (
        TEXT_CARD.replace("models:", 'chat:\n  system: fold\n  endof_turn: "</s>"\nmodels:'),
        "{p}:7: chat.endof_turn: unknown key",
    ),
    "missing_family": (TEXT_CARD.replace("family: my-fam\n", ""), "{p}:1: family: required field is missing"),
    "trust_remote_code_maybe": (
        TEXT_CARD.replace("modules:", "trust_remote_code: maybe\nmodules:"),
        "{p}:3: trust_remote_code: input should be a valid boolean, unable to interpret input, got 'maybe'",
    ),
    "models_is_a_number": (
        TEXT_CARD.split("models:")[0] + "models: 3\n",
        "{p}:5: models: input should be a valid list, got 3",
    ),
    "bad_capability_state": (
        TEXT_CARD.replace("models:", "capabilities: {lora: maybe}\nmodels:"),
        "{p}:5: capabilities.lora: expected one of 'supported', 'experimental' or 'unsupported', got 'maybe'",
    ),
    "invalid_yaml": (
        TEXT_CARD.replace("[model, lm_head]", "[model, lm_head"),
        "{p}:5: not valid YAML: expected ',' or ']', but got ':'",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_broken_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str], case: str
) -> None:
    text, expected = BROKEN[case]
    path = write_card(tmp_path, "bad.yaml", text)
    rc, out, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert (rc, out) == (1, "")
    assert check_lines(err, tmp_path, builtin_failures) == [f"FAIL {expected.format(p=path)}"]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_list_and_show_refuse_a_broken_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    text, expected = BROKEN[case]
    path = write_card(tmp_path, "bad.yaml", text)
    for command in (["list", "--json"], ["show", "llava-1.5-7b"]):
        rc, out, err = cli(capsys, *command, "--cards", str(tmp_path))
        assert (rc, out) == (2, "")
        assert err == f"cardtune {command[0]}: {expected.format(p=path)}\n"


def test_check_multimodal_card_without_vision_keywords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str]
) -> None:
    write_card(
        tmp_path,
        "my-vlm.yaml",
        """
        family: my-vlm
        model_class: LlavaForConditionalGeneration
        modalities: [text, image]
        modules:
          llm: [language_model, lm_head]
        models:
          - model_id: my-vlm-7b
            hf_path: me/my-vlm
        """,
    )
    rc, out, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert (rc, out) == (1, "")
    assert check_lines(err, tmp_path, builtin_failures) == [
        f"FAIL {tmp_path / 'my-vlm.yaml'}:4: modules: "
        "a multimodal family needs module keywords for vision_encoder, vision_projector"
    ]


def test_check_reports_every_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str]
) -> None:
    a = write_card(tmp_path, "a.yaml", BROKEN["missing_family"][0])
    b = write_card(tmp_path, "b.yaml", BROKEN["bad_capability_state"][0])
    rc, _, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert rc == 1
    assert check_lines(err, tmp_path, builtin_failures) == [
        f"FAIL {BROKEN['missing_family'][1].format(p=a)}",
        f"FAIL {BROKEN['bad_capability_state'][1].format(p=b)}",
    ]


def test_check_duplicate_ids_across_user_cards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str]
) -> None:
    a = write_card(tmp_path, "a.yaml", TEXT_CARD.replace("my-fam", "fam-a"))
    b = write_card(tmp_path, "b.yaml", TEXT_CARD.replace("my-fam", "fam-b"))
    rc, out, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert (rc, out) == (1, "")
    assert check_lines(err, tmp_path, builtin_failures) == [
        f"FAIL {b}:6: models[0].model_id: model id 'my-model' is already defined in {a}:6"
    ]


def test_check_duplicate_of_a_builtin_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str]
) -> None:
    """The user's card is the one at fault (at its line), though user folders are read first."""
    mine = write_card(tmp_path, "mine.yaml", TEXT_CARD.replace("my-model", "llava-1.5-7b"))
    builtin_file = BUILTIN_CARD_DIR / "llava-1.5.yaml"
    line = next(
        i for i, text in enumerate(builtin_file.read_text().splitlines(), 1) if "llava-1.5-7b" in text
    )
    expected = (
        f"{mine}:6: models[0].model_id: model id 'llava-1.5-7b' is already defined in {builtin_file}:{line}"
    )
    rc, out, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert (rc, out) == (1, "")
    assert check_lines(err, tmp_path, builtin_failures) == [f"FAIL {expected}"]
    rc, out, err = cli(capsys, "list", "--cards", str(tmp_path))
    assert (rc, out, err) == (2, "", f"cardtune list: {expected}\n")


@pytest.mark.parametrize("field", ["loader", "collator"])
def test_check_unknown_loader(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str], field: str
) -> None:
    path = write_card(
        tmp_path, "my-fam.yaml", TEXT_CARD.replace("models:", f"# mine\n{field}: nope\nmodels:")
    )
    rc, _, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert rc == 1
    [line] = check_lines(err, tmp_path, builtin_failures)
    known = "generic" if field == "loader" else "default"
    assert re.fullmatch(
        rf"FAIL {re.escape(str(path))}:6: {field}: unknown {field} 'nope' \(known: .*\b{known}\b.*\)", line
    )


@pytest.mark.parametrize("field", ["loader", "collator"])
def test_check_unknown_loader_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builtin_failures: list[str], field: str
) -> None:
    path = write_card(
        tmp_path, "my-fam.yaml", TEXT_CARD.replace("models:", f"# mine\n{field}: nope\nmodels:")
    )
    _, _, err = cli(capsys, "check", "--cards", str(tmp_path))
    [line] = check_lines(err, tmp_path, builtin_failures)
    assert line.startswith(f"FAIL {path}:6: {field}: unknown {field} 'nope' (known: ")


def test_check_broken_card_in_a_subprocess(tmp_path: Path, builtin_failures: list[str]) -> None:
    path = write_card(tmp_path, "bad.yaml", BROKEN["unknown_nested_key"][0])
    result = run([*CLI, "check", "--cards", str(tmp_path)])
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert check_lines(result.stderr, tmp_path, builtin_failures) == [
        f"FAIL {path}:7: chat.endof_turn: unknown key"
    ]


@pytest.mark.parametrize("module", ["cardtune.cli", "cardtune"])
def test_python_dash_m(tmp_path: Path, builtin_failures: list[str], module: str) -> None:
    path = write_card(tmp_path, "bad.yaml", BROKEN["unknown_nested_key"][0])
    result = run([sys.executable, "-m", module, "check", "--cards", str(tmp_path)])
    assert result.returncode == 1, result.stderr
    assert check_lines(result.stderr, tmp_path, builtin_failures) == [
        f"FAIL {path}:7: chat.endof_turn: unknown key"
    ]
    result = run([sys.executable, "-m", module, "list", "--json"])
    assert result.returncode == 0, result.stderr
    assert [r["model_id"] for r in json.loads(result.stdout)] == EXPECTED_IDS


# -- user card folders ---------------------------------------------------------------------------
def test_user_family_via_cards_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    rows = list_json(capsys, "--cards", str(tmp_path))
    assert [r["model_id"] for r in rows] == ["my-model", *EXPECTED_IDS]  # user folders are read first
    assert rows[0]["family"] == "my-fam" and rows[0]["source"] == str(path)
    rc, out, _ = cli(capsys, "show", "my-model", "--cards", str(tmp_path))
    assert rc == 0 and yaml.safe_load(out)["models"][0]["hf_path"] == "me/my-model"
    # Without the flag the card is not seen.
    assert "my-model" not in [r["model_id"] for r in list_json(capsys)]


def test_user_family_via_environment(tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]) -> None:
    write_card(
        tmp_path / "one", "fam-one.yaml", TEXT_CARD.replace("my-fam", "fam-one").replace("my-model", "one")
    )
    write_card(
        tmp_path / "two", "fam-two.yaml", TEXT_CARD.replace("my-fam", "fam-two").replace("my-model", "two")
    )
    monkeypatch.setenv(CARDS_ENV, os.pathsep.join([str(tmp_path / "one"), str(tmp_path / "two")]))
    ids = [r["model_id"] for r in list_json(capsys)]
    assert ids == ["one", "two", *EXPECTED_IDS]
    assert [r["model_id"] for r in list_json(capsys, "--family", "fam-two")] == ["two"]


def test_cards_flag_and_environment_together(tmp_path: Path, monkeypatch, capsys) -> None:
    write_card(
        tmp_path / "flag", "fam-one.yaml", TEXT_CARD.replace("my-fam", "fam-one").replace("my-model", "one")
    )
    write_card(
        tmp_path / "env", "fam-two.yaml", TEXT_CARD.replace("my-fam", "fam-two").replace("my-model", "two")
    )
    monkeypatch.setenv(CARDS_ENV, str(tmp_path / "env"))
    ids = [r["model_id"] for r in list_json(capsys, "--cards", str(tmp_path / "flag"))]
    assert ids[:2] == ["one", "two"]


def test_user_family_via_environment_in_a_subprocess(tmp_path: Path) -> None:
    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    env = {**subprocess_env(), CARDS_ENV: str(tmp_path)}
    code = "import json, cardtune.supported_models as sm; print(json.dumps([sm.MODEL_FAMILIES['my-model'], sm.MODEL_HF_PATH['my-model']]))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["my-fam", "me/my-model"]


def test_missing_cards_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = cli(capsys, "list", "--cards", str(tmp_path / "nope"))
    assert (rc, out, err) == (2, "", f"cardtune list: {tmp_path / 'nope'}: card folder does not exist\n")


def test_register_model_updates_the_seed_tables() -> None:
    code = (
        "from cardtune import supported_models as sm\n"
        "sm.register_model('my-llava', 'llava-1.5', 'me/my-llava')\n"
        "assert sm.MODEL_REGISTRY['my-llava'].family_id == 'llava-1.5'\n"
        "assert sm.MODEL_FAMILIES['my-llava'] == 'llava-1.5'\n"
        "assert sm.MODEL_HF_PATH['my-llava'] == 'me/my-llava'\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr


def test_register_model_after_a_cards_lookup_updates_the_seed_tables(tmp_path: Path) -> None:
    """A --cards lookup in the same process builds a registry of its own: models registered before
    and after it stay in the seed tables, and the --cards commands see them too."""
    write_card(tmp_path, "my-fam.yaml", TEXT_CARD)
    code = (
        "import contextlib, io, json, sys\n"
        "from cardtune import supported_models as sm\n"
        "from cardtune.cli import main\n"
        "from cardtune.registry import get_registry\n"
        "sm.register_model('early', 'qwen2-vl', 'me/early')\n"
        "assert get_registry([sys.argv[1]]).get('my-model').family_id == 'my-fam'\n"
        "sm.register_model('my-llava', 'llava-1.5', 'me/my-llava')\n"
        "assert 'my-llava' in sm.MODEL_REGISTRY, 'not in MODEL_REGISTRY'\n"
        "assert sm.MODEL_FAMILIES['my-llava'] == 'llava-1.5'\n"
        "assert sm.MODEL_HF_PATH['early'] == 'me/early'\n"
        "assert list(sm.MODEL_REGISTRY)[-2:] == ['early', 'my-llava']\n"
        "assert 'my-model' not in sm.MODEL_FAMILIES\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['list', '--json', '--cards', sys.argv[1]]) == 0\n"
        "ids = [row['model_id'] for row in json.loads(out.getvalue())]\n"
        "assert ids[0] == 'my-model' and ids[-2:] == ['early', 'my-llava'], ids\n"
        "assert sm.MODEL_FAMILIES['early'] == 'qwen2-vl'\n"
    )
    result = run([sys.executable, "-c", code, str(tmp_path)])
    assert result.returncode == 0, result.stderr



def test_show_a_model_registered_from_python() -> None:
    """`show` prints the id's own entry even when the id is not in its family card's list."""
    code = (
        "import contextlib, io, yaml\n"
        "from cardtune import supported_models as sm\n"
        "from cardtune.cli import main\n"
        "sm.register_model('my-llava', 'llava-1.5', 'me/my-llava', revision='abc')\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['show', 'my-llava']) == 0\n"
        "text = out.getvalue()\n"
        "assert text.startswith('# my-llava: from <python>\\n'), text\n"
        "card = yaml.safe_load(text)\n"
        "assert card['family'] == 'llava-1.5'\n"
        "assert card['models'] == [{'model_id': 'my-llava', 'hf_path': 'me/my-llava', 'revision': 'abc', "
        "'config_overrides': {}}], card['models']\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr

# -- no torch for the registry commands ----------------------------------------------------------
def test_list_and_show_do_not_import_torch() -> None:
    code = (
        "import contextlib, io, sys\n"
        "import cardtune.supported_models\n"
        "from cardtune.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    assert main(['list', '--json']) == 0\n"
        "    assert main(['list']) == 0\n"
        "    assert main(['show', 'llava-1.5-7b']) == 0\n"
        "assert 'llava-1.5-7b' in out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy) or 'none')\n"
    )
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"


def test_list_is_fast() -> None:
    start = time.perf_counter()
    result = run([sys.executable, "-m", "cardtune.cli", "list"])
    elapsed = time.perf_counter() - start
    print(f"`python -m cardtune.cli list` in a fresh interpreter: {elapsed:.2f} s")
    assert result.returncode == 0, result.stderr
    assert elapsed < 5.0
