"""FeatUp's implicit upsampler: a small MLP per image, fitted by multi-view consistency, queried anywhere.

    fit = fit_implicit(backbone, images01, ImplicitConfig())     # N images fitted at once, one batched model
    hr = fit.render(images01, size=(448, 448))                   # (N, C, 448, 448) at any resolution

The network and loss follow the FeatUp paper (Fu et al., ICLR 2024) and its reference code's settings: Fourier features of (y, x, R, G, B) (30 frequencies
exp(linspace(-2, 10, 30)), sin and cos with a learned per-frequency phase, raw RGB appended: 303
channels), an MLP of 1x1 layers (ChannelNorm, Dropout2d 0.2, 303->128, ReLU, Dropout2d 0.2, ChannelNorm,
128->128, ReLU, 128->D) predicting features in a D<=128 dimensional PCA space of the image's view features,
and the uncertainty-weighted reconstruction loss through an attention downsampler plus magnitude, TV and
blur priors.

Speed comes from three things: every parameter carries a leading image axis, so N images train in one
set of batched matrix products (torch.bmm) on one device; fitting stops per image once its reconstruction
error has stopped improving (converged images are frozen, the batch stops when all are); and on a GPU the
forward/backward runs under float16/bfloat16 autocast. `ImplicitConfig.reference()` gives the reference
settings (1,200 steps, 10 views/step, 3,000 views, NAdam lr 2e-3), used by the benchmark as the baseline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .backbones import Backbone, imagenet_normalize
from .downsamplers import DOWNSAMPLERS, create_downsampler
from .jitter import Jitter, JitterSpec, sample_jitter
from .losses import (
    UncertaintyHead,
    blur_prior,
    magnitude_prior,
    total_variation,
    uncertainty_loss,
)
from .model import UpsamplerError, register_upsampler

log = logging.getLogger(__name__)

N_FREQS = 30
INPUT_DIMS = 5  # y, x, R, G, B
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ImplicitConfig:
    """How images are fitted. The defaults are this project's fast settings; see `reference()`."""

    steps: int = 600                     # most steps per image (early stopping may end sooner)
    views_per_step: int = 10
    total_views: int = 400               # pool of jittered views (backbone runs) per image
    pca_views: int = 50                  # views the PCA of the targets is fitted on (at most total_views)
    pca_dim: int = 128
    hidden: int = 128
    lr: float = 5e-3
    jitter: JitterSpec = field(default_factory=lambda: JitterSpec(p_flip=0.5, p_zoom=0.5, max_zoom=1.8, pad=30.0))
    downsampler: str = "attention"
    magnitude_weight: float = 1e-3
    tv_weight: float = 0.05
    blur_weight: float = 0.1
    fit_scale: int = 8                   # the high-res map is fitted at fit_scale x the feature grid (4x fewer
                                         # pixels than 16x; rendering is at any resolution regardless)
    early_stop: bool = True
    patience: int = 40                   # steps per early-stopping window
    tolerance: float = 0.01              # stop after 2 windows that do not improve the best error by this fraction
    min_steps: int = 0
    batch_size: int = 8                  # images per batched model
    compute_dtype: str | None = None     # "float16" / "bfloat16": autocast on CUDA (ignored on CPU)
    seed: int = 0
    progress: bool = False

    @classmethod
    def reference(cls, **overrides: Any) -> "ImplicitConfig":
        """The FeatUp reference implementation's settings: 1,200 steps, 10 views, 3,000 views, lr 2e-3."""
        base = dict(steps=1200, views_per_step=10, total_views=3000, pca_views=50, lr=2e-3, fit_scale=16,
                    early_stop=False, batch_size=1)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> None:
        """Refuses bad settings before any work starts."""
        for name in ("steps", "views_per_step", "total_views", "pca_views", "pca_dim", "hidden", "batch_size",
                     "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"implicit upsampler: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"implicit upsampler: lr must be > 0, got {self.lr}")
        if self.fit_scale < 1:
            raise ValueError(f"implicit upsampler: fit_scale must be >= 1, got {self.fit_scale}")
        if self.downsampler not in DOWNSAMPLERS:
            raise ValueError(f"implicit upsampler: downsampler must be one of {', '.join(DOWNSAMPLERS)}, "
                             f"got {self.downsampler!r}")
        if self.compute_dtype not in (None, "float16", "bfloat16"):
            raise ValueError(f"implicit upsampler: compute_dtype must be float16, bfloat16 or None, "
                             f"got {self.compute_dtype!r}")


