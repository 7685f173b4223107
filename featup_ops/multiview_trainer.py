"""Training a JBU stack by multi-view consistency (FeatUp, Fu et al., ICLR 2024), as a library.

    trainer = MultiViewTrainer(backbone, JBUStack(backbone.dim), TrainConfig(steps=2000))
    train(trainer, batches, checkpoint_url="s3://bkt/run1", checkpoint_every=500)

`batches` is any iterator of RGB image batches (B,3,S,S) in [0,1]; this module knows nothing of shards,
storage layouts of datasets, or Ray. Distributed data parallelism plugs in through `wrap_model` (given the
trainable `MultiViewObjective`, returns it wrapped, e.g. in torch's DistributedDataParallel, which averages
the gradients across processes during backward) and `is_main` (who writes and reports).

A checkpoint is a folder (local or fsspec URL) holding `model.safetensors` (the JBU stack, readable by
`featup_ops.load_jbu`) and `training_state.safetensors` (downsampler, uncertainty head, optimizer, RNG
states, step; JSON config in its metadata), so training resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from tqdm.auto import tqdm

from featup_ops.backbones import Backbone, imagenet_normalize
from featup_ops.checkpoints import read_bytes, read_state, save_jbu, state_fingerprint
from featup_ops.downsamplers import DOWNSAMPLERS, create_downsampler
from featup_ops.jbu import JBUStack
from featup_ops.jitter import JitterSpec, sample_jitter
from featup_ops.layers import ChannelNorm
from featup_ops.losses import (
    UncertaintyHead,
    project,
    random_projection,
    smoothness_prior,
    total_variation,
    uncertainty_loss,
)

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.safetensors"
TRAINING_KEY = "featup_training"


@dataclass
class TrainConfig:
    """One JBU training run. Defaults are the FeatUp reference recipe except where noted."""

    steps: int = 2000
    lr: float = 1e-3
    views: int = 5                       # jitters per step, each one transform for the whole batch
    image_size: int = 224                # training images are image_size x image_size
    downsampler: str = "attention"       # 'attention' / 'simple' (learned) or 'area' (fixed average)
    proj_dim: int = 30                   # random Gaussian projection of both sides of the loss
    uncertainty: bool = True             # learned per-pixel uncertainty s; False: s = 1 (plain MSE / 2)
    dropout: bool = True                 # the JBU's Dropout2d layers active while training (reference: yes)
    scalar_lr_scale: float = 1.0         # learning-rate factor for the JBU's scalars (range_temp, sigma_spatial)
    lr_schedule: str = "constant"        # 'constant' (reference) or 'cosine' (decay to 0 at `steps`)
    clip_norm: float = 1e-4              # gradient norm clip for the first clip_steps steps
    clip_steps: int = 10
    smoothness_weight: float = 1e-3      # CRF-like smoothness prior
    tv_weight: float = 0.0               # total-variation prior (0 for the JBU)
    jitter: JitterSpec = field(default_factory=lambda: JitterSpec(p_flip=0.5, p_zoom=0.5, max_zoom=2.0, pad=20.0))
    channel_norm: bool = True            # train behind a per-pixel LayerNorm of the backbone features
    stages: int = 4
    range_temp_init: float = 0.0          # initial log-temperature of every stage's range kernel (reference: 0)
    seed: int = 0

    def validate(self) -> None:
        """Refuses a bad configuration before any work starts."""
        if self.steps <= 0:
            raise ValueError(f"steps must be > 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1 jitter per step, got {self.views}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 px, got {self.image_size}")
        if self.downsampler not in DOWNSAMPLERS:
            raise ValueError(f"downsampler must be one of {', '.join(DOWNSAMPLERS)}, got {self.downsampler!r}")
        if self.proj_dim < 1:
            raise ValueError(f"proj_dim must be >= 1, got {self.proj_dim}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.smoothness_weight < 0 or self.tv_weight < 0:
            raise ValueError("prior weights must be >= 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        data = json.loads(text)
        data["jitter"] = JitterSpec(**data["jitter"])
        return cls(**data)


class MultiViewObjective(nn.Module):
    """The trainable parts (upsampler, downsampler, uncertainty head) and the multi-view loss of one step.

    One forward computes every loss term of a step, so a data-parallel wrapper sees the whole step: the
    module to hand to DistributedDataParallel. The head is left out when the config does not use it.
    """

    def __init__(self, upsampler: JBUStack, downsampler: nn.Module, head: UncertaintyHead | None,
                 config: TrainConfig, features: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator):
        super().__init__()
        self.upsampler, self.downsampler, self.head = upsampler, downsampler, head
        self.config, self.generator = config, generator
        self._features = features  # the frozen backbone's features: not a submodule, nothing to synchronise

    def forward(self, images01: torch.Tensor) -> dict[str, Any]:
        """Loss terms on a batch of [0,1] images: `loss` (differentiable) and the terms that make it up."""
        cfg = self.config
        lr = self._features(images01)
        hr = self.upsampler(lr, imagenet_normalize(images01))
        rec = hr.new_zeros(())
        rel = 0.0
        for _ in range(cfg.views):
            jitter = sample_jitter(images01.shape[0], images01.shape[-1], cfg.jitter, generator=self.generator)
            lr_view = self._features(jitter(images01))
            down = self.downsampler(jitter(hr), lr_view.shape[2:])
            projection = random_projection(lr.shape[1], cfg.proj_dim, self.generator, images01.device)
            scale = self.head(lr_view) if self.head is not None else torch.ones_like(lr_view[:, :1])
            rec = rec + uncertainty_loss(project(down, projection), project(lr_view, projection), scale) / cfg.views
            with torch.no_grad():
                rel += ((down - lr_view).square().sum() / lr_view.square().sum().clamp_min(1e-12)).item() / cfg.views
        loss = rec
        smooth = tv = hr.new_zeros(())
        if cfg.smoothness_weight > 0:
            smooth = smoothness_prior(hr, images01, generator=self.generator)
            loss = loss + cfg.smoothness_weight * smooth
        if cfg.tv_weight > 0:
            tv = total_variation(hr).mean()
            loss = loss + cfg.tv_weight * tv
        return {"loss": loss, "reconstruction": rec, "relative_mse": rel, "smoothness": smooth, "tv": tv}


class MultiViewTrainer:
    """Upsampler + downsampler + uncertainty head + NAdam, one `train_step(images)` at a time.

    `wrap_model`, when given, wraps the trainable `MultiViewObjective` for data parallelism (e.g.
    `torch.nn.parallel.DistributedDataParallel`, which also starts every process from rank 0's weights);
    checkpoints always hold the unwrapped modules.
    """

    def __init__(self, backbone: Backbone, config: TrainConfig, upsampler: JBUStack | None = None,
                 device: torch.device | str = "cpu",
                 wrap_model: Callable[[nn.Module], nn.Module] | None = None):
        config.validate()
        self.config, self.device = config, torch.device(device)
        torch.manual_seed(config.seed)  # same initial weights in every data-parallel worker
        if upsampler is None:
            norm = ChannelNorm(backbone.dim) if config.channel_norm else None
            upsampler = JBUStack(backbone.dim, stages=config.stages, channel_norm=norm)
            with torch.no_grad():
                for layer in upsampler.modules():
                    if hasattr(layer, "range_temp"):
                        layer.range_temp.fill_(config.range_temp_init)
        if upsampler.dim != backbone.dim:
            raise ValueError(f"upsampler is for {upsampler.dim} channels, backbone {backbone.name} "
                             f"gives {backbone.dim}")
        backbone.channel_norm = upsampler.channel_norm  # the frozen norm is part of the features
        self.backbone = backbone.to(self.device).eval().requires_grad_(False)
        self.upsampler = upsampler.to(self.device)
        if upsampler.channel_norm is not None:
            upsampler.channel_norm.requires_grad_(False)
        self.downsampler = create_downsampler(config.downsampler, backbone.dim, upsampler.scale).to(self.device)
        self.head = UncertaintyHead(backbone.dim).to(self.device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        objective = MultiViewObjective(self.upsampler, self.downsampler, self.head if config.uncertainty else None,
                                       config, self.features, self.generator)
        self.objective = wrap_model(objective) if wrap_model is not None else objective
        self.params = [p for m in (self.upsampler, self.downsampler, self.head) for p in m.parameters()
                       if p.requires_grad]
        scalars = [p for p in self.params if p.dim() == 0]
        others = [p for p in self.params if p.dim() > 0]
        groups = [{"params": others}]
        if scalars:
            groups.append({"params": scalars, "lr": config.lr * config.scalar_lr_scale})
        self.optimizer = torch.optim.NAdam(groups, lr=config.lr)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step = 0
        self.name = "jbu"  # what progress bars and logs call this trainer

    # ---- one step -------------------------------------------------------------------------------------
    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """The (normalised, frozen) backbone features of [0,1] images."""
        with torch.no_grad():
            return self.backbone(self.backbone.normalize(images01))

    def train_step(self, images01: torch.Tensor) -> dict[str, float]:
        """One optimisation step on a batch of [0,1] images (B,3,S,S); returns the loss terms."""
        cfg = self.config
        if images01.dim() != 4 or images01.shape[1] != 3:
            raise ValueError(f"expected a batch of RGB images (B,3,H,W), got {tuple(images01.shape)}")
        images01 = images01.to(self.device, torch.float32)
        self.upsampler.train(cfg.dropout)
        self.downsampler.train()
        terms = self.objective(images01)
        loss = terms["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # a data-parallel wrapper averages the gradients across processes here
        if self.step < cfg.clip_steps:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
        factor = 1.0
        if cfg.lr_schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(self.step, cfg.steps) / cfg.steps))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.step()
        self.step += 1
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {self.step}; lower the learning rate "
                                     f"(now {cfg.lr})")
        return {k: v.item() if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}

    # ---- state -------------------------------------------------------------------------------------------
    def save(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """A checkpoint folder at `url` (see `save_checkpoint`)."""
        save_checkpoint(self, url, storage_options)

    def weights_fingerprint(self) -> str:
        """Content hash of the trainable modules' weights (upsampler, downsampler, head): equal across
        data-parallel processes that stayed in sync."""
        return state_fingerprint({f"{name}.{k}": v for name, module in (("upsampler", self.upsampler),
                                                                        ("downsampler", self.downsampler),
                                                                        ("head", self.head))
                                  for k, v in module.state_dict().items()})

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Everything besides the upsampler needed to resume: (tensors, string metadata)."""
        tensors = {f"downsampler.{k}": v for k, v in self.downsampler.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        opt = self.optimizer.state_dict()
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                tensors[f"optimizer.{idx}.{key}"] = torch.as_tensor(value)
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        metadata = {"step": str(self.step), "config": self.config.to_json(),
                    "param_groups": json.dumps(opt["param_groups"]), "backbone": self.backbone.name,
                    "backbone_weights": self.backbone.weights_id}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata

    def load_training_state(self, upsampler_state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str]) -> None:
        """Restores a state written by `training_state` (and the upsampler's own weights)."""
        saved = TrainConfig.from_json(metadata["config"])
        mismatched = [f.name for f in dataclasses.fields(TrainConfig)
                      if f.name not in ("steps",) and getattr(saved, f.name) != getattr(self.config, f.name)]
        if mismatched:
            raise ValueError(f"the checkpoint was trained with other settings ({', '.join(mismatched)}): "
                             f"saved {saved}, now {self.config}; resume with the same flags (only --steps may change)")
        if metadata.get("backbone") != self.backbone.name:
            raise ValueError(f"the checkpoint was trained on backbone {metadata.get('backbone')!r}, "
                             f"not {self.backbone.name!r}")
        self.upsampler.load_state_dict(dict(upsampler_state))
        self.downsampler.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("downsampler.")})
        self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(metadata["step"])


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_checkpoint(trainer: MultiViewTrainer, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Writes model.safetensors and training_state.safetensors under the folder `url`."""
    tensors, metadata = trainer.training_state()
    info = json.dumps({"step": trainer.step, "backbone": trainer.backbone.name,
                       "backbone_weights": trainer.backbone.weights_id, "recipe": json.loads(trainer.config.to_json())})
    save_jbu(trainer.upsampler, _join(url, MODEL_FILE), storage_options, extra_metadata={TRAINING_KEY: info})
    data = save_safetensors_bytes(tensors, metadata=metadata)
    with fsspec.open(_join(url, STATE_FILE), "wb", auto_mkdir=True, **dict(storage_options or {})) as f:
        f.write(data)


def checkpoint_exists(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(_join(url, STATE_FILE), **dict(storage_options or {}))
    return fs.exists(path)


def load_checkpoint(trainer: MultiViewTrainer, url: str, storage_options: Mapping[str, Any] | None = None) -> int:
    """Restores `trainer` from the folder `url`; returns the step it resumes at."""
    up_state, up_meta = read_state(_join(url, MODEL_FILE), storage_options)
    data = read_bytes(_join(url, STATE_FILE), storage_options)
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    metadata = dict(header.get("__metadata__") or {})
    model_step = json.loads(up_meta.get(TRAINING_KEY, "{}")).get("step")
    if model_step is not None and int(model_step) != int(metadata["step"]):
        raise ValueError(f"checkpoint {url} is inconsistent: model at step {model_step}, training state at "
                         f"{metadata['step']} (a save was interrupted); delete it or point --output elsewhere")
    trainer.load_training_state(up_state, load_safetensors_bytes(data), metadata)
    return trainer.step


# ---- the loop -------------------------------------------------------------------------------------------------
class StepTrainer(Protocol):
    """What `train` drives: a step counter, the total in `config.steps`, one step at a time, a checkpoint."""

    name: str
    step: int
    config: Any

    def train_step(self, images01: torch.Tensor) -> dict[str, float]: ...

    def save(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None: ...


def train(trainer: StepTrainer, batches: Iterable[torch.Tensor], checkpoint_url: str | None = None,
          checkpoint_every: int = 500, storage_options: Mapping[str, Any] | None = None, is_main: bool = True,
          progress: bool = True, on_step: Callable[[int, dict], None] | None = None,
          time_limit_s: float | None = None) -> list[dict]:
    """Runs `trainer` from its current step to config.steps; returns the per-step loss records.

    Any `StepTrainer` whose records hold `loss` and `relative_mse` works: this JBU trainer and
    `featup_ops.anyup_training.AnyUpTrainer`.
    Checkpoints every `checkpoint_every` steps and at the end (main process only). `time_limit_s` stops
    early (with a final checkpoint) once the wall time is spent: for fixed-budget runs.
    """
    total = trainer.config.steps
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 step, got {checkpoint_every}")
    history: list[dict] = []
    start = time.perf_counter()
    off = {} if progress and is_main else {"disable": True}  # else tqdm's own TQDM_* environment decides
    bar = tqdm(total=total, initial=trainer.step, desc=f"train {trainer.name}", dynamic_ncols=True, **off)
    iterator = iter(batches)
    while trainer.step < total:
        try:
            images = next(iterator)
        except StopIteration:
            raise ValueError(f"the batch iterator ended at step {trainer.step} of {total}: give an endless "
                             "iterator (cycle the data) or fewer steps") from None
        record = trainer.train_step(images)
        record.update(step=trainer.step, seconds=time.perf_counter() - start)
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", rel_mse=f"{record['relative_mse']:.4f}")
        if on_step is not None:
            on_step(trainer.step, record)
        out_of_time = time_limit_s is not None and record["seconds"] >= time_limit_s
        if checkpoint_url and is_main and (trainer.step % checkpoint_every == 0 or trainer.step == total
                                           or out_of_time):
            trainer.save(checkpoint_url, storage_options)
            log.info("step %d: checkpoint written to %s", trainer.step, checkpoint_url)
        if out_of_time:
            log.info("time limit of %.0f s reached at step %d", time_limit_s, trainer.step)
            break
    bar.close()
    return history
