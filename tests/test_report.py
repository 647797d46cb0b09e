"""``report.html``: written at the end of a run, rebuilt by ``cardtune report``, one self-contained
page (no script, no network, no external asset) whose every section renders in a real headless
Chromium; its size stays bounded for a long MoE run; ``cardtune inspect --html`` writes the
label view alone."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from test_eval import demo_run  # noqa: F401  (fixture: the demo trained 60 steps with --eval_generate 4)

SECTIONS = ["model", "data", "curves", "generation", "labels", "predictions"]
MB = 1024 * 1024


def synthetic_run(folder: Path, steps: int = 1000, layers: int = 12, experts: int = 8, eval_every: int = 50) -> Path:
    """The files a long MoE-tuning run with --eval_generate 16 writes (no weights): every step
    logged, expert load per layer, an evaluation every ``eval_every`` steps."""
    folder.mkdir(parents=True)
    history: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        entry = {"loss": 3 * math.exp(-step / 300) + 0.2 + (2.5 if step == 437 else 0) + 0.05 * math.sin(step),
                 "grad_norm": 1 + 0.3 * math.cos(step / 7), "learning_rate": 2e-4 * (1 - step / steps),
                 "epoch": step / 100, "step": step, "aux_loss": 0.01 + 0.001 * math.sin(step),
                 "moe_load_cv": 0.4 * math.exp(-step / 400)}
        for layer in range(0, 2 * layers, 2):
            shares = [1 + 0.5 * math.sin(step / 50 + e + layer) for e in range(experts)]
            total = sum(shares)
            entry.update({f"moe_load/layer_{layer}/expert_{e}": round(s / total, 4) for e, s in enumerate(shares)})
        history.append(entry)
        if step % eval_every == 0:
            history.append({"eval_loss": 2 * math.exp(-step / 400) + 0.3, "eval_exact_match": min(1.0, step / steps),
                            "eval_normalized_match": min(1.0, step / steps + 0.05), "eval_chrf": 40 + 50 * step / steps,
                            "eval_runtime": 1.0, "epoch": step / 100, "step": step})
    history.append({"train_runtime": 1234.5, "train_loss": 0.5, "epoch": 10.0, "step": steps})
    (folder / "log_history.json").write_text(json.dumps(history, indent=1))
    (folder / "cardtune_args.json").write_text(json.dumps({
        "model_id": "moe-llava-qwen-1.8b", "data_path": str(folder / "gone.json"), "use_lora": False,
        "moe_layers": "sparse", "moe_num_experts": "4", "moe_top_k": 2, "learning_rate": 2e-4, "max_steps": steps,
        "eval_generate": 16, "seed": 42}, indent=2))
    (folder / "cardtune_card.yaml").write_text("# The card this model was trained with: model id moe-llava-qwen-1.8b, "
                                               "base weights from stage2/.\nfamily: qwen2-vl\nloader: generic\n")
    (folder / "data_report.json").write_text(json.dumps({
        "train": {"data_path": "train.json", "records": 5200, "samples": 5000, "tokens": 3_400_000, "mean_tokens": 680.0,
                  "longest": 2048, "with_media": 4800, "problems": {"missing_media": 150, "too_long": 50},
                  "truncated": 3},
        "eval": {"data_path": "eval.json", "records": 200, "samples": 200, "tokens": 130_000, "mean_tokens": 650.0,
                 "longest": 1900, "with_media": 190, "problems": {}, "truncated": 0}}))
    with (folder / "skipped_samples.jsonl").open("w") as f:
        for i in range(200):
            f.write(json.dumps({"id": f"s{i}", "source": f"train.json[{i}]", "index": i, "errors": [
                {"field": "images[0]", "reason": "missing_media", "detail": f"img/{i}.png not found"}]}) + "\n")
    with (folder / "generations.jsonl").open("w") as f:
        for step in range(eval_every, steps + 1, eval_every):
            for i in range(16):
                f.write(json.dumps({"step": step, "id": f"e{i}", "prompt": "<|im_start|>user\n<image>×576\nWhat colour "
                                    "is it?<|im_end|>\n<|im_start|>assistant\n" * 5, "reference": "It is red.",
                                    "prediction": "It is red." if step > 500 else "It is blue.",
                                    "scores": {"exact_match": float(step > 500)}}) + "\n")
    return folder


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from cardtune.report.run import write_report

    folder = synthetic_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(folder)
    return folder, path.read_text(encoding="utf-8")


def section_ids(html: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', html)


def assert_self_contained(html: str) -> None:
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert not re.search(r'(?:src|href)="(?:https?:)?//', html), "a resource from the network"
    for ref in re.findall(r'(?:src|href)="([^"#][^"]*)"', html):
        assert ref.startswith("data:image/png;base64,"), ref[:60]
    assert not re.search(r"url\((?!#)", html)


def test_a_1000_step_moe_run_report_stays_small_and_complete(long_run: tuple[Path, str]) -> None:
    from cardtune.report.charts import MAX_POINTS

    folder, html = long_run
    size = len(html.encode())
    assert size < 2 * MB, f"report.html is {size / MB:.1f} MB"
    assert section_ids(html) == ["model", "data", "curves", "generation", "moe", "labels", "predictions"]
    assert_self_contained(html)
    for points in re.findall(r'<polyline points="([^"]+)"', html):
        assert len(points.split()) <= MAX_POINTS
    assert html.count(">Expert load, layer_") == 12 and html.count("<image ") == 12  # one heatmap per layer
    assert "… and 150 more" in html  # skipped samples: the first 50 shown, the rest counted
    assert "the training data is not where the run read it" in html
    assert "prediction at step 50" in html and "prediction at step 1000" in html
    assert "missing_media 150, too_long 50" in html


def test_curves_keep_a_spike_when_cut_to_size() -> None:
    from cardtune.report.charts import downsample

    points = [(float(i), 1.0) for i in range(10_000)]
    points[4321] = (4321.0, 9.0)
    cut = downsample(points, 400)
    assert len(cut) <= 400 and (4321.0, 9.0) in cut and cut[0] == points[0] and cut[-1] == points[-1]
    assert [x for x, _ in cut] == sorted(x for x, _ in cut)


def test_the_run_writes_its_report_and_cardtune_report_rebuilds_it(demo_run, tmp_path: Path,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from cardtune.cli import main as cli

    out, _, result = demo_run
    assert result.summary["report"] == str(out / "report.html")
    written = (out / "report.html").read_text(encoding="utf-8")
    assert section_ids(written) == SECTIONS
    assert_self_contained(written)
    data = json.loads((out / "data_report.json").read_text())
    assert data["train"]["samples"] == 320 and data["eval"]["samples"] == 48 and data["train"]["tokens"] > 0
    labels = written[written.index('id="labels"'):written.index('id="predictions"')]
    assert "&lt;image&gt;×16" in labels and 'class="t"' in labels and "data:image/png;base64," in labels
    assert "prediction at step 30" in written and "prediction at step 60" in written
    rebuilt = tmp_path / "again.html"
    assert cli(["report", str(out), "--out", str(rebuilt)]) == 0
    again = rebuilt.read_text(encoding="utf-8")
    assert section_ids(again) == SECTIONS
    # the label view rebuilt from the folder's own tokenizer, card and arguments: the same samples
    relabelled = again[again.index('id="labels"'):again.index('id="predictions"')]
    assert relabelled == labels
    assert cli(["report", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_inspect_html_writes_the_label_view_alone(demo_run, tmp_path: Path) -> None:  # noqa: F811
    from cardtune.cli import main as cli
    from cardtune.demo import IMAGE_DIR, TRAIN_FILE

    _, demo, _ = demo_run
    page = tmp_path / "labels.html"
    assert cli(["inspect", "--model_id", "tiny-llava-demo", "--data", str(demo / TRAIN_FILE), "--image-folder",
                str(demo / IMAGE_DIR), "-n", "3", "--html", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert section_ids(html) == ["labels"]
    assert_self_contained(html)
    assert html.count('<div class="sample">') == 3 and "&lt;image&gt;×16" in html and "data:image/png;base64," in html


# -- in a real browser ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Any:
    from browser import Browser, find_chromium

    binary, why = find_chromium()
    if binary is None:
        pytest.skip(f"no headless browser: {why}")
    try:
        instance = Browser(binary)
    except (OSError, RuntimeError, TimeoutError) as exc:
        pytest.skip(f"{binary} does not start here: {exc}")
    yield instance
    instance.close()


BOXES = """JSON.stringify([...document.querySelectorAll('section, section svg')].map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName.toLowerCase(), id: e.id || e.closest('section').id, x: r.left + scrollX, y: r.top + scrollY,
          width: r.width, height: r.height};
}))"""


def _check_page(browser: Any, page: Path, sections: list[str], shots: Path, name: str) -> None:
    from PIL import Image

    browser.open(page)
    boxes = json.loads(browser.evaluate(BOXES))
    found = [b for b in boxes if b["tag"] == "section"]
    assert [b["id"] for b in found] == sections
    for box in boxes:
        assert box["width"] > 100 and box["height"] > 20, box
    for box in found:
        png = browser.screenshot({k: box[k] for k in ("x", "y", "width", "height")})
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert abs(image.width - box["width"]) <= 1 and abs(image.height - box["height"]) <= 1
        colours = image.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 8, f"section {box['id']} is blank"
        (shots / f"{name}-{box['id']}.png").write_bytes(png)
    external = [u for u in browser.requested_urls() if not u.startswith(("file:", "data:"))]
    assert not external, external


def test_the_pages_render_every_section_in_a_browser(browser: Any, long_run: tuple[Path, str], demo_run,  # noqa: F811
                                                     tmp_path: Path) -> None:
    long_folder, _ = long_run
    out, _, _ = demo_run
    _check_page(browser, long_folder / "report.html", ["model", "data", "curves", "generation", "moe", "labels",
                                                        "predictions"], tmp_path, "moe-run")
    _check_page(browser, out / "report.html", SECTIONS, tmp_path, "demo-run")
    whole = browser.screenshot({"x": 0, "y": 0, "width": 1280, "height": 900})
    assert len(whole) > 10_000


def test_an_moe_run_shows_expert_load_and_its_model_is_evaluated(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """MoE-tuning on the demo (every layer upcycled, LoRA on the experts): the report has the
    expert-load section, one heatmap per MoE layer; ``cardtune eval`` answers with the MoE
    adapter folder, and the rebuilt report shows that evaluation."""
    from test_train import train

    from cardtune.cli import main as cli
    from cardtune.demo import EVAL_FILE, IMAGE_DIR, ensure_demo_dataset

    out = tmp_path / "moe"
    train(["--model_id", "tiny-llava-demo", "--output_dir", str(out), "--moe_layers", "dense", "--moe_train", "lora",
           "--max_steps", "20", "--eval_steps", "10", "--eval_generate", "2"])
    html = (out / "report.html").read_text(encoding="utf-8")
    assert section_ids(html) == ["model", "data", "curves", "generation", "moe", "labels", "predictions"]
    assert html.count(">Expert load, layer_") == 2  # the demo's two decoder layers
    demo = ensure_demo_dataset()
    capsys.readouterr()
    assert cli(["eval", "--no-progress", "--model", str(out), "--data", str(demo / EVAL_FILE), "--image-folder",
                str(demo / IMAGE_DIR), "--limit", "4", "--max-new-tokens", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 4
    assert cli(["report", str(out)]) == 0
    rebuilt = (out / "report.html").read_text(encoding="utf-8")
    assert "cardtune eval: eval-eval" in rebuilt and section_ids(rebuilt) == section_ids(html)
