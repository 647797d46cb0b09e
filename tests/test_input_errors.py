"""Bad input a user (or an attacker) hands cardtune: one clear line naming the file, the line
and what to do, never a traceback, and nothing lost that could still be read (issue 11, items
2, 3, 6, 7, 8, 13, 14, 15).

Commands run in-process through ``cardtune.cli.main`` / ``cardtune.train.main``, with the real
llava-1.5 tokenizer and processor of the fixtures and the embedded demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require_fixture

from cardtune.cli import main
from cardtune.data.formats import load_samples, looks_like_hub_name
from cardtune.registry import CARDS_ENV, CardError, InputFileError, load_card_file
from cardtune.training.arguments import ArgumentError, parse_arguments

MODEL = "llava-1.5-7b"
REPO = Path(__file__).resolve().parents[1]
DEMO = ["--model_id", "tiny-llava-demo", "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--save_strategy", "no", "--cpu_threads", "1"]


@pytest.fixture(autouse=True)
def _no_user_cards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CARDS_ENV, raising=False)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def rec(sample_id: str, question: str = "Hi", answer: str = "Hello.", **extra: object) -> dict:
    return {"id": sample_id, **extra,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def train_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cardtune.train import main as train

    rc = train(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def llava(*argv: str) -> list[str]:
    """A data command's model arguments: the registered card on the fixture folder."""
    return [*argv, "--model_id", MODEL, "--model-path", str(require_fixture(MODEL))]


CARD = """
family: my-fam
model_class: LlamaForCausalLM
trust_remote_code: false
modules:
  llm: [model, lm_head]
models:
  - model_id: my-model
    hf_path: me/my-model
"""


# -- 2. duplicate keys: cards, recipes and mixes alike --------------------------------------------
def test_duplicate_key_in_a_card_is_an_error_at_its_line(tmp_path: Path, capsys) -> None:
    card = write(tmp_path / "dup.yaml", CARD + "trust_remote_code: true\n")
    rc, out, err = cli(capsys, "list", "--cards", str(tmp_path))
    assert (rc, out) == (2, "")
    assert err == f"cardtune list: {card}:9: trust_remote_code: duplicate key (first at line 3)\n"
    rc, _, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert rc == 1 and f"FAIL {card}:9: trust_remote_code: duplicate key (first at line 3)\n" in err


def test_duplicate_key_nested_in_a_card_names_its_field(tmp_path: Path) -> None:
    card = write(tmp_path / "dup.yaml", CARD + "    hf_path: attacker/weights\n")
    with pytest.raises(CardError) as info:
        load_card_file(card)
    assert str(info.value) == f"{card}:9: models[0].hf_path: duplicate key (first at line 8)"


def test_duplicate_key_in_a_recipe(tmp_path: Path, capsys) -> None:
    recipe = write(tmp_path / "recipe.yaml", "model_id: tiny-llava-demo\nlearning_rate: 1.0e-4\nlearning_rate: 1.0\n")
    with pytest.raises(ArgumentError) as info:
        parse_arguments(["--config", str(recipe)])
    assert str(info.value) == f"{recipe}:3: learning_rate: duplicate key (first at line 2)"
    rc, _, err = train_main(capsys, "--config", str(recipe))
    assert rc == 2 and err == f"train: {recipe}:3: learning_rate: duplicate key (first at line 2)\n"


def test_duplicate_key_in_a_data_mix(tmp_path: Path, capsys) -> None:
    jsonl(tmp_path / "a.jsonl", [rec("a")])
    mix = write(tmp_path / "mix.yaml", """
        seed: 1
        sources:
          - path: a.jsonl
            weight: 1
            path: b.jsonl
        """)
    with pytest.raises(InputFileError) as info:
        load_samples(str(mix))
    assert str(info.value) == f"{mix}:5: sources[0].path: duplicate key (first at line 3)"
    rc, _, err = cli(capsys, "validate-data", *llava("--data", str(mix)))
    assert rc == 2 and err == f"cardtune validate-data: {mix}:5: sources[0].path: duplicate key (first at line 3)\n"


