"""Text-to-image (issue 7, the paper's Table 1): guided IIA-DDIM and IIA-DPM-Solver++ on Stable Diffusion.

A tiny randomly initialised Stable Diffusion pipeline (UNet2DConditionModel with cross-attention, CLIP text
encoder and a byte-level BPE tokenizer written here, AutoencoderKL, scaled-linear DDIM scheduler) is saved
in diffusers' pipeline layout inside the test, then:

* the adapter against independent computations: classifier-free guidance from our own UNet calls
  (epsilon and v-prediction), prompt embeddings from our own tokenizer + text encoder calls, VAE decoding,
  per-prompt seeds, the fingerprint following guidance scale, resolution and prompts;
* the guided DDIM trajectory in EDM space equals diffusers' DDIMScheduler loop with the same guidance;
* the CLI end to end: sample (ddim, dpm-solver++-2m), calibrate -> sample for guided iia-ddim (one
  coefficient per step, the last step uncorrected) and iia-dpm-solver++-2m, a coefficient file refused at
  another guidance scale, ``evaluate --no-fid`` rows; errors exit with one line.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import ConfigWriter
from ckpt_builders import HAS_DIFFUSERS

try:
    import transformers  # noqa: F401

    HAS_TRANSFORMERS = True
except ImportError:
    HAS_TRANSFORMERS = False

pytestmark = [  # one list: a second assignment would replace the skip
    pytest.mark.skipif(not (HAS_DIFFUSERS and HAS_TRANSFORMERS),
                       reason="Stable Diffusion needs diffusers and transformers"),
    pytest.mark.usefixtures("one_thread"),
]

PROMPTS = ["a photo of a cat", "a red dog on the sofa", "The cat of a dog!"]
LATENT = (4, 8, 8)
IMAGE = (16, 16, 3)  # the tiny VAE has two blocks: scale factor 2
GUIDANCE = 7.5
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


# --------------------------------------------------------------------------------------------------
# A tiny Stable Diffusion pipeline directory.


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte as a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


COMMON_WORDS = ("photo", "of", "cat", "dog", "the", "on", "red")


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = COMMON_WORDS) -> int:
    """vocab.json + merges.txt of a byte-level BPE CLIP tokenizer: the 256 byte characters with and without
    the end-of-word mark ``</w>``, merges that make each of ``words`` one token, and the special tokens.
    Returns the vocabulary size."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for nxt in pieces[1:]:
            if f"{merged} {nxt}" not in merges:
                merges.append(f"{merged} {nxt}")
            merged += nxt
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return len(vocab)


def write_sd_pipeline(path: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny randomly initialised Stable Diffusion pipeline in diffusers' directory layout."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n_vocab = write_clip_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(path / "unet")
    CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1, pad_token_id=n_vocab - 1,
    )).save_pretrained(path / "text_encoder")
    AutoencoderKL(
        block_out_channels=(16, 32), latent_channels=4, sample_size=16, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(path / "vae")
    # Stable Diffusion's own scheduler settings (steps_offset 1, final alpha-bar not 1).
    DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}))
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    eps = write_sd_pipeline(root / "sd-eps")
    v = root / "sd-v"  # the same networks, a v-prediction scheduler
    shutil.copytree(eps, v)
    config = json.loads((v / "scheduler" / "scheduler_config.json").read_text())
    (v / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"epsilon": eps, "v_prediction": v, "prompts": prompts}


def _write_cfg(tmp_path: Path, sd: dict[str, Path], name: str = "sd", model: dict[str, Any] | None = None,
               **sections: dict[str, Any]) -> Path:
    cfg: dict[str, Any] = {
        "experiment": name,
        "model": {"kind": "diffusers-sd", "path": str(sd["epsilon"]), "prompts": str(sd["prompts"]),
                  "guidance_scale": GUIDANCE, **(model or {})},
        "grid": {"kind": "discrete", "spacing": "uniform"},
        "sampler": {"batch": 4, "device": "cpu"},
        "calibration": {"samples": 4, "val_samples": 2, "substeps": 3, "out_dir": str(tmp_path / "coeffs")},
    }
    return ConfigWriter(tmp_path)(cfg, name, **sections)


def _ok(r: Any) -> Any:
    assert r.exit_code == 0, r.output
    return r


def _error_line(r: Any) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in r.output, r.output
    return lines[-1]


