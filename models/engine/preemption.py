"""Preemption: SIGTERM (torchrun, SLURM, Kubernetes) and SIGINT (Ctrl-C) stop a run at the next step boundary.

`StopSignals` catches the first SIGTERM or SIGINT and only records it; the training engine reads the record
at the end of every optimiser step (under DDP in the step's all-reduce, so every rank stops after the same
step), saves a mid-epoch checkpoint and raises `Preempted`, whose `exit_code` is 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), what a shell reports for a process killed by that signal. A second signal
of the same kind acts at once: SIGINT raises KeyboardInterrupt, SIGTERM kills the process.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

CAUGHT = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; re-running the same command resumes it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


class StopSignals:
    """A context manager that turns the first SIGTERM / SIGINT into a request read by the training loop.

    `signum` is the first signal caught (None until one is). Handlers are installed only in the main thread
    (Python allows no other) and the previous ones are restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal has been caught."""
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # a second signal: do what the default would have done, now
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.raise_signal(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in CAUGHT:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGTERM / SIGINT, which SLURM and a terminal send to
    the whole process group, so the main process can finish its step with its workers alive (they exit
    when the main process closes the loader or dies)."""
    for signum in CAUGHT:
        signal.signal(signum, signal.SIG_IGN)
