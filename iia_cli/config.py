"""Typed experiment config: YAML file + CLI options + ``--set a.b=c`` overrides, validated in one pass.

Unknown keys and bad values raise :class:`ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MissingFileError
from .grids import DISCRETE_SPACINGS, GRID_KINDS

MODEL_KINDS: dict[str, dict[str, Any]] = {
    # kind -> allowed keys and their defaults (None = required or optional without default)
    "gaussian": {"shape": [1, 8, 8], "mean": None, "std": 0.5, "sigma_min": 0.002, "sigma_max": 80.0},
    "gmm-mnist": {"components": 10, "rank": None, "tau2": None, "mle_noise": False, "conditional": False},
    "python": {"factory": None, "kwargs": {}},
    "edm-pkl": {"path": None, "key": "ema", "dtype": "float32", "trust_code": False},
    "diffusers": {"path": None, "prediction_type": None, "dtype": "float32", "timestep_lookup": "interp"},
    "diffusers-sd": {"path": None, "prompts": None, "guidance_scale": 7.5, "negative_prompt": "", "height": None,
                     "width": None, "dtype": "float32", "prediction_type": None, "timestep_lookup": "interp"},
}
REQUIRED_MODEL_KEYS = {"python": ("factory",), "edm-pkl": ("path",), "diffusers": ("path",),
                       "diffusers-sd": ("path", "prompts")}
NETWORK_DTYPES = ("float32", "float16", "bfloat16")
# Types of the model keys whose values are plain scalars or lists (others, like gaussian.mean or
# diffusers-sd.prompts, accept several forms and are checked by their loaders).
MODEL_KEY_TYPES: dict[str, Any] = {
    "shape": list[int], "std": float, "sigma_min": float, "sigma_max": float, "components": int,
    "rank": int | None, "tau2": float | None, "mle_noise": bool, "conditional": bool, "factory": str,
    "path": str, "key": str, "dtype": str, "trust_code": bool, "prediction_type": str | None,
    "timestep_lookup": str, "guidance_scale": float, "negative_prompt": str, "height": int | None,
    "width": int | None,
}
MAX_NFE = 10_000  # denoiser calls per image: beyond this a grid only costs memory and time
SEED_LIMIT = 2**63  # seeds are int64 (torch.Generator.manual_seed): 0 <= seed < 2^63


@dataclass
class ModelConfig:
    kind: str = "gmm-mnist"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class GridConfig:
    kind: str = "karras"
    rho: float = 7.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    spacing: str = "uniform"  # discrete grids: uniform | quad
    sigmas: list[float] | None = None  # kind: list


@dataclass
class SamplerConfig:
    method: str = "dpm-solver++-2m"
    nfe: int = 10
    convention: str = "iia"  # NFE/grid convention: iia | diff-sampler (see README, Methods)
    seeds: str = "0-63"
    batch: int | str = "auto"  # auto: 64 on the CPU, probed from GPU memory on a GPU
    device: str = "auto"
    state_dtype: str = "auto"  # auto = float64 on CPU, float32 on GPU
    r: int | None = None  # iia-edm / biia-edm history length
    quantities: int = 2  # iia-ddim / iia-ipndm: 1 = one-quantity ablation
    class_label: int | None = None
    coeffs: str | None = None
    dtype: str | None = None  # network dtype override: float32 | float16 | bfloat16 (edm-pkl, diffusers models)
    compile: bool = False  # torch.compile the denoiser call
    channels_last: bool = False


@dataclass
class CalibrationConfig:
    samples: int = 200  # |B|
    seed_start: int = 1_000_000_000  # disjoint from every evaluation seed
    substeps: int = 10  # M
    ridge: float = 1e-8  # relative: lambda = ridge * trace(G) / K
    val_samples: int = 100
    val_seed_start: int = 2_000_000_000
    batch: int | None = None  # chunk size for model calls (default: sampler.batch)
    out_dir: str = "results/coefficients"
    target: str = "local"  # local: M fine sub-steps from the coarse state (paper) | trajectory: the teacher's state
    teacher: str = "edm"  # teacher of trajectory targets, the guard and validation: a base solver (edm = Heun) or exact
    teacher_substeps: int = 10  # teacher steps per coarse interval, uniform in log sigma
    guard: bool = True  # shrink the corrections (one factor in [0, 1]) so the final error is never above the base's


@dataclass
class OutputConfig:
    path: str | None = None
    grid_png: str | None = None
    subdirs: bool = False  # PNGs in 1000-image subfolders, like EDM


@dataclass
class FIDConfig:
    reference: str | None = None  # an .npz with mu/sigma, or builtin:mnist / builtin:fashion-mnist / a data spec
    reference_samples: int | None = None  # images used when reference statistics are computed from data
    inception_weights: str | None = None
    clip_weights: str | None = None  # text-to-image: a local CLIP directory (or $IIA_CLIP_WEIGHTS) adds clip_score rows
    batch: int = 64


@dataclass
class EvaluateConfig:
    methods: list[str] = field(default_factory=lambda: ["edm", "iia-edm"])
    nfe: list[int] = field(default_factory=lambda: [9])
    samples: int = 1000
    seed_ranges: list[str] | None = None  # default: one range 0..samples-1
    error_samples: int = 32  # integration error vs a high-NFE reference on this many seeds
    reference_method: str = "edm"
    reference_nfe: int = 999
    csv: str | None = None  # default results/<experiment>.csv
    metrics: list[str] | None = None  # fid, integration_rmse, clip_score (default: fid, integration_rmse, clip_score where possible)


@dataclass
class ExperimentConfig:
    experiment: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: str | None = None  # the YAML path, for records


SECTIONS = ("model", "grid", "sampler", "calibration", "output", "fid", "evaluate")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML value to the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for k, option in enumerate(inner):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                if k == len(inner) - 1:
                    raise
        return None
    if origin is list:
        items = value if isinstance(value, list) else [value]
        if isinstance(value, str) and args and args[0] is not str:
            items = [v for v in value.replace(" ", "").split(",") if v]
        return [_coerce(v, args[0], key) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}={value!r:.80} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


def _section(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix!r} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {prefix}.{unknown[0]}; valid keys in {prefix}: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}.{k}") for k, v in data.items()})


def _model_section(data: Any) -> ModelConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config section 'model' must be a mapping with a 'kind'")
    data = dict(data)
    kind = str(data.pop("kind", "gmm-mnist"))
    if kind not in MODEL_KINDS:
        raise ConfigError(f"model.kind={kind!r} is not valid; choose one of {', '.join(MODEL_KINDS)}")
    allowed = MODEL_KINDS[kind]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key model.{unknown[0]} for model.kind={kind}; valid keys: "
                          f"kind, {', '.join(allowed)}")
    for req in REQUIRED_MODEL_KEYS.get(kind, ()):
        if data.get(req) in (None, ""):
            raise ConfigError(f"model.{req} is required for model.kind={kind}")
    for k, v in list(data.items()):
        if k in MODEL_KEY_TYPES and (v is not None or k not in REQUIRED_MODEL_KEYS.get(kind, ())):
            data[k] = _coerce(v, MODEL_KEY_TYPES[k], f"model.{k}")
    if "trust_code" in data and not isinstance(data["trust_code"], bool):
        raise ConfigError(f"model.trust_code={data['trust_code']!r} must be true or false")
    if "dtype" in data and data["dtype"] not in NETWORK_DTYPES:
        raise ConfigError(f"model.dtype={data['dtype']!r} is not valid; choose one of {', '.join(NETWORK_DTYPES)}")
    params = {k: v for k, v in allowed.items() if v is not None}
    params.update(data)
    return ModelConfig(kind=kind, params=params)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    if len(keys) < 2 and keys[0] != "experiment":
        raise ConfigError(f"--set {dotted}: write section.key=value, e.g. --set sampler.nfe=9")
    node = tree
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = value


def parse_set(items: list[str] | None) -> list[tuple[str, Any]]:
    """``a.b=c`` strings -> (key, YAML-parsed value) pairs."""
    out = []
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None = None, overrides: list[tuple[str, Any]] | None = None) -> ExperimentConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MissingFileError("config file", p)
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config {p} is not valid YAML{where}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config {p} must be a mapping of sections ({', '.join(SECTIONS)})")
    for key, value in overrides or []:
        _set_dotted(tree, key, value)
    unknown = sorted(set(tree) - set(SECTIONS) - {"experiment"})
    if unknown:
        raise ConfigError(f"unknown config section {unknown[0]!r}; valid: experiment, {', '.join(SECTIONS)}")
    name = tree["experiment"] if tree.get("experiment") is not None else (Path(path).stem if path else "experiment")
    cfg = ExperimentConfig(
        experiment=check_experiment_name(name),
        model=_model_section(tree.get("model")),
        grid=_section(GridConfig, tree.get("grid"), "grid"),
        sampler=_section(SamplerConfig, tree.get("sampler"), "sampler"),
        calibration=_section(CalibrationConfig, tree.get("calibration"), "calibration"),
        output=_section(OutputConfig, tree.get("output"), "output"),
        fid=_section(FIDConfig, tree.get("fid"), "fid"),
        evaluate=_section(EvaluateConfig, tree.get("evaluate"), "evaluate"),
        source=str(path) if path else None,
    )
    validate(cfg)
    return cfg


def check_experiment_name(name: Any) -> str:
    """An experiment name names files under results/ (CSV, shards): a plain name, never a path."""
    text = str(name)
    bad = next((c for c in ("/", "\\", "\0") if c in text), None)
    if bad is not None or text.strip() in ("", ".", "..") or text != text.strip() or not text.isprintable():
        why = f"contains {bad!r}" if bad else "is empty, '.', '..', padded or not printable"
        raise ConfigError(f"experiment={text!r} {why}; an experiment name is a plain name such as cifar10-edm, "
                          "not a path (the results go under results/<experiment>)")
    return text


def check_nfe(nfe: Any, key: str) -> int:
    """An NFE (denoiser calls per image): an integer 1 .. MAX_NFE."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= MAX_NFE:
        raise ConfigError(f"{key}={nfe!r} is not valid; an NFE is an integer from 1 to {MAX_NFE}")
    return nfe


