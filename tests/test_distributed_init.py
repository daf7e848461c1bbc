"""The process group under torchrun, shown on the CPU: a process that torchrun started joins a group even
as the only rank (gloo here, nccl on a GPU) and trains under DDP; its device is chosen before the group,
which is bound to it (`device_id`) with an explicit timeout; and a one-rank DDP run interrupted mid-epoch
resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

import models.engine.training as training
from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.config import resolve_config
from models.engine.distributed import PROCESS_GROUP_TIMEOUT, DistInfo, launch_info
from models.engine.training import Trainer


@pytest.fixture(autouse=True)
def _no_group_left_behind() -> Iterator[None]:
    """A test that fails before its run ends leaves its group; the next one could not create its own."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int = 0, world: int = 1) -> None:
    """The environment torchrun's agent gives a worker on one node (torch/distributed/elastic/agent/server/
    local_elastic_agent.py). MASTER_PORT 0: rank 0's store takes a free port, which one rank can do.
    TORCHELASTIC_USE_AGENT_STORE is left out: with it, rank 0 would wait for the agent's store."""
    env = {
        "RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "ROLE_RANK": rank, "ROLE_NAME": "default",
        "LOCAL_WORLD_SIZE": world, "WORLD_SIZE": world, "GROUP_WORLD_SIZE": 1, "ROLE_WORLD_SIZE": world,
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 0, "TORCHELASTIC_RESTART_COUNT": 0,
        "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_RUN_ID": "gmot-test",
    }  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)


def _cfg(*extra: str):
    return resolve_config("tiny", overrides=["train.max_utts=3", "train.epochs=2", "train.threads=1", *extra])


def test_only_a_launched_process_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_info() == DistInfo()  # a plain process: no group
    _torchrun_env(monkeypatch)
    assert launch_info() == DistInfo(0, 0, 1, owns_group=False, distributed=True)  # torchrun, one rank
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_info() == DistInfo(1, 1, 2, distributed=True)  # another launcher's ranks


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_device_is_chosen_before_the_group_which_is_bound_to_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, device: str
) -> None:
    events: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", torch.device(d))))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: events.append(("init", (a, kw))))
    _torchrun_env(monkeypatch, rank=1, world=2)
    trainer = Trainer(tmp_path / "data", tmp_path / "exp", _cfg(), device=device, progress=False)
    if device == "cuda":
        assert events[0] == ("set_device", torch.device("cuda:1"))  # rank 1 takes the GPU of LOCAL_RANK 1
        events.pop(0)
    assert [name for name, _ in events] == ["init"]
    args, kwargs = events[0][1]
    assert not args
    assert kwargs["backend"] == ("nccl" if device == "cuda" else "gloo")
    assert (kwargs["rank"], kwargs["world_size"]) == (1, 2)
    assert kwargs["device_id"] == (torch.device("cuda:1") if device == "cuda" else None)
    assert kwargs["timeout"] == PROCESS_GROUP_TIMEOUT >= timedelta(minutes=10)
    assert trainer.device == torch.device("cuda:1" if device == "cuda" else "cpu")
    assert trainer.dd.owns_group and trainer.dd.distributed


@pytest.mark.slow
def test_one_torchrun_rank_trains_in_a_gloo_group_under_ddp(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _torchrun_env(monkeypatch)
    said = Console(file=io.StringIO(), width=200)
    cfg = _cfg("train.epochs=1")
    trainer = Trainer(tiny_prepared, tmp_path / "exp", cfg, device="cpu", console=said, progress=False)
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    out = trainer.run()
    assert isinstance(trainer.model, DistributedDataParallel)
    assert out.epochs_done == 1 and out.step > 0
    assert "1 process(es) in a gloo group" in said.file.getvalue()  # the start line
    assert not dist.is_initialized()  # the run's group is gone with it


class _Crash(Exception):
    pass


@pytest.mark.slow
def test_a_one_rank_ddp_run_resumed_mid_epoch_equals_an_uninterrupted_one(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _torchrun_env(monkeypatch)
    cfg = _cfg("model.dropout=0.1", "train.save_every_steps=1", "gmot.mode=fgw")
    straight = Trainer(tiny_prepared, tmp_path / "a", cfg, device="cpu", progress=False)
    straight_out = straight.run()

    original = Trainer._save

    def crashing_save(
        self: Trainer, epoch_complete: bool, consumed: int, dev_cer: float | None = None
    ) -> None:
        original(self, epoch_complete, consumed, dev_cer)
        if self.epoch == 2 and not epoch_complete:  # the first mid-epoch checkpoint of epoch 2
            raise _Crash

    monkeypatch.setattr(training.Trainer, "_save", crashing_save)
    with pytest.raises(_Crash):
        Trainer(tiny_prepared, tmp_path / "b", cfg, device="cpu", progress=False).run()
    monkeypatch.setattr(training.Trainer, "_save", original)
    assert not dist.is_initialized()
    last = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])
    assert (last["epoch"], last["epoch_complete"]) == (2, False)
    resumed = Trainer(tiny_prepared, tmp_path / "b", cfg, device="cpu", progress=False)
    resumed_out = resumed.run()

    assert isinstance(straight.model, DistributedDataParallel)
    assert isinstance(resumed.model, DistributedDataParallel)
    assert resumed_out.resumed_from is not None and resumed_out.resumed_from.name.endswith(
        f"{last['step']:09d}.pt"
    )
    assert resumed_out.step == straight_out.step > last["step"]
    a = load_checkpoint(list_checkpoints(tmp_path / "a")[-1])["model"]
    b = load_checkpoint(list_checkpoints(tmp_path / "b")[-1])["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
