"""One progress mechanism for long work: a tqdm bar on a terminal, plain lines in logs, notebooks and pipes.

``progress(total, desc, unit, enabled)`` is used by text embeddings, image features, view extraction, the
trainers and the LVLM clients. Where it prints (``stream``, default ``sys.stderr``):

- **a terminal** (``stream.isatty()``): a tqdm bar, removed when the job ends (as before).
- **anything else** (a log file, a pipe, a CI job, Jupyter): plain lines, so the log says what is happening:

  - one start line saying what the job is (e.g. ``encoding 70,794 lexicon words with open_clip:ViT-B-32/openai —
    first time only, cached afterwards``);
  - progress lines ``text embeddings: 12,288/70,794 prompts (17%), 410 prompts/s, ETA 2m23s``, at most one per
    :data:`LINE_FRACTION` of the job *and* at least :data:`LINE_SECONDS` apart (so at most ~10 lines however
    long the job);
  - one done line ``text embeddings: done, 70,794 prompts in 2m53s`` (or ``stopped at ...`` when the job
    ends on an exception or Ctrl-C).

``enabled``: ``False`` prints nothing; ``True`` always shows the job (start line at once, or a bar at once);
``None`` (automatic, the default everywhere) keeps small jobs quiet: **a job is shown only once it has run for
:data:`QUIET_SECONDS` (10 s), or as soon as an update predicts it will take :data:`LONG_SECONDS` (30 s) or more**
(the rate measured from the first update on, so a slow warm-up batch does not count). Its start line is then
printed late, once, followed by progress and done lines as above;
a job that ends sooner prints nothing at all, so test suites and small CLI runs stay quiet. On a terminal the
automatic bar appears after :data:`TTY_DELAY` seconds (tqdm's ``delay``).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

QUIET_SECONDS = 10.0
"""Automatic mode, not a terminal: a job is announced once it has been running this long (seconds)..."""
LONG_SECONDS = 30.0
"""... or as soon as an update predicts that the whole job takes at least this long (seconds)."""
LINE_SECONDS = 10.0
"""Progress lines are at least this many seconds apart..."""
LINE_FRACTION = 0.1
"""... and at least this fraction of the job apart."""
TTY_DELAY = 2.0
"""Automatic mode on a terminal: the tqdm bar appears once the job has run this long (seconds)."""


def duration(seconds: float) -> str:
    """``seconds`` as ``"4.2s"``, ``"2m05s"`` or ``"1h02m"``."""
    s = max(0.0, float(seconds))
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except Exception:  # closed or odd streams (a notebook's, a test's): not a terminal
        return False


class progress:
    """Progress of one job of ``total`` units (see the module docstring for what is printed and when).

    Args:
        total: units of work (prompts, images, steps); ``initial`` of them already done (a resumed run).
        desc: short name of the job, the bar's label and the prefix of progress and done lines.
        unit: what a unit is, plural (``"prompts"``, ``"images"``, ``"steps"``).
        enabled: ``False`` silent, ``True`` always shown, ``None`` shown when the job is long (automatic).
        start: the start line (default ``"{desc}: {total} {unit}"``).
        stream: where to write (default ``sys.stderr`` at creation time).
        clock: seconds as a float (default ``time.monotonic``; tests pass a fake clock).

    Use as a context manager (``with progress(...) as p: ... p.update(n)``) or call :meth:`close`.
    """

    def __init__(self, total: int, desc: str, unit: str = "items", enabled: bool | None = None, *,
                 start: str | None = None, initial: int = 0, stream: TextIO | None = None,
                 clock: Callable[[], float] | None = None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._n0 = int(initial)
        self.enabled = enabled
        self.start_line = start if start is not None else f"{desc}: {self.total:,} {unit}"
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.postfix = ""
        self._t0 = self.clock()
        self._bar = None
        self._announced = False
        self._first: tuple[float, int] | None = None  # (time, units done) at the first update
        self._closed = enabled is False or self.total <= 0
        self._last_t, self._last_n = self._t0, self.n
        if self._closed:
            return
        if _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, initial=self.n, leave=False, file=self.stream,
                             delay=0 if enabled else TTY_DELAY, dynamic_ncols=True)
        elif enabled:
            self._announce()

    # ------------------------------------------------------------------ plain lines
    def _print(self, line: str) -> None:
        try:
            try:
                print(line, file=self.stream, flush=True)
            except UnicodeEncodeError:  # an ASCII-only stream: the line still goes out, with "?" for the dash
                enc = getattr(self.stream, "encoding", None) or "ascii"
                print(line.encode(enc, "replace").decode(enc), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream never stops the work
            self._closed = True

    def _announce(self) -> None:
        self._announced = True
        self._last_t, self._last_n = self.clock(), self.n
        self._print(self.start_line)

    def _suffix(self) -> str:
        return f" ({self.postfix})" if self.postfix else ""

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += int(n)
        if self._closed:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        elapsed = now - self._t0
        done = self.n - self._n0
        if not self._announced:
            if self._first is None:
                self._first = (now, self.n)
            t1, n1 = self._first  # the rate is measured after the first update: it excludes warm-up
            predicted = elapsed + (now - t1) / (self.n - n1) * (self.total - self.n) if self.n > n1 else 0.0
            if self.enabled is None and (elapsed >= QUIET_SECONDS or predicted >= LONG_SECONDS):
                self._announce()
            else:
                return
        if (self.n < self.total and now - self._last_t >= LINE_SECONDS
                and self.n - self._last_n >= LINE_FRACTION * self.total):
            self._last_t, self._last_n = now, self.n
            rate = done / elapsed if elapsed > 0 else 0.0
            eta = f", ETA {duration((self.total - self.n) / rate)}" if rate > 0 else ""
            self._print(f"{self.desc}: {self.n:,}/{self.total:,} {self.unit} ({100 * self.n / self.total:.0f}%), "
                        f"{rate:,.1f} {self.unit}/s{eta}{self._suffix()}")

    def set_postfix(self, **values: Any) -> None:
        """Extra state (``loss=0.41, epoch="3/50"``) shown on the bar, and after progress and done lines."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self, failed: bool = False) -> None:
        """End the job: the bar is removed; an announced job prints its done (or ``stopped``) line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            return
        if self._announced:
            took = duration(self.clock() - self._t0)
            if failed or self.n < self.total:
                self._print(f"{self.desc}: stopped at {self.n:,}/{self.total:,} {self.unit} after {took}"
                            f"{self._suffix()}")
            else:
                self._print(f"{self.desc}: done, {self.n:,} {self.unit} in {took}{self._suffix()}")

    def __enter__(self) -> "progress":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(failed=exc_type is not None)
