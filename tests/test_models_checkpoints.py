"""Checkpoint adapters: EDM pickles (clean-room unpickler) and diffusers UNet2DModel directories.

Every checkpoint is built inside the tests (builders in ``ckpt_builders.py``): a tiny EDM-style network
pickled in EDM's persistence format by a writer of our own, and tiny randomly initialised diffusers UNets
saved with ``save_pretrained``.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from ckpt_builders import HAS_DIFFUSERS, SOURCES
from ckpt_builders import tiny_unet as _tiny_unet
from ckpt_builders import writer_modules as _writer_modules
from iia_cli.models.edm_pkl import _EDMUnpickler, _Unavailable, load_edm_pickle
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError


pytestmark = pytest.mark.usefixtures("one_thread")

# The test pickles embed our own test sources, not NVlabs/edm's, so loading them needs trust_code (the
# default refusal is tested in test_hostile.py).
_load_trusted = functools.partial(load_edm_pickle, trust_code=True)


# ==================================================================================================
# EDM pickles.

@pytest.fixture(scope="module")
def edm_pickle(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Write ``{"ema", "wrapped", "loss_fn", "augment_pipe", "dataset_kwargs"}`` and reference outputs."""
    path = tmp_path_factory.mktemp("edm") / "network-snapshot-tiny.pkl"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen) * 2
    sigma = torch.tensor([0.05, 1.3, 40.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 3, 0]), 4).float()
    other_labels = torch.nn.functional.one_hot(torch.tensor([2, 0, 3]), 4).float()
    with _writer_modules(SOURCES) as mods:
        torch.manual_seed(0)
        net = mods["tiny_edm_net"].TinyPrecond(img_resolution=8, img_channels=3, label_dim=4).eval()
        wrapped = mods["tiny_edm_wrap"].Wrapper(net)
        data = {
            "ema": net,
            "wrapped": wrapped,
            "loss_fn": mods["tiny_edm_net"].LossConfig(P_mean=-1.5),
            "augment_pipe": mods["tiny_edm_aug"].AugmentPipe(p=0.1),
            "dataset_kwargs": {"resolution": 8},
        }
        with torch.no_grad():
            ref = net(x, sigma, labels)
            ref_other = net(x, sigma, other_labels)
            ref_wrapped = wrapped(x, sigma, labels)
        with open(path, "wb") as f:
            pickle.dump(data, f)
    assert "torch_utils" not in sys.modules and "tiny_edm_net" not in sys.modules
    return dict(path=path, x=x, sigma=sigma, labels=labels, other_labels=other_labels, ref=ref,
                ref_other=ref_other, ref_wrapped=ref_wrapped)


