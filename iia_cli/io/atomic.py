"""Atomic file writes: a temporary file next to the target, then a rename. An interrupted run (SIGTERM,
preemption) leaves either the old file or the new one, never a partial one.

Temporary files are named ``.<target>.iia-<host>-<pid>-<random>.tmp``. A SIGKILL during a write can leave
one behind; :func:`remove_stale_temps` (called when a command checks its output locations) deletes those
whose writer is gone: a process of this host that no longer runs, or any writer after six hours.
Final results can be written with ``rescue=True``: if the target cannot be written at the end of a run
(disk full, directory removed meanwhile), the data go to ``./iia-rescued/`` (else the system temporary
directory) and the error says where, so that no computation is lost.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from iia_cli.runtime.errors import IIARuntimeError

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
# .<target>.iia-<host>-<pid>-<mkstemp random>.tmp
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.iia-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
# the naming of earlier versions: .<target>.<8 random characters>.tmp
_LEGACY_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp$")
OTHER_HOST_STALE_S = 6 * 3600.0
LEGACY_STALE_S = 60.0


class OutputRescued(IIARuntimeError):
    """A final result could not be written where asked and was saved elsewhere (exit code 1)."""

    def __init__(self, msg: str, rescued: Path | None) -> None:
        super().__init__(msg)
        self.rescued = rescued


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    return f".{path.name}.iia-{_HOST}-{os.getpid()}-"


def _write_via_temp(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def rescue_path(path: Path, directory: Path) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return directory / f"{path.stem}.{stamp}-{os.getpid()}{path.suffix}"


def rescue_dirs(path: Path) -> list[Path]:
    """Where results that cannot be written to ``path`` go instead: ./iia-rescued, then $TMPDIR/iia-rescued."""
    out = []
    for base in (Path.cwd(), Path(tempfile.gettempdir())):
        d = (base / "iia-rescued").absolute()
        if d not in out:
            out.append(d)
    return out


def atomic_write(path: str | Path, write: Callable[[Path], None], rescue: bool = False, what: str = "results") -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``.

    With ``rescue``, an OSError writes the data to a rescue file instead and raises :class:`OutputRescued`
    naming both paths (the run's work is kept)."""
    path = Path(path)
    try:
        return _write_via_temp(path, write)
    except OSError as exc:
        if not rescue:
            raise
        reason = exc.strerror or str(exc)
    return write_rescue_copy(path, write, reason, what)


def write_rescue_copy(path: Path, write: Callable[[Path], None], reason: str, what: str = "results",
           first: Sequence[Path] = ()) -> Path:
    """Write the data that could not go to ``path`` to a rescue file (in ``first`` directories, then
    ./iia-rescued, then $TMPDIR/iia-rescued) and raise :class:`OutputRescued` saying where."""
    dirs = [*first, *rescue_dirs(path)]
    for directory in dirs:
        target = rescue_path(path, directory)
        try:
            _write_via_temp(target, write)
        except OSError:
            continue
        raise OutputRescued(f"could not write {path} ({reason}); the {what} were saved to {target} instead",
                            target)
    raise OutputRescued(f"could not write {path} ({reason}), nor a rescue copy under "
                        f"{' or '.join(str(d) for d in dirs)}; the {what} are lost", None)


def savez_atomic(path: str | Path, rescue: bool = False, what: str = "results", **arrays: object) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy must not append ".npz" to the temporary name
            np.savez(f, **arrays)

    return atomic_write(path, write, rescue=rescue, what=what)


def write_text_atomic(path: str | Path, text: str, rescue: bool = True, what: str = "results") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text), rescue=rescue, what=what)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def is_stale_temp(entry: os.DirEntry | Path, now: float | None = None) -> bool:
    """Whether ``entry`` is a temporary file of our naming whose writer is gone."""
    name = entry.name
    m = _TEMP_RE.match(name)
    try:
        age = (now or time.time()) - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    if m:
        if m["host"] == _HOST:
            return not _alive(int(m["pid"]))
        return age > OTHER_HOST_STALE_S
    return bool(_LEGACY_TEMP_RE.match(name)) and age > LEGACY_STALE_S


def remove_stale_temps(directory: str | Path, target_prefix: str = "", depth: int = 0) -> list[Path]:
    """Delete stale temporary files (see :func:`is_stale_temp`) in ``directory`` whose target name starts
    with ``target_prefix`` (or ``.`` + it, for hidden checkpoint files), looking ``depth`` levels of
    subdirectories deep. Returns what was removed."""
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                if depth > 0:
                    removed += remove_stale_temps(entry.path, target_prefix, depth - 1)
                continue
        except OSError:
            continue
        if not entry.name.endswith(".tmp"):
            continue
        m = _TEMP_RE.match(entry.name) or _LEGACY_TEMP_RE.match(entry.name)
        if not m:
            continue
        target = m["target"]
        if target_prefix and not (target.startswith(target_prefix) or target.startswith("." + target_prefix)):
            continue
        if is_stale_temp(entry, now):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed
