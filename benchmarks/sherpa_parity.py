"""Does sherpa-onnx transcribe as gmot does? Export a model, decode the same audio files with `gmot`'s own
greedy CTC (models.decoding) and with sherpa-onnx's offline recogniser, and count identical transcripts.

    python benchmarks/sherpa_parity.py EXP WAV [WAV ...] [--out DIR]

Needs the `export` extra. Prints the count, the differing files (at most 10) and the wall time of each side.
Exit code 0 when every transcript agrees, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run both decoders, print the comparison; 0 when all agree."""
    import soundfile
    import torch

    from models.checkpoint import load_model
    from models.decoding import greedy_ctc, transcribe, wav_utterances
    from models.export import export_onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exp", type=Path, help="experiment folder or checkpoint")
    ap.add_argument("wavs", type=Path, nargs="+", help="audio files")
    ap.add_argument("--out", type=Path, help="export folder (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="threads for both decoders (default 1)")
    args = ap.parse_args(argv)
    import sherpa_onnx

    torch.set_num_threads(args.threads)
    loaded = load_model(args.exp)
    with tempfile.TemporaryDirectory(prefix="gmot_export_") as tmp:
        out = args.out or Path(tmp)
        result = export_onnx(loaded, out)
        start = time.perf_counter()
        utts = wav_utterances(args.wavs, loaded.cmvn_mean.shape[0], loaded.frontend)
        ours = transcribe(loaded.model, loaded.vocab, loaded.cmvn_mean, loaded.cmvn_std, utts, greedy_ctc)
        ours_s = time.perf_counter() - start
        recogniser = sherpa_onnx.OfflineRecognizer.from_zipformer_ctc(
            model=str(result.model_path), tokens=str(result.tokens_path), num_threads=args.threads
        )
        start = time.perf_counter()
        theirs = []
        for wav in args.wavs:
            wave, rate = soundfile.read(str(wav), dtype="float32", always_2d=True)
            stream = recogniser.create_stream()
            stream.accept_waveform(rate, wave.mean(axis=1))
            recogniser.decode_stream(stream)
            theirs.append(stream.result.text)
        theirs_s = time.perf_counter() - start
    differ = [(w, h.text, t) for w, h, t in zip(args.wavs, ours, theirs, strict=True) if h.text != t]
    print(f"{len(args.wavs) - len(differ)} of {len(args.wavs)} transcripts identical "
          f"(onnxruntime vs torch log-prob difference {result.max_abs_diff:.1e}); "
          f"gmot {ours_s:.1f} s, sherpa-onnx {theirs_s:.1f} s, {args.threads} thread(s)")  # fmt: skip
    for wav, a, b in differ[:10]:
        print(f"  {wav}: gmot {a!r}, sherpa-onnx {b!r}")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
