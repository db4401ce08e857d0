"""The batch CLI's progress display: one redrawn status line on a terminal, one line per event otherwise."""

from __future__ import annotations

import sys
import threading


class Progress:
    """Counts finished and failed items; each worker's current step on the status line."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.lock = threading.Lock()
        self.done = self.failed = 0
        self.steps: dict[str, str] = {}

    def _bar(self) -> str:
        width = 24
        filled = int(width * (self.done + self.failed) / max(self.total, 1))
        steps = " ".join(f"[{k}: {v}]" for k, v in sorted(self.steps.items()))
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} done, {self.failed} failed {steps}"

    def step(self, worker: str, text: str) -> None:
        with self.lock:
            self.steps[worker] = text
            if self.tty:
                self.stream.write("\r\033[K" + self._bar())
                self.stream.flush()

    def event(self, text: str, done: int = 0, failed: int = 0) -> None:
        with self.lock:
            self.done += done
            self.failed += failed
            if self.tty:
                self.stream.write("\r\033[K" + text + "\n" + self._bar())
            else:
                self.stream.write(f"{text} ({self.done + self.failed}/{self.total})\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            with self.lock:
                self.stream.write("\n")
                self.stream.flush()
