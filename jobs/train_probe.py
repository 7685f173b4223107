"""Train a linear (1x1 conv) segmentation probe on a feature cache and report pixel accuracy and mIoU.

  python jobs/train_probe.py --cache s3://bkt/feats/dinov2_jbu.zarr --output s3://bkt/probes/dinov2_jbu \\
      --epochs 10 --batch-size 8 --crop-size 112 --workers 4 [--ray-workers 4]

The cache must hold labels (cached with --labels auto from seg.png, or --labels oracle). Samples are split
into train/validation deterministically by key; pixels labelled --ignore-index do not count.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.options import run_command  # noqa: E402
from pipeline.workflows.probe_on_cache import ProbeJobConfig, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("train_probe", ProbeJobConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
