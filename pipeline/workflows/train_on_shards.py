"""Training a JBU upsampler on WebDataset shards: in this process, or data-parallel with Ray Train.

The method (multi-view loss, trainer, checkpoints) lives in `featup_ops.multiview_trainer`; this module feeds it
shuffled image batches from shards (local or fsspec), checks a run before it starts, and writes the
run's summary and preview next to the checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.options import ConfigError, option
from pipeline.storage.filesystems import filesystem, join, put_bytes, put_json, resolve_options

if TYPE_CHECKING:
    from featup_ops import TrainConfig

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ShardTrainingOptions:
    """The options of every job that trains on images streamed from shards (JBU, AnyUp)."""

    input: list[str] = option(required=True, repeat=True, help="shard pattern, list file or index.json (repeatable)")
    time_limit_min: float | None = option(None, flag="--time-limit", help="stop after this many minutes")
    storage_options: dict[str, Any] = option({}, help="fsspec options: JSON or @file.json")
    shuffle_buffer: int = option(256, help="images held for shuffling")

    @property
    def output_options(self) -> dict[str, Any]:
        """Storage options for --output, resolved like every other access (endpoint, checksums)."""
        return resolve_options(self.output, self.storage_options)


@dataclass(kw_only=True)  # required options may follow defaulted ones of the base
class TrainJobConfig(ShardTrainingOptions):
    """Everything one training run needs; its command line is generated from these fields."""

    backbone: str = option(required=True, help="registered backbone name or timm model id")
    output: str = option(required=True, help="checkpoint folder, local or fsspec URL (s3://...)")
    upsampler: str = option("jbu", help="the upsampler trained: jbu (the only one this job trains; AnyUp is "
                                        "trained once for every backbone by jobs/train_anyup.py)")
    steps: int = option(2000, help="total optimisation steps (the reference recipe: 2000)")
    batch_size: int = option(4, help="images per step per worker")
    image_size: int = option(224, help="resize + centre-crop size")
    lr: float = option(1e-3, help="NAdam learning rate")
    views: int = option(5, help="jittered views per step")
    downsampler: str = option("attention", choices=("attention", "simple", "area"),
                              help="learned attention (reference) or simple blur, or the fixed area average")
    channel_norm: str = option("auto", choices=("auto", "on", "off"),
                               help="train behind a per-pixel LayerNorm of the features (auto: on, off for "
                                    "backbones with a known truth such as the oracle)")
    smoothness_weight: float = option(1e-3, help="weight of the CRF-like smoothness prior")
    uncertainty: bool = option(True, negate="--no-uncertainty",
                               help="plain squared error instead of the learned per-pixel uncertainty weighting")
    dropout: bool = option(True, negate="--no-dropout",
                           help="train the JBU with its Dropout2d layers off (faster convergence on short runs)")
    scalar_lr_scale: float = option(1.0, help="learning-rate factor for the JBU's temperature and spatial sigma")
    range_temp_init: float = option(0.0, help="initial log-temperature of the range kernels (reference 0; higher "
                                              "starts edge-aware)")
    lr_schedule: str = option("constant", choices=("constant", "cosine"),
                              help="constant (reference) or cosine decay to 0 at --steps")
    backbone_weights: str | None = option(None, help="backbone weights file (local or s3://); default: timm/HF cache")
    random_init: bool = option(False, help="accept a randomly initialised timm backbone")
    checkpoint_every: int = option(250, help="steps between checkpoints")
    resume: bool = option(False, help="continue from the checkpoint in --output, if any")
    seed: int = option(0, help="seed of the data order, jitters and initialisation")
    preview_images: int = option(4, help="images in preview.png (0: none)")
    num_workers: int = option(0, help="Ray Train workers (0: train in this process)")
    use_gpu: bool = option(False, help="one GPU per worker (or this process's GPU)")
    ray_address: str | None = option(None, help="Ray cluster address (default: the one `ray job submit` gives, "
                                                "or a local one)")

    def validate(self) -> None:
        problems = []
        if self.upsampler == "anyup":
            problems.append("--upsampler anyup: this job trains a JBU for one backbone; AnyUp is trained once for "
                            "every backbone by jobs/train_anyup.py, or use its published weights as they are "
                            "(jobs/upsample_coco.py and jobs/eval_upsampler.py --upsampler anyup)")
        elif self.upsampler != "jbu":
            problems.append(f"--upsampler {self.upsampler}: this job trains the jbu upsampler only (bilinear and "
                            "bicubic have nothing to train; the implicit model is fitted per image when caching)")
        if self.steps <= 0:
            problems.append(f"--steps must be > 0 (got {self.steps})")
        if self.batch_size <= 0:
            problems.append(f"--batch-size must be > 0 (got {self.batch_size})")
        if self.image_size < 32:
            problems.append(f"--image-size must be >= 32 px (got {self.image_size})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if self.views < 1:
            problems.append(f"--views must be >= 1 (got {self.views})")
        if self.checkpoint_every < 1:
            problems.append(f"--checkpoint-every must be >= 1 (got {self.checkpoint_every})")
        if self.num_workers < 0:
            problems.append(f"--num-workers must be >= 0 (got {self.num_workers})")
        if self.num_workers > 0 and self.time_limit_min is not None:
            problems.append("--time-limit works in single-process runs only (workers must stop at the same step)")
        if self.time_limit_min is not None and self.time_limit_min <= 0:
            problems.append(f"--time-limit must be > 0 minutes (got {self.time_limit_min})")
        if self.use_gpu and self.num_workers == 0 and not torch.cuda.is_available():
            problems.append("--use-gpu given but this machine has no CUDA device")
        if problems:
            raise ConfigError("; ".join(problems))


# ---- data ---------------------------------------------------------------------------------------------------------
def image_batches(cfg: TrainJobConfig, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
    """Endless, shuffled (B,3,S,S) [0,1] batches from this worker's share of the shards (resize + centre crop)."""
    from pipeline.storage.images import SampleError, images_to_tensor, load_sample_image
    from pipeline.storage.shards import iter_samples, resolve_shards

    shards = resolve_shards(cfg.input, cfg.storage_options)
    rng = random.Random(cfg.seed * 1000 + rank)
    by_shard = len(shards) >= world
    skipped = 0
    buffer: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    for epoch in itertools.count():
        order = list(shards)
        random.Random(cfg.seed + epoch).shuffle(order)
        mine = order[rank::world] if by_shard else order
        produced = 0
        for shard in mine:
            for i, sample in enumerate(iter_samples(shard.url, cfg.storage_options)):
                if not by_shard and i % world != rank:
                    continue
                try:
                    image, _ = load_sample_image(sample, cfg.image_size)
                except SampleError as exc:
                    skipped += 1
                    log.warning("skipping %s in %s: %s", sample.get("__key__"), shard.url, exc)
                    continue
                produced += 1
                buffer.append(image)
                if len(buffer) >= cfg.shuffle_buffer:
                    batch.append(buffer.pop(rng.randrange(len(buffer))))
                if len(batch) == cfg.batch_size:
                    yield images_to_tensor(batch)
                    batch = []
        if produced == 0:
            raise RuntimeError(f"worker {rank}: no usable image in {len(mine)} shard(s) ({skipped} skipped)")
        rng.shuffle(buffer)
        while buffer:
            batch.append(buffer.pop())
            if len(batch) == cfg.batch_size:
                yield images_to_tensor(batch)
                batch = []


