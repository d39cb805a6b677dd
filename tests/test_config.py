"""The config schema (pydantic models per section, the model kinds' registry): values coerce as before, errors
are one line naming the key and what is valid, a loaded config is canonical, and what the config feeds into
fingerprints and row identities is pinned to the values the hand-written parser produced."""

import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from iia_cli.config.experiment import CALIBRATION_TARGETS, ExperimentConfig, load_config, validate
from iia_cli.models.registry import MODEL_KINDS, load_model, model_fingerprint
from iia_cli.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "iia_cli" / "config" / "default.yaml", *sorted((ROOT / "configs").rglob("*.yaml"))]

# (config, overrides, params dict, fingerprint of a model whose own part is "weights"): computed with the
# hand-written parser this schema replaced (main at 74faa4f). A change here changes every coefficient file name
# and every result row's identity.
PINNED = [
    ("iia_cli/config/default.yaml", [], {"dtype": "float32", "timestep_lookup": "interp", "path": "builtin:mnist-ddpm"},
     "5da24d1c8cdcba4b15114b2c67af255ad37222417d80dacfbfd8c812b2246292"),
    ("iia_cli/config/default.yaml", [("sampler.dtype", "bfloat16")],
     {"dtype": "bfloat16", "timestep_lookup": "interp", "path": "builtin:mnist-ddpm"},
     "34a7ceeeb9d71066bc0321ed4c6d27bde38495a9863a8014d010ad60a34ab696"),
    ("configs/mnist-gmm.yaml", [], {"components": 10, "mle_noise": False, "conditional": False, "rank": 16,
                                    "tau2": 0.001},
     "dd539edc8752f479734aa50910d4ac85468cad5754958dfcb6696a002eac60cd"),
    ("configs/paper/sd21-coco.yaml", [], {"guidance_scale": 7.5, "negative_prompt": "", "dtype": "float16",
                                          "timestep_lookup": "interp", "path": "checkpoints/stable-diffusion-2-1-base",
                                          "prompts": "data/coco2014-captions-20k.txt"},
     "c04000ad62211c1d9e374e3565ca022f2b54181b1ccde57e619d84d76523b614"),
    ("configs/paper/edm-cifar10-cond-vp.yaml", [], {"key": "ema", "dtype": "float32", "trust_code": False,
                                                    "path": "checkpoints/edm-cifar10-32x32-cond-vp.pkl"},
     "d57ac6f4ca0156946d111f9b20e5152b1163e8a4d1c51dc040b8cbb402d3ec55"),
    (None, [("model.kind", "gaussian"), ("model.std", 1)],
     {"shape": [1, 8, 8], "std": 1.0, "sigma_min": 0.002, "sigma_max": 80.0},
     "eede57f11babd2aeee64c1e651f78869e35183ac61daca07c75ce422ca520e86"),
    (None, [("model.kind", "python"), ("model.factory", "m.py:f")], {"kwargs": {}, "factory": "m.py:f"},
     "91affed9b39d031e9f72662b84b33ad095d7ac2d97496a8ceb82ca6b185c12d8"),
]


@pytest.mark.parametrize("path, overrides, params, fingerprint", PINNED)
def test_params_and_fingerprints_are_pinned(path, overrides, params, fingerprint):
    cfg = load_config(ROOT / path if path else None, overrides)
    assert cfg.model.params == params
    stub = types.SimpleNamespace(_iia_fingerprint="weights")
    assert model_fingerprint(stub, cfg.model.kind, cfg.model.params) == fingerprint


def test_gaussian_model_fingerprint_is_pinned():
    cfg = load_config(None, [("model.kind", "gaussian"), ("model.shape", [1, 4, 4])])
    model = load_model(cfg.model.kind, cfg.model.params)
    assert model_fingerprint(model, cfg.model.kind, cfg.model.params) == \
        "caef095535c433a4388a148b6ab8b36a94a1b22e217bfe6377c6b355b65b6fc9"


