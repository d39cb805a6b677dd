"""Real checkpoint formats end to end through the CLI: tiny randomly initialised networks are built in each
format inside the tests (``ckpt_builders.py``), then loaded, sampled and calibrated with ``iia``.

* EDM persistence pickles (unconditional and class-conditional): sample, calibrate -> coefficient file ->
  sample, the fingerprint following the pickle's bytes, per-seed class labels as EDM draws them, bfloat16.
* diffusers ``UNet2DModel`` directories (bare and pipeline layout, epsilon and v-prediction): the discrete
  DDIM grid, sampling equal to diffusers' own ``DDIMScheduler`` loop, IIA-DDIM calibrate -> sample.
* Errors: missing or corrupt checkpoints exit 1 with one line, a discrete grid on an EDM pickle exits 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import ConfigWriter
from ckpt_builders import HAS_DIFFUSERS, LABEL_LOG_ENV, write_edm_pickle

needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")

SHAPE = (3, 8, 8)
LABEL_DIM = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _write_cfg(tmp_path: Path, model: dict[str, Any], name: str = "cfg", **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "experiment": name,
        "model": {k: str(v) if isinstance(v, Path) else v for k, v in model.items()},
        "sampler": {"batch": 4, "device": "cpu"},
        "calibration": {"samples": 8, "val_samples": 4, "substeps": 2, "out_dir": str(tmp_path / "coeffs")},
    }
    if model.get("kind") == "edm-pkl":  # the test pickles embed our own test source, not NVlabs/edm's
        cfg["model"].setdefault("trust_code", True)
    return ConfigWriter(tmp_path)(cfg, name, **sections)


def _ok(r: Any) -> Any:
    assert r.exit_code == 0, r.output
    return r


def _error_line(r: Any, only: bool = True) -> str:
    """The one ``error: ...`` line of a failed command: the only stderr line when ``only`` (else after log
    lines), and no traceback."""
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), r.stderr
    assert (len(lines) == 1) if only else sum(line.startswith("error") for line in lines) == 1, r.stderr
    assert "Traceback" not in r.output
    return lines[-1]


def _edm_labels(seeds: list[int], label_dim: int) -> list[int]:
    """EDM's per-seed draw, written independently: the noise first, then the label, from one generator."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        torch.randn(SHAPE, generator=g)
        out.append(int(torch.randint(label_dim, (1,), generator=g)))
    return out


# ==================================================================================================
# EDM persistence pickles.


@pytest.fixture(scope="module")
def edm_pkls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edm_pkls")
    return {
        "uncond": write_edm_pickle(root / "uncond.pkl", label_dim=0, seed=0),
        "cond": write_edm_pickle(root / "cond.pkl", label_dim=LABEL_DIM, seed=1, record_labels=True),
    }


