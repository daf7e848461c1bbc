"""benchmarks/bench_train.py's verdict: its exit status says whether distill/pretrain met the device's target,
and on a GPU it times the presets' real batches, also with --quick (the timings themselves are faked)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import benchmarks.bench_train as bench_train


def _fake_timings(monkeypatch: pytest.MonkeyPatch, ratio: float) -> list[tuple[str, int, str]]:
    """Replace the timed steps by a distill step `ratio` times the pretrain one; returns the calls' (preset,
    frames per batch, device type)."""
    calls: list[tuple[str, int, str]] = []

    def timed(name: str, frames: int, n_batches: int, repeats: int, device: torch.device, *_: Any) -> dict:
        calls.append((name, frames, device.type))
        peak = 3.0 if device.type == "cuda" else None
        return {"params": 1e6, "batch": "8x500 (B x frames)", "pretrain": 0.1, "distill": 0.1 * ratio,
                "paired": ratio, "kt_only": 0.01, "peak_gib": peak}  # fmt: skip

    monkeypatch.setattr(bench_train, "bench_preset", timed)
    return calls


@pytest.mark.parametrize(("ratio", "status"), [(1.10, 0), (1.20, 1)])
def test_the_exit_status_says_whether_the_cpu_target_was_met(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], ratio: float, status: int
) -> None:
    calls = _fake_timings(monkeypatch, ratio)
    assert bench_train.main(["--quick", "--presets", "demo,aishell1"]) == status  # CPU target 1.15x
    assert [c[0] for c in calls] == ["demo", "aishell1"]
    verdict = "met" if status == 0 else "MISSED"
    line = f"aishell1: 1,500 frames, pretrain 100 ms, distill {100 * ratio:.0f} ms, {ratio:.3f}x"
    assert f"{line} (target <= 1.15x: {verdict})" in capsys.readouterr().out


def test_on_a_gpu_quick_times_the_real_aishell1_batch_against_its_target(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_train, "choose_precision", lambda device, mixed: "bf16")
    calls = _fake_timings(monkeypatch, 1.08)  # within the CPU's 1.15x, not the GPU's 1.05x
    assert bench_train.main(["--quick", "--device", "cuda", "--presets", "aishell1"]) == 1
    assert calls == [("aishell1", 40000, "cuda")]
    assert "(target <= 1.05x: MISSED), peak 3.0 GiB" in capsys.readouterr().out


def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        bench_train.main(["--quick", "--device", "cuda"])
    assert stop.value.code == 2
