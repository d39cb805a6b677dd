"""Progress reporting for every long step: a rich bar with rate and ETA on a terminal; plain log lines
otherwise (SLURM logs, pipes): one when the step starts, then one every ``IIA_PROGRESS_EVERY_S`` seconds
(default 20, so that no stretch reaches 30 s: a due line waits for the step in flight) with the rate and the
ETA, and one when it ends."""

from __future__ import annotations

import atexit
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_UNIT_SHORT = {"images": "img", "steps": "step", "calls": "call"}
_live: Progress | None = None  # one live display at a time: nested steps (a reference solve inside sampling) share it
_live_tasks = 0


def log(msg: str) -> None:
    """A log line on stderr (results go to stdout); only rank 0 logs under torchrun."""
    from .dist import context

    if context().is_main:
        console.print(msg, highlight=False, markup=False, soft_wrap=True)


def progress_every_s() -> float:
    """Seconds between plain progress lines (env ``IIA_PROGRESS_EVERY_S``, default 20; a bad value is a
    ConfigError)."""
    from .envvars import progress_every_s as read

    return read()


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h07m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@atexit.register
def _stop_live() -> None:
    global _live, _live_tasks
    if _live is not None:
        _live.stop()
    _live, _live_tasks = None, 0


class ImageProgress:
    """``with ImageProgress(total, "sampling") as p: p.advance(n)`` (or ``p.update_to(done)`` from a callback
    that reports a running count). ``unit``: what is counted (images, steps, ...); ``total`` None: unknown."""

    def __init__(self, total: int | None, description: str, log_every_s: float | None = None, enabled: bool = True,
                 unit: str = "images") -> None:
        from .dist import context

        self.total, self.description, self.unit = total, description, unit
        self.log_every_s = progress_every_s() if log_every_s is None else log_every_s
        self.done = 0
        self._base = 0  # work done before this process started (a resumed run): not part of the rate
        self.enabled = enabled and context().is_main and total != 0
        self.tty = self.enabled and sys.stderr.isatty()
        self._task: int | None = None
        self._open = False
        self._lines = 0  # periodic lines logged
        self._start = self._last_log = time.perf_counter()

    def __enter__(self) -> ImageProgress:
        global _live, _live_tasks
        self._start = self._last_log = time.perf_counter()
        self._open = True
        if self.tty:
            if _live is None:
                _live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=True)
                _live.start()
            _live_tasks += 1
            self._task = _live.add_task(self.description, total=self.total, rate="")
        elif self.enabled:
            log(f"{self.description}: started, {self.total if self.total is not None else '?'} {self.unit}")
        return self

    def resume(self, n: int) -> None:
        """Count ``n`` units done by an earlier, interrupted run (shown, but not part of the rate)."""
        self._base += n
        self.done += n
        if self._task is not None and _live is not None:
            _live.update(self._task, completed=self.done)

    def rate(self) -> float:
        """Units per second since the start (without resumed work)."""
        return (self.done - self._base) / max(time.perf_counter() - self._start, 1e-9)

    def rate_text(self) -> str:
        r, short = self.rate(), _UNIT_SHORT.get(self.unit, self.unit)
        if r <= 0:
            return ""
        return f"{r:.1f} {short}/s" if r >= 1 else f"{1 / r:.1f} s/{short}"

    def eta(self) -> float | None:
        r = self.rate()
        return (self.total - self.done) / r if self.total is not None and r > 0 else None

    def update_to(self, done: int) -> None:
        """Set the running count (for callbacks that report how many units are done so far)."""
        self.advance(done - self.done)

    def advance(self, n: int) -> None:
        self.done += n
        if not self._open:
            return
        if self.total is not None and self.done >= self.total:
            self.close()
        elif self._task is not None and _live is not None:
            _live.update(self._task, completed=self.done, rate=self.rate_text())
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_log >= self.log_every_s:
                self._last_log, self._lines = now, self._lines + 1
                eta = self.eta()
                of = f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total else f" {self.unit}"
                log(f"{self.description}: {self.done}{of}, {self.rate_text() or '-'}"
                    + (f", ETA {duration(eta)}" if eta is not None else ""))

    def in_batch(self, size: int, fraction: float) -> None:
        """A heartbeat from inside a batch of ``size`` units, ``fraction`` of it done: the bar moves, and a
        plain log gets a line when ``log_every_s`` passed since the last one (no silence during long batches)."""
        if not self._open or not self.enabled:
            return
        if self._task is not None and _live is not None:
            _live.update(self._task, completed=self.done + size * fraction)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s and self.log_every_s > 0:
            self._last_log, self._lines = now, self._lines + 1
            of = f"/{self.total} {self.unit}" if self.total else f" {self.unit}"
            log(f"{self.description}: {self.done}{of} done, the next {size} at {100 * fraction:.0f}% of their steps")

    def close(self, completed: bool = True) -> None:
        """End the bar (or log the final line); called by ``__exit__``, or by ``advance`` at the total."""
        global _live_tasks
        if not self._open:
            return
        self._open = False
        if self._task is not None and _live is not None:
            _live.remove_task(self._task)
            self._task = None
            _live_tasks -= 1
            if _live_tasks <= 0:
                _stop_live()
        elif self.enabled and completed and (self._lines or not self.log_every_s
                                             or time.perf_counter() - self._start >= 1.0):
            log(f"{self.description}: {self.done} {self.unit} in {duration(time.perf_counter() - self._start)}"
                + (f" ({self.rate_text()})" if self.rate_text() else ""))

    def __del__(self) -> None:  # a step abandoned by an exception (no ``with``) leaves no stale bar behind
        try:
            self.close(completed=False)
        except Exception:  # noqa: BLE001 -- never raise from a finaliser (interpreter shutdown)
            pass

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close(completed=et is None)
