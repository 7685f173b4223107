"""Scoring upsamplers on held-out shards: error against known truth (oracle) and multi-view reconstruction.

The metrics live in `featup_ops.upsampler_metrics`; this module reads the images from shards (bad samples are
reported and skipped), builds every requested upsampler the same way, and feeds them identical batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.options import ConfigError, option
from pipeline.storage.filesystems import put_json, resolve_options
from pipeline.storage.images import SampleError, images_to_tensor, load_sample_image
from pipeline.storage.shards import InputError, iter_samples, resolve_shards
from pipeline.upsampler_weights import WEIGHTS_HELP, assign_weights

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """One evaluation run, validated before any work; its command line is generated from these fields."""

    input: list[str] = option(required=True, repeat=True, help="shard pattern, list file or index.json (repeatable)")
    backbone: str = option(required=True, help="registered backbone name or timm model id")
    upsampler: list[str] = option(required=True, repeat=True,
                                  help="repeatable: bilinear, bicubic, jbu, anyup, implicit, truth (oracle only)")
    json: str | None = option(None, help="write the scores here (local or fsspec URL)")
    image_size: int = option(224, help="resize + centre-crop size")
    upsampler_weights: list[str] | None = option(None, repeat=True, metavar="[NAME=]PATH|URL", help=WEIGHTS_HELP)
    backbone_weights: str | None = option(None, help="backbone weights file (local or s3://); default: timm/HF "
                                                     "cache")
    random_init: bool = option(False, help="random timm backbone / untrained JBU or AnyUp (tests only)")
    batch_size: int = option(4, help="images per forward pass")
    limit: int | None = option(None, help="evaluate at most this many images")
    recon_views: int = option(5, help="jittered views per image for recon_error")
    seed: int = option(0, help="seed of the jittered views")
    implicit_steps: int | None = option(None, help="implicit upsampler: most steps per image")
    implicit_views: int | None = option(None, help="implicit upsampler: views per step")
    implicit_total_views: int | None = option(None, help="implicit upsampler: jittered views per image")
    implicit_reference: bool = option(False, help="implicit upsampler: the reference settings (1,200 steps, 3,000 "
                                                  "views) as the base")
    storage_options: dict[str, Any] = option({}, help="fsspec options: JSON or @file.json")

    def validate(self) -> None:
        from featup_ops import list_upsamplers

        problems = []
        known = list_upsamplers()
        for name in self.upsampler:
            if name not in known:
                problems.append(f"unknown --upsampler {name!r} (known: {', '.join(sorted(known))})")
        if len(set(self.upsampler)) != len(self.upsampler):
            problems.append(f"an --upsampler is given twice: {self.upsampler}")
        try:
            self.weights()
        except ConfigError as exc:
            problems.append(str(exc))
        for name in ("image_size", "batch_size", "recon_views"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.limit is not None and self.limit < 1:
            problems.append(f"--limit must be >= 1 (got {self.limit})")
        for name in ("implicit_steps", "implicit_views", "implicit_total_views"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if problems:
            raise ConfigError("; ".join(problems))

    def weights(self) -> dict[str, str | None]:
        """Each named upsampler's weights (None: none, or AnyUp's published ones)."""
        return assign_weights(self.upsampler, self.upsampler_weights, self.random_init)

    def implicit_options(self) -> dict:
        opts = {"steps": self.implicit_steps, "views": self.implicit_views, "total_views": self.implicit_total_views}
        opts = {k: v for k, v in opts.items() if v is not None}
        if self.implicit_reference:
            opts["reference"] = True
        return opts


def load_images(cfg: EvalConfig) -> list[np.ndarray]:
    """All evaluation images (resize + centre crop), in shard order; bad samples are reported and skipped."""

    shards = resolve_shards(cfg.input, cfg.storage_options)
    images = []
    for shard in shards:
        for sample in iter_samples(shard.url, cfg.storage_options):
            try:
                images.append(load_sample_image(sample, cfg.image_size)[0])
            except SampleError as exc:
                log.warning("skipping %s: %s", sample.get("__key__"), exc)
            if cfg.limit is not None and len(images) >= cfg.limit:
                return images
    if not images:
        raise InputError(f"no usable image in {cfg.input}: every sample failed to decode (see the warnings above)")
    return images


def batches(images: list[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    for lo in range(0, len(images), batch_size):
        yield images_to_tensor(images[lo:lo + batch_size])


def evaluate(cfg: EvalConfig) -> dict[str, dict]:
    """Scores per upsampler name."""
    from featup_ops import create_backbone, create_upsampler
    from featup_ops.upsampler_metrics import evaluate_upsampler

    backbone = create_backbone(cfg.backbone, weights=cfg.backbone_weights, random_init=cfg.random_init,
                               storage_options=resolve_options(cfg.backbone_weights, cfg.storage_options))
    upsamplers = {}
    for name, weights in cfg.weights().items():
        kwargs = cfg.implicit_options() if name == "implicit" else {}
        upsamplers[name] = create_upsampler(name, backbone.dim, weights=weights, random_init=cfg.random_init,
                                            storage_options=resolve_options(weights, cfg.storage_options), **kwargs)
    norms = {n: u.channel_norm for n, u in upsamplers.items() if getattr(u, "channel_norm", None) is not None}
    if norms:  # every upsampler works on the features the trained one expects
        backbone.channel_norm = next(iter(norms.values()))
        log.info("backbone features go through the channel norm of %s for every upsampler", next(iter(norms)))
    images = load_images(cfg)
    log.info("evaluating %s on %d images of %d px with backbone %s", ", ".join(upsamplers), len(images),
             cfg.image_size, backbone.name)
    scores = {}
    for name, up in upsamplers.items():
        scores[name] = evaluate_upsampler(backbone, up, batches(images, cfg.batch_size), cfg.recon_views,
                                          cfg.seed).as_dict()
        log.info("%s: %s", name, scores[name])
    return scores


def format_table(scores: dict[str, dict]) -> str:
    cols = ["upsampler", "rel_error", "cosine", "recon_error", "seconds_per_image", "images"]
    rows = [[name] + [("-" if s[c] is None else f"{s[c]:.4f}" if isinstance(s[c], float) else str(s[c]))
                      for c in cols[1:]] for name, s in scores.items()]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows])


def run(cfg: EvalConfig) -> dict[str, dict]:
    """The whole evaluation: checks, scores, a printed table and (with --json) a JSON file."""
    from featup_ops import BackboneError, CheckpointError, UpsamplerError

    cfg.validate()
    try:
        scores = evaluate(cfg)
    except (BackboneError, CheckpointError, UpsamplerError) as exc:
        raise ConfigError(str(exc)) from None
    print(format_table(scores))
    if cfg.json:
        put_json(cfg.json, scores, cfg.storage_options)
    return scores
