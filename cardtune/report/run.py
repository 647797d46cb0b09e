"""``report.html``: one page about a run, built from what the run wrote into its output folder.

Read: ``cardtune_card.yaml`` and ``cardtune_args.json`` (model, card, arguments),
``log_history.json`` (loss, eval loss, learning rate, ``--eval_generate`` metrics, MoE expert
load), ``data_report.json`` (samples and tokens per split, written at the end of the run),
``skipped_samples.jsonl`` (and ``eval/``'s), ``generations.jsonl`` (``--eval_generate``'s
answers), ``eval-*/`` (``cardtune eval`` into the folder), and for the label view the run's
saved tokenizer/processor with the first training samples. ``cardtune report RUN_DIR``
rebuilds it from those files alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from cardtune.report.charts import heatmap, line_chart
from cardtune.report.page import Raw, Section, page, table

REPORT_FILE = "report.html"
DATA_FILE = "data_report.json"
LOG_FILE = "log_history.json"
CARD_FILE = "cardtune_card.yaml"
ARGS_FILE = "cardtune_args.json"
SKIPPED_FILE = "skipped_samples.jsonl"
LABEL_SAMPLES = 3
MAX_ROWS = 50
KEY_ARGUMENTS = ("model_id", "model_path", "template", "data_path", "eval_data_path", "image_folder", "max_length",
                 "use_lora", "lora_r", "lora_alpha", "q_lora", "train_vision_encoder", "train_vision_projector",
                 "train_llm", "moe_layers", "moe_num_experts", "moe_top_k", "learning_rate", "lr_scheduler_type",
                 "warmup_steps", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "packing", "group_by_length", "eval_generate", "seed", "bf16")
_MOE_KEY = re.compile(r"^moe_load/(.+)/expert_(\d+)$")


# -- what the run wrote ---------------------------------------------------------------------
def _json(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def split_summary(split: Any, data_path: str | None) -> dict[str, Any]:
    """What ``data_report.json`` keeps of one split (``training.data.SplitData``)."""
    lengths = [n for n in split.lengths if n is not None]
    report = split.report
    return {
        "data_path": data_path, "records": report.num_records, "samples": len(split.samples),
        "tokens": sum(lengths), "mean_tokens": round(sum(lengths) / len(lengths), 1) if lengths else None,
        "longest": max(lengths, default=None), "with_media": sum(1 for f in split.media_flags if f),
        "problems": report.counts, "dropped": report.num_bad if split.policy == "skip" else 0,
        "truncated": report.num_truncated, "typed_control_tokens": report.num_typed_control_tokens,
        "from_cache": bool(split.cached),
    }


# -- sections -------------------------------------------------------------------------------
def _series(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(float(h["step"]), float(h[key])) for h in history
            if isinstance(h.get(key), (int, float)) and isinstance(h.get("step"), (int, float))]


def model_section(folder: Path, args: dict[str, Any], card_text: str, history: list[dict[str, Any]]) -> Section:
    first = card_text.splitlines()[0] if card_text.startswith("#") else ""
    weights = first.split("base weights from ", 1)[1].rstrip(".") if "base weights from " in first else None
    family = next((line.split(":", 1)[1].strip() for line in card_text.splitlines() if line.startswith("family:")), None)
    kind = ("LoRA adapter" if (folder / "adapter_config.json").is_file() else "full model") + (
        ", MoE" if args.get("moe_layers") else "")
    losses = [v for _, v in _series(history, "loss")]
    evals = [v for _, v in _series(history, "eval_loss")]
    steps = max((h.get("step", 0) for h in history), default=0)
    rows = [("model id", args.get("model_id") or "—"), ("family", family), ("base weights", weights or args.get("model_path")),
            ("output", kind), ("steps", steps),
            ("train loss", f"{losses[0]:.4g} (first logged) → {losses[-1]:.4g} (last)" if losses else None),
            ("eval loss", f"{evals[0]:.4g} (first) → {evals[-1]:.4g} (last)" if evals else None)]
    runtime = next((h["train_runtime"] for h in reversed(history) if "train_runtime" in h), None)
    if runtime is not None:
        rows.append(("training time", f"{runtime:.1f} s"))
    key_rows = [(k, json.dumps(args[k]) if isinstance(args[k], (list, dict)) else args[k])
                for k in KEY_ARGUMENTS if k in args and args[k] not in (None, False, [], "", 0)
                and (args.get("moe_layers") or not k.startswith("moe_"))]
    every = json.dumps({k: v for k, v in args.items() if v not in (None, [], {})}, indent=1, default=str)
    body = (table(("", ""), rows, header_row=False) + "<h3>Arguments</h3>" + table(("argument", "value"), key_rows)
            + f"<details><summary>every argument ({ARGS_FILE})</summary><pre class=\"code\">{escape(every)}</pre></details>"
            + f"<details><summary>the card ({CARD_FILE})</summary><pre class=\"code\">{escape(card_text)}</pre></details>")
    return Section("model", "Model, card and arguments", body)


def data_section(folder: Path, data: dict[str, Any]) -> Section:
    parts = []
    if data:
        rows = []
        for split, s in data.items():
            if not s:
                continue
            problems = ", ".join(f"{r} {n}" for r, n in (s.get("problems") or {}).items()) or "none"
            rows.append((split, s.get("data_path"), s.get("records"), s.get("samples"), s.get("tokens"),
                         s.get("mean_tokens"), s.get("longest"), s.get("with_media"), problems, s.get("truncated")))
        parts.append(table(("split", "data", "records", "samples trained", "tokens", "mean tokens", "longest",
                            "with media", "problems", "truncated"), rows, numeric=(2, 3, 4, 5, 6, 7, 9)))
    else:
        parts.append(f'<p class="note">No {DATA_FILE}: the run did not finish, or was written by an older cardtune.</p>')
    for split, file in (("train", folder / SKIPPED_FILE), ("eval", folder / "eval" / SKIPPED_FILE)):
        skipped = _jsonl(file)
        if not skipped:
            continue
        rows = [(r.get("id"), r.get("source"), "; ".join(f"{e.get('field')}: {e.get('reason')}: {e.get('detail')}"
                                                          for e in r.get("errors", [])),
                 r.get("found", "validation")) for r in skipped[:MAX_ROWS]]
        more = f'<p class="note">… and {len(skipped) - MAX_ROWS} more in {file}</p>' if len(skipped) > MAX_ROWS else ""
        parts.append(f"<h3>Skipped ({split}): {len(skipped)}</h3>" + table(("id", "source", "why", "found in"), rows) + more)
    if not any(_jsonl(f) for f in (folder / SKIPPED_FILE, folder / "eval" / SKIPPED_FILE)):
        parts.append('<p class="note">No sample was skipped.</p>')
    return Section("data", "Data", "".join(parts))


def curves_section(history: list[dict[str, Any]]) -> Section:
    charts = [line_chart([("train loss", _series(history, "loss")), ("eval loss", _series(history, "eval_loss"))],
                         title="Loss", y_label="loss", markers=("eval loss",), chart_id="chart-loss"),
              line_chart([("learning rate", _series(history, "learning_rate"))], title="Learning rate",
                         y_label="lr", chart_id="chart-lr")]
    if _series(history, "grad_norm"):
        charts.append(line_chart([("gradient norm", _series(history, "grad_norm"))], title="Gradient norm",
                                 chart_id="chart-grad"))
    return Section("curves", "Loss and learning rate", '<div class="grid2">' + "".join(charts) + "</div>")


def generation_section(history: list[dict[str, Any]], evals: list[tuple[str, dict[str, Any]]]) -> Section:
    names = (("eval_exact_match", "exact match"), ("eval_normalized_match", "normalized match"))
    chrf = [(x, y / 100) for x, y in _series(history, "eval_chrf")]
    series = [(label, _series(history, key)) for key, label in names] + [("chrF / 100", chrf)]
    parts = []
    if any(points for _, points in series):
        parts.append(line_chart(series, title="Generation metrics at each evaluation (--eval_generate)",
                                markers=tuple(n for n, _ in series), chart_id="chart-generation"))
        rows = [(h["step"], h.get("eval_exact_match"), h.get("eval_normalized_match"), h.get("eval_chrf"),
                 h.get("eval_loss")) for h in history if "eval_exact_match" in h]
        parts.append(table(("step", "exact match", "normalized match", "chrF", "eval loss"), rows,
                           numeric=(0, 1, 2, 3, 4)))
    else:
        parts.append('<p class="note">No generation metrics in the logs: train with <code>--eval_generate N</code> '
                     "to score N eval samples' answers at each evaluation.</p>")
    for name, result in evals:
        metrics = result.get("metrics", {})
        parts.append(f"<h3>cardtune eval: {escape(name)}</h3>"
                     + table(("metric", "value"), [(k, v) for k, v in metrics.items()], numeric=(1,)))
    return Section("generation", "Generation metrics", "".join(parts))


def moe_section(history: list[dict[str, Any]]) -> Section | None:
    layers: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for h in history:
        for key, value in h.items():
            m = _MOE_KEY.match(key)
            if m and isinstance(h.get("step"), (int, float)):
                layers.setdefault(m.group(1), {}).setdefault(int(m.group(2)), []).append((float(h["step"]), value))
    if not layers:
        return None
    parts = ['<p class="note">Share of the routed tokens each expert received in each logging window '
             "(an even split is 1/experts).</p>", '<div class="grid2">']
    for layer in sorted(layers, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]):
        experts = layers[layer]
        steps = sorted({s for points in experts.values() for s, _ in points})
        index = {s: i for i, s in enumerate(steps)}
        values = []
        for e in sorted(experts):
            row = [0.0] * len(steps)
            for s, v in experts[e]:
                row[index[s]] = v
            values.append(row)
        parts.append(heatmap([f"expert {e}" for e in sorted(experts)], steps, values, title=f"Expert load, {layer}"))
    parts.append("</div>")
    charts = [line_chart([("load imbalance (CV)", _series(history, "moe_load_cv"))], title="Expert load imbalance",
                         chart_id="chart-moe-cv")]
    if _series(history, "aux_loss"):
        charts.append(line_chart([("aux loss", _series(history, "aux_loss"))], title="Load-balancing loss",
                                 chart_id="chart-moe-aux"))
    parts.append('<div class="grid2">' + "".join(charts) + "</div>")
    return Section("moe", "Expert load (MoE)", "".join(parts))


def labels_section(label_html: str | None, why_not: str | None) -> Section:
    body = label_html if label_html else f'<p class="note">{escape(why_not or "no sample to show")}</p>'
    return Section("labels", "Labels of the first training samples", body)


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def predictions_section(generations: dict[int, list[dict[str, Any]]],
                        eval_predictions: list[tuple[str, list[dict[str, Any]]]]) -> Section:
    parts = []
    if generations:
        steps = sorted(generations)
        first, last = steps[0], steps[-1]
        earlier = {r.get("id"): r for r in generations[first]}
        rows = []
        for r in generations[last][:MAX_ROWS]:
            ok = r.get("scores", {}).get("exact_match") == 1.0
            rows.append((r.get("id"), Raw(escape(_short(r.get("prompt", ""))), "prompt"), r.get("reference"),
                         earlier.get(r.get("id"), {}).get("prediction") if first != last else None,
                         Raw(f'<span class="{"good" if ok else "bad"}">{"✓" if ok else "✗"}</span> '
                             f'{escape(r.get("prediction", ""))}', "pred")))
        parts.append(f"<h3>--eval_generate: step {first} and step {last}</h3>"
                     + table(("id", "prompt (end)", "reference", f"prediction at step {first}",
                              f"prediction at step {last}"), rows))
    for name, records in eval_predictions:
        rows = []
        for r in records[:MAX_ROWS]:
            if "prediction" not in r:
                rows.append((r.get("id"), "", "", Raw(f'<span class="bad">{escape(r.get("error", ""))}</span>')))
                continue
            ok = r.get("scores", {}).get("exact_match") == 1.0
            rows.append((r.get("id"), Raw(escape(_short(r.get("prompt", ""))), "prompt"), r.get("reference"),
                         Raw(f'<span class="{"good" if ok else "bad"}">{"✓" if ok else "✗"}</span> '
                             f'{escape(r["prediction"])}', "pred")))
        more = f'<p class="note">first {MAX_ROWS} of {len(records)}</p>' if len(records) > MAX_ROWS else ""
        parts.append(f"<h3>cardtune eval: {escape(name)}</h3>"
                     + table(("id", "prompt (end)", "reference", "prediction"), rows) + more)
    if not parts:
        parts.append('<p class="note">No predictions: train with <code>--eval_generate N</code>, or run '
                     "<code>cardtune eval --model RUN_DIR --data eval.json</code> (written into RUN_DIR/eval-*).</p>")
    return Section("predictions", "Predictions beside references", "".join(parts))


# -- the label view from the folder -----------------------------------------------------------
def labels_from_folder(folder: Path, args: dict[str, Any], n: int = LABEL_SAMPLES) -> tuple[str | None, str | None]:
    """(label view HTML, None) for the run's first training samples, encoded with the run's saved
    tokenizer/processor and card; (None, why) where that cannot be done."""
    from cardtune.training.output import adapter_base, is_adapter, processing_folder, read_card

    data = args.get("data_path")
    if not data:
        return None, f"{ARGS_FILE} names no training data"
    try:
        from cardtune.data.formats import check_data_paths

        check_data_paths(data)
    except Exception as exc:  # noqa: BLE001 - the data moved since the run
        return None, f"the training data is not where the run read it: {exc}"
    try:
        from cardtune.collators.engine import ChatEncoder
        from cardtune.loaders.generic import GenericLoader
        from cardtune.training.template import card_with_template

        card = card_with_template(read_card(folder), args.get("template"))
        with processing_folder(folder, adapter_base(folder) if is_adapter(folder) else None) as files:
            processing = GenericLoader(card, files).load_processing()
        encoder = ChatEncoder(card, processing, max_length=args.get("max_length"),
                              typed_control_tokens=args.get("typed_control_tokens") or "plain")
    except Exception as exc:  # noqa: BLE001 - a report is written whatever the folder lacks
        return None, f"the run's tokenizer/processor could not be loaded from {folder}: {type(exc).__name__}: {exc}"
    from cardtune.data.formats import load_samples
    from cardtune.data.media import MediaConfig

    samples = load_samples(data, user_key=args.get("user_key") or "human",
                           assistant_key=args.get("assistant_key") or "gpt")
    media = MediaConfig.from_card(card, image_folder=args.get("image_folder"), video_folder=args.get("video_folder"),
                                  allow_absolute_paths=bool(args.get("allow_absolute_paths")),
                                  max_image_pixels=args.get("max_image_pixels"))
    return label_html(encoder, samples, media, n), None


def label_html(encoder: Any, samples: Sequence[Any], media_config: Any, n: int = LABEL_SAMPLES) -> str:
    """The label view of the first ``n`` of ``samples``, encoded as training encodes them."""
    from cardtune.data.media import load_media
    from cardtune.errors import SampleError
    from cardtune.report.labels import label_view

    items = []
    for sample in (samples[i] for i in range(min(n, len(samples)))):
        media = None
        try:
            media = load_media(sample, media_config)
            result: Any = encoder.encode(sample, media)
        except SampleError as exc:
            result = exc
        except Exception as exc:  # noqa: BLE001 - a processor failing on one sample
            result = SampleError(sample.id, "messages", "template_error", f"{type(exc).__name__}: {exc}", sample.source)
        items.append((sample, result, media))
    return label_view(items, encoder)


# -- the page -------------------------------------------------------------------------------
def build_report(folder: str | Path, *, history: list[dict[str, Any]] | None = None,
                 labels: tuple[str | None, str | None] | None = None) -> str:
    """The page for the run in ``folder``; ``history`` and ``labels`` (label view HTML, or why
    none) where the caller has them at hand, else read from the folder."""
    from cardtune.evaluation.during_training import read_generations

    folder = Path(folder)
    args = _json(folder / ARGS_FILE, {})
    card_text = (folder / CARD_FILE).read_text(encoding="utf-8") if (folder / CARD_FILE).is_file() else ""
    history = history if history is not None else _json(folder / LOG_FILE, [])
    data = _json(folder / DATA_FILE, {})
    evals, eval_predictions = [], []
    for sub in sorted(p for p in folder.glob("eval-*") if (p / "metrics.json").is_file()):
        evals.append((sub.name, _json(sub / "metrics.json", {})))
        eval_predictions.append((sub.name, _jsonl(sub / "predictions.jsonl")))
    if labels is None:
        labels = labels_from_folder(folder, args)
    sections = [model_section(folder, args, card_text, history), data_section(folder, data), curves_section(history),
                generation_section(history, evals)]
    moe = moe_section(history)
    if moe is not None:
        sections.append(moe)
    sections += [labels_section(*labels), predictions_section(read_generations(folder), eval_predictions)]
    name = args.get("model_id") or folder.name
    return page(f"cardtune run: {name}", str(folder.resolve()), sections)


def write_report(folder: str | Path, **kwargs: Any) -> Path:
    path = Path(folder) / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(build_report(folder, **kwargs), encoding="utf-8")
    tmp.replace(path)
    return path


def write_run_report(output_dir: str | Path, history: list[dict[str, Any]], *, splits: dict[str, Any] | None = None,
                     data_paths: dict[str, str | None] | None = None, encoder: Any = None,
                     label_samples: Sequence[Any] = (), media: Any = None,
                     warn: Callable[[str], None] = print) -> Path | None:
    """At the end of a run (main process): ``log_history.json`` with the whole history (an
    evaluation after the end of training included), ``data_report.json``, then ``report.html``.
    A report that cannot be written is a warning: the trained model is what counts."""
    folder = Path(output_dir)
    try:
        (folder / LOG_FILE).write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
        if splits:
            summary = {name: split_summary(split, (data_paths or {}).get(name)) for name, split in splits.items()
                       if split is not None}
            (folder / DATA_FILE).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        labels = (label_html(encoder, label_samples, media), None) if encoder is not None and len(label_samples) else None
        return write_report(folder, history=history, labels=labels)
    except Exception as exc:  # noqa: BLE001 - never fail a finished run over its report
        warn(f"warning: {REPORT_FILE} was not written: {type(exc).__name__}: {exc}")
        return None
