"""Storage presets measured: bytes, fidelity, probe mIoU and read speed; and upsamplers compared by a probe.

    python benchmarks/bench_storage.py [--images 32] [--image-size 224]

Part A, presets: the oracle backbone at 384 channels (ViT-S width) with bilinear upsampling, cached once per
preset with oracle labels. Per preset: bytes per image in the store, fidelity against the float32 cache
(mean per-pixel cosine, relative error), mIoU of a linear probe trained on that cache, and read throughput
through FeatureCache. For float16 also the probe's own training rate with the features already in memory,
against the DataLoader rate, to show whether the reader ever bottlenecks train_probe.py.
Part B, upsamplers: oracle (32 channels) cached with bilinear, the shipped trained JBU, and the true features;
a probe on each, against the true-feature ceiling.
Writes benchmarks/results/storage.json and benchmarks/results/storage.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

PRESETS = ("float32", "float16", "bfloat16", "int8", "pca32", "pca96", "lowres")
PRESET_GROUPS = ("features", "scale", "offset", "image", "lowres", "pca")


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _probe(cache, epochs: int, batch_size: int, workers: int) -> dict:
    from pipeline.workflows.probe_on_cache import ProbeJobConfig, run_probe

    return run_probe(ProbeJobConfig(cache=cache.url, epochs=epochs, batch_size=batch_size, workers=workers,
                                    lr=0.05, val_fraction=0.25, classes=8))


def _read_rate(cache, workers: int, batch_size: int, crop: int | None = None) -> float:
    """Steady-state images/s of the training DataLoader: the second pass, after the workers have started."""
    import torch

    from pipeline.reading.feature_cache import LabelledFeatures

    loader = torch.utils.data.DataLoader(LabelledFeatures(cache, crop_size=crop), batch_size=batch_size,
                                         num_workers=workers, shuffle=True, persistent_workers=workers > 0,
                                         prefetch_factor=4 if workers else None)
    for _ in loader:
        pass
    t = time.perf_counter()
    n = sum(f.shape[0] for f, _ in loader)
    return n / (time.perf_counter() - t)


def _train_rate(cache, batch_size: int, crop: int | None = None, steps: int = 20) -> float:
    """Probe optimisation alone: features already in memory, same batches and model as train_probe."""
    import torch
    import torch.nn.functional as F

    from featup_ops.linear_probe import LinearProbe
    from pipeline.reading.feature_cache import LabelledFeatures

    data = LabelledFeatures(cache, cache.keys()[:batch_size], crop_size=crop)
    feats = torch.stack([data[i][0] for i in range(batch_size)]).float()
    labels = torch.stack([data[i][1] for i in range(batch_size)])
    probe = LinearProbe(cache.dim, 8)
    opt = torch.optim.AdamW(probe.parameters(), lr=0.05)
    t = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(probe(feats), labels, ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t)


def _fidelity(ref, cache) -> dict:
    import numpy as np

    cos, num, den = [], 0.0, 0.0
    for key in ref.keys():
        a = np.asarray(ref[key], np.float64)
        b = np.asarray(cache[key], np.float64)
        cos.append(((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-12)).mean())
        num += ((a - b) ** 2).sum()
        den += (a**2).sum()
    return {"cosine": float(np.mean(cos)), "rel_error": float(np.sqrt(num / den))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/featup-bench-storage")
    args = p.parse_args()
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["TQDM_DISABLE"] = "1"
    import shutil

    from bench_pipeline import _samples

    from featup_ops import shipped_oracle_jbu
    from pipeline.caching.driver import run_job
    from pipeline.caching.job_config import JobConfig
    from pipeline.ingest.shard_writer import write_shards
    from pipeline.reading.feature_cache import FeatureCache

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    write_shards(_samples(args.images), str(work / "shards"), samples_per_shard=8, prefix="b")
    inputs = (str(work / "shards" / "b-*.tar"),)
    common = dict(inputs=inputs, image_size=args.image_size, batch_size=4, labels="oracle", overwrite=True,
                  previews=0, pca_samples=min(16, args.images))

    # -- Part A: presets at ViT-S width ---------------------------------------------------------------------
    presets: dict[str, dict] = {}
    caches = {}
    for preset in PRESETS:
        out = work / f"a_{preset}.zarr"
        t = time.perf_counter()
        run_job(JobConfig(output=str(out), backbone="oracle", backbone_options={"dim": 384}, upsampler="bilinear",
                          storage=preset, store_lowres=preset == "lowres", **common))
        caches[preset] = cache = FeatureCache(str(out))
        stored = sum(_du(out / g) for g in PRESET_GROUPS)
        presets[preset] = {"bytes_per_image": stored / len(cache), "cache_seconds": time.perf_counter() - t,
                           "labels_bytes_per_image": _du(out / "labels") / len(cache)}
        print(f"{preset}: {presets[preset]['bytes_per_image'] / 1e6:.2f} MB/image", flush=True)
    f32 = presets["float32"]["bytes_per_image"]
    f16 = presets["float16"]["bytes_per_image"]
    for preset in PRESETS:
        row = presets[preset]
        row.update(_fidelity(caches["float32"], caches[preset]))
        row["fraction_of_float32_bytes"] = row["bytes_per_image"] / f32
        row["float16_bytes_over_this"] = f16 / row["bytes_per_image"]
        row["read_images_per_s"] = _read_rate(caches[preset], 0, args.batch_size)
        metrics = _probe(caches[preset], args.epochs, args.batch_size, args.workers)
        row["probe_miou"], row["probe_pixel_accuracy"] = metrics["miou"], metrics["pixel_accuracy"]
        row["probe_train_images_per_s"] = metrics["train_images_per_s"]
        if preset.startswith("pca"):
            row["explained_variance"] = caches[preset].run["storage"]["explained_variance"]
        print(f"{preset}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}",
              flush=True)

    f16_cache = caches["float16"]
    reader = {
        "full_maps": {"reader_images_per_s": _read_rate(f16_cache, args.workers, args.batch_size),
                      "probe_compute_images_per_s": _train_rate(f16_cache, args.batch_size)},
        "crops_112": {"reader_images_per_s": _read_rate(f16_cache, args.workers, args.batch_size, crop=112),
                      "probe_compute_images_per_s": _train_rate(f16_cache, args.batch_size, crop=112)},
        "dataloader_workers": args.workers,
    }
    for v in (reader["full_maps"], reader["crops_112"]):
        v["reader_over_probe"] = v["reader_images_per_s"] / v["probe_compute_images_per_s"]
    print("reader vs probe:", json.dumps(reader), flush=True)

    # -- Part B: upsamplers, by what a probe recovers --------------------------------------------------------
    upsamplers: dict[str, dict] = {}
    jbu = shipped_oracle_jbu()
    if jbu is None:
        raise SystemExit("featup_ops/weights/oracle_jbu.safetensors is missing: train it with jobs/train_jbu.py")
    for name, kw in {"bilinear": {"upsampler": "bilinear"}, "jbu": {"upsampler": "jbu", "upsampler_weights": jbu},
                     "truth": {"upsampler": "truth"}}.items():
        out = work / f"b_{name}.zarr"
        run_job(JobConfig(output=str(out), backbone="oracle", storage="float16", **kw, **common))
        metrics = _probe(FeatureCache(str(out)), args.epochs, args.batch_size, args.workers)
        upsamplers[name] = {"probe_miou": metrics["miou"], "probe_pixel_accuracy": metrics["pixel_accuracy"]}
        print(f"{name}: {upsamplers[name]}", flush=True)
    ceiling = upsamplers["truth"]["probe_miou"]
    for row in upsamplers.values():
        row["fraction_of_ceiling"] = row["probe_miou"] / ceiling if ceiling else None

    smallest_good = min((p for p in PRESETS if presets[p]["cosine"] >= 0.98), key=lambda p: presets[p]["bytes_per_image"])
    summary = {
        "smallest_preset_with_cosine_0.98": smallest_good,
        "its_fraction_of_float32_bytes": presets[smallest_good]["fraction_of_float32_bytes"],
        "lowres_smaller_than_float16_by": presets["lowres"]["float16_bytes_over_this"],
        "lowres_rel_error_vs_float32": presets["lowres"]["rel_error"],
        "jbu_probe_beats_bilinear": upsamplers["jbu"]["probe_miou"] > upsamplers["bilinear"]["probe_miou"],
        "reader_over_probe_full_maps": reader["full_maps"]["reader_over_probe"],
    }
    result = {"config": vars(args), "part_a_presets": presets, "reader_vs_probe": reader,
              "part_b_upsamplers": upsamplers, "summary": summary,
              "setup": {"part_a": "oracle backbone with 384 channels, bilinear upsampler, oracle labels (8 classes)",
                        "part_b": "oracle backbone (32 channels), float16 storage, oracle labels (8 classes)"}}
    path = harness.write_results("storage", result)
    _plot(presets, upsamplers, harness.RESULTS / "storage.png")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path} and {harness.RESULTS / 'storage.png'}")


def _plot(presets: dict, upsamplers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = list(presets)
    mb = [presets[n]["bytes_per_image"] / 1e6 for n in names]
    axes[0].bar(names, mb, color="#4a7ab5")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("MB per image (log)")
    axes[0].set_title("Stored bytes per image (384 ch, 224 px)")
    for i, v in enumerate(mb):
        axes[0].text(i, v, f"{v:.2g}", ha="center", va="bottom", fontsize=8)
    axes[1].scatter(mb, [presets[n]["cosine"] for n in names], color="#c0504d")
    for n, x in zip(names, mb):
        axes[1].annotate(n, (x, presets[n]["cosine"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    axes[1].set_xscale("log")
    axes[1].axhline(0.98, ls="--", color="grey", lw=0.8)
    axes[1].set_xlabel("MB per image (log)")
    axes[1].set_ylabel("mean cosine vs float32")
    axes[1].set_title("Fidelity against size")
    ups = list(upsamplers)
    axes[2].bar(ups, [upsamplers[u]["probe_miou"] for u in ups], color=["#9bbb59", "#4a7ab5", "#7f7f7f"])
    axes[2].set_ylabel("probe mIoU (oracle labels)")
    axes[2].set_title("Upsamplers: linear probe mIoU (truth = ceiling)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
