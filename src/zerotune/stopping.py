"""Graceful stop on SIGTERM / SIGINT: the loop finishes its step, writes a checkpoint and exits with
EXIT_PREEMPTED, so a scheduler (spot instance, Slurm, Kubernetes) can start it again with --resume."""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: a temporary failure; run the same command with --resume


class StopSignals:
    """While active, SIGTERM and SIGINT set ``requested`` instead of killing the process. Repeats are ignored
    (torch elastic forwards the signal it got, so a worker may see it twice); SIGKILL still works."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Ray runs the loop in a thread: no handlers
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
