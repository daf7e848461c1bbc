"""What a run writes beside its checkpoints: metrics.jsonl (and TensorBoard when installed), the checkpoint
index, the command lines, and the progress bars of training."""

from __future__ import annotations

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
    """metrics.jsonl (always) and TensorBoard (when installed) on rank 0; no-op elsewhere."""

    def __init__(self, exp_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = exp_dir / METRICS
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(exp_dir / "tensorboard"))
            except Exception:  # tensorboard not installed: metrics.jsonl only
                self.tb = None

    def log(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch":
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_index(exp_dir: Path) -> list[dict[str, Any]]:
    """EXP_DIR/checkpoints.json: one entry per checkpoint (epoch, step, dev CER ...); [] when absent."""
    path = exp_dir / INDEX
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def write_index(exp_dir: Path, index: list[dict[str, Any]]) -> None:
    """Write EXP_DIR/checkpoints.json atomically."""
    tmp = exp_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, exp_dir / INDEX)


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
