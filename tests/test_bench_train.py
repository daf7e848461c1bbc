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
        cost = {"system_share": 0.02, "faults_per_step": 1234.0, "gflop_per_step": 5.0, "gflops": 50.0}
        return {"params": 1e6, "batch": "8x500 (B x frames)", "pretrain": 0.1, "distill": 0.1 * ratio,
                "paired": ratio, "kt_only": 0.01, "peak_gib": peak,
                "cost": {"pretrain": cost, "distill": cost}}  # fmt: skip

    monkeypatch.setattr(bench_train, "bench_preset", timed)
    monkeypatch.setattr(bench_train, "matmul_peak", lambda threads, dtype, **_: 100.0 * threads)
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


def test_the_cost_table_holds_each_step_against_the_measured_peak(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_timings(monkeypatch, 1.0)
    monkeypatch.setattr(bench_train, "choose_precision", lambda device, mixed: "fp32")
    assert bench_train.main(["--quick", "--presets", "demo", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp32 1 thread 100 GFLOP/s" in out and "a step is held against 100 GFLOP/s (fp32)" in out
    rows = [line for line in out.splitlines() if line.startswith("│ demo") and "%" in line]
    assert len(rows) == 2  # pretrain and distill: 2.0 % system, 1,234 faults, 50 GFLOP/s = 50 % of 100
    assert all("2.0 %" in r and "1,234" in r and "50%" in r for r in rows)


def test_machine_cost_sums_rusage_deltas_and_flops_count_the_step() -> None:
    import resource

    cost = bench_train.MachineCost()
    before = resource.getrusage(resource.RUSAGE_SELF)
    junk = [bytearray(1 << 20) for _ in range(16)]  # touch 16 MiB: faults, some CPU
    cost.add(before, resource.getrusage(resource.RUSAGE_SELF))
    del junk
    summary = cost.summary(flops=4e9, step_s=2.0)
    assert summary["gflop_per_step"] == 4.0 and summary["gflops"] == 2.0
    assert 0.0 <= summary["system_share"] <= 1.0 and summary["faults_per_step"] >= 0
    # FlopCounterMode sees a linear layer's forward (2 m n k) and backward (input and weight gradients)
    model = torch.nn.Linear(64, 32, bias=False)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(torch.randn(8, 64, requires_grad=True)).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 8 * 64 * 32


def test_profile_prints_the_top_operators_and_each_blocks_forward_time() -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    gmot = bench_train.GMOTConfig(mode="fgw")
    bench_train.profile_steps("demo", 400, torch.device("cpu"), gmot, "fp32", console)
    text = console.export_text()
    assert "demo pretrain: top operators" in text and "demo distill: top operators" in text
    pretrain, distill = text.split("demo distill: top operators")
    assert all(part.count("forward time by block:") == 1 for part in (pretrain, distill))
    assert "subsampling" in pretrain and "layers.*.self_attn" in pretrain
    assert "adapter " in distill and "adapter " not in pretrain  # distill's model has the adapter
