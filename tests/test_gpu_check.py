"""benchmarks/gpu_check.sh and its Python steps (benchmarks/gpu_check.py), on the CPU: the limits fit the
8 minutes it promises, it runs the CUDA test file alone and ends with one table of figures, and the steps'
pieces (the sync window, the forced fp16 run, the kill after a mid-epoch checkpoint, the weight comparison,
the solver benchmark's figure) do what the GPU run relies on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.gpu_check as gpu_check
import models.engine.training as training
from models.engine.config import resolve_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

RICH_ROW = "│ 32 │ 256 │ 32 │      5.4 │      1.4 │      31.8 │    23.4x │       - │      - │         3/41 │         6.0 │               157 │      26x │"  # noqa: E501


def test_the_step_limits_add_up_to_at_most_eight_minutes() -> None:
    limits = [int(n) for n in re.findall(r"^step \w+ (\d+) ", SCRIPT.read_text(encoding="utf-8"), re.M)]
    assert sum(limits) <= 8 * 60, limits
    assert len(limits) == 7


def test_the_solver_benchmark_figure_is_read_from_rich_and_ascii_rows() -> None:
    want = (
        "B 32, N 256, M 32: ours 1.4 ms vs POT batch 31.8 ms (23.4x), MiB 3/41; "
        "ragged 6.0 ms vs POT loop 157 ms (26x)"
    )
    header = (
        "┃ B ┃ N ┃ M ┃ ours pgd ┃ ours ppa ┃ POT batch ┃ speed-up ┃ OTT-JAX ┃ vs OTT ┃ MiB ┃ r ┃ loop ┃ s ┃"
    )
    assert gpu_check.transport_figure(f"done\n{header}\n{RICH_ROW}\n└───┘\n") == want
    assert gpu_check.transport_figure(RICH_ROW.replace("│", "|")) == want
    assert gpu_check.transport_figure("no table here") is None


@pytest.mark.slow
def test_syncs_are_counted_over_ten_steps_after_the_first(tiny_prepared: Path, tmp_path: Path) -> None:
    syncs, steps = gpu_check.count_step_syncs(tiny_prepared, tmp_path / "ten", "cpu", steps=10)
    assert steps == 10
    fewer, three = gpu_check.count_step_syncs(tiny_prepared, tmp_path / "three", "cpu", steps=3)
    assert three == 3
    assert 0 < fewer < syncs


@pytest.mark.slow
def test_fp16_is_forced_on_whatever_the_device_prefers(tiny_prepared: Path, tmp_path: Path) -> None:
    r = gpu_check.fp16_run(tiny_prepared, tmp_path / "exp", "cpu")
    assert r.precision == "fp16"
    assert not r.scaler and not r.saved_scaler and r.scale is None  # GradScaler needs CUDA here
    assert r.applied == r.planned > 0 and r.nan_steps == 0
    assert torch.isfinite(torch.tensor(r.losses)).all()


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_a_run_killed_after_a_mid_epoch_checkpoint_is_told_from_a_finished_one(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = resolve_config(
        "tiny",
        overrides=["train.max_utts=3", "train.epochs=2", "train.save_every_steps=1", "train.threads=1"],
    )
    training.train(tiny_prepared, tmp_path / "straight", cfg, device="cpu", progress=False)
    kills = []

    def kill(pid: int, sig: int) -> None:
        kills.append((pid, sig))
        raise _Killed

    monkeypatch.setattr(training.Trainer, "_save", training.Trainer._save)  # restored after the test
    gpu_check.kill_after_save(5, kill)
    with pytest.raises(_Killed):
        training.train(tiny_prepared, tmp_path / "killed", cfg, device="cpu", progress=False)
    assert kills == [(os.getpid(), signal.SIGKILL)]
    assert gpu_check.killed_state(tmp_path / "killed") == (5, 2, False)  # 4 batches an epoch
    diff, steps_a, steps_b = gpu_check.compare_runs(tmp_path / "straight", tmp_path / "killed")
    assert (steps_a, steps_b) == (8, 5) and diff > 1e-4
    assert gpu_check.compare_runs(tmp_path / "straight", tmp_path / "straight") == (0.0, 8, 8)
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    assert gpu_check.main(["compare", straight, straight, "--again", straight]) == 0
    assert gpu_check.main(["compare", straight, killed, "--again", straight]) == 1  # 5 steps, not 8
    assert (
        gpu_check.main(["compare", killed, killed, "--again", straight]) == 1
    )  # the second run is elsewhere


@pytest.mark.slow
def test_the_dry_run_runs_only_the_cuda_test_file_and_ends_with_one_table(tmp_path: Path) -> None:
    env = {**os.environ, "DEVICE": "cpu", "STEPS": "environment,tests", "OUT": str(tmp_path),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}  # fmt: skip
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    table = res.stdout[res.stdout.index("| step | result | seconds | figure |") :].splitlines()
    assert table[2].startswith("| environment | PASS | ") and f"torch {torch.__version__}" in table[2]
    assert re.match(r"\| tests \| PASS \| \d+ \| \d+ passed, \d+ deselected in ", table[3]), table[3]
    rows = [line for line in table if line.startswith("| tests: ")]
    assert rows and all(row.endswith("[cpu] | PASS | | |") for row in rows)
    collected = re.findall(r"^PASSED (\S+)::", (tmp_path / "tests.log").read_text(encoding="utf-8"), re.M)
    assert set(collected) == {"tests/test_cuda.py"}
