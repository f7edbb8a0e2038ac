"""Graceful SIGTERM for long runs: turn the signal into an exception while work is in progress, so that what was
computed is flushed to the cache, then end the process as the signal's default action would.

Used by :func:`vlmood.extract_features` and the text-embedding engine; it imports nothing else from vlmood, so
every layer can use it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any, Iterator


class _Signalled(BaseException):
    """SIGTERM (or a SIGINT without Python's handler) during extraction: unwinds so that the features computed
    so far are flushed; :func:`extract_features` then ends the process as the signal's default action would."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """While extracting, turn SIGTERM (and SIGINT when it has no handler) into :class:`_Signalled`.

    Only in the main thread, and only for signals whose disposition is the default action: a handler installed
    by the application is left alone (if it raises, the flush runs anyway). The previous disposition is
    restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def unwind(signum: int, frame: Any) -> None:
        raise _Signalled(signum)

    installed = [sig for sig in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(sig) is signal.SIG_DFL]
    for sig in installed:
        signal.signal(sig, unwind)
    try:
        yield
    finally:
        for sig in installed:
            signal.signal(sig, signal.SIG_DFL)


def _die_of(signum: int) -> None:
    """End the process as the default action of ``signum`` would (its handler is the default again)."""
    os.kill(os.getpid(), signum)
    time.sleep(1.0)  # the signal is normally delivered before kill() returns
    raise SystemExit(128 + signum)
