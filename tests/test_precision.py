"""models.engine.precision: which precision a device gets; the fp16 scaler; the GPU index of each torchrun
rank."""

from __future__ import annotations

import pytest
import torch

import models.engine.distributed as distributed
import models.engine.precision as precision


def test_choose_precision_by_device_capability(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda device: True)
    assert precision.choose_precision(cuda, True) == "bf16"
    monkeypatch.setattr(precision, "cuda_has_bf16", lambda device: False)  # a Volta / Turing GPU
    assert precision.choose_precision(cuda, True) == "fp16"
    assert precision.choose_precision(cuda, False) == "fp32"
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.choose_precision(cpu, True) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.choose_precision(cpu, True) == "fp32"


def test_the_scaler_is_only_on_for_fp16() -> None:
    if torch.cuda.is_available():
        assert precision.grad_scaler("fp16").is_enabled()
    else:  # fp16 loss scaling needs CUDA; torch says so and disables it
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert not precision.grad_scaler("fp16").is_enabled()
    for p in ("bf16", "fp32"):
        scaler = precision.grad_scaler(p)
        assert not scaler.is_enabled()
        x = torch.ones(3, requires_grad=True)
        scaler.scale((2 * x).sum()).backward()
        assert torch.equal(x.grad, torch.full((3,), 2.0))  # a pass-through


def test_autocast_for_fp32_is_a_no_op_and_bf16_casts_on_cpu() -> None:
    a = torch.randn(4, 4)
    with precision.autocast_for(torch.device("cpu"), "fp32"):
        assert (a @ a).dtype == torch.float32
    with precision.autocast_for(torch.device("cpu"), "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_torchrun_ranks_take_the_gpu_of_their_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    rank1 = distributed.DistInfo(rank=1, local_rank=1, world=2)
    assert distributed.pick_device("cuda:0", rank1) == torch.device("cuda:1")  # rank 1 does not warn
    assert distributed.pick_device("cuda", rank1) == torch.device("cuda:1")
    rank0 = distributed.DistInfo(rank=0, local_rank=0, world=2)
    assert distributed.pick_device("cuda:0", rank0) == torch.device("cuda:0")
    with pytest.warns(UserWarning, match="CUDA_VISIBLE_DEVICES"):
        assert distributed.pick_device("cuda:3", rank0) == torch.device("cuda:0")
    single = distributed.DistInfo()
    assert distributed.pick_device("cuda:3", single) == torch.device("cuda:3")  # one process: as asked
    assert chosen[-1] == torch.device("cuda:3")


def test_cpu_threads_take_the_free_cores_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: 1.2)  # one core busy
    assert distributed.free_cores() == 3
    assert distributed.cpu_threads(0) == 3
    assert distributed.cpu_threads(0, local_world=2) == 2  # the busy core is the other rank: 4 // 2 each
    assert distributed.cpu_threads(2) == 2  # train.threads=2 stands
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: 9.0)
    assert distributed.cpu_threads(0) == 1  # never fewer than one
    # without /proc/stat the load average decides
    monkeypatch.setattr(distributed, "busy_cores_now", lambda: None)
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (2.2, 0.0, 0.0))
    assert distributed.free_cores() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert distributed.cpu_threads(0) is None  # the user's setting stands


def test_busy_cores_are_read_from_proc_stat(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n", encoding="ascii")
    assert distributed.cpu_times(str(stat)) == (1000, 850)
    stat.write_text("intr 5\n", encoding="ascii")
    with pytest.raises(ValueError, match="no aggregate cpu line"):
        distributed.cpu_times(str(stat))
    # two reads 300 ticks apart, 150 of them idle, on 2 CPUs: one core's worth busy
    reads = iter([(1000, 850), (1300, 1000)])
    monkeypatch.setattr(distributed, "cpu_times", lambda: next(reads))
    monkeypatch.setattr(distributed.os, "cpu_count", lambda: 2)
    assert distributed.busy_cores_now(window_s=0.0) == pytest.approx(1.0)
    monkeypatch.setattr(distributed, "cpu_times", lambda: (_ for _ in ()).throw(OSError("no /proc")))
    assert distributed.busy_cores_now(window_s=0.0) is None


def test_busy_cores_see_a_process_that_runs_now() -> None:
    """On Linux: a busy loop in another process shows up within a quarter of a second (the load average
    would take about a minute). Other load may add to it, never take it away, so only a floor is checked."""
    import subprocess
    import sys

    if distributed.busy_cores_now(window_s=0.05) is None:
        pytest.skip("no /proc/stat")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        loaded = distributed.busy_cores_now()
    finally:
        busy.kill()
        busy.wait()
    assert loaded is not None and loaded >= 0.6
