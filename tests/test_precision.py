"""models.precision: which precision a device gets; the fp16 scaler; the GPU index of each torchrun rank."""

from __future__ import annotations

import pytest
import torch

import models.distributed as distributed
import models.precision as precision


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
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (1.2, 0.0, 0.0))  # one core busy
    assert distributed.free_cores() == 3
    assert distributed.cpu_threads(0) == 3
    assert distributed.cpu_threads(0, local_world=2) == 1  # two ranks on this node share them
    assert distributed.cpu_threads(2) == 2  # train.threads=2 stands
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert distributed.cpu_threads(0) == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert distributed.cpu_threads(0) is None  # the user's setting stands
