"""Multi-view jitter: flip, zoom and pad-and-crop, the same geometric transform for an image and its features.

A jitter is an affine map of normalised coordinates ([-1, 1] spans the image, align_corners=False), so one
jitter applies to any resolution: the image (B,3,H,W) and its 16x features (B,C,H',W') move together.
Samples outside the image are reflected, as FeatUp's reflect-pad-then-crop does (Fu et al., ICLR 2024).

    jitter = sample_jitter(batch=4, image_size=224, generator=g)     # one transform for the whole batch
    view, hr_view = jitter(images), jitter(hr)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class JitterSpec:
    """How views are drawn: flip with p_flip; zoom with p_zoom, uniform in [1, max_zoom]; shift within `pad`.

    `pad` is in pixels of an image of `image_size` pixels (FeatUp: 20 px at 224 for the JBU, 30 for the
    implicit upsampler); the window may reach that far past each border.
    """

    p_flip: float = 0.5
    p_zoom: float = 0.5
    max_zoom: float = 2.0
    pad: float = 20.0

    def __post_init__(self) -> None:
        if not (0 <= self.p_flip <= 1 and 0 <= self.p_zoom <= 1):
            raise ValueError(f"p_flip and p_zoom must be probabilities, got {self.p_flip}, {self.p_zoom}")
        if self.max_zoom < 1:
            raise ValueError(f"max_zoom must be >= 1 (1 = no zoom), got {self.max_zoom}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 pixels, got {self.pad}")


class Jitter:
    """A batch of affine view transforms, `theta` (B,2,3) mapping output to input normalised coordinates."""

    def __init__(self, theta: torch.Tensor):
        if theta.dim() != 3 or theta.shape[1:] != (2, 3):
            raise ValueError(f"theta must be (B, 2, 3), got {tuple(theta.shape)}")
        self.theta = theta

    def __len__(self) -> int:
        return self.theta.shape[0]

    def __call__(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """Applies the transform to (B,C,H,W) at its own resolution; B must equal len(self) or theta be (1,2,3)."""
        if x.dim() != 4:
            raise ValueError(f"jitter expects (B,C,H,W), got {tuple(x.shape)}")
        theta = self.theta.to(device=x.device, dtype=torch.float32)
        if theta.shape[0] == 1 and x.shape[0] != 1:
            theta = theta.expand(x.shape[0], 2, 3)
        if theta.shape[0] != x.shape[0]:
            raise ValueError(f"{theta.shape[0]} transforms for a batch of {x.shape[0]}")
        fast = self._whole_pixel_shift(theta, x.shape[2], x.shape[3])
        if fast is not None:
            return _shift_flip(x, *fast)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # grid_sample needs the grid in the input's dtype (autocast may hand us float16/bfloat16)
        return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="reflection", align_corners=False)

    @staticmethod
    def _whole_pixel_shift(theta: torch.Tensor, height: int, width: int) -> tuple[int, int, bool] | None:
        """(dy, dx, flip) when every transform is the same unzoomed shift by whole pixels at this size.

        Such views are exact copies of pixels, so they skip grid_sample (and its costly backward).
        """
        first = theta[0]
        if theta.shape[0] > 1 and not torch.equal(theta, first.expand_as(theta)):
            return None
        a, ty, tx = first[0, 0].item(), first[1, 2].item(), first[0, 2].item()
        if abs(abs(a) - 1) > 1e-6 or abs(first[1, 1].item() - 1) > 1e-6 or first[0, 1].item() or first[1, 0].item():
            return None
        dy, dx = ty * height / 2, tx * width / 2
        if abs(dy - round(dy)) > 1e-3 or abs(dx - round(dx)) > 1e-3:
            return None
        dy, dx = round(dy), round(dx)
        if abs(dy) >= height or abs(dx) >= width:
            return None
        return dy, dx, a < 0

    def repeat_interleave(self, repeats: int) -> "Jitter":
        return Jitter(self.theta.repeat_interleave(repeats, dim=0))


def _shift_flip(x: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """out[..., i, j] = x[..., i + dy, j + dx] with mirror padding about the border (grid_sample's
    'reflection' with align_corners=False), then mirrored left-right if `flip`."""
    H, W = x.shape[2:]
    if dy:
        p = abs(dy)
        x = torch.cat([x[:, :, :p].flip(2), x, x[:, :, H - p:].flip(2)], 2)[:, :, p + dy: p + dy + H]
    if dx:
        p = abs(dx)
        x = torch.cat([x[:, :, :, :p].flip(3), x, x[:, :, :, W - p:].flip(3)], 3)[:, :, :, p + dx: p + dx + W]
    return x.flip(3) if flip else x


def jitter_theta(flip: torch.Tensor, zoom: torch.Tensor, center_y: torch.Tensor, center_x: torch.Tensor
                 ) -> torch.Tensor:
    """theta (B,2,3) for views of size 1/zoom centred at (center_y, center_x), mirrored where `flip`."""
    scale = 1.0 / zoom
    sx = torch.where(flip, -scale, scale)
    zeros = torch.zeros_like(scale)
    return torch.stack([torch.stack([sx, zeros, center_x], -1), torch.stack([zeros, scale, center_y], -1)], 1)


def sample_jitter(batch: int, image_size: int | tuple[int, int], spec: JitterSpec = JitterSpec(),
                  per_sample: bool = False, generator: torch.Generator | None = None) -> Jitter:
    """Random views; one transform shared by the batch (FeatUp's JBU recipe) unless `per_sample`.

    `image_size`: the side of square images, or (height, width). Unzoomed views shift by whole pixels of
    the image along each axis, so they resample it exactly.
    """
    sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if batch < 1 or min(sizes) < 1:
        raise ValueError(f"batch and image_size must be >= 1, got {batch}, {image_size}")
    n = batch if per_sample else 1
    u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
    flip = u[:, 0] < spec.p_flip
    zoomed = u[:, 1] < spec.p_zoom
    zoom = torch.where(zoomed, 1 + torch.rand(n, generator=generator, dtype=torch.float64) * (spec.max_zoom - 1),
                       torch.ones(n, dtype=torch.float64))
    # window start (pixels of the original image) uniform in [-pad, size + pad - size/zoom]
    size = torch.tensor(sizes, dtype=torch.float64)  # (height, width): starts and centres are (y, x)
    span = size + 2 * spec.pad - size / zoom[:, None]
    starts = -spec.pad + u[:, 2:4] * span
    starts = torch.where(zoomed[:, None], starts, starts.round())
    centers = 2 * starts / size + 1 / zoom[:, None] - 1
    theta = jitter_theta(flip, zoom, centers[:, 0], centers[:, 1]).float()
    return Jitter(theta.expand(batch, 2, 3).contiguous())


def identity(batch: int = 1) -> Jitter:
    """The view that is the image itself."""
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).expand(batch, 2, 3).contiguous()
    return Jitter(theta)
