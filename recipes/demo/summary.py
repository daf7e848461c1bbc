"""Print the demo's closing table: test CER of the baseline and of GM-OT, both trained from scratch at the
same budget, greedy and with the 3-gram, the gain, the real-time factors, and the plots.

Usage: python recipes/demo/summary.py OUT_DIR
(reads OUT_DIR/exp/<run>/decode_test/rtf.json, greedy, and decode_test_lm/rtf.json, beam search + 3-gram)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

RUNS = {
    "baseline": "CTC only, from scratch",
    "gmot": "CTC + GM-OT (fgw, centred tokens, order prior), from scratch",
}
DECODES = ("decode_test", "decode_test_lm")


def read(out: Path, run: str, dec: str) -> dict | None:
    """The rtf.json of one decode, or None when it is missing."""
    path = out / "exp" / run / dec / "rtf.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def main(out: Path) -> int:
    """Print the table for the demo folder `out`; return 1 when a run's decode result is missing."""
    table = Table(title=f"gmot demo: test set, voices held out of training ({out})")
    columns = (
        "run", "model", "CER % greedy", "RTF greedy", "CER % beam + 3-gram", "LM weight", "RTF beam + LM"
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    results = {run: {dec: read(out, run, dec) for dec in DECODES} for run in RUNS}
    missing = 0
    for run, label in RUNS.items():
        cells = [run, label]
        for dec in DECODES:
            r = results[run][dec]
            if r is None:
                cells += ["-", "-"] if dec == "decode_test" else ["-", "-", "-"]
                missing += 1
                continue
            cells.append(f"{100 * r['cer']:.2f}")
            if dec == "decode_test_lm":
                cells.append(f"{r['lm_weight']:g}")
            cells.append(f"{r['rtf']:.4f}")
        table.add_row(*cells)
    if not missing:
        gains = [100 * (results["baseline"][d]["cer"] - results["gmot"][d]["cer"]) for d in DECODES]
        table.add_row(
            "gain", "baseline - GM-OT (points of CER)", f"{gains[0]:+.2f}", "", f"{gains[1]:+.2f}", "", ""
        )
    console = Console(width=max(Console().width, 120))
    console.print(table)
    plots = sorted((out / "plots").glob("*.png"))
    console.print(f"transport-plan plots: {', '.join(str(p) for p in plots) or 'none'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_run")))
