"""Storage presets: how high-res features are stored, and how a reader gets them back.

    float16 / bfloat16 / float32   the features themselves (bfloat16 as raw uint16 bits)
    int8                           per-sample per-channel affine 8-bit codes: x ~ q * scale + offset, |err| <= scale/2
    pca<k>                         k principal-component coefficients (float16); one projection for the dataset,
                                   fitted on a sample of it and stored once; x ~ mean + components^T c
    lowres                         the backbone's low-res features (float16) and the input image, as a JPEG
                                   (quality 95, no chroma subsampling; caches written before stored it raw,
                                   uint8 3xSxS, and still read); the reader re-runs the upsampler with the fused
                                   op and gets the eager features to float16 precision, up to what the JPEG
                                   changes in the guidance (mean cosine >= 0.999, see error_bound)

Every preset stores arrays in Zarr groups named by role (features, scale, offset, image, lowres) with one
array per shard attempt; `decode` turns what a reader fetched back into (C, H, W) features.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

FLOAT_PRESETS = ("float16", "bfloat16", "float32")
NAMED_PRESETS = (*FLOAT_PRESETS, "int8", "lowres")
PCA_PATTERN = re.compile(r"^pca(\d+)$")
# How the lowres preset stores its guidance image. Measured on photographs with the oracle backbone and its
# shipped JBU (benchmarks/results/dataplane.json): the replayed features keep a mean cosine of about 0.99998 to
# the eager ones, at a sixth of the raw image's bytes; PNG or lossless WebP would be exact but 2-3x larger.
IMAGE_CODEC = {"format": "JPEG", "quality": 95, "subsampling": 0}
IMAGE_VLEN = "bytes"  # ArraySpec dtype of one encoded file per sample (zarr's variable-length bytes)
QUANTIZE_CHUNK = 1 << 18  # int8: elements quantised per step, so the float temporaries stay small and reused


class PresetError(ValueError):
    """An unknown or unusable storage preset."""


@dataclass(frozen=True)
class ArraySpec:
    """One per-sample array a preset writes: its group, per-sample shape and stored numpy dtype."""

    group: str
    sample_shape: tuple[int, ...]
    dtype: str
    spatial: bool = True  # (C, H, W) maps are tiled for cheap crops; vectors are not
    attributes: Mapping[str, Any] = field(default_factory=dict)  # recorded on the array (e.g. the image codec)

    @property
    def holds_files(self) -> bool:
        """One already-compressed file per sample (variable-length bytes), stored without another compressor."""
        return self.dtype == IMAGE_VLEN


def validate(name: str) -> str:
    if name in NAMED_PRESETS or PCA_PATTERN.match(name):
        return name
    raise PresetError(f"unknown storage preset {name!r}: use float16, bfloat16, float32, int8, pca<k> (e.g. pca64) "
                      "or lowres")


def pca_components(name: str) -> int | None:
    m = PCA_PATTERN.match(name)
    return int(m.group(1)) if m else None


def from_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


class Preset:
    """Encoder/decoder pair for one storage preset (see module docstring)."""

    def __init__(self, name: str, dim: int, hr_hw: tuple[int, int], lr_hw: tuple[int, int], image_size: int,
                 pca: tuple[np.ndarray, np.ndarray] | None = None):
        self.name = validate(name)
        self.dim, self.hr_hw, self.lr_hw, self.image_size = dim, tuple(hr_hw), tuple(lr_hw), image_size
        self.k = pca_components(name)
        if self.k is not None:
            if not 1 <= self.k <= dim:
                raise PresetError(f"{name}: k must be between 1 and the feature width {dim}")
            if pca is None:
                raise PresetError(f"{name} needs a fitted projection (mean, components)")
            self.mean = np.asarray(pca[0], np.float32)
            self.components = np.asarray(pca[1], np.float32)
            if self.components.shape != (self.k, dim) or self.mean.shape != (dim,):
                raise PresetError(f"{name}: projection shapes {self.mean.shape}, {self.components.shape} do not fit "
                                  f"k={self.k}, dim={dim}")

    @property
    def needs_upsampler_at_read(self) -> bool:
        return self.name == "lowres"

    def arrays(self, hr_hw: tuple[int, int] | None = None) -> list[ArraySpec]:
        """The per-sample arrays this preset writes for high-res maps of `hr_hw` (default: the preset's own),
        low-res features and labels are added by the writer."""
        C, (H, W) = self.dim, tuple(hr_hw or self.hr_hw)
        if self.name in FLOAT_PRESETS:
            return [ArraySpec("features", (C, H, W), "uint16" if self.name == "bfloat16" else self.name)]
        if self.name == "int8":
            return [ArraySpec("features", (C, H, W), "uint8"), ArraySpec("scale", (C,), "float32", False),
                    ArraySpec("offset", (C,), "float32", False)]
        if self.k is not None:
            return [ArraySpec("features", (self.k, H, W), "float16")]
        codec = {"image_codec": {k.lower(): v for k, v in IMAGE_CODEC.items()}}
        return [ArraySpec("image", (), IMAGE_VLEN, False, codec)]  # lowres: low-res features are always stored too

    def lowres_dtype(self) -> str:
        return "float32" if self.name == "float32" else "float16"

    # -- writing ---------------------------------------------------------------------------------------------
    def encode(self, highres: torch.Tensor, images: np.ndarray) -> dict[str, np.ndarray]:
        """A batch of high-res features (B,C,H,W, any float dtype/device) -> arrays to store, by group."""
        if self.name == "lowres":
            return {"image": encode_images(images)}
        if self.name in FLOAT_PRESETS:  # one conversion, straight from the compute dtype
            dtype = getattr(torch, self.name)
            out = highres.to(dtype).cpu()
            return {"features": out.view(torch.int16).numpy().view(np.uint16) if self.name == "bfloat16"
                    else out.numpy()}
        if self.name == "int8":
            q, scale, lo = quantize_uint8(highres)
            return {"features": q.cpu().numpy(), "scale": scale.cpu().numpy(), "offset": lo.cpu().numpy()}
        x = highres.float()
        comps = torch.from_numpy(self.components).to(x.device)
        mean = torch.from_numpy(self.mean).to(x.device)
        coeffs = torch.einsum("kc,bchw->bkhw", comps, x - mean[None, :, None, None])
        return {"features": coeffs.to(torch.float16).cpu().numpy()}

    # -- reading ---------------------------------------------------------------------------------------------
    def decode(self, parts: dict[str, np.ndarray]) -> np.ndarray:
        """What a reader fetched for one sample (by group) -> features (C, h, w) as float (lowres: see reader)."""
        if self.name in ("float16", "float32"):
            return parts["features"]
        if self.name == "bfloat16":
            return from_bfloat16_bits(parts["features"])
        if self.name == "int8":
            q = parts["features"].astype(np.float32)
            return q * parts["scale"][:, None, None] + parts["offset"][:, None, None]
        if self.k is not None:
            return np.einsum("kc,khw->chw", self.components, parts["features"].astype(np.float32),
                             optimize=True) + self.mean[:, None, None]
        raise PresetError("lowres features are decoded by re-running the upsampler (FeatureCache does this)")


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,C,H,W) float -> (codes uint8, scale (B,C), offset (B,C)) with x ~ codes * scale + offset.

    codes = round((x - min) / scale), scale = (max - min) / 255 per sample and channel, as float32. Done a few
    channels at a time through one reused float32 buffer that stays in cache, instead of a full-size
    temporary per step (each a fresh allocation the kernel zero-fills).
    """
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W)
    lo, hi = flat.amin(dim=1).float(), flat.amax(dim=1).float()  # (aminmax is ~5x slower than both on CPU)
    scale = ((hi - lo) / 255).clamp_min(1e-12)
    codes = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    rows = max(1, QUANTIZE_CHUNK // max(H * W, 1))
    buf = torch.empty((min(rows, B * C), H * W), dtype=torch.float32, device=x.device)
    for r in range(0, B * C, rows):
        part = slice(r, r + rows)
        t = buf[: codes[part].shape[0]]
        torch.sub(flat[part], lo[part, None], out=t).div_(scale[part, None]).round_().clamp_(0, 255)
        codes[part].copy_(t)
    return codes.view(B, C, H, W), scale.view(B, C), lo.view(B, C)


def encode_images(images: np.ndarray) -> np.ndarray:
    """uint8 RGB images (B,H,W,3) -> (B,) object array of encoded image files (IMAGE_CODEC)."""
    out = np.empty(len(images), dtype=object)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, **{k.lower(): v for k, v in IMAGE_CODEC.items()})
        out[i] = buf.getvalue()
    return out


