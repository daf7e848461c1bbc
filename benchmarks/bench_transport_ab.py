"""Paired benchmark: models/ot/transport.py as it is now against the same file at another git revision.

Usage: python benchmarks/bench_transport_ab.py --against REV [--threads T] [--epsilon E] [--ragged]
       [--rounds R] [--shape B N M] [--solvers pgd ppa]

Both versions solve the problems of benchmarks/bench_transport.py (same shapes, data, float32, alpha 0.5,
10 outer x 20 inner iterations, forward + backward of the FGW value; its `ours` run and `timed_runs`
rounds) in alternation, one run of each per round, so that a shared machine's load falls on both alike.
Reported per shape and solver: the median ms of each version and the median of the per-round ratios
now / REV (below 1: faster now), which is steadier than the ratio of medians when the machine's speed
drifts. The revision's file is read with ``git show`` and imported on its own, so it must depend on torch
only (models/ot/transport.py always has), and so is its models/ot/_sinkhorn_cpu.py where it has one (numba
then compiles that copy afresh: the first round of a run includes no compile, `timed_runs` warms up first).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import bench_transport as bt
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def load_module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def file_at(rev: str, path: str) -> tuple[str | None, str]:
    """The text of ``path`` at git revision ``rev`` (None where git cannot show it) and git's error output."""
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return (out.stdout if out.returncode == 0 else None), out.stderr.strip()


def revision_module(rev: str, folder: Path) -> ModuleType:
    """models/ot/transport.py at git revision ``rev``, imported as its own module; where the revision has
    models/ot/_sinkhorn_cpu.py (the compiled CPU loop), the module uses that revision's copy of it too."""
    text, error = file_at(rev, "models/ot/transport.py")
    if text is None:  # revisions before the rooms of models/ (docs/design.md, section 0)
        text, error = file_at(rev, "models/transport.py")
    if text is None:
        print(f"--against {rev}: git show failed: {error}", file=sys.stderr)
        raise SystemExit(2)
    path = folder / "transport_at_revision.py"
    path.write_text(text)
    module = load_module(path, "transport_at_revision")
    loop, _ = file_at(rev, "models/ot/_sinkhorn_cpu.py")
    if loop is None:
        loop, _ = file_at(rev, "models/sinkhorn_cpu.py")
    if loop is not None and hasattr(module, "_sinkhorn_cpu"):
        (folder / "sinkhorn_cpu_at_revision.py").write_text(loop)
        compiled = load_module(folder / "sinkhorn_cpu_at_revision.py", "sinkhorn_cpu_at_revision")
        module._sinkhorn_cpu = lambda: compiled  # the revision imports models.ot._sinkhorn_cpu through this
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. a06dc20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--epsilon", type=float, default=0.1, help="entropic regularisation")
    parser.add_argument("--ragged", action="store_true", help="lengths drawn from [N/2, N] x [M/2, M]")
    parser.add_argument("--rounds", type=int, default=15, help="paired rounds per shape and solver")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "N", "M"), help="one shape only")
    parser.add_argument("--solvers", nargs="+", default=["pgd", "ppa"], choices=["pgd", "ppa"])
    args = parser.parse_args()
    bt.EPSILON = args.epsilon
    torch.set_num_threads(args.threads)
    now = load_module(ROOT / "models" / "ot" / "transport.py", "transport_now")
    shapes = [tuple(args.shape)] if args.shape else bt.FULL
    console = Console(width=130)
    table = Table(
        title=f"FGW forward+backward, float32, {args.threads} threads, epsilon {args.epsilon:g}, "
        f"{'ragged' if args.ragged else 'equal lengths'}: now against {args.against} "
        f"(median ms; ratio = median of paired now / then)"
    )
    for col in ["B", "N", "M"] + [f"{s} {w}" for s in args.solvers for w in ("now", "then", "ratio")]:
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        then = revision_module(args.against, Path(tmp))
        for shape in shapes:
            problem = bt.make_problem(*shape, "cpu", args.ragged)
            cells = [str(x) for x in shape]
            for solver in args.solvers:
                fns = {
                    "now": bt.ours(problem, solver, now.fused_gromov_wasserstein),
                    "then": bt.ours(problem, solver, then.fused_gromov_wasserstein),
                }
                runs = bt.timed_runs(fns, "cpu", args.rounds)
                ratio = bt.paired_ratio(runs["now"], runs["then"])
                t_now, t_then = statistics.median(runs["now"]), statistics.median(runs["then"])
                cells += [f"{t_now:.1f}", f"{t_then:.1f}", f"{ratio:.2f}"]
            table.add_row(*cells)
            console.print(f"done B={shape[0]} N={shape[1]} M={shape[2]}", style="dim")
    console.print(table)


if __name__ == "__main__":
    main()
