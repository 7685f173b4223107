"""Cache FeatUp high-resolution features for a WebDataset image corpus (the `ray job submit` entrypoint).

  ray job submit --working-dir . -- python jobs/upsample_coco.py \\
      --input 's3://bkt/coco/train-{000000..000123}.tar' --output s3://bkt/feats/dinov2_jbu.zarr \\
      --backbone dinov2 --upsampler jbu --upsampler-weights s3://bkt/ckpt/dinov2_jbu.ckpt

With no arguments it runs the embedded demo: shards built from scikit-image's sample photographs, a
local Ray instance, output under ./demo_output/.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run the code this script ships with

from pipeline.config import DTYPES, ConfigError, JobConfig  # noqa: E402
from pipeline.driver import JobFailed, run_job  # noqa: E402
from pipeline.shards import InputError  # noqa: E402
from pipeline.storage import StorageError  # noqa: E402
from pipeline.store import OutputExistsError  # noqa: E402

log = logging.getLogger("upsample_coco")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", action="append", metavar="PATTERN",
                    help="shards: brace pattern ('train-{000..123}.tar'), glob, local path, s3:// or any fsspec URL, "
                         "or a file listing shards (one per line) / a shard index.json; repeat for several")
    io.add_argument("--output", help="Zarr store location: a local path or s3://bucket/path.zarr")
    io.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON",
                    help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://minio:9000", "anon": false}\'; '
                         "the S3 endpoint is also read from AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL")
    io.add_argument("--overwrite", action="store_true",
                    help="replace an existing output written with other settings (default: refuse)")
    io.add_argument("--limit", type=int, help="process at most this many samples (in input order), e.g. for a trial")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="dinov2",
                       help="preset (dino16, dino8, dinov2, clip, vit, resnet50, oracle) or any timm model id")
    model.add_argument("--backbone-options", type=json.loads, default={}, metavar="JSON",
                       help='extra backbone arguments, e.g. \'{"dim": 384}\' for a 384-channel oracle')
    model.add_argument("--backbone-weights", help="backbone weights, local or fsspec URL (.safetensors or a torch "
                       "state dict); default: the local timm/Hugging Face cache")
    model.add_argument("--upsampler", default="jbu", choices=("jbu", "bilinear", "bicubic", "implicit", "truth"),
                       help="jbu: FeatUp JBU stack (needs --upsampler-weights); bilinear/bicubic: baselines; "
                            "implicit: per-image fitted implicit model (slow, best); truth: the oracle's exact "
                            "features (oracle backbone only, an evaluation ceiling)")
    model.add_argument("--upsampler-weights", help="JBU checkpoint: this project's .safetensors or a published "
                       "FeatUp .ckpt, local or fsspec URL")
    model.add_argument("--implicit-steps", type=int, help="implicit upsampler: optimisation steps per image")
    model.add_argument("--implicit-views", type=int, help="implicit upsampler: jittered views per step")
    model.add_argument("--random-init", action="store_true",
                       help="explicitly allow deterministic random weights when none are given (tests, demos)")
    model.add_argument("--image-size", type=int, default=224,
                       help="images are resized (shorter side) and centre-cropped to this size (default 224)")
    model.add_argument("--dtype", default="float16", choices=DTYPES,
                       help="compute precision on GPU, and the stored float type unless --storage says otherwise "
                            "(default float16)")
    store = p.add_argument_group("what is stored")
    store.add_argument("--storage", metavar="PRESET",
                       help="float16 | bfloat16 | float32 | int8 (per-sample per-channel 8-bit) | pca<k> (k principal "
                            "components, fitted on --pca-samples images) | lowres (low-res features + image; the "
                            "upsampler re-runs on read). Default: --dtype")
    store.add_argument("--pca-samples", type=int, default=64, help="images the pca<k> projection is fitted on")
    store.add_argument("--labels", default="auto", choices=("auto", "oracle", "none"),
                       help="auto: store each sample's seg.png/label.png aligned with the features; oracle: "
                            "known-truth labels of the oracle features (tests, benchmarks); none")
    store.add_argument("--no-lowres", action="store_true", help="do not store the backbone's low-res features")
    store.add_argument("--previews", type=int, default=4,
                       help="PCA preview PNGs of the first N samples into <output>/previews/ (default 4, 0 = none)")
    run = p.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    run.add_argument("--actors", type=int, help="worker actors (default: one per GPU, or 1 on a CPU-only cluster)")
    run.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs pinned to each actor (default 1)")
    run.add_argument("--cpus-per-actor", type=float, help="CPUs per actor: torch threads (default: an even share)")
    run.add_argument("--decode-threads", type=int, default=4, help="image decode threads per actor (default 4)")
    run.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is reported failed")
    run.add_argument("--max-pixels", type=int, default=89_478_485,
                     help="decompression-bomb limit: larger images are recorded as errors (default ~89 MP)")
    run.add_argument("--min-side", type=int, default=16, help="images with a shorter side are recorded as errors")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> JobConfig:
    implicit = {k: v for k, v in (("steps", args.implicit_steps), ("views", args.implicit_views)) if v is not None}
    if implicit and args.upsampler != "implicit":
        raise ConfigError("--implicit-steps/--implicit-views only apply to --upsampler implicit")
    return JobConfig(
        inputs=tuple(args.input or ()), output=args.output or "", backbone=args.backbone,
        backbone_weights=args.backbone_weights, backbone_options=args.backbone_options, upsampler=args.upsampler, upsampler_weights=args.upsampler_weights,
        upsampler_options=implicit, random_init=args.random_init, image_size=args.image_size, dtype=args.dtype,
        storage=args.storage, labels=args.labels, pca_samples=args.pca_samples, previews=args.previews,
        store_lowres=not args.no_lowres, batch_size=args.batch_size, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor, decode_threads=args.decode_threads,
        limit=args.limit, overwrite=args.overwrite, storage_options=args.storage_options,
        max_attempts=args.max_attempts, max_pixels=args.max_pixels, min_side=args.min_side,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            from pipeline.demo import demo_config

            config = demo_config(Path.cwd() / "demo_output")
            log.info("no arguments: running the embedded demo (sample photographs -> %s)", config.output)
        else:
            config = config_from_args(parse_args(argv))
        summary = run_job(config)
    except (ConfigError, InputError, StorageError, OutputExistsError) as exc:
        log.error("%s", exc)
        return 2
    except JobFailed as exc:
        log.error("%s", exc)
        return 1
    print(f"\ncached {summary.ok} images ({summary.errors} errors, {len(summary.shard_errors)} damaged shards, "
          f"{summary.shards_skipped} shards resumed) in {summary.seconds:.1f}s")
    print(f"features: {config.output}  (manifest: {config.output.rstrip('/')}/manifest.parquet)")
    print("read back with: from pipeline.dataset import FeatureCache; cache = FeatureCache("
          f"{config.output!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