def decode_stored_image(stored: Any) -> np.ndarray:
    """One sample of the lowres preset's image array -> (3, S, S) uint8: an encoded image file (any format
    Pillow reads), or the raw uint8 (3, S, S) array of caches written before images were compressed."""
    while isinstance(stored, np.ndarray) and stored.dtype == object:  # zarr wraps a bytes element in 0-d arrays
        stored = stored.item()
    if isinstance(stored, np.ndarray):
        if stored.dtype == np.uint8 and stored.ndim == 3:
            return stored
        stored = stored.tobytes()
    data = bytes(stored)
    with Image.open(io.BytesIO(data)) as img:
        return np.ascontiguousarray(np.asarray(img.convert("RGB")).transpose(2, 0, 1))


def error_bound(name: str) -> str:
    """The documented error of a preset's round trip, per element."""
    return {"float16": "relative 2^-11 (float16 rounding)", "bfloat16": "relative 2^-8 (bfloat16 rounding)",
            "float32": "exact", "int8": "absolute <= scale/2, scale = (max-min)/255 per sample and channel",
            "lowres": "the upsampler re-run on float16 low-res features and the JPEG-stored image: mean cosine >= "
                      "0.999 to the eager features (measured ~0.99998 with a trained JBU; exact to float16 precision "
                      "for upsamplers that ignore the image, e.g. bilinear)"}.get(
        name, "the variance outside the top-k principal components (see the fit's explained variance)")


def fit_pca(samples: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (C,), components (k, C), explained variance fraction) from feature vectors (N, C)."""
    x = samples.double()
    mean = x.mean(0)
    centered = x - mean
    cov = centered.T @ centered / max(len(x) - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    explained = float(evals[:k].sum() / evals.sum().clamp_min(1e-30))
    return mean.float().numpy(), evecs[:, :k].T.contiguous().float().numpy(), explained