# ---- training -----------------------------------------------------------------------------------------------------
def build_backbone(cfg: TrainJobConfig):
    import featup_ops

    return featup_ops.create_backbone(cfg.backbone, weights=cfg.backbone_weights, random_init=cfg.random_init,
                                      storage_options=resolve_options(cfg.backbone_weights, cfg.storage_options))


def train_config(cfg: TrainJobConfig, backbone) -> TrainConfig:
    from featup_ops import TrainConfig

    channel_norm = {"on": True, "off": False}.get(cfg.channel_norm, not hasattr(backbone, "true_features"))
    return TrainConfig(steps=cfg.steps, lr=cfg.lr, views=cfg.views, image_size=cfg.image_size,
                       downsampler=cfg.downsampler, channel_norm=channel_norm,
                       smoothness_weight=cfg.smoothness_weight, uncertainty=cfg.uncertainty, dropout=cfg.dropout,
                       scalar_lr_scale=cfg.scalar_lr_scale, lr_schedule=cfg.lr_schedule, seed=cfg.seed,
                       range_temp_init=cfg.range_temp_init)


def run_training(cfg: TrainJobConfig, rank: int = 0, world: int = 1, device: str | torch.device = "cpu",
                 wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> dict:
    """Trains in this process (one data-parallel worker of `world`, its trainable modules wrapped by
    `wrap_model`, e.g. Ray Train's `prepare_model`); rank 0 writes checkpoints."""
    from featup_ops import MultiViewTrainer, load_checkpoint, train
    from featup_ops.multiview_trainer import checkpoint_exists

    backbone = build_backbone(cfg)
    tcfg = train_config(cfg, backbone)
    trainer = MultiViewTrainer(backbone, tcfg, device=device, wrap_model=wrap_model)
    if cfg.resume and checkpoint_exists(cfg.output, cfg.output_options):
        step = load_checkpoint(trainer, cfg.output, cfg.output_options)  # the same file in every worker
        log.info("resuming from %s at step %d of %d", cfg.output, step, tcfg.steps)
    log.info("training a JBU stack for %s (%d channels) on %s, %d steps from step %d, batch %d x %d workers, "
             "%d px, %s downsampler, channel norm %s", backbone.name, backbone.dim, cfg.input, tcfg.steps,
             trainer.step, cfg.batch_size, world, cfg.image_size, tcfg.downsampler, tcfg.channel_norm)
    start = time.perf_counter()
    limit = cfg.time_limit_min * 60 if cfg.time_limit_min else None
    history = train(trainer, image_batches(cfg, rank, world), checkpoint_url=cfg.output,
                    checkpoint_every=cfg.checkpoint_every, storage_options=cfg.output_options,
                    is_main=rank == 0, time_limit_s=limit)
    tail = history[-50:]
    summary = {"backbone": backbone.name, "steps": trainer.step, "seconds": time.perf_counter() - start,
               "workers": world, "recipe": json.loads(tcfg.to_json()),
               "final_loss": float(np.mean([h["loss"] for h in tail])) if tail else None,
               "final_relative_mse": float(np.mean([h["relative_mse"] for h in tail])) if tail else None,
               "first_loss": history[0]["loss"] if history else None,
               "weights_fingerprint": trainer.weights_fingerprint()}
    return summary


def _ray_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ctx = ray.train.get_context()
    cfg = TrainJobConfig(**config["job"])
    summary = run_training(cfg, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(),
                           wrap_model=ray.train.torch.prepare_model)  # DistributedDataParallel
    fingerprints: list[str | None] = [None] * ctx.get_world_size()
    dist.all_gather_object(fingerprints, summary["weights_fingerprint"])
    summary["replica_fingerprints"] = fingerprints  # one per worker: equal when the workers stayed in sync
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if ctx.get_world_rank() == 0:
        put_json(join(cfg.output, "summary.json"), summary, cfg.storage_options)


def run_ray(cfg: TrainJobConfig) -> None:
    """Data-parallel training with Ray Train: one TorchTrainer worker (process) per --num-workers."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.ray_runtime import init_ray
    from pipeline.storage.credentials import for_workers

    init_ray(cfg.ray_address)
    # the output was checked before work started, so a restarted worker group resumes from its checkpoint;
    # credentials travel masked, by object reference (Ray Train shows and keeps the loop config)
    job = {**asdict(cfg), "resume": True, "storage_options": for_workers(cfg.storage_options)}
    trainer = TorchTrainer(_ray_worker, train_loop_config={"job": job},
                           scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                                        resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=f"train_jbu_{cfg.backbone}",
                                                storage_path=tempfile.mkdtemp(prefix="featup-train-jbu-")))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    fs, path = filesystem(cfg.output, cfg.storage_options)
    fs.invalidate_cache(path)  # the workers wrote the checkpoint: listings this process cached are stale


def write_preview(cfg: TrainJobConfig) -> None:
    """preview.png from the trained checkpoint on the first --preview-images training images."""
    from featup_ops import load_jbu
    from featup_ops.backbones import imagenet_normalize
    from featup_ops.upsampler_metrics import preview_png

    backbone = build_backbone(cfg)
    stack = load_jbu(cfg.output, cfg.output_options)
    backbone.channel_norm = stack.channel_norm
    first = TrainJobConfig(**{**asdict(cfg), "batch_size": cfg.preview_images, "shuffle_buffer": 1})
    images = next(image_batches(first))
    with torch.no_grad():
        lowres = backbone(backbone.normalize(images))
        highres = stack(lowres, imagenet_normalize(images))
    put_bytes(join(cfg.output, "preview.png"), preview_png(images, lowres, highres, size=cfg.image_size),
              cfg.storage_options)


def check_before_work(cfg: TrainJobConfig) -> None:
    """Refuses bad configuration before training starts: backbone, inputs, output state."""
    from featup_ops import BackboneError
    from featup_ops.multiview_trainer import checkpoint_exists
    from pipeline.storage.filesystems import StorageError
    from pipeline.storage.shards import InputError, resolve_shards

    cfg.validate()
    try:
        build_backbone(cfg)
        resolve_shards(cfg.input, cfg.storage_options)
    except (BackboneError, InputError, StorageError) as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.resume and checkpoint_exists(cfg.output, cfg.output_options):
        raise ConfigError(f"{cfg.output} already holds a training checkpoint; pass --resume to continue "
                         "it or choose another --output")


def run(cfg: TrainJobConfig) -> dict | None:
    """The whole training run: checks, training (here or on Ray Train), summary.json and preview.png."""
    check_before_work(cfg)
    summary = None
    if cfg.num_workers > 0:
        run_ray(cfg)
    else:
        summary = run_training(cfg, device="cuda" if cfg.use_gpu else "cpu")
        put_json(join(cfg.output, "summary.json"), summary, cfg.storage_options)
        log.info("done: %d steps in %.0f s, final loss %.4f", summary["steps"], summary["seconds"],
                 summary["final_loss"])
    if cfg.preview_images > 0:
        write_preview(cfg)
    log.info("checkpoint: %s/model.safetensors (featup_ops.load_jbu / --upsampler-weights)", cfg.output.rstrip("/"))
    return summary
