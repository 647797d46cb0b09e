"""``cardtune eval`` and ``--eval_generate``: prompts exactly as training encodes them, batched
left-padded generation equal to one sample at a time and to ``cardtune chat``, scores, resume.

The prompt test runs on every fixture family with a template (the golden cases of
tests/test_labels_golden.py: their ids were computed without the engine; the VLMs' image cases
with their images, text cases elsewhere). The generation tests train the demo for a few steps
(one module fixture) and ask it its own eval samples: one image, two turns, two images, text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_labels_golden import (  # noqa: F401  (fixtures)
    FAMILIES,
    _params,
    conversation,
    encoders,
    golden,
    make_image,
    references,
)

IGNORE = -100
GROUP_ITEMS_BY = "model_id"  # run this module's tests model by model (tests/conftest.py)


# -- the prompt: training's tokens before the last answer ---------------------------------------
def _last_span_start(labels: list[int]) -> int:
    end = max(i for i, label in enumerate(labels) if label != IGNORE) + 1
    start = end - 1
    while start and labels[start - 1] != IGNORE:
        start -= 1
    return start


# per family: one and several turns, a system prompt, CJK text, images over two turns, reasoning
PROMPT_CASES = {"single_turn", "system_3turns", "cjk_emoji", "two_images", "system_one_image",
                "reasoning_last_of_two", "reasoning_three_answers"}


@pytest.mark.parametrize("model_id,case", [p for p in _params(engine=True) if p.values[1] in PROMPT_CASES])
def test_eval_prompt_is_the_training_render_up_to_the_last_answer(encoders, golden, model_id, case):  # noqa: F811
    """The eval prompt's ids are the golden training ids before the last answer's first trained
    token: the same template, date, system folding and media expansion; where the template's
    generation prompt stops short of what training puts before an answer (Qwen3's empty think
    block, gpt-oss's final-channel header, llava-interleave's merged newline) the prompt still
    ends where training's answer starts."""
    from cardtune.conversation import Media, Sample
    from cardtune.evaluation.prompts import prompt_for

    want = golden(model_id)[case]
    messages, images = conversation(case, FAMILIES[model_id])
    encoder = encoders(model_id)
    prompt = prompt_for(encoder, Sample(f"{model_id}/{case}", messages), Media(images=[make_image(n) for n in images]))
    start = _last_span_start(want["labels"])
    assert prompt.input_ids == want["input_ids"][:start], (
        f"{model_id}/{case}: eval prompt ends {encoder.tokenizer.decode(prompt.input_ids[-8:])!r}, "
        f"training's answer follows {encoder.tokenizer.decode(want['input_ids'][max(start - 8, 0):start])!r}")
    last = [m for m in messages if m["role"] == "assistant"][-1]
    assert prompt.reference == "".join(p["text"] for p in last["content"] if p["type"] == "text")
    assert prompt.num_images == len(images)


