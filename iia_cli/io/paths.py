"""Output locations, checked before any computation.

Every command checks each place it will write (``--out``, ``--grid-png``, ``--csv``, ``--plot``, the
coefficient directory, ...) with one :class:`OutputPlan` before it loads a model or samples an image, so
that a bad path costs a second, not the run. A file target must not be a directory or a device
(``/dev/full``), its parent must be a directory or creatable, and the directory must accept a new file
(``/proc``, read-only mounts, missing permissions); a directory target must not be a file. Directories the
plan will create and that are still empty when the command fails are removed again.

Problems with what the user gave (a directory where a file goes, a file where a directory goes, a wrong
suffix) are :class:`ConfigError` (exit 2); the operating system refusing a write is
:class:`IIARuntimeError` (exit 1).
"""

from __future__ import annotations

import contextlib
import csv as _csv
import errno
import os
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from iia_cli.runtime.errors import ConfigError, IIARuntimeError

from .atomic import remove_stale_temps, temp_prefix

LOCK_TIMEOUT_S = 600.0


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _label(option: str, path: Path) -> str:
    return f"{option} {path}" if option else str(path)


def _nearest_existing(path: Path) -> tuple[Path, list[Path]]:
    """The nearest ancestor of ``path`` (itself included) that exists, and the missing ones below it."""
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    return p, missing


def _kind(path: Path) -> str:
    return "a symbolic link that leads nowhere" if path.is_symlink() and not path.exists() else "a file"


def _probe_dir(directory: Path, option: str, path: Path, name: str) -> None:
    """Create and delete a file in ``directory``: the only check that root, /proc and read-only mounts obey."""
    probe = directory / f"{temp_prefix(Path(name))}probe.tmp"  # as long as the temporary names of atomic writes
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise ConfigError(f"{_label(option, path)}: the file name is too long") from None
        raise IIARuntimeError(f"cannot write {_label(option, path)}: {directory} does not accept new files "
                              f"({_reason(exc)}); choose another location") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _check_parent(path: Path, option: str, what: str) -> list[Path]:
    """The directory that will hold ``path`` exists or can be created; returns the directories to create."""
    parent = path.parent
    existing, missing = _nearest_existing(parent)
    if not existing.is_dir():
        raise ConfigError(f"{_label(option, path)}: {existing} is {_kind(existing)}, not a directory; "
                          f"choose a {what} inside a directory")
    _probe_dir(existing, option, path, path.name)
    return missing


def _check_not_special(path: Path, option: str, what: str, example: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a dangling symlink: the rename replaces the link
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{_label(option, path)} is a directory; give a {what} path (e.g. {path / example})")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{_label(option, path)} is not a regular file (a device, pipe or socket); "
                          f"give a {what} path")


class OutputPlan:
    """The output locations of one command, checked up front (see the module docstring).

    Use as a context manager around the command's work: directories that the checks found missing and
    that are empty when the work fails are removed."""

    def __init__(self) -> None:
        self.to_create: list[Path] = []  # directories that do not exist yet, deepest first per entry

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.remove_empty_created()

    def remove_empty_created(self) -> None:
        for d in sorted(set(self.to_create), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty

    def file(self, path: str | Path | None, option: str = "", what: str = "file",
             suffixes: Sequence[str] = (), example: str = "") -> Path | None:
        """A file that the run will write (atomically, by rename)."""
        if path is None:
            return None
        path = Path(path)
        if suffixes and path.suffix.lower() not in suffixes:
            raise ConfigError(f"{_label(option, path)}: the {what} must end in {' or '.join(suffixes)}")
        _check_not_special(path, option, what, example or f"out{suffixes[0] if suffixes else path.suffix}")
        self.to_create += _check_parent(path, option, what)
        remove_stale_temps(path.parent, path.stem)
        return path

    def directory(self, path: str | Path | None, option: str = "", what: str = "directory",
                  clean_depth: int = 0) -> Path | None:
        """A directory that the run will write files into (created when missing)."""
        if path is None:
            return None
        path = Path(path)
        existing, missing = _nearest_existing(path)
        if existing == path and not existing.is_dir():
            hint = " (an .npz output must end in .npz)" if what == "PNG directory" else ""
            raise ConfigError(f"{_label(option, path)} exists and is not a directory{hint}; give a {what} path")
        if not existing.is_dir():
            raise ConfigError(f"{_label(option, path)}: {existing} is {_kind(existing)}, not a directory; "
                              f"give a {what} path")
        _probe_dir(existing, option, path, path.name)
        self.to_create += missing
        if not missing:
            remove_stale_temps(path, "", depth=clean_depth)
        return path

    def csv(self, path: str | Path | None, option: str = "--csv", columns: Sequence[str] | None = None) -> Path | None:
        """A results CSV that the run appends to (beside it, the ``.lock`` file of concurrent appends)."""
        if path is None:
            return None
        path = Path(path)
        self.file(path, option, "CSV file", example="results.csv")
        lock = Path(str(path) + ".lock")
        if os.path.isdir(lock):
            raise ConfigError(f"{lock} (the lock file of {_label(option, path)}) is a directory; remove it")
        if path.is_file():
            try:
                with path.open("a"):
                    pass  # opening for append changes nothing
                if columns is not None and path.stat().st_size > 0:
                    with path.open(newline="") as f:
                        header = next(_csv.reader(f), [])
                    if header != list(columns):
                        raise ConfigError(f"{_label(option, path)} has other columns than this tool writes; "
                                          f"give a new file with --csv")
            except OSError as exc:
                raise IIARuntimeError(f"cannot append to {_label(option, path)} ({_reason(exc)})") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{_label(option, path)} is not a text CSV; give a new file with --csv") from None
        return path


@contextlib.contextmanager
def csv_lock(path: str | Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """The exclusive lock ``<csv>.lock`` of concurrent appends. A lock file that cannot be created fails at
    once (one line); a lock held by another process longer than ``timeout`` seconds fails with its name."""
    from filelock import FileLock, Timeout

    lock = str(path) + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise IIARuntimeError(f"cannot create the lock file {lock} of {path} ({_reason(exc)})") from None
    t0 = time.monotonic()
    try:
        with FileLock(lock, timeout=timeout):
            yield
    except Timeout:
        raise IIARuntimeError(f"the lock {lock} was held by another process for {time.monotonic() - t0:.0f} s; "
                              f"remove it if no other iia process writes {path}") from None


PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg", ".eps", ".ps", ".tif", ".tiff", ".webp")
