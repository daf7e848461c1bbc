"""Does sherpa-onnx transcribe as gmot does? Export a model, decode the same audio files with gmot's own
greedy CTC and with sherpa-onnx's offline recogniser, and count identical transcripts
(models.tasks.export.compare_with_sherpa; `gmot export EXP OUT --compare DIR` does the same).

    python benchmarks/sherpa_parity.py EXP WAV [WAV ...] [--out DIR] [--threads N]

Needs the `export` extra. Prints the count, the differing files (at most 10) and the wall time of each side.
Exit code 0 when every transcript agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run both decoders, print the comparison; 0 when all agree."""
    import torch

    from models.engine.checkpoint import load_model
    from models.tasks.export import compare_with_sherpa, export_onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp", type=Path, help="experiment folder or checkpoint")
    ap.add_argument("wavs", type=Path, nargs="+", help="audio files")
    ap.add_argument("--out", type=Path, help="export folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="threads for both decoders (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.exp)
    with tempfile.TemporaryDirectory(prefix="gmot_export_") as tmp:
        result = export_onnx(loaded, args.out or Path(tmp))
        cmp = compare_with_sherpa(loaded, result, args.wavs, args.threads)
    print(
        f"{cmp.identical} of {cmp.files} transcripts identical (onnxruntime vs torch log-prob difference "
        f"{result.max_abs_diff:.1e}); gmot {cmp.gmot_seconds:.1f} s, sherpa-onnx {cmp.sherpa_seconds:.1f} s, "
        f"{args.threads} thread(s)"
    )
    for wav, ours, theirs in cmp.differing[:10]:
        print(f"  {wav}: gmot {ours!r}, sherpa-onnx {theirs!r}")
    return 0 if not cmp.differing else 1


if __name__ == "__main__":
    sys.exit(main())