class Reference:
    """The pipeline's networks loaded independently of the adapter, for hand-written computations."""

    def __init__(self, path: Path) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).eval()
        self.vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        self.abar = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def guided(self, z: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
        """Classifier-free guidance from two separate UNet calls."""
        out_c = self.unet(z, t, encoder_hidden_states=cond).sample
        out_u = self.unet(z, t, encoder_hidden_states=uncond.expand_as(cond)).sample
        return out_u + w * (out_c - out_u)


@pytest.fixture(scope="module")
def ref(sd: dict[str, Path]) -> Reference:
    return Reference(sd["epsilon"])


# --------------------------------------------------------------------------------------------------
# Prompt files.


def test_load_prompts_formats_and_errors(tmp_path: Path) -> None:
    from iia_cli.runtime.errors import ConfigError, MissingFileError
    from iia_cli.models.prompts import load_prompts

    text = tmp_path / "p.txt"
    text.write_text("# captions\na cat\n\n  a  dog \n")
    assert load_prompts(text) == ["a cat", "a dog"]
    coco = tmp_path / "captions_val2014.json"
    annotations = [{"image_id": 1, "id": 5, "caption": "A man riding\n a bike. "},
                   {"image_id": 2, "id": 6, "caption": "Two cats"}]
    coco.write_text(json.dumps({"images": [], "annotations": annotations}))
    assert load_prompts(coco) == ["A man riding a bike.", "Two cats"]
    plain = tmp_path / "list.json"
    plain.write_text(json.dumps(["x", {"caption": "y"}]))
    assert load_prompts(plain) == ["x", "y"]
    with pytest.raises(MissingFileError, match="prompts file"):
        load_prompts(tmp_path / "missing.txt")
    for name, content, match in [("empty.txt", "\n# only a comment\n", "no captions"),
                                 ("bad.json", "{\"annotations\": [", "not valid JSON"),
                                 ("nocap.json", json.dumps({"annotations": [{"id": 1}]}), r"annotations\[0\]"),
                                 ("dict.json", json.dumps({"images": []}), "COCO captions")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ConfigError, match=match):
            load_prompts(tmp_path / name)


# --------------------------------------------------------------------------------------------------
# The adapter against independent computations.


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guidance_matches_independent_unet_calls(sd: dict[str, Path], ref: Reference, prediction_type: str) -> None:
    from iia_cli.models.diffusers_sd import load_sd_pipeline

    model = load_sd_pipeline(sd[prediction_type], guidance_scale=GUIDANCE, prompts=sd["prompts"])
    assert model.shape == LATENT and model.guided is True and model.label_dim == 0 and model.evals_per_call == 2
    assert model.prediction_type.value == prediction_type and model.image_size == IMAGE[:2]
    sigmas = ((1 - ref.abar) / ref.abar).sqrt()
    torch.testing.assert_close(model.discrete_sigmas, sigmas, rtol=1e-6, atol=0)  # diffusers' betas are float32

    # Per-prompt seeds: seed k uses prompt k mod P; the embeddings are the text encoder's last hidden state.
    seeds = [0, 1, 2, 3, 5]
    emb = model.condition(seeds)
    expected = ref.embed([PROMPTS[s % len(PROMPTS)] for s in seeds])
    assert emb.shape == (5, 77, 32)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-6)
    assert [model.prompt_of(s) for s in seeds] == [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[2]]
    assert torch.equal(emb[0], emb[3]) and not torch.allclose(emb[0], emb[1])

    t = 600
    sigma = float(model.discrete_sigmas[t])
    x = torch.randn(5, *LATENT, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigma
    denoised = model(x, torch.full((5,), sigma, dtype=torch.float64), emb)
    z = (x * ref.abar[t].sqrt()).float()
    out = ref.guided(z, t, expected, ref.embed([""]), GUIDANCE).double()
    if prediction_type == "epsilon":
        want = x - sigma * out
    else:  # x0 = sqrt(abar) z - sqrt(1 - abar) v, and D(x; sigma) = x0
        want = ref.abar[t].sqrt() * z.double() - (1 - ref.abar[t]).sqrt() * out
    assert denoised.dtype == torch.float64
    torch.testing.assert_close(denoised, want, rtol=1e-4, atol=1e-4)

    # w = 1: the conditional prediction alone, one network evaluation per call.
    plain = load_sd_pipeline(sd[prediction_type], guidance_scale=1.0, prompts=sd["prompts"])
    assert plain.evals_per_call == 1
    out1 = ref.guided(z, t, expected, ref.embed([""]), 1.0).double()
    if prediction_type == "epsilon":
        want1 = x - sigma * out1
    else:
        want1 = ref.abar[t].sqrt() * z.double() - (1 - ref.abar[t]).sqrt() * out1
    torch.testing.assert_close(plain(x, sigma * torch.ones(5), emb), want1, rtol=1e-4, atol=1e-4)


def test_negative_prompt_decode_cache_and_fingerprint(sd: dict[str, Path], ref: Reference, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from iia_cli.models import diffusers_sd
    from iia_cli.models.diffusers_sd import load_sd_pipeline

    model = load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"], negative_prompt="a dog")
    torch.testing.assert_close(model._uncond, ref.embed(["a dog"]), rtol=1e-5, atol=1e-6)

    # decode: z = x at sigma = 0, then vae.decode(z / scaling_factor), clamped to [-1, 1].
    x = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    images = model.decode(x)
    with torch.no_grad():
        want = ref.vae.decode(x.float() / ref.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, want, rtol=1e-5, atol=1e-5)

    # The embedding cache keeps the most recent prompts and gives the same rows after eviction.
    monkeypatch.setattr(diffusers_sd, "PROMPT_CACHE", 2)
    first = model.condition([0, 1, 2])
    assert list(model._cache) == [1, 2]
    torch.testing.assert_close(model.condition([2, 0, 1]), first[[2, 0, 1]], rtol=0, atol=1e-6)

    # Coefficients are tied to guidance scale, resolution, prompts and negative prompt (fitted per setting).
    fp = load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"]).fingerprint()
    assert load_sd_pipeline(sd["epsilon"], guidance_scale=7.5, prompts=sd["prompts"]).fingerprint() == fp
    other_prompts = tmp_path / "other.txt"
    other_prompts.write_text("a photo of a dog\n")
    big = load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"], height=32, width=24)
    assert big.shape == (4, 16, 12) and big.decode(torch.zeros(1, 4, 16, 12)).shape == (1, 3, 32, 24)
    others = [load_sd_pipeline(sd["epsilon"], guidance_scale=3.0, prompts=sd["prompts"]), big, model,
              load_sd_pipeline(sd["epsilon"], prompts=other_prompts),
              load_sd_pipeline(sd["v_prediction"], prompts=sd["prompts"])]
    prints = [m.fingerprint() for m in others]
    assert fp not in prints and len(set(prints)) == len(prints)


def test_bfloat16_network(sd: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-precision UNet and text encoder: float32 states in and out, the VAE still in float32. Loading leaves
    the host's environment alone (offline through local_files_only, not HF_HUB_OFFLINE)."""
    from iia_cli.models.diffusers_sd import load_sd_pipeline

    import diffusers  # noqa: F401  (torch's inductor, imported by diffusers, sets TORCHINDUCTOR_CACHE_DIR: not ours)
    import transformers  # noqa: F401

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # conftest sets it for every test
    environ = dict(os.environ)
    full = load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"])
    assert dict(os.environ) == environ
    half = load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"], dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.float32
    assert half.condition([0]).dtype == torch.bfloat16 and half.fingerprint() != full.fingerprint()
    sigma = float(full.discrete_sigmas[400])
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2)) * sigma
    want = full(x, torch.full((2,), sigma), full.condition([0, 1]))
    got = half(x, torch.full((2,), sigma), half.condition([0, 1]))
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got - want).norm() / want.norm()) < 0.05
    assert half.decode(got).dtype == torch.float32


