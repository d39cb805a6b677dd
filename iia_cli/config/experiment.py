"""Typed experiment config: YAML file + CLI options + ``--set a.b=c`` overrides, validated in one pass.

The schema is a set of pydantic models, one per section (:mod:`iia_cli.runtime.schema` has the YAML-friendly value
types); the ``model`` section is a union over the model kinds of :data:`iia_cli.models.registry.MODEL_KINDS`, told apart
by ``kind``. Field descriptions are the documentation (``iia config --schema``). A loaded config is canonical
(method aliases resolved, ``sampler.dtype`` copied into network models' ``dtype``); unknown keys and bad values
raise :class:`ConfigError` naming the key and the valid choices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from iia_cli.core.grids import DISCRETE_SPACINGS, GRID_KINDS
from iia_cli.core.solvers.base import CONVENTIONS, THRESHOLDINGS
from iia_cli.core.solvers.registry import teacher_name
from iia_cli.io.layout import RESULTS_DIR, anchored
from iia_cli.models.registry import MODEL_KINDS, model_kind
from iia_cli.runtime.errors import ConfigError, MissingFileError
from iia_cli.runtime.limits import MAX_NFE, SEED_LIMIT
from iia_cli.runtime.schema import (Batch, Bool, Choice, Float, Int, IntList, ModelParams, NETWORK_DTYPES, OptChoice,
                                    OptFloatList, OptInt, OptSeedSpecList, OptStr, OptStrList, Section, Str, StrList,
                                    config_error)

SECTIONS = ("model", "grid", "sampler", "calibration", "output", "fid", "evaluate")
CALIBRATION_TARGETS = ("local", "trajectory")  # iia.TARGETS (a test keeps them equal)


def canonical_method(name: str) -> str:
    """A method name or alias -> its canonical name (the one place the config asks the method registry)."""
    from iia_cli.core.methods import canonical_method as canonical

    return canonical(name)


def _canonical_methods(names: list[str]) -> list[str]:
    if not names:
        raise ConfigError("evaluate.methods is empty; give at least one method, e.g. [edm, iia-edm]")
    return [canonical_method(m) for m in names]


MethodName = Annotated[Str, AfterValidator(canonical_method)]  # a loaded config holds canonical names
MethodNames = Annotated[StrList, AfterValidator(_canonical_methods)]


def check_nfe(nfe: Any, key: str) -> int:
    """An NFE (denoiser calls per image): an integer 1 .. MAX_NFE."""
    if isinstance(nfe, bool) or not isinstance(nfe, int) or not 1 <= nfe <= MAX_NFE:
        raise ConfigError(f"{key}={nfe!r} is not valid; an NFE is an integer from 1 to {MAX_NFE}")
    return nfe


class GridConfig(Section):
    section: ClassVar[str] = "grid"
    kind: Choice(*GRID_KINDS) = Field("karras", description="sigma grid of the coarse steps")
    rho: Float = Field(7.0, description="karras: the grid's exponent rho (Karras et al. 2022, eq. 5)")
    sigma_min: Float = Field(0.002, description="smallest sigma of continuous grids")
    sigma_max: Float = Field(80.0, description="largest sigma of continuous grids")
    spacing: Choice(*DISCRETE_SPACINGS) = Field("uniform", description="discrete grids: timestep spacing")
    sigmas: OptFloatList = Field(None, description="kind list: the descending sigmas")
    path: OptStr = Field(None, description="kind file: a grid file written by `iia grid` (JSON, read as data)")

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        if self.kind == "list" and not self.sigmas:
            raise ConfigError("grid.kind=list needs grid.sigmas: a descending list of sigmas")
        if self.kind == "file" and not self.path:
            raise ConfigError("grid.kind=file needs grid.path: a grid file written by `iia grid --out FILE.json`")
        if not (self.rho > 0 and 0 < self.sigma_min < self.sigma_max < float("inf")):
            raise ConfigError("grid needs rho > 0 and 0 < sigma_min < sigma_max, all finite")
        return self


class SamplerConfig(Section):
    section: ClassVar[str] = "sampler"
    method: MethodName = Field("dpm-solver++-2m", description="sampling method or alias (iia list: README, Methods)")
    nfe: Int = Field(10, description=f"denoiser calls per image, 1 .. {MAX_NFE}")
    convention: Choice(*CONVENTIONS) = Field("iia", description="NFE/grid convention (README, Methods)")
    thresholding: Choice(*THRESHOLDINGS) = Field(
        "none", description="dynamic: diff-sampler's dynamic thresholding of D (per sample, clip at max(1, the 99.5 % "
                            "quantile of |D|) and divide by it); DPM-Solver++ and UniPC methods only")
    afs: Bool = Field(False, description="analytical first step: the first D is x - sigma x / sqrt(1 + sigma^2), no "
                                         "model call, so NFE K takes the grid of K + 1 calls (diff-sampler's AFS)")
    seeds: Str = Field("0-63", description="seeds, e.g. 0-999 or 0,5,10-19; one image per seed")
    batch: Batch = Field("auto", description="images per batch, or auto: 64 on the CPU, probed from GPU memory")
    device: Str = Field("auto", description="auto, cpu, cuda or cuda:N")
    state_dtype: Choice("auto", "float64", "float32") = Field(
        "auto", description="solver state dtype: auto = float64 on the CPU, float32 on a GPU")
    r: OptInt = Field(None, description="iia-edm / biia-edm: history length")
    quantities: Int = Field(2, description="iia-ddim / iia-ipndm: 1 = the one-quantity ablation")
    class_label: OptInt = Field(None, description="a fixed class label for class-conditional models")
    coeffs: OptStr = Field(None, description="IIA coefficient file (default: found by model, method, grid, NFE)")
    dtype: OptChoice(*NETWORK_DTYPES) = Field(None, description="network dtype override of network model kinds")
    compile: Bool = Field(False, description="torch.compile the denoiser call")
    channels_last: Bool = Field(False, description="channels-last memory format for the network")

    @model_validator(mode="after")
    def _check(self) -> SamplerConfig:
        check_nfe(self.nfe, "sampler.nfe")
        if self.batch != "auto" and (not isinstance(self.batch, int) or self.batch < 1):
            raise ConfigError(f"sampler.batch={self.batch!r} must be a positive integer or auto")
        return self


class CalibrationConfig(Section):
    section: ClassVar[str] = "calibration"
    samples: Int = Field(200, description="calibration noises |B|")
    seed_start: Int = Field(1_000_000_000, description="first calibration seed (disjoint from evaluation seeds)")
    substeps: Int = Field(10, description="fine sub-steps M per coarse step (target local)")
    ridge: Float = Field(1e-8, description="relative ridge: lambda = ridge * trace(G) / K")
    val_samples: Int = Field(100, description="held-out noises of the end-to-end check")
    val_seed_start: Int = Field(2_000_000_000, description="first held-out seed")
    batch: OptInt = Field(None, description="chunk size of model calls (default: sampler.batch)")
    out_dir: Str = Field(str(RESULTS_DIR / "coefficients"), description="directory of coefficient files; a relative "
                                                                      "one is under $IIA_HOME when set")
    target: Choice(*CALIBRATION_TARGETS) = Field(
        "local", description="local: M fine sub-steps from the coarse state (the paper) | trajectory: the "
                             "teacher's state")
    teacher: Str = Field("edm", description="teacher of trajectory targets, the guard and validation: a base solver "
                                            "(edm = Heun) or exact")
    teacher_substeps: Int = Field(10, description="teacher steps per coarse interval, uniform in log sigma")
    guard: Bool = Field(True, description="shrink the corrections by one factor in [0, 1] so that the final error "
                                          "is never above the base solver's")

    @model_validator(mode="after")
    def _check(self) -> CalibrationConfig:
        if self.samples < 1 or self.substeps < 1 or self.val_samples < 0 or not 0 <= self.ridge < float("inf"):
            raise ConfigError("calibration needs samples >= 1, substeps >= 1, val_samples >= 0 and a finite ridge >= 0")
        if self.substeps > MAX_NFE:
            raise ConfigError(f"calibration.substeps={self.substeps} is too large; use at most {MAX_NFE}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"calibration.batch={self.batch} must be a positive integer (or unset: sampler.batch)")
        for start, n, key in ((self.seed_start, self.samples, "seed_start"),
                              (self.val_seed_start, self.val_samples, "val_seed_start")):
            if not 0 <= start <= SEED_LIMIT - max(n, 1):
                raise ConfigError(f"calibration.{key}={start} is not valid; its seeds must lie in 0 .. 2^63-1")
        self.teacher = teacher_name(self.teacher, self.teacher_substeps)  # checks the name and the sub-steps
        return self


class OutputConfig(Section):
    section: ClassVar[str] = "output"
    path: OptStr = Field(None, description="a directory for PNGs ({seed:06d}.png) or a .npz file")
    grid_png: OptStr = Field(None, description="a grid of up to 64 samples for a quick look")
    subdirs: Bool = Field(False, description="PNGs in 1000-image subfolders, like EDM")


class FIDConfig(Section):
    section: ClassVar[str] = "fid"
    reference: OptStr = Field(None, description="an .npz with mu/sigma, or builtin:mnist / builtin:fashion-mnist / "
                                                "a data spec")
    reference_samples: OptInt = Field(None, description="images used when reference statistics are computed from "
                                                        "data (default: all)")
    inception_weights: OptStr = Field(None, description="FID Inception weights file")
    clip_weights: OptStr = Field(None, description="text-to-image: a local CLIP directory (or $IIA_CLIP_WEIGHTS) "
                                                   "adds clip_score rows")
    batch: Int = Field(64, description="images per Inception / CLIP batch")

    @model_validator(mode="after")
    def _check(self) -> FIDConfig:
        if self.batch < 1:
            raise ConfigError(f"fid.batch={self.batch} must be at least 1")
        if self.reference_samples is not None and self.reference_samples < 2:
            raise ConfigError(f"fid.reference_samples={self.reference_samples} must be at least 2 "
                              "(or unset: all images)")
        return self


class EvaluateConfig(Section):
    section: ClassVar[str] = "evaluate"
    methods: MethodNames = Field(["edm", "iia-edm"], description="methods to evaluate")
    nfe: IntList = Field([9], description="NFEs to evaluate: a list or 5,9")
    samples: Int = Field(1000, description="images per seed range")
    seed_ranges: OptSeedSpecList = Field(None, description="seed ranges, one FID row each: a list or 0-999;1000-1999 "
                                                          "(default: 0..samples-1)")
    error_samples: Int = Field(128, description="integration error vs a high-NFE reference on this many seeds "
                                               "(0 skips it)")
    reference_method: MethodName = Field("edm", description="the integration error's reference solver")
    reference_nfe: Int = Field(999, description="the reference solver's NFE")
    csv: OptStr = Field(None, description="results CSV (default results/<experiment>.csv)")
    metrics: OptStrList = Field(None, description="integration_rmse, kid, fd_inf, fid, clip_score (default: "
                                                  "integration_rmse, kid, fid and clip_score where possible)")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.nfe:
            raise ConfigError("evaluate.nfe is empty; give one NFE or a list, e.g. [5, 9]")
        for n in self.nfe:
            check_nfe(n, "evaluate.nfe")
        check_nfe(self.reference_nfe, "evaluate.reference_nfe")
        if self.metrics is not None:
            from iia_cli.metrics.registry import parse_metrics

            parse_metrics(self.metrics, "evaluate.metrics")
        if self.samples < 1:
            raise ConfigError(f"evaluate.samples={self.samples} must be at least 1")
        if self.error_samples < 0:
            raise ConfigError(f"evaluate.error_samples={self.error_samples} must be >= 0 "
                              "(0 skips the integration error)")
        return self


ModelConfig = Annotated[Union[tuple(k.params for k in MODEL_KINDS.values())], Field(discriminator="kind")]


class ExperimentConfig(BaseModel):
    """The whole experiment: one section per concern; the ``model`` section's keys depend on ``model.kind``."""

    model_config = ConfigDict(extra="forbid")
    experiment: Str = Field("experiment", description="experiment name (names results/<experiment>.csv)")
    model: ModelConfig = Field(default_factory=lambda: model_kind("gmm-mnist").params(),
                               description="the model: kind and the kind's own keys")
    grid: GridConfig = Field(default_factory=GridConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    fid: FIDConfig = Field(default_factory=FIDConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    source: OptStr = Field(None, description="the YAML path, for records (not a config key)")

    @field_validator("experiment")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        return check_experiment_name(name)

    @field_validator("model", mode="before")
    @classmethod
    def _kind(cls, data: Any) -> Any:
        if isinstance(data, ModelParams):
            return data
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("config section 'model' must be a mapping with a 'kind'")
        kind = str(data.get("kind", "gmm-mnist"))
        model_kind(kind)  # an unknown kind names the valid ones
        return {**data, "kind": kind}

    @model_validator(mode="after")
    def _network_dtype(self) -> ExperimentConfig:
        """``sampler.dtype`` (``--dtype``) overrides a network model's ``dtype``; other kinds have none."""
        dtype = self.sampler.dtype
        if dtype is not None:
            if not model_kind(self.model.kind).network:
                kinds = ", ".join(k for k, v in MODEL_KINDS.items() if v.network)
                raise ConfigError(f"--dtype applies to network models ({kinds}), not model.kind={self.model.kind}")
            self.model = self.model.model_copy(update={"dtype": dtype})
        return self

    def effective(self) -> dict[str, Any]:
        """The config as YAML data, every default filled in (``iia config``); loading it gives this config."""
        data: dict[str, Any] = {"experiment": self.experiment, "model": {"kind": self.model.kind, **self.model.params}}
        for name in SECTIONS[1:]:
            data[name] = getattr(self, name).model_dump()
        return data


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
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {p} is not a text file (byte {exc.start} is not UTF-8); give a YAML "
                              f"experiment config, e.g. configs/mnist-testbed.yaml") from None
        try:
            tree = yaml.safe_load(text) or {}
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
    try:
        cfg = ExperimentConfig.model_validate({**tree, "experiment": name, "source": str(path) if path else None})
    except ValidationError as exc:
        raise config_error(exc) from None
    cfg.calibration.out_dir = str(anchored(cfg.calibration.out_dir))  # changed only when $IIA_HOME is set
    if cfg.evaluate.csv is not None:
        cfg.evaluate.csv = str(anchored(cfg.evaluate.csv))
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


def validate(cfg: ExperimentConfig) -> None:
    """Check a config built or changed in code: the same checks as loading, and nothing is changed."""
    try:
        ExperimentConfig.model_validate({**cfg.effective(), "source": cfg.source})
    except ValidationError as exc:
        raise config_error(exc) from None


def _type_text(prop: dict[str, Any]) -> str:
    """A JSON-schema property as a short type: ``int``, ``karras | logsnr``, ``list of int | null``."""
    if "enum" in prop:
        return " | ".join(map(str, prop["enum"]))
    if "const" in prop:
        return str(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type_text(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list of {_type_text(prop.get('items', {}))}"
    names = {"integer": "int", "number": "float", "boolean": "bool", "string": "str", "null": "null",
             "object": "mapping"}
    return names.get(prop.get("type", ""), "any")


def _field_lines(cls: type[BaseModel], prefix: str, skip: tuple[str, ...] = ()) -> list[str]:
    props = cls.model_json_schema()["properties"]
    lines = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        default = "required" if info.is_required() else f"default {info.get_default(call_default_factory=True)!r}"
        lines.append(f"{prefix}{name} ({_type_text(props[name])}, {default}): {info.description or ''}".rstrip(": "))
    return lines


def describe_schema() -> list[str]:
    """Every config key with its type, default and description (``iia config --schema``)."""
    name = ExperimentConfig.model_fields["experiment"].description
    lines = [f"experiment (str, default: the config file's name): {name}",
             f"model.kind ({' | '.join(MODEL_KINDS)}, default 'gmm-mnist'): the model; its other keys depend on "
             "the kind"]
    for kind, spec in MODEL_KINDS.items():
        lines.append(f"  model.kind={kind}: {(spec.params.__doc__ or '').split('``: ', 1)[-1].strip()}")
        lines += _field_lines(spec.params, "    model.", skip=("kind",))
    for name in SECTIONS[1:]:
        lines += _field_lines(ExperimentConfig.model_fields[name].default_factory, f"{name}.")
    return lines
