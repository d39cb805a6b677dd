"""CLIP score of generated images against their prompts (Hessel et al. 2021), from local CLIP weights.

``CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0)`` with ``E_I``, ``E_C`` CLIP's projected image and text
embeddings, averaged over images: torchmetrics' ``CLIPScore`` definition (its default weights are
``openai/clip-vit-large-patch14``). Images are preprocessed by the weights' own ``CLIPImageProcessor``
(resize, centre crop, normalise) and captions are truncated to CLIP's 77 tokens, as there.

The weights are a local transformers CLIP directory (``config.json``, weights, ``preprocessor_config.json``,
tokenizer files), e.g. ``CLIPModel.from_pretrained("openai/clip-vit-large-patch14").save_pretrained(dir)``
plus the processor's ``save_pretrained(dir)``, run once where the hub is reachable. Nothing is downloaded:
without weights the score is skipped (:func:`resolve_clip_weights` returns None).

Sums are kept like FID's feature sums (:class:`ClipScoreSums`: count and sum of per-image scores), so shards
and torchrun ranks merge exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iia_cli.runtime.errors import IIARuntimeError, MissingFileError

CLIP_WEIGHTS_ENV = "IIA_CLIP_WEIGHTS"
INSTALL_HINT = "pip install transformers"


def resolve_clip_weights(path: str | Path | None = None) -> Path | None:
    """The CLIP weights directory: ``path``, else ``$IIA_CLIP_WEIGHTS``, else None (CLIP score skipped).
    A directory that is named but missing raises MissingFileError."""
    spec = path or os.environ.get(CLIP_WEIGHTS_ENV)
    if not spec:
        return None
    folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise MissingFileError("CLIP weights directory", folder,
                               "a transformers CLIPModel saved with save_pretrained, plus its processor files")
    return folder


@dataclass
class ClipScoreSums:
    """Mergeable CLIP-score statistics: number of images and the sum of their scores."""

    n: int = 0
    total: float = 0.0

    def update(self, scores: torch.Tensor) -> None:
        self.n += int(scores.numel())
        self.total += float(scores.to(torch.float64).sum())

    @classmethod
    def merge_all(cls, parts: Iterable[ClipScoreSums]) -> ClipScoreSums:
        out = cls()
        for p in parts:
            out.n, out.total = out.n + p.n, out.total + p.total
        return out

    def mean(self) -> float:
        if self.n == 0:
            raise IIARuntimeError("CLIP score of zero images")
        return self.total / self.n


class ClipScorer:
    """Per-image CLIP scores ``100 * max(cos(E_I, E_C), 0)`` with a local CLIP model (module doc)."""

    def __init__(self, weights: str | Path, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        try:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        except ImportError as err:
            raise IIARuntimeError(f"CLIP score needs transformers: {INSTALL_HINT}") from err
        folder = Path(weights)
        self.folder = folder
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, ...
            msg = " ".join(f"{type(err).__name__}: {err}".split())[:400]
            raise IIARuntimeError(f"cannot load CLIP weights from {folder}: {msg}") from err
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = int(batch_size)
        context = self.model.config.text_config.max_position_embeddings
        self.max_length = int(min(self.tokenizer.model_max_length, context))

    @torch.no_grad()
    def image_embeddings(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, C] -> unit-norm projected image embeddings [N, E] (float32)."""
        rgb = images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)
        pixels = self.processor(images=list(rgb), return_tensors="pt")["pixel_values"].to(self.device)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        feats = self.model.visual_projection(pooled).to(torch.float32)
        return feats / feats.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Captions (truncated to CLIP's context) -> unit-norm projected text embeddings [N, E] (float32)."""
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        feats = self.model.text_projection(pooled).to(torch.float32)
        return feats / feats.norm(dim=-1, keepdim=True)

    def __call__(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-image CLIP scores ``100 * max(cos, 0)`` [N] (float32, CPU) of uint8 images [N, H, W, C]
        against their prompts."""
        return (100 * self.cosine(images, prompts)).clamp(min=0)

    def cosine(self, images: np.ndarray | torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarities [N] (float32, CPU) of image and text embeddings, image k with prompt k."""
        images = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(prompts):
            raise IIARuntimeError(f"CLIP score takes uint8 images [N, H, W, C] and N prompts; got {images.dtype} "
                                  f"{list(images.shape)} and {len(prompts)} prompts")
        scores = []
        for k in range(0, len(images), self.batch_size):
            img = self.image_embeddings(images[k : k + self.batch_size])
            txt = self.text_embeddings(prompts[k : k + self.batch_size])
            scores.append((img * txt).sum(-1).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def clip_score(images: np.ndarray | torch.Tensor, prompts: Sequence[str], weights: str | Path,
               device: str | torch.device = "cpu", batch_size: int = 64) -> float:
    """Mean CLIP score of uint8 images [N, H, W, C] against their prompts."""
    sums = ClipScoreSums()
    sums.update(ClipScorer(weights, device, batch_size)(images, prompts))
    return sums.mean()
