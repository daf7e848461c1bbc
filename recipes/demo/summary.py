"""Print the demo's closing table: test CER of the baseline and of GM-OT, the real-time factor, the plots.

Usage: python recipes/demo/summary.py OUT_DIR   (reads OUT_DIR/exp/<run>/decode_test/rtf.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

RUNS = {
    "baseline": "CTC, no transfer",
    "gmot": "CTC + GM-OT (fgw)",
}


def main(out: Path) -> int:
    """Print the table for the demo folder `out`; return 1 when a run's decode result is missing."""
    table = Table(title=f"gmot demo: test set, voices held out of training ({out})")
    for col in ("run", "model", "test CER %", "errors / chars", "RTF greedy"):
        table.add_column(col, justify="right" if col != "model" and col != "run" else "left")
    missing = 0
    for run, label in RUNS.items():
        rtf_file = out / "exp" / run / "decode_test" / "rtf.json"
        if not rtf_file.is_file():
            table.add_row(run, label, "-", "-", "-")
            missing += 1
            continue
        r = json.loads(rtf_file.read_text(encoding="utf-8"))
        table.add_row(
            run, label, f"{100 * r['cer']:.2f}", f"{r['errors']} / {r['ref_chars']}", f"{r['rtf']:.4f}"
        )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    plots = sorted((out / "plots").glob("*.png"))
    console.print(f"transport-plan plots: {', '.join(str(p) for p in plots) or 'none'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_run")))
