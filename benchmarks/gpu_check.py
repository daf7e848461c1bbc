"""The Python steps of benchmarks/gpu_check.sh, each a subcommand that ends with one `figure: ...` line (the
check's table shows it) and exits 0 when the step passes, 1 when it fails, 2 for bad arguments.

    python benchmarks/gpu_check.py environment
    python benchmarks/gpu_check.py tiny-data DIR
    python benchmarks/gpu_check.py syncs DATA EXP --device cuda [--steps 10]
    python benchmarks/gpu_check.py fp16 DATA EXP --device cuda
    python benchmarks/gpu_check.py run-killed STEP gmot-arguments...     (under torchrun)
    python benchmarks/gpu_check.py killed-state EXP --step STEP
    python benchmarks/gpu_check.py compare STRAIGHT RESUMED --again STRAIGHT2
    python benchmarks/gpu_check.py transport-figure LOG

- syncs: trains the tiny preset and counts the host synchronisations over `--steps` optimiser steps after
  the first (its warm-up), logging included: on CUDA with torch's sync debug mode (a warning per
  synchronising call, torch.cuda.set_sync_debug_mode("warn")), target <= 2 per step. On the CPU (the dry
  run) the counting shim of tests/test_syncs.py counts the calls that would synchronise if their tensor were
  on a GPU, and the count is not judged: it includes tensors that stay on the CPU in a GPU run too (AdamW's
  step counters, the batch's lengths).
- fp16: trains the tiny preset in fp16 with the GradScaler forced on (a GPU with bf16 would never run the
  scaler's path otherwise); on a CPU the scaler stays off (GradScaler needs CUDA here).
- run-killed: runs `gmot ARGS...` with this process killed (SIGKILL, a preemption without warning) right
  after it writes its first mid-epoch checkpoint at optimiser step >= STEP; killed-state checks that the
  newest checkpoint is that one; compare checks that the resumed run ended with the uninterrupted run's
  weights, up to ten times the difference between two uninterrupted runs (a GPU's atomic additions, as in
  the CTC backward, round differently from run to run; on the CPU they agree to the bit) and at least 1e-6.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tiny model and data of the tests, which are not installed

import torch  # noqa: E402

import models.engine.run_state as run_state  # noqa: E402
import models.engine.training as training  # noqa: E402
from models.engine.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from models.engine.config import resolve_config  # noqa: E402

SYNC_WARNING = "called a synchronizing CUDA operation"  # c10/cuda's message in sync debug mode "warn"
SYNCS_PER_STEP = 2
# Overflow skips allowed in the fp16 run: the scaler starts at 2^16 and halves at each; ten halvings leave
# 64, where only gradients above 1,000 would still overflow.
FP16_OVERFLOW_SKIPS = 10
RESUME_ATOL = 1e-6  # the least weight difference a resume may leave (CPU runs agree to the bit)
NOISY_RUNS = 1e-3  # two identical runs further apart than this: too noisy to check a resume against


def figure(text: str) -> None:
    """Print the step's figure, the line gpu_check.sh puts in its table."""
    print(f"figure: {text}", flush=True)


@contextlib.contextmanager
def host_syncs(device: torch.device) -> Iterator[Callable[[], int]]:
    """Count host synchronisations inside the block; yields a function that returns the count so far.

    CUDA: torch's sync debug mode warns at every synchronising call (a blocking copy either way, a stream or
    device synchronisation), warnings from the autograd engine's threads included; the warnings are counted.
    CPU: tests/test_syncs.py's shim counts the tensor methods that synchronise on a GPU (bool, item, tolist,
    int, float, nonzero)."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum(SYNC_WARNING in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    else:
        from test_syncs import count_syncs

        with count_syncs() as counts:
            yield lambda: counts["n"]


@dataclass
class _SyncWindow:
    """The counting window of `count_step_syncs`: the open counter's reader, the steps and syncs counted."""

    read: Callable[[], int] | None = None
    steps: int = 0
    syncs: int = 0


def count_step_syncs(data: Path, exp: Path, device: str, steps: int = 10) -> tuple[int, int]:
    """Train the tiny preset (one utterance per batch, logging every 10 steps) on the prepared folder `data`
    into `exp` on `device`; count the host synchronisations from the end of optimiser step 1 to the end of
    step 1 + `steps` (or of the run, when it has fewer steps). Returns (synchronisations, steps counted)."""
    cfg = resolve_config(
        "tiny",
        overrides=["gmot.mode=fgw", "train.max_utts=1", "train.epochs=1", "train.log_interval=10",
                   "train.average_best=0"],
    )  # fmt: skip
    original = training.Trainer._optimizer_step
    counters = contextlib.ExitStack()
    window = _SyncWindow()

    def close() -> None:
        if window.read is not None:
            window.syncs, window.read = window.read(), None
            counters.close()

    def stepping(self: training.Trainer, good: int) -> bool:
        stepped = original(self, good)
        if stepped and self.step == 1:
            window.read = counters.enter_context(host_syncs(self.device))
        elif stepped and window.read is not None:
            window.steps += 1
            if window.steps == steps:
                close()
        return stepped

    with mock.patch.object(training.Trainer, "_optimizer_step", stepping):
        try:
            training.train(data, exp, cfg, device=device, progress=False)
        finally:
            close()
    return window.syncs, window.steps


