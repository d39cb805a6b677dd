"""Checkpoints of an interrupted IIA calibration: the teacher's states, the greedy pass's progress and the
guard's and the end-to-end validation's errors, so that rerunning the same command continues where it stopped
and writes the coefficient file of an uninterrupted run, bit for bit.

A checkpoint is a directory ``results/cache/partial/calibration-<key>-r<rank>of<world>/`` (``key``: a hash of the
calibration's full identity, :func:`identity_key`), holding one ``.npz`` per part (``fit-teacher-c0``, ``fit``,
``guard``, ``val-teacher-c0``, ``val``, ``val-end``), each written atomically and read with
``allow_pickle=False``: arrays of the states plus a JSON ``meta`` string that repeats the identity. A part is
kept in memory when it is reached and written when ``IIA_CHECKPOINT_EVERY_S`` seconds have passed since the last
write, and on any exception (Ctrl-C, SIGTERM, a crash). A directory that cannot be read, or that holds another
identity, is a warning and a fresh start; the directory is removed once the coefficient file is written.

A solver's history (a tuple of frozen record dataclasses, :mod:`iia_cli.core.solvers.base`) is stored field by field:
tensors as arrays, numbers in the JSON, the record's class by name among the known ``StepRecord`` subclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iia_cli.core.solvers import registry  # noqa: F401 -- loads every solver's module: _record_types knows each record
from iia_cli.core.solvers.base import History, StepRecord
from iia_cli.io.atomic import savez_atomic
from iia_cli.runtime import dist

CHECKPOINT_FORMAT = 1
LogFn = Callable[[str], None]


def identity_key(identity: dict[str, Any]) -> str:
    """A short hash of a calibration's identity (the checkpoint directory's name)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _canonical(identity: dict[str, Any]) -> Any:
    """The identity as it reads back from JSON (tuples become lists), for comparing with a stored one."""
    return json.loads(json.dumps(identity, sort_keys=True, default=str))


