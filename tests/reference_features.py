"""Features computed from the definitions with plain torch ops, independently of `FeatureModel`, the JBU modules and
the fused operator: what the end-to-end job tests compare the cache with.

The oracle backbone is its formula (featup_ops.oracle) applied with its weights; the JBU stack is FeatUp's joint
bilateral upsampling (Fu et al., ICLR 2024, Sec. 3.2) evaluated with `unfold` from a state dict: the range kernel
from neighbourhood dot products of projected guidance, the spatial Gaussian, the fix-up, and each 2x stage's
bicubic upsample filtered per pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def normalize(images01: torch.Tensor) -> torch.Tensor:
    return (images01 - IMAGENET_MEAN) / IMAGENET_STD


def oracle_pixels(images01: torch.Tensor) -> torch.Tensor:
    """tanh(3 W2 tanh(3 W1 x)) at every pixel x of the normalised image: the oracle's truth at its own size."""
    from featup_ops.oracle import oracle_weights

    w1, w2 = oracle_weights(32)
    hidden = torch.tanh(3 * torch.einsum("oc,bchw->bohw", w1, normalize(images01)))
    return torch.tanh(3 * torch.einsum("oc,bchw->bohw", w2, hidden))


def oracle_lowres(images01: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """The oracle backbone's output: its per-pixel features averaged over patch x patch cells."""
    return F.avg_pool2d(oracle_pixels(images01), patch)


def random_jbu_state(dim: int = 32) -> dict[str, torch.Tensor]:
    """The weights of the untrained stack the job builds for --random-init (the JBU module used for its
    initialisation only; the evaluation below does not touch it)."""
    from featup_ops import JBUStack
    from featup_ops.backbones import RANDOM_INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return {k: v.detach().clone() for k, v in JBUStack(dim).state_dict().items()}


def _conv1x1(x: torch.Tensor, state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", state[f"{name}.weight"][:, :, 0, 0], x) + state[f"{name}.bias"].view(1, -1, 1, 1)


def _neighbourhoods(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, k*k, H, W): every pixel's k x k window, reflect-padded at the borders."""
    B, C, H, W = x.shape
    k = 2 * radius + 1
    return F.unfold(F.pad(x, [radius] * 4, mode="reflect"), kernel_size=k).view(B, C, k * k, H, W)


def jbu_highres(state: dict[str, torch.Tensor], lowres: torch.Tensor, guidance: torch.Tensor, stages: int = 4,
                radius: int = 3) -> torch.Tensor:
    """The JBU stack (eval mode: no dropout) evaluated from its state dict, 2x per stage."""
    k = 2 * radius + 1
    offsets = torch.linspace(-1, 1, k)
    dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).reshape(1, k * k, 1, 1)
    x = lowres
    for n in range(1, stages + 1):
        p = f"up{n}"
        H, W = 2 * x.shape[2], 2 * x.shape[3]
        g = F.adaptive_avg_pool2d(guidance, (H, W))
        keys = _conv1x1(F.gelu(_conv1x1(g, state, f"{p}.range_proj.0")), state, f"{p}.range_proj.3")
        logits = (_neighbourhoods(keys, radius) * keys[:, :, None]).sum(dim=1)            # (B, k*k, H, W)
        temperature = state[f"{p}.range_temp"].exp().clamp(1e-4, 1e4)
        kernel = torch.softmax(temperature * logits, dim=1)
        kernel = kernel * torch.exp(-dist2 / (2 * state[f"{p}.sigma_spatial"] ** 2))
        kernel = kernel / kernel.sum(dim=1, keepdim=True).clamp_min(1e-7)
        fix = _conv1x1(F.gelu(_conv1x1(torch.cat([kernel, g], 1), state, f"{p}.fixup_proj.0")), state,
                       f"{p}.fixup_proj.3")
        kernel = kernel + 0.1 * fix
        up = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
        x = (_neighbourhoods(up, radius) * kernel[:, None]).sum(dim=2)
    return x + 0.1 * _conv1x1(x, state, "fixup_proj.1")


def reference_features(images01: torch.Tensor, upsampler: str = "jbu") -> tuple[torch.Tensor, torch.Tensor]:
    """(low-res, high-res) oracle features of [0,1] images (B,3,H,W): high-res by the random-init JBU, bilinear,
    or the truth (the per-pixel features at the image's own size)."""
    with torch.no_grad():
        lowres = oracle_lowres(images01)
        if upsampler == "jbu":
            highres = jbu_highres(random_jbu_state(), lowres, normalize(images01))
        elif upsampler == "bilinear":
            highres = F.interpolate(lowres, scale_factor=16, mode="bilinear", align_corners=False)
        elif upsampler == "truth":
            highres = oracle_pixels(images01)
        else:
            raise ValueError(f"no reference for upsampler {upsampler!r}: jbu, bilinear or truth")
    return lowres, highres
