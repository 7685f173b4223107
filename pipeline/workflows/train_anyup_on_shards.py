"""Training AnyUp on WebDataset shards against backbones with a known truth (the oracle family), in this process.

The method (loss, trainer, weights file) lives in `featup_ops.anyup_training` and the loop in
`featup_ops.multiview_trainer.train`; images come from shards exactly as the JBU job reads them
(`train_on_shards.image_batches`). This module checks a run before it starts and writes its summary.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.options import ConfigError, option
from pipeline.storage.filesystems import filesystem, join, put_json
from pipeline.workflows.train_on_shards import ShardTrainingOptions, TrainJobConfig, image_batches

log = logging.getLogger(__name__)


@dataclass(kw_only=True)  # required options may follow defaulted ones of the base
class AnyUpTrainJobConfig(ShardTrainingOptions):
    """One AnyUp training run; its command line is generated from these fields."""

    output: str = option(required=True, help="folder for model.safetensors and summary.json, local or fsspec URL")
    backbone_seed: list[int] = option(required=True, repeat=True,
                                      help="repeatable: a seed of the backbone family; every seed x dim x patch "
                                           "size combination is one training backbone, one drawn per step")
    backbone: str = option("oracle", help="registered backbone with a known high-res truth")
    backbone_dim: list[int] = option([], repeat=True, help="repeatable: feature width (default: the backbone's own)")
    patch_size: list[int] = option([], repeat=True, help="repeatable: the backbone's patch size (default: its own)")
    steps: int = option(1000, help="optimisation steps")
    batch_size: int = option(4, help="images per step")
    image_size: int = option(64, help="resize + centre-crop size of the training images")
    lr: float = option(1e-3, help="AdamW learning rate (the paper: 2e-4 for 100k steps)")
    weight_decay: float = option(1e-5, help="AdamW weight decay (the paper's)")
    lr_schedule: str = option("cosine", choices=("constant", "cosine"), help="constant or cosine decay to 0")
    warmup_steps: int = option(20, help="linear learning-rate warm-up steps")
    augment_weight: float = option(0.1, help="weight of the colour/noise consistency regulariser (the paper: 0.1)")
    input_weight: float = option(0.1, help="weight of the pooled-output-matches-input regulariser (the paper: 0.1)")
    checkpoint_every: int = option(100, help="steps between writes of model.safetensors")
    seed: int = option(0, help="seed of the data order, backbone draws, augmentation and initialisation")
    use_gpu: bool = option(False, help="train on this machine's GPU")

    def validate(self) -> None:
        problems = []
        for name in ("steps", "batch_size", "checkpoint_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        for name in ("weight_decay", "warmup_steps", "augment_weight", "input_weight"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        bad_seeds = [s for s in self.backbone_seed if s < 0]
        if bad_seeds:
            problems.append(f"--backbone-seed must be >= 0 (got {bad_seeds})")
        for name in ("backbone_dim", "patch_size"):
            bad = [v for v in getattr(self, name) or () if v < 1]
            if bad:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {bad})")
        for name in ("backbone_seed", "backbone_dim", "patch_size"):
            values = getattr(self, name) or []
            if len(set(values)) != len(values):
                problems.append(f"--{name.replace('_', '-')} is given twice for the same value: {values}")
        largest_patch = max(self.patch_size or [16])
        if self.image_size < 2 * largest_patch:
            problems.append(f"--image-size {self.image_size} gives a feature grid under 2 x 2 with patch size "
                            f"{largest_patch}: use at least {2 * largest_patch} px")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            problems.append(f"--time-limit must be > 0 minutes (got {self.time_limit_min})")
        if self.use_gpu and not torch.cuda.is_available():
            problems.append("--use-gpu given but this machine has no CUDA device")
        if problems:
            raise ConfigError("; ".join(problems))

    def backbone_options(self) -> list[dict[str, int]]:
        """One option set per training backbone: every seed x dim x patch size combination."""
        dims: list[int | None] = list(self.backbone_dim or [None])
        patches: list[int | None] = list(self.patch_size or [None])
        combos = itertools.product(self.backbone_seed, dims, patches)
        return [{k: v for k, v in (("seed", s), ("dim", d), ("patch_size", p)) if v is not None} for s, d, p in combos]

    def reader(self) -> TrainJobConfig:
        """The shard reader's settings (the JBU job's: same decoding, resize + crop and shuffling)."""
        return TrainJobConfig(input=self.input, backbone=self.backbone, output=self.output,
                              batch_size=self.batch_size, image_size=self.image_size, seed=self.seed,
                              storage_options=self.storage_options, shuffle_buffer=self.shuffle_buffer)


def build_backbones(cfg: AnyUpTrainJobConfig) -> list:
    import featup_ops

    return [featup_ops.create_backbone(cfg.backbone, **opts) for opts in cfg.backbone_options()]


def build_trainer(cfg: AnyUpTrainJobConfig):
    from featup_ops.anyup_training import AnyUpTrainConfig, AnyUpTrainer

    tcfg = AnyUpTrainConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule,
                            warmup_steps=cfg.warmup_steps, augment_weight=cfg.augment_weight,
                            input_weight=cfg.input_weight, seed=cfg.seed)
    return AnyUpTrainer(build_backbones(cfg), tcfg, device="cuda" if cfg.use_gpu else "cpu")


def check_before_work(cfg: AnyUpTrainJobConfig) -> None:
    """Refuses bad configuration before training starts: options, backbones, inputs, output state."""
    from featup_ops import BackboneError
    from featup_ops.anyup_training import MODEL_FILE
    from pipeline.storage.filesystems import StorageError
    from pipeline.storage.shards import InputError, resolve_shards

    cfg.validate()
    try:
        build_trainer(cfg)
        resolve_shards(cfg.input, cfg.storage_options)
    except (BackboneError, InputError, StorageError, ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    fs, path = filesystem(cfg.output, cfg.storage_options)
    if fs.exists(join(path, MODEL_FILE)):
        raise ConfigError(f"{cfg.output} already holds {MODEL_FILE}; choose another --output or delete it")


def run(cfg: AnyUpTrainJobConfig) -> dict:
    """The whole run: checks, training, model.safetensors and summary.json (wall time, machine load)."""
    from featup_ops import train

    check_before_work(cfg)
    trainer = build_trainer(cfg)
    log.info("training AnyUp on %d backbones (%s) from %s: %d steps, batch %d, %d px", len(trainer.backbones),
             cfg.backbone, cfg.input, cfg.steps, cfg.batch_size, cfg.image_size)
    load_before = os.getloadavg()
    start = time.perf_counter()
    limit = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    history = train(trainer, image_batches(cfg.reader()), checkpoint_url=cfg.output,
                    checkpoint_every=cfg.checkpoint_every, storage_options=cfg.output_options, time_limit_s=limit)
    seconds = time.perf_counter() - start
    tail = history[-50:]
    summary = {**trainer.metadata(), "seconds": seconds, "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(),
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in os.getloadavg()],
               "first_loss": history[0]["loss"], "final_loss": float(np.mean([h["loss"] for h in tail])),
               "final_relative_error": float(np.mean([h["relative_mse"] for h in tail])) ** 0.5,
               "weights_fingerprint": trainer.weights_fingerprint()}
    put_json(join(cfg.output, "summary.json"), summary, cfg.storage_options)
    log.info("done: %d steps in %.0f s, final loss %.4f; weights: %s (featup_ops.load_anyup)", trainer.step,
             seconds, summary["final_loss"], join(cfg.output, "model.safetensors"))
    log.debug("summary %s", json.dumps(summary))
    return summary
