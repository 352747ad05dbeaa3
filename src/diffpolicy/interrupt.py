"""SIGINT / SIGTERM as a request to stop at the next safe point, so that long commands lose nothing.

`train` / `distill` (Trainer.fit) and `eval` run inside `graceful_stop()`: the first SIGINT (Ctrl-C) or
SIGTERM (a scheduler's preemption, `kill`) only records the signal; the training loop then saves a
checkpoint and returns, and an evaluation keeps its finished episodes as a partial report. A second Ctrl-C
raises KeyboardInterrupt as usual (to get out of a stop that takes too long); further SIGTERMs are ignored,
since torchrun follows the terminal's SIGINT with a SIGTERM to every worker.
Outside `graceful_stop()` (the Python API's `evaluate`, for one) the signals behave as Python's default.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

log = logging.getLogger("diffpolicy")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_depth = 0  # nesting of graceful_stop() contexts (Trainer.fit's periodic evaluations nest)
_received: signal.Signals | None = None
_previous: dict[int, object] = {}


def stop_requested() -> str | None:
    """The name of the signal that asked this process to stop ('SIGTERM'), or None."""
    return _received.name if _received is not None else None


def exit_code(name: str) -> int:
    """The shell's status for a command stopped by signal `name`: 128 + its number (130 for SIGINT)."""
    return 128 + int(signal.Signals[name])


def _handle(signum: int, frame: object) -> None:
    global _received
    if _received is not None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        return
    _received = signal.Signals(signum)
    log.warning(
        "%s received: stopping at the next safe point (a training run saves a checkpoint, an evaluation "
        "keeps its finished episodes)%s",
        _received.name,
        "; press Ctrl-C again to quit at once" if signum == signal.SIGINT else "",
    )


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Within this context SIGINT / SIGTERM set `stop_requested()` instead of ending the process. Only the
    main thread can own signal handlers; elsewhere this is a no-op. The request is cleared on leaving
    the outermost context."""
    global _depth, _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received = None
        _previous.update({s: signal.getsignal(s) for s in SIGNALS})
        for s in SIGNALS:
            signal.signal(s, _handle)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for s in SIGNALS:
                signal.signal(s, _previous.pop(s))
            _received = None
