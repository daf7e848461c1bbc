"""A full disk while a checkpoint or metrics.jsonl is written: the run ends with exit code 1 and a message
saying what could not be written and which checkpoint a re-run resumes from; that checkpoint is intact, and
no cut-off file or line is left behind."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import models.engine.run_log as run_log
from gmot_cli.app import app
from models.engine.checkpoint import list_checkpoints, load_checkpoint
from models.engine.run_log import METRICS, write_failure

ARGS = ["--preset", "tiny", "--device", "cpu", "--no-progress", "--set", "train.max_utts=3", "--set",
        "train.epochs=1", "--set", "train.save_every_steps=2", "--set", "train.average_best=0"]  # fmt: skip
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _pretrain(data: Path, exp: Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["pretrain", str(data), str(exp), *ARGS])
    return result.exit_code, result.output


def test_disk_full_while_writing_a_checkpoint(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4 (the end of the epoch): part of it, then no space
            f.write(b"PK\x03\x04 half a checkpoint")
            raise ENOSPC
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    exp = tmp_path / "exp"
    code, output = _pretrain(tiny_prepared, exp)
    assert code == 1, output
    flat = "".join(output.split())  # rich wraps long paths anywhere
    assert f"nospaceleftonthediskof{exp}whilewriting{exp}/ckpt-000000004.pt" in flat, output
    assert f"thelastgoodcheckpointis{exp}/ckpt-000000002.pt" in flat
    assert "Traceback" not in output
    assert [p.name for p in list_checkpoints(exp)] == ["ckpt-000000002.pt"]
    assert load_checkpoint(exp / "ckpt-000000002.pt")["step"] == 2  # intact and loadable
    assert not list(exp.glob("*.tmp"))
    assert json.loads((exp / "checkpoints.json").read_text())[-1]["file"] == "ckpt-000000002.pt"


class _FullAfterHalf:
    """A file whose first write takes half the data and whose next write finds the disk full."""

    def __init__(self, f: Any) -> None:
        self.f, self.writes = f, 0

    def write(self, data: Any) -> int:
        self.writes += 1
        if self.writes > 1:
            raise ENOSPC
        return self.f.write(data[: len(data) // 2])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.f, name)

    def __enter__(self) -> _FullAfterHalf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_disk_full_while_writing_metrics(
    tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def full_on_the_third_record(path: Any, *args: Any, **kwargs: Any) -> Any:
        f = open(path, *args, **kwargs)  # noqa: SIM115 - handed to the caller's with
        if Path(path).name != METRICS:
            return f
        calls["n"] += 1
        return _FullAfterHalf(f) if calls["n"] == 3 else f

    monkeypatch.setattr(run_log, "open", full_on_the_third_record, raising=False)
    exp = tmp_path / "exp"
    code, output = _pretrain(tiny_prepared, exp)
    assert code == 1, output
    flat = "".join(output.split())
    assert f"nospaceleftonthediskof{exp}whilewriting{exp}/{METRICS}" in flat, output
    assert f"thelastgoodcheckpointis{exp}/ckpt-000000002.pt" in flat
    lines = (exp / METRICS).read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # whole records only: the third cut back
    load_checkpoint(exp / "ckpt-000000002.pt")


def test_write_failure_messages() -> None:
    path = Path("/exp/ckpt-000000004.pt")
    last = Path("/exp/ckpt-000000002.pt")
    assert write_failure(ENOSPC, path, last) == (
        "no space left on the disk of /exp while writing /exp/ckpt-000000004.pt; the last good checkpoint is "
        "/exp/ckpt-000000002.pt; free space, then re-run the same command to resume from it"
    )
    quota = write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), path, None)
    assert quota.startswith("disk quota exceeded on /exp") and "no checkpoint has been written yet" in quota
    other = write_failure(OSError(errno.EIO, "Input/output error"), path, last)
    assert other.startswith("cannot write to /exp (Input/output error)") and "fix that" in other
