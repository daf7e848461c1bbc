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
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

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
    shape = SHAPES[name]
    cfg = PRESETS[name]
    batches = [
        {k: v.to(device) for k, v in b.items()} for b in make_batches(shape, frames_budget, n_batches, 0)
    ]
    torch.manual_seed(0)
    pre = ConformerCTC(cfg, shape.vocab).to(device).train()
    torch.manual_seed(0)
    dis = ConformerCTC(cfg, shape.vocab, shape.plm_width).to(device).train()
    kt = GMOTLoss(gmot, torch.zeros(shape.plm_width), torch.ones(shape.plm_width)).to(device)
    opt_pre = torch.optim.AdamW(pre.parameters(), lr=1e-4)
    opt_dis = torch.optim.AdamW(dis.parameters(), lr=1e-4)
    # warm-up (allocator, kernels, AdamW state) on the first batch
    train_step(pre, opt_pre, batches[0], None, device, precision=precision)
    train_step(dis, opt_dis, batches[0], kt, device, precision=precision)
    best: dict[str, list[float]] = {"pretrain": [], "distill": []}
    for batch in batches:
        per: dict[str, list[float]] = {"pretrain": [], "distill": []}
        for _ in range(repeats):
            for mode, model, opt, loss in (("pretrain", pre, opt_pre, None), ("distill", dis, opt_dis, kt)):
                _sync(device)
                t0 = time.perf_counter()
                train_step(model, opt, batch, loss, device, precision=precision)
                _sync(device)
                per[mode].append(time.perf_counter() - t0)
        for mode in per:
            best[mode].append(min(per[mode]))
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
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


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
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is available")
    torch.set_num_threads(max(args.threads, 1))
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
        verdicts.append(
            f"{name}: {budgets[name]:,} frames, pretrain {1000 * r['pretrain']:.0f} ms, distill "
            f"{1000 * r['distill']:.0f} ms, {ratio:.3f}x (target <= {target:.2f}x: "
            f"{'met' if ratio <= target else 'MISSED'})" + (f", peak {peak[0]} GiB" if peak else "")
        )
    console.print(table)
    for line in verdicts:
        print(line)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
