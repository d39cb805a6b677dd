"""An interrupted calibration resumes from its checkpoint (the teacher's chunks, the greedy pass's progress, the
guard's and the validation's errors) to the coefficient file of an uninterrupted run, bit for bit, without
calling the denoiser again for what was checkpointed; a checkpoint of another config is not used, and one that
cannot be read is a warning and a fresh start.

The interruption is a model that raises KeyboardInterrupt (what Ctrl-C and SIGTERM raise) at its k-th call. The
reference run records how many model calls had been made at each checkpoint point (``CalibrationCheckpoint.put``),
so the calls a resumed run must make are known exactly: all of them minus those made by the last point reached.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from iia_cli import api
from iia_cli.calibration.checkpoint import CalibrationCheckpoint
from iia_cli.config.experiment import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


class Counting:
    """The model, counting its calls; ``stop``: raise KeyboardInterrupt instead of the call after ``stop`` calls."""

    def __init__(self, model: Any, stop: int | None = None) -> None:
        self.model, self.calls, self.stop, self.stopped = model, 0, stop, False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.stop is not None and self.calls >= self.stop:
            self.stopped = True
            raise KeyboardInterrupt
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Runner:
    """Calibrations of one config on a counting model, each with its own teacher cache (as a new process)."""

    def __init__(self, tmp_path: Path, target: str = "local", **settings: Any) -> None:
        pairs = [("model.kind", "gaussian"), ("model.shape", [1, 4, 4]), ("sampler.method", "iia-ddim"),
                 ("sampler.nfe", 6), ("calibration.samples", 8), ("calibration.val_samples", 4),
                 ("calibration.batch", 4), ("calibration.substeps", 3), ("calibration.teacher_substeps", 3),
                 ("calibration.target", target), ("calibration.out_dir", str(tmp_path / "coeffs"))]
        self.cfg = load_config(None, pairs + [(f"calibration.{k}", v) for k, v in settings.items()])
        self.base = api.prepare(self.cfg)
        self.logs: list[str] = []
        self.marks: list[int] = []  # model calls made at each checkpoint point (filled while ``marking``)

    def run(self, stop: int | None = None, kill: bool = False, monkeypatch: Any = None,
            marking: bool = False) -> tuple[Counting, dict[str, Any] | None]:
        """One calibration; ``stop``: interrupted at that call (``kill``: like SIGKILL, nothing written after it).
        Returns the model and the coefficient file's content (None when interrupted)."""
        model = Counting(self.base.model, stop)
        if monkeypatch is not None:
            real_put, real_flush = CalibrationCheckpoint.put, CalibrationCheckpoint.flush

            def put(ck: CalibrationCheckpoint, *args: Any, **kwargs: Any) -> None:
                if marking:
                    self.marks.append(model.calls)
                real_put(ck, *args, **kwargs)

            def flush(ck: CalibrationCheckpoint) -> None:
                if not (kill and model.stopped):
                    real_flush(ck)

            monkeypatch.setattr(CalibrationCheckpoint, "put", put)
            monkeypatch.setattr(CalibrationCheckpoint, "flush", flush)
        p = api.prepare(self.cfg, model=model, fingerprint=self.base.fingerprint, memo=api.ModelMemo())
        self.logs = []
        try:
            _, path = api.calibrate(self.cfg, prepared=p, log=self.logs.append, verbose=False)
        except KeyboardInterrupt:
            assert stop is not None and model.stopped
            return model, None
        return model, json.loads(path.read_text())


def _content(data: dict[str, Any]) -> str:
    """A coefficient file without its creation time and timing, as exact text (floats by repr)."""
    return json.dumps({k: v for k, v in data.items() if k not in ("created", "calibration_seconds")}, sort_keys=True)


