"""The built-in trained testbed network and the exact gmm-mnist reference set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_heldout_split_is_disjoint_and_balanced() -> None:
    from iia_cli.models.data import load_mnist_5k
    from iia_cli.models.testbed import mnist_split

    train, held = mnist_split()
    assert len(train) == 4000 and len(held) == 1000
    images, labels = load_mnist_5k()
    # The held-out digits are the last 100 of each class, none of them in the training set.
    train_keys = {im.tobytes() for im in train}
    assert sum(im.tobytes() in train_keys for im in held) <= 2  # MNIST has a few exact duplicate digits at most
    for c in range(10):
        last = images[np.flatnonzero(labels == c)[-100:]]
        assert all(any(np.array_equal(x, h) for h in held) for x in last[:3])


def test_shipped_network_loads_and_is_trained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded through the public diffusers adapter; its fingerprint is the README's; it denoises a held-out
    digit at sigma = 0.5 closer to the clean digit than the noisy input is (a random network does not).
    Loading leaves the host's environment alone (offline through local_files_only, not HF_HUB_OFFLINE)."""
    from iia_cli.cli.common import DEFAULT_CONFIG
    from iia_cli.config.experiment import load_config
    from iia_cli.models.registry import load_model, model_fingerprint
    from iia_cli.models.testbed import heldout_images, to_model_range

    cfg = load_config(DEFAULT_CONFIG)  # the built-in default evaluates this network
    assert cfg.model.kind == "diffusers" and cfg.model.params["path"] == "builtin:mnist-ddpm"
    import diffusers  # noqa: F401  (torch's inductor, imported by diffusers, sets TORCHINDUCTOR_CACHE_DIR: not ours)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for every test
    environ = dict(os.environ)
    model = load_model(cfg.model.kind, cfg.model.params)
    assert dict(os.environ) == environ
    assert tuple(model.shape) == (1, 32, 32)
    fingerprint = model_fingerprint(model, cfg.model.kind, cfg.model.params)  # the CSV's model_sha256
    assert fingerprint[:16] in (ROOT / "README.md").read_text(), "README must state the testbed's fingerprint"

    x0 = to_model_range(heldout_images()[:32, :, :, 0])  # [32, 1, 32, 32]
    gen = torch.Generator().manual_seed(0)
    sigma = 0.5
    noisy = x0 + sigma * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        denoised = model(noisy, torch.full((32,), sigma))
    err_in = (noisy - x0).pow(2).mean().sqrt()
    err_out = (denoised - x0).pow(2).mean().sqrt()
    assert err_out < 0.5 * err_in, (float(err_out), float(err_in))


def test_cpu_chunking_leaves_the_denoiser_unchanged() -> None:
    """On the CPU the adapter feeds its UNet CPU_CHUNK samples per call (faster: benchmarks/cpu_chunks.py). A
    batch of 2.5 chunks, float64 states at several sigmas, denoises to what the whole batch in one network call
    gives (bit for bit on the 2-core machine; the test allows float32 rounding), and the chunk is not below 32,
    the smallest size measured to keep the outputs equal."""
    from iia_cli.models import diffusers_unet

    assert diffusers_unet.CPU_CHUNK >= 32
    model = diffusers_unet.load_diffusers_unet("builtin:mnist-ddpm")
    assert model.chunk == diffusers_unet.CPU_CHUNK
    n = diffusers_unet.CPU_CHUNK * 5 // 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((n, *model.shape), generator=gen, dtype=torch.float64) * 3
    sigma = torch.logspace(-2, 1.9, n, dtype=torch.float64)
    with torch.no_grad():
        chunked = model(x, sigma)
        model.chunk = None  # the whole batch in one call
        whole = model(x, sigma)
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_builtin_checkpoint_name_is_checked() -> None:
    from iia_cli.runtime.errors import ConfigError
    from iia_cli.models.testbed import resolve_checkpoint

    with pytest.raises(ConfigError, match="builtin:mnist-ddpm"):
        resolve_checkpoint("builtin:cifar10")


def _train(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(ROOT / "scripts" / "train_testbed.py"), "--steps", "4", "--batch", "4",
            "--limit-images", "8", "--channels", "8,16", "--threads", "1", "--log-every", "0", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp)


@pytest.mark.slow
def test_training_script_resumes_to_the_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    straight = _train(tmp_path, "--work", "a", "--out", "a/out")
    assert straight.returncode == 0, straight.stderr
    assert re.search(r"done: 4 steps", straight.stderr)
    first = _train(tmp_path, "--work", "b", "--out", "b/out", "--stop-after", "2")
    assert first.returncode == 0, first.stderr
    assert not (tmp_path / "b" / "out").exists()
    resumed = _train(tmp_path, "--work", "b", "--out", "b/out")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "at step 2/4" in resumed.stderr
    a = load_file(tmp_path / "a/out/unet/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b/out/unet/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Other settings against an existing checkpoint are refused instead of silently mixed.
    other = _train(tmp_path, "--work", "b", "--lr", "0.1")
    assert other.returncode == 2 and "other training settings" in other.stderr
    assert "Traceback" not in other.stderr


@pytest.mark.slow
def test_gmm_exact_reference_matches_the_mixture() -> None:
    """builtin:gmm-mnist-exact holds exact samples of the mixture: their mean is the mixture's mean."""
    from iia_cli.models.datasets import GMM_EXACT_SAMPLES, load_builtin_images
    from iia_cli.models.gmm import GMMDenoiser

    model = GMMDenoiser.from_mnist()
    x = model.sample_exact(20000, seed=1)  # [n, 1, 28, 28]
    stderr = x.std(0) / 20000**0.5
    assert ((x.mean(0) - model.mixture_mean()).abs() <= 5 * stderr + 1e-12).all()
    # The built-in reference images are exactly those samples, quantised like generated images.
    from iia_cli.models.datasets import GMM_EXACT_SEED
    from iia_cli.io.images import quantize

    images = load_builtin_images("gmm-mnist-exact")
    assert images.shape == (GMM_EXACT_SAMPLES, 28, 28, 1) and images.dtype == np.uint8
    assert np.array_equal(images, quantize(model.sample_exact(GMM_EXACT_SAMPLES, seed=GMM_EXACT_SEED)).numpy())
    real = load_builtin_images("mnist")[..., 0].astype(np.float64) / 127.5 - 1
    assert np.abs(real.mean(0) - model.mixture_mean()[0].numpy()).max() < 1e-9  # the mixture's mean is the data's


class _Payload:
    """A pickle that would create a marker file if anything unpickled it with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["garbage", "hostile", "not-a-checkpoint"])
def test_bad_training_checkpoint_is_a_one_line_error(tmp_path: Path, kind: str) -> None:
    """A malformed or malicious checkpoint.pt in --work: one line, exit 1, nothing executed, nothing trained."""
    import pickle

    work = tmp_path / "w"
    work.mkdir()
    marker = tmp_path / "executed"
    if kind == "garbage":
        (work / "checkpoint.pt").write_bytes(b"\x80\x04not a checkpoint")
    elif kind == "hostile":
        (work / "checkpoint.pt").write_bytes(pickle.dumps({"config": {}, "x": _Payload(marker)}))
    else:
        torch.save({"weights": torch.zeros(2)}, work / "checkpoint.pt")
    r = _train(tmp_path, "--work", "w")
    assert r.returncode == 1, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checkpoint" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()