def test_loader_errors(sd: dict[str, Path], tmp_path: Path) -> None:
    from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError
    from iia_cli.models.diffusers_sd import load_sd_pipeline

    with pytest.raises(ConfigError, match="model.prompts is required"):
        load_sd_pipeline(sd["epsilon"])
    with pytest.raises(ConfigError, match="multiple of the VAE scale factor 2"):
        load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"], height=15)
    with pytest.raises(ConfigError, match="guidance_scale"):
        load_sd_pipeline(sd["epsilon"], prompts=sd["prompts"], guidance_scale="strong")
    broken = tmp_path / "broken"
    shutil.copytree(sd["epsilon"], broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(MissingFileError, match="text_encoder/"):
        load_sd_pipeline(broken, prompts=sd["prompts"])
    shutil.copytree(sd["epsilon"] / "text_encoder", broken / "text_encoder")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(IIARuntimeError, match="cannot load AutoencoderKL"):
        load_sd_pipeline(broken, prompts=sd["prompts"])


def _diffusers_guided_ddim(ref: Reference, seeds: list[int], steps: int, w: float) -> torch.Tensor:
    """Classifier-free-guided DDIM (eta = 0) with diffusers' own DDIMScheduler, started from our
    x_T = sigma_T * noise(seed) mapped to z_T = x_T sqrt(abar_T). Timesteps range(0, 1000, 1000 // S)
    (steps_offset 0) and a last step to alpha-bar 1 (set_alpha_to_one), like our discrete uniform grid."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert timesteps == list(range(0, 1000, 1000 // steps))[::-1]
    abar = ref.abar[timesteps[0]]
    noise = torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(s)) for s in seeds])
    z = (noise.double() * ((1 - abar) / abar).sqrt() * abar.sqrt()).float()
    cond, uncond = ref.embed([PROMPTS[s % len(PROMPTS)] for s in seeds]), ref.embed([""])
    for t in timesteps:
        z = scheduler.step(ref.guided(z, t, cond, uncond, w), t, z, eta=0.0).prev_sample
    return z


def test_guided_ddim_matches_diffusers_scheduler(cli, sd: dict[str, Path], ref: Reference, tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, sd)
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 5, "--seeds", "0-3", "--out", tmp_path / "x.npz"]))
    out = np.load(tmp_path / "x.npz")
    want = _diffusers_guided_ddim(ref, [0, 1, 2, 3], 5, GUIDANCE)
    assert want.abs().max() > 0.05
    torch.testing.assert_close(torch.from_numpy(out["x"]), want, atol=2e-4, rtol=1e-4)
    # Images are the VAE's decoding of the final latents (z = x at sigma = 0), quantised like EDM.
    with torch.no_grad():
        images = ref.vae.decode(want / ref.vae.config.scaling_factor).sample.clamp(-1, 1)
    u8 = (images.double() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert out["images"].shape == (4, *IMAGE)
    assert np.abs(out["images"].astype(int) - u8.astype(int)).max() <= 1


# --------------------------------------------------------------------------------------------------
# The CLI end to end.


def test_sample_base_solvers_cli(cli, sd: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    cfg = _write_cfg(tmp_path, sd)
    for method in ("ddim", "dpm-solver++-2m"):
        r = _ok(cli(["sample", "--config", cfg, "--method", method, "--nfe", 4, "--seeds", "0-4",
                     "--out", tmp_path / f"{method}.npz"]))
        assert f"{method} nfe=4: 5 images" in r.stdout
        out = np.load(tmp_path / f"{method}.npz")
        assert out["x"].shape == (5, *LATENT) and out["images"].shape == (5, *IMAGE) and np.isfinite(out["x"]).all()
        assert int(out["nfe"]) == 4 and str(out["grid"]) == "discrete"
        # Per-seed determinism: seed 3 alone in a batch of one gives the image of seed 3 in a batch of four.
        _ok(cli(["sample", "--config", cfg, "--method", method, "--nfe", 4, "--seeds", "3", "--batch", 1,
                 "--out", tmp_path / f"{method}-3.npz"]))
        one = np.load(tmp_path / f"{method}-3.npz")
        np.testing.assert_allclose(one["x"][0], out["x"][3], rtol=1e-4, atol=1e-4)  # float32 UNet, batch-size rounding
        # Seeds 0 and 3 share a prompt (3 mod 3 = 0) but not their noise.
        assert not np.allclose(out["x"][0], out["x"][3])
    ddim, dpm = np.load(tmp_path / "ddim.npz"), np.load(tmp_path / "dpm-solver++-2m.npz")
    assert not np.allclose(ddim["x"], dpm["x"])
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--seeds", "0-1", "--out", tmp_path / "png"]))
    with Image.open(tmp_path / "png" / "000001.png") as im:
        assert im.size == IMAGE[:2] and im.mode == "RGB"


@pytest.mark.slow
def test_guided_iia_ddim_calibrate_sample_cli(cli, sd: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, sd)
    r = _ok(cli(["calibrate", "--config", cfg, "--method", "iia-ddim", "--nfe", 5]))
    coeff_path = Path(r.stdout.strip().splitlines()[-1])
    data = json.loads(coeff_path.read_text())
    assert data["method"] == "iia-ddim" and data["method_params"] == {"form": "guided"}
    assert data["model_kind"] == "diffusers-sd" and data["samples"] == 4 and data["substeps"] == 3
    # Eq. (8): one coefficient per step on the guided eps, the last step (to sigma = 0) never corrected.
    assert [len(c) for c in data["coefficients"]] == [1, 1, 1, 1, 0]
    base, iia = data["residual_base"][:-1], data["residual_iia"][:-1]
    assert all(i <= b * (1 + 1e-6) for b, i in zip(base, iia)) and sum(iia) < sum(base)
    r = _ok(cli(["sample", "--config", cfg, "--method", "iia-ddim", "--nfe", 5, "--seeds", "0-3",
                 "--out", tmp_path / "iia.npz"]))
    assert str(coeff_path) in r.stderr
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 5, "--seeds", "0-3",
             "--out", tmp_path / "ddim.npz"]))
    iia, ddim = np.load(tmp_path / "iia.npz"), np.load(tmp_path / "ddim.npz")
    assert np.isfinite(iia["x"]).all() and iia["images"].shape == (4, *IMAGE) and not np.allclose(iia["x"], ddim["x"])
    assert str(iia["model_sha256"]) == data["model_sha256"]
    # Coefficients fitted at w = 7.5 are refused at w = 3.
    r = cli(["sample", "--config", cfg, "--method", "iia-ddim", "--nfe", 5, "--coeffs", coeff_path,
             "--set", "model.guidance_scale=3", "--seeds", "0", "--out", tmp_path / "w3.npz"])
    assert r.exit_code == 2 and "another model" in _error_line(r)


@pytest.mark.slow
def test_iia_dpm_solver_calibrate_sample_cli(cli, sd: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, sd)
    r = _ok(cli(["calibrate", "--config", cfg, "--method", "iia-dpm-solver++-2m", "--nfe", 5]))
    data = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    # Eq. (23): p0 x_i + p1 D_i from step 1 on; the last step uncorrected.
    assert [len(c) for c in data["coefficients"]] == [0, 2, 2, 2, 0]
    _ok(cli(["sample", "--config", cfg, "--method", "iia-dpm-solver++-2m", "--nfe", 5, "--seeds", "0-1",
             "--out", tmp_path / "iia.npz"]))
    out = np.load(tmp_path / "iia.npz")
    assert np.isfinite(out["x"]).all() and out["images"].shape == (2, *IMAGE)


@pytest.mark.slow
def test_evaluate_no_fid_cli(cli, sd: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, sd, evaluate={"methods": ["ddim", "iia-ddim", "dpm-solver++-2m", "iia-dpm-solver++-2m"],
                                             "nfe": [4], "samples": 2, "error_samples": 2, "reference_method": "ddim",
                                             "reference_nfe": 20})
    _ok(cli(["evaluate", "--config", cfg, "--no-fid", "--csv", tmp_path / "r.csv"]))
    with (tmp_path / "r.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["ddim", "iia-ddim", "dpm-solver++-2m", "iia-dpm-solver++-2m"]
    assert all(r["metric"] == "integration_rmse" and r["model"] == "diffusers-sd" for r in rows)
    assert all(float(r["value"]) > 0 for r in rows)
    assert rows[1]["coefficient_file"] and rows[1]["B"] == "4" and rows[1]["M"] == "3"


def test_cli_errors(cli, sd: dict[str, Path], tmp_path: Path) -> None:
    cfg = _write_cfg(tmp_path, sd, model={"prompts": None})
    r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2 and "model.prompts is required" in _error_line(r)
    cfg = _write_cfg(tmp_path, sd, model={"prompts": str(tmp_path / "missing.txt")})
    r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 1 and "prompts file not found" in _error_line(r)
    cfg = _write_cfg(tmp_path, sd, model={"path": str(tmp_path / "no-such-pipeline")})
    r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 1 and "no-such-pipeline" in _error_line(r)
    cfg = _write_cfg(tmp_path, sd, model={"guidance": 7.5})
    r = cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--out", tmp_path / "x.npz"])
    assert r.exit_code == 2 and "guidance_scale" in _error_line(r)


# --------------------------------------------------------------------------------------------------
# CLIP score (optional metric, local weights only).


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised CLIP model with its image processor and tokenizer, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("clip")
    n_vocab = write_clip_tokenizer(folder)
    torch.manual_seed(3)
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=n_vocab - 2, eos_token_id=n_vocab - 1,
                pad_token_id=n_vocab - 1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_clip_score(clip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import CLIPModel

    from iia_cli.metrics.clip_score import CLIP_WEIGHTS_ENV, ClipScorer, ClipScoreSums, clip_score, resolve_clip_weights
    from iia_cli.runtime.errors import MissingFileError

    monkeypatch.delenv(CLIP_WEIGHTS_ENV, raising=False)
    assert resolve_clip_weights(None) is None  # no weights: the score is skipped
    monkeypatch.setenv(CLIP_WEIGHTS_ENV, str(clip_dir))
    assert resolve_clip_weights(None) == clip_dir
    with pytest.raises(MissingFileError, match="CLIP weights"):
        resolve_clip_weights(tmp_path / "nothing")

    images = np.random.default_rng(0).integers(0, 256, size=(5, *IMAGE), dtype=np.uint8)
    prompts = [PROMPTS[k % 3] for k in range(5)]
    scorer = ClipScorer(clip_dir, batch_size=2)
    scores = scorer(images, prompts)
    assert scores.shape == (5,)
    torch.testing.assert_close(ClipScorer(clip_dir, batch_size=5)(images, prompts), scores, rtol=1e-5, atol=1e-4)

    # Cosines from the CLIP model's own feature functions, with hand-made preprocessing (PIL bicubic resize
    # of the 16 x 16 images to 32 x 32, CLIP's normalisation); the score is 100 * max(cos, 0).
    from PIL import Image

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    resized = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in images])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).double() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).reshape(1, 3, 1, 1)
    ids = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=((x - mean) / std).float()).pooler_output)
        pooled = model.text_model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).pooler_output
        txt = model.text_projection(pooled)
    cosine = scorer.cosine(images, prompts)
    torch.testing.assert_close(cosine, torch.nn.functional.cosine_similarity(img, txt), rtol=0, atol=2e-3)
    assert float(cosine.abs().min()) > 0.01 and bool((cosine < 0).any() and (cosine > 0).any())
    torch.testing.assert_close(scores, (100 * cosine).clamp(min=0), rtol=0, atol=1e-5)

    halves = [ClipScoreSums(), ClipScoreSums()]
    halves[0].update(scores[:2])
    halves[1].update(scores[2:])
    merged = ClipScoreSums.merge_all(halves)
    assert merged.n == 5 and merged.mean() == pytest.approx(float(scores.double().mean()))
    assert clip_score(images, prompts, clip_dir) == pytest.approx(merged.mean(), rel=1e-5)


@pytest.mark.slow
def test_evaluate_fid_and_clip_score_cli(cli, sd: dict[str, Path], clip_dir: Path, tmp_path: Path, inception_weights,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate writes fid, kid (the default beside FID for a data-set reference) and clip_score rows; the CLIP score
    equals the scorer applied to the sampled images."""
    from iia_cli.metrics.clip_score import ClipScorer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IIA_INCEPTION_WEIGHTS", str(inception_weights))
    cfg = _write_cfg(tmp_path, sd, fid={"reference": "builtin:mnist", "reference_samples": 8, "batch": 4,
                                        "clip_weights": str(clip_dir)},
                     evaluate={"methods": ["ddim"], "nfe": [3], "samples": 6, "error_samples": 0})
    _ok(cli(["evaluate", "--config", cfg, "--csv", tmp_path / "r.csv"]))
    with (tmp_path / "r.csv").open(newline="") as f:
        rows = {r["metric"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"fid", "kid", "clip_score"} and rows["clip_score"]["n_samples"] == "6"
    _ok(cli(["sample", "--config", cfg, "--method", "ddim", "--nfe", 3, "--seeds", "0-5", "--out", tmp_path / "s.npz"]))
    data = np.load(tmp_path / "s.npz")
    expected = float(ClipScorer(clip_dir)(data["images"], [str(p) for p in data["prompts"]]).double().mean())
    assert float(rows["clip_score"]["value"]) == pytest.approx(expected, rel=1e-5)
