"""Upsampler registry and `FeatureModel`, the one interface the data plane uses.

    model = FeatureModel.create(backbone="dinov2", upsampler="jbu", upsampler_weights="s3://.../jbu.ckpt")
    lowres, highres = model(images)            # images: (B,3,H,W) RGB in [0, 1]

Upsamplers are called `up(features, guidance)` with the ImageNet-normalised image as guidance (what
FeatUp's JBU checkpoints were trained with), whatever normalisation the backbone itself wants.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .backbones import RANDOM_INIT_SEED, Backbone, create_backbone, imagenet_normalize
from .baselines import InterpolationUpsampler
from .checkpoints import load_jbu, read_state, save_jbu, state_fingerprint
from .jbu import JBUStack

log = logging.getLogger(__name__)


class UpsamplerError(ValueError):
    """An unknown upsampler, or weights that do not fit it."""


UpsamplerFactory = Callable[..., nn.Module]
_UPSAMPLERS: dict[str, tuple[UpsamplerFactory, str]] = {}


def register_upsampler(name: str, description: str) -> Callable[[UpsamplerFactory], UpsamplerFactory]:
    """Registers `factory(dim, weights=None, random_init=False, storage_options=None, **kw) -> module`."""

    def wrap(factory: UpsamplerFactory) -> UpsamplerFactory:
        if name in _UPSAMPLERS:
            warnings.warn(f"upsampler {name!r} registered twice: {factory.__module__}.{factory.__qualname__} replaces "
                          f"{_UPSAMPLERS[name][0].__module__}.{_UPSAMPLERS[name][0].__qualname__}", stacklevel=2)
        _UPSAMPLERS[name] = (factory, description)
        return factory

    return wrap


def list_upsamplers() -> dict[str, str]:
    return {name: desc for name, (_, desc) in _UPSAMPLERS.items()}


def _interpolation(mode: str) -> UpsamplerFactory:
    def factory(dim: int, weights: str | None = None, random_init: bool = False,
                storage_options: Mapping[str, Any] | None = None, scale: int = 16) -> nn.Module:
        if weights is not None:
            raise UpsamplerError(f"the {mode} upsampler has no weights; drop --upsampler-weights")
        return InterpolationUpsampler(mode, scale)

    return factory


register_upsampler("bilinear", "bilinear interpolation, 16x (baseline)")(_interpolation("bilinear"))
register_upsampler("bicubic", "bicubic interpolation, 16x (baseline)")(_interpolation("bicubic"))


@register_upsampler("jbu", "FeatUp JBU stack, 16x, trained weights (own .safetensors or published .ckpt)")
def _create_jbu(dim: int, weights: str | Mapping | None = None, random_init: bool = False,
                storage_options: Mapping[str, Any] | None = None, stages: int = 4) -> JBUStack:
    if weights is None:
        if not random_init:
            raise UpsamplerError("the jbu upsampler needs trained weights (--upsampler-weights PATH, local or s3://); "
                                 "pass --random-init to accept an untrained stack for tests")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return JBUStack(dim, stages=stages).eval()
    stack = load_jbu(weights, storage_options)
    if stack.dim != dim:
        raise UpsamplerError(f"JBU weights {weights if isinstance(weights, str) else '<dict>'} are for {stack.dim}-channel "
                             f"features but the backbone gives {dim}: use the checkpoint trained for this backbone")
    return stack


def create_upsampler(name: str, dim: int, weights: str | Mapping | None = None, random_init: bool = False,
                     storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """An eval-mode upsampler by registered name, called `up(features, guidance)`."""
    if name not in _UPSAMPLERS:
        raise UpsamplerError(f"unknown upsampler {name!r}; registered: {', '.join(sorted(_UPSAMPLERS))}")
    return _UPSAMPLERS[name][0](dim, weights=weights, random_init=random_init, storage_options=storage_options,
                                **kwargs).eval()


def save_upsampler(upsampler: nn.Module, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Writes a learned upsampler's exact weights as one .safetensors file, which `create_upsampler(name, dim,
    weights=url)` loads back (jbu, anyup): how a cache keeps the weights its reader re-runs."""
    from .anyup import AnyUpUpsampler
    from .anyup_weights import save_anyup

    if isinstance(upsampler, JBUStack):
        save_jbu(upsampler, url, storage_options)
    elif isinstance(upsampler, AnyUpUpsampler):
        save_anyup(upsampler.anyup, url, storage_options)
    else:
        raise UpsamplerError(f"{type(upsampler).__name__} has no weights file to save (jbu and anyup have)")


