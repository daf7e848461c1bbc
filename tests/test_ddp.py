"""DDP: two CPU processes with gloo give the same weights as one process accumulating their two batches."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from data.loader import bucket_batches
from data.store import read_manifest
from models.checkpoint import list_checkpoints, load_checkpoint
from models.config import resolve_config
from models.encoder import MIN_INPUT_FRAMES, ConformerCTC
from models.training import train

SETS = ["train.max_utts=3", "train.epochs=2", "gmot.mode=fgw", "model.dropout=0.1", "train.average_best=0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, exp: str) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)
    train(Path(data), Path(exp), resolve_config("tiny", overrides=SETS), device="cpu", progress=False)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_with_accumulation(tiny_prepared: Path, tmp_path: Path) -> None:
    lengths = [r["num_frames"] for r in read_manifest(tiny_prepared / "train")]
    batches, _ = bucket_batches(lengths, 3000, 3, MIN_INPUT_FRAMES)
    assert len(batches) % 2 == 0  # the same global batches without padding

    mp.start_processes(_worker, args=(2, _free_port(), str(tiny_prepared), str(tmp_path / "ddp")), nprocs=2,
                       start_method="spawn", join=True)  # fmt: skip
    cfg = resolve_config("tiny", overrides=[*SETS, "train.accum_grad=2"])
    single = train(tiny_prepared, tmp_path / "one", cfg, device="cpu", progress=False)
    a = load_checkpoint(list_checkpoints(tmp_path / "ddp")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "one")[-1])
    assert a["step"] == b["step"] == single.step == 2 * len(batches) // 2
    names = {n for n, _ in ConformerCTC(resolve_config("tiny").model, len(a["vocab"]), 16).named_parameters()}
    # parameters (not BatchNorm running statistics: DDP broadcasts rank 0's buffers)
    assert names <= set(a["model"])
    for name in names:
        assert torch.allclose(a["model"][name], b["model"][name], atol=2e-5), name
    assert a["sampler"]["world_size"] == 2
    # only rank 0 wrote: one command line, one set of metrics
    assert len((tmp_path / "ddp" / "command.txt").read_text().splitlines()) == 1
    ddp_dev = [
        line for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line
    ]
    assert len([x for x in ddp_dev if '"event": "epoch"' in x]) == 2


def _worker_own_folder(rank: int, world: int, port: int, data: str, exps: list[str], out: str) -> None:
    """A rank whose EXP_DIR is its own folder (no shared filesystem); writes what train() raised."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)
    from models.training import TrainingError

    cfg = resolve_config("tiny", overrides=[*SETS, "train.epochs=2"])
    try:
        train(Path(data), Path(exps[rank]), cfg, device="cpu", progress=False)
        message = "finished"
    except TrainingError as err:
        message = f"TrainingError: {err}"
    Path(out, f"rank{rank}.txt").write_text(message, encoding="utf-8")


@pytest.mark.slow
def test_ranks_that_see_different_exp_dirs_fail_together(tiny_prepared: Path, tmp_path: Path) -> None:
    # rank 0's EXP_DIR holds a finished epoch; rank 1's view of "the same" folder is empty
    seen_by_0, seen_by_1 = tmp_path / "node0" / "exp", tmp_path / "node1" / "exp"
    train(tiny_prepared, seen_by_0, resolve_config("tiny", overrides=[*SETS, "train.epochs=1"]), device="cpu",
          progress=False)  # fmt: skip
    before = list_checkpoints(seen_by_0)
    # plain processes: what each rank reports is in its file; gloo's threads may abort a process at exit
    # after a failed run (seen once in CI), which is not what this test is about
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_worker_own_folder,
                    args=(rank, 2, port, str(tiny_prepared), [str(seen_by_0), str(seen_by_1)], str(tmp_path)))
        for rank in (0, 1)
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        assert not proc.is_alive()
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text(encoding="utf-8")
        assert message.startswith("TrainingError") and "shared filesystem" in message, message
        assert before[-1].name in message
    assert "rank 1: cannot read" in (tmp_path / "rank1.txt").read_text(encoding="utf-8")
    assert list_checkpoints(seen_by_0) == before  # nothing written by a half-resumed run
    assert not seen_by_1.exists() or not list_checkpoints(seen_by_1)
