"""Throughput of the prepare pipeline (audio read + resample + fbank + float16 shards + manifest).

Generates a Kaldi dir of synthetic utterances (speech-like tones and noise, 2-6 s, at 16 kHz and, for a
quarter of them, 22.05 kHz as espeak writes), then times `data.preparation.prepare` with 1 and 2 worker
processes (no PLM). Prints seconds of audio per second of wall time; the target is >= 300x real time per core.
`--pitch` times the 83-dim features (fbank + pitch) instead. `--speed-perturb 0.9,1.0,1.1` adds the speed-
perturbed copies of the train split (three times the audio, two thirds of it resampled first): "x real time"
then counts the seconds of the original audio, so the row shows what perturbation costs a user.

    python benchmarks/bench_prepare.py [--quick] [--minutes M] [--pitch] [--speed-perturb 0.9,1.0,1.1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
from rich.console import Console
from rich.table import Table

from data.corpora import read_kaldi_dir
from data.preparation import PrepareOptions, SplitInput, prepare

CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你好天气学习"


def make_corpus(root: Path, minutes: float, seed: int = 0) -> float:
    """Write root/train/{wav.scp,text} with about `minutes` of audio; returns the total seconds."""
    rng = np.random.default_rng(seed)
    wav_dir = root / "wav"
    wav_dir.mkdir(parents=True)
    scp, text, total, i = [], [], 0.0, 0
    while total < minutes * 60:
        seconds = float(rng.uniform(2.0, 6.0))
        rate = 22_050 if i % 4 == 0 else 16_000
        n = int(seconds * rate)
        t = np.arange(n) / rate
        wave = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.05 * rng.standard_normal(n)
        path = wav_dir / f"u{i:06d}.wav"
        soundfile.write(str(path), wave.astype(np.float32), rate, subtype="PCM_16")
        uid = f"u{i:06d}"
        scp.append(f"{uid} {path}\n")
        text.append(f"{uid} {''.join(rng.choice(list(CHARS), size=int(seconds * 3)))}\n")
        total += n / rate
        i += 1
    (root / "train").mkdir()
    (root / "train" / "wav.scp").write_text("".join(scp), encoding="utf-8")
    (root / "train" / "text").write_text("".join(text), encoding="utf-8")
    return total


def time_prepare(
    root: Path, jobs: int, shard_frames: int, pitch: bool = False, speed: tuple[float, ...] = ()
) -> tuple[float, float, float]:
    """(wall seconds, seconds of audio prepared, CPU seconds of this process) for one fresh run; with speed
    factors the prepared seconds include the perturbed copies."""
    out = root / f"out-{jobs}"
    shutil.rmtree(out, ignore_errors=True)
    records, skips = read_kaldi_dir(root / "train")
    start, cpu = time.perf_counter(), time.process_time()
    result = prepare(
        out,
        [SplitInput("train", records, skips)],
        options=PrepareOptions(jobs=jobs, shard_frames=shard_frames, pitch=pitch, speed_perturb=speed),
    )
    wall = time.perf_counter() - start
    return wall, result.splits[0].seconds, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 minutes of audio instead of 20")
    parser.add_argument("--minutes", type=float, default=None, help="minutes of audio to generate")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--pitch", action="store_true", help="fbank + pitch features (83 dims)")
    parser.add_argument(
        "--speed-perturb", default="", help="train-split speed factors, e.g. 0.9,1.0,1.1 (default none)"
    )
    args = parser.parse_args()
    speed = tuple(float(f) for f in args.speed_perturb.split(",")) if args.speed_perturb else ()
    minutes = args.minutes or (3.0 if args.quick else 20.0)
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        root = Path(tmp)
        total = make_corpus(root, minutes)
        # at least 4 shards per worker so the pool has work to balance
        shard_frames = max(2_000, int(total * 100 / (4 * max(args.jobs))))
        what = "fbank + pitch" if args.pitch else "fbank"
        what += f", speed {args.speed_perturb}" if speed else ""
        table = Table(
            title=f"prepare throughput ({what}), {total / 60:.1f} min of audio, {os.cpu_count()} CPUs"
        )
        cols = ("jobs", "wall s", "x real time", "x real time per job", "x per CPU-second", "target/core")
        if speed:
            cols = (*cols, "s prepared")
        for col in cols:
            table.add_column(col, justify="right")
        warm_root = root / "warmup"
        make_corpus(warm_root, 0.2, seed=1)
        cold: dict[int, float] = {}
        for jobs in args.jobs:
            # the first pool of a process starts the forkserver (one torch import); later pools only fork
            cold[jobs], _, _ = time_prepare(warm_root, jobs, 1_000)
            wall, prepared, cpu = time_prepare(root, jobs, shard_frames, args.pitch, speed)
            rtf = total / wall  # of the corpus as given: perturbed copies are extra work, not extra input
            # CPU time is only measurable for the inline run (workers are children of the forkserver)
            per_cpu = f"{total / cpu:.0f}" if jobs == 1 else "-"
            row = [str(jobs), f"{wall:.2f}", f"{rtf:.0f}", f"{rtf / jobs:.0f}", per_cpu, "300"]
            table.add_row(*row, *([f"{prepared:.0f}"] if speed else []))
        console.print(table)
        console.print(f"load average {os.getloadavg()[0]:.1f} (other processes share these CPUs)")
        console.print(
            "warm runs; one-off start-up (a warm-up run on 12 s of audio, incl. forkserver + torch import): "
            + ", ".join(f"jobs={j}: {t:.2f} s" for j, t in cold.items())
        )


if __name__ == "__main__":
    main()
