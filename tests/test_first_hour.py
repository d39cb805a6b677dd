"""The researcher's first hour: --version, help defaults that match what runs, lists in --set, messages that say
what happened, coefficient locations, sample grids and the paper configs' up-front file check."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_version_and_git_revision(tmp_path):
    from iia_cli import __version__

    out = subprocess.run([sys.executable, "-m", "iia_cli", "--version"], capture_output=True, text=True,
                         cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if rev.returncode == 0:  # a checkout: the revision of the package's checkout, wherever the command runs
        assert out.stdout.startswith(f"iia {__version__} (git {rev.stdout.strip()}")
    else:
        assert out.stdout.strip() == f"iia {__version__}"


def test_version_without_checkout_is_the_version_alone(cli, monkeypatch):
    import iia_cli.tables.results
    from iia_cli import __version__

    monkeypatch.setattr(iia_cli.tables.results, "git_revision", lambda: "unknown")
    r = cli(["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"iia {__version__}"


# One example per list-typed key (value as a,b; the loaded list; the other --set keys it needs). A list key without
# an example fails test_every_list_key_takes_both_forms, so a new list key is tested too.
LIST_EXAMPLES = {
    "evaluate.methods": ("ddim,iia-ddim", ["ddim", "iia-ddim"], []),
    "evaluate.nfe": ("6,8", [6, 8], []),
    "evaluate.metrics": ("fid,integration_rmse", ["fid", "integration_rmse"], []),
    "grid.sigmas": ("80,10,1", [80.0, 10.0, 1.0], ["grid.kind=list"]),
    "model.shape": ("1,4,4", [1, 4, 4], ["model.kind=gaussian"]),
}
SEMICOLON_LISTS = {"evaluate.seed_ranges": ("0-9;10,12", ["0-9", "10,12"], [])}  # seed specs contain commas


def _list_keys():
    from iia_cli.config.experiment import SECTIONS, ExperimentConfig
    from iia_cli.models.registry import MODEL_KINDS

    def arrays(cls, prefix):
        props = cls.model_json_schema()["properties"]
        for name, prop in props.items():
            kinds = [prop, *prop.get("anyOf", [])]
            if any(k.get("type") == "array" for k in kinds):
                yield prefix + name

    keys = set()
    for spec in MODEL_KINDS.values():
        keys |= set(arrays(spec.params, "model."))
    for name in SECTIONS[1:]:
        keys |= set(arrays(ExperimentConfig.model_fields[name].default_factory, f"{name}."))
    return keys


def test_every_list_key_takes_both_forms():
    from iia_cli.config.experiment import load_config, parse_set

    examples = {**LIST_EXAMPLES, **SEMICOLON_LISTS}
    assert _list_keys() == set(examples), "a list-typed key without an example here"
    for key, (text, want, extra) in examples.items():
        sep = ";" if key in SEMICOLON_LISTS else ","
        bracket = "[" + ", ".join(repr(v) if isinstance(v, str) else str(v) for v in want) + "]"
        for form in (text, bracket, text.replace(sep, f"{sep} ")):
            cfg = load_config(None, parse_set([*extra, f"{key}={form}"]))
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == want, (key, form)


def test_list_keys_in_the_cli(cli):
    r = cli(["config", "--set", "evaluate.methods=ddim,iia-ddim", "--set", "evaluate.nfe=[6, 8]"])
    assert r.exit_code == 0, r.output
    assert "methods:\n  - ddim\n  - iia-ddim\n  nfe:\n  - 6\n  - 8\n" in r.stdout


def test_unknown_method_suggests_the_closest(cli):
    r = cli(["config", "--set", "evaluate.methods=ddim,iia-dim"])
    assert r.exit_code == 2
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: unknown method 'iia-dim'; did you mean iia-ddim")


def _options():
    """(command, option, help) of every option of every command."""
    import typer.main

    from iia_cli.cli.app import app

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for param in cmd.params:
            yield name, param.opts[0], getattr(param, "help", "") or ""


KEY_DEFAULT = r"\((\w+\.\w+); default (.+?)(?: without --config, (.+?) when a config omits it)?\)\.?$"
# Options whose help mentions a default that is not a config key's (a CLI option's own, or a derived one).
OTHER_DEFAULTS = {("sample", "--config"), ("calibrate", "--config"), ("config", "--config"), ("evaluate", "--config"),
                  ("sample", "--coeffs"), ("calibrate", "--out"), ("config", "--show"), ("evaluate", "--csv"),
                  ("evaluate", "--metrics"), ("evaluate", "--fresh"), ("report", "--metric"),
                  ("fid-weights", "--inception-weights"),
                  ("fid-ref", "--inception-weights"), ("fid", "--inception-weights"),
                  ("grid", "--config"), ("grid", "--batch")}


def test_help_defaults_are_what_runs(cli, tmp_path):
    """Every default a help text shows is the value a run uses: the built-in config's without --config, the
    schema's for a config that omits the key (read back with `iia config`)."""
    import re

    import yaml

    from iia_cli.cli.common import show_value

    builtin = yaml.safe_load(cli(["config"]).stdout)
    (tmp_path / "empty.yaml").write_text("experiment: x\n")
    schema = yaml.safe_load(cli(["config", "--config", tmp_path / "empty.yaml"]).stdout)
    seen = set()
    for command, option, text in _options():
        m = re.search(KEY_DEFAULT, text)
        if m is None:
            assert "default" not in text.lower() or (command, option) in OTHER_DEFAULTS, (command, option, text)
            continue
        section, name = m.group(1).split(".")
        want_builtin, want_schema = m.group(2), m.group(3) or m.group(2)
        assert show_value(builtin[section][name]) == want_builtin, (command, option, text)
        assert show_value(schema[section][name]) == want_schema, (command, option, text)
        seen.add((command, option))
    assert {("calibrate", "--samples"), ("calibrate", "--substeps"), ("calibrate", "--teacher-substeps"),
            ("sample", "--batch"), ("sample", "--method"), ("evaluate", "--nfe")} <= seen


