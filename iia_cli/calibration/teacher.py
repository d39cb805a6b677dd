"""The teacher: a high-accuracy solve through the coarse sigmas, whose states the guard, the trajectory target
and the end-to-end checks compare against; and the cache that shares its trajectories across methods of one grid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from iia_cli.core.grids import subdivide
from iia_cli.core.methods import Method
from iia_cli.core.sampling import BoundDenoiser, advance
from iia_cli.core.solvers.base import History
from iia_cli.core.solvers.registry import make_solver, teacher_name
from iia_cli.models.base import Denoiser, capabilities
from iia_cli.runtime.errors import ConfigError


@dataclass(frozen=True)
class Teacher:
    """A high-accuracy solve through the coarse sigmas: ``substeps`` steps of a base solver per coarse interval,
    uniform in lambda = -log sigma (uniform in sigma on the last interval when it ends at 0), or ``exact``: the
    model's closed-form probability-flow solution (``model.exact_solution``, e.g. the Gaussian test model)."""

    name: str = "edm"
    substeps: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", teacher_name(self.name, self.substeps))

    @property
    def tag(self) -> str:
        return "exact" if self.name == "exact" else f"{self.name}{self.substeps}"

    def check(self, model: Denoiser) -> None:
        if self.name == "exact" and capabilities(model).exact_solution is None:
            raise ConfigError("calibration.teacher=exact needs a model with a closed-form solution "
                              "(exact_solution, e.g. model.kind=gaussian); use calibration.teacher=edm")

    def run(self, model: Denoiser, denoise: Any, x: torch.Tensor, history: History, s0: float,
            s1: float) -> tuple[torch.Tensor, History]:
        """The teacher from state x at sigma s0 to s1 (its own history carried along)."""
        if self.name == "exact":
            return model.exact_solution(x, s0, s1).to(x.dtype), history
        method = Method(self.name, make_solver(self.name))
        sub = subdivide(s0, s1, self.substeps, "lambda")
        for j in range(self.substeps):
            x, history, _ = advance(method, denoise, x, sub, j, history)
        return x, history


def teacher_trajectory(teacher: Teacher, model: Denoiser, sig: torch.Tensor, chunks: list[list[int]],
                       starts: list[torch.Tensor], labels: list[torch.Tensor | None],
                       class_label: int | None = None, done: dict[int, list[torch.Tensor]] | None = None,
                       done_calls: int = 0, on_chunk: Callable[[int, list[torch.Tensor], int], None] | None = None
                       ) -> tuple[list[list[torch.Tensor]], int]:
    """The teacher's states at every coarse sigma (``[step][chunk]``, step 0 = the noise) and its denoiser calls
    per noise, solved now (:class:`TeacherCache` keeps them for reuse). ``done``: the states (steps 1..n) of
    chunks an interrupted run solved (``done_calls`` calls per noise), taken as they are; ``on_chunk(k, states,
    calls)`` hears of each chunk solved now (the calibration checkpoint)."""
    states: list[list[torch.Tensor]] = [list(starts)] + [[] for _ in range(len(sig) - 1)]
    done = done or {}
    calls = done_calls if done else 0
    from iia_cli.runtime.progress import ImageProgress

    per = f"; {len(sig) - 1} coarse steps x {len(starts)} chunks" if len(starts) > 1 else ""  # what the count counts
    bar = ImageProgress(len(starts) * (len(sig) - 1), f"teacher {teacher.tag} ({sum(map(len, chunks))} noises{per})",
                        unit="steps").__enter__()  # ends itself after the last step
    if done:
        bar.resume(len(done) * (len(sig) - 1))
    for k, x in enumerate(starts):
        if k in done:
            for i in range(len(sig) - 1):
                states[i + 1].append(done[k][i])
            continue
        den, hist = BoundDenoiser(model, labels[k]), ()
        for i in range(len(sig) - 1):
            x, hist = teacher.run(model, den, x, hist, float(sig[i]), float(sig[i + 1]))
            states[i + 1].append(x)
            bar.advance(1)
        calls = calls or den.calls
        if on_chunk is not None:
            on_chunk(k, [states[i + 1][k] for i in range(len(sig) - 1)], den.calls)
    return states, calls


class TeacherCache:
    """The teacher's trajectories of the last ``size`` (model, grid, noises, teacher), so that calibrating several
    methods or targets on one grid (``iia evaluate``, the benchmarks) solves the teacher once.

    Keyed by the model's fingerprint (``Prepared.fingerprint``: checkpoint bytes and adapter settings), never by
    the Python object: ``id()`` is reused after garbage collection, and a model loaded later at the same address
    would get the first model's states. The rest of the key is what the states depend on: the teacher (solver,
    sub-steps), the exact sigmas, the noises (seeds in chunk order, dtype, device) and the class label."""

    def __init__(self, size: int = 4) -> None:
        if size < 1:
            raise ValueError(f"TeacherCache size={size} must be at least 1")
        self.size = size
        self._entries: dict[tuple, tuple[list[list[torch.Tensor]], int]] = {}
        self.solves = 0  # trajectories computed (not found), for tests and logs

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def key(fingerprint: str, teacher: Teacher, sig: torch.Tensor, chunks: list[list[int]],
            starts: list[torch.Tensor], class_label: int | None) -> tuple:
        if not fingerprint:
            raise ValueError("TeacherCache needs the model's fingerprint")
        return (fingerprint, teacher.name, teacher.substeps, sig.to(torch.float64).cpu().numpy().tobytes(),
                tuple(map(tuple, chunks)), str(starts[0].dtype), str(starts[0].device), class_label)

    def trajectory(self, fingerprint: str, teacher: Teacher, model: Denoiser, sig: torch.Tensor, chunks: list[list[int]],
                   starts: list[torch.Tensor], labels: list[torch.Tensor | None],
                   class_label: int | None = None, done: dict[int, list[torch.Tensor]] | None = None,
                   done_calls: int = 0, on_chunk: Callable[[int, list[torch.Tensor], int], None] | None = None
                   ) -> tuple[list[list[torch.Tensor]], int]:
        """:func:`teacher_trajectory` of ``model`` (whose fingerprint is ``fingerprint``), solved once per key
        (``done``, ``done_calls``, ``on_chunk``: a calibration checkpoint's, passed on when it is solved)."""
        key = self.key(fingerprint, teacher, sig, chunks, starts, class_label)
        if key in self._entries:
            self._entries[key] = self._entries.pop(key)  # most recently used last
            return self._entries[key]
        value = teacher_trajectory(teacher, model, sig, chunks, starts, labels, class_label, done, done_calls,
                                   on_chunk)
        self.solves += 1
        while len(self._entries) >= self.size:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = value
        return value
