"""Progress reporting: a rich bar with images/s on a terminal, plain periodic lines otherwise (SLURM logs)."""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def log(msg: str) -> None:
    """A log line on stderr (results go to stdout); only rank 0 logs under torchrun."""
    from .dist import context

    if context().is_main:
        console.print(msg, highlight=False, markup=False, soft_wrap=True)


class ImageProgress:
    """``with ImageProgress(total, "sampling") as p: p.advance(n)``."""

    def __init__(self, total: int, description: str, log_every_s: float = 30.0, enabled: bool = True) -> None:
        self.total, self.description, self.log_every_s = total, description, log_every_s
        self.done = 0
        from .dist import context

        self.enabled = enabled and context().is_main
        self.tty = enabled and sys.stderr.isatty()
        self._bar: Progress | None = None
        self._start = self._last_log = time.perf_counter()

    def __enter__(self) -> ImageProgress:
        self._start = self._last_log = time.perf_counter()
        if self.tty:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, rate="")
        return self

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self._start, 1e-9)

    def advance(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=f"{self.rate():.1f} img/s")
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_log >= self.log_every_s or self.done >= self.total:
                self._last_log = now
                log(f"{self.description}: {self.done}/{self.total} images, {self.rate():.1f} img/s")

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
