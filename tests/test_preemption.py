"""Preemption: SIGTERM / SIGINT sent to a real `python -m gmot_cli` training process finish the step, save a
mid-epoch checkpoint and exit 143 / 130; the re-run resumes and ends with the weights of a run never
stopped. Stale temporary files of an interrupted write are removed when a run starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.config import resolve_config
from models.engine.preemption import Preempted, StopSignals
from models.engine.training import train

REPO = Path(__file__).resolve().parent.parent
# 12 steps an epoch; one thread in every run, as the straight run is compared weight for weight; one loader
# worker, which the signal sent to the process group must not take down
SETS = ["train.max_utts=1", "train.epochs=2", "train.keep_last=2", "train.average_best=0", "train.threads=1",
        "train.num_workers=1"]  # fmt: skip


def _command(data: Path, exp: Path) -> list[str]:
    cmd = [sys.executable, "-m", "gmot_cli", "pretrain", str(data), str(exp), "--preset", "tiny", "--device",
           "cpu", "--no-progress"]  # fmt: skip
    for s in SETS:
        cmd += ["--set", s]
    return cmd


def _steps_logged(exp: Path) -> int:
    """The step of the newest "train" record of metrics.jsonl (0 before the first)."""
    path = exp / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [0]
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record["event"] == "train":
            steps.append(record["step"])
    return max(steps)


def _signal_mid_epoch(data: Path, exp: Path, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a training run, send `signum` to its process group (as SLURM and a terminal do) once it has
    logged step 3, and wait for it; returns the finished process and the step logged when it was sent."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_command(data, exp), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _steps_logged(exp) < 3:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before the signal"
    sent_at = _steps_logged(exp)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), sent_at


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_exits_143_and_the_rerun_equals_a_straight_run(
    tiny_prepared: Path, tmp_path: Path
) -> None:
    exp = tmp_path / "exp"
    stopped, sent_at = _signal_mid_epoch(tiny_prepared, exp, signal.SIGTERM)
    err = " ".join(stopped.stderr.split())
    assert stopped.returncode == 143, err
    assert "stopped by SIGTERM" in err and "re-run the same command" in err and "Traceback" not in err
    saved = list_checkpoints(exp)
    assert saved and not list(exp.glob("*.tmp"))
    state = load_checkpoint(saved[-1])
    # the step running when the signal came was finished, then saved: mid-epoch, nothing lost
    assert not state["epoch_complete"] and state["epoch"] == 1
    assert sent_at <= state["step"] < 12 and state["sampler"]["consumed"] == state["step"]
    assert f"step {state['step']}" in err

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rerun = subprocess.run(_command(tiny_prepared, exp), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumingfrom{saved[-1]}" in "".join(rerun.stderr.split())  # rich wraps long paths

    torch.set_num_threads(1)
    cfg = resolve_config("tiny", overrides=[*SETS, "gmot.mode=none"])
    straight = train(tiny_prepared, tmp_path / "straight", cfg, device="cpu", progress=False)
    a = load_checkpoint(list_checkpoints(tmp_path / "straight")[-1])
    b = load_checkpoint(list_checkpoints(exp)[-1])
    assert a["step"] == b["step"] == straight.step == 24
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.slow
def test_sigint_saves_mid_epoch_and_exits_130(tiny_prepared: Path, tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    stopped, _ = _signal_mid_epoch(tiny_prepared, exp, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert "stopped by SIGINT" in " ".join(stopped.stderr.split())
    state = load_checkpoint(list_checkpoints(exp)[-1])
    assert not state["epoch_complete"] and 3 <= state["step"] < 12


def test_the_first_signal_is_recorded_the_second_acts() -> None:
    before = signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs between bytecodes of the main thread
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before
    assert Preempted(signal.SIGTERM, "").exit_code == 143 and Preempted(signal.SIGINT, "").exit_code == 130


def test_a_signal_during_the_last_step_of_an_epoch_stops_after_it(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal comes during the epoch's dev pass: the epoch's checkpoint is written, then the run stops;
    the re-run goes on with the next epoch."""
    import models.engine.training as training

    original = training.Trainer._dev_cer

    def dev_then_signal(self):
        result = original(self)
        if self.epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(training.Trainer, "_dev_cer", dev_then_signal)
    # a SIGTERM that the run does not catch must not end pytest
    unhandled: list[int] = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    try:
        cfg = resolve_config("tiny", overrides=["train.max_utts=3", "gmot.mode=none", "train.average_best=0"])
        with pytest.raises(Preempted, match="stopped by SIGTERM at epoch 1, step 4") as stopped:
            train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
        assert not unhandled and stopped.value.exit_code == 143
    finally:
        restored = signal.signal(signal.SIGTERM, before)
    assert restored is not None and restored.__name__ == "<lambda>"  # the run put the handler back
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert state["epoch_complete"] and state["step"] == 4
    monkeypatch.setattr(training.Trainer, "_dev_cer", original)
    out = train(tiny_prepared, tmp_path / "exp", cfg, device="cpu", progress=False)
    assert out.step == 8 and out.epochs_done == 2


def test_stale_temporary_files_are_removed_on_start(
    tiny_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    stale = ["ckpt-000000005.pt.tmp", "avg.pt.tmp", "checkpoints.json.tmp", "config.yaml.tmp"]
    for name in [*stale, "notes.tmp"]:
        (exp / name).write_bytes(b"cut off")
    cfg = resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=1", "gmot.mode=none"])
    train(tiny_prepared, exp, cfg, device="cpu", progress=False)
    assert [p.name for p in exp.glob("*.tmp")] == ["notes.tmp"]  # not ours: kept
    err = " ".join(capsys.readouterr().err.split())
    assert "removed what an interrupted write left" in err and "ckpt-000000005.pt.tmp" in err
