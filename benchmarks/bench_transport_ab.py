"""Paired benchmark: the FGW solver of models/ot/ as it is now against the same at another git revision.

Usage: python benchmarks/bench_transport_ab.py --against REV [--threads T] [--epsilon E] [--ragged]
       [--rounds R] [--shape B N M] [--solvers pgd ppa]

Both versions solve the problems of benchmarks/bench_transport.py (same shapes, data, float32, alpha 0.5,
10 outer x 20 inner iterations, forward + backward of the FGW value; its `ours` run and `timed_runs`
rounds) in alternation, one run of each per round, so that a shared machine's load falls on both alike.
Reported per shape and solver: the median ms of each version and the median of the per-round ratios
now / REV (below 1: faster now), which is steadier than the ratio of medians when the machine's speed
drifts. The revision's models/ot/ folder is read with ``git show`` and imported as a package of its own
(its modules import each other relatively); revisions whose transport.py stands alone (up to 47bc248:
models/ot/transport.py, or models/transport.py before the rooms of models/) are imported the same way with
their copy of the compiled CPU loop (_sinkhorn_cpu.py, or models/sinkhorn_cpu.py) put in its place. Numba
compiles that copy afresh: the first round of a run includes no compile, `timed_runs` warms up first.
"""

from __future__ import annotations

import argparse
import importlib
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


def load_package(folder: Path, name: str) -> ModuleType:
    """The package whose modules are the .py files in ``folder``, imported under ``name``."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # its modules' relative imports (and dataclasses) look it up there
    spec.loader.exec_module(package)
    return package


def file_at(rev: str, path: str) -> tuple[str | None, str]:
    """The text of ``path`` at git revision ``rev`` (None where git cannot show it) and git's error output."""
    out = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    return (out.stdout if out.returncode == 0 else None), out.stderr.strip()


def files_at(rev: str, folder: str) -> list[str]:
    """The paths of the .py files directly in ``folder`` at git revision ``rev`` (none where it has none)."""
    out = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:{folder}"],
                         capture_output=True, text=True)  # fmt: skip
    names = out.stdout.split() if out.returncode == 0 else []
    return [f"{folder}/{name}" for name in names if name.endswith(".py")]


def revision_module(rev: str, folder: Path) -> ModuleType:
    """The transport module of git revision ``rev``, imported from a copy of its models/ot/ (or, before the
    rooms of models/, of its models/transport.py and models/sinkhorn_cpu.py) as the package
    ``ot_at_revision``."""
    paths = {Path(path).name: path for path in files_at(rev, "models/ot")}
    if not paths:  # revisions before the rooms of models/ (docs/design.md, section 0)
        paths = {"transport.py": "models/transport.py", "_sinkhorn_cpu.py": "models/sinkhorn_cpu.py"}
    package = folder / "ot_at_revision"
    package.mkdir()
    for name, path in paths.items():
        text, error = file_at(rev, path)
        if text is None and name == "transport.py":
            print(f"--against {rev}: git show failed: {error}", file=sys.stderr)
            raise SystemExit(2)
        if text is not None and name != "__init__.py":  # the package's own stays empty: nothing to import
            (package / name).write_text(text)
    (package / "__init__.py").write_text("")
    load_package(package, "ot_at_revision")
    module = importlib.import_module("ot_at_revision.transport")
    if callable(getattr(module, "_sinkhorn_cpu", None)) and (package / "_sinkhorn_cpu.py").exists():
        # a transport.py that stands alone imports models.ot._sinkhorn_cpu (of the working tree) through
        # this function: give it the revision's copy
        compiled = importlib.import_module("ot_at_revision._sinkhorn_cpu")
        module._sinkhorn_cpu = lambda: compiled
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
    now = importlib.import_module("models.ot.transport")  # of the working tree (bench_transport's path)
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