@pytest.mark.parametrize("kind", ["uncond", "cond"])
def test_edm_pickle_sample_calibrate_sample(cli, edm_pkls: dict[str, Path], tmp_path: Path, kind: str) -> None:
    cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": edm_pkls[kind]})
    _ok(cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "0-3", "--out", tmp_path / "x.npz"]))
    base = np.load(tmp_path / "x.npz")
    assert base["x"].shape == (4, *SHAPE) and np.isfinite(base["x"]).all() and base["x"].std() > 0.01
    assert int(base["nfe"]) == 5 and str(base["method"]) == "edm" and list(base["seeds"]) == [0, 1, 2, 3]
    # Heun at NFE 5: 3 Karras sigmas clipped to the network's [0, inf) -> [0.002, 80], plus the final 0.
    assert base["sigmas"][0] == 80.0 and base["sigmas"][-1] == 0.0 and len(base["sigmas"]) == 4

    r = _ok(cli(["calibrate", "--config", cfg, "--method", "iia-edm", "--nfe", 7]))
    coeff_path = Path(r.stdout.strip().splitlines()[-1])
    assert coeff_path.parent == tmp_path / "coeffs" and coeff_path.name.startswith("edm-pkl-")
    data = json.loads(coeff_path.read_text())
    assert data["method"] == "iia-edm" and data["nfe"] == 7 and data["model_kind"] == "edm-pkl"
    assert data["samples"] == 8 and data["substeps"] == 2 and len(data["val_residual_iia"]) == len(data["coefficients"])
    assert any(len(c) > 0 for c in data["coefficients"])

    # The sampler finds the file by model, method, grid and NFE, and uses it.
    r = _ok(cli(["sample", "--config", cfg, "--method", "iia-edm", "--nfe", 7, "--seeds", "0-3",
                 "--out", tmp_path / "iia.npz"]))
    assert str(coeff_path) in r.stderr
    iia = np.load(tmp_path / "iia.npz")
    assert str(iia["model_sha256"]) == data["model_sha256"] == str(base["model_sha256"])
    assert np.array_equal(iia["sigmas"], np.asarray(data["sigmas"]))
    _ok(cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 7, "--seeds", "0-3", "--out", tmp_path / "e7.npz"]))
    assert not np.array_equal(iia["x"], np.load(tmp_path / "e7.npz")["x"])

    # Other bytes (one trailing byte: the same network) -> another fingerprint, another coefficient file,
    # and the old file is refused for the new pickle.
    changed = tmp_path / "changed.pkl"
    changed.write_bytes(edm_pkls[kind].read_bytes() + b"\0")
    r = _ok(cli(["calibrate", "--config", cfg, "--method", "iia-edm", "--nfe", 7, "--set", f"model.path={changed}"]))
    other_path = Path(r.stdout.strip().splitlines()[-1])
    other = json.loads(other_path.read_text())
    assert other_path != coeff_path and other["model_sha256"] != data["model_sha256"]
    assert np.allclose(np.concatenate([np.asarray(c, dtype=float) for c in other["coefficients"]]),
                       np.concatenate([np.asarray(c, dtype=float) for c in data["coefficients"]]))
    r = cli(["sample", "--config", cfg, "--method", "iia-edm", "--nfe", 7, "--coeffs", coeff_path,
             "--set", f"model.path={changed}", "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "another model" in _error_line(r)


def _recorded(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_edm_class_labels_per_seed(cli, edm_pkls: dict[str, Path], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The labels the network receives are one-hot, drawn per seed after the noise (as EDM does)."""
    log = tmp_path / "labels.jsonl"
    monkeypatch.setenv(LABEL_LOG_ENV, str(log))
    cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": edm_pkls["cond"]})
    seeds = list(range(6))
    expected = _edm_labels(seeds, LABEL_DIM)
    assert len(set(expected)) > 1  # the check below can tell seeds apart

    # Batches of 4: seeds 0-3, then 4-5; Heun at NFE 5 makes 5 calls per batch.
    _ok(cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "0-5", "--batch", 4,
             "--out", tmp_path / "x.npz"]))
    calls = _recorded(log)
    assert [c["batch"] for c in calls] == [4] * 5 + [2] * 5
    for k, call in enumerate(calls):
        rows = np.asarray(call["labels"])
        assert rows.shape == (call["batch"], LABEL_DIM)
        assert np.array_equal(np.sort(rows, axis=1)[:, :-1], np.zeros((len(rows), LABEL_DIM - 1)))
        assert np.array_equal(rows.max(axis=1), np.ones(len(rows)))  # one-hot
        batch = expected[:4] if k < 5 else expected[4:]
        assert rows.argmax(axis=1).tolist() == batch
    # An image depends on its seed only: seed 5 alone gets the same label and the same image (up to float32
    # rounding: a convolution's summation order may change with the batch size).
    log.unlink()
    _ok(cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "5", "--out", tmp_path / "s5.npz"]))
    assert {tuple(np.asarray(c["labels"]).argmax(axis=1)) for c in _recorded(log)} == {(expected[5],)}
    np.testing.assert_allclose(np.load(tmp_path / "s5.npz")["x"][0], np.load(tmp_path / "x.npz")["x"][5],
                               rtol=1e-5, atol=1e-5)

    # --class 2 fixes every label; the noise stays the seed's.
    log.unlink()
    _ok(cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "0-5", "--class", 2,
             "--out", tmp_path / "c2.npz"]))
    calls = _recorded(log)
    assert len(calls) == 10 and all(np.asarray(c["labels"]).argmax(axis=1).tolist() == [2] * c["batch"] for c in calls)
    fixed = np.load(tmp_path / "c2.npz")["x"]
    same = [s for s in seeds if expected[s] == 2]
    differ = [s for s in seeds if expected[s] != 2]
    np.testing.assert_allclose(fixed[same], np.load(tmp_path / "x.npz")["x"][same], rtol=1e-5, atol=1e-5)
    assert not np.allclose(fixed[differ], np.load(tmp_path / "x.npz")["x"][differ])

    r = cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "0", "--class", LABEL_DIM,
             "--out", tmp_path / "bad.npz"])
    assert r.exit_code == 2 and "class label 4 is out of range; choose 0..3" in _error_line(r, only=False)


def test_edm_pickle_bfloat16(cli, edm_pkls: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": edm_pkls["cond"]})
    args = ["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--seeds", "0-3"]
    _ok(cli([*args, "--out", tmp_path / "f32.npz"]))
    _ok(cli([*args, "--set", "model.dtype=bfloat16", "--out", tmp_path / "bf16.npz"]))
    f32, bf16 = np.load(tmp_path / "f32.npz"), np.load(tmp_path / "bf16.npz")
    assert bf16["x"].dtype == np.float32 and np.isfinite(bf16["x"]).all()
    assert not np.array_equal(bf16["x"], f32["x"])  # autocast really ran in bfloat16
    np.testing.assert_allclose(bf16["x"], f32["x"], atol=0.05 * float(np.abs(f32["x"]).max()))
    assert str(bf16["model_sha256"]) != str(f32["model_sha256"])  # the dtype is part of the fingerprint


# ==================================================================================================
# diffusers UNet2DModel directories.


PREDICTION = {"bare": "epsilon", "epsilon": "epsilon", "v_prediction": "v_prediction"}  # unet_dirs: conftest.py


def _diffusers_ddim(path: Path, prediction_type: str, seeds: list[int], steps: int) -> torch.Tensor:
    """DDIM (eta = 0) with diffusers' own scheduler and UNet, started from our x_T = sigma_T * noise(seed)
    mapped to z_T = x_T * sqrt(abar_T); the last step goes to alpha-bar 1, so z_0 = x_0."""
    from diffusers import DDIMScheduler, UNet2DModel

    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert timesteps == list(range(0, 1000, 1000 // steps))[::-1]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[timesteps[0]]
    sigma_max = ((1 - abar) / abar).sqrt()
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = (noise.double() * sigma_max * abar.sqrt()).float()
    with torch.no_grad():
        for t in timesteps:
            z = scheduler.step(unet(z, t).sample, t, z, eta=0.0).prev_sample
    return z


@needs_diffusers
@pytest.mark.parametrize("layout", ["bare", "epsilon", "v_prediction"])
def test_diffusers_discrete_ddim_matches_diffusers(cli, unet_dirs: dict[str, Path], tmp_path: Path,
                                                   layout: str) -> None:
    from iia_cli.models.diffusers_unet import load_diffusers_unet

    path = unet_dirs[layout]
    cfg = _write_cfg(tmp_path, {"kind": "diffusers", "path": path}, grid={"kind": "discrete"})
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 10, "--seeds", "0-2",
             "--out", tmp_path / "x.npz"]))
    out = np.load(tmp_path / "x.npz")
    # Exactly the timesteps range(0, 1000, 100) reversed, then 0.
    den = load_diffusers_unet(path)
    assert den.prediction_type.value == PREDICTION[layout]
    expected = torch.cat([den.discrete_sigmas[list(range(0, 1000, 100))[::-1]], torch.zeros(1, dtype=torch.float64)])
    assert out["sigmas"].dtype == np.float64 and np.array_equal(out["sigmas"], expected.numpy())
    assert str(out["grid"]) == "discrete" and int(out["nfe"]) == 10

    ref = _diffusers_ddim(path, PREDICTION[layout], [0, 1, 2], 10)
    assert ref.abs().max() > 0.05
    torch.testing.assert_close(torch.from_numpy(out["x"]), ref, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
@needs_diffusers
def test_diffusers_iia_ddim_calibrate_sample(cli, unet_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, {"kind": "diffusers", "path": unet_dirs["epsilon"]}, grid={"kind": "discrete"})
    r = _ok(cli(["calibrate", "--config", cfg, "--method", "iia-ddim", "--nfe", 10]))
    coeff_path = Path(r.stdout.strip().splitlines()[-1])
    data = json.loads(coeff_path.read_text())
    assert data["method"] == "iia-ddim" and data["nfe"] == 10 and data["model_kind"] == "diffusers"
    assert data["grid_kind"] == "discrete" and data["grid_params"] == {"spacing": "uniform"}
    assert len(data["coefficients"]) == 10 and data["coefficients"][0] == [] and data["coefficients"][-1] == []
    assert all(len(c) == 2 for c in data["coefficients"][1:-1])
    r = _ok(cli(["sample", "--config", cfg, "--method", "iia-ddim", "--nfe", 10, "--seeds", "0-2",
                 "--out", tmp_path / "iia.npz"]))
    assert str(coeff_path) in r.stderr
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 10, "--seeds", "0-2",
             "--out", tmp_path / "ddim.npz"]))
    iia, ddim = np.load(tmp_path / "iia.npz"), np.load(tmp_path / "ddim.npz")
    assert np.isfinite(iia["x"]).all() and not np.array_equal(iia["x"], ddim["x"])
    assert np.array_equal(iia["sigmas"], ddim["sigmas"]) and str(iia["model_sha256"]) == data["model_sha256"]
    # The bare directory holds the same UNet but no scheduler file: another fingerprint, file refused.
    r = cli(["sample", "--config", cfg, "--method", "iia-ddim", "--nfe", 10, "--coeffs", coeff_path,
             "--set", f"model.path={unet_dirs['bare']}", "--seeds", "0", "--out", tmp_path / "m.npz"])
    assert r.exit_code == 2 and "another model" in _error_line(r)


# ==================================================================================================
# Errors through the CLI.


@pytest.mark.parametrize("kind, name", [("edm-pkl", "network-snapshot-missing.pkl"), ("diffusers", "no-such-unet")])
def test_missing_checkpoint_exits_1(cli, tmp_path: Path, kind: str, name: str) -> None:
    missing = tmp_path / name
    cfg = _write_cfg(tmp_path, {"kind": kind, "path": missing})
    for args in (["sample", "--config", cfg, "--method", "ddim", "--nfe", 5, "--out", tmp_path / "x.npz"],
                 ["calibrate", "--config", cfg, "--method", "iia-ddim", "--nfe", 5]):
        r = cli(args)
        assert r.exit_code == 1
        line = _error_line(r)
        assert str(missing) in line and "not found" in line


def test_corrupt_pickle_exits_1(cli, edm_pkls: dict[str, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle\n\x00\x01")
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(edm_pkls["uncond"].read_bytes()[:2000])
    for path in (garbage, truncated):
        cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": path})
        r = cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--out", tmp_path / "x.npz"])
        assert r.exit_code == 1
        assert f"cannot unpickle {path}" in _error_line(r)
    # A pickle without the key asked for names the keys present.
    cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": edm_pkls["uncond"], "key": "net"})
    r = cli(["sample", "--config", cfg, "--method", "edm", "--nfe", 5, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 1 and "no key 'net'" in _error_line(r) and "'ema'" in r.stderr


@needs_diffusers
def test_corrupt_unet_weights_exit_1(cli, unet_dirs: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(unet_dirs["bare"], truncated)
    weights = next(truncated.glob("diffusion_pytorch_model*"))
    weights.write_bytes(weights.read_bytes()[:100])
    # config.json that does not fit the weights: diffusers' error lists every mismatched tensor, one per line.
    mismatched = tmp_path / "mismatched"
    shutil.copytree(unet_dirs["bare"], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    for path, needle in ((truncated, "Unable to load weights"), (mismatched, "size mismatch for conv_in.weight")):
        cfg = _write_cfg(tmp_path, {"kind": "diffusers", "path": path}, grid={"kind": "discrete"})
        r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 10, "--out", tmp_path / "x.npz"])
        assert r.exit_code == 1
        line = _error_line(r)
        assert f"cannot load UNet2DModel from {path}" in line and needle in line and len(line) < 600


def test_discrete_grid_with_edm_pickle_exits_2(cli, edm_pkls: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, {"kind": "edm-pkl", "path": edm_pkls["uncond"]}, grid={"kind": "discrete"})
    r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 10, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2
    line = _error_line(r)
    assert "grid.kind=discrete" in line and "diffusers" in line and "karras" in line
