"""Ctrl-C and SIGTERM: one line and no output, whenever they come.

Three pieces. While a CLI run is still importing (torch takes a second), a signal ends the process at
once with the one line: nothing has been written yet. Once ``main`` runs, both signals raise
``KeyboardInterrupt`` so the writer's clean-up runs. Around the few steps that must not be cut in
half (the renames that put a finished output in place, the removal of a staging folder),
:func:`deferred` holds the signals back and delivers them right after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

INTERRUPTED = "error: interrupted; no output was written"


class InterruptedAfterOutput(KeyboardInterrupt):
    """A signal that came while a finished output was being put in place: the output is complete."""

    def __init__(self, out: object) -> None:
        super().__init__(out)
        self.out = out

    def line(self) -> str:
        return f"error: interrupted; the output was complete and is in place: {self.out}"


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def launched_as_cli() -> bool:
    """Whether this process is ``python -m weightweaving`` or the ``weightweaving`` console script."""
    argv = getattr(sys, "orig_argv", sys.argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return argv[i + 1] == "weightweaving"
    return len(argv) > 1 and Path(argv[1]).name == "weightweaving" or Path(argv[0]).name == "weightweaving"


def _quit_while_importing(signum: int, frame: FrameType | None) -> None:
    os.write(2, (INTERRUPTED + "\n").encode())
    os._exit(130)


def guard_imports() -> None:
    """First thing a CLI run does (in the package's ``__init__``): a signal now just ends it."""
    if launched_as_cli() and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _quit_while_importing)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise ``KeyboardInterrupt`` (so clean-up runs); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is _quit_while_importing:  # the run is over: a late signal must not claim otherwise
                handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back inside; deliver one that came, as its own handler would, after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append((signum, frame))

    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig in SIGNALS:
            signal.signal(sig, previous[sig])
        if pending:
            signum, frame = pending[0]
            handler = previous[int(signum)]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


guard_imports()  # the package's ``__init__`` imports this module before anything heavy