class FeatureModel(nn.Module):
    """Backbone + upsampler: RGB images in [0,1] -> (low-res, high-res) features, without gradients."""

    def __init__(self, backbone: Backbone, upsampler: nn.Module, weights_ids: Mapping[str, str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.upsampler = upsampler
        if getattr(upsampler, "channel_norm", None) is not None:
            backbone.channel_norm = upsampler.channel_norm  # trained behind it: part of the features
        self.weights_ids = dict(weights_ids or {})

    @classmethod
    def create(cls, backbone: str, upsampler: str = "jbu", backbone_weights: str | None = None,
               upsampler_weights: str | Mapping | None = None, random_init: bool = False,
               storage_options: Mapping[str, Any] | None = None, upsampler_options: Mapping[str, Any] | None = None,
               backbone_options: Mapping[str, Any] | None = None) -> "FeatureModel":
        bb = create_backbone(backbone, weights=backbone_weights, random_init=random_init,
                             storage_options=storage_options, **dict(backbone_options or {}))
        up = create_upsampler(upsampler, bb.dim, weights=upsampler_weights, random_init=random_init,
                              storage_options=storage_options, **dict(upsampler_options or {}))
        up_id = getattr(up, "weights_id", None)  # upsamplers that fingerprint what they loaded (AnyUp) say so
        if up_id is None and isinstance(upsampler_weights, str):
            up_id = f"file:{state_fingerprint(read_state(upsampler_weights, storage_options)[0])}"
        elif up_id is None and any(True for _ in up.parameters()):
            up_id = f"state:{state_fingerprint(up.state_dict())}"
        return cls(bb, up, {"backbone": bb.weights_id, "upsampler": up_id or "none"})

    @property
    def dim(self) -> int:
        return self.backbone.dim

    @property
    def scale(self) -> int | None:
        """Output / feature-grid ratio of a fixed-factor upsampler; None when the output follows the image."""
        if hasattr(self.upsampler, "output_size"):
            return None
        return int(getattr(self.upsampler, "scale", 16))

    @property
    def patch_size(self) -> int:
        """The backbone's stride: images whose sides are multiples of it lose no pixels to the feature grid."""
        return self.backbone.patch_size

    def lowres_size(self, height: int, width: int) -> tuple[int, int]:
        return self.backbone.grid_size(height, width)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """High-res size for an image of this size: the upsampler's `output_size` hook (AnyUp: the image's),
        else the feature grid times `scale`."""
        if hasattr(self.upsampler, "output_size"):
            return tuple(self.upsampler.output_size(height, width))
        h, w = self.lowres_size(height, width)
        return h * self.scale, w * self.scale

    def describe(self) -> dict:
        return {
            "backbone": self.backbone.name, "dim": self.dim, "patch_size": self.backbone.patch_size,
            "backbone_mean": list(self.backbone.mean), "backbone_std": list(self.backbone.std),
            "upsampler": self.upsampler.config() if hasattr(self.upsampler, "config") else type(self.upsampler).__name__,
            "scale": self.scale, "weights": self.weights_ids,
        }

    @staticmethod
    def guidance(images: torch.Tensor) -> torch.Tensor:
        return imagenet_normalize(images)

    def autocast(self, device: torch.device, dtype: torch.dtype | None):
        """Mixed precision on CUDA for 16-bit compute; float32 elsewhere."""
        if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, compute_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images (B,3,H,W) in [0,1], got {tuple(images.shape)}")
        with self.autocast(images.device, compute_dtype):
            lowres = self.backbone(self.backbone.normalize(images))
            guidance = self.guidance(images)
            if getattr(self.upsampler, "needs_backbone", False):
                highres = self.upsampler(lowres, guidance, backbone=self.backbone, images=images)
            else:
                highres = self.upsampler(lowres, guidance)
        return lowres, highres