class CalibrationCheckpoint:
    """The checkpoint of one calibration (one process): parts read at the start (:meth:`get`), parts reached
    since (:meth:`put`), written every ``every`` seconds and by :meth:`flush`. ``directory`` None: no
    checkpoints (everything is computed, nothing is written)."""

    def __init__(self, directory: Path | None, identity: dict[str, Any], every: float = 30.0,
                 log: LogFn | None = None) -> None:
        self.directory = directory
        self.identity = _canonical(identity)
        self.every = every
        self.log = log or (lambda m: None)
        self.loaded: dict[str, dict[str, Any]] = {}  # part -> {"meta": dict, array name: np.ndarray}
        self._pending: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._last = time.perf_counter()
        self._start = time.perf_counter()
        self.elapsed_before = 0.0  # seconds the interrupted runs spent
        self.enabled = directory is not None
        if self.enabled:
            self._read()

    @classmethod
    def off(cls) -> CalibrationCheckpoint:
        return cls(None, {})

    def _read(self) -> None:
        assert self.directory is not None
        if not self.directory.is_dir():
            return
        parts: dict[str, dict[str, Any]] = {}
        try:
            for f in sorted(self.directory.glob("*.npz")):
                with np.load(f, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                meta = json.loads(str(arrays.pop("meta")))
                if not isinstance(meta, dict) or meta.get("identity") != self.identity or meta.get("part") != f.stem:
                    raise ValueError(f"{f.name} belongs to another calibration")
                parts[f.stem] = {"meta": meta, **arrays}
            elapsed = max((float(p["meta"].get("elapsed", 0.0)) for p in parts.values()), default=0.0)
        except Exception as exc:  # noqa: BLE001 (a damaged file: OSError, ValueError, BadZipFile, EOFError, ...)
            self.discard(exc)
            return
        self.loaded, self.elapsed_before = parts, elapsed

    def discard(self, exc: BaseException) -> None:
        """Give up the checkpoint read (a part that cannot be used): a warning; what is not restored yet is
        computed afresh."""
        msg = " ".join(str(exc).split())[:200]
        self.log(f"warning: the calibration checkpoint {self.directory} cannot be used ({type(exc).__name__}: {msg});"
                 " starting the calibration afresh")
        self.loaded = {}
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def elapsed(self) -> float:
        """Seconds of this calibration so far, the interrupted runs' included."""
        return self.elapsed_before + time.perf_counter() - self._start

    def get(self, part: str) -> dict[str, Any] | None:
        """A part read from the checkpoint (``meta`` and arrays), or None."""
        return self.loaded.get(part)

    def put(self, part: str, arrays: dict[str, Any], meta: dict[str, Any] | None = None,
            collective: bool = True) -> None:
        """Record a part reached now (tensors are converted when written) and write the pending parts when the
        checkpoint interval has passed. Under torchrun the decision to write is taken together, so that the
        processes' checkpoints stay at the same point: every process reaches a ``collective`` point at the same
        time; a point of one process only (a teacher chunk: each has its own) is written with the next one."""
        if not self.enabled:
            return
        self._pending[part] = (arrays, dict(meta or {}))
        due = time.perf_counter() - self._last >= self.every
        if dist.context().distributed:
            if not collective:
                return
            due = dist.all_reduce_floats(float(due))[0] > 0
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the parts reached since the last write (also called on an exception)."""
        if not self.enabled or not self._pending:
            return
        assert self.directory is not None
        try:
            for part, (arrays, meta) in list(self._pending.items()):
                meta = {**meta, "identity": self.identity, "part": part, "elapsed": self.elapsed,
                        "format": CHECKPOINT_FORMAT}
                out = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                       for k, v in arrays.items()}
                savez_atomic(self.directory / f"{part}.npz", meta=np.asarray(json.dumps(meta)), **out)
                del self._pending[part]
        except OSError as exc:
            self.log(f"warning: could not write the calibration checkpoint {self.directory} "
                     f"({exc.strerror or exc}); calibrating on without checkpoints, so an interruption now "
                     "restarts from the last checkpoint written")
            self.enabled = False
        self._last = time.perf_counter()

    def remove(self) -> None:
        """Delete the checkpoint (after the coefficient file is written, or when it cannot be used)."""
        self._pending.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# Tensors and solver histories as arrays + JSON


def tensor(arrays: dict[str, Any], name: str, device: torch.device) -> torch.Tensor:
    """An array of a checkpoint part as a tensor on ``device`` (same dtype, same bits)."""
    return torch.from_numpy(np.array(arrays[name])).to(device)


# A record class is stored by the name it had when format 1 began, ``<STORED_SOLVERS_PACKAGE>.<file>.<class>``,
# whatever package the solvers live in now, so that a checkpoint written before a move of the package still resumes.
STORED_SOLVERS_PACKAGE = "iia_cli.solvers"  # stored name, not an import path


def record_name(cls: type) -> str:
    """The name a record class is stored under (see :data:`STORED_SOLVERS_PACKAGE`)."""
    package = StepRecord.__module__.rpartition(".")[0]  # the package the solvers live in
    module = cls.__module__
    if module.startswith(package + "."):
        module = STORED_SOLVERS_PACKAGE + module[len(package):]
    return f"{module}.{cls.__qualname__}"


def _record_types() -> dict[str, type[StepRecord]]:
    """Every record class by its stored name: the subclasses of StepRecord (the solvers' modules, all loaded by
    the registry's import above, define them)."""
    out: dict[str, type[StepRecord]] = {}
    todo: list[type[StepRecord]] = [StepRecord]
    while todo:
        cls = todo.pop()
        out[record_name(cls)] = cls
        todo.extend(cls.__subclasses__())
    return out


def encode_history(history: History, prefix: str) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """A history as JSON (record types and scalar fields) and tensors named ``{prefix}_{record}_{field}...``."""
    arrays: dict[str, torch.Tensor] = {}

    def enc(value: Any, name: str) -> Any:
        if isinstance(value, torch.Tensor):
            arrays[name] = value
            return {"tensor": name}
        if isinstance(value, (tuple, list)):
            return {"tuple": [enc(v, f"{name}_{j}") for j, v in enumerate(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot checkpoint a history field of type {type(value).__name__}")

    spec = []
    for j, rec in enumerate(history):
        cls = type(rec)
        spec.append({"type": record_name(cls),
                     "fields": {f.name: enc(getattr(rec, f.name), f"{prefix}_{j}_{f.name}")
                                for f in dataclasses.fields(rec)}})
    return spec, arrays


def decode_history(spec: list[dict[str, Any]], arrays: dict[str, Any], device: torch.device) -> History:
    """The history that :func:`encode_history` stored (raises ValueError on an unknown record type)."""
    types = _record_types()

    def dec(value: Any) -> Any:
        if isinstance(value, dict) and "tensor" in value:
            return tensor(arrays, value["tensor"], device)
        if isinstance(value, dict) and "tuple" in value:
            return tuple(dec(v) for v in value["tuple"])
        return value

    out = []
    for rec in spec:
        cls = types.get(rec["type"])
        if cls is None:
            raise ValueError(f"unknown solver record {rec['type']!r}")
        out.append(cls(**{k: dec(v) for k, v in rec["fields"].items()}))
    return tuple(out)
