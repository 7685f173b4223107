"""Backbone registry: any timm vision model as a spatial feature extractor (B, C, h, w).

    backbone = create_backbone("dinov2", weights="s3://bkt/dinov2.safetensors")
    feats = backbone(normalised_images)        # (B, 384, H/14, W/14)

Named presets map to timm ids (`list_backbones()`); any other timm id works too. ViTs give the last
block's tokens after the final norm (timm's `forward_intermediates`: prefix CLS/register tokens dropped,
position embeddings interpolated for the input size); CNNs give their last feature map. Weights come from the timm/HF cache,
or from a local/fsspec path; no weights and no explicit `random_init=True` is an error, never a silently
random model. Custom backbones (e.g. the `oracle`) join through `register_backbone`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoints import read_state, state_fingerprint
from .layers import ChannelNorm

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


def imagenet_normalize(images01: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB (B,3,H,W) normalised with ImageNet mean/std: the guidance every upsampler gets (what FeatUp's
    JBU checkpoints were trained with), whatever normalisation the backbone itself wants."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images01.dtype, device=images01.device).view(1, 3, 1, 1)
    return (images01 - mean) / std


class BackboneError(ValueError):
    """An unknown backbone, or one whose weights cannot be had."""


@dataclass(frozen=True)
class BackbonePreset:
    """A named timm model as the FeatUp reference uses it (ImageNet mean/std, as its checkpoints expect)."""

    timm_id: str
    description: str
    project_tokens: bool = False  # apply the model's head (CLIP's projection) to every patch token
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


PRESETS: dict[str, BackbonePreset] = {
    "dino16": BackbonePreset("vit_small_patch16_224.dino", "DINO ViT-S/16, 384 channels, stride 16"),
    "dino8": BackbonePreset("vit_small_patch8_224.dino", "DINO ViT-S/8, 384 channels, stride 8"),
    "dinov2": BackbonePreset("vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14, 384 channels, stride 14"),
    "clip": BackbonePreset("vit_base_patch16_clip_224.openai", "CLIP ViT-B/16 projected, 512 channels, stride 16",
                           project_tokens=True),
    "vit": BackbonePreset("vit_small_patch16_224.augreg_in21k_ft_in1k", "supervised ViT-S/16, 384 channels"),
    "resnet50": BackbonePreset("resnet50.a1_in1k", "ResNet-50 layer4, 2048 channels, stride 32"),
}

BackboneFactory = Callable[..., "Backbone"]
_FACTORIES: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Registers `factory(weights=None, random_init=False, storage_options=None, **kwargs) -> Backbone`."""

    def wrap(factory: BackboneFactory) -> BackboneFactory:
        if name in _FACTORIES or name in PRESETS:
            warnings.warn(f"backbone {name!r} registered twice: {factory.__module__}.{factory.__qualname__} "
                          "replaces the earlier definition", stacklevel=2)
        _FACTORIES[name] = factory
        return factory

    return wrap


def list_backbones() -> dict[str, str]:
    """Registered names with a one-line description."""
    out = {name: f"{p.description} (timm {p.timm_id})" for name, p in PRESETS.items()}
    out.update({name: (f.__doc__ or "").strip().splitlines()[0] for name, f in _FACTORIES.items()})
    return out