# ---- the batched network -----------------------------------------------------------------------------------
def _uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    bound = 1 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class BatchedImplicitMLP(nn.Module):
    """N independent FeatUp implicit networks in one module: inputs (N, P, 303) pixels -> (N, P, out_dim)."""

    def __init__(self, n: int, out_dim: int, hidden: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        g = generator or torch.Generator().manual_seed(0)
        d_in = 2 * INPUT_DIMS * N_FREQS + 3
        self.n, self.d_in, self.hidden, self.out_dim = n, d_in, hidden, out_dim
        self.register_buffer("freqs", torch.exp(torch.linspace(-2, 10, N_FREQS)), persistent=False)
        self.phase = nn.Parameter(torch.zeros(n, N_FREQS))
        self.norm1_w, self.norm1_b = nn.Parameter(torch.ones(n, d_in)), nn.Parameter(torch.zeros(n, d_in))
        self.w1 = nn.Parameter(_uniform((n, hidden, d_in), d_in, g))
        self.b1 = nn.Parameter(_uniform((n, hidden), d_in, g))
        self.norm2_w, self.norm2_b = nn.Parameter(torch.ones(n, hidden)), nn.Parameter(torch.zeros(n, hidden))
        self.w2 = nn.Parameter(_uniform((n, hidden, hidden), hidden, g))
        self.b2 = nn.Parameter(_uniform((n, hidden), hidden, g))
        self.w3 = nn.Parameter(_uniform((n, out_dim, hidden), hidden, g))
        self.b3 = nn.Parameter(_uniform((n, out_dim), hidden, g))

    def encode(self, images01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phase-free parts of the Fourier features: (sin a, cos a) (N,P,150) and normalised RGB (N,P,3)."""
        N, _, H, W = images01.shape
        dev = images01.device
        ys = torch.linspace(-1, 1, H, device=dev).view(1, 1, H, 1).expand(N, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=dev).view(1, 1, 1, W).expand(N, 1, H, W)
        lo = images01.amin(dim=(1, 2, 3), keepdim=True)
        hi = images01.amax(dim=(1, 2, 3), keepdim=True)
        colours = (images01 - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
        coords = torch.cat([ys, xs, colours], 1).flatten(2).transpose(1, 2)      # (N,P,5)
        arg = (coords[..., :, None] * self.freqs.to(dev)).flatten(2)            # (N,P,5*30), dim-major
        rgb = imagenet_normalize(images01).flatten(2).transpose(1, 2)
        return arg.sin(), arg.cos(), rgb

    def forward(self, encoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        sin_a, cos_a, rgb = encoded
        phase = self.phase.repeat(1, INPUT_DIMS)[:, None]                      # (N,1,150), per frequency
        cp, sp = phase.cos(), phase.sin()
        x = torch.cat([sin_a * cp + cos_a * sp, cos_a * cp - sin_a * sp, rgb], -1)   # sin/cos(a + phase)
        x = F.layer_norm(x, (self.d_in,)) * self.norm1_w[:, None] + self.norm1_b[:, None]
        x = self._channel_dropout(x, 0.2)
        x = torch.relu(torch.baddbmm(self.b1[:, None], x, self.w1.transpose(1, 2)))
        x = self._channel_dropout(x, 0.2)
        x = F.layer_norm(x, (self.hidden,)) * self.norm2_w[:, None] + self.norm2_b[:, None]
        x = torch.relu(torch.baddbmm(self.b2[:, None], x, self.w2.transpose(1, 2)))
        return torch.baddbmm(self.b3[:, None], x, self.w3.transpose(1, 2))

    def _channel_dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """Dropout2d: whole channels of an image's map, i.e. a (N,1,channels) mask."""
        if not self.training or p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, x.shape[2], device=x.device) >= p).to(x.dtype)
        return x * keep / (1 - p)