def test_set_is_shown_the_same_way_everywhere():
    import typer.main

    from iia_cli.cli.app import app

    shown = set()
    for cmd in typer.main.get_command(app).commands.values():
        for param in cmd.params:
            if "--set" in param.opts:
                shown.add((param.metavar, param.help))
    assert len(shown) == 1 and next(iter(shown))[0] == "KEY=VALUE"


@pytest.fixture
def gauss_cfg(tmp_path, write_config):
    return write_config({"experiment": "gauss-fh", "model": {"kind": "gaussian", "shape": [1, 4, 4]},
                         "sampler": {"method": "edm", "nfe": 7, "batch": 8},
                         "calibration": {"samples": 16, "val_samples": 8, "out_dir": str(tmp_path / "coeffs")}},
                        "gauss.yaml")


def test_calibrate_with_nothing_to_fit_is_refused(cli, gauss_cfg):
    r = cli(["calibrate", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "2"])
    assert r.exit_code == 2 and "nan" not in r.output
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "nothing to calibrate" in err[0] and "step 0: its quantities need earlier steps" in err[0]
    assert "use --nfe" in err[0]


def test_progress_counts_the_fitted_steps_and_names_the_others(cli, gauss_cfg, monkeypatch):
    import re

    monkeypatch.setenv("IIA_PROGRESS_EVERY_S", "0")
    r = cli(["calibrate", "--config", gauss_cfg, "--method", "iia-ddim", "--nfe", "8", "--no-guard"])
    assert r.exit_code == 0, r.output
    fitted = re.findall(r"^  step +(\d+) ", r.stderr, re.M)
    assert fitted == [str(i) for i in range(1, 7)]
    started = re.search(r"calibrating iia-ddim \(16 noises\): started, (\d+) steps", r.stderr)
    assert started and int(started.group(1)) == len(fitted)
    assert "fitting 6 of 8 steps" in r.stderr and "step 0: its quantities need earlier steps" in r.stderr
    assert "step 7: the final step to sigma 0 is never corrected" in r.stderr


