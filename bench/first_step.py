"""Time to the first training step at LLaVA scale: cold (nothing kept) and warm (the validated
data kept by the first run), on the demo model.

Generates N LLaVA-style records over M distinct 640x480 JPEGs (one image and one question per
record, answers of a few words to a few sentences), then runs ``train.py --max_steps 1`` as a
fresh process per measurement: once with an empty data cache (cold) and once more on the same
data (warm). Each run's wall time covers everything before and around the one step (imports,
reading, validation, model, the step, saving); its peak RSS is read from ``wait4`` (the inputs
are made in a child process, so no run inherits the peak of the process that starts it).

    python bench/first_step.py [--n 20000,200000] [--m 2000] [--workdir /tmp/first-step]

The last line is ``RESULT ms_per_sample_cold=<ms> warm_over_cold=<ratio> rss_ratio=<largest/smallest N>``
(the first two at the largest N). The line before it gives the import floor: what a fresh
process spends importing torch, transformers' Trainer, peft and datasets, which a warm start
pays whatever is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a shape colour red green blue yellow circle square triangle small big image picture left right "
         "top bottom near far bright dark one two three shows there is in of with and on").split()
QUESTIONS = ("What shape is in the image?", "What colour is the shape?", "Describe the image.",
             "Describe the picture briefly.", "What do you see in the image?")


def make_images(folder: Path, m: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for k in range(m):
        path = folder / f"img_{k:06d}.jpg"
        if path.exists():
            continue
        image = Image.new("RGB", (640, 480), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.randrange(600), rng.randrange(440)
            draw.rectangle((x, y, x + rng.randrange(20, 200), y + rng.randrange(20, 200)),
                           fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(path, quality=85)


def make_records(path: Path, n: int, m: int) -> None:
    if path.exists():
        return
    rng = random.Random(n)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."

    records = []
    for i in range(n):
        answer = " ".join(sentence(3, 12) for _ in range(rng.randint(1, 4)))
        records.append({"id": f"s{i}", "image": f"img_{rng.randrange(m):06d}.jpg",
                        "conversations": [{"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                                          {"from": "gpt", "value": answer}]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records), encoding="utf-8")
    tmp.rename(path)


def run_train(data: Path, images: Path, out: Path, env: dict[str, str], log: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, the run's output) of one ``train.py --max_steps 1``."""
    cmd = [sys.executable, str(REPO / "train.py"), "--model_id", "tiny-llava-demo", "--data_path", str(data),
           "--image_folder", str(images), "--output_dir", str(out), "--max_steps", "1",
           "--per_device_train_batch_size", "8", "--eval_strategy", "no", "--save_strategy", "no",
           "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "1"]
    started = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(out.parent))
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train.py failed ({log}):\n{text[-3000:]}")
    return wall, usage.ru_maxrss / 1024, text


def import_floor(env: dict[str, str]) -> float:
    """Seconds a fresh process takes to import what any training run imports before its first
    line of work (torch, transformers' Trainer, peft, datasets): the part of a warm start that
    no cache can remove."""
    code = "import torch, peft, datasets\nfrom transformers import Trainer, TrainingArguments"
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True)
        best = min(best, time.perf_counter() - started)
    return best


def prepare(work: Path, m: int, sizes: list[int]) -> None:
    """The inputs: the images, the records of every N, and the demo model (built outside the timed runs)."""
    from cardtune.demo import ensure_demo_model

    make_images(work / "images", m)
    for n in sizes:
        make_records(work / f"records-{n}.json", n, m)
    ensure_demo_model()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="20000,200000", help="record counts, comma-separated")
    ap.add_argument("--m", type=int, default=2000, help="distinct images")
    ap.add_argument("--workdir", default="/tmp/cardtune-first-step")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # the child that makes the inputs
    args = ap.parse_args()
    work = Path(args.workdir)
    images = work / "images"
    sizes = [int(x) for x in args.n.split(",")]
    model_cache = work / "model-cache"  # the demo model, built once and shared by every run
    data_cache = work / "data-cache"
    env = {**os.environ, "CARDTUNE_CACHE": str(model_cache), "CARDTUNE_DATA_CACHE": str(data_cache),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(REPO)}
    if args.prepare:
        prepare(work, args.m, sizes)
        return
    # Images, records and the demo model are made in a child process: on Linux a process's peak
    # RSS carries over from the process it was forked from, so this one stays small, or every
    # train.py measured would report this process's peak (200k records in memory) as its own.
    subprocess.run([sys.executable, __file__, "--workdir", str(work), "--m", str(args.m), "--n", args.n,
                    "--prepare"], env=env, check=True)

    rows = []
    for n in sizes:
        data = work / f"records-{n}.json"
        out = work / f"out-{n}"
        shutil.rmtree(data_cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        cold, cold_rss, cold_log = run_train(data, images, out, env, work / f"cold-{n}.log")
        shutil.rmtree(out)  # warm: the data cache is kept, not the run (an output folder holds one run)
        warm, warm_rss, warm_log = run_train(data, images, out, env, work / f"warm-{n}.log")
        used_cache = "from the cache" in warm_log
        rows.append((n, cold, warm, cold_rss, warm_rss, used_cache))
        print(f"N={n}: cold {cold:.1f}s warm {warm:.1f}s, peak RSS cold {cold_rss:.0f} MB warm {warm_rss:.0f} MB"
              f"{'' if used_cache else ' (the warm run did not use a cache)'}", flush=True)

    print(f"\n{'N':>8}{'cold s':>9}{'ms/sample':>11}{'warm s':>9}{'warm/cold':>11}{'RSS cold MB':>13}{'RSS warm MB':>13}")
    for n, cold, warm, cold_rss, warm_rss, _ in rows:
        print(f"{n:>8}{cold:>9.1f}{1000 * cold / n:>11.3f}{warm:>9.1f}{warm / cold:>11.3f}{cold_rss:>13.0f}{warm_rss:>13.0f}")
    if len(rows) > 1:
        (n0, c0, *_), (n1, c1, *_) = rows[0], rows[-1]
        print(f"marginal cold cost: {1000 * (c1 - c0) / (n1 - n0):.3f} ms per extra sample")
    n, cold, warm, cold_rss, _, _ = rows[-1]
    floor = import_floor(env)
    print(f"import floor (torch, transformers' Trainer, peft, datasets in a fresh process, best of 3): {floor:.1f}s; "
          f"warm beyond it at N={n}: {warm - floor:.1f}s = {(warm - floor) / cold:.3f} of cold")
    rss_ratio = max(cold_rss, rows[-1][4]) / max(rows[0][3], rows[0][4])
    print(f"RESULT ms_per_sample_cold={1000 * cold / n:.3f} warm_over_cold={warm / cold:.3f} rss_ratio={rss_ratio:.2f}")


if __name__ == "__main__":
    main()
