"""Process plumbing for the command line: log lines to whatever ``sys.stderr`` is, and
SIGTERM (``kill``, a job scheduler's stop) turned into Ctrl-C so long jobs save their
finished work before exiting."""

from __future__ import annotations

import logging
import sys


class Stderr(logging.Handler):
    """Log lines to whatever ``sys.stderr`` is when they are emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr, flush=True)


def setup_logging() -> None:
    logger = logging.getLogger("zsdb3kd")
    if not any(isinstance(h, Stderr) for h in logger.handlers):
        handler = Stderr()
        handler.setFormatter(logging.Formatter("[zsdb3kd] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def sigterm_interrupts():
    """Make SIGTERM (``kill``, a job scheduler's stop) interrupt like Ctrl-C, so long jobs
    save their finished work before exiting. Returns a function that undoes it (or None
    outside the main thread, where signals cannot be handled)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)