def test_optional_model_keys_enter_the_params_only_when_given():
    """Keys without a default (gmm rank, tau2) are absent unless the config gives them, even as null: the
    fingerprint has always told `rank: null` from no rank."""
    assert "rank" not in load_config(None).model.params
    assert load_config(None, [("model.rank", None)]).model.params["rank"] is None
    assert load_config(None, [("model.rank", "8")]).model.params["rank"] == 8


@pytest.mark.parametrize("key, value, expected", [
    ("sampler.nfe", "7", 7), ("sampler.nfe", 7.0, 7), ("sampler.batch", "8", 8), ("sampler.batch", "auto", "auto"),
    ("evaluate.nfe", "5,9", [5, 9]), ("evaluate.nfe", 6, [6]), ("evaluate.nfe", [5, "9"], [5, 9]),
    ("grid.sigmas", "80,1,0.5", [80.0, 1.0, 0.5]), ("grid.rho", 5, 5.0), ("sampler.seeds", 5, "5"),
    ("sampler.compile", "yes", True), ("sampler.compile", "0", False), ("sampler.compile", "TRUE", True),
    ("calibration.guard", "no", False), ("evaluate.methods", "heun", ["edm"]), ("sampler.method", "euler", "ddim"),
    ("calibration.teacher", "heun", "edm"), ("evaluate.reference_method", "euler", "ddim"),
])
def test_values_coerce_as_a_config_writer_means(key, value, expected):
    section, name = key.split(".")
    extra = [("grid.kind", "list")] if key == "grid.sigmas" else []
    assert getattr(getattr(load_config(None, [(key, value), *extra]), section), name) == expected