# -- 3. aliases and tags: plain data only ---------------------------------------------------------
ALIASES = """
family: my-fam
model_class: LlamaForCausalLM
modules:
  llm: [model, lm_head]
config_overrides:
  a: &a [x, x, x, x, x]
  b: &b [*a, *a, *a, *a, *a]
  c: &c [*b, *b, *b, *b, *b]
  d: [*c, *c, *c, *c, *c]
models:
  - model_id: my-model
    hf_path: me/my-model
"""


@pytest.mark.parametrize("command", [["list"], ["check"], ["show", "my-model"]])
def test_aliases_in_a_card_are_refused_at_their_line(tmp_path: Path, capsys, command: list[str]) -> None:
    # Five levels of five (625 leaves) here; the same file at ten levels made `show` exhaust memory.
    card = write(tmp_path / "aliases.yaml", ALIASES)
    rc, out, err = cli(capsys, *command, "--cards", str(tmp_path))
    expected = f"{card}:6: anchor &a: anchors and aliases are not allowed; write the value out"
    assert rc in (1, 2) and "my-model" not in out
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_python_tag_in_a_card_runs_nothing(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "ran"
    card = write(tmp_path / "evil.yaml", CARD.replace(
        "family: my-fam", f'family: !!python/object/apply:os.system ["touch {marker}"]'))
    rc, _, err = cli(capsys, "list", "--cards", str(tmp_path))
    assert rc == 2 and not marker.exists()
    assert err == (f"cardtune list: {card}:1: family: tag !!python/object/apply:os.system is not allowed: only "
                   "plain data (text, numbers, true/false, lists, mappings); remove the tag\n")


def test_tags_and_aliases_in_recipes_and_mixes(tmp_path: Path, capsys) -> None:
    recipe = write(tmp_path / "recipe.yaml", "model_id: tiny-llava-demo\nlearning_rate: !custom 1.0\n")
    with pytest.raises(ArgumentError, match=r"recipe.yaml:2: learning_rate: tag !custom is not allowed"):
        parse_arguments(["--config", str(recipe)])
    recipe = write(tmp_path / "recipe.yaml", "model_id: &m tiny-llava-demo\noutput_dir: *m\n")
    with pytest.raises(ArgumentError, match=r"recipe.yaml:1: anchor &m: anchors and aliases are not allowed"):
        parse_arguments(["--config", str(recipe)])
    marker = tmp_path / "ran"
    mix = write(tmp_path / "mix.yaml", f'sources:\n  - !!python/object/apply:os.system ["touch {marker}"]\n')
    expected = (f"{mix}:2: sources[0]: tag !!python/object/apply:os.system is not allowed: only plain data "
                "(text, numbers, true/false, lists, mappings); remove the tag")
    rc, _, err = cli(capsys, "validate-data", *llava("--data", str(mix)))
    assert (rc, err) == (2, f"cardtune validate-data: {expected}\n")
    rc, _, err = train_main(capsys, *DEMO, "--data_path", str(mix), "--output_dir", str(tmp_path / "out"))
    assert (rc, err) == (2, f"train: {expected}\n")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_mix_errors_name_their_line_and_field(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", [rec("a")])
    mix = write(tmp_path / "mix.yaml", "- path: a.jsonl\n  weight: -1\n")
    with pytest.raises(InputFileError) as info:
        load_samples(str(mix))
    assert str(info.value) == f"{mix}:2: sources[0].weight: Input should be greater than 0"


# -- 6. the length limit defaults to what the model takes ---------------------------------------
def test_model_length_limit_from_config_overrides_and_tokenizer() -> None:
    from transformers import AutoTokenizer

    from cardtune.data.max_length import LengthLimit, model_length_limit

    def limit(name: str, **kw: object) -> LengthLimit | None:
        folder = require_fixture(name)
        return model_length_limit(str(folder), AutoTokenizer.from_pretrained(folder), **kw)

    # llava-1.5's tokenizer says 1e30 ("unset"); its text config says 4096
    assert limit("llava-1.5-7b") == LengthLimit(4096, "config.json text_config.max_position_embeddings")
    assert limit("llava-1.5-7b", config_overrides={"text_config.max_position_embeddings": 8192}).tokens == 8192
    assert limit("phi-2") == LengthLimit(2048, "config.json n_positions")
    assert limit("qwen2.5-7b-instruct") == LengthLimit(32768, "config.json max_position_embeddings")
    # llava-onevision's config leaves it to the Qwen2 text config's default
    assert limit("llava-onevision-qwen2-0.5b-ov-hf") == LengthLimit(
        32768, "Qwen2Config's default max_position_embeddings; config.json does not set it")
    # a tokenizer-only folder: the tokenizer's own, when it is a real number
    assert limit("deepseek-coder-6.7b-instruct") == LengthLimit(16384, "the tokenizer's model_max_length")


def _long_text_data(tmp_path: Path, words: int) -> Path:
    return jsonl(tmp_path / "long.jsonl", [rec("short"), rec("huge", "Talk.", "word " * words)])


def test_validate_data_refuses_a_sample_longer_than_the_model_takes(tmp_path: Path, capsys) -> None:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    data = _long_text_data(tmp_path, 5000)
    resolved = resolve_model(MODEL, require_fixture(MODEL))
    length = len(ChatEncoder(resolved.card, load_processing(resolved)).encode(load_samples(str(data))[1]).input_ids)
    assert length > 4096
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--json"))
    report = json.loads(out)
    assert rc == 1 and report["counts"] == {"too_long": 1}
    (error,) = report["errors"]
    assert (error["id"], error["source"], error["field"], error["reason"]) == ("huge", f"{data}:2", "messages", "too_long")
    assert error["detail"] == (
        f"{length} tokens > 4096, the longest this model takes (config.json text_config.max_position_embeddings); "
        "shorten or split the sample, or give --max_length to cut text after its last media token")
    # --max-length asks for the cut: the sample is kept, its answer truncated
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--json", "--max-length", "4096"))
    assert rc == 0 and json.loads(out)["truncated"] == 1


@pytest.mark.parametrize("check_media", ["header", "full"])
def test_the_limit_holds_for_image_samples_counted_from_headers_or_decoded(tmp_path: Path, capsys,
                                                                           check_media: str) -> None:
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    data = jsonl(tmp_path / "d.jsonl", [rec("img-long", "<image>\nTalk.", "word " * 5000, image="red.png"),
                                        rec("img-ok", "<image>\nTalk.", "Red.", image="red.png")])
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--image-folder", str(tmp_path), "--json",
                                                     "--check-media", check_media))
    report = json.loads(out)
    assert rc == 1 and [(e["id"], e["reason"]) for e in report["errors"]] == [("img-long", "too_long")]
    assert " tokens > 4096, the longest this model takes" in report["errors"][0]["detail"]


