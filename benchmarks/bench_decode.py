"""Real-time factor of `gmot decode` (greedy CTC and flashlight beam search) at the demo and aishell1 presets.

The models have random weights (decoding cost does not depend on what the weights learned, except that beam
search prunes less on the flat posteriors of an untrained model, so its figures here are pessimistic) and the
input is random fbank-like noise of typical utterance lengths. RTF = decode wall time (CMVN, batched forward,
search) / audio duration, measured after one warm-up batch, through the same
`models.tasks.decoding.transcribe` the CLI uses. Targets (issue 5) at the demo preset on 2 CPU cores: greedy
<= 0.01, beam (K=10) <= 0.05.

    python benchmarks/bench_decode.py [--quick] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from models.nn.encoder import PRESETS, ConformerCTC, count_parameters
from models.tasks.decoding import Utterance, real_time_factor, transcribe
from models.tasks.search import make_decoder

# vocabulary sizes: the embedded HSK demo corpus (~1,800 characters) and AISHELL-1 (4,233 characters)
VOCAB_SIZES = {"demo": 1800, "aishell1": 4233}
TARGETS = {("demo", "greedy"): 0.01, ("demo", "beam"): 0.05}


def make_utterances(count: int, seconds: float, seed: int = 0) -> list[Utterance]:
    """`count` utterances of about `seconds` (+-30 %) of random (T, 80) fbank-like features."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        dur = seconds * float(rng.uniform(0.7, 1.3))
        frames = int(dur * 100)
        out.append(Utterance(f"utt{i:03d}", rng.normal(10.0, 3.0, size=(frames, 80)).astype(np.float32), dur))
    return out


def bench(
    preset: str, method: str, utts: list[Utterance], device: str, beam_size: int, repeat: int = 3
) -> tuple[float, float, int]:
    """Decode `utts` with a random-weight model of `preset` `repeat` times -> (best wall-clock RTF, best
    CPU-time RTF, parameter count).

    CPU-time RTF = process CPU seconds (all threads) / audio seconds: less sensitive than wall time to other
    processes competing for the cores. The best of `repeat` runs is the least disturbed one."""
    torch.manual_seed(0)
    vocab = ["<blank>", "<unk>"] + [chr(0x4E00 + i) for i in range(VOCAB_SIZES[preset] - 2)]
    model = ConformerCTC(PRESETS[preset], len(vocab)).to(device).eval()
    mean, std = torch.zeros(80, device=device), torch.ones(80, device=device)
    decoder = make_decoder(method, vocab, beam_size=beam_size)
    transcribe(model, vocab, mean, std, utts[:2], decoder, device=device)  # warm-up
    audio = sum(u.duration for u in utts)
    walls, cpus = [], []
    for _ in range(repeat):
        cpu0 = time.process_time()
        hyps = transcribe(model, vocab, mean, std, utts, decoder, batch_frames=20000, device=device)
        cpus.append((time.process_time() - cpu0) / audio)
        walls.append(real_time_factor(hyps))
    return min(walls), min(cpus), count_parameters(model)


def main() -> None:
    """Parse options, time each (preset, method) and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo preset only, 8 utterances")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (beam search itself runs on the CPU)")
    parser.add_argument("--beam-size", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting; the best is reported")
    parser.add_argument(
        "--seconds", type=float, default=4.5, help="mean utterance length (AISHELL-1: ~4.5 s)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    presets = ["demo"] if args.quick else ["demo", "aishell1"]
    utts = make_utterances(8 if args.quick else 40, args.seconds)
    audio = sum(u.duration for u in utts)
    load = os.getloadavg()[0]
    table = Table(
        title=f"decode RTF ({args.device}, {args.threads} threads, {len(utts)} utts / {audio:.0f} s, random "
        f"weights, best of {args.repeat}; load average {load:.1f} on {os.cpu_count()} cores at start)"
    )
    for col in ("preset", "params", "method", "RTF (wall)", "RTF (CPU time)", "target", "ok"):
        table.add_column(col, justify="right")
    for preset in presets:
        for method in ("greedy", "beam"):
            rtf, cpu_rtf, params = bench(preset, method, utts, args.device, args.beam_size, args.repeat)
            target = TARGETS.get((preset, method))
            ok = "" if target is None else ("yes" if rtf <= target else "NO")
            label = method if method == "greedy" else f"beam K={args.beam_size}"
            table.add_row(preset, f"{params / 1e6:.1f} M", label, f"{rtf:.4f}", f"{cpu_rtf:.4f}",
                          "" if target is None else f"<= {target}", ok)  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
