"""Hostile inputs at the command line: bad output locations fail before any work with one line, usage errors
are one line (exit 2), results survive a failing final write, and runs leave no litter behind."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BOX = set("╭╮╰╯│─┃━")
COMMANDS = ["sample", "calibrate", "fid-weights", "fid-ref", "fid", "evaluate", "merge", "report", "config"]


@pytest.fixture
def gauss_cfg(tmp_path, write_config):
    cfg = {
        "experiment": "gauss-err",
        "model": {"kind": "gaussian", "shape": [1, 4, 4]},
        "sampler": {"method": "edm", "nfe": 7, "batch": 4},
        "calibration": {"samples": 8, "val_samples": 0, "out_dir": str(tmp_path / "coeffs")},
        "evaluate": {"methods": ["edm"], "nfe": [5], "samples": 4, "error_samples": 2, "reference_nfe": 21},
    }
    return write_config(cfg, "gauss.yaml")


@pytest.fixture
def work(tmp_path, monkeypatch, gauss_cfg):
    """A working directory with a config, a plain file and a directory; returns a snapshot function."""
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "adir.npz").mkdir()
    for name in ("fifo", "fifo.npz", "fifo.pth"):  # not regular files, like /dev/full (which old code replaced)
        os.mkfifo(tmp_path / name)
    monkeypatch.chdir(tmp_path)

    def snapshot():
        return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    return snapshot


def assert_one_line_error(r, code, *needles):
    out = r.output.strip()
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert r.exit_code == code, r.output
    assert len(lines) == 1, r.output
    assert "Traceback" not in out and not BOX & set(out), r.output
    for needle in needles:
        assert needle in lines[0], r.output


# ----------------------------------------------------------------------------------------------------------
# Item 4: outputs are checked before any work; results survive a failing final write


@pytest.mark.parametrize("args, code, needle", [
    (["--out", "afile/o.npz"], 2, "afile is a file, not a directory"),
    (["--out", "o.npz", "--grid-png", "afile/g.png"], 2, "afile is a file, not a directory"),
    (["--out", "adir.npz"], 2, "adir.npz is a directory"),
    (["--out", "/proc/o.npz"], 1, "/proc does not accept new files"),
    (["--out", "/proc/iia/pngs"], 1, "/proc does not accept new files"),
    (["--out", "/dev/full"], 2, "not a directory"),
    (["--out", "o.npz", "--grid-png", "/dev/full"], 2, "must end in .png"),
    (["--out", "fifo.npz"], 2, "not a regular file"),
    (["--out", "o.npz", "--grid-png", "adir.npz"], 2, "must end in .png"),
    (["--out", "afile"], 2, "must end in .npz"),
    (["--grid-png", "/proc/g.png"], 1, "/proc does not accept new files"),
    (["--calibrate", "--method", "iia-edm", "--out", "o.npz", "--set", "calibration.out_dir=afile/c"], 2,
     "calibration.out_dir afile/c: afile is a file"),
])
def test_sample_bad_outputs_fail_before_sampling(cli, gauss_cfg, work, args, code, needle):
    before = work()
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-3", *args])
    assert_one_line_error(r, code, needle)
    assert "sampling" not in r.output  # nothing was computed
    assert work() == before  # nothing was created


@pytest.mark.parametrize("cmd, code, needle", [
    (["calibrate", "--method", "iia-edm", "--nfe", "5", "--out", "afile/c.json"], 2, "afile is a file"),
    (["calibrate", "--method", "iia-edm", "--nfe", "5", "--out", "adir.npz"], 2, "adir.npz is a directory"),
    (["calibrate", "--method", "iia-edm", "--nfe", "5", "--out", "/proc/c.json"], 1, "/proc does not accept"),
    (["calibrate", "--method", "iia-edm", "--nfe", "5", "--out", "fifo"], 2, "not a regular file"),
    (["calibrate", "--method", "iia-edm", "--nfe", "5", "--set", "calibration.out_dir=afile"], 2,
     "exists and is not a directory"),
    (["evaluate", "--no-fid", "--csv", "adir.npz"], 2, "adir.npz is a directory"),
    (["evaluate", "--no-fid", "--csv", "afile/r.csv"], 2, "afile is a file"),
    (["evaluate", "--no-fid", "--csv", "/proc/r.csv"], 1, "/proc does not accept"),
    (["evaluate", "--no-fid", "--csv", "fifo"], 2, "not a regular file"),
    (["evaluate", "--no-fid", "--csv", "gauss.yaml"], 2, "other columns than this tool writes"),
])
def test_config_commands_bad_outputs_fail_before_work(cli, gauss_cfg, work, cmd, code, needle):
    before = work()
    r = cli([cmd[0], "--config", gauss_cfg, *cmd[1:]])
    assert_one_line_error(r, code, needle)
    assert "calibrating" not in r.output and "sampling" not in r.output
    assert work() == before


@pytest.mark.parametrize("cmd, code, needle", [
    (["fid-ref", "--data", "builtin:mnist", "--out", "afile/r.npz"], 2, "afile is a file"),
    (["fid-ref", "--data", "builtin:mnist", "--out", "adir.npz"], 2, "adir.npz is a directory"),
    (["fid-ref", "--data", "builtin:mnist", "--out", "/proc/r.npz"], 1, "/proc does not accept"),
    (["fid-ref", "--data", "builtin:mnist", "--out", "fifo"], 2, "must end in .npz"),
    (["fid-weights", "--from-fid-helper", "--inception-weights", "fifo.pth"], 2, "not a regular file"),
    (["fid-ref", "--data", "builtin:mnist", "--out", "ref.txt"], 2, "must end in .npz"),
    (["fid-weights", "--from-fid-helper", "--inception-weights", "afile/w.pth"], 2, "afile is a file"),
    (["fid-weights", "--from-fid-helper", "--inception-weights", "/proc/w.pth"], 1, "/proc does not accept"),
    (["merge", "adir.npz", "--csv", "adir.npz"], 2, "adir.npz is a directory"),
    (["merge", "adir.npz", "--csv", "fifo"], 2, "not a regular file"),
    (["report", "r.csv", "--plot", "afile/p.png"], 2, "afile is a file"),
    (["report", "r.csv", "--plot", "/proc/p.png"], 1, "/proc does not accept"),
    (["report", "r.csv", "--plot", "plot.xyz"], 2, "must end in .png"),
])
def test_other_commands_bad_outputs(cli, work, cmd, code, needle):
    before = work()
    r = cli(cmd)
    assert_one_line_error(r, code, needle)
    assert "Inception weights:" not in r.output and "converting" not in r.output  # no work started
    assert work() == before


def test_csv_as_directory_is_a_clear_error(cli, gauss_cfg, work):
    """`--csv DIR`: a directory where the CSV file goes is named, and no `.lock` appears inside."""
    r = cli(["evaluate", "--config", gauss_cfg, "--no-fid", "--csv", "adir.npz"])
    assert_one_line_error(r, 2, "--csv adir.npz is a directory", "adir.npz/results.csv")
    assert not list(Path("adir.npz").iterdir()) and not Path("adir.npz.lock").exists()


def test_uncreatable_csv_lock_fails_fast_and_keeps_the_rows(tmp_path):
    """A lock file that cannot be created used to be retried for 600 s, then the rows were lost."""
    (tmp_path / "r.csv.lock").mkdir()  # a directory where the lock file goes: cannot be opened as a file
    code = textwrap.dedent(f"""
        import sys
        from iia_cli.tables.results import append_rows, make_row
        from iia_cli.runtime.errors import IIAError
        try:
            append_rows({str(tmp_path / 'r.csv')!r}, [make_row(experiment='x', method='edm', nfe=5, metric='fid', value=1.5)])
        except IIAError as exc:
            print(exc)
            sys.exit(3)
    """)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert time.monotonic() - t0 < 30
    assert out.returncode == 3, out.stderr
    msg = out.stdout.strip()
    assert "cannot create the lock file" in msg and "were saved to" in msg and "\n" not in msg
    rescued = Path(msg.split("were saved to ")[1].split(" instead")[0])
    assert rescued.parent == tmp_path and rescued.read_text().splitlines()[1].startswith("x,")


def test_failed_final_npz_write_keeps_the_samples(cli, gauss_cfg, work, monkeypatch):
    """The final .npz cannot be written (e.g. the disk filled up while sampling): the samples are saved to a
    rescue file and the error says where."""
    from iia_cli.io import atomic

    real = atomic._write_via_temp
    target = Path("o.npz").absolute()

    def refuse_target(path, write):
        if Path(path).absolute() == target:
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(atomic, "_write_via_temp", refuse_target)
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-5", "--out", "o.npz"])
    assert_one_line_error(r, 1, "could not write o.npz (No space left on device)", "6 samples were saved to")
    rescued = Path(r.output.split("were saved to ")[1].split(" instead")[0])
    assert rescued.parent == Path.cwd() / "iia-rescued"
    data = np.load(rescued)
    assert list(data["seeds"]) == list(range(6)) and data["x"].shape == (6, 1, 4, 4)
    assert not target.exists()


def test_failed_csv_append_keeps_the_rows(tmp_path, monkeypatch):
    from iia_cli.tables import results
    from iia_cli.io.atomic import OutputRescued

    def full(path, rows, skip_done=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "_append_rows", full)
    rows = [results.make_row(experiment="x", method="edm", nfe=5, metric="fid", value=v) for v in (1.5, 2.5)]
    with pytest.raises(OutputRescued, match="2 result rows were saved to") as info:
        results.append_rows(tmp_path / "r.csv", rows)
    back = results.read_results(info.value.rescued)
    assert list(back["value"]) == [1.5, 2.5] and list(back.columns) == results.COLUMNS


# ----------------------------------------------------------------------------------------------------------
# Item 8 / issue 16 item 5: Typer's usage errors become one line; flags read as flags


USAGE = [
    (["sample", "--bogus"], "No such option: --bogus"),
    (["sample", "--nfe", "ten"], "Invalid value for '--nfe'"),
    (["sample", "--out"], "Option '--out' requires an argument"),
    (["sample", "extra"], "unexpected extra argument"),
    (["calibrate", "--samples", "1.5"], "Invalid value for '--samples'"),
    (["calibrate", "--what"], "No such option: --what"),
    (["fid-weights", "--from-fid-helper", "yes"], "--from-fid-helper is a flag and takes no value"),
    (["fid-ref", "--out", "r.npz"], "Missing option '--data'"),
    (["fid-ref", "--data", "x", "--out", "r.npz", "--batch", "0"], "Invalid value for '--batch'"),
    (["fid", "--images", "x"], "Missing option '--ref'"),
    (["fid", "--images", "x", "--ref", "r.npz", "--json", "true"], "--json is a flag and takes no value"),
    (["evaluate", "--no-fid", "true"], "--no-fid is a flag and takes no value"),
    (["evaluate", "--fresh", "1"], "--fresh is a flag and takes no value"),
    (["evaluate", "--samples", "many"], "Invalid value for '--samples'"),
    (["merge"], "Missing argument"),
    (["merge", "shards"], "Missing option '--csv'"),
    (["report"], "Missing argument"),
    (["report", "a.csv", "b.csv"], "unexpected extra argument"),
    (["nosuchcommand"], "No such command"),
]


@pytest.mark.parametrize("args, needle", USAGE)
def test_usage_errors_are_one_line(cli, work, args, needle):
    before = work()
    r = cli(args)
    assert_one_line_error(r, 2, needle, f"see 'iia {args[0] if args[0] in COMMANDS else ''}".rstrip())
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert work() == before


def test_usage_error_one_line_from_the_console_script():
    out = subprocess.run([sys.executable, "-m", "iia_cli", "evaluate", "--no-fid", "true"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "--no-fid is a flag" in out.stderr
    assert not BOX & set(out.stderr)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_as_flags(cli, command):
    """Every option that takes no value appears in --help without a value placeholder (no `<bool>`)."""
    import typer

    from iia_cli.cli.app import app

    r = cli([command, "--help"])
    assert r.exit_code == 0 and not BOX & set(r.output), r.output
    assert "<bool>" not in r.output
    click_cmd = typer.main.get_command(app).commands[command]
    flags = [opt for p in click_cmd.params if getattr(p, "is_flag", False) for opt in p.opts] + ["--help"]
    lines = r.output.splitlines()
    for flag in flags:
        line = next(ln for ln in lines if ln.strip().split(" ")[0].rstrip(",") in (flag,) or f" {flag} " in f" {ln} ")
        after = line.split(flag, 1)[1].lstrip()
        assert not after.startswith("<"), line


def test_missing_coefficients_suggest_the_typed_command(cli, gauss_cfg, work, monkeypatch, tmp_path):
    """The suggestion repeats what the user typed (config as typed, overrides that shape the coefficients),
    never the package's internal default config path."""
    r = cli(["sample", "--config", "gauss.yaml", "--method", "iia-edm", "--nfe", "9", "--set", "grid.rho=5",
             "--set", "sampler.seeds=0-3", "--out", "o.npz"])
    assert_one_line_error(r, 1, "`iia calibrate --config gauss.yaml --method iia-edm --nfe 9 --set grid.rho=5`")
    # Without --config: the built-in default is used; its path inside the package is not suggested.
    from iia_cli.cli import common as cli_common

    internal = tmp_path / "site-packages" / "iia_cli" / "config" / "default.yaml"
    internal.parent.mkdir(parents=True)
    internal.write_bytes(gauss_cfg.read_bytes())
    monkeypatch.setattr(cli_common, "DEFAULT_CONFIG", internal)
    r = cli(["sample", "--method", "iia-edm", "--out", "o.npz"])
    assert_one_line_error(r, 1, "`iia calibrate --method iia-edm`")
    assert "default.yaml" not in r.output and "site-packages" not in r.output


