"""Measure upsamplers on a set of shards: against known truth (oracle) and by multi-view reconstruction.

    python jobs/eval_upsampler.py --input 'heldout/shard-*.tar' --backbone oracle --image-size 224 \
        --upsampler bilinear --upsampler bicubic --upsampler jbu --upsampler-weights ckpt/ \
        --upsampler implicit --json scores.json

Prints a table and writes JSON mapping each upsampler to {"rel_error", "cosine", "recon_error",
"seconds_per_image", "images"} (rel_error/cosine are null for backbones without a known truth).
Every upsampler sees the same images and the same jittered views.
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
from pipeline.shards import InputError  # noqa: E402
from pipeline.storage import StorageError  # noqa: E402
from pipeline.upsampler_eval import EvalConfig, evaluate, format_table  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="shard pattern, list file or index.json")
    p.add_argument("--backbone", required=True)
    p.add_argument("--upsampler", action="append", required=True, help="repeatable: bilinear, bicubic, jbu, implicit")
    p.add_argument("--upsampler-weights", help="JBU checkpoint (file or folder, local or s3://)")
    p.add_argument("--json", help="write the scores here (local or fsspec URL)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--backbone-weights")
    p.add_argument("--random-init", action="store_true", help="random timm backbone / untrained JBU (tests only)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--limit", type=int, help="evaluate at most this many images")
    p.add_argument("--recon-views", type=int, default=5, help="jittered views per image for recon_error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implicit-steps", type=int, help="implicit upsampler: most steps per image")
    p.add_argument("--implicit-views", type=int, help="implicit upsampler: views per step")
    p.add_argument("--implicit-total-views", type=int, help="implicit upsampler: jittered views per image")
    p.add_argument("--implicit-reference", action="store_true",
                   help="implicit upsampler: the reference settings (1,200 steps, 3,000 views) as the base")
    p.add_argument("--storage-options", type=json.loads, default={})
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = parse_args(argv)
    try:
        cfg.validate()
        scores = evaluate(cfg)
    except (ConfigError, BackboneError, InputError, StorageError) as exc:
        raise SystemExit(f"eval_upsampler: {exc}") from None
    print(format_table(scores))
    if cfg.json:
        import fsspec

        with fsspec.open(cfg.json, "w", auto_mkdir=True, **cfg.storage_options) as f:
            json.dump(scores, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