def _leaked_modules() -> list[str]:
    return [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib") or m.startswith("_iia_edm_src")]


def test_edm_pickle_bit_exact_and_no_leaks(edm_pickle: dict) -> None:
    den = _load_trusted(edm_pickle["path"])
    assert _leaked_modules() == []
    assert den.shape == (3, 8, 8) and den.label_dim == 4 and den.dtype == torch.float32
    assert den.sigma_min == 0.0 and den.sigma_max == math.inf
    x, sigma = edm_pickle["x"], edm_pickle["sigma"]
    with torch.no_grad():
        out = den(x, sigma, edm_pickle["labels"])
        out_other = den(x, sigma, edm_pickle["other_labels"])
    assert torch.equal(out, edm_pickle["ref"])
    # The class labels reach the network.
    assert torch.equal(out_other, edm_pickle["ref_other"]) and not torch.equal(out, out_other)
    assert torch.equal(den.round_sigma(torch.tensor(0.7)), torch.tensor(0.7))
    # Float64 in, float64 out; the network is called in float32.
    with torch.no_grad():
        out64 = den(x.double(), sigma.double(), edm_pickle["labels"])
    assert out64.dtype == torch.float64 and torch.equal(out64, edm_pickle["ref"].double())


def test_edm_pickle_nested_persistent_objects(edm_pickle: dict) -> None:
    den = _load_trusted(edm_pickle["path"], key="wrapped")
    assert _leaked_modules() == []
    inner = den.net.inner
    assert type(inner).__name__ == "TinyPrecond" and type(inner.model).__name__ == "TinyUNet"
    with torch.no_grad():
        out = den(edm_pickle["x"], edm_pickle["sigma"], edm_pickle["labels"])
    assert torch.equal(out, edm_pickle["ref_wrapped"])
    # Plain (non-Module) persistent objects get their __dict__; unloadable ones become placeholders.
    with open(edm_pickle["path"], "rb") as f:
        data = _EDMUnpickler(f, trust_code=True).load()
    assert data["loss_fn"].P_mean == -1.5 and type(data["loss_fn"]).__name__ == "LossConfig"
    assert data["wrapped"].inner is data["ema"]  # pickle memo: one object, two references
    assert isinstance(data["augment_pipe"], _Unavailable) and "training_stats" in data["augment_pipe"].reason
    assert _leaked_modules() == []


def test_edm_pickle_dtype_and_fingerprint(edm_pickle: dict, tmp_path: Path) -> None:
    den32 = _load_trusted(edm_pickle["path"])
    den16 = _load_trusted(edm_pickle["path"], dtype="float16")
    assert den16.net.use_fp16 is True and den16.dtype == torch.float16
    with torch.no_grad():  # EDM's use_fp16 path is CUDA-only, so on the CPU it stays float32
        assert torch.equal(den16(edm_pickle["x"], edm_pickle["sigma"], edm_pickle["labels"]), edm_pickle["ref"])
    assert den32.fingerprint() == _load_trusted(edm_pickle["path"]).fingerprint()
    assert len({den32.fingerprint(), den16.fingerprint(),
                _load_trusted(edm_pickle["path"], key="wrapped").fingerprint()}) == 3
    copy = tmp_path / "copy.pkl"
    copy.write_bytes(edm_pickle["path"].read_bytes() + b"\0")  # trailing byte: same net, other file
    assert _load_trusted(copy).fingerprint() != den32.fingerprint()


def test_edm_pickle_errors(edm_pickle: dict, tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        _load_trusted(tmp_path / "nope.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(IIARuntimeError, match="garbage.pkl"):
        _load_trusted(garbage)
    with pytest.raises(IIARuntimeError, match=r"no key 'ema_typo'.*'ema', 'wrapped'"):
        _load_trusted(edm_pickle["path"], key="ema_typo")
    with pytest.raises(IIARuntimeError, match="training_stats"):
        _load_trusted(edm_pickle["path"], key="augment_pipe")
    with pytest.raises(IIARuntimeError, match="not an EDM network"):
        _load_trusted(edm_pickle["path"], key="dataset_kwargs")
    with pytest.raises(ConfigError, match="float32"):
        _load_trusted(edm_pickle["path"], dtype="float8")
    assert _leaked_modules() == []


# ==================================================================================================
# diffusers UNet2DModel directories.

needs_diffusers = pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
if HAS_DIFFUSERS:
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from iia_cli.models.diffusers_unet import PredictionType, load_diffusers_unet, make_betas, make_discrete_sigmas

@needs_diffusers
def test_default_schedule_sigma_range(unet_dirs: dict[str, Path]) -> None:
    den = load_diffusers_unet(unet_dirs["bare"])
    assert den.shape == (3, 8, 8) and den.label_dim == 0 and den.prediction_type is PredictionType.EPSILON
    assert den.discrete_sigmas.dtype == torch.float64 and den.discrete_sigmas.shape == (1000,)
    assert bool((den.discrete_sigmas.diff() > 0).all())
    assert den.sigma_min == pytest.approx(0.0100, rel=1e-3) and den.sigma_max == pytest.approx(157.4, rel=1e-3)


def _textbook_betas(config: dict, num_t: int = 1000) -> torch.Tensor:
    """The published schedules in float64, independent of diffusers: linear (Ho et al. 2020), scaled_linear
    (latent diffusion), squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. 17)."""
    kind = config.get("beta_schedule", "linear")
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if kind == "linear":
        return torch.linspace(start, end, num_t, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, num_t, dtype=torch.float64) ** 2
    s = torch.arange(num_t + 1, dtype=torch.float64) / num_t
    abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


@needs_diffusers
@pytest.mark.parametrize(
    "config",
    [
        dict(beta_schedule="linear"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, _class_name="PNDMScheduler"),
        dict(beta_schedule="squaredcos_cap_v2", _class_name="DDIMScheduler"),
    ],
)
def test_betas_match_published_schedules(config: dict) -> None:
    ours, _ = make_discrete_sigmas(make_betas({"num_train_timesteps": 1000, **config}))
    expected = torch.cumprod(1 - _textbook_betas(config), 0)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)


@needs_diffusers
def test_betas_follow_the_configured_scheduler() -> None:
    trained = [0.001, 0.002, 0.5]
    torch.testing.assert_close(make_betas({"trained_betas": trained}), torch.tensor(trained, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    sigmoid = make_betas({"beta_schedule": "sigmoid"})  # DDPMScheduler knows it: from diffusers, not our code
    torch.testing.assert_close(sigmoid, DDPMScheduler(beta_schedule="sigmoid").betas.double())
    assert 1e-4 < float(sigmoid[0]) < float(sigmoid[500]) < float(sigmoid[-1]) < 0.02
    with pytest.raises(IIARuntimeError, match="unsupported beta_schedule 'sigmoid' for DDIMScheduler"):
        make_betas({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"})
    with pytest.raises(IIARuntimeError, match="'NoSuchScheduler', not a scheduler of diffusers"):
        make_betas({"_class_name": "NoSuchScheduler"})


def _direct_x0(unet: UNet2DModel, z: torch.Tensor, t: torch.Tensor, abar: torch.Tensor, pred: str,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """x0 from the network in z space, by the textbook conversions (independent of the adapter)."""
    with torch.no_grad():
        out = unet(z, t, class_labels=labels).sample[:, :3].double()
    a = abar.reshape(-1, 1, 1, 1)
    z = z.double()
    if pred == "epsilon":
        return (z - (1 - a).sqrt() * out) / a.sqrt()
    if pred == "v_prediction":
        return a.sqrt() * z - (1 - a).sqrt() * out
    return out


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@needs_diffusers
def test_denoiser_matches_direct_conversion(unet_dirs: dict[str, Path], pred: str) -> None:
    den = load_diffusers_unet(unet_dirs[pred])
    assert den.prediction_type.value == pred
    unet = UNet2DModel.from_pretrained(unet_dirs[pred] / "unet")
    t = torch.tensor([3, 500, 999])
    abar, sigma = den.alphas_cumprod[t], den.discrete_sigmas[t]
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * (1 + sigma.float().reshape(-1, 1, 1, 1))
    z = (x.double() * abar.sqrt().reshape(-1, 1, 1, 1)).float()  # x = z / sqrt(abar)
    in_torch_layout = _direct_x0(unet, z, t, abar, pred)
    # on the CPU the adapter runs its UNet in channels_last (faster): the same layout here isolates the conversions
    assert den._layout == torch.channels_last
    unet.to(memory_format=torch.channels_last)
    expected = _direct_x0(unet, z.contiguous(memory_format=torch.channels_last), t, abar, pred)
    with torch.no_grad():
        got64 = den(x.double(), sigma)
        got32 = den(x, sigma.float())
    assert got64.dtype == torch.float64 and got32.dtype == torch.float32
    assert expected.abs().max() > 0.05
    torch.testing.assert_close(got64, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got32.double(), expected, atol=1e-4, rtol=1e-4)
    # the layout itself changes the network's float32 rounding only (x 1/sqrt(abar) = sigma 157 at t = 999)
    torch.testing.assert_close(got64, in_torch_layout, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@needs_diffusers
def test_ddim_trajectory_equals_euler_in_sigma(unet_dirs: dict[str, Path], pred: str) -> None:
    """diffusers' DDIMScheduler (eta = 0) and Euler in sigma on our denoiser give the same trajectory."""
    den = load_diffusers_unet(unet_dirs[pred])
    unet = UNet2DModel.from_pretrained(unet_dirs[pred] / "unet")
    scheduler = DDIMScheduler.from_pretrained(unet_dirs[pred] / "scheduler")
    scheduler.set_timesteps(10)
    steps = [int(t) for t in scheduler.timesteps]  # 900, 800, ..., 0
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    x = z.double() / den.alphas_cumprod[steps[0]].sqrt()
    with torch.no_grad():
        for t, t_next in zip(steps[:-1], steps[1:], strict=True):
            z = scheduler.step(unet(z, t).sample, t, z, eta=0.0).prev_sample
            s, s_next = den.discrete_sigmas[t], den.discrete_sigmas[t_next]
            denoised = den(x, s.expand(2))
            x = x + (s_next - s) * (x - denoised) / s  # Euler step in sigma
    torch.testing.assert_close(x * den.alphas_cumprod[steps[-1]].sqrt(), z.double(), atol=2e-4, rtol=1e-4)


@needs_diffusers
def test_sigma_time_maps_and_rounding(unet_dirs: dict[str, Path]) -> None:
    den = load_diffusers_unet(unet_dirs["epsilon"])
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    assert torch.equal(den.sigma_to_t(den.discrete_sigmas[t]), t.double())
    assert torch.equal(den.sigma_to_t(den.discrete_sigmas[t].float()), t.double())  # float32 sigmas snap
    assert torch.equal(den.t_to_sigma(t.double()), den.discrete_sigmas[t])
    frac = torch.tensor([0.25, 10.5, 420.75, 998.9], dtype=torch.float64)
    torch.testing.assert_close(den.sigma_to_t(den.t_to_sigma(frac)), frac, atol=1e-9, rtol=0)
    # Nearest training sigma in log space.
    s = den.discrete_sigmas
    just_above = (s[100].log() * 0.6 + s[101].log() * 0.4).exp()
    assert den.round_sigma(just_above) == s[100] and den.round_sigma(s[101] * 0.9999) == s[101]
    assert den.round_sigma(s[100].float()).dtype == torch.float32
    # "nearest" lookup evaluates the network at the rounded timestep: D = x - sigma * eps(z, 100).
    nearest = load_diffusers_unet(unet_dirs["epsilon"], timestep_lookup="nearest")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        eps = nearest.unet((x / (1 + just_above**2).sqrt()).float(), 100).sample.double()
        torch.testing.assert_close(nearest(x, just_above.reshape(1)), x - just_above * eps)
        assert not torch.equal(den(x, just_above.reshape(1)), nearest(x, just_above.reshape(1)))


@needs_diffusers
def test_fingerprint_tracks_weights_and_settings(unet_dirs: dict[str, Path], tmp_path: Path) -> None:
    base = load_diffusers_unet(unet_dirs["bare"]).fingerprint()
    assert base == load_diffusers_unet(unet_dirs["bare"]).fingerprint()
    assert base != load_diffusers_unet(unet_dirs["bare"], prediction_type="v_prediction").fingerprint()
    assert base != load_diffusers_unet(unet_dirs["bare"], dtype="bfloat16").fingerprint()
    changed = tmp_path / "changed"
    _tiny_unet(seed=1).save_pretrained(changed)
    assert base != load_diffusers_unet(changed).fingerprint()
    with_scheduler = tmp_path / "with_scheduler"
    shutil.copytree(unet_dirs["bare"], with_scheduler)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(with_scheduler)  # bare dir + scheduler json
    den = load_diffusers_unet(with_scheduler)
    assert den.fingerprint() != base
    theirs = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    torch.testing.assert_close(den.alphas_cumprod, theirs, atol=1e-6, rtol=0)


@needs_diffusers
def test_class_conditional_learned_variance_and_bf16(tmp_path: Path) -> None:
    unet = _tiny_unet(num_class_embeds=5, out_channels=6)
    unet.save_pretrained(tmp_path / "cond")
    den = load_diffusers_unet(tmp_path / "cond")
    assert den.label_dim == 5 and den.shape == (3, 8, 8)
    t = torch.tensor([250, 700])
    abar, sigma = den.alphas_cumprod[t], den.discrete_sigmas[t]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 3
    labels = torch.tensor([4, 1])
    one_hot = torch.nn.functional.one_hot(labels, 5).double()
    z = (x * abar.sqrt().reshape(-1, 1, 1, 1)).float()
    with torch.no_grad():
        torch.testing.assert_close(den(x, sigma, one_hot), _direct_x0(unet, z, t, abar, "epsilon", labels),
                                   atol=1e-5, rtol=1e-5)
        with pytest.raises(IIARuntimeError, match="class-conditional"):
            den(x, sigma)
        bf16 = load_diffusers_unet(tmp_path / "cond", dtype="bfloat16")
        out = bf16(x.float(), sigma.float(), one_hot)
        assert bf16.unet.dtype == torch.bfloat16 and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), den(x, sigma, one_hot), atol=0.1 * float(sigma.max()), rtol=0.05)


@needs_diffusers
def test_diffusers_errors(unet_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MissingFileError):
        load_diffusers_unet(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="config.json"):
        load_diffusers_unet(tmp_path)
    with pytest.raises(ConfigError, match="epsilon, v_prediction, sample"):
        load_diffusers_unet(unet_dirs["bare"], prediction_type="eps")
    with pytest.raises(ConfigError, match="interp, nearest"):
        load_diffusers_unet(unet_dirs["bare"], timestep_lookup="linear")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(IIARuntimeError, match=r"dependency of iia_cli; reinstall it: pip install 'diffusers>=0.30'"):
        load_diffusers_unet(unet_dirs["bare"])


@pytest.mark.parametrize("missing, loader, hint", [
    ("diffusers", "unet", "pip install 'diffusers>=0.30'"),
    ("diffusers", "betas", "pip install 'diffusers>=0.30'"),
    ("diffusers", "sd", "pip install 'diffusers>=0.30'"),
    ("transformers", "sd", "pip install 'transformers>=4.40'"),
])
def test_missing_library_hint_names_what_to_install(monkeypatch, missing, loader, hint):
    """diffusers is a core dependency: its hint installs diffusers, not the extra (which only adds transformers)."""
    from iia_cli.models import diffusers_sd, diffusers_unet

    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` raises ImportError
    importer = {"unet": diffusers_unet._import_unet2d, "betas": lambda: diffusers_unet.make_betas({}),
                "sd": diffusers_sd._import_libraries}[loader]
    with pytest.raises(IIARuntimeError) as info:
        importer()
    message = str(info.value)
    assert hint in message and "\n" not in message
    assert "pip install 'iia_cli[diffusers]'" not in message
