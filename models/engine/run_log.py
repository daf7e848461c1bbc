"""What a run writes beside its checkpoints: metrics.jsonl (and TensorBoard when installed), the checkpoint
index, the command lines, and the progress bars of training; and how a failed write (a full disk) is told."""

from __future__ import annotations

import errno
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

METRICS = "metrics.jsonl"
INDEX = "checkpoints.json"
COMMAND = "command.txt"


class MetricsLogger:
    """metrics.jsonl (always) and TensorBoard (when installed) on rank 0; no-op elsewhere.

    A record that cannot be written (a full disk) is cut off again, so metrics.jsonl keeps whole lines only;
    the OSError is kept in `error` for the caller to act on (all ranks together), and nothing more is written.
    """

    def __init__(self, exp_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = exp_dir / METRICS
        self.error: OSError | None = None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(exp_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: metrics.jsonl only
                self.tb = None

    def log(self, event: str, step: int, **values: Any) -> None:
        """Append one record {"event", "step", "time", **values} to metrics.jsonl (and TensorBoard)."""
        if not self.enabled or self.error is not None:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        try:
            _append(self.path, (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except OSError as err:
            self.error = err
            return
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _append(path: Path, data: bytes) -> None:
    """Append `data` to `path`; on an OSError the file is cut back to its old size (no partial line)."""
    with open(path, "ab", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take part of the data and fail on the rest
                view = view[f.write(view) :]
        except OSError:
            f.truncate(size)  # frees what the cut-off write took, and needs no space itself
            raise


def write_failure(err: OSError, path: Path, last_good: Path | None) -> str:
    """The message for a file of a run that could not be written: what happened, where, and the newest
    checkpoint a re-run resumes from, e.g. "no space left on the disk of /exp while writing
    /exp/ckpt-000000040.pt; the last good checkpoint is /exp/ckpt-000000030.pt ..."."""
    if err.errno == errno.ENOSPC:
        what, fix = f"no space left on the disk of {path.parent}", "free space"
    elif err.errno == errno.EDQUOT:
        what, fix = f"disk quota exceeded on {path.parent}", "free space"
    else:
        what, fix = f"cannot write to {path.parent} ({err.strerror or err})", "fix that"
    last = (
        f"the last good checkpoint is {last_good}; {fix}, then re-run the same command to resume from it"
        if last_good is not None
        else f"no checkpoint has been written yet; {fix}, then re-run the same command"
    )
    return f"{what} while writing {path}; {last}"


def read_metrics(exp_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The records of EXP_DIR/metrics.jsonl in file order (only those of `event`, e.g. "train" or "epoch",
    when given); a line that is not JSON (a run killed while writing) is skipped; [] when the file is
    absent."""
    path = Path(exp_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            records.append(record)
    return records


def read_index(exp_dir: Path) -> list[dict[str, Any]]:
    """EXP_DIR/checkpoints.json: one entry per checkpoint (epoch, step, dev CER ...); [] when absent."""
    path = exp_dir / INDEX
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def write_index(exp_dir: Path, index: list[dict[str, Any]]) -> None:
    """Write EXP_DIR/checkpoints.json atomically."""
    tmp = exp_dir / (INDEX + ".tmp")
    try:
        tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, exp_dir / INDEX)
    finally:
        tmp.unlink(missing_ok=True)


def record_command(exp_dir: Path, command: list[str] | None) -> None:
    """Append the command line (one per run; the first line is the original, later ones are resumptions)."""
    if command is None:
        prog = Path(sys.argv[0]).name
        head = ["python", "-m", "gmot_cli"] if prog == "__main__.py" else [prog]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            per_node = os.environ.get("LOCAL_WORLD_SIZE", "?")
            head = ["torchrun", f"--nproc_per_node={per_node}", "-m", "gmot_cli"]
        command = [*head, *sys.argv[1:]]
    argv = command
    with open(exp_dir / COMMAND, "a", encoding="utf-8") as f:
        f.write(shlex.join(argv) + "\n")


@contextmanager
def training_progress(enabled: bool, console: Console | None) -> Iterator[Progress | None]:
    """A rich progress display for the epochs (None when disabled)."""
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[terms]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield progress
