"""``cardtune report RUN_DIR``: rebuild a run's ``report.html`` from what the run wrote."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cardtune.cli import Handler, command


@command("report", "rebuild RUN_DIR/report.html (model, data, curves, generation metrics, labels, predictions)")
def _configure_report(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's output folder")
    p.add_argument("--out", metavar="FILE", help="write the page here instead of RUN_DIR/report.html")

    def run(args: argparse.Namespace) -> int:
        from cardtune.report.run import ARGS_FILE, LOG_FILE, REPORT_FILE, build_report

        folder = Path(args.run_dir)
        if not folder.is_dir():
            print(f"cardtune report: {folder}: no such folder", file=sys.stderr)
            return 2
        if not (folder / ARGS_FILE).is_file() and not (folder / LOG_FILE).is_file():
            print(f"cardtune report: {folder}: not a training run's folder (no {ARGS_FILE}, no {LOG_FILE})",
                  file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else folder / REPORT_FILE
        html = build_report(folder)
        out.write_text(html, encoding="utf-8")
        print(f"cardtune report: {out} ({len(html.encode()) / 1024:.0f} KiB)", file=sys.stderr)
        return 0

    return run
