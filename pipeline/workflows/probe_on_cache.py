"""Training a linear segmentation probe on a feature cache: locally, or data-parallel with Ray Train.

The probe model and its metrics live in `featup_ops.linear_probe`; this module feeds it from a `FeatureCache`
(shuffled, multi-worker, prefetching DataLoaders over a deterministic key split) and saves the result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.options import ConfigError, option, record_of
from pipeline.ray_runtime import init_ray
from pipeline.reading.feature_cache import FeatureCache, LabelledFeatures
from pipeline.reading.shape_batches import ShapeBatchSampler
from pipeline.storage.credentials import for_workers
from pipeline.storage.filesystems import filesystem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeJobConfig:
    """One probe training run; its command line is generated from these fields."""

    cache: str = option(required=True, help="feature cache written by jobs/upsample_coco.py (local or s3://)")
    output: str | None = option(None, help="folder for probe.safetensors and metrics.json (local or fsspec URL)")
    storage_options: Mapping[str, Any] = option({}, help="fsspec options: JSON or @file.json")
    val_fraction: float = option(0.2, help="held-out share of the samples")
    seed: int = option(0, help="seed of the split, the shuffling and the probe's initialisation")
    epochs: int = option(10, help="passes over the training samples")
    batch_size: int = option(8, help="samples per step")
    lr: float = option(1e-2, help="learning rate")
    crop_size: int | None = option(None, help="train on random crops of this size (read tile-wise; at most the "
                                              "smallest side of a --resize fit cache's samples); without it, "
                                              "batches of one shape")
    workers: int = option(2, help="DataLoader worker processes")
    classes: int | None = option(None, help="number of classes (default: 1 + the largest training label)")
    ignore_index: int = option(255, help="label value that is not scored")
    ray_workers: int = option(0, help="> 0: data-parallel on that many Ray Train workers")
    use_gpu: bool = option(False, help="train on GPU(s)")

    def validate(self) -> "ProbeJobConfig":
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        return self


def infer_classes(cache: FeatureCache, keys: list[str], ignore_index: int) -> int:
    """1 + the largest class id in the labels of `keys` (labels arrays only are read)."""
    top = -1
    for key in keys:
        labels = cache.labels(key)
        if labels is not None:
            valid = labels[labels != ignore_index]
            if valid.size:
                top = max(top, int(valid.max()))
    if top < 0:
        raise ConfigError(f"no labelled pixel in {cache.url}: cache it with labels (--labels auto with seg.png in the "
                         "shards, or --labels oracle)")
    return top + 1


def _loader(cache: FeatureCache, keys, config: ProbeJobConfig, shuffle: bool, crop: bool, rank: int = 0,
            world: int = 1) -> DataLoader:
    """Shuffled (for training), multi-worker, prefetching; workers persist across epochs. `rank` of `world`
    data-parallel workers gets its share of `keys` (`rank_share`), or, for samples of several shapes (--resize
    fit, uncropped), its share of the batches of one shape: every worker the same number of batches."""
    crop_size = config.crop_size if crop else None
    data = LabelledFeatures(cache, keys, crop_size=crop_size, seed=config.seed)
    workers = dict(num_workers=config.workers, persistent_workers=config.workers > 0,
                   prefetch_factor=4 if config.workers else None, pin_memory=config.use_gpu)
    shapes = data.shapes()
    if len(np.unique(shapes, axis=0)) > 1:
        sampler = ShapeBatchSampler(shapes, config.batch_size, shuffle, config.seed, rank=rank, replicas=world)
        return DataLoader(data, batch_sampler=sampler, **workers)
    if world > 1:
        data = LabelledFeatures(cache, rank_share(keys, rank, world), crop_size=crop_size, seed=config.seed)
    return DataLoader(data, batch_size=config.batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(config.seed), **workers)


def _save(probe: torch.nn.Module, metrics: dict, output: str, storage_options: Mapping[str, Any]) -> None:
    from safetensors.torch import save

    fs, root = filesystem(output, storage_options)
    fs.makedirs(root, exist_ok=True)
    meta = {"featup_probe": json.dumps({"dim": probe.dim, "classes": probe.classes})}
    fs.pipe_file(f"{root}/probe.safetensors", save({k: v.detach().cpu().contiguous()
                                                    for k, v in probe.state_dict().items()}, metadata=meta))
    fs.pipe_file(f"{root}/metrics.json", json.dumps(metrics, indent=1).encode())


def run_probe(config: ProbeJobConfig) -> dict:
    """Trains and evaluates the probe; returns (and saves to config.output) the metrics."""
    from featup_ops.linear_probe import ProbeTrainingConfig, train_probe

    config.validate()
    if config.ray_workers > 0:
        return run_probe_ray(config)
    cache = FeatureCache(config.cache, config.storage_options)
    train_keys, val_keys = cache.split(config.val_fraction, config.seed)
    if not train_keys or not val_keys:
        raise ConfigError(f"{len(cache)} samples are too few for a {config.val_fraction:.0%} validation split")
    classes = config.classes or infer_classes(cache, train_keys, config.ignore_index)
    log.info("probe: %d train / %d validation samples, %d classes, %d channels", len(train_keys), len(val_keys),
             classes, cache.dim)
    device = "cuda" if config.use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(config.seed)
    train_loader = _loader(cache, train_keys, config, True, True)
    result = train_probe(lambda epoch: train_loader, cache.dim, classes,
                         ProbeTrainingConfig(config.epochs, config.lr, ignore_index=config.ignore_index, device=device),
                         val_batches=lambda: _loader(cache, val_keys, config, False, False))
    metrics = {**result.score.as_dict(), "train_losses": result.train_losses, "classes": classes,
               "train_samples": len(train_keys), "val_samples": len(val_keys), "train_seconds": result.seconds,
               "train_images_per_s": result.images_seen / max(result.seconds, 1e-9), "cache": config.cache,
               "storage": cache.storage, "config": record_of(config)}
    if config.output:
        _save(result.probe, metrics, config.output, config.storage_options)
    return metrics


def rank_share(keys: Sequence[str], rank: int, world: int) -> list[str]:
    """The keys one of `world` data-parallel ranks trains on: every rank the same number, the last ones wrapping
    around to the first keys (as torch's DistributedSampler pads). DDP all-reduces every step, so a rank with a
    batch more than the others would wait for them for ever."""
    per_rank = -(-len(keys) // world)
    return [keys[i % len(keys)] for i in range(rank, per_rank * world, world)]


def _ray_train_loop(loop_config: dict) -> None:
    """One Ray Train worker: its share of the training keys, DDP gradients, rank 0 evaluates and saves."""
    import ray.train
    import ray.train.torch

    from featup_ops.linear_probe import LinearProbe, ProbeTrainingConfig, train_probe

    config = ProbeJobConfig(**loop_config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cache = FeatureCache(config.cache, config.storage_options)
    train_keys, val_keys = cache.split(config.val_fraction, config.seed)
    mine = rank_share(train_keys, rank, world)
    torch.manual_seed(config.seed)
    probe = ray.train.torch.prepare_model(LinearProbe(cache.dim, config.classes))
    device = ray.train.torch.get_device()
    train_loader = _loader(cache, train_keys, config, True, True, rank=rank, world=world)
    result = train_probe(lambda epoch: train_loader, cache.dim, config.classes,
                         ProbeTrainingConfig(config.epochs, config.lr, ignore_index=config.ignore_index,
                                             device=str(device)),
                         val_batches=(lambda: _loader(cache, val_keys, config, False, False)) if rank == 0 else None,
                         probe=probe)
    metrics = {"rank": rank, "world_size": world, "train_losses": result.train_losses,
               "train_seconds": result.seconds, "train_samples_this_worker": len(mine)}
    if rank == 0:
        metrics.update({**result.score.as_dict(), "classes": config.classes, "train_samples": len(train_keys),
                        "val_samples": len(val_keys), "cache": config.cache, "storage": cache.storage})
        if config.output:
            _save(result.probe, metrics, config.output, config.storage_options)
    ray.train.report(metrics)


def run_probe_ray(config: ProbeJobConfig) -> dict:
    """The same training, data-parallel over `config.ray_workers` Ray Train workers (TorchTrainer)."""
    import tempfile

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cache = FeatureCache(config.cache, config.storage_options)
    train_keys, _ = cache.split(config.val_fraction, config.seed)
    classes = config.classes or infer_classes(cache, train_keys, config.ignore_index)
    # Rank 0 writes the probe and metrics.json; read back from there (a temporary folder without --output).
    output = config.output or tempfile.mkdtemp(prefix="featup-probe-out-")
    init_ray()
    # credentials travel masked, by object reference (Ray Train shows and keeps the loop config)
    loop_config = {**asdict(config), "classes": classes, "ray_workers": 0, "workers": 0, "output": output,
                   "storage_options": for_workers(config.storage_options)}
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _ray_train_loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=config.ray_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="featup-probe", storage_path=tempfile.mkdtemp(prefix="featup-probe-")))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    fs, root = filesystem(output, config.storage_options)
    metrics = json.loads(fs.cat_file(f"{root}/metrics.json"))
    metrics["wall_seconds"] = time.perf_counter() - t0
    return metrics


def load_probe(url: str, storage_options: Mapping[str, Any] | None = None):
    """A saved probe (probe.safetensors under `url`) as an eval-mode LinearProbe."""
    from safetensors.torch import load

    from featup_ops.linear_probe import LinearProbe

    fs, root = filesystem(url, storage_options)
    data = fs.cat_file(f"{root}/probe.safetensors")
    header = json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["featup_probe"])
    probe = LinearProbe(meta["dim"], meta["classes"])
    probe.load_state_dict(load(data))
    return probe.eval()


def predict(probe: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Class map (H, W) of one (C, H, W) feature array."""
    with torch.no_grad():
        return probe(torch.from_numpy(np.asarray(features, np.float32))[None]).argmax(1)[0].numpy()


def run(config: ProbeJobConfig) -> dict:
    """The probe job: trains, evaluates, prints the scores and saves probe + metrics to --output."""
    metrics = run_probe(config)
    print(f"pixel accuracy {metrics['pixel_accuracy']:.4f}   mIoU {metrics['miou']:.4f}   "
          f"({metrics['classes']} classes, {metrics['val_samples']} validation samples)")
    if config.output:
        print(f"probe and metrics: {config.output}")
    return metrics
