"""Faults under DDP, with two CPU ranks in a gloo group: a SIGTERM that reaches one rank stops both after the
same step with a checkpoint, and the resumed run ends with the weights of one process accumulating the two
ranks' batches; its epoch records sum both ranks' losses and skipped utterances; a full disk on rank 0 stops
both ranks with the message instead of leaving one waiting.

One pair of processes runs the three scenarios in turn (each process joins the group once and keeps it, so
the runs do not own it); each rank writes what happened to a JSON file for the tests to read.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import models.engine.train_data as train_data
import models.engine.training as training
from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.config import resolve_config

# 12 batches of one utterance: 6 steps an epoch on two ranks; two of the utterances CTC cannot align
SETS = ["train.max_utts=1", "train.epochs=2", "gmot.mode=fgw", "model.dropout=0.1", "train.average_best=0",
        "train.threads=1"]  # fmt: skip
UNALIGNABLE = (4, 7)
SIGNAL_AT = 3  # rank 1 receives SIGTERM in its third training forward pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_unalignable_utterances(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    manifest = dst / "train" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    for i in UNALIGNABLE:
        records[i]["token_ids"] = [2, 3] * records[i]["num_frames"]
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return dst


def _let_unalignable_through() -> None:
    """Keep the unalignable utterances in (their CTC is infinite in training, and counted)."""
    train_data.ctc_infeasible = lambda records, subsampling: []


def _rank(rank: int, world: int, port: int, data: str, tmp: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    _let_unalignable_through()
    cfg = resolve_config("tiny", overrides=SETS)
    report: dict[str, Any] = {}

    def run(name: str, exp: str, cfg) -> None:
        trainer = training.Trainer(Path(data), Path(tmp, exp), cfg, device="cpu", progress=False)
        try:
            trainer.run()
            report[name] = {"outcome": "finished", "step": trainer.step}
        except training.Preempted as err:
            report[name] = {"outcome": "preempted", "code": err.exit_code, "step": trainer.step}
        except training.TrainingError as err:
            report[name] = {"outcome": "error", "message": str(err), "step": trainer.step}
        Path(tmp, f"rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")

    forward = training.Trainer._forward
    calls = {"n": 0}

    def forward_then_signal(self, batch, train):
        out = forward(self, batch, train)
        calls["n"] += 1
        if rank == 1 and calls["n"] == SIGNAL_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    training.Trainer._forward = forward_then_signal
    run("preempted", "ddp", cfg)
    training.Trainer._forward = forward
    run("resumed", "ddp", cfg)

    real_save, saves = torch.save, {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves["n"] += 1
        if rank == 0 and saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    torch.save = save
    run("disk_full", "full", resolve_config("tiny", overrides=[*SETS, "train.save_every_steps=2"]))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp(tiny_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    """(data folder, folder of the runs, each rank's report) after the two ranks ran the three scenarios."""
    tmp = tmp_path_factory.mktemp("ddp_faults")
    data = _with_unalignable_utterances(tiny_prepared, tmp / "data")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, str(data), str(tmp))) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=400)
    for proc in procs:  # a rank left waiting for the other (the fault these tests are about)
        if proc.is_alive():
            proc.kill()
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").is_file() else {}
               for r in (0, 1)]  # fmt: skip
    return data, tmp, reports


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_both_after_the_same_step(ddp: tuple[Path, Path, list[dict]]) -> None:
    _, tmp, reports = ddp
    stopped = [r.get("preempted") for r in reports]
    assert stopped[0] == stopped[1] == {"outcome": "preempted", "code": 143, "step": SIGNAL_AT}, reports
    saved = load_checkpoint(tmp / "ddp" / f"ckpt-{SIGNAL_AT:09d}.pt")
    assert not saved["epoch_complete"] and saved["sampler"]["consumed"] == SIGNAL_AT


@pytest.mark.slow
def test_the_resumed_ranks_equal_one_process_and_their_epoch_sums_add_up(
    ddp: tuple[Path, Path, list[dict]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, tmp, reports = ddp
    assert [r.get("resumed", {}).get("outcome") for r in reports] == ["finished"] * 2, reports
    monkeypatch.setattr(train_data, "ctc_infeasible", lambda records, subsampling: [])
    cfg = resolve_config("tiny", overrides=[*SETS, "train.accum_grad=2"])
    single = training.train(data, tmp_path / "one", cfg, device="cpu", progress=False)
    assert single.step == 12 and single.skipped_inf == 2 * len(UNALIGNABLE)

    def epochs(exp: Path) -> list[dict]:
        lines = (exp / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        return [r for r in map(json.loads, lines) if r["event"] == "epoch"]

    ddp_epochs, single_epochs = epochs(tmp / "ddp"), epochs(tmp_path / "one")
    assert len(ddp_epochs) == len(single_epochs) == 2
    for d, s in zip(ddp_epochs, single_epochs, strict=True):
        # both ranks' utterances: epoch 1 was cut by the signal, its sums carried over the restart
        assert d["skipped_inf"] == s["skipped_inf"] == len(UNALIGNABLE)
        for key in ("loss", "ctc", "kt"):
            assert d[key] == pytest.approx(s[key], rel=1e-4), key
    # a batch whose every CTC is infinite leaves its rank's share of the step to the other rank, as a
    # single process leaves it to the other micro-batch
    assert reports[0]["resumed"]["step"] == 12
    a = load_checkpoint(list_checkpoints(tmp / "ddp")[-1])
    b = load_checkpoint(list_checkpoints(tmp_path / "one")[-1])
    for name, value in b["model"].items():
        if value.is_floating_point() and "running" not in name:  # DDP broadcasts rank 0's buffers
            assert torch.allclose(a["model"][name], value, atol=2e-5), name


@pytest.mark.slow
def test_a_full_disk_on_rank_0_stops_both_ranks_with_its_message(ddp: tuple[Path, Path, list[dict]]) -> None:
    _, tmp, reports = ddp
    full = [r.get("disk_full") for r in reports]
    assert full[0] is not None and full[1] is not None, reports
    assert full[0]["outcome"] == full[1]["outcome"] == "error" and full[0]["step"] == full[1]["step"] == 4
    exp = tmp / "full"
    assert full[0]["message"] == (
        f"no space left on the disk of {exp} while writing {exp}/ckpt-000000004.pt; the last good checkpoint "
        f"is {exp}/ckpt-000000002.pt; free space, then re-run the same command to resume from it"
    )
    assert full[1]["message"].startswith("rank 1: rank 0 could not write to")
    assert [p.name for p in list_checkpoints(exp)] == ["ckpt-000000002.pt"]
    load_checkpoint(exp / "ckpt-000000002.pt")