def test_the_header_encoder_keeps_every_setting_of_the_encoder() -> None:
    from cardtune.data.max_length import LengthLimit, limited_encoder
    from cardtune.data.media_tokens import HeaderEncoder
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model(MODEL, require_fixture(MODEL))
    encoder = limited_encoder(resolved.card, load_processing(resolved), resolved.path, typed_control_tokens="keep")
    header, note = HeaderEncoder.from_encoder(encoder)
    assert header is not None, note
    assert header.engine.limit == LengthLimit(4096, "config.json text_config.max_position_embeddings")
    assert header.engine.keep_typed_control_tokens is True and header.engine.max_length is None


def test_labels_and_inspect_name_the_too_long_sample(tmp_path: Path, capsys) -> None:
    data = _long_text_data(tmp_path, 5000)
    rc, out, err = cli(capsys, "labels", *llava("--data", str(data)))
    assert rc == 1 and [json.loads(line)["id"] for line in out.splitlines()] == ["short"]
    assert f"cardtune labels: sample huge ({data}:2): messages: too_long: " in err and "> 4096" in err
    rc, out, _ = cli(capsys, "inspect", *llava("--data", str(data)))
    assert rc == 1 and "too_long" in out


def test_train_stops_before_step_1_on_a_sample_longer_than_the_model(tmp_path: Path) -> None:
    data = _long_text_data(tmp_path, 600)  # the demo model has 512 positions
    out_dir = tmp_path / "out"
    # a process of its own: what a user sees on stderr, with no handler left from another test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *DEMO, "--data_path", str(data), "--output_dir",
                           str(out_dir), "--max_steps", "1"], env=env, capture_output=True, text=True, timeout=300)
    rc, err = done.returncode, done.stderr
    assert rc == 1 and "Traceback" not in err
    assert "huge" in err and f"{data}:2" in err and "too_long" in err
    assert "> 512, the longest this model takes (config.json text_config.max_position_embeddings)" in err
    assert not list(out_dir.glob("checkpoint-*")) and not (out_dir / "adapter_model.safetensors").exists()


