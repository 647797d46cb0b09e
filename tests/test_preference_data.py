"""Preference data (issue 19): TRL's conversational form and LLaVA's, from JSON, JSONL and a
``datasets`` source, read into one sample per pair; the problems that make a pair untrainable
reported with the record's id like every other problem (and dropped with ``skip``); ``cardtune
labels``, ``inspect`` and ``validate-data`` show both sides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cardtune.conversation import REJECTED, is_preference, preference_sides

TRL = {"id": "trl", "images": ["a.png"],
       "prompt": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}],
       "chosen": [{"role": "assistant", "content": "Red."}],
       "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]}
LLAVA = {"id": "llava", "image": "a.png", "system_prompt": "Be brief.",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}],
         "chosen": "Red.", "rejected": {"from": "gpt", "value": "Blue."}}


def _read(records: list[Any], tmp_path: Path, suffix: str = ".jsonl") -> Any:
    from cardtune.data.formats import load_samples

    path = tmp_path / f"prefs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records), encoding="utf-8")
    return load_samples(str(path))


def _texts(sample: Any) -> list[tuple[str, str]]:
    from cardtune.conversation import message_text

    return [(m["role"], message_text(m)) for m in sample.messages]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_both_forms_read_as_the_same_pair(tmp_path: Path, suffix: str) -> None:
    samples = _read([TRL, LLAVA], tmp_path, suffix)
    assert not samples.errors and len(samples) == 2
    for sample in samples:
        assert is_preference(sample) and sample.images == ["a.png"]
        chosen, rejected = preference_sides(sample)
        assert _texts(chosen) == [("system", "Be brief."), ("user", "What colour?"), ("assistant", "Red.")]
        assert _texts(rejected) == [("system", "Be brief."), ("user", "What colour?"), ("assistant", "Blue.")]
        assert chosen.count_parts("image") == rejected.count_parts("image") == 1
        assert REJECTED not in chosen.messages[-1] and REJECTED not in rejected.messages[-1]


def test_answers_as_text_and_a_prompt_as_text(tmp_path: Path) -> None:
    record = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": [{"content": "No."}]}
    (sample,) = _read([record], tmp_path)
    assert [_texts(side) for side in preference_sides(sample)] == [
        [("user", "Say hi."), ("assistant", "Hi!")], [("user", "Say hi."), ("assistant", "No.")]]


def test_a_datasets_source_reads_pairs(tmp_path: Path) -> None:
    from datasets import Dataset

    from cardtune.data.formats import load_samples

    Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hi."}],
                        "chosen": [{"role": "assistant", "content": "Hi!"}],
                        "rejected": [{"role": "assistant", "content": "No."}]}]).to_parquet(tmp_path / "p.parquet")
    (sample,) = load_samples(str(tmp_path / "p.parquet"))
    assert _texts(preference_sides(sample)[1])[-1] == ("assistant", "No.")


def test_untrainable_pairs_are_reported_by_id(tmp_path: Path) -> None:
    from cardtune.data.validate import validate

    records = [
        {**LLAVA, "id": "same", "rejected": "Red."},
        {**LLAVA, "id": "empty", "rejected": "  "},
        {**LLAVA, "id": "number", "rejected": 3},
        {**LLAVA, "id": "one-sided", "rejected": None},
        {**TRL, "id": "two-messages", "chosen": [{"role": "assistant", "content": "A"}] * 2},
        {**TRL, "id": "not-assistant", "rejected": [{"role": "user", "content": "B"}]},
        {**TRL, "id": "media-answer", "images": ["a.png", "a.png"],
         "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "Red."}]}]},
        {**TRL, "id": "ends-with-answer", "images": [], "prompt": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Hello"}]},
        {**LLAVA, "id": "fine"},
    ]
    report = validate(_read(records, tmp_path), media=False)
    found = {(p.error.sample_id, p.error.reason) for p in report.problems}
    assert found == {("same", "same_answers"), ("empty", "empty_answer"), ("number", "non_string_turn"),
                     ("one-sided", "bad_format"), ("two-messages", "bad_format"), ("not-assistant", "bad_format"),
                     ("media-answer", "bad_format"), ("ends-with-answer", "roles_not_alternating")}
    details = {p.error.sample_id: f"{p.error.field}: {p.error.detail}" for p in report.problems}
    assert details["same"] == "messages[2].rejected: both answers are 'Red.'"
    assert details["empty"] == "messages[2].rejected.content: the rejected answer is empty"
    assert details["number"] == "messages[2].rejected.content: the rejected answer's text is int: 3"
    assert details["one-sided"] == ("rejected: a preference record has both 'chosen' and 'rejected'; its 'rejected' "
                                    "is null")
    assert "got 2 messages" in details["two-messages"]
    assert details["media-answer"] == "messages[2].content: the chosen answer holds media; media go in the prompt"
    assert report.num_bad == 8 and report.num_records == 9


USER, HI = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}


def test_whole_conversations_share_their_prompt(tmp_path: Path) -> None:
    """TRL's implicit-prompt form (trl-lib/ultrafeedback_binarized): the turns both sides share are
    the prompt; UltraFeedback's prompt text beside them is that turn; ShareGPT turns too."""
    no = {"role": "assistant", "content": "No."}
    system = {"role": "system", "content": "S"}
    records = [
        {"id": "implicit", "chosen": [USER, HI], "rejected": [USER, no]},
        {"id": "ultrafeedback", "prompt": "Hi?", "chosen": [USER, HI], "rejected": [USER, no],
         "messages": [USER, HI], "score_chosen": 8.0, "score_rejected": 2.0},
        {"id": "multi-turn", "chosen": [system, USER, HI, USER, HI], "rejected": [system, USER, HI, USER, no]},
        {"id": "sharegpt", "chosen": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
         "rejected": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "No."}]},
    ]
    samples = _read(records, tmp_path)
    assert not samples.errors
    sides = {s.id: [_texts(side) for side in preference_sides(s)] for s in samples}
    pair = [[("user", "Hi?"), ("assistant", "Hello.")], [("user", "Hi?"), ("assistant", "No.")]]
    assert sides["implicit"] == sides["ultrafeedback"] == sides["sharegpt"] == pair
    assert sides["multi-turn"] == [[("system", "S"), ("user", "Hi?"), ("assistant", "Hello."), *side] for side in pair]


