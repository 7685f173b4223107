"""Data-plane cost per image: CPU-seconds spent outside the model, per storage preset.

    python benchmarks/bench_dataplane.py [--images 64] [--dims 192 384] [--targets disk s3] [--quick]

The figure that says how many CPU cores a GPU node needs. COCO-like inputs (real photographs resized to a
640 px longer side, JPEG quality 90) are cached at 224 px with a trivial model: the `oracle` backbone at
`--dims` channels and the bilinear upsampler. Each (target, width, preset) runs in a fresh child process
that does what a worker actor does, without Ray: one `ShardProcessor` (torch on one thread) processes a
warm-up shard, then the measured shards (stream the tar, decode, resize/crop, compute, encode, compress,
write, commit). The process's CPU time (all threads: reader, decode pool, writer, zarr's codec threads,
s3fs's event loop) over the measured shards, minus the CPU time of the model (thread CPU time around each
forward pass, which runs on the calling thread), divided by the images, is the data plane's CPU cost per
image, i.e. milliseconds of one core. Targets: `disk` (local files) and `s3` (a moto server in its own
process on 127.0.0.1, so its CPU is not counted; shards are read from it and features written to it).

Per preset it also reports the parts measured inside the same run (thread CPU time): decode + resize/crop
(decode pool), the preset's tensor arithmetic (`Preset.encode`, which a GPU node runs on the device), and
the rest (stream, compress, write, commit); and stored bytes per image, with the ratio float16 / this.
Part B measures the lowres preset's stored guidance image: bytes per image for the codecs considered and
the cosine of the re-upsampled features (the shipped oracle JBU) to the eager ones.
Writes benchmarks/results/dataplane.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

PRESETS = ("float16", "bfloat16", "float32", "int8", "pca32", "lowres")
PER_IMAGE_GROUPS = ("features", "scale", "offset", "image", "lowres")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def coco_like_samples(n: int, long_side: int = 640, quality: int = 90):
    """n distinct WebDataset samples like COCO's: photographs resized to a `long_side` px longer side, JPEG."""
    import numpy as np
    from PIL import Image

    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, encode, photo

    names = COLOR_PHOTOS + GRAY_PHOTOS
    for i in range(n):
        arr = photo(names[i % len(names)])
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        variant = i // len(names)
        if variant % 2:
            arr = arr[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(arr))
        scale = long_side / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        yield {"__key__": f"img{i:05d}", "jpg": encode(np.asarray(img), quality=quality)}


def _cpu() -> float:
    """CPU seconds of this process so far, all threads, user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _ThreadClock:
    """Wraps a method to add up the calling thread's CPU time spent inside it (thread-safe enough: GIL)."""

    def __init__(self, owner, name: str):
        self.seconds = 0.0
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t

        setattr(owner, name, timed)


def _du(fs, path: str) -> int:
    return fs.du(path, total=True) if fs.exists(path) else 0