# -- 7. bytes that are not UTF-8 ----------------------------------------------------------------
def test_a_non_utf8_jsonl_line_is_one_bad_format_error(tmp_path: Path, capsys) -> None:
    good = json.dumps(rec("a")).encode()
    bad = json.dumps(rec("b", "caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")
    data = tmp_path / "d.jsonl"
    data.write_bytes(good + b"\n" + bad + b"\n" + json.dumps(rec("c")).encode() + b"\n")
    samples = load_samples(str(data))
    assert [s.id for s in samples] == ["a", "c"]
    (error,) = samples.errors
    column = bad.index(b"\xe9") + 1
    assert (error.sample_id, error.field, error.reason, error.source) == ("b", "record", "bad_format", f"{data}:2")
    assert error.detail == f"not UTF-8 text: byte 0xe9 at column {column}; save the file as UTF-8"
    rc, out, err = cli(capsys, "validate-data", *llava("--data", str(data), "--no-encode"))
    assert rc == 1 and "1 of 3 records have problems (bad_format 1)" in out and f"{data}:2" in out
    assert "Traceback" not in err


def test_train_skips_the_non_utf8_line_and_trains_the_rest(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_bytes(b"".join(json.dumps(rec(f"ok-{i}")).encode() + b"\n" for i in range(3)) + b'{"id": "x\xff"}\n')
    out_dir = tmp_path / "out"
    rc, out, err = train_main(capsys, *DEMO, "--data_path", str(data), "--output_dir", str(out_dir), "--max_steps", "1",
                              "--bad_sample_policy", "skip", "--max_skipped_share", "0.5")
    assert rc == 0 and "Traceback" not in err
    (skipped,) = [json.loads(line) for line in (out_dir / "skipped_samples.jsonl").read_text().splitlines()]
    assert skipped["source"] == f"{data}:4" and skipped["errors"][0]["reason"] == "bad_format"
    assert "not UTF-8 text: byte 0xff at column 10" in skipped["errors"][0]["detail"]


def test_a_json_list_that_is_not_utf8_is_one_error_with_its_offset(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.json"
    data.write_bytes(b'[\n{"id": "a", "conversations": []},\n{"id": "caf\xe9"}\n]\n')
    offset = data.read_bytes().index(b"\xe9")
    expected = f"{data}:3: not UTF-8 text: byte 0xe9 at column 12 (byte offset {offset}); save the file as UTF-8"
    with pytest.raises(InputFileError) as info:
        load_samples(str(data))
    assert str(info.value) == expected
    rc, _, err = cli(capsys, "validate-data", *llava("--data", str(data), "--no-encode"))
    assert (rc, err) == (2, f"cardtune validate-data: {expected}\n")


def test_a_byte_order_mark_is_not_data(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([rec("a")]).encode())
    (tmp_path / "d.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rec("b")).encode() + b"\n")
    assert [s.id for s in load_samples(f"{tmp_path / 'd.json'},{tmp_path / 'd.jsonl'}")] == ["a", "b"]


# -- 8. system_prompt, duplicate ids, a truncated file ------------------------------------------
def test_a_system_prompt_that_is_not_text_is_bad_format(tmp_path: Path) -> None:
    data = jsonl(tmp_path / "d.jsonl", [rec("num", system_prompt=123), rec("ok", system_prompt="Be brief.")])
    samples = load_samples(str(data))
    assert [s.id for s in samples] == ["ok"]
    (error,) = samples.errors
    assert (error.sample_id, error.field, error.reason, error.detail) == (
        "num", "system_prompt", "bad_format", "system_prompt is text, got int: 123")


def test_duplicate_ids_are_reported_with_a_count_and_trained(tmp_path: Path, capsys) -> None:
    data = jsonl(tmp_path / "d.jsonl", [rec("a"), rec("b"), rec("a"), rec("c"), rec("b"), rec("a")])
    no_ids = jsonl(tmp_path / "no-ids.jsonl", [{"conversations": rec("x")["conversations"]}] * 2)
    other = jsonl(tmp_path / "other.jsonl", [rec("c")])  # the same id in another file: not a duplicate
    samples = load_samples(f"{data},{no_ids},{other}")
    assert len(samples) == 9 and not samples.errors
    assert samples.duplicate_ids == {"a": [f"{data}:1", f"{data}:3", f"{data}:6"], "b": [f"{data}:2", f"{data}:5"]}
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--no-encode"))
    assert rc == 0
    assert "ok: 6 records, no problems; warning: 2 ids written by more than one record (5 records: a, b)" in out
    assert f"  a: {data}:1, {data}:3, {data}:6\n  b: {data}:2, {data}:5" in out
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--no-encode", "--json"))
    assert rc == 0 and json.loads(out)["duplicate_ids"] == samples.duplicate_ids
    out_dir = tmp_path / "out"
    rc, out, err = train_main(capsys, *DEMO, "--data_path", str(data), "--output_dir", str(out_dir), "--max_steps", "1")
    assert rc == 0 and "warning: 2 ids written by more than one record (5 records: a, b)" in out


def test_a_truncated_json_file_is_one_clear_error(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.json"
    text = json.dumps([rec("a"), rec("b")], indent=1)
    data.write_text(text[: text.index('"Hello."', text.index('"b"')) + 4], encoding="utf-8")
    line = data.read_text().count("\n") + 1
    column = data.read_text().splitlines()[-1].rindex('"') + 1  # where the unterminated string starts
    expected = f"{data}:{line}:{column}: invalid JSON: Unterminated string; the file ends at line {line}: is it cut short?"
    with pytest.raises(InputFileError) as info:
        load_samples(str(data))
    assert str(info.value) == expected
    rc, _, err = train_main(capsys, *DEMO, "--data_path", str(data), "--output_dir", str(tmp_path / "out"))
    assert (rc, err) == (2, f"train: {expected}\n")
    rc, _, err = cli(capsys, "validate-data", *llava("--data", str(data)))
    assert (rc, err) == (2, f"cardtune validate-data: {expected}\n")


# -- 13. a data file that is not there never goes to the hub ------------------------------------
@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def must_not_call(*_: object, **__: object) -> None:
        raise AssertionError("a missing local file went to datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", must_not_call)


@pytest.mark.parametrize("command", ["validate-data", "labels", "inspect"])
def test_missing_data_file_in_the_data_commands(tmp_path: Path, capsys, monkeypatch, no_hub, command: str) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli(capsys, command, *llava("--data", "trian.json"))
    assert (rc, out, err) == (2, "", f"cardtune {command}: no such file: trian.json\n")


def test_missing_data_file_in_train_suggests_the_close_name(tmp_path: Path, capsys, monkeypatch, no_hub) -> None:
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "train.json", [rec("a")])
    rc, _, err = train_main(capsys, *DEMO, "--data_path", "trian.json", "--output_dir", "out")
    assert (rc, err) == (2, "train: no such file: trian.json (did you mean: train.json?)\n")
    assert not (tmp_path / "out").exists()


def test_missing_files_in_a_mix_are_named_where_they_were_looked_for(tmp_path: Path, capsys, no_hub) -> None:
    mix = write(tmp_path / "mix.yaml", "- a.jsonl\n- org/some-dataset\n")
    rc, _, err = cli(capsys, "validate-data", *llava("--data", str(mix)))
    assert (rc, err) == (2, f"cardtune validate-data: no such file: {tmp_path / 'a.jsonl'}\n")
    rc, _, err = cli(capsys, "labels", *llava("--data", str(tmp_path / "nope.yaml")))
    assert (rc, err) == (2, f"cardtune labels: no such file: {tmp_path / 'nope.yaml'}\n")


def test_a_hub_dataset_offline_is_one_line(tmp_path: Path, capsys) -> None:
    rc, _, err = cli(capsys, "validate-data", *llava("--data", "some-org/no-such-dataset-xyz", "--no-encode"))
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("cardtune validate-data: some-org/no-such-dataset-xyz: no such local file or folder, "
                          "and no hub dataset could be loaded (")


def test_what_looks_like_a_hub_dataset_id() -> None:
    assert looks_like_hub_name("HuggingFaceH4/ultrachat_200k") and looks_like_hub_name("squad_v2")
    for local in ("trian.json", "data/train.jsonl", "a/b/c", "./data", "~/d", "/abs/x", "mix.yaml", "x y/z"):
        assert not looks_like_hub_name(local), local


# -- 14. model folders, the hub offline, a card's loader, a card's bytes -------------------------
def test_model_path_that_does_not_exist(tmp_path: Path, capsys) -> None:
    data = jsonl(tmp_path / "d.jsonl", [rec("a")])
    nope = tmp_path / "nope"
    for argv in (["--model_path", str(nope)], ["--model_id", MODEL, "--model_path", str(nope)]):
        rc, _, err = cli(capsys, "labels", "--data", str(data), *argv)
        assert (rc, err) == (2, f"cardtune labels: --model_path {nope}: no such folder\n")
        rc, _, err = train_main(capsys, "--data_path", str(data), *argv, "--output_dir", str(tmp_path / "out"))
        assert (rc, err) == (2, f"train: --model_path {nope}: no such folder\n")


def test_model_folder_without_weights_is_refused_before_validation(tmp_path: Path, capsys, monkeypatch) -> None:
    from cardtune.loaders.generic import GenericLoader

    def must_not_load(*_: object, **__: object) -> None:
        raise AssertionError("loaded the tokenizer before looking for weights")

    monkeypatch.setattr(GenericLoader, "load_processing", must_not_load)
    folder = require_fixture(MODEL)  # the real config and tokenizer files, no weights
    data = jsonl(tmp_path / "d.jsonl", [rec("a")])
    rc, out, err = train_main(capsys, "--model_id", MODEL, "--model_path", str(folder), "--data_path", str(data),
                              "--output_dir", str(tmp_path / "out"))
    assert rc == 2 and "data (train)" not in out and len(err.splitlines()) == 1
    assert err.startswith(f"train: --model_path {folder}: no model weights (no *.safetensors, *.bin or index file; "
                          "it holds ")
    assert err.endswith("download the weights into it (`hf download REPO --local-dir DIR`), "
                        "or point at the complete folder\n")


def test_registered_id_with_the_hub_offline(tmp_path: Path, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    data = jsonl(tmp_path / "d.jsonl", [rec("a")])
    expected = ("model llava-1.5-7b: llava-hf/llava-1.5-7b-hf is not in the local Hugging Face cache and the hub is "
                "offline (HF_HUB_OFFLINE): download it where the hub is reachable (`hf download "
                "llava-hf/llava-1.5-7b-hf`), or give --model_path a local copy of it")
    rc, _, err = cli(capsys, "labels", "--model_id", MODEL, "--data", str(data))
    assert (rc, err) == (2, f"cardtune labels: {expected}\n")
    rc, _, err = train_main(capsys, "--model_id", MODEL, "--data_path", str(data), "--output_dir", str(tmp_path / "o"))
    assert (rc, err) == (2, f"train: {expected}\n")
    # --no-encode reads no model file: it still works offline
    rc, out, _ = cli(capsys, "validate-data", "--model_id", MODEL, "--data", str(data), "--no-encode")
    assert rc == 0 and "ok: 1 records" in out


def test_card_naming_a_missing_loader(tmp_path: Path, capsys) -> None:
    card = write(tmp_path / "mine.yaml", CARD + "loader: nope\n")
    data = jsonl(tmp_path / "d.jsonl", [rec("a")])
    expected = f"{card}:9: loader: unknown loader 'nope' (known: demo, generic, qwen-vl)"
    rc, _, err = train_main(capsys, "--cards", str(tmp_path), "--model_id", "my-model", "--data_path", str(data),
                            "--output_dir", str(tmp_path / "out"))
    assert (rc, err) == (2, f"train: {expected}\n")
    rc, _, err = cli(capsys, "labels", "--cards", str(tmp_path), "--model_id", "my-model", "--data", str(data))
    assert (rc, err) == (2, f"cardtune labels: {expected}\n")
    rc, _, err = cli(capsys, "check", "--cards", str(tmp_path))
    assert rc == 1 and f"FAIL {expected}\n" in err


def test_card_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    card = tmp_path / "latin1.yaml"
    card.write_bytes(CARD.lstrip().replace("model_class", "description: caf\xe9\nmodel_class").encode("latin-1"))
    rc, _, err = cli(capsys, "list", "--cards", str(tmp_path))
    assert (rc, err) == (2, f"cardtune list: {card}:2: not UTF-8 text: byte 0xe9 at column 17 (byte offset 31); "
                            "save the file as UTF-8\n")


# -- 15. the path-escape hint names an option every command has ---------------------------------
def test_allow_absolute_paths_is_the_option_of_every_data_command(tmp_path: Path, capsys) -> None:
    from PIL import Image

    outside = tmp_path / "elsewhere" / "red.png"
    outside.parent.mkdir()
    Image.new("RGB", (32, 32), "red").save(outside)
    (tmp_path / "imgs").mkdir()
    data = jsonl(tmp_path / "d.jsonl", [rec("abs", "<image>\nWhat colour?", "Red.", image=str(outside))])
    rc, out, _ = cli(capsys, "validate-data", *llava("--data", str(data), "--image-folder", str(tmp_path / "imgs")))
    assert rc == 1 and "path_escape" in out and "--allow-absolute-paths permits it" in out
    for command in ("validate-data", "labels", "inspect"):
        rc, _, err = cli(capsys, command, *llava("--data", str(data), "--image-folder", str(tmp_path / "imgs"),
                                                 "--allow-absolute-paths"))
        assert rc == 0, (command, err)
    base = [*DEMO, "--data_path", str(data), "--image_folder", str(tmp_path / "imgs"), "--max_steps", "1"]
    rc, _, err = train_main(capsys, *base, "--output_dir", str(tmp_path / "refused"))
    assert rc == 1 and "path_escape" in err and "--allow-absolute-paths permits it" in err
    rc, _, err = train_main(capsys, *base, "--output_dir", str(tmp_path / "out"), "--allow-absolute-paths")
    assert rc == 0, err
    assert parse_arguments([*DEMO, "--allow_absolute_paths"]).data.allow_absolute_paths is True
