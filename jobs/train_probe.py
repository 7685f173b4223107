"""Train a linear (1x1 conv) segmentation probe on a feature cache and report pixel accuracy and mIoU.

  python jobs/train_probe.py --cache s3://bkt/feats/dinov2_jbu.zarr --output s3://bkt/probes/dinov2_jbu \\
      --epochs 10 --batch-size 8 --crop-size 112 --workers 4 [--ray-workers 4]

The cache must hold labels (cached with --labels auto from seg.png, or --labels oracle). Samples are split
into train/validation deterministically by key; pixels labelled --ignore-index do not count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run the code this script ships with

from pipeline.dataset import CacheError  # noqa: E402
from pipeline.probing import ProbeJobConfig, run_probe  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="feature cache written by jobs/upsample_coco.py (local or s3://)")
    p.add_argument("--output", help="folder for probe.safetensors and metrics.json (local or fsspec URL)")
    p.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON", help="fsspec options as JSON")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out share of the samples (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--crop-size", type=int, help="train on random crops of this size (read tile-wise)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default 2)")
    p.add_argument("--classes", type=int, help="number of classes (default: 1 + the largest training label)")
    p.add_argument("--ignore-index", type=int, default=255, help="label value that is not scored (default 255)")
    p.add_argument("--ray-workers", type=int, default=0, help="> 0: data-parallel on that many Ray Train workers")
    p.add_argument("--use-gpu", action="store_true", help="train on GPU(s)")
    a = p.parse_args(argv)
    config = ProbeJobConfig(cache=a.cache, output=a.output, storage_options=a.storage_options,
                            val_fraction=a.val_fraction, seed=a.seed, epochs=a.epochs, batch_size=a.batch_size,
                            lr=a.lr, crop_size=a.crop_size, workers=a.workers, classes=a.classes,
                            ignore_index=a.ignore_index, ray_workers=a.ray_workers, use_gpu=a.use_gpu)
    try:
        metrics = run_probe(config)
    except (ValueError, CacheError) as exc:
        logging.error("%s", exc)
        return 2
    print(f"pixel accuracy {metrics['pixel_accuracy']:.4f}   mIoU {metrics['miou']:.4f}   "
          f"({metrics['classes']} classes, {metrics['val_samples']} validation samples)")
    if a.output:
        print(f"probe and metrics: {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