def test_sample_says_when_the_guard_turned_iia_off(cli, gauss_cfg, tmp_path):
    import json

    r = cli(["calibrate", "--config", gauss_cfg, "--method", "iia-ddim", "--nfe", "6"])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    args = ["sample", "--config", gauss_cfg, "--method", "iia-ddim", "--nfe", "6", "--seeds", "0-1",
            "--out", tmp_path / "s.npz"]
    r = cli(args)
    assert r.exit_code == 0 and "(guard)" not in r.stdout
    data = json.loads(path.read_text())  # as if the guard had found every correction harmful
    data["guard_alpha"] = 0.0
    data["coefficients"] = [[0.0 * c for c in step] for step in data["coefficients"]]
    path.write_text(json.dumps(data))
    r = cli(args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("iia-ddim nfe=6 (= ddim (guard)")


@pytest.mark.parametrize("n, shape", [(8, (2, 4)), (6, (2, 3)), (12, (3, 4)), (16, (4, 4)), (64, (8, 8)), (3, (1, 3)),
                                      (10, (2, 5)), (13, (4, 4))])
def test_grid_shape_has_no_blank_tiles_where_possible(n, shape):
    from iia_cli.io.images import grid_shape

    assert grid_shape(n) == shape


def test_sample_grid_png_is_titled_and_full(cli, gauss_cfg, tmp_path):
    import inspect

    import numpy as np
    from PIL import Image

    import iia_cli.io.images

    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-7", "--grid-png", tmp_path / "g.png"])
    assert r.exit_code == 0, r.output
    im = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    tile = 4 * 32 + 2  # 4 x 4 images upscaled 32x (512 px / 4 columns), 2 px padding
    assert im.shape[1] == 4 * tile + 2  # 2 x 4, not 3 x 3 with a blank tile
    band = im.shape[0] - (2 * tile + 2)
    assert 8 <= band <= 40 and (im[:band] < 128).any() and (im[:band] > 128).any()  # black text on white
    assert "matplotlib" not in inspect.getsource(iia_cli.io.images)  # no pyplot global state


def test_coefficients_are_found_from_any_directory_under_iia_home(cli, tmp_path, write_config, monkeypatch):
    cfg = write_config({"experiment": "home", "model": {"kind": "gaussian", "shape": [1, 4, 4]},
                        "sampler": {"method": "iia-ddim", "nfe": 5, "batch": 8},
                        "calibration": {"samples": 8, "val_samples": 0}}, "home.yaml")
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    monkeypatch.delenv("IIA_HOME", raising=False)
    monkeypatch.chdir(tmp_path / "a")
    r = cli(["calibrate", "--config", cfg])
    assert r.exit_code == 0, r.output
    default = Path(r.stdout.strip().splitlines()[-1])
    assert default.parts[:2] == ("results", "coefficients")  # unchanged without IIA_HOME: rows record this path
    monkeypatch.chdir(tmp_path / "b")
    sample = ["sample", "--config", cfg, "--seeds", "0-1", "--out", tmp_path / "s.npz"]
    r = cli(sample)
    assert r.exit_code == 1 and str(tmp_path / "b") in r.stderr and "IIA_HOME" in r.stderr  # says where it looked
    monkeypatch.setenv("IIA_HOME", str(tmp_path / "home"))
    r = cli(["calibrate", "--config", cfg])
    assert r.exit_code == 0, r.output
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.parent == tmp_path / "home" / "results" / "coefficients" and path.name == default.name
    monkeypatch.chdir(tmp_path / "a")
    r = cli(sample)
    assert r.exit_code == 0, r.output
    assert f"coefficients {path}" in r.stderr  # the location used


@pytest.mark.parametrize("name", ["edm-cifar10-cond-vp", "edm-ffhq-64", "edm-afhqv2-64", "edm-imagenet-64",
                                  "ddim-cifar10"])
def test_paper_configs_name_every_missing_file_and_its_source(cli, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # none of the checkpoints or statistics here
    r = cli(["evaluate", "--config", ROOT / "configs" / "paper" / f"{name}.yaml", "--nfe", "11"])
    assert r.exit_code == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "2 input file(s)" in err[0]
    assert "model.path checkpoints/" in err[0] and "fid.reference refs/" in err[0]
    assert err[0].count("(from ") == 2  # where each comes from
