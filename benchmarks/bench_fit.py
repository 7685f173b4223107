"""`--resize fit` against `--resize crop`: area kept, bytes per image, throughput at the same pixel count.

    python benchmarks/bench_fit.py [--images 96] [--image-size 224] [--samples-per-shard 48] [--repeat 3] [--quick]

Inputs are COCO/Cityscapes-like: scikit-image's photographs cut to a cycle of aspect ratios (4:3, 3:4, 2:1,
1:1, 16:9, 3:2, 2:3), each resized to a 640 px longer side and stored as JPEG (quality 90). Both modes cache
the same shards in this process, without Ray, as a worker actor does (`ShardProcessor`: stream, decode,
resize, compute, encode, compress, write, commit), the `oracle` backbone with a JBU stack (random weights;
the fused operator) on `--device`. `crop` keeps `--image-size`^2 pixels per image; `fit` about as many, at the
image's own aspect ratio (each side a multiple of the patch), batched by shape within a shard. One warm-up
shard per mode, then the measured shards; crop and fit alternate, `--repeat` times, and the median of each
is reported, with the ratio fit / crop of images per second (target >= 0.85) and of pixels per second.
Area kept: the share of the original image's pixels that the features cover (the crop window over the
resized image). Bytes per image: what the features, low-res features and labels arrays hold on disk, per image.
Writes benchmarks/results/fit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

ASPECTS = ((4, 3), (3, 4), (2, 1), (1, 1), (16, 9), (3, 2), (2, 3))  # width : height
TARGET = 0.85


def mixed_aspect_samples(n: int, long_side: int = 640, quality: int = 90):
    """n WebDataset samples: photographs cut (centred) to the ASPECTS in turn, `long_side` px longer side, JPEG."""
    import numpy as np
    from PIL import Image

    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, encode, photo

    names = COLOR_PHOTOS + GRAY_PHOTOS
    for i in range(n):
        arr = photo(names[i % len(names)])
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        aw, ah = ASPECTS[i % len(ASPECTS)]
        h, w = arr.shape[:2]
        ch, cw = (h, round(h * aw / ah)) if h * aw / ah <= w else (round(w * ah / aw), w)
        top, left = (h - ch) // 2, (w - cw) // 2
        img = Image.fromarray(np.ascontiguousarray(arr[top: top + ch, left: left + cw]))
        scale = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        yield {"__key__": f"img{i:05d}", "jpg": encode(np.asarray(img), quality=quality)}


def _bytes(root: Path, groups=("features", "lowres", "labels")) -> int:
    return sum(f.stat().st_size for g in groups if (root / g).exists() for f in (root / g).rglob("*")
               if f.is_file() and f.name != "zarr.json")


def run_mode(mode: str, args: argparse.Namespace, inputs: str, output: Path) -> dict:
    """One caching pass of `mode` over the shards: warm-up shard, then the measured ones."""
    import pyarrow.parquet as pq

    from pipeline.caching.driver import prepare
    from pipeline.caching.job_config import JobConfig
    from pipeline.caching.shard_processor import ShardProcessor, ShardTask

    config = JobConfig(inputs=(inputs,), output=str(output), backbone="oracle", upsampler="jbu", random_init=True,
                       resize=mode, image_size=args.image_size, batch_size=args.batch_size, labels="oracle",
                       decode_threads=args.decode_threads, previews=0, overwrite=True)
    run = prepare(config)
    run.lease.release()
    processor = ShardProcessor(config, device=args.device)
    warm, measured = run.pending[:1], run.pending[1:]
    for shard in warm:
        processor.process(ShardTask(shard))
    before = _bytes(output)
    t0 = time.perf_counter()
    results = [processor.process(ShardTask(shard)) for shard in measured]
    wall = time.perf_counter() - t0
    images = sum(r.ok for r in results)
    rows = pq.read_table([str(output / r.commit["part"]) for r in results][0]).to_pylist()
    for r in results[1:]:
        rows += pq.read_table(str(output / r.commit["part"])).to_pylist()
    rows = [r for r in rows if r["status"] == "ok"]
    pixels = sum(r["crop_height"] * r["crop_width"] for r in rows)
    area = [r["crop_height"] * r["crop_width"] / (r["resized_height"] * r["resized_width"]) for r in rows]
    shapes = sorted({(r["crop_height"], r["crop_width"]) for r in rows})
    processor.pool.shutdown()
    return {"images": images, "seconds": wall, "images_per_s": images / wall, "megapixels_per_s": pixels / wall / 1e6,
            "pixels_per_image": pixels / images, "model_seconds": sum(r.compute_seconds for r in results),
            "area_kept": statistics.fmean(area), "area_kept_min": min(area),
            "bytes_per_image": (_bytes(output) - before) / images, "shapes": [list(s) for s in shapes]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96, help="measured images (plus one warm-up shard)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples-per-shard", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="alternating crop/fit passes; medians reported")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: per-core figures that other "
                                                                "processes on the machine disturb least)")
    parser.add_argument("--quick", action="store_true", help="a few small images: shows it works, not a figure")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.samples_per_shard, args.repeat = 28, 112, 14, 2
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    os.environ["TQDM_DISABLE"] = "1"
    from pipeline.ingest.shard_writer import write_shards

    work = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    try:
        total = args.images + args.samples_per_shard  # the first shard warms up
        write_shards(mixed_aspect_samples(total), str(work / "in"), samples_per_shard=args.samples_per_shard,
                     prefix="mixed")
        inputs = f"{work}/in/mixed-*.tar"
        passes: dict[str, list[dict]] = {"crop": [], "fit": []}
        for i in range(args.repeat):
            for mode in (("crop", "fit") if i % 2 == 0 else ("fit", "crop")):
                passes[mode].append(run_mode(mode, args, inputs, work / f"{mode}{i}.zarr"))
                print(f"pass {i} {mode}: {passes[mode][-1]['images_per_s']:.2f} images/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(p[key] for p in passes[mode])

    summary = {mode: {**{k: v for k, v in passes[mode][0].items() if k not in ("seconds", "images_per_s",
                                                                                "megapixels_per_s", "model_seconds")},
                      "images_per_s": median(mode, "images_per_s"), "megapixels_per_s": median(mode, "megapixels_per_s"),
                      "model_share": median(mode, "model_seconds") / median(mode, "seconds"),
                      "passes_images_per_s": [p["images_per_s"] for p in passes[mode]]}
               for mode in passes}
    ratio = summary["fit"]["images_per_s"] / summary["crop"]["images_per_s"]
    results = {
        "setup": {"backbone": "oracle", "upsampler": "jbu (random init, fused op)", "device": args.device,
                  "torch_threads": args.threads,
                  "image_size": args.image_size, "batch_size": args.batch_size, "images": args.images,
                  "samples_per_shard": args.samples_per_shard, "repeat": args.repeat, "quick": args.quick,
                  "aspects_w_h": [list(a) for a in ASPECTS], "inputs": "skimage photos cut to the aspects, 640 px "
                  "longer side, JPEG q90"},
        "crop": summary["crop"], "fit": summary["fit"],
        "fit_over_crop": {"images_per_s": ratio,
                          "megapixels_per_s": summary["fit"]["megapixels_per_s"] / summary["crop"]["megapixels_per_s"],
                          "pixels_per_image": summary["fit"]["pixels_per_image"] / summary["crop"]["pixels_per_image"],
                          "bytes_per_image": summary["fit"]["bytes_per_image"] / summary["crop"]["bytes_per_image"],
                          "target_images_per_s": TARGET, "meets_target": ratio >= TARGET},
    }
    path = harness.write_results("fit", results)
    print(json.dumps(results["fit_over_crop"], indent=2))
    print(f"area kept: crop {summary['crop']['area_kept']:.1%} (min {summary['crop']['area_kept_min']:.1%}), "
          f"fit {summary['fit']['area_kept']:.1%}; bytes/image: crop {summary['crop']['bytes_per_image']:.0f}, "
          f"fit {summary['fit']['bytes_per_image']:.0f}; wrote {path}")
    return results


if __name__ == "__main__":
    main()
