"""Time one training step of distill (GM-OT, mode fgw) against pretrain (CTC only), same batches, one run.

    python benchmarks/bench_train.py [--quick] [--device cpu|cuda] [--threads N]

For each model preset (demo, aishell1) it builds synthetic batches shaped like the corpus (80-dim features,
character targets, cached PLM token features), then times alternately, batch by batch, a pretrain step and
a distill step: forward, CTC loss (the engine's `ctc_losses`), for distill the GM-OT loss on the adapter
output, backward, gradient clipping and AdamW, exactly the work of `models.engine.training.Trainer` per batch
(data loading and SpecAugment, identical in both modes, are left out). It prints the best step time of each
mode, their ratio, and the median of the per-batch ratios ("paired"); the target is distill <= 1.15x
pretrain on a CPU and <= 1.05x on a GPU. On a GPU the batches are the presets' real frame budgets (40,000
frames at aishell1), also with --quick (fewer of them): smaller ones would time kernel launches, not the
work; the peak GPU memory is reported too. Exit status 1 when a preset's ratio misses the target.

What the step costs the machine (a second table, per preset and mode): the system CPU share of the timed
steps (time the kernel spent, mostly zeroing freshly mapped pages, against user + system), minor page
faults per step (`getrusage`), the step's floating-point work (torch's FlopCounterMode over one forward +
backward: matrix products and convolutions; the transport's numba kernels are not counted, so distill's
figure is a lower bound) and the achieved GFLOP/s against this machine's own matrix-product peak, measured
first (a square `torch.mm` at 1 and 2 threads, in fp32 and, where the step autocasts, in its dtype).
The allocator is set up as training sets it (models/engine/allocator.py; `GMOT_MALLOC=default` for glibc's
defaults, to see the difference). `--profile` adds torch.profiler's top operators of a few steps of each
mode and the forward time of each of the model's blocks.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from models.engine.allocator import keep_freed_memory
from models.engine.precision import autocast_for, choose_precision
from models.nn.ctc import ctc_losses
from models.nn.encoder import PRESETS, ConformerCTC, count_parameters
from models.nn.transfer_loss import GMOTConfig, GMOTLoss


@dataclass
class Shape:
    """Synthetic corpus shape of a preset."""

    vocab: int  # CTC units
    plm_width: int  # teacher width
    frames: tuple[int, int]  # utterance length range in 10 ms frames
    tokens_per_second: float  # PLM tokens per second of speech
    chars_per_second: float  # CTC targets per second


SHAPES = {
    # embedded demo: HSK sentences spoken by espeak-ng, multilingual-e5-small (384) teacher
    "demo": Shape(vocab=1800, plm_width=384, frames=(150, 350), tokens_per_second=2.0, chars_per_second=3.0),
    # AISHELL-1: ~4.5 s utterances, ~4,200 characters, a Chinese BERT-base teacher (768, one token per char)
    "aishell1": Shape(
        vocab=4233, plm_width=768, frames=(250, 700), tokens_per_second=3.2, chars_per_second=3.2
    ),
}


def make_batches(
    shape: Shape, frames_budget: int, n_batches: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """Random batches filling `frames_budget` padded frames each (duration-bucketed: similar lengths)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    lo, hi = shape.frames
    for _ in range(n_batches):
        centre = int(torch.randint(lo, hi + 1, (1,), generator=g))
        b = max(1, frames_budget // centre)
        lens = (centre - torch.randint(0, max(centre // 10, 1), (b,), generator=g)).clamp(min=lo)
        lens[0] = centre
        t = int(lens.max())
        n_chars = (lens.float() / 100 * shape.chars_per_second).clamp(min=1).long()
        n_tok = (lens.float() / 100 * shape.tokens_per_second).clamp(min=1).long()
        batches.append(
            {
                "feats": torch.randn(b, t, 80, generator=g),
                "lens": lens,
                "tokens": torch.randint(2, shape.vocab, (b, int(n_chars.max())), generator=g),
                "token_lens": n_chars,
                "plm": torch.randn(b, int(n_tok.max()), shape.plm_width, generator=g),
                "plm_lens": n_tok,
            }
        )
    return batches


def train_step(
    model: ConformerCTC,
    opt: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    kt_loss: GMOTLoss | None,
    device: torch.device,
    kt_weight: float = 0.5,
    precision: str = "auto",
) -> float:
    """One optimiser step on `batch`; returns the loss value (forces the step to finish). `precision`:
    "auto" (what training picks on `device`, models/engine/precision.py), "bf16", "fp16" or "fp32"."""
    chosen = choose_precision(device, True) if precision == "auto" else precision
    with autocast_for(device, chosen):  # type: ignore[arg-type]
        out = model(batch["feats"], batch["lens"])
    per_utt = ctc_losses(out, batch["tokens"], batch["token_lens"])
    loss = per_utt.mean()
    if kt_loss is not None:
        kt = kt_loss(out["adapted"].float(), out["lengths"], batch["plm"], batch["plm_lens"])
        loss = loss + kt_weight * kt["kt"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class MachineCost:
    """CPU time and page faults summed over timed steps (getrusage deltas of this process)."""

    user_s: float = 0.0
    system_s: float = 0.0
    minor_faults: int = 0
    steps: int = 0

    def add(self, before: resource.struct_rusage, after: resource.struct_rusage) -> None:
        """Add one step's deltas."""
        self.user_s += after.ru_utime - before.ru_utime
        self.system_s += after.ru_stime - before.ru_stime
        self.minor_faults += after.ru_minflt - before.ru_minflt
        self.steps += 1

    def summary(self, flops: float, step_s: float) -> dict[str, float]:
        """{"system_share": system / (user + system), "faults_per_step", "gflop_per_step", "gflops"} for a
        step of `flops` floating-point operations taking `step_s` seconds."""
        cpu = self.user_s + self.system_s
        return {
            "system_share": self.system_s / cpu if cpu > 0 else 0.0,
            "faults_per_step": self.minor_faults / max(self.steps, 1),
            "gflop_per_step": flops / 1e9,
            "gflops": flops / 1e9 / step_s if step_s > 0 else 0.0,
        }


def step_flops(
    model: ConformerCTC,
    opt: torch.optim.Optimizer,
    batches: list[dict[str, torch.Tensor]],
    kt_loss: GMOTLoss | None,
    device: torch.device,
    precision: str,
) -> float:
    """Mean floating-point operations of one training step over `batches` (torch's FlopCounterMode: the
    matrix products and convolutions of forward and backward; work outside torch operators is not seen)."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            train_step(model, opt, batch, kt_loss, device, precision=precision)
        total += counter.get_total_flops()
    return total / len(batches)


def matmul_peak(threads: int, dtype: torch.dtype, n: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` square (n x n) @ (n x n) products in `dtype` with `threads` torch
    threads: the machine's own ceiling for the dense work of a step. The thread count is restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up: packing buffers, thread pool
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    finally:
        torch.set_num_threads(saved)
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hook_blocks(model: torch.nn.Module, record_function: Any) -> list[Any]:
    """Wrap the forward of each child of `model` in a profiler scope "module::name"; the parts of the layers
    of a ModuleList child as "name.*.part", summed over the layers. Returns the hook handles (call .remove()
    on each)."""
    scopes: dict[str, Any] = {}

    def enter(label: str) -> None:
        scopes[label] = record_function(f"module::{label}")
        scopes[label].__enter__()

    def leave(label: str) -> None:
        scopes.pop(label).__exit__(None, None, None)

    blocks = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):  # the encoder calls each layer's parts itself
            blocks += [(f"{name}.*.{part}", sub) for layer in child for part, sub in layer.named_children()]
        else:
            blocks.append((name, child))
    handles = []
    for label, block in blocks:
        handles.append(block.register_forward_pre_hook(lambda _m, _a, n=label: enter(n)))
        handles.append(block.register_forward_hook(lambda _m, _a, _o, n=label: leave(n)))
    return handles


def build_mode(
    name: str, mode: str, device: torch.device, gmot: GMOTConfig
) -> tuple[ConformerCTC, torch.optim.Optimizer, GMOTLoss | None]:
    """The model (train mode, weights seeded 0), AdamW and, for distill, the GM-OT loss that a `mode`
    ("pretrain" or "distill") step of preset `name` runs."""
    shape = SHAPES[name]
    torch.manual_seed(0)
    model = ConformerCTC(PRESETS[name], shape.vocab, shape.plm_width if mode == "distill" else None)
    model = model.to(device).train()
    kt = None
    if mode == "distill":
        kt = GMOTLoss(gmot, torch.zeros(shape.plm_width), torch.ones(shape.plm_width)).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), kt


def profile_steps(
    name: str, frames_budget: int, device: torch.device, gmot: GMOTConfig, precision: str, console: Console
) -> None:
    """Print torch.profiler's top operators (self CPU time) of three steps of each mode of preset `name`,
    and each top-level block's forward time (record_function around every child module of the model)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    batches = [
        {k: v.to(device) for k, v in b.items()} for b in make_batches(SHAPES[name], frames_budget, 3, 1)
    ]
    for mode in ("pretrain", "distill"):
        model, opt, kt = build_mode(name, mode, device, gmot)
        train_step(model, opt, batches[0], kt, device, precision=precision)  # warm-up
        handles = hook_blocks(model, record_function)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for batch in batches:
                train_step(model, opt, batch, kt, device, precision=precision)
        for handle in handles:
            handle.remove()
        events = prof.key_averages()
        console.print(f"[bold]{name} {mode}[/]: top operators by self CPU time over {len(batches)} steps")
        console.print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))
        blocks = sorted((e for e in events if e.key.startswith("module::")), key=lambda e: -e.cpu_time_total)
        total = sum(e.cpu_time_total for e in blocks)
        shares = [
            f"{e.key[8:]} {e.cpu_time_total / 1e3:.0f} ms ({e.cpu_time_total / total:.0%})" for e in blocks
        ]
        console.print("forward time by block: " + ", ".join(shares), highlight=False)


def bench_preset(
    name: str,
    frames_budget: int,
    n_batches: int,
    repeats: int,
    device: torch.device,
    gmot: GMOTConfig,
    precision: str = "auto",
) -> dict[str, Any]:
    """Seconds per step of pretrain and distill for model preset `name` on the same `n_batches` batches.

    Each batch is stepped `repeats` times per mode, alternating the modes; a batch's time is its best
    repeat (robust to other load on the machine); a mode's time is the mean over batches. "paired" is the
    median over batches of the per-batch ratio distill / pretrain. "peak_gib": the most GPU memory
    allocated meanwhile (both models, their optimisers and the batches; None on a CPU).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [
        {k: v.to(device) for k, v in b.items()}
        for b in make_batches(SHAPES[name], frames_budget, n_batches, 0)
    ]
    pre, opt_pre, _ = build_mode(name, "pretrain", device, gmot)
    dis, opt_dis, kt = build_mode(name, "distill", device, gmot)
    assert kt is not None
    # warm-up (allocator, kernels, AdamW state): one step of each mode on every batch, so the timed steps
    # see the heap as a long run does, grown to its largest batch (its first touch is not a step's cost)
    for batch in batches:
        train_step(pre, opt_pre, batch, None, device, precision=precision)
        train_step(dis, opt_dis, batch, kt, device, precision=precision)
    best: dict[str, list[float]] = {"pretrain": [], "distill": []}
    cost = {mode: MachineCost() for mode in best}
    for batch in batches:
        per: dict[str, list[float]] = {"pretrain": [], "distill": []}
        for _ in range(repeats):
            for mode, model, opt, loss in (("pretrain", pre, opt_pre, None), ("distill", dis, opt_dis, kt)):
                _sync(device)
                before = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                train_step(model, opt, batch, loss, device, precision=precision)
                _sync(device)
                per[mode].append(time.perf_counter() - t0)
                cost[mode].add(before, resource.getrusage(resource.RUSAGE_SELF))
        for mode in per:
            best[mode].append(min(per[mode]))
    flops = {
        "pretrain": step_flops(pre, opt_pre, batches, None, device, precision),
        "distill": step_flops(dis, opt_dis, batches, kt, device, precision),
    }
    # the GM-OT loss alone (forward + backward), for the record
    batch = batches[0]
    with torch.no_grad():
        adapted = dis(batch["feats"], batch["lens"])
    h = adapted["adapted"].detach().requires_grad_(True)
    ot_times = []
    for _ in range(max(repeats, 3)):
        _sync(device)
        t0 = time.perf_counter()
        kt(h, adapted["lengths"], batch["plm"], batch["plm_lens"])["kt"].backward()
        _sync(device)
        ot_times.append(time.perf_counter() - t0)
    sizes = ", ".join(f"{b['feats'].shape[0]}x{b['feats'].shape[1]}" for b in batches)
    return {
        "params": count_parameters(dis),
        "batch": f"{sizes} (B x frames); M <= {max(int(b['plm_lens'].max()) for b in batches)}",
        "pretrain": statistics.mean(best["pretrain"]),
        "distill": statistics.mean(best["distill"]),
        "paired": statistics.median(d / p for d, p in zip(best["distill"], best["pretrain"], strict=True)),
        "kt_only": min(ot_times),
        "cost": {mode: cost[mode].summary(flops[mode], statistics.mean(best[mode])) for mode in best},
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def machine_peaks(device: torch.device, step_dtype: str) -> dict[str, Any]:
    """This machine's matrix-product ceilings (GFLOP/s): fp32 at 1 and 2 threads, and the step's own dtype
    (bf16 where training autocasts to it) at the step's thread count; "step" is the one a step is held
    against, "line" a sentence saying all of it. On a GPU nothing is measured (the table shows "-")."""
    if device.type != "cpu":
        return {"step": None, "line": "matrix-product peak: not measured on a GPU"}
    threads = torch.get_num_threads()
    fp32 = {n: matmul_peak(n, torch.float32) for n in sorted({1, min(2, os.cpu_count() or 1)})}
    step = fp32.get(threads) or matmul_peak(threads, torch.float32)
    line = "matrix-product peak (1024^3 torch.mm): " + ", ".join(
        f"fp32 {n} thread{'s' if n > 1 else ''} {g:.0f} GFLOP/s" for n, g in fp32.items()
    )
    if step_dtype == "bf16":
        step = matmul_peak(threads, torch.bfloat16)
        line += f", bf16 {threads} thread{'s' if threads > 1 else ''} {step:.0f} GFLOP/s"
    return {"step": step, "line": line + f"; a step is held against {step:.0f} GFLOP/s ({step_dtype})"}


def main(argv: list[str] | None = None) -> int:
    """Parse options, time the presets, print the table and one line per preset; 0 when every preset's
    distill/pretrain ratio meets the device's target, 1 when one misses it, 2 for bad options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches and fewer steps (under a minute)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: steadiest on a shared machine)"
    )
    ap.add_argument("--presets", default="demo,aishell1", help="comma-separated model presets")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast of the forward pass (auto: what training picks on this device, "
        "models/engine/precision.py)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's top operators and block times"
    )
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    torch.set_num_threads(max(args.threads, 1))
    allocator = keep_freed_memory()  # as the training engine does (GMOT_MALLOC=default: glibc's defaults)
    device = torch.device(args.device)
    gmot = GMOTConfig(mode="fgw")
    console = Console()
    if not console.is_terminal:
        console.width = 140
    # frames per batch: on a CPU reduced budgets (the ratio hardly depends on them, both steps grow linearly
    # with the batch); on a GPU the presets' real ones, where a small batch times kernel launches instead
    budgets = {"demo": 2500, "aishell1": 1500} if args.quick else {"demo": 12000, "aishell1": 4000}
    n_batches, repeats = (2, 2) if args.quick else (3, 3)
    if device.type == "cuda":
        budgets = {"demo": 12000, "aishell1": 40000}
        n_batches, repeats = (2, 3) if args.quick else (8, 5)
    target = 1.05 if device.type == "cuda" else 1.15
    table = Table(
        title=f"train step: distill (GM-OT fgw, {gmot.outer_iter}x{gmot.inner_iter} {gmot.solver}, "
        f"{gmot.structure}) over pretrain, {device.type}, {torch.get_num_threads()} threads, "
        f"{choose_precision(device, True) if args.precision == 'auto' else args.precision}"
    )
    cols = (
        "preset",
        "params",
        "batch",
        "pretrain ms",
        "distill ms",
        "kt fwd+bwd ms",
        "ratio",
        "paired",
        "target",
        *(("peak GiB",) if device.type == "cuda" else ()),
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("preset", "batch") else "right")
    verdicts, missed = [], False
    step_dtype = choose_precision(device, True) if args.precision == "auto" else args.precision
    peaks = machine_peaks(device, step_dtype)
    costs = Table(
        title="what a step costs the machine (CPU time, faults of the timed steps; work: FlopCounterMode)"
    )
    for col in ("preset", "mode", "step ms", "system CPU", "faults/step", "GFLOP/step", "GFLOP/s", "of peak"):
        costs.add_column(col, justify="left" if col in ("preset", "mode") else "right")
    for name in args.presets.split(","):
        console.print(f"timing {name} ...")
        r = bench_preset(name, budgets[name], n_batches, repeats, device, gmot, args.precision)
        ratio = r["distill"] / r["pretrain"]
        missed |= ratio > target
        peak = () if r["peak_gib"] is None else (f"{r['peak_gib']:.1f}",)
        table.add_row(
            name,
            f"{r['params'] / 1e6:.1f} M",
            str(r["batch"]),
            f"{1000 * r['pretrain']:.0f}",
            f"{1000 * r['distill']:.0f}",
            f"{1000 * r['kt_only']:.1f}",
            f"[{'green' if ratio <= target else 'red'}]{ratio:.3f}x[/]",
            f"{r['paired']:.3f}x",
            f"<= {target:.2f}x",
            *peak,
        )
        for mode in ("pretrain", "distill"):
            c = r["cost"][mode]
            costs.add_row(
                name,
                mode,
                f"{1000 * r[mode]:.0f}",
                f"{100 * c['system_share']:.1f} %",
                f"{c['faults_per_step']:,.0f}",
                f"{c['gflop_per_step']:.2f}",
                f"{c['gflops']:.1f}",
                f"{c['gflops'] / peaks['step']:.0%}" if peaks.get("step") else "-",
            )
        if args.profile:
            profile_steps(name, budgets[name], device, gmot, args.precision, console)
        verdicts.append(
            f"{name}: {budgets[name]:,} frames, pretrain {1000 * r['pretrain']:.0f} ms, distill "
            f"{1000 * r['distill']:.0f} ms, {ratio:.3f}x (target <= {target:.2f}x: "
            f"{'met' if ratio <= target else 'MISSED'})" + (f", peak {peak[0]} GiB" if peak else "")
        )
    console.print(table)
    console.print(costs)
    console.print(peaks["line"], highlight=False)
    console.print(f"allocator: {allocator}", highlight=False)
    for line in verdicts:
        print(line)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
