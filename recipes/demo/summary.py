"""Print the demo's closing table: test CER of the pretrained start, of the baseline continued from it and of
GM-OT from it, the real-time factors, the plots.

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
    "pretrain": "the start: CTC pretrained",
    "baseline": "start + CTC, no transfer",
    "gmot": "start + CTC + GM-OT (fgw)",
}


def main(out: Path) -> int:
    """Print the table for the demo folder `out`; return 1 when a run's decode result is missing."""
    table = Table(title=f"gmot demo: test set, voices held out of training ({out})")
    columns = (
        "run", "model", "CER % greedy", "RTF greedy", "CER % beam + 3-gram", "LM weight", "RTF beam + LM"
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    missing = 0
    for run, label in RUNS.items():
        cells = [run, label]
        for dec in ("decode_test", "decode_test_lm"):
            rtf_file = out / "exp" / run / dec / "rtf.json"
            if not rtf_file.is_file():
                cells += ["-", "-"] if dec == "decode_test" else ["-", "-", "-"]
                missing += 1
                continue
            r = json.loads(rtf_file.read_text(encoding="utf-8"))
            cells.append(f"{100 * r['cer']:.2f}")
            if dec == "decode_test_lm":
                cells.append(f"{r['lm_weight']:g}")
            cells.append(f"{r['rtf']:.4f}")
        table.add_row(*cells)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    plots = sorted((out / "plots").glob("*.png"))
    console.print(f"transport-plan plots: {', '.join(str(p) for p in plots) or 'none'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_run")))