def _checkpoints(root: Path) -> list[Path]:
    return sorted((root / "results" / "cache" / "partial").glob("calibration-*"))


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("IIA_HOME", raising=False)
    monkeypatch.delenv("IIA_CHECKPOINT_EVERY_S", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# Where to interrupt, as (checkpoint point, fraction of the way to the next one): the points of the reference run
# are, in order: 2 teacher chunks (0, 1), 6 greedy steps (2-7), the guard's base and 4 alphas (8-12), 1 held-out
# teacher chunk (13), 6 validation steps (14-19) and the held-out base error (20).
PLACES = {"teacher": 0, "greedy pass": 4, "guard": 10, "validation": 16}


@pytest.mark.parametrize("target", ["local", "trajectory"])
@pytest.mark.parametrize("where", list(PLACES))
def test_interrupted_calibration_resumes_to_the_same_file(here, monkeypatch, target, where):
    runner = Runner(here, target)
    full, reference = runner.run(monkeypatch=monkeypatch, marking=True)
    assert reference is not None and not _checkpoints(here)  # removed once the file is written
    total, marks = full.calls, runner.marks
    assert len(marks) == 21, marks  # the points listed above PLACES
    point = PLACES[where]
    stop = (marks[point] + marks[point + 1]) // 2 + 1  # during the work after that point
    assert marks[point] < stop <= marks[point + 1]

    first, out = runner.run(stop, monkeypatch=monkeypatch)
    assert out is None and first.calls == stop and len(_checkpoints(here)) == 1
    again, resumed = runner.run(monkeypatch=monkeypatch)
    assert resumed is not None and _content(resumed) == _content(reference)
    assert resumed["calibration_calls"] == reference["calibration_calls"]
    done = max(m for m in marks if m <= stop)
    assert again.calls == total - done  # nothing checkpointed is computed again
    assert any(line.startswith("resuming calibration of iia-ddim nfe=6: ") for line in runner.logs), runner.logs
    assert not _checkpoints(here)


@pytest.mark.parametrize("every", [None, "0"])
def test_a_killed_calibration_resumes_from_its_periodic_checkpoint(here, monkeypatch, every):
    """Like SIGKILL (no write at the interruption): with IIA_CHECKPOINT_EVERY_S=0 every point reached was written,
    with the default 30 s none was (a fast calibration), and both resume to the same file."""
    runner = Runner(here)
    full, reference = runner.run(monkeypatch=monkeypatch, marking=True)
    marks = runner.marks
    stop = (marks[10] + marks[11]) // 2 + 1  # during the guard
    if every is not None:
        monkeypatch.setenv("IIA_CHECKPOINT_EVERY_S", every)
    runner.run(stop, kill=True, monkeypatch=monkeypatch)
    again, resumed = runner.run(monkeypatch=monkeypatch)
    assert resumed is not None and _content(resumed) == _content(reference)
    assert again.calls == (full.calls - marks[10] if every == "0" else full.calls)


def test_a_checkpoint_of_another_config_is_not_used(here, monkeypatch):
    runner = Runner(here)
    runner.run(monkeypatch=monkeypatch, marking=True)
    runner.run((runner.marks[5] + runner.marks[6]) // 2, monkeypatch=monkeypatch)
    [mine] = _checkpoints(here)

    other = Runner(here, ridge=1e-6)  # another ridge: other coefficients
    full, reference = other.run(monkeypatch=monkeypatch)
    assert not any("resuming" in line for line in other.logs) and _checkpoints(here) == [mine]
    # The first config's checkpoint under the second config's name (a hash collision, a renamed directory): its
    # parts name another identity, so it is a warning and a fresh start, never the first config's coefficients.
    other.run((other.marks[5] + other.marks[6]) // 2 if other.marks else 50, monkeypatch=monkeypatch)
    [theirs] = [d for d in _checkpoints(here) if d != mine]
    for f in theirs.iterdir():
        f.unlink()
    for f in mine.iterdir():
        (theirs / f.name).write_bytes(f.read_bytes())
    again, resumed = other.run(monkeypatch=monkeypatch)
    assert resumed is not None and _content(resumed) == _content(reference) and again.calls == full.calls
    warnings = [line for line in other.logs if line.startswith("warning: the calibration checkpoint")]
    assert len(warnings) == 1 and "belongs to another calibration" in warnings[0] and "afresh" in warnings[0]


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _pickled(path: Path) -> None:  # an object array: np.load(allow_pickle=False) refuses it
    np.savez(path.open("wb"), meta=np.asarray([{"step": 1}], dtype=object))


def _bad_history(path: Path) -> None:  # a readable file whose solver history names an unknown record type
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays["meta"]))
    meta["histories"][0][0]["type"] = "os.system"
    arrays["meta"] = np.asarray(json.dumps(meta))
    with path.open("wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", [_garbage, _truncated, _pickled, _bad_history])
def test_a_damaged_checkpoint_is_a_warning_and_a_fresh_start(here, monkeypatch, damage):
    runner = Runner(here)
    full, reference = runner.run(monkeypatch=monkeypatch, marking=True)
    runner.run((runner.marks[6] + runner.marks[7]) // 2, monkeypatch=monkeypatch)  # mid greedy pass
    [directory] = _checkpoints(here)
    damage(directory / "fit.npz")
    again, resumed = runner.run(monkeypatch=monkeypatch)
    assert resumed is not None and _content(resumed) == _content(reference)
    warnings = [line for line in runner.logs if line.startswith("warning: the calibration checkpoint")]
    assert len(warnings) == 1 and "afresh" in warnings[0], runner.logs
    assert again.calls <= full.calls and not _checkpoints(here)


def test_record_types_keep_their_stored_names() -> None:
    """Checkpoints name record classes as format 1 did, so one written before the package moved still resumes."""
    from iia_cli.calibration.checkpoint import _record_types, decode_history, encode_history, record_name
    from iia_cli.core.solvers.base import StepRecord
    from iia_cli.core.solvers.heun import HeunRecord

    names = {record_name(StepRecord), record_name(HeunRecord)}
    assert names == {"iia_cli.solvers.base.StepRecord", "iia_cli.solvers.heun.HeunRecord"}  # stored name, not an import path
    assert {"iia_cli.solvers.dpm.LambdaRecord", "iia_cli.solvers.ipndm.IPNDMRecord",  # stored name, not an import path
            "iia_cli.solvers.unipc.UniPCRecord"} <= set(_record_types())  # stored name, not an import path
    spec = [{"type": "iia_cli.solvers.base.StepRecord",  # stored name, not an import path
             "fields": {"sigma": 1.5, "denoised": {"tensor": "p_0_denoised"}, "eps": {"tensor": "p_0_eps"}}}]
    arrays = {"p_0_denoised": np.zeros((1, 2)), "p_0_eps": np.ones((1, 2))}
    (rec,) = decode_history(spec, arrays, torch.device("cpu"))
    assert type(rec) is StepRecord and rec.sigma == 1.5
    assert encode_history((rec,), "p")[0] == spec
    # On its own, the checkpoint module knows every record class (it loads the solvers' modules itself).
    code = "import iia_cli.calibration.checkpoint as c; print(len(c._record_types()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == len(_record_types()) == 5
