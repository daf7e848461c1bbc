"""Where the time of one FGW call goes: wall time inside each stage of models.ot's solver, per call.

Usage: python benchmarks/profile_transport.py [--shape B N M] [--epsilon E] [--threads T] [--calls C]
       [--solver pgd|ppa]

Runs bench_transport's problem and call (float32, alpha 0.5, 10 outer x 20 inner, forward + backward of the
value) ``--calls`` times after a warm-up, with each stage of models.ot.transport (the functions it calls,
wrapped where it looks them up) and models.ot._sinkhorn_cpu wrapped in a timer, and prints the total and
each stage's ms per call. Stages nest (a projection includes its compiled calls; "backward" is the rest of
the call after the objective); the timers add about a microsecond per stage call. Times on a shared
machine drift: compare stages within one run, not across runs.
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable
from types import ModuleType

import bench_transport as bt
import torch
from rich.console import Console
from rich.table import Table

from models.ot import _sinkhorn_cpu as sinkhorn_cpu
from models.ot import transport

# (module, name, label): the stage is the function ``name`` as ``module`` looks it up when it calls it
STAGES: list[tuple[ModuleType, str, str]] = [
    (transport, "build_problem", "input checks"),
    (transport, "_quadratic_parts", "constant term of the cost"),
    (transport, "_linearised_at_product", "first linearisation (rank one)"),
    (transport, "_linearised", "linearisations"),
    (transport, "project_kernel", "projections"),
    (sinkhorn_cpu, "_absorb", "  absorb potentials, column maxima (compiled)"),
    (sinkhorn_cpu, "_iterate", "  iterations, plan, potentials (compiled)"),
    (transport, "_run", "solve (all outer steps)"),
    (transport, "objective", "objective"),
]


def timed_stages(acc: dict[str, float]) -> list[tuple[ModuleType, str, Callable]]:
    """Wrap each stage in a timer adding into ``acc``; returns what to restore."""
    saved = []
    for module, name, label in STAGES:
        fn = getattr(module, name)

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                acc[_label] += time.perf_counter() - start

        saved.append((module, name, fn))
        setattr(module, name, wrapper)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 128, 24], metavar=("B", "N", "M"))
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=60)
    parser.add_argument("--solver", default="pgd", choices=["pgd", "ppa"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bt.EPSILON = args.epsilon
    run = bt.ours(bt.make_problem(*args.shape, "cpu", False), args.solver)
    for _ in range(10):
        run()  # warm-up (and numba's first compile)
    acc: dict[str, float] = collections.defaultdict(float)
    saved = timed_stages(acc)
    try:
        start = time.perf_counter()
        for _ in range(args.calls):
            run()
        total = (time.perf_counter() - start) * 1e3 / args.calls
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    per_call = {label: acc[label] * 1e3 / args.calls for _, _, label in STAGES}
    per_call["backward and the rest"] = total - sum(
        per_call[k] for k in ("input checks", "solve (all outer steps)", "objective")
    )
    b, n, m = args.shape
    table = Table(title=f"{args.solver}, B={b} N={n} M={m}, epsilon {args.epsilon:g}, {args.threads} threads")
    table.add_column("stage")
    table.add_column("ms per call", justify="right")
    table.add_row("the whole call", f"{total:.2f}")
    for label, ms in per_call.items():
        table.add_row(label, f"{ms:.2f}")
    Console(width=110).print(table)


if __name__ == "__main__":
    main()
