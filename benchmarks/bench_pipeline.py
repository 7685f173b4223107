"""End-to-end throughput of the caching job against the compute-only rate, in one run.

    python benchmarks/bench_pipeline.py [--images 64] [--backbone vit_tiny_patch16_224] [--image-size 224]

Shards of real photographs go to S3 (a moto server on 127.0.0.1), the job reads them from S3 and writes
features back to S3 (local Ray, one actor with all CPUs, JBU upsampler). The compute-only baseline runs
the same backbone + upsampler on the same preprocessed batches in this process with the same thread count.
Reports images/s for both, their ratio, and bytes written per image. JSON: benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(n: int):
    """n distinct samples from the shipped photographs (crops and flips make them distinct images)."""
    import numpy as np

    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, encode, photo

    names = COLOR_PHOTOS + GRAY_PHOTOS
    for i in range(n):
        arr = photo(names[i % len(names)])
        variant = i // len(names)
        if variant % 2:
            arr = arr[:, ::-1]
        h, w = arr.shape[:2]
        crop = variant // 2 * 16
        arr = np.ascontiguousarray(arr[crop: h - crop, crop: w - crop])
        yield {"__key__": f"img{i:05d}", "jpg": encode(arr), "json": json.dumps({"variant": variant})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--backbone", default="vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float16")
    args = p.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep Ray on loopback
    os.environ["TQDM_DISABLE"] = "1"
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per S3 request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    import numpy as np
    import s3fs
    import torch

    from featup_ops import FeatureModel
    from pipeline.caching.driver import run_job
    from pipeline.caching.job_config import JobConfig
    from pipeline.ingest.shard_writer import write_shards
    from pipeline.storage.images import images_to_tensor, load_sample_image

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    samples = list(_samples(args.images))
    write_shards(samples, "s3://bench/shards", samples_per_shard=args.per_shard, prefix="train")
    cpus = os.cpu_count() or 1

    # Compute-only: the same model, batches and thread count, no I/O.
    torch.set_num_threads(cpus)
    model = FeatureModel.create(args.backbone, "jbu", random_init=True).eval()
    images = np.stack([load_sample_image(s, args.image_size)[0] for s in samples])
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]

    def compute_all() -> None:
        for i in range(0, len(images), args.batch_size):
            _, hr = model(images_to_tensor(images[i: i + args.batch_size]))
            hr.to(dtype)

    compute_all_first = harness.time_it(lambda: compute_all(), repeat=1, warmup=1)
    compute_s = compute_all_first["median_s"]
    compute_rate = len(images) / compute_s
    print(f"compute-only: {compute_rate:.2f} images/s ({compute_s:.1f}s for {len(images)})", flush=True)
    model = None  # free it before the Ray runs

    # End to end: S3 -> Ray actor (decode, compute, write) -> S3.
    out = "s3://bench/feats.zarr"
    config = JobConfig(inputs=("s3://bench/shards/train-*.tar",), output=out, backbone=args.backbone,
                       upsampler="jbu", random_init=True, image_size=args.image_size, dtype=args.dtype,
                       batch_size=args.batch_size, actors=1, cpus_per_actor=cpus, overwrite=True)
    t0 = time.perf_counter()
    summary = run_job(config)
    wall = time.perf_counter() - t0
    commits = [json.loads(fs.cat_file(p)) for p in fs.ls("bench/feats.zarr/_pipeline/commits")]
    # shards overlap inside the actor (one computes while the next streams in and the last drains): the
    # steady window is from the first shard's start to the last commit, excluding Ray start-up and model load
    shard_seconds = max(c["committed_at"] for c in commits) - min(c["started_at"] for c in commits)
    actor_compute_s = sum(c["compute_seconds"] for c in commits)
    steady_rate = summary.ok / shard_seconds
    job_rate = summary.ok / wall
    stored = sum(fs.du(f"bench/feats.zarr/{g}") for g in ("features", "lowres"))
    uncompressed = sum(c["bytes_uncompressed"] for c in commits)
    result = {
        "config": vars(args), "cpus": cpus,
        "compute_only_images_per_s": round(compute_rate, 3),
        "end_to_end_steady_images_per_s": round(steady_rate, 3),
        "end_to_end_job_images_per_s": round(job_rate, 3),
        "ratio_steady_over_compute": round(steady_rate / compute_rate, 3),
        "ratio_job_over_compute": round(job_rate / compute_rate, 3),
        # the same model calls timed inside the actor, while its reader, decoder and writer threads (and, on
        # this one machine, the moto S3 server) share the CPUs: how much of the gap is contention, not waiting
        "in_actor_compute_images_per_s": round(summary.ok / actor_compute_s, 3),
        "in_actor_compute_fraction_of_steady_window": round(actor_compute_s / shard_seconds, 3),
        "job_wall_s": round(wall, 2), "job_startup_s": round(wall - shard_seconds, 2),
        "images": summary.ok, "errors": summary.errors,
        "bytes_written_per_image": int(stored / summary.ok),
        "bytes_uncompressed_per_image": int(uncompressed / summary.ok),
        "compression_ratio": round(uncompressed / stored, 3),
        "notes": "steady = images / time from the first shard's start to the last commit inside the actor (S3 "
                 "read, decode, compute, write, commit, overlapped); job = images / wall time of run_job including "
                 "Ray start-up and model loading.",
    }
    server.stop()
    print(json.dumps(result, indent=2))
    png = harness.bar_chart(harness.RESULTS / "pipeline.png", "Caching job throughput (S3 in and out via moto)",
                            ["compute only", "end to end (steady)", "end to end (whole job)"],
                            {"images/s": [compute_rate, steady_rate, job_rate]}, "images per second")
    print(f"\nwrote {harness.write_results('pipeline', result)} and {png}")


if __name__ == "__main__":
    main()
