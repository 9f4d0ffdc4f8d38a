"""A status line on stderr for runs long enough to wonder about.

Shown only when stderr is a terminal (never in logs, pipes or with --json), only once a run has
taken `delay` seconds (quick runs print nothing extra), redrawn by a daemon thread so a phase
that blocks for a minute still shows its clock, and erased before the summary is printed.
"""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, enabled: bool = True, delay: float = 1.0, interval: float = 0.25, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and _is_terminal(self.stream)
        self.delay = delay
        self.interval = interval
        self.text = ""
        self.started = time.monotonic()
        self._shown = 0  # width of the line on screen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="bnfold-progress", daemon=True)
            self._thread.start()

    def update(self, text: str) -> None:
        """Set what the run is doing now (e.g. "writing", "[3/10] resnet.onnx")."""
        with self._lock:
            self.text = text

    def close(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        with self._lock:
            self._erase()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            elapsed = time.monotonic() - self.started
            if elapsed >= self.delay:
                with self._lock:
                    self._draw(f"bnfold: {self.text} ({elapsed:.0f} s)")

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line + " " * max(0, self._shown - len(line)))
        self.stream.flush()
        self._shown = len(line)

    def _erase(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self.stream.flush()
            self._shown = 0


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
