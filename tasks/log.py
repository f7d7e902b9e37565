"""Logging set-up shared by every stage, and a rate limiter for progress lines."""

import logging
import os
import socket
import sys
import time

FORMAT = "%(asctime)s %(levelname)s [%(host)s rank%(rank)s] %(name)s: %(message)s"


class _ContextFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.host = socket.gethostname()

    def filter(self, record: logging.LogRecord) -> bool:
        record.host = self.host
        record.rank = os.environ.get("RANK", "0")
        return True


def configure_logging(level: str | int = "INFO") -> None:
    """Configure the root logger once, with host and distributed rank in every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class ProgressLogger:
    """Log `done/total` with a rate every `interval` seconds, for logs that have no terminal.

    Airflow task logs are not a TTY, so a tqdm bar would print nothing useful there;
    stages use tqdm when stderr is a terminal and this class otherwise.
    """

    def __init__(self, logger: logging.Logger, label: str, total: int, interval: float = 10.0):
        self.logger = logger
        self.label = label
        self.total = total
        self.interval = interval
        self.done = 0
        self.started = time.monotonic()
        self.last = self.started
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="sample")

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            self.logger.info("%s: %d/%d samples, %.1f samples/s", self.label, self.done,
                             self.total, rate)

    def close(self) -> float:
        """Log the final count and return the elapsed seconds."""
        elapsed = time.monotonic() - self.started
        if self.bar is not None:
            self.bar.close()
        rate = self.done / max(elapsed, 1e-9)
        self.logger.info("%s: finished %d/%d samples in %.1f s (%.1f samples/s)",
                         self.label, self.done, self.total, elapsed, rate)
        return elapsed