def test_prompt_keeps_only_the_conversation_before_the_last_answer() -> None:
    from cardtune.conversation import Sample
    from cardtune.errors import SampleError
    from cardtune.evaluation.prompts import up_to_last_answer

    def msg(role: str, text: str, image: bool = False) -> dict[str, Any]:
        return {"role": role, "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]}

    sample = Sample("s", [msg("user", "a", True), msg("assistant", "b"), msg("user", "c", True)], images=["1", "2"])
    cut = up_to_last_answer(sample)
    assert [m["role"] for m in cut.messages] == ["user", "assistant"] and cut.images == ["1"]
    with pytest.raises(SampleError, match="no_assistant_turn"):
        up_to_last_answer(Sample("t", [msg("user", "a")]))


# -- scores ----------------------------------------------------------------------------------
def test_scores_exact_normalized_chrf_and_a_user_scorer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cardtune.evaluation.metrics import Scorer, ScorerError, normalize

    assert normalize("  It is RED! ") == "it is red" == normalize("it is red")
    assert normalize("«Ça va?»  oui") == "ça va oui"
    (tmp_path / "my_scores.py").write_text(
        "def has_red(prediction, reference):\n    return 'red' in prediction\n"
        "def two(prediction, reference):\n    return {'length': len(prediction), 'same_start': prediction[:1] == reference[:1]}\n"
        "def bad(prediction, reference):\n    return 'yes'\n")
    monkeypatch.chdir(tmp_path)
    scorer = Scorer(["my_scores:has_red", "my_scores:two"])
    exact = scorer.score("It is red.", "It is red.")
    assert exact == {"exact_match": 1.0, "normalized_match": 1.0, "chrf": 100.0, "has_red": 1.0, "length": 10.0,
                     "same_start": 1.0}
    loose = scorer.score("it is red", "It is red.")
    assert loose["exact_match"] == 0.0 and loose["normalized_match"] == 1.0 and 50 < loose["chrf"] < 100
    other = scorer.score("Ein blauer Kreis.", "It is red.")
    assert other["normalized_match"] == 0.0 and other["chrf"] < 20 and other["has_red"] == 0.0
    records = [{"id": "a", "prediction": "It is red.", "reference": "It is red.", "scores": exact},
               {"id": "b", "prediction": "it is red", "reference": "It is red.", "scores": loose},
               {"id": "c", "error": "images[0]: missing_media: ..."}]
    metrics = scorer.summarise(records)
    assert metrics["samples"] == 2 and metrics["failed"] == 1
    assert metrics["exact_match"] == 0.5 and metrics["normalized_match"] == 1.0 and metrics["has_red"] == 1.0
    assert 0 < metrics["chrf"] <= 100 and 0 <= metrics["bleu"] <= 100
    with pytest.raises(ScorerError, match="not a number"):
        Scorer(["my_scores:bad"]).score("a", "b")
    for path, why in (("my_scores", "module:function"), ("no_such_module:f", "cannot import"),
                      ("my_scores:missing", "no function")):
        with pytest.raises(ScorerError, match=why):
            Scorer([path])


# -- batching ----------------------------------------------------------------------------------
def test_batches_pad_on_the_left_with_per_token_tensors_aligned() -> None:
    import torch

    from cardtune.evaluation.generate import Generator
    from cardtune.evaluation.prompts import Prompt

    class Handler:
        pad_id = 0

        def batch_aligned_keys(self) -> frozenset[str]:
            return frozenset()

    class Encoder:
        tokenizer = None
        handler = Handler()
        roles = None

    generator = Generator.__new__(Generator)
    generator.encoder, generator.pad_id = Encoder(), 0
    short = Prompt("a", [5, 6], {"pixel_values": torch.ones(1, 3), "token_type_ids": torch.tensor([[1, 0]])})
    long = Prompt("b", [7, 8, 9, 10], {"pixel_values": torch.full((2, 3), 2.0),
                                       "token_type_ids": torch.tensor([[0, 1, 1, 0]])})
    batch = generator.batch([short, long])
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6], [7, 8, 9, 10]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3)


