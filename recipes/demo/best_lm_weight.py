"""Print the LM weight whose dev decode scored the lowest CER (ties: the smaller weight).

Usage: python recipes/demo/best_lm_weight.py DECODE_DIR...   (each holds the rtf.json `gmot decode` writes)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def best_weight(decode_dirs: list[Path]) -> float:
    """The `lm_weight` of the rtf.json with the lowest `cer` among `decode_dirs` (ties: smaller weight)."""
    scored = []
    for d in decode_dirs:
        r = json.loads((d / "rtf.json").read_text(encoding="utf-8"))
        scored.append((r["cer"], r["lm_weight"] or 0.0))
    if not scored:
        raise SystemExit("best_lm_weight.py: no decode folders given")
    return min(scored)[1]


if __name__ == "__main__":
    print(best_weight([Path(p) for p in sys.argv[1:]]))