class Backbone(nn.Module):
    """A frozen feature extractor: normalised images (B,3,H,W) -> features (B, dim, H/patch, W/patch)."""

    name: str
    dim: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str

    def __init__(self, name: str, dim: int, patch_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 weights_id: str = "none"):
        super().__init__()
        self.name, self.dim, self.patch_size = name, dim, patch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.weights_id = weights_id
        self.channel_norm: ChannelNorm | None = None

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The feature grid for an input of this size."""
        return height // self.patch_size, width // self.patch_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0,1] RGB (B,3,H,W) -> the normalisation this backbone expects."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"backbone {self.name} expects normalised images (B,3,H,W), got {tuple(x.shape)}")
        if min(x.shape[2:]) < self.patch_size:
            raise ValueError(f"backbone {self.name}: image {tuple(x.shape[2:])} is smaller than one patch "
                             f"({self.patch_size} px)")
        feats = self.features(x)
        return feats if self.channel_norm is None else self.channel_norm(feats)


class TimmBackbone(Backbone):
    """A timm model wrapped to return a spatial feature map."""

    def __init__(self, name: str, model: nn.Module, project_tokens: bool, mean, std, weights_id: str):
        is_vit = all(hasattr(model, a) for a in ("patch_embed", "num_prefix_tokens", "forward_intermediates"))
        if is_vit:
            patch = model.patch_embed.patch_size
            patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        else:
            patch_size = int(model.feature_info[-1]["reduction"])
        dim = model.num_classes if project_tokens else model.num_features
        super().__init__(name, dim, patch_size, mean, std, weights_id)
        self.model = model
        self.is_vit = is_vit
        self.project_tokens = project_tokens
        if not project_tokens and hasattr(model, "reset_classifier"):
            model.reset_classifier(0)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_vit:
            out = self.model.forward_features(x)
            if out.dim() == 4 and out.shape[1] != self.dim and out.shape[-1] == self.dim:
                out = out.permute(0, 3, 1, 2)  # NHWC models (Swin, ...)
            return out
        # the last block's patch tokens after the final norm, prefix tokens dropped, as a (B, C, h, w) map
        (out,) = self.model.forward_intermediates(x, indices=1, norm=True, stop_early=True, output_fmt="NCHW",
                                                  intermediates_only=True)
        if tuple(out.shape[2:]) != self.grid_size(*x.shape[2:]):
            raise RuntimeError(f"{self.name}: a {tuple(out.shape[2:])} token grid for input {tuple(x.shape[2:])}")
        if self.project_tokens:  # the head (CLIP's projection) applied to every patch token
            out = self.model.head(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out


def _cached_hub_file(timm_id: str) -> str | None:
    """The timm weights file for this model in the local HF cache, if any (never downloads)."""
    import timm

    try:
        repo = timm.get_pretrained_cfg(timm_id).hf_hub_id
    except Exception:  # noqa: BLE001 - no pretrained cfg means nothing cached
        return None
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def _strip_prefixes(state: dict) -> dict:
    for wrapper in ("state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], Mapping):
            state = dict(state[wrapper])
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _load_weights(model: nn.Module, state: dict, source: str, head_needed: bool) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_prefixes = ("head.", "fc.", "classifier.", "head_drop")
    missing = [k for k in missing if head_needed or not k.startswith(head_prefixes)]
    if missing:
        raise BackboneError(f"weights {source} do not fit the model: {len(missing)} missing tensors, e.g. "
                            f"{missing[:5]}; unexpected e.g. {unexpected[:5]}")
    if unexpected:
        log.warning("weights %s: ignoring %d tensors the model does not use, e.g. %s", source, len(unexpected),
                    unexpected[:3])


def _create_timm(name: str, timm_id: str, project_tokens: bool, mean, std, weights: str | None,
                 random_init: bool, storage_options: Mapping[str, Any] | None) -> TimmBackbone:
    import timm

    def build(**kwargs: Any) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # identical "random" weights in every worker
            return timm.create_model(timm_id, pretrained=False, **kwargs)

    try:
        try:
            model = build(dynamic_img_size=True)  # ViTs: interpolate position embeddings per input size
        except TypeError:
            model = build()  # models without the option (CNNs)
    except RuntimeError as exc:
        raise BackboneError(f"unknown backbone {name!r}: not a preset ({', '.join(sorted(PRESETS))}), "
                            f"not registered ({', '.join(sorted(_FACTORIES))}) and timm says: {exc}") from None
    if weights is not None:
        state, _ = read_state(weights, storage_options)
        state = _strip_prefixes(state)
        _load_weights(model, state, weights, head_needed=project_tokens)
        weights_id = f"file:{state_fingerprint(state)}"
    elif random_init:
        log.warning("backbone %s (%s): RANDOM weights (seed %d) as requested by random_init", name, timm_id,
                    RANDOM_INIT_SEED)
        weights_id = f"random-init:seed{RANDOM_INIT_SEED}"
    else:
        cached = _cached_hub_file(timm_id)
        if cached is None:
            raise BackboneError(
                f"no weights for backbone {name!r} (timm {timm_id}): they are not in the local timm/Hugging Face "
                "cache and this tool never downloads at run time. Pass a weights file (local or s3://, "
                ".safetensors or a torch state dict), pre-populate the HF cache, or ask for random weights "
                "explicitly (random_init / --random-init) for tests."
            )
        state, _ = read_state(cached)
        _load_weights(model, _strip_prefixes(state), cached, head_needed=project_tokens)
        weights_id = f"hf-cache:{timm_id}:{state_fingerprint(state)}"
    backbone = TimmBackbone(name, model, project_tokens, mean, std, weights_id)
    return backbone.eval().requires_grad_(False)


def create_backbone(name: str, weights: str | None = None, random_init: bool = False, channel_norm: bool = False,
                    storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> Backbone:
    """A frozen, eval-mode backbone by preset name, registered name, or any timm model id.

    weights: a local path or fsspec URL (.safetensors, or a torch file read with weights_only=True);
    default: the timm/HF cache. random_init: explicitly accept deterministic random weights.
    channel_norm: append a fresh per-pixel LayerNorm over channels (FeatUp's training wrapper).
    """
    if name in _FACTORIES:
        backbone = _FACTORIES[name](weights=weights, random_init=random_init, storage_options=storage_options,
                                    **kwargs)
    elif name in PRESETS:
        p = PRESETS[name]
        backbone = _create_timm(name, p.timm_id, p.project_tokens, p.mean, p.std, weights, random_init,
                                storage_options)
    else:
        import timm

        try:
            cfg = timm.get_pretrained_cfg(name)
            mean, std = (cfg.mean, cfg.std) if cfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
        except Exception:  # noqa: BLE001
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        backbone = _create_timm(name, name, False, mean, std, weights, random_init, storage_options)
    if channel_norm:
        backbone.channel_norm = ChannelNorm(backbone.dim).requires_grad_(False)  # frozen like the backbone
    return backbone
