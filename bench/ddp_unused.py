"""DDP step time with and without ``find_unused_parameters``, 2 gloo processes on CPU.

    python bench/ddp_unused.py [--steps 150] [--repeats 2]

The demo model (``tiny-llava-demo``, demo recipe: LoRA on the LLM, the projector in full) plus
LoRA on the vision tower, 2 processes launched by ``accelerate launch`` with
``configs/accelerate/cpu.yaml``, one thread each. Each run is timed by the training loop's own
clock (``done: N steps in S s``), once with ``--ddp_find_unused_parameters true`` (DDP walks the
autograd graph after every forward: what every DDP run did before) and once with cardtune's
default (``false``: every trainable parameter outside the language model gets a zero-weighted
touch, ``training/participation.py``), alternating, ``--repeats`` times each. The last line is
``RESULT step_ms_search=<ms> step_ms_touch=<ms> ratio=<touch/search>``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(find_unused: bool, steps: int, out: Path) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    cmd = ["accelerate", "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu.yaml"),
           str(REPO / "train.py"), "--model_id", "tiny-llava-demo", "--train_vision_encoder", "--use_vision_lora",
           "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--eval_strategy", "no",
           "--save_strategy", "no", "--logging_steps", str(steps), "--disable_tqdm", "true", "--report_to", "none",
           "--output_dir", str(out), "--ddp_find_unused_parameters", str(find_unused).lower()]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = re.search(r"done: (\d+) steps in ([\d.]+)s", done.stdout)
    if done.returncode or not found:
        raise SystemExit(done.stdout[-2000:] + done.stderr[-3000:])
    return 1000 * float(found.group(2)) / int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args()
    from cardtune.demo import ensure_demo_dataset, ensure_demo_model

    ensure_demo_model()
    ensure_demo_dataset()
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(a.repeats):
            for find_unused in (True, False):
                ms = run(find_unused, a.steps, Path(tmp) / f"run-{k}-{find_unused}")
                times[find_unused].append(ms)
                print(f"find_unused_parameters={str(find_unused).lower():5}  {ms:7.2f} ms/step", flush=True)
    search, touch = statistics.median(times[True]), statistics.median(times[False])
    print(f"RESULT step_ms_search={search:.2f} step_ms_touch={touch:.2f} ratio={touch / search:.3f}")


if __name__ == "__main__":
    main()