@pytest.mark.parametrize("overrides, message", [
    ([("sampler.nfe", 2.5)], "sampler.nfe=2.5 is not a valid int"),
    ([("sampler.nfe", True)], "sampler.nfe=True is not a valid int"),
    ([("sampler.nfe", "abc")], "sampler.nfe='abc' is not a valid int"),
    ([("evaluate.nfe", "5,x")], "evaluate.nfe='x' is not a valid int"),
    ([("sampler.compile", "on")], "sampler.compile='on' is not a valid bool"),
    ([("sampler.compile", 2)], "sampler.compile=2 is not a valid bool"),
    ([("grid.rho", "steep")], "grid.rho='steep' is not a valid float"),
    ([("sampler.seeds", [1, 2])], "sampler.seeds=[1, 2] is not a valid str"),
    ([("sampler.nfe", 0)], "sampler.nfe=0 is not valid; an NFE is an integer from 1 to 10000"),
    ([("sampler.batch", 0)], "sampler.batch=0 must be a positive integer or auto"),
    ([("sampler.foo", 1)], "unknown key sampler.foo; valid keys in sampler: method, nfe, convention, thresholding, "
                           "afs, seeds"),
    ([("grid.spacing", "log")], "grid.spacing='log' is not valid; choose one of uniform, quad"),
    ([("sampler.state_dtype", "half")], "sampler.state_dtype='half' is not valid; choose one of auto, float64, float32"),
    ([("calibration.target", "final")], "calibration.target='final' is not valid; choose one of local, trajectory"),
    ([("model.kind", "x")], "model.kind='x' is not valid; choose one of gaussian, gmm-mnist, python, edm-pkl, "
                            "diffusers, diffusers-sd"),
    ([("model.kind", "gaussian"), ("model.rank", 3)],
     "unknown key model.rank for model.kind=gaussian; valid keys: kind, shape, mean, std, sigma_min, sigma_max"),
    ([("model.kind", "edm-pkl")], "model.path is required for model.kind=edm-pkl"),
    ([("model.kind", "edm-pkl"), ("model.path", "")], "model.path is required for model.kind=edm-pkl"),
    ([("model.kind", "diffusers"), ("model.path", "x"), ("model.dtype", "float8")],
     "model.dtype='float8' is not valid; choose one of float32, float16, bfloat16"),
    ([("model.kind", "diffusers"), ("model.path", "x"), ("model.timestep_lookup", "round")],
     "model.timestep_lookup='round' is not valid; choose one of interp, nearest"),
    ([("model.kind", "gaussian"), ("sampler.dtype", "float16")],
     "--dtype applies to network models (edm-pkl, diffusers, diffusers-sd), not model.kind=gaussian"),
    ([("evaluate.methods", [])], "evaluate.methods is empty"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_section_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grid: [1, 2]\n")
    with pytest.raises(ConfigError, match="config section 'grid' must be a mapping, got list"):
        load_config(path)
    path.write_text("model: gaussian\n")
    with pytest.raises(ConfigError, match="config section 'model' must be a mapping with a 'kind'"):
        load_config(path)


def test_loading_is_canonical_and_validate_changes_nothing():
    cfg = load_config(ROOT / "iia_cli" / "config" / "default.yaml", [("sampler.method", "heun"),
                      ("sampler.dtype", "float16"), ("evaluate.methods", ["euler", "iia-edm"])])
    assert cfg.sampler.method == "edm" and cfg.evaluate.methods == ["ddim", "iia-edm"]
    assert cfg.model.params["dtype"] == "float16"  # sampler.dtype reaches the network at load time
    before = cfg.model_dump()
    validate(cfg)
    assert cfg.model_dump() == before
    cfg.grid.rho = -1.0  # changed in code: validate checks it
    with pytest.raises(ConfigError, match="rho > 0"):
        validate(cfg)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_effective_config_loads_back_to_the_same_config(path, tmp_path):
    cfg = load_config(path)
    out = tmp_path / "effective.yaml"
    out.write_text(yaml.safe_dump(cfg.effective(), sort_keys=False))
    again = load_config(out)
    assert again.effective() == cfg.effective() and again.model.params == cfg.model.params


def test_registry_is_the_one_source_of_model_kinds():
    for name, spec in MODEL_KINDS.items():
        assert typing.get_args(spec.params.model_fields["kind"].annotation) == (name,)
        assert spec.network == ("dtype" in spec.params.model_fields)
    union = typing.get_args(ExperimentConfig.model_fields["model"].annotation)
    assert union == tuple(spec.params for spec in MODEL_KINDS.values())
    for name, spec in MODEL_KINDS.items():  # each kind's defaults reach the loaded config
        extra = {"path": "x", "factory": "m.py:f", "prompts": "p.txt"}
        cfg = load_config(None, [("model.kind", name), *((f"model.{k}", v) for k, v in extra.items()
                                                          if k in spec.params.model_fields)])
        assert type(cfg.model) is spec.params
        for key, info in spec.params.model_fields.items():
            if info.default is not None and not info.is_required() and key != "kind":
                assert cfg.model.params[key] == info.default


def test_calibration_targets_match_the_calibration_code():
    from iia_cli.calibration.iia import TARGETS

    assert CALIBRATION_TARGETS == TARGETS


def test_parsing_a_config_imports_no_diffusers():
    code = ("import sys; from iia_cli.config.experiment import load_config; "
            "load_config('configs/paper/sd21-coco.yaml'); "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_config_command_shows_the_effective_config_and_the_schema(cli, tmp_path):
    r = cli(["config", "--config", ROOT / "configs" / "mnist-gmm.yaml", "--set", "sampler.nfe=7"])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["sampler"]["nfe"] == 7 and shown["model"] == {"kind": "gmm-mnist", "components": 10, "rank": 16,
                                                               "tau2": 0.001, "mle_noise": False, "conditional": False}
    assert shown["calibration"]["ridge"] == 1e-8 and shown["output"]["subdirs"] is False  # defaults filled in
    r = cli(["config", "--schema"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    for name, spec in MODEL_KINDS.items():
        for key in spec.params.model_fields:
            if key != "kind":
                assert any(ln.strip().startswith(f"model.{key} (") for ln in lines), (name, key)
    for section in ("grid", "sampler", "calibration", "output", "fid", "evaluate"):
        for key, info in ExperimentConfig.model_fields[section].default_factory.model_fields.items():
            assert any(ln.startswith(f"{section}.{key} (") and info.description in ln for ln in lines), key
    r = cli(["config", "--set", "sampler.bogus=1"])
    assert r.exit_code == 2 and "unknown key sampler.bogus" in r.output and "Traceback" not in r.output
