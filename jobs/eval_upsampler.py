"""Measure upsamplers on a set of shards: against known truth (oracle) and by multi-view reconstruction.

    python jobs/eval_upsampler.py --input 'heldout/shard-*.tar' --backbone oracle --image-size 224 \
        --upsampler bilinear --upsampler bicubic --upsampler jbu --upsampler-weights ckpt/ \
        --upsampler implicit --json scores.json

    # AnyUp beside a JBU: name each learned upsampler's weights
    python jobs/eval_upsampler.py --input 'heldout/shard-*.tar' --backbone dinov2 --upsampler jbu --upsampler anyup \
        --upsampler-weights jbu=s3://bkt/ckpt/dinov2_jbu.ckpt --upsampler-weights anyup=anyup_multi_backbone.pth

Prints a table and writes JSON mapping each upsampler to {"rel_error", "cosine", "recon_error",
"seconds_per_image", "images"} (rel_error/cosine are null for backbones without a known truth).
Every upsampler sees the same images and the same jittered views.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.options import run_command  # noqa: E402
from pipeline.workflows.score_upsamplers import EvalConfig, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("eval_upsampler", EvalConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
