"""The progress interface the `gmot prepare` pipeline reports to (rich.progress.Progress and
gmot_cli.line_progress.LineProgress fit it) and a sink that shows nothing, for callers that pass none."""

from __future__ import annotations

from typing import Any, Protocol


class ProgressSink(Protocol):
    """Minimal progress interface (rich.progress.Progress fits: add_task / update(advance=))."""

    def add_task(self, description: str, total: float | None = ..., **kwargs: Any) -> Any: ...

    def update(self, task_id: Any, **kwargs: Any) -> None: ...


class NullProgress:
    """A ProgressSink that shows nothing."""

    def add_task(self, description: str, total: float | None = None, **kwargs: Any) -> int:
        return 0

    def update(self, task_id: Any, **kwargs: Any) -> None:
        return None
