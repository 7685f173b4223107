"""Feature pictures in the FeatUp figure style: the first three principal components as RGB."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def pca_basis(features: torch.Tensor, components: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (C,), basis (C, k)) of the per-pixel feature vectors of a (C, H, W) map."""
    x = features.float().flatten(1).T  # (pixels, C)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, v[:components].T


def to_rgb(features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
           ) -> np.ndarray:
    """Projects (C, H, W) features on the basis and maps each component's [lo, hi] to 0..255."""
    proj = torch.einsum("chw,ck->khw", features.float() - mean[:, None, None], basis)
    scaled = (proj - lo[:, None, None]) / (hi - lo).clamp_min(1e-8)[:, None, None]
    return (scaled.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def preview_strip(image: np.ndarray, highres: np.ndarray | torch.Tensor,
                  lowres: np.ndarray | torch.Tensor | None = None,
                  others: Sequence[np.ndarray | torch.Tensor] = ()) -> np.ndarray:
    """image | low-res features | high-res features | each of `others` (more high-res maps of the same image,
    e.g. another upsampler's), side by side at the high-res size: (H, n*W, 3) uint8.

    One PCA (fitted on the high-res map) colours every feature map, so their colours mean the same thing;
    the low-res map is shown with nearest-neighbour blocks, as the backbone sees the image, and `others` of
    another size are resized bilinearly.
    """
    hr = torch.as_tensor(np.asarray(highres, dtype=np.float32))
    H, W = hr.shape[1:]
    mean, basis = pca_basis(hr)
    proj = torch.einsum("cn,ck->kn", hr.flatten(1) - mean[:, None], basis)
    lo, hi = torch.quantile(proj, 0.01, dim=1), torch.quantile(proj, 0.99, dim=1)
    img = torch.as_tensor(np.array(image)).permute(2, 0, 1)[None].float()
    panels = [F.interpolate(img, size=(H, W), mode="bilinear", antialias=True, align_corners=False)[0]
              .clamp(0, 255).round().byte().permute(1, 2, 0).numpy()]
    if lowres is not None:
        lr = torch.as_tensor(np.asarray(lowres, dtype=np.float32))
        lr_big = F.interpolate(lr[None], size=(H, W), mode="nearest")[0]
        panels.append(to_rgb(lr_big, mean, basis, lo, hi))
    panels.append(to_rgb(hr, mean, basis, lo, hi))
    for other in others:
        o = torch.as_tensor(np.asarray(other, dtype=np.float32))
        if tuple(o.shape[1:]) != (H, W):
            o = F.interpolate(o[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        panels.append(to_rgb(o, mean, basis, lo, hi))
    return np.concatenate(panels, axis=1)