def validate(cfg: ExperimentConfig) -> None:
    """Value checks that do not need the model (the model-dependent ones happen when it loads)."""
    from .methods import canonical_method
    from .solvers import CONVENTIONS

    g = cfg.grid
    if g.kind not in GRID_KINDS:
        raise ConfigError(f"grid.kind={g.kind!r} is not valid; choose one of {', '.join(GRID_KINDS)}")
    if g.spacing not in DISCRETE_SPACINGS:
        raise ConfigError(f"grid.spacing={g.spacing!r} is not valid; choose one of {', '.join(DISCRETE_SPACINGS)}")
    if g.kind == "list" and not g.sigmas:
        raise ConfigError("grid.kind=list needs grid.sigmas: a descending list of sigmas")
    if not (g.rho > 0 and 0 < g.sigma_min < g.sigma_max < float("inf")):
        raise ConfigError("grid needs rho > 0 and 0 < sigma_min < sigma_max, all finite")
    s = cfg.sampler
    s.method = canonical_method(s.method)
    check_nfe(s.nfe, "sampler.nfe")
    if s.convention not in CONVENTIONS:
        raise ConfigError(f"sampler.convention={s.convention!r} is not valid; choose one of {', '.join(CONVENTIONS)}")
    if s.batch != "auto" and (not isinstance(s.batch, int) or s.batch < 1):
        raise ConfigError(f"sampler.batch={s.batch!r} must be a positive integer or auto")
    if s.dtype is not None:
        if s.dtype not in NETWORK_DTYPES:
            raise ConfigError(f"sampler.dtype={s.dtype!r} is not valid; choose one of {', '.join(NETWORK_DTYPES)}")
        if "dtype" not in MODEL_KINDS[cfg.model.kind]:
            kinds = ", ".join(k for k, v in MODEL_KINDS.items() if "dtype" in v)
            raise ConfigError(f"--dtype applies to network models ({kinds}), not model.kind={cfg.model.kind}")
        cfg.model.params["dtype"] = s.dtype
    if s.state_dtype not in ("auto", "float64", "float32"):
        raise ConfigError(f"sampler.state_dtype={s.state_dtype!r} is not valid; choose auto, float64 or float32")
    c = cfg.calibration
    if c.samples < 1 or c.substeps < 1 or c.val_samples < 0 or not 0 <= c.ridge < float("inf"):
        raise ConfigError("calibration needs samples >= 1, substeps >= 1, val_samples >= 0 and a finite ridge >= 0")
    if c.substeps > MAX_NFE:
        raise ConfigError(f"calibration.substeps={c.substeps} is too large; use at most {MAX_NFE}")
    if c.batch is not None and c.batch < 1:
        raise ConfigError(f"calibration.batch={c.batch} must be a positive integer (or unset: sampler.batch)")
    for start, n, key in ((c.seed_start, c.samples, "seed_start"), (c.val_seed_start, c.val_samples, "val_seed_start")):
        if not 0 <= start <= SEED_LIMIT - max(n, 1):
            raise ConfigError(f"calibration.{key}={start} is not valid; its seeds must lie in 0 .. 2^63-1")
    e = cfg.evaluate
    if not e.nfe:
        raise ConfigError("evaluate.nfe is empty; give one NFE or a list, e.g. [5, 9]")
    for n in e.nfe:
        check_nfe(n, "evaluate.nfe")
    check_nfe(e.reference_nfe, "evaluate.reference_nfe")
    if e.samples < 1:
        raise ConfigError(f"evaluate.samples={e.samples} must be at least 1")
    if e.error_samples < 0:
        raise ConfigError(f"evaluate.error_samples={e.error_samples} must be >= 0 (0 skips the integration error)")
    if not e.methods:
        raise ConfigError("evaluate.methods is empty; give at least one method, e.g. [edm, iia-edm]")
    f = cfg.fid
    if f.batch < 1:
        raise ConfigError(f"fid.batch={f.batch} must be at least 1")
    if f.reference_samples is not None and f.reference_samples < 2:
        raise ConfigError(f"fid.reference_samples={f.reference_samples} must be at least 2 (or unset: all images)")
    from .iia import TARGETS, Teacher

    if c.target not in TARGETS:
        raise ConfigError(f"calibration.target={c.target!r} is not valid; choose one of {', '.join(TARGETS)}")
    c.teacher = Teacher(c.teacher, c.teacher_substeps).name  # checks the name and the sub-steps
    cfg.evaluate.methods = [canonical_method(m) for m in cfg.evaluate.methods]
    cfg.evaluate.reference_method = canonical_method(cfg.evaluate.reference_method)