@dataclass
class Fp16Run:
    """What `fp16_run` saw: the precision, whether the scaler ran, its final scale (None without it), whether
    the last checkpoint holds its state, the optimiser steps planned and applied (the others were skipped
    as overflows), the NaN steps counted, and the first and last epoch losses."""

    precision: str
    scaler: bool
    scale: float | None
    saved_scaler: bool
    planned: int
    applied: int
    nan_steps: int
    losses: tuple[float, float]


def fp16_run(data: Path, exp: Path, device: str) -> Fp16Run:
    """Train the tiny preset for two epochs of one-utterance batches on `device` in fp16 with the GradScaler
    (training's own, enabled on CUDA; a disabled one on a CPU), as a GPU without bf16 would."""
    cfg = resolve_config("tiny", overrides=["gmot.mode=fgw", "train.max_utts=1", "train.epochs=2"])
    on_cuda = torch.device(device).type == "cuda"
    scaler = (
        run_state.grad_scaler if on_cuda else lambda precision: torch.amp.GradScaler("cuda", enabled=False)
    )
    with (
        mock.patch.object(run_state, "choose_precision", lambda device, mixed: "fp16"),
        mock.patch.object(run_state, "grad_scaler", scaler),
    ):
        trainer = training.Trainer(data, exp, cfg, device=device, progress=False)
        out = trainer.run()
    losses = [r["loss"] for r in _metrics(exp) if r["event"] == "epoch"]
    enabled = trainer.scaler.is_enabled()
    return Fp16Run(
        precision=trainer.precision,
        scaler=enabled,
        scale=float(trainer.scaler.get_scale()) if enabled else None,
        saved_scaler=bool(load_checkpoint(list_checkpoints(exp)[-1]).get("scaler")),
        planned=trainer.total_steps,
        applied=out.step,
        nan_steps=out.skipped_nan,
        losses=(losses[0], losses[-1]) if losses else (math.nan, math.nan),
    )


def _metrics(exp: Path) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def kill_after_save(step: int, kill: Callable[[int, int], None] = os.kill) -> None:
    """From now on, Trainer._save kills this process with SIGKILL (through `kill`) right after it writes a
    mid-epoch checkpoint at optimiser step >= `step`."""
    original = training.Trainer._save

    def saving(
        self: training.Trainer, epoch_complete: bool, consumed: int, dev_cer: float | None = None
    ) -> None:
        original(self, epoch_complete, consumed, dev_cer)
        if not epoch_complete and self.step >= step:
            kill(os.getpid(), signal.SIGKILL)

    training.Trainer._save = saving  # type: ignore[method-assign]


def killed_state(exp: Path) -> tuple[int, int, bool]:
    """(step, epoch, epoch_complete) of the newest checkpoint in `exp`; CheckpointError / IndexError when
    there is none."""
    state = load_checkpoint(list_checkpoints(exp)[-1])
    return int(state["step"]), int(state["epoch"]), bool(state["epoch_complete"])


def compare_runs(straight: Path, resumed: Path) -> tuple[float, int, int]:
    """The largest absolute difference between the weights of the newest checkpoints of two experiment
    folders (NaN when their parameter names differ), and the two checkpoints' steps."""
    a, b = (load_checkpoint(list_checkpoints(p)[-1]) for p in (straight, resumed))
    if set(a["model"]) != set(b["model"]):
        return math.nan, int(a["step"]), int(b["step"])
    diff = max((a["model"][k].double() - b["model"][k].double()).abs().max().item() for k in a["model"])
    return diff, int(a["step"]), int(b["step"])


def transport_figure(log: str) -> str | None:
    """From benchmarks/bench_transport.py's output, the last (largest) shape's row of its table as one line:
    ours (ppa) against POT's batch solver and, with ragged lengths, against POT's per-pair loop. Rich draws
    the table with box characters on a UTF-8 stream and with '|' otherwise; None when no row is found."""
    rows = []
    for line in log.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line)[1:-1]]
        if len(cells) == 13 and all(c.isdigit() for c in cells[:3]):
            rows.append(cells)
    if not rows:
        return None
    b, n, m, _pgd, ppa, pot, speedup, _ott, _vs, mem, ragged, loop, loop_speedup = rows[-1]
    return (
        f"B {b}, N {n}, M {m}: ours {ppa} ms vs POT batch {pot} ms ({speedup}), MiB {mem}; "
        f"ragged {ragged} ms vs POT loop {loop} ms ({loop_speedup})"
    )


