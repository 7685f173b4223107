"""Training AnyUp (Wimmer et al., "AnyUp: Universal Feature Upsampling", ICLR 2026) on backbones whose
high-resolution truth is known: the `oracle` family, whose seeds, widths and patch sizes stand for backbones.

    oracles = [create_backbone("oracle", seed=s, dim=c) for s, c in ((2, 16), (3, 48), (4, 64))]
    trainer = AnyUpTrainer(oracles, AnyUpTrainConfig(steps=1000))
    train(trainer, batches, checkpoint_url="runs/anyup")     # featup_ops.multiview_trainer.train drives it
    up = load_anyup("runs/anyup")                            # the published key layout, strict

Each step draws one backbone (the paper's multi-backbone recipe). The paper supervises the upsampled
features with the backbone's own features of high-resolution crops; a known truth makes the target exact at
any size instead: `backbone.true_features(image, output_size)`. The loss is the paper's: (1 - cosine) per pixel
plus the mean squared error after min-max normalising prediction and target per pixel with the target's range
over channels; two regularisers (weight 0.1 each in the paper): the output for a colour-jittered, noisy guidance
image matches the (detached) output for the clean one, and the output average-pooled to the input grid matches
the input features. AdamW as in the paper; learning rate and schedule sized for short CPU runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .anyup import AnyUp
from .anyup_weights import save_anyup
from .backbones import Backbone, imagenet_normalize
from .checkpoints import state_fingerprint
from .downsamplers import area_downsample

MODEL_FILE = "model.safetensors"  # the folder's weights: `load_anyup(folder)` reads it
TRAINING_KEY = "anyup_training"  # safetensors metadata: step, backbones, recipe


@dataclass
class AnyUpTrainConfig:
    """One AnyUp training run. Paper values where noted; the rest sized for minutes on a CPU."""

    steps: int = 1000
    lr: float = 1e-3                     # paper: 2e-4 for 100k steps
    weight_decay: float = 1e-5           # paper
    betas: tuple[float, float] = (0.9, 0.999)  # paper
    lr_schedule: str = "cosine"          # 'constant' or 'cosine' (decay to 0 at `steps`)
    warmup_steps: int = 20               # linear warm-up of the learning rate
    clip_norm: float = 1.0               # gradient norm clip (0: none)
    cosine_weight: float = 1.0           # (1 - cosine) term
    mse_weight: float = 1.0              # min-max normalised MSE term
    augment_weight: float = 0.1          # paper: consistency under a colour-jittered, noisy guidance image
    input_weight: float = 0.1            # paper: pooled output matches the input features
    colour_jitter: float = 0.2           # brightness, contrast, saturation factors in [1 - j, 1 + j]
    noise_std: float = 0.02              # Gaussian noise on the [0, 1] augmented image
    seed: int = 0

    def validate(self) -> None:
        """Refuses a bad configuration before any work starts."""
        problems = []
        if self.steps <= 0:
            problems.append(f"steps must be > 0, got {self.steps}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("constant", "cosine"):
            problems.append(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        for name in ("weight_decay", "warmup_steps", "clip_norm", "cosine_weight", "mse_weight", "augment_weight",
                     "input_weight", "noise_std"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.colour_jitter < 1:
            problems.append(f"colour_jitter must be in [0, 1), got {self.colour_jitter}")
        if self.cosine_weight == 0 and self.mse_weight == 0:
            problems.append("cosine_weight and mse_weight are both 0: nothing would be learned")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas}")
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def upsampling_loss(pred: torch.Tensor, target: torch.Tensor, cosine_weight: float = 1.0,
                    mse_weight: float = 1.0) -> torch.Tensor:
    """The paper's per-pixel loss of (B,C,H,W) maps: cosine_weight * mean(1 - cos) + mse_weight * the mean squared
    error after both are min-max normalised with the target's per-pixel range over channels."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    loss = pred.new_zeros(())
    if cosine_weight:
        loss = loss + cosine_weight * (1 - torch.nn.functional.cosine_similarity(pred, target, dim=1)).mean()
    if mse_weight:
        lo = target.amin(dim=1, keepdim=True)
        span = (target.amax(dim=1, keepdim=True) - lo).clamp_min(1e-6)
        loss = loss + mse_weight * ((pred - target) / span).square().mean()
    return loss


def augment_colours(images01: torch.Tensor, jitter: float, noise_std: float, generator: torch.Generator
                    ) -> torch.Tensor:
    """Per image: brightness, contrast and saturation scaled by factors in [1 - jitter, 1 + jitter], then
    Gaussian noise of `noise_std`, clamped to [0, 1]."""
    B = images01.shape[0]
    factors = 1 + (torch.rand(B, 3, generator=generator) * 2 - 1) * jitter
    factors = factors.to(images01.device, images01.dtype)
    bright, contrast, saturation = (factors[:, i].view(B, 1, 1, 1) for i in range(3))
    x = images01 * bright
    x = (x - x.mean(dim=(1, 2, 3), keepdim=True)) * contrast + x.mean(dim=(1, 2, 3), keepdim=True)
    gray = x.mean(dim=1, keepdim=True)
    x = (x - gray) * saturation + gray
    noise = torch.randn(images01.shape, generator=generator).to(images01.device, images01.dtype)
    return (x + noise_std * noise).clamp(0, 1)