def _py_spy(path: str) -> subprocess.Popen:
    """py-spy sampling this process (all threads, native frames) into collapsed stacks at `path`."""
    exe = Path(sys.executable).with_name("py-spy")
    proc = subprocess.Popen([str(exe), "record", "--pid", str(os.getpid()), "--native", "--rate", "250",
                             "--format", "raw", "--output", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # attached
    return proc


def child(args: argparse.Namespace) -> dict:
    """One (target, dim, preset) measurement in this fresh process."""
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    from pipeline.caching import shard_processor as sp
    from pipeline.caching.driver import prepare
    from pipeline.caching.job_config import JobConfig
    from pipeline.caching.presets import Preset, pca_components
    from pipeline.caching.shard_processor import ShardProcessor, ShardTask

    torch.set_num_threads(1)
    config = JobConfig(inputs=(args.inputs,), output=args.output, backbone="oracle", backbone_options={"dim": args.dim},
                       upsampler="bilinear", storage=args.preset, image_size=args.image_size, labels="none",
                       previews=0, batch_size=args.batch_size, decode_threads=args.decode_threads, overwrite=True,
                       pca_samples=16)
    run = prepare(config)
    run.lease.release()  # the driver's heartbeat thread is not the worker's cost
    processor = ShardProcessor(config, device="cpu", torch_threads=1)
    k = pca_components(config.storage_preset)
    if k is not None:
        mean, comps, explained, pixels = processor.fit_pca(run.pending, config.pca_samples, k)
        run.store.write_pca(mean, comps, explained, pixels)
    warm, measured = run.pending[:1], run.pending[1:]
    for shard in warm:
        processor.process(ShardTask(shard))
    model = _ThreadClock(processor, "_compute")
    decode = _ThreadClock(sp._Stream, "_decode")
    encode = _ThreadClock(Preset, "encode")
    spy = _py_spy(args.profile) if args.profile else None
    cpu0, wall0 = _cpu(), time.perf_counter()
    images = 0
    for shard in measured:
        images += processor.process(ShardTask(shard)).ok
    cpu, wall = _cpu() - cpu0, time.perf_counter() - wall0
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)
    fs = run.store.fs
    stored = sum(_du(fs, run.store.path(g)) for g in PER_IMAGE_GROUPS)
    n_all = images + sum(s.expected_samples or 0 for s in warm)
    outside = cpu - model.seconds
    return {
        "images": images, "cpu_s": cpu, "model_cpu_s": model.seconds, "wall_s": wall,
        "dataplane_ms_per_image": 1e3 * outside / images,
        "decode_resize_ms_per_image": 1e3 * decode.seconds / images,
        "preset_arithmetic_ms_per_image": 1e3 * encode.seconds / images,
        "stream_compress_write_commit_ms_per_image": 1e3 * (outside - decode.seconds - encode.seconds) / images,
        "model_ms_per_image": 1e3 * model.seconds / images,
        "images_per_s_wall": images / wall,
        "bytes_per_image": stored / n_all,
    }


def image_codecs(size: int) -> dict:
    """Part B: the lowres preset's guidance image under candidate codecs, on the shipped photographs: bytes,
    encode/decode CPU time, and the cosine of the shipped oracle JBU re-run on float16 low-res features with
    the decoded image, to the eager float32 features (per-pixel cosine: mean, worst image's mean, 0.1% pixel)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from featup_ops import FeatureModel, shipped_oracle_jbu
    from pipeline.caching.presets import IMAGE_CODEC
    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo
    from pipeline.storage.images import resize_and_crop

    model = FeatureModel.create("oracle", "jbu", upsampler_weights=shipped_oracle_jbu()).eval()
    images = []
    for name in COLOR_PHOTOS + GRAY_PHOTOS:
        arr = photo(name)
        images.append(resize_and_crop(np.stack([arr] * 3, -1) if arr.ndim == 2 else arr, size)[0])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        lowres, eager = model(x)
    lowres = lowres.half().float()  # what the preset stores
    shipped = {k.lower(): v for k, v in IMAGE_CODEC.items()}
    candidates = {"raw (before)": None, "png": {"format": "PNG"},
                  "webp lossless": {"format": "WEBP", "lossless": True, "quality": 0, "method": 0},
                  "jpeg q90 4:4:4": {"format": "JPEG", "quality": 90, "subsampling": 0},
                  "jpeg q95 4:2:0": {"format": "JPEG", "quality": 95},
                  f"jpeg q{shipped['quality']} 4:4:4 (shipped)": shipped,
                  "jpeg q98 4:4:4": {"format": "JPEG", "quality": 98, "subsampling": 0},
                  "webp q95": {"format": "WEBP", "quality": 95, "method": 0}}
    out = {}
    for name, kw in candidates.items():
        t = time.process_time()
        blobs = [img.tobytes() if kw is None else _save(img, kw) for img in images]
        enc = (time.process_time() - t) / len(images)
        t = time.process_time()
        decoded = images if kw is None else [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs]
        dec = (time.process_time() - t) / len(images)
        xd = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            replay = model.upsampler(lowres, model.guidance(xd))
        cos = torch.nn.functional.cosine_similarity(replay, eager, dim=1)
        out[name] = {"bytes_per_image": float(np.mean([len(b) for b in blobs])), "encode_ms": 1e3 * enc,
                     "decode_ms": 1e3 * dec, "cosine_mean": float(cos.mean()),
                     "cosine_worst_image": float(cos.mean((1, 2)).min()),
                     "cosine_pixel_p0.1": float(cos.flatten().quantile(0.001))}
        print(f"image codec {name}: " + json.dumps({k: round(v, 5) for k, v in out[name].items()}), flush=True)
    return out


def _save(img, kw: dict) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, **kw)
    return buf.getvalue()


def _moto(port: int) -> subprocess.Popen:
    """A moto S3 server in its own process (its CPU is not the data plane's)."""
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto_server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=64, help="measured images per run (plus one warm-up shard)")
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--dims", type=int, nargs="+", default=[192, 384])
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    p.add_argument("--targets", nargs="+", default=["disk", "s3"], choices=["disk", "s3"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--decode-threads", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/featup-bench-dataplane")
    p.add_argument("--quick", action="store_true", help="16 measured images, 192 channels only (a smoke run)")
    p.add_argument("--profile", help="folder for py-spy collapsed stacks of each run's measured shards")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.quick:
        args.images, args.dims = 16, [192]
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from pipeline.ingest.shard_writer import write_shards

    t_start = time.perf_counter()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    write_shards(coco_like_samples(args.images + args.per_shard), str(work / "shards"),
                 samples_per_shard=args.per_shard, prefix="d")
    moto = None
    inputs = {"disk": str(work / "shards" / "d-*.tar")}
    if "s3" in args.targets:
        port = _free_port()
        moto = _moto(port)
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        fs.mkdir("bench")
        fs.put(str(work / "shards") + "/", "bench/shards/", recursive=True)
        inputs["s3"] = "s3://bench/shards/d-*.tar"
    runs: dict = {}
    try:
        for target in args.targets:
            for dim in args.dims:
                for preset in args.presets:
                    out = (f"s3://bench/out/{dim}_{preset}.zarr" if target == "s3"
                           else str(work / "out" / f"{dim}_{preset}.zarr"))
                    extra = []
                    if args.profile:
                        Path(args.profile).mkdir(parents=True, exist_ok=True)
                        extra = ["--profile", str(Path(args.profile).resolve() / f"{target}_{dim}_{preset}.txt")]
                    row = harness.run_child(Path(__file__), "--inputs", inputs[target], "--output", out,
                                            "--dim", str(dim), "--preset", preset, "--image-size",
                                            str(args.image_size), "--batch-size", str(args.batch_size),
                                            "--decode-threads", str(args.decode_threads), *extra)
                    runs.setdefault(target, {}).setdefault(str(dim), {})[preset] = row
                    print(f"{target} C={dim} {preset}: " + json.dumps(
                        {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
    for dims in runs.values():
        for rows in dims.values():
            f16 = rows.get("float16", {}).get("bytes_per_image")
            for row in rows.values():
                if f16 and row.get("bytes_per_image"):
                    row["float16_bytes_over_this"] = f16 / row["bytes_per_image"]
    codecs = image_codecs(args.image_size)
    lowres_ratio = {d: rows["lowres"]["float16_bytes_over_this"] for dims in runs.values() for d, rows in dims.items()
                    if "float16_bytes_over_this" in rows.get("lowres", {})}
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("child", "inputs", "output", "dim", "preset")},
              "setup": "oracle backbone + bilinear upsampler (trivial model), one ShardProcessor per run without Ray, "
                       "torch on 1 thread, COCO-like JPEGs (640 px longer side, quality 90), labels none, low-res "
                       "features stored (the job's default)",
              "runs": runs, "lowres_image_codecs": codecs,
              "summary": {"lowres_float16_bytes_over_lowres_by_dim": lowres_ratio,
                          "dataplane_ms_per_image": {f"{t}/{d}/{pr}": round(row["dataplane_ms_per_image"], 2)
                                                     for t, dims in runs.items() for d, rs in dims.items()
                                                     for pr, row in rs.items() if "dataplane_ms_per_image" in row}},
              "seconds": time.perf_counter() - t_start}
    path = harness.write_results("dataplane", result)
    rows = [{"target": t, "dim": d, "preset": pr, **{k: (f"{v:.1f}" if isinstance(v, float) else v)
                                                    for k, v in row.items() if k in (
                                                        "dataplane_ms_per_image", "decode_resize_ms_per_image",
                                                        "preset_arithmetic_ms_per_image",
                                                        "stream_compress_write_commit_ms_per_image",
                                                        "float16_bytes_over_this")}}
            for t, dims in runs.items() for d, rs in dims.items() for pr, row in rs.items()]
    print(harness.table(rows, ["target", "dim", "preset", "dataplane_ms_per_image", "decode_resize_ms_per_image",
                               "preset_arithmetic_ms_per_image", "stream_compress_write_commit_ms_per_image",
                               "float16_bytes_over_this"]))
    print(f"wrote {path} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
