"""Train a FeatUp JBU upsampler for any registered backbone on WebDataset shards (local or s3://).

    python jobs/train_jbu.py --input 'data/train-{000000..000009}.tar' --backbone dinov2 \
        --output s3://bucket/jbu/dinov2 --steps 2000 --batch-size 4 --image-size 224

    # data-parallel on a Ray cluster (Ray Train TorchTrainer), same script:
    ray job submit --working-dir . -- python jobs/train_jbu.py ... --num-workers 8 --use-gpu

Frozen backbone, multi-view consistency loss, the reference recipe by default (shared/METHOD.md).
--output is a folder (local or fsspec URL): model.safetensors (load with featup_ops.load_jbu; pass the
folder or the file to jobs/upsample_coco.py --upsampler-weights), training_state.safetensors (resume
with --resume), preview.png (image | low-res | high-res features, PCA colours) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from featup_ops import BackboneError  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from pipeline.jbu_training import TrainJobConfig, run  # noqa: E402
from pipeline.shards import InputError  # noqa: E402
from pipeline.storage import StorageError  # noqa: E402

log = logging.getLogger("train_jbu")


def parse_args(argv: Sequence[str] | None = None) -> TrainJobConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="shard pattern, list file or index.json (repeatable)")
    p.add_argument("--backbone", required=True, help="registered backbone name or timm model id")
    p.add_argument("--output", required=True, help="checkpoint folder, local or fsspec URL (s3://...)")
    p.add_argument("--steps", type=int, default=2000, help="total optimisation steps (default 2000, the reference)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step per worker (default 4)")
    p.add_argument("--image-size", type=int, default=224, help="resize + centre-crop size (default 224)")
    p.add_argument("--lr", type=float, default=1e-3, help="NAdam learning rate (default 1e-3)")
    p.add_argument("--views", type=int, default=5, help="jittered views per step (default 5)")
    p.add_argument("--downsampler", choices=("attention", "simple", "area"), default="attention",
                   help="learned attention (reference) or simple blur, or the fixed area average")
    p.add_argument("--channel-norm", choices=("auto", "on", "off"), default="auto",
                   help="train behind a per-pixel LayerNorm of the features (auto: on, off for the oracle)")
    p.add_argument("--smoothness-weight", type=float, default=1e-3)
    p.add_argument("--no-uncertainty", dest="uncertainty", action="store_false",
                   help="plain squared error instead of the learned per-pixel uncertainty weighting")
    p.add_argument("--scalar-lr-scale", type=float, default=1.0,
                   help="learning-rate factor for the JBU's temperature and spatial sigma (default 1)")
    p.add_argument("--range-temp-init", type=float, default=0.0,
                   help="initial log-temperature of the range kernels (reference 0; higher starts edge-aware)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="constant (reference) or cosine decay to 0 at --steps")
    p.add_argument("--no-dropout", dest="dropout", action="store_false",
                   help="train the JBU with its Dropout2d layers off (faster convergence on short runs)")
    p.add_argument("--backbone-weights", help="backbone weights file (local or s3://); default: timm/HF cache")
    p.add_argument("--random-init", action="store_true", help="accept a randomly initialised timm backbone")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output, if any")
    p.add_argument("--time-limit", type=float, dest="time_limit_min", help="stop after this many minutes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preview-images", type=int, default=4, help="images in preview.png (0: none)")
    p.add_argument("--num-workers", type=int, default=0, help="Ray Train workers (0: train in this process)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (or this process's GPU)")
    p.add_argument("--ray-address", help="Ray cluster address (default: the one `ray job submit` gives, or local)")
    p.add_argument("--storage-options", type=json.loads, default={}, help="fsspec options as JSON")
    args = p.parse_args(argv)
    return TrainJobConfig(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ConfigError, BackboneError, InputError, StorageError) as exc:
        raise SystemExit(f"train_jbu: {exc}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
