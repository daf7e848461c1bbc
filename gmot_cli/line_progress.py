"""Progress for output that is not a terminal (a log file, CI): rich's live bars print nothing there, so
this prints one line when a stage starts, a count every `every_s` seconds, and one line when it ends.
It has the part of rich.progress.Progress's interface the library uses (add_task, update, context)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console


class LineProgress:
    """`add_task(description, total)` -> task id; `update(task, advance= | completed=, total=)`."""

    def __init__(self, console: Console, every_s: float = 30.0) -> None:
        self.console = console
        self.every_s = every_s
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id, task in self.tasks.items():
            if not task["done"] and exc[0] is None:
                self._line(task_id, "done")

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        """Start a stage: prints `description: started (of TOTAL)`."""
        task_id = len(self.tasks)
        now = time.monotonic()
        self.tasks[task_id] = {
            "description": description, "total": total, "completed": 0.0, "start": now, "last": now,
            "done": False,
        }  # fmt: skip
        suffix = f" (of {total:,.0f})" if total else ""
        self.console.print(f"{description}: started{suffix}", highlight=False, soft_wrap=True)
        return task_id

    def update(self, task_id: int, **kw: Any) -> None:
        """Advance a stage; prints a count at most every `every_s` seconds and once when it completes."""
        task = self.tasks[task_id]
        if kw.get("total") is not None:
            task["total"] = kw["total"]
        if kw.get("completed") is not None:
            task["completed"] = float(kw["completed"])
        if kw.get("advance") is not None:
            task["completed"] += float(kw["advance"])
        now = time.monotonic()
        total = task["total"]
        if total and task["completed"] >= total and not task["done"]:
            self._line(task_id, "done")
        elif now - task["last"] >= self.every_s and not task["done"]:
            self._line(task_id, "running")

    def _line(self, task_id: int, state: str) -> None:
        task = self.tasks[task_id]
        now = time.monotonic()
        task["last"] = now
        task["done"] = state == "done"
        total = task["total"]
        count = f"{task['completed']:,.0f}" + (f" / {total:,.0f}" if total else "")
        self.console.print(
            f"{task['description']}: {state}, {count} ({now - task['start']:.0f} s)",
            highlight=False,
            soft_wrap=True,
        )