def test_calibrate_prints_the_coefficient_path_once(cli, gauss_cfg, work):
    r = cli(["calibrate", "--config", gauss_cfg, "--method", "iia-edm", "--nfe", "5"])
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]
    assert Path(path).is_file() and r.output.count(path) == 1, r.output


# ----------------------------------------------------------------------------------------------------------
# Item 9: leftovers


def test_stale_checkpoint_temp_after_sigkill_is_cleaned(cli, gauss_cfg, work, tmp_path):
    """SIGKILL while a checkpoint is being written leaves its temporary file; the next run removes it."""
    code = textwrap.dedent("""
        import os, signal
        from pathlib import Path
        from iia_cli.io.atomic import atomic_write

        def die(tmp):
            tmp.write_bytes(b"half a checkpoint")
            os.kill(os.getpid(), signal.SIGKILL)

        atomic_write(Path(".o.partial-r0of1.npz"), die)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, timeout=60)
    assert out.returncode == -9
    stale = list(tmp_path.glob(".*.partial*.tmp"))
    assert len(stale) == 1
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-3", "--out", "o.npz"])
    assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob(".*.tmp")) and np.load("o.npz")["x"].shape == (4, 1, 4, 4)


def test_live_writers_temp_is_kept(tmp_path):
    """A temporary file whose writer still runs is not stale."""
    from iia_cli.io.atomic import remove_stale_temps, temp_prefix

    mine = tmp_path / (temp_prefix(tmp_path / "o.npz") + "abc123.tmp")
    mine.write_bytes(b"in progress")
    user = tmp_path / ".notes.tmp"
    user.write_bytes(b"not ours")
    assert remove_stale_temps(tmp_path) == [] and mine.exists() and user.exists()


def test_empty_png_directory_is_removed_after_a_failure(cli, work, tmp_path, write_config):
    (tmp_path / "nanmodel.py").write_text(
        "import torch\n"
        "class NaN:\n"
        "    shape = (1, 2, 2); sigma_min = 0.01; sigma_max = 10.0\n"
        "    def __call__(self, x, sigma, class_labels=None):\n"
        "        return x * float('nan')\n"
        "def build():\n"
        "    return NaN()\n")
    cfg = write_config({"model": {"kind": "python", "factory": f"{tmp_path / 'nanmodel.py'}:build"},
                        "sampler": {"method": "ddim", "nfe": 3}}, "nan.yaml")
    r = cli(["sample", "--config", cfg, "--seeds", "0-1", "--out", "new/pngs"])
    assert_one_line_error(r, 1, "non-finite samples")
    assert not (tmp_path / "new").exists()
    # A directory that existed before stays.
    (tmp_path / "kept").mkdir()
    r = cli(["sample", "--config", cfg, "--seeds", "0-1", "--out", "kept"])
    assert r.exit_code == 1 and (tmp_path / "kept").is_dir()


def test_internal_errors_are_one_line(cli, gauss_cfg, work, monkeypatch):
    """An unexpected exception (a bug) prints one line naming it, exit 1; IIA_DEBUG=1 shows the traceback."""
    from iia_cli import api

    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(api, "sample", boom)
    r = cli(["sample", "--config", gauss_cfg, "--out", "o.npz"])
    assert_one_line_error(r, 1, "internal error", "ZeroDivisionError: division by zero", "IIA_DEBUG=1")
    monkeypatch.setenv("IIA_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli(["sample", "--config", gauss_cfg, "--out", "o.npz"])


@pytest.mark.parametrize("name, value, valid", [
    ("IIA_CHECKPOINT_EVERY_S", "soon", "a number of seconds >= 0"),
    ("IIA_CHECKPOINT_EVERY_S", "-5", "a number of seconds >= 0"),
    ("IIA_PROGRESS_EVERY_S", "nan", "a number of seconds >= 0"),
    ("WORLD_SIZE", "two", "an integer >= 1"),
    ("RANK", "3", "0..0"),
])
@pytest.mark.parametrize("command", ["sample", "calibrate", "evaluate"])
def test_bad_environment_knob_is_one_line_before_any_work(cli, gauss_cfg, work, monkeypatch, name, value, valid,
                                                           command):
    before = work()
    monkeypatch.setenv(name, value)
    args = [command, "--config", gauss_cfg] + (["--out", "x.npz"] if command == "sample" else [])
    r = cli(args)
    assert_one_line_error(r, 2, name, repr(value), valid)
    assert work() == before  # nothing written


def test_environment_knobs_are_read_once_per_run(cli, gauss_cfg, work, monkeypatch):
    """The checkpoint interval is read before the sampling loop, not at every batch."""
    from iia_cli.runtime import envvars

    reads = []
    real = envvars.seconds
    monkeypatch.setattr(envvars, "seconds", lambda name: reads.append(name) or real(name))
    r = cli(["sample", "--config", gauss_cfg, "--seeds", "0-11", "--batch", "2", "--out", "x.npz"])
    assert r.exit_code == 0, r.output
    assert reads.count("IIA_CHECKPOINT_EVERY_S") == 2  # the CLI's up-front check and the run's one read


@pytest.mark.parametrize("shard", [False, True])
def test_evaluate_plans_its_outputs_where_layout_puts_them(tmp_path, monkeypatch, shard):
    """The up-front output checks of `iia evaluate` follow layout.py (the results CSV, the shard directory and the
    FID checkpoints), not a second copy of the paths."""
    from iia_cli.io import layout
    from iia_cli.config.experiment import load_config
    from iia_cli.cli.evaluate import plan_evaluate_outputs
    from iia_cli.io.paths import OutputPlan

    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere" / "results"
    monkeypatch.setattr(layout, "RESULTS_DIR", moved)
    cfg = load_config(None, [("model.kind", "gaussian"), ("experiment", "moved"),
                             ("calibration.out_dir", str(tmp_path / "coeffs"))])
    plan = OutputPlan()
    plan_evaluate_outputs(plan, cfg, None, shard=shard, fid=True)
    planned = set(plan.to_create)
    assert layout.partial_dir() in planned and (layout.shard_dir("moved") in planned) == shard
    assert all(not str(p).startswith(str(tmp_path / "results")) for p in planned), planned
    (tmp_path / "blocked").write_text("a file where the results directory would go\n")
    monkeypatch.setattr(layout, "RESULTS_DIR", tmp_path / "blocked" / "results")
    from iia_cli.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="blocked is a file, not a directory"):
        plan_evaluate_outputs(OutputPlan(), cfg, None, shard=shard, fid=False)


def _binary_configs(tmp_path):
    from PIL import Image

    png = tmp_path / "picture.yaml"
    Image.new("L", (4, 4)).save(png, format="PNG")
    noise = tmp_path / "noise.yaml"
    noise.write_bytes(b"model:\n  kind: gaussian\n" + b"\xff" + os.urandom(256))  # not UTF-8 from the \xff on
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"model:\x00\x01\x02\n")  # UTF-8, but not YAML text
    return {png: "is not a text file", noise: "is not a text file", nul: "is not valid YAML"}


@pytest.mark.parametrize("command", ["sample", "calibrate", "evaluate", "config"])
def test_binary_config_file_is_a_one_line_usage_error(cli, work, tmp_path, command):
    for path, needle in _binary_configs(tmp_path).items():
        before = work()
        r = cli([command, "--config", path])
        assert_one_line_error(r, 2, f"config {path}", needle)
        assert "internal error" not in r.output
        assert work() == before