def environment() -> str:
    """One line: Python, torch, CUDA and NCCL versions, and the GPU (or the CPU's cores)."""
    import platform

    line = f"python {platform.python_version()}, torch {torch.__version__}"
    if not torch.cuda.is_available():
        return f"{line}, no CUDA device, {os.cpu_count()} CPU cores"
    p = torch.cuda.get_device_properties(0)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
    return (
        f"{line}, CUDA {torch.version.cuda}, NCCL {nccl}, {torch.cuda.device_count()} x {p.name} "
        f"({p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, "
        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'})"
    )


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand (see the module docstring); 0 pass, 1 fail, 2 usage error."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run-killed"]:  # the rest is gmot's command line, not ours
        if len(argv) < 3 or not argv[1].isdigit():
            print("usage: gpu_check.py run-killed STEP gmot-arguments...", file=sys.stderr)
            return 2
        kill_after_save(int(argv[1]))
        from gmot_cli.app import main as gmot

        sys.argv = ["gmot", *argv[2:]]
        with contextlib.suppress(SystemExit):  # typer's exit at the end of the command
            gmot()
        print(f"the run ended without writing a mid-epoch checkpoint at step >= {argv[1]}")
        return 1

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("environment")
    sub.add_parser("tiny-data").add_argument("out", type=Path)
    for name in ("syncs", "fp16"):
        p = sub.add_parser(name)
        p.add_argument("data", type=Path)
        p.add_argument("exp", type=Path)
        p.add_argument("--device", default="cuda")
        if name == "syncs":
            p.add_argument("--steps", type=int, default=10)
    p = sub.add_parser("killed-state")
    p.add_argument("exp", type=Path)
    p.add_argument("--step", type=int, required=True)
    p = sub.add_parser("compare")
    p.add_argument("straight", type=Path)
    p.add_argument("resumed", type=Path)
    p.add_argument("--again", type=Path, required=True, help="a second uninterrupted run")
    sub.add_parser("transport-figure").add_argument("log", type=Path)
    args = ap.parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")

    if args.command == "environment":
        figure(environment())
        return 0
    if args.command == "tiny-data":
        from conftest import build_tiny_prepared

        if not (args.out / "train" / "manifest.jsonl").is_file():
            build_tiny_prepared(args.out)
        figure(f"tiny prepared folder in {args.out}")
        return 0
    if args.command == "syncs":
        syncs, steps = count_step_syncs(args.data, args.exp, args.device, args.steps)
        per_step = syncs / max(steps, 1)
        if not args.device.startswith("cuda"):
            figure(f"CPU shim: {syncs} calls in {steps} steps, {per_step:.1f} per step (judged on CUDA only)")
            return 0 if steps == args.steps else 1
        figure(f"{syncs} host syncs in {steps} steps, {per_step:.1f} per step (target <= {SYNCS_PER_STEP})")
        return 0 if steps == args.steps and per_step <= SYNCS_PER_STEP else 1
    if args.command == "fp16":
        r = fp16_run(args.data, args.exp, args.device)
        (first, last), on_gpu = r.losses, args.device.startswith("cuda")
        ok = (
            r.precision == "fp16"
            and r.scaler == r.saved_scaler == on_gpu
            and (r.scale is None or r.scale >= 1.0)
            and r.nan_steps == 0
            and r.applied >= r.planned - FP16_OVERFLOW_SKIPS
            and last < first  # it trains; NaN compares False
        )
        scaler = "scaler off (it needs CUDA)" if r.scale is None else f"scale {r.scale:g}"
        figure(
            f"fp16, {scaler}, {r.applied} of {r.planned} steps applied ({r.planned - r.applied} overflow "
            f"skips), {r.nan_steps} NaN steps, epoch loss {first:.3f} -> {last:.3f}"
        )
        return 0 if ok else 1
    if args.command == "killed-state":
        step, epoch, complete = killed_state(args.exp)
        ok = step == args.step and not complete
        figure(f"killed after the checkpoint of step {step} (epoch {epoch}, {'end' if complete else 'mid'})")
        return 0 if ok else 1
    if args.command == "compare":
        diff, step_a, step_b = compare_runs(args.straight, args.resumed)
        noise, _, step_c = compare_runs(args.straight, args.again)
        tolerance = max(RESUME_ATOL, 10 * noise)
        ok = step_a == step_b == step_c and diff <= tolerance and noise <= NOISY_RUNS
        figure(
            f"resumed run at step {step_b}, uninterrupted at {step_a}: weights differ by {diff:.1e} at most; "
            f"two uninterrupted runs by {noise:.1e} (tolerance {tolerance:.1e})"
        )
        return 0 if ok else 1
    found = transport_figure(args.log.read_text(encoding="utf-8", errors="replace"))
    figure(found or "no table row found")
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