def test_whole_conversations_that_part_early_or_contradict_their_prompt(tmp_path: Path) -> None:
    from cardtune.data.validate import validate

    records = [
        {"id": "early", "chosen": [USER, HI, USER, HI], "rejected": [USER, {**HI, "content": "Yo."}, USER, HI]},
        {"id": "other-prompt", "prompt": "Bye?", "chosen": [USER, HI], "rejected": [USER, {**HI, "content": "No."}]},
        {"id": "two-prompts", "prompt": "Hi?", "conversations": [{"from": "human", "value": "Hi?"}],
         "chosen": "A", "rejected": "B"},
        {"id": "identical", "chosen": [USER, HI], "rejected": [USER, HI]},
    ]
    report = validate(_read(records, tmp_path), media=False)
    details = {p.error.sample_id: (p.error.field, p.error.reason, p.error.detail) for p in report.problems}
    assert details == {
        "early": ("chosen[1]", "bad_format", "'chosen' and 'rejected' are whole conversations that part at message 1, "
                  "3 messages before the end of 'chosen': a pair is one prompt and two final answers (give the shared "
                  "turns under 'prompt', each answer alone)"),
        "other-prompt": ("prompt", "bad_format", "'chosen' and 'rejected' are whole conversations, and the 1 message(s) "
                         "they share before their answers are not 'prompt': give the prompt once (under 'prompt', each "
                         "answer alone) or leave 'prompt' out"),
        "two-prompts": ("record", "bad_format", "holds both 'prompt' (TRL) and 'conversations' (LLaVA) as the prompt, "
                        "and only one would be read: keep one"),
        "identical": ("messages[1].rejected", "same_answers", "both answers are 'Hello.'"),
    }


@pytest.fixture(scope="module")
def demo() -> tuple[Path, Any]:
    from cardtune.collators.engine import ChatEncoder
    from cardtune.demo import ensure_demo_dataset, ensure_demo_model
    from cardtune.loaders.resolve import load_processing, resolve_model

    resolved = resolve_model("tiny-llava-demo", ensure_demo_model())
    return ensure_demo_dataset(), ChatEncoder(resolved.card, load_processing(resolved))


def test_validation_encodes_pairs_and_the_skip_policy_drops_exactly_the_bad_ones(demo, tmp_path: Path) -> None:
    from cardtune.collators.pairs import PairEncoder
    from cardtune.data.validate import SKIPPED_FILE, apply_policy, validate
    from cardtune.demo import IMAGE_DIR, PREFS_TRAIN_FILE, TRAIN_FILE

    folder, engine = demo
    pairs = json.loads((folder / PREFS_TRAIN_FILE).read_text())[:4]
    conversation = json.loads((folder / TRAIN_FILE).read_text())[0]
    samples = _read([*pairs, {**pairs[0], "id": "same", "rejected": pairs[0]["chosen"]}, conversation], tmp_path, ".json")
    report = validate(samples, PairEncoder(engine), image_folder=str(folder / IMAGE_DIR), num_workers=0)
    assert [(p.error.sample_id, p.error.reason) for p in report.problems] == [
        ("same", "same_answers"), (conversation["id"], "bad_format")]
    assert "not a preference record" in report.problems[1].error.detail
    lengths = [n for n in report.lengths if n is not None]
    assert len(lengths) == 4 and all(n > 16 for n in lengths)  # each pair's longer sequence, its image expanded
    kept = apply_policy(report, samples, "skip", tmp_path / "out", log=lambda line: None)
    assert [s.id for s in kept] == [p["id"] for p in pairs]
    skipped = [json.loads(line)["id"] for line in (tmp_path / "out" / SKIPPED_FILE).read_text().splitlines()]
    assert skipped == ["same", conversation["id"]]


def test_labels_inspect_and_validate_data_show_both_sides(demo, capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main
    from cardtune.demo import IMAGE_DIR, PREFS_EVAL_FILE

    folder, _ = demo
    data = ["--model_id", "tiny-llava-demo", "--data", str(folder / PREFS_EVAL_FILE), "--image-folder",
            str(folder / IMAGE_DIR)]
    assert main(["labels", *data]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(first) == {"id", "prompt_length", "chosen", "rejected"}
    start = first["prompt_length"]
    chosen, rejected = first["chosen"], first["rejected"]
    assert chosen["input_ids"][:start] == rejected["input_ids"][:start]
    assert set(chosen["labels"][:start]) == set(rejected["labels"][:start]) == {-100}
    assert chosen["labels"][start] != -100 and rejected["labels"][start] != -100

    assert main(["inspect", *data, "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "chosen" in shown and "rejected" in shown and f"the first {start} tokens, the prompt, are the same" in shown

    assert main(["validate-data", *data]) == 0
    assert "ok: 48 records, no problems" in capsys.readouterr().out