# -- the demo, trained a little: eval == chat, batched == one at a time, resume ------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """(output folder, demo data folder, the run's result): 60 steps, --eval_generate 4."""
    from test_train import train

    from cardtune.demo import ensure_demo_dataset

    out = tmp_path_factory.mktemp("demo-eval") / "run"
    result = train(["--model_id", "tiny-llava-demo", "--output_dir", str(out), "--max_steps", "60",
                    "--eval_steps", "30", "--eval_generate", "4", "--eval_generate_max_new_tokens", "12"])
    return out, ensure_demo_dataset(), result


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    from cardtune.cli import main as cli

    capsys.readouterr()
    code = cli(["eval", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else {}, err


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_eval_generate_logs_generation_metrics_beside_eval_loss(demo_run) -> None:
    out, _, result = demo_run
    evaluations = [h for h in json.loads((out / "log_history.json").read_text()) if "eval_loss" in h]
    assert [h["step"] for h in evaluations] == [30, 60]
    for h in evaluations:
        assert {"eval_exact_match", "eval_normalized_match", "eval_chrf"} <= set(h)
        assert 0 <= h["eval_exact_match"] <= 1 and 0 <= h["eval_chrf"] <= 100
    steps = [json.loads(line)["step"] for line in (out / "generations.jsonl").read_text().splitlines()]
    assert steps == [30] * 4 + [60] * 4


def test_eval_equals_chat_and_batched_equals_one_at_a_time(demo_run, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Greedy: the same answers batched (left padding) and one at a time, and the same as
    ``cardtune chat`` asked the same turns with the same images."""
    from cardtune.commands.chat import ChatSession
    from cardtune.demo import EVAL_FILE, IMAGE_DIR

    out, demo, _ = demo_run
    records = json.loads((demo / EVAL_FILE).read_text())
    kinds = {"one image": next(r for r in records if isinstance(r.get("image"), str) and len(r["conversations"]) == 2),
             "two turns": next(r for r in records if len(r["conversations"]) == 4),
             "two images": next(r for r in records if isinstance(r.get("image"), list)),
             "text": next(r for r in records if "image" not in r)}
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(list(kinds.values())))
    common = ["--model", str(out), "--data", str(data), "--image-folder", str(demo / IMAGE_DIR),
              "--max-new-tokens", "12"]
    code, batched, _ = _eval(capsys, *common, "--out", str(tmp_path / "b4"), "--batch-size", "4")
    assert code == 0 and batched["samples"] == 4 and batched["failed"] == 0
    code, single, _ = _eval(capsys, *common, "--out", str(tmp_path / "b1"), "--batch-size", "1")
    assert code == 0
    four, one = _records(tmp_path / "b4"), _records(tmp_path / "b1")
    assert [r["id"] for r in four] == [r["id"] for r in one] == [r["id"] for r in kinds.values()]
    assert [r["prediction"] for r in four] == [r["prediction"] for r in one]
    assert any(r["prediction"] for r in four)
    assert four[2]["images"] == 2 and four[3]["images"] == 0 and "×16" in four[0]["prompt"]

    for record, predicted in zip(kinds.values(), four, strict=True):
        session = ChatSession(str(out), max_new_tokens=12)
        turns = record["conversations"]
        paths = record.get("image", [])
        paths = [str(demo / IMAGE_DIR / p) for p in ([paths] if isinstance(paths, str) else paths)]
        if len(turns) == 4:  # the earlier turn as the data gives it
            session.ask(turns[0]["value"].replace("<image>\n", ""), paths)
            session.messages[-1]["content"][0]["text"] = turns[1]["value"]
            paths = []
        answer = session.ask(turns[-2]["value"].replace("<image>\n", ""), paths)
        assert answer == predicted["prediction"], record["id"]


def test_eval_resumes_where_it_stopped(demo_run, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun skips the answered samples (a line cut short by a kill is dropped), tries the
    failed ones again, and refuses predictions made with other settings."""
    from cardtune.demo import EVAL_FILE, IMAGE_DIR
    from cardtune.evaluation import generate

    out, demo, _ = demo_run
    folder = tmp_path / "ev"
    common = ["--model", str(out), "--data", str(demo / EVAL_FILE), "--image-folder", str(demo / IMAGE_DIR),
              "--out", str(folder), "--max-new-tokens", "8", "--batch-size", "4"]
    code, first, _ = _eval(capsys, *common, "--limit", "6")
    assert code == 0 and first["samples"] == 6
    with (folder / "predictions.jsonl").open("a") as f:
        f.write('{"id": "demo-eval-0006", "predic')  # killed while writing
    asked: list[str] = []
    real = generate.Generator.generate

    def counting(self: Any, prompts: Any) -> Any:
        asked.extend(p.sample_id for p in prompts)
        return real(self, prompts)

    monkeypatch.setattr(generate.Generator, "generate", counting)
    code, second, _ = _eval(capsys, *common, "--limit", "10")
    assert code == 0 and second["samples"] == 10
    assert sorted(asked) == [f"demo-eval-{i:04d}" for i in range(6, 10)]
    ids = [r["id"] for r in _records(folder)]
    assert ids == [f"demo-eval-{i:04d}" for i in range(10)]
    code, _, err = _eval(capsys, *common[:-4], "--max-new-tokens", "9", "--batch-size", "4", "--limit", "10")
    assert code == 2 and "max_new_tokens 8 -> 9" in err


def test_eval_reports_a_sample_it_cannot_ask_and_exits_1(demo_run, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.demo import IMAGE_DIR

    out, demo, _ = demo_run
    data = tmp_path / "d.json"
    data.write_text(json.dumps([
        {"id": "gone", "image": "missing.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "fine", "conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi."}]}]))
    code, metrics, err = _eval(capsys, "--model", str(out), "--data", str(data), "--image-folder",
                               str(demo / IMAGE_DIR), "--out", str(tmp_path / "ev"))
    assert code == 1 and metrics["samples"] == 1 and metrics["failed"] == 1 and "1 failed" in err
    gone = _records(tmp_path / "ev")[0]
    assert gone["id"] == "gone" and "missing_media" in gone["error"]