# ---- PCA of the targets ----------------------------------------------------------------------------------------
def fit_pca(features: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image PCA of (N, V, C, h, w) view features -> mean (N, C), basis (N, C, D) with D = min(dim, C)."""
    N, V, C = features.shape[:3]
    x = features.transpose(1, 2).reshape(N, C, -1).double()
    mean = x.mean(-1)
    xc = x - mean[..., None]
    cov = xc @ xc.transpose(1, 2) / max(xc.shape[-1] - 1, 1)
    _, vecs = torch.linalg.eigh(cov)                       # ascending eigenvalues
    d = min(dim, C)
    basis = vecs[..., -d:].flip(-1)
    return mean.float(), basis.float()


def to_pca(features: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(N, V, C, h, w) -> (N, V, D, h, w) coefficients."""
    return torch.einsum("nvchw,ncd->nvdhw", features - mean[:, None, :, None, None], basis)


def from_pca(coeffs: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) -> (N, C, H, W)."""
    return torch.einsum("ndhw,ncd->nchw", coeffs, basis) + mean[:, :, None, None]


# ---- fitting ---------------------------------------------------------------------------------------------------
@dataclass
class ImplicitFit:
    """Fitted per-image networks plus their PCA, queryable at any resolution with `render`."""

    mlp: BatchedImplicitMLP
    mean: torch.Tensor
    basis: torch.Tensor
    config: ImplicitConfig
    steps_run: torch.Tensor              # (N,) steps each image trained before it converged or ran out
    final_error: torch.Tensor            # (N,) relative reconstruction MSE of its last window
    seconds: float

    @torch.no_grad()
    def render(self, images01: torch.Tensor, size: tuple[int, int] | None = None,
               rows_per_chunk: int | None = None) -> torch.Tensor:
        """Features (N, C, H, W) of these images (the ones fitted, in order) at `size` (default: theirs)."""
        if images01.shape[0] != self.mlp.n:
            raise ValueError(f"render got {images01.shape[0]} images for {self.mlp.n} fitted networks")
        images01 = images01.to(self.mean.device, torch.float32)
        if size is not None and tuple(size) != tuple(images01.shape[2:]):
            images01 = F.interpolate(images01, size=tuple(size), mode="bilinear", align_corners=False,
                                     antialias=True).clamp(0, 1)
        N, _, H, W = images01.shape
        self.mlp.eval()
        encoded = self.mlp.encode(images01)
        rows = rows_per_chunk or max(1, (1 << 16) // W)
        out = []
        for start in range(0, H * W, rows * W):
            part = tuple(t[:, start:start + rows * W] for t in encoded)
            out.append(self.mlp(part))
        coeffs = torch.cat(out, 1).transpose(1, 2).reshape(N, -1, H, W)
        return from_pca(coeffs, self.mean, self.basis)

    def network_state(self, index: int) -> dict[str, torch.Tensor]:
        """The fitted network of image `index` (and its PCA): the resolution-free form of its features."""
        state = {k: v[index].detach().cpu().clone() for k, v in self.mlp.state_dict().items()}
        state["pca_mean"] = self.mean[index].detach().cpu().clone()
        state["pca_basis"] = self.basis[index].detach().cpu().clone()
        return state


def _autocast(device: torch.device, dtype_name: str | None):
    if device.type == "cuda" and dtype_name is not None:
        return torch.autocast("cuda", dtype=_DTYPES[dtype_name])
    return contextlib.nullcontext()


@torch.no_grad()
def _view_pool(backbone: Backbone, images01: torch.Tensor, cfg: ImplicitConfig, generator: torch.Generator,
               chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Jittered views' backbone features in each image's PCA space: (thetas (N,V,2,3), coeffs (N,V,D,h,w),
    pca mean, pca basis)."""
    N, _, H, W = images01.shape
    V = cfg.total_views
    thetas = torch.stack([sample_jitter(N, (H, W), cfg.jitter, per_sample=True, generator=generator).theta
                          for _ in range(V)], 1)                                     # (N,V,2,3)
    thetas[:, 0] = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])                          # the image itself
    per_call = max(1, chunk // N)

    def views(lo: int, hi: int) -> torch.Tensor:
        jit = Jitter(thetas[:, lo:hi].reshape(-1, 2, 3))
        imgs = jit(images01.repeat_interleave(hi - lo, 0))
        feats = backbone(backbone.normalize(imgs)).float()
        return feats.reshape(N, hi - lo, *feats.shape[1:])

    n_pca = min(cfg.pca_views, V)
    first = torch.cat([views(lo, min(lo + per_call, n_pca)) for lo in range(0, n_pca, per_call)], 1)
    mean, basis = fit_pca(first, cfg.pca_dim)
    coeffs = [to_pca(first, mean, basis)]
    for lo in range(n_pca, V, per_call):
        coeffs.append(to_pca(views(lo, min(lo + per_call, V)), mean, basis))
    return thetas.to(images01.device), torch.cat(coeffs, 1), mean, basis


def fit_implicit(backbone: Backbone, images01: torch.Tensor, config: ImplicitConfig | None = None) -> ImplicitFit:
    """Fits one implicit network per image (all N in one batched model) on the device of `images01`."""
    cfg = config or ImplicitConfig()
    cfg.validate()
    if images01.dim() != 4 or images01.shape[1] != 3:
        raise ValueError(f"expected RGB images (N,3,H,W) in [0,1], got {tuple(images01.shape)}")
    start = time.perf_counter()
    device = images01.device
    images01 = images01.float()
    N, _, S, S2 = images01.shape
    generator = torch.Generator().manual_seed(cfg.seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        with _autocast(device, cfg.compute_dtype):
            thetas, pool, mean, basis = _view_pool(backbone, images01, cfg, generator)
        h, w = pool.shape[-2:]
        D = pool.shape[2]
        fit_size = (h * cfg.fit_scale, w * cfg.fit_scale)
        fit_images = images01 if (S, S2) == fit_size else F.interpolate(
            images01, size=fit_size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        mlp = BatchedImplicitMLP(N, D, cfg.hidden, generator).to(device)
        down = create_downsampler(cfg.downsampler, D, cfg.fit_scale, n_models=N).to(device)
        head = UncertaintyHead(D, n_models=N).to(device)
        params = [p for m in (mlp, down, head) for p in m.parameters()]
        optimizer = torch.optim.NAdam(params, lr=cfg.lr)
        use_scaler = device.type == "cuda" and cfg.compute_dtype == "float16"
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        with torch.no_grad():
            encoded = mlp.encode(fit_images)
        frozen = [p.detach().clone() for p in params]
        active = torch.ones(N, dtype=torch.bool, device=device)
        steps_run = torch.zeros(N, dtype=torch.long)
        window_err = torch.zeros(N, dtype=torch.float64)
        best_window = torch.full((N,), float("inf"), dtype=torch.float64)
        stalls = torch.zeros(N, dtype=torch.long)
        final_error = torch.full((N,), float("nan"), dtype=torch.float64)
        Vs = cfg.views_per_step
        mlp.train(), down.train()
        off = {} if cfg.progress else {"disable": True}  # else tqdm's own TQDM_* environment decides
        bar = tqdm(total=cfg.steps, desc=f"implicit fit x{N}", dynamic_ncols=True, **off)
        for step in range(cfg.steps):
            pick = torch.randint(0, cfg.total_views, (N, Vs), generator=generator).to(device)
            theta = thetas.gather(1, pick[..., None, None].expand(N, Vs, 2, 3)).reshape(N * Vs, 2, 3)
            target = pool.gather(1, pick.view(N, Vs, 1, 1, 1).expand(N, Vs, D, h, w)).reshape(N * Vs, D, h, w)
            with _autocast(device, cfg.compute_dtype):
                hr = mlp(encoded).transpose(1, 2).reshape(N, D, *fit_size)
                views = Jitter(theta)(hr.repeat_interleave(Vs, 0))
                pred = down(views, (h, w)).float()
            hr = hr.float()
            scale = head(target)
            rec = uncertainty_loss(pred, target, scale, per_model=N)
            loss_n = (rec + cfg.magnitude_weight * magnitude_prior(hr) + cfg.tv_weight * total_variation(hr)
                      + cfg.blur_weight * blur_prior(hr))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_n.sum()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                err = ((pred - target).square().reshape(N, -1).sum(1)
                       / target.square().reshape(N, -1).sum(1).clamp_min(1e-12)).double().cpu()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"implicit fit diverged at step {step} (loss {loss.item()}); "
                                             f"lower lr (now {cfg.lr})")
                for p, keep in zip(params, frozen):         # converged images stay as they were
                    p[~active] = keep[~active]
                    keep[active] = p[active]
            steps_run += active.cpu().long()
            window_err += err
            bar.update(1)
            if (step + 1) % cfg.patience == 0:
                window_err /= cfg.patience
                final_error = torch.where(active.cpu(), window_err, final_error)
                # a window that does not beat the best one so far by `tolerance` is a stall; two in a row
                # (windows are noisy: views are random) end that image's fit
                improved = window_err < (1 - cfg.tolerance) * best_window
                stalls = torch.where(improved, torch.zeros_like(stalls), stalls + 1)
                best_window = torch.minimum(best_window, window_err)
                if cfg.early_stop and step + 1 >= cfg.min_steps:
                    active &= ~(stalls >= 2).to(device)
                window_err = torch.zeros_like(window_err)
                bar.set_postfix(err=f"{final_error.mean():.4f}", active=int(active.sum()))
                if not active.any():
                    break
        bar.close()
        if torch.isnan(final_error).any():
            final_error = torch.where(torch.isnan(final_error), window_err / max(1, cfg.steps % cfg.patience),
                                      final_error)
        with torch.no_grad():
            for p, keep in zip(params, frozen):
                p.copy_(keep)
    mlp.eval()
    return ImplicitFit(mlp, mean, basis, cfg, steps_run, final_error.float(), time.perf_counter() - start)


# ---- as an upsampler -------------------------------------------------------------------------------------------
class ImplicitUpsampler(nn.Module):
    """`create_upsampler("implicit", dim, steps=..., views=...)`: fits every batch it is given, then renders
    at 16x the feature grid. Needs the backbone and the [0,1] images (FeatureModel passes them).

    `last_fit` keeps the most recent batch's `ImplicitFit` so a caller can store the networks themselves.
    """

    needs_backbone = True
    channel_norm = None

    def __init__(self, dim: int, config: ImplicitConfig, scale: int = 16):
        super().__init__()
        config.validate()
        self.dim, self.settings, self.scale = dim, config, scale
        self.last_fits: list[ImplicitFit] = []

    def config(self) -> dict:
        """What FeatureModel.describe() records for this upsampler."""
        return {"kind": "implicit", "dim": self.dim, "scale": self.scale, **dataclasses.asdict(self.settings)}

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def forward(self, lowres: torch.Tensor, guidance: torch.Tensor | None = None, backbone: Backbone | None = None,
                images: torch.Tensor | None = None) -> torch.Tensor:
        if backbone is None or images is None:
            raise UpsamplerError("the implicit upsampler fits each image against its backbone: call it with "
                                 "backbone= and images= (FeatureModel does)")
        if lowres.shape[1] != self.dim:
            raise ValueError(f"implicit upsampler built for {self.dim} channels got {lowres.shape[1]}")
        cfg = self.settings
        size = (lowres.shape[2] * self.scale, lowres.shape[3] * self.scale)
        outputs, self.last_fits = [], []
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            for lo in range(0, images.shape[0], cfg.batch_size):
                batch = images[lo:lo + cfg.batch_size].float()
                fit = fit_implicit(backbone, batch, cfg)
                self.last_fits.append(fit)
                outputs.append(fit.render(batch, size))
        return torch.cat(outputs).to(lowres.dtype)


_OPTION_NAMES = {"views": "views_per_step"}


@register_upsampler("implicit", "FeatUp implicit upsampler: an MLP fitted per image by multi-view consistency "
                                "(no weights; slow, best quality)")
def create_implicit(dim: int, weights: str | Mapping | None = None, random_init: bool = False,
                    storage_options: Mapping[str, Any] | None = None, reference: bool = False,
                    **options: Any) -> ImplicitUpsampler:
    """options: ImplicitConfig fields (steps, views [per step], total_views, lr, batch_size, early_stop,
    compute_dtype, seed, ...); reference=True starts from the reference settings instead of the fast ones."""
    if weights is not None:
        raise UpsamplerError("the implicit upsampler is fitted per image and takes no weights; "
                             "drop --upsampler-weights")
    fields = {f.name for f in dataclasses.fields(ImplicitConfig)}
    options = {_OPTION_NAMES.get(k, k): v for k, v in options.items()}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise UpsamplerError(f"unknown implicit upsampler option(s) {unknown}; "
                             f"known: views, {', '.join(sorted(fields))}")
    cfg = ImplicitConfig.reference(**options) if reference else ImplicitConfig(**options)
    try:
        return ImplicitUpsampler(dim, cfg)
    except ValueError as exc:
        raise UpsamplerError(str(exc)) from None