def has_truth(backbone: Backbone) -> bool:
    """Whether `backbone` knows its exact features at any resolution (what this trainer needs)."""
    return callable(getattr(backbone, "true_features", None))


def backbone_label(backbone: Backbone) -> str:
    """A backbone as records name it: name, weights id, width and patch size."""
    return f"{backbone.name}[{backbone.weights_id},C{backbone.dim},p{backbone.patch_size}]"


class AnyUpTrainer:
    """AnyUp + AdamW, one `train_step(images)` at a time on a random backbone of `backbones`.

    Follows the trainer interface `featup_ops.multiview_trainer.train` drives (`config.steps`, `step`,
    `train_step`, `save`).
    """

    name = "anyup"

    def __init__(self, backbones: Sequence[Backbone], config: AnyUpTrainConfig, model: AnyUp | None = None,
                 device: torch.device | str = "cpu"):
        config.validate()
        if not backbones:
            raise ValueError("AnyUp training needs at least one backbone")
        missing = [backbone_label(b) for b in backbones if not has_truth(b)]
        if missing:
            raise ValueError(f"backbones without a known high-res truth cannot supervise AnyUp here: {missing}; "
                             "use backbones with `true_features` (the oracle family: seed=..., dim=...)")
        self.config, self.device = config, torch.device(device)
        self.backbones = [b.to(self.device).eval().requires_grad_(False) for b in backbones]
        if model is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = AnyUp()
        self.model = model.to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay)
        self.step = 0

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimisation step `step` (0-based): warm-up, then constant or cosine decay."""
        cfg = self.config
        factor = 1.0
        if cfg.lr_schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
        if step < cfg.warmup_steps:
            factor *= (step + 1) / cfg.warmup_steps
        return cfg.lr * factor

    def losses(self, images01: torch.Tensor, backbone: Backbone) -> dict[str, torch.Tensor]:
        """Every loss term of one step on [0,1] images (B,3,H,W) with `backbone`: `loss` is differentiable."""
        cfg = self.config
        with torch.no_grad():
            x = backbone.normalize(images01)
            lowres = backbone(x)
            truth = backbone.true_features(x)
        guidance = imagenet_normalize(images01)
        out = self.model(guidance, lowres)
        terms = {"fit": upsampling_loss(out, truth, cfg.cosine_weight, cfg.mse_weight)}
        loss = terms["fit"]
        if cfg.input_weight:
            terms["input"] = upsampling_loss(area_downsample(out, lowres.shape[2:]), lowres, cfg.cosine_weight,
                                             cfg.mse_weight)
            loss = loss + cfg.input_weight * terms["input"]
        if cfg.augment_weight:
            noisy = augment_colours(images01, cfg.colour_jitter, cfg.noise_std, self.generator)
            terms["augment"] = upsampling_loss(self.model(imagenet_normalize(noisy), lowres), out.detach(),
                                               cfg.cosine_weight, cfg.mse_weight)
            loss = loss + cfg.augment_weight * terms["augment"]
        with torch.no_grad():
            terms["relative_mse"] = (out - truth).square().sum() / truth.square().sum().clamp_min(1e-12)
        terms["loss"] = loss
        return terms

    def train_step(self, images01: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch of [0,1] images (B,3,H,W); returns the loss terms and which backbone."""
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected a batch of RGB images (B,3,H,W), got {tuple(images01.shape)}")
        index = int(torch.randint(len(self.backbones), (1,), generator=self.generator))
        backbone = self.backbones[index]
        if min(backbone.grid_size(*images01.shape[2:])) < 2:
            raise ValueError(f"images of {tuple(images01.shape[2:])} px give {backbone_label(backbone)} a feature "
                             f"grid under 2 x 2: use images of at least {2 * backbone.patch_size} px")
        images01 = images01.to(self.device, torch.float32)
        self.model.train()
        terms = self.losses(images01, backbone)
        loss = terms["loss"]
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step + 1}; lower the learning rate "
                                     f"(now {self.config.lr})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.step()
        self.step += 1
        record = {k: v.item() for k, v in terms.items()}
        record["backbone"] = index
        return record

    def weights_fingerprint(self) -> str:
        return state_fingerprint(self.model.state_dict())

    def metadata(self) -> dict[str, Any]:
        """What the weights were trained on and how: stored next to them."""
        return {"step": self.step, "backbones": [backbone_label(b) for b in self.backbones],
                "oracles": [{"seed": getattr(b, "seed", None), "dim": b.dim, "patch_size": b.patch_size}
                            for b in self.backbones],
                "recipe": json.loads(self.config.to_json())}

    def save(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Writes the weights (published key layout) as `url`/model.safetensors, the training record in its
        metadata under `anyup_training`."""
        save_anyup(self.model, url.rstrip("/") + "/" + MODEL_FILE, storage_options,
                   {TRAINING_KEY: json.dumps(self.metadata())})

