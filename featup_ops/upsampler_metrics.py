"""Measuring an upsampler: against known truth (the oracle) and by held-out multi-view reconstruction.

- rel_error: ||up - truth|| / ||truth|| over the whole set (sums of squares over all images, then the ratio);
- cosine: mean over all pixels of the cosine similarity between up and truth feature vectors;
- recon_error: for jittered views of each image (fixed seed, so every upsampler sees the same views),
  ||area_downsample(jitter(hr)) - backbone(jitter(image))|| / ||backbone(jitter(image))|| over the set.
  It needs no truth, so it works for every backbone; the fixed area average (not a learned downsampler)
  keeps it comparable between upsamplers.
- lowres_agreement: per sample, high-res features area-pooled back to the backbone's grid against the
  backbone's own low-res features of the same image (no views, no truth): what the caching job records per
  sample in its manifest, to find the samples an upsampler got wrong.
Also a PCA colouring of feature maps for previews.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from featup_ops.backbones import Backbone, imagenet_normalize
from featup_ops.downsamplers import area_downsample
from featup_ops.jitter import JitterSpec, sample_jitter

EVAL_JITTER = JitterSpec(p_flip=0.5, p_zoom=0.5, max_zoom=2.0, pad=20.0)


@dataclass
class Scores:
    """One upsampler's figures over a set of images (rel_error and cosine only where a truth exists)."""

    rel_error: float | None
    cosine: float | None
    recon_error: float
    seconds_per_image: float
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


class _Sums:
    def __init__(self) -> None:
        self.err = self.ref = self.cos = 0.0
        self.pixels = 0

    def add(self, pred: torch.Tensor, ref: torch.Tensor, cosine: bool = False) -> None:
        pred, ref = pred.double(), ref.double()
        self.err += (pred - ref).square().sum().item()
        self.ref += ref.square().sum().item()
        if cosine:
            self.cos += F.cosine_similarity(pred, ref, dim=1, eps=1e-8).sum().item()
            self.pixels += pred.shape[0] * pred.shape[2] * pred.shape[3]

    def relative(self) -> float:
        return (self.err / max(self.ref, 1e-30)) ** 0.5


def relative_error(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """||pred - truth|| / ||truth|| over the whole tensor."""
    s = _Sums()
    s.add(pred, truth)
    return s.relative()


def mean_cosine(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean per-pixel cosine similarity of (B,C,H,W) maps."""
    s = _Sums()
    s.add(pred, truth, cosine=True)
    return s.cos / s.pixels


def lowres_agreement(highres: torch.Tensor, lowres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, (relative error, mean cosine) of high-res features (B,C,H,W) area-pooled to the low-res grid
    against the low-res features (B,C,h,w): ||pool(hr) - lr|| / ||lr|| (NaN where lr is all zero), and the
    cosine similarity of pool(hr) and lr at each low-res pixel, averaged. Two (B,) float32 tensors on the
    features' device; the pooling runs in the features' dtype (accumulating in float32 on CUDA), then float32."""
    if highres.dim() != 4 or lowres.dim() != 4 or highres.shape[:2] != lowres.shape[:2]:
        raise ValueError(f"expected high-res (B,C,H,W) and low-res (B,C,h,w) features of the same batch and "
                         f"channels, got {tuple(highres.shape)} and {tuple(lowres.shape)}")
    pooled = area_downsample(highres, tuple(lowres.shape[2:])).float()
    lr = lowres.float()
    ref = lr.flatten(1).norm(dim=1)
    err = (pooled - lr).flatten(1).norm(dim=1)
    rel = torch.where(ref > 0, err / ref.clamp_min(torch.finfo(torch.float32).tiny), torch.nan)
    cosine = F.cosine_similarity(pooled, lr, dim=1, eps=1e-8).mean(dim=(1, 2))
    return rel, cosine


def call_upsampler(upsampler: nn.Module, backbone: Backbone, lowres: torch.Tensor, images01: torch.Tensor
                   ) -> torch.Tensor:
    """up(lowres, guidance), passing backbone and images to upsamplers that need them (the implicit one)."""
    guidance = imagenet_normalize(images01)
    if getattr(upsampler, "needs_backbone", False):
        return upsampler(lowres, guidance, backbone=backbone, images=images01)
    return upsampler(lowres, guidance)


@torch.no_grad()
def reconstruction_sums(backbone: Backbone, hr: torch.Tensor, images01: torch.Tensor, views: int,
                        generator: torch.Generator, spec: JitterSpec = EVAL_JITTER) -> tuple[float, float]:
    """(sum of squared errors, sum of squared targets) of area-downsampled jittered hr vs jittered views."""
    err = ref = 0.0
    for _ in range(views):
        jitter = sample_jitter(images01.shape[0], images01.shape[-1], spec, per_sample=True, generator=generator)
        target = backbone(backbone.normalize(jitter(images01))).double()
        pred = area_downsample(jitter(hr.float()), target.shape[2:]).double()
        err += (pred - target).square().sum().item()
        ref += target.square().sum().item()
    return err, ref


def evaluate_upsampler(backbone: Backbone, upsampler: nn.Module, batches: Iterable[torch.Tensor],
                       recon_views: int = 5, seed: int = 0) -> Scores:
    """Scores of `upsampler` on [0,1] image batches (B,3,S,S). rel_error/cosine need `backbone.true_features`."""
    if recon_views < 1:
        raise ValueError(f"recon_views must be >= 1, got {recon_views}")
    has_truth = hasattr(backbone, "true_features")
    if has_truth and backbone.channel_norm is not None:
        raise ValueError("the backbone's known truth is defined for its raw features, but a channel norm is "
                         "attached (an upsampler trained with channel_norm=True): train it with --no-channel-norm")
    truth_sums, recon = _Sums(), _Sums()
    generator = torch.Generator().manual_seed(seed)
    seconds, n = 0.0, 0
    upsampler.eval()
    for images01 in batches:
        images01 = images01.float()
        start = time.perf_counter()
        with torch.no_grad():
            lowres = backbone(backbone.normalize(images01))
            hr = call_upsampler(upsampler, backbone, lowres, images01)
        seconds += time.perf_counter() - start
        n += images01.shape[0]
        if has_truth:
            with torch.no_grad():
                truth = backbone.true_features(backbone.normalize(images01), size=tuple(hr.shape[2:]))
            truth_sums.add(hr, truth, cosine=True)
        e, r = reconstruction_sums(backbone, hr, images01, recon_views, generator)
        recon.err += e
        recon.ref += r
    if n == 0:
        raise ValueError("no images to evaluate")
    return Scores(rel_error=truth_sums.relative() if has_truth else None,
                  cosine=truth_sums.cos / truth_sums.pixels if has_truth else None,
                  recon_error=recon.relative(), seconds_per_image=seconds / n, images=n)


# ---- previews ----------------------------------------------------------------------------------------------------
def preview_png(images01: torch.Tensor, lowres: torch.Tensor, highres: torch.Tensor, size: int = 224) -> bytes:
    """A PNG grid, one row per image: the image | low-res features | high-res features (PCA colours), size x size
    panels."""
    from featup_ops.visualize import preview_strip

    rows = []
    for i in range(images01.shape[0]):
        hr = F.interpolate(highres[i : i + 1].float(), size=(size, size), mode="nearest")[0]
        image = (images01[i].clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
        rows.append(preview_strip(image, hr, lowres[i]))
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(rows, 0)).save(buf, format="PNG")
    return buf.getvalue()
