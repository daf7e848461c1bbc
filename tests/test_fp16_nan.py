"""fp16 with a GradScaler: an overflow skips its step and halves the scale, but a NaN that overflows at every
scale is counted as a NaN step once the scale falls below its floor (or after many overflows in a row), and
a run of them stops training with the usual NaN message instead of stalling. On the CPU, with torch's CPU
GradScaler in place of the CUDA one and NaN gradients injected into one parameter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models.engine.run_state as run_state
import models.engine.training as training
from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.config import resolve_config
from models.engine.distributed import unwrap
from models.engine.precision import MAX_OVERFLOW_STREAK, SCALE_FLOOR, overflow_is_nan
from models.engine.training import TrainingError, train


def test_when_an_overflow_counts_as_nan() -> None:
    assert not overflow_is_nan(1, 32768.0)
    assert not overflow_is_nan(MAX_OVERFLOW_STREAK - 1, SCALE_FLOOR)
    assert overflow_is_nan(MAX_OVERFLOW_STREAK, 2.0**20)
    assert overflow_is_nan(1, SCALE_FLOOR / 2)


def _fp16_with_nan_gradients(monkeypatch: pytest.MonkeyPatch, nan_steps: set[int] | None) -> None:
    """A CPU GradScaler starting at scale 8, and NaN gradients in the CTC head on the given (1-based)
    backward passes (all of them for None)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    monkeypatch.setattr(run_state, "grad_scaler", lambda precision: scaler)
    original = training.Trainer._build
    seen = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        seen["n"] += 1
        return grad * float("nan") if nan_steps is None or seen["n"] in nan_steps else grad

    def build(self) -> None:
        original(self)
        unwrap(self.model).ctc_head.weight.register_hook(poison)

    monkeypatch.setattr(training.Trainer, "_build", build)


def _cfg(*extra: str):
    return resolve_config("tiny", overrides=["train.max_utts=1", "gmot.mode=none", "train.average_best=0",
                                             *extra])  # fmt: skip


def test_a_nan_that_overflows_at_every_scale_stops_the_run(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fp16_with_nan_gradients(monkeypatch, None)
    # overflows 1-3 halve the scale 8 -> 1; the 4th leaves it at 0.5, below the floor: NaN steps 4, 5, 6
    with pytest.raises(TrainingError, match=r"gradient was NaN in 3 consecutive steps.*max_nan_steps=3"):
        train(tiny_prepared, tmp_path / "exp", _cfg("train.max_nan_steps=3"), device="cpu", progress=False)


def test_transient_overflows_only_lower_the_scale(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fp16_with_nan_gradients(monkeypatch, {2, 3})
    out = train(tiny_prepared, tmp_path / "exp", _cfg("train.epochs=1"), device="cpu", progress=False)
    assert out.skipped_nan == 0 and out.step == 12 - 2
    state = load_checkpoint(list_checkpoints(tmp_path / "exp")[-1])
    assert state["scaler"]["scale"] == 2.0  # halved twice, not grown back within 10 steps
    assert state["counters"]["overflow_streak"] == 0
