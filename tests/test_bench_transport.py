"""The solver benchmarks run end to end at a tiny size (their timings are not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# PYTHONPATH: the scripts import this checkout's package, not the one the venv's editable install may point at
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def _bench(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_bench_transport_prints_one_row_per_shape():
    res = _bench("bench_transport.py", "--shape", "2", "8", "4", "--repeats", "2", "--loop-repeats", "1",
                 "--threads", "1", "--no-ott")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and rows[0].split("│")[1:4] == [" 2 ", " 8 ", " 4 "]
    assert "OTT-JAX column left out: --no-ott" in res.stdout


def test_bench_transport_ab_compares_with_a_revision():
    res = _bench("bench_transport_ab.py", "--against", "HEAD", "--shape", "2", "8", "4", "--rounds", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 1
    ratios = [float(cell) for cell in rows[0].split("│")[1:-1][5::3]]  # pgd ratio, ppa ratio
    assert len(ratios) == 2 and all(r > 0 for r in ratios)


def test_bench_transport_ab_names_a_revision_git_does_not_know():
    res = _bench("bench_transport_ab.py", "--against", "no-such-revision", "--shape", "2", "8", "4")
    assert res.returncode == 2
    assert "--against no-such-revision: git show failed" in res.stderr


@pytest.mark.parametrize("solver", ["pgd", "ppa"])
def test_profile_transport_times_every_stage(solver):
    res = _bench("profile_transport.py", "--shape", "2", "8", "4", "--calls", "2", "--solver", solver)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("│")[1].strip(): float(line.split("│")[2]) for line in res.stdout.splitlines()
            if line.startswith("│")}  # fmt: skip
    assert {"the whole call", "linearisations", "projections", "objective"} <= set(rows)
    assert all(ms >= 0 for label, ms in rows.items() if label != "backward and the rest")
    assert rows["solve (all outer steps)"] < rows["the whole call"]


def test_bench_transport_interleaved_runs_an_encoder_step_before_each_solve():
    res = _bench("bench_transport.py", "--shape", "2", "8", "4", "--repeats", "2", "--loop-repeats", "1",
                 "--threads", "1", "--no-ott", "--interleaved")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "each solve after an encoder step (--interleaved)" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and rows[0].split("│")[1:4] == [" 2 ", " 8 ", " 4 "]


def test_timed_runs_calls_between_before_every_timed_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_transport
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    order: list[str] = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = bench_transport.timed_runs(fns, "cpu", 2, between=lambda: order.append("enc"))
    assert order == [
        "a",
        "b",
        "enc",
        "a",
        "enc",
        "b",
        "enc",
        "b",
        "enc",
        "a",
    ]  # warm-up, then reversed rounds
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
