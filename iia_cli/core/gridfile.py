"""Grid files: a searched sigma grid as a calibrated artefact (``grid: {kind: file, path: FILE}``).

A grid file is JSON, read as data and never executed. It holds the exact sigmas (JSON floats written with
Python's shortest round-trip repr, so they load back bit for bit), the NFE, the solver and NFE convention it was
searched for, the model fingerprint, how it was found (``search``: the search kind, candidates, teacher, noises,
cost and the work it took) and ``sha256``, a hash of its content. A grid serves the base solver it was searched
for and that solver's IIA methods (e.g. a GITS grid for ``ddim`` serves ``iia-ddim``), on the same model, under
the same convention and at the same NFE; anything else is refused naming what differs.

The content hash leaves out what does not change the grid or how it was found (creation time, tool version,
the search's wall time), so that two identical searches give the same hash and result rows stay reusable.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from iia_cli import __version__
from iia_cli.io.atomic import write_text_atomic
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError
from .grids import list_grid

GRID_FILE_FORMAT = "iia-grid"
GRID_FILE_VERSION = 1
_NOT_HASHED = ("sha256", "created", "tool_version")  # top-level fields left out of the content hash
_SEARCH_NOT_HASHED = ("seconds", "teacher_seconds", "training_seconds")  # search fields left out of it (wall times)


@dataclass(frozen=True)
class GridFile:
    """One searched grid. ``method`` is the method the search ran for, ``solver`` its base solver (what the
    grid serves); ``search`` is free-form but always has ``kind``."""

    sigmas: list[float]
    nfe: int
    method: str
    solver: str
    convention: str
    model_kind: str
    model_sha256: str
    search: dict[str, Any]
    created: str = ""
    tool_version: str = __version__
    format: str = GRID_FILE_FORMAT
    format_version: int = GRID_FILE_VERSION
    sha256: str = ""
    path: Path | None = field(default=None, compare=False, repr=False)  # where it was read from (not stored)

    def content(self) -> dict[str, Any]:
        """The hashed content: every stored field except creation time, tool version, the hash itself and the
        search's wall time."""
        data = {k: v for k, v in self._stored().items() if k not in _NOT_HASHED}
        data["search"] = {k: v for k, v in self.search.items() if k not in _SEARCH_NOT_HASHED}
        return data

    def content_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True, allow_nan=False).encode()).hexdigest()

    def _stored(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        return data

    def tensor(self) -> torch.Tensor:
        """The sigmas as a descending float64 tensor (exactly the stored floats)."""
        return torch.tensor(self.sigmas, dtype=torch.float64)

    def save(self, path: str | Path) -> Path:
        """Write the file atomically, with ``created`` and ``sha256`` filled in. Returns its path."""
        stamped = GridFile(**{**self._stored(), "created": self.created
                              or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
        data = {**stamped._stored(), "sha256": stamped.content_sha256()}
        text = json.dumps(data, indent=1, allow_nan=False) + "\n"
        return write_text_atomic(Path(path), text, what="grid file")

    def mismatches(self, model_sha256: str, solver: str, convention: str, nfe: int) -> list[str]:
        """What differs between this grid and a run of ``solver`` (a base solver's name) on the model with
        fingerprint ``model_sha256`` under ``convention`` at ``nfe`` (empty: the grid fits)."""
        out = []
        if self.model_sha256 != model_sha256:
            out.append(f"model fingerprint {self.model_sha256[:12]} ({self.model_kind}) in the file, "
                       f"{model_sha256[:12]} in the run (another model)")
        if self.solver != solver:
            out.append(f"solver {self.solver} in the file (searched for {self.method}), {solver} in the run")
        if self.convention != convention:
            out.append(f"convention {self.convention} in the file, {convention} in the run (sampler.convention)")
        if self.nfe != nfe:
            out.append(f"NFE {self.nfe} in the file, {nfe} in the run (--nfe {self.nfe} uses it)")
        return out


def load_grid_file(path: str | Path) -> GridFile:
    """Read and check a grid file: JSON of the expected format, every field of the right type, a strictly
    descending grid and a content hash that matches. A missing file raises :class:`MissingFileError`, a
    garbled or edited one :class:`IIARuntimeError` naming the file and what is wrong (both one line, exit 1)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError("grid file", path, "write one with `iia grid --search gits --out FILE.json`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IIARuntimeError(f"grid file {path} is not readable JSON ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != GRID_FILE_FORMAT:
        raise IIARuntimeError(f"grid file {path} is not an iia grid file (no \"format\": \"{GRID_FILE_FORMAT}\")")
    if data.get("format_version") != GRID_FILE_VERSION:
        raise IIARuntimeError(f"grid file {path} has format_version {data.get('format_version')!r}; this iia reads "
                              f"version {GRID_FILE_VERSION}")
    types = {"sigmas": list, "nfe": int, "method": str, "solver": str, "convention": str, "model_kind": str,
             "model_sha256": str, "search": dict, "created": str, "tool_version": str, "sha256": str}
    for key, kind in types.items():
        value = data.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise IIARuntimeError(f"grid file {path}: field {key!r} is missing or not a {kind.__name__}")
    unknown = sorted(set(data) - set(types) - {"format", "format_version"})
    if unknown:
        raise IIARuntimeError(f"grid file {path}: unknown fields {', '.join(unknown)}")
    sigmas = data["sigmas"]
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in sigmas):
        raise IIARuntimeError(f"grid file {path}: sigmas must be finite numbers")
    try:
        list_grid(sigmas)
    except ConfigError as exc:
        raise IIARuntimeError(f"grid file {path}: {exc}") from None
    grid = GridFile(**{**data, "sigmas": [float(s) for s in sigmas]}, path=path)
    if grid.content_sha256() != grid.sha256:
        raise IIARuntimeError(f"grid file {path} was changed after it was written (its content sha256 "
                              f"{grid.content_sha256()[:12]} != the recorded {grid.sha256[:12]}); search it again")
    return grid


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid sigma")


def check_grid_file(grid: GridFile, model_sha256: str, solver: str, convention: str, nfe: int) -> None:
    """Refuse (ConfigError, exit 2) a grid file made for another model, solver, convention or NFE."""
    diff = grid.mismatches(model_sha256, solver, convention, nfe)
    if diff:
        raise ConfigError(f"grid file {grid.path} does not fit this run: {'; '.join(diff)}")
