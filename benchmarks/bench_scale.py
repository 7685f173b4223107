"""The caching job's bookkeeping at 100 to 10,000 shards, and FeatureCache on a 10,000,000-row manifest.

    python benchmarks/bench_scale.py                       # the full run (see results "took_s" for its length)
    python benchmarks/bench_scale.py --quick               # 20/60-shard runs, resume at 100 and 1,000, 1 M rows

A local S3 server (moto on 127.0.0.1, in this process, counting every request by kind) holds inputs and
outputs; each measured run is a fresh child process (its peak RSS is its own), one actor, the weights-free
`oracle` backbone at 32 px with bilinear upsampling, two tiny images per shard.

(a) fixed cost per shard: two runs of N1 and N2 shards; the steady-state wall time per shard of the larger
    (from its shards' commit times, the first tenth left out) minus the model time per shard (run.json
    compute_s); also the slope of wall time between the two runs (sensitive to start-up noise); S3 requests
    per shard by kind (the slope of the counts between the runs).
(b) resume with every shard committed at 100 / 1,000 / 10,000 shards. The committed state is synthesised:
    one real committed shard's objects (input tar, commit record, manifest part, arrays' zarr.json) copied
    under new shard names straight into the S3 server's store (chunks are left out: no bookkeeping step
    reads them). Three resumes each: "unfinalised" (the worst case: no manifest and no commit index, as
    after a run killed before its first checkpoint: every commit record and part is read), "finished" (the
    rerun of a finished job) and "killed_after_checkpoint" (a run killed after its last commit and commit
    index checkpoint, before its manifest: every part is read, no record).
(c) manifest assembly time (run.json timings.manifest_s of the unfinalised resume) and (d) the driver's
    peak RSS, both at each size.
(e) FeatureCache on a synthetic manifest of 10 M rows (written directly, realistic keys and paths): open
    time and RSS, key lookups per second (one by one, and batched), split time, and the private memory
    (USS) and proportional share (PSS) of forked DataLoader workers after a pass of key lookups spread
    over the whole key range, against the index's size.

The same file runs against older code (`--results scale_before`) so the two JSONs can be compared; the
numbers of the old code are embedded with `--baseline benchmarks/results/scale_before.json`.
JSON: benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import harness  # noqa: E402

BUCKET_IN, BUCKET_OUT = "scale-in", "scale-out"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
IMAGE_PX = 48  # the tiny images' side; the job crops them to 32 px


def _mb(n: float) -> float:
    return round(n / 2**20, 1)


# -- child processes ----------------------------------------------------------------------------------------------
def child_job(args: argparse.Namespace) -> dict:
    """One run of the caching job in this (fresh) process: wall time, peak RSS, run.json."""
    from pipeline.caching.driver import run_job
    from pipeline.caching.job_config import JobConfig
    from pipeline.storage.filesystems import filesystem

    config = JobConfig(inputs=(args.inputs,), output=args.output, backbone="oracle", upsampler="bilinear",
                       random_init=True, image_size=32, batch_size=2, decode_threads=1, actors=1, previews=0)
    start = time.perf_counter()
    run_job(config)
    wall = time.perf_counter() - start
    fs, root = filesystem(args.output)
    run = json.loads(fs.cat_file(f"{root}/run.json"))
    size = fs.info(f"{root}/manifest.parquet")["size"]
    return {"wall_s": round(wall, 3), "peak_rss_mb": _mb(harness.peak_rss()), "timings": run["timings"],
            "counts": run["counts"], "manifest_bytes": size}


def _uss_pss(pids: list[int]) -> list[dict]:
    import psutil

    out = []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        out.append({"uss_mb": _mb(info.uss), "pss_mb": _mb(info.pss), "rss_mb": _mb(info.rss)})
    return out


class _KeyLookups:
    """A torch Dataset whose items look keys up by key: what a training loop indexing by key does."""

    def __init__(self, cache, keys):
        self.cache, self.keys = cache, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> int:
        return self.cache.position(self.keys[i])


def child_reader(args: argparse.Namespace) -> dict:
    """FeatureCache on the synthetic manifest: open, lookups, split, forked workers' memory."""
    import numpy as np
    import psutil
    import torch

    from pipeline.reading.feature_cache import FeatureCache, LabelledFeatures

    baseline = harness.reset_peak_rss()
    start = time.perf_counter()
    cache = FeatureCache(args.cache)
    open_s = time.perf_counter() - start
    out = {"rows": len(cache), "open_s": round(open_s, 3), "baseline_rss_mb": _mb(baseline),
           "rss_after_open_mb": _mb(psutil.Process().memory_info().rss), "peak_rss_open_mb": _mb(harness.peak_rss())}
    index = getattr(cache, "_index", None)
    if index is not None and hasattr(index, "packed"):  # what forked workers share: the index and the columns
        arrays = [cache._name_code, cache._rows, cache._has_labels, cache._has_lowres]
        out["index_mb"] = _mb(sum(a.nbytes for a in arrays) + index.nbytes)
    rng = np.random.default_rng(0)
    probe = rng.integers(0, len(cache), size=args.lookups)
    key_of = getattr(cache, "key", None)
    all_keys = None if key_of is not None else cache.keys()  # older code: keys() is its list
    queries = [key_of(int(i)) if key_of is not None else all_keys[int(i)] for i in probe]
    start = time.perf_counter()
    found = [cache.position(k) for k in queries]
    out["lookups_per_s"] = round(len(queries) / (time.perf_counter() - start))
    if key_of is not None:
        assert all(key_of(p) == k for p, k in zip(found[:1000], queries[:1000]))
    if hasattr(cache, "positions"):
        start = time.perf_counter()
        cache.positions(queries)
        out["batched_lookups_per_s"] = round(len(queries) / (time.perf_counter() - start))
    start = time.perf_counter()
    train, val = cache.split(0.2)
    out["split_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    LabelledFeatures(cache, train)
    out["labelled_features_s"] = round(time.perf_counter() - start, 3)
    out["rss_after_split_mb"] = _mb(psutil.Process().memory_info().rss)
    del train, val
    # forked workers looking keys up across the whole range: the index pages are read, never written
    spread = np.array([key_of(int(i)) if key_of is not None else all_keys[int(i)]  # numpy: no shared str objects
                       for i in np.linspace(0, len(cache) - 1, args.worker_lookups).astype(np.int64)])
    loader = torch.utils.data.DataLoader(_KeyLookups(cache, spread), batch_size=4096, num_workers=2,
                                         multiprocessing_context="fork", persistent_workers=True)
    start = time.perf_counter()
    for _ in loader:
        pass
    out["worker_lookups_s"] = round(time.perf_counter() - start, 3)
    pids = [w.pid for w in loader._iterator._workers]
    out["workers"] = _uss_pss(pids)
    out["workers_lookups"] = args.worker_lookups
    # and workers reading features through LabelledFeatures (the shards whose arrays exist)
    readable = LabelledFeatures(cache, [key_of(i) if key_of else all_keys[i] for i in range(args.readable)])
    loader = torch.utils.data.DataLoader(readable, batch_size=64, num_workers=2, shuffle=True,
                                         multiprocessing_context="fork", persistent_workers=True)
    start = time.perf_counter()
    batches = sum(1 for _ in loader)
    out["reader_workers"] = {"samples": len(readable), "batches": batches,
                             "seconds": round(time.perf_counter() - start, 3),
                             "memory": _uss_pss([w.pid for w in loader._iterator._workers])}
    out["peak_rss_mb"] = _mb(harness.peak_rss())
    return out


# -- the S3 server and the data -------------------------------------------------------------------------------------
def _tiny_samples(n_shards: int, offset: int = 0):
    """Two distinct tiny JPEGs per shard (crops of the shipped photographs)."""
    import numpy as np
    from PIL import Image

    from pipeline.ingest.sample_photos import COLOR_PHOTOS, encode, photo

    bases = [np.asarray(Image.fromarray(photo(name)).resize((160, 160))) for name in COLOR_PHOTOS]
    for i in range(2 * n_shards):
        base = bases[i % len(bases)]
        y, x = (7 * i) % 100, (13 * i) % 100
        crop = np.ascontiguousarray(base[y:y + IMAGE_PX, x:x + IMAGE_PX])
        yield {"__key__": f"img{offset + i:07d}", "jpg": encode(crop)}


def _write_inputs(fs, folder: str, n_shards: int) -> str:
    from pipeline.ingest.shard_writer import write_shards

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(_tiny_samples(n_shards), tmp, samples_per_shard=2, prefix="b")
        fs.put(f"{tmp}/", f"{BUCKET_IN}/{folder}/", recursive=True)
    return f"s3://{BUCKET_IN}/{folder}/b-{{000000..{n_shards - 1:06d}}}.tar"


def _backend():
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]


def synthesise(fs, template_in: str, template_out: str, folder: str, n_shards: int) -> str:
    """A fully committed output of `n_shards` shards, copied from the one committed shard of `template_out`
    straight into the S3 server's store; returns the input pattern."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    backend = _backend()
    tar = fs.cat_file(f"{BUCKET_IN}/{template_in}/b-000000.tar")
    src = f"{BUCKET_OUT}/{template_out}"
    objects = {p.removeprefix(f"{BUCKET_OUT}/"): fs.cat_file(p) for p in fs.find(src)}
    old_in, new_in = f"{BUCKET_IN}/{template_in}/", f"{BUCKET_IN}/{folder}/in/"
    old_out, new_out = f"{template_out}/", f"{folder}/out.zarr/"
    commit = next(k for k in objects if "/_pipeline/commits/" in k)
    part_key = next(k for k in objects if "/_pipeline/parts/" in k)
    part = pq.read_table(io.BytesIO(objects[part_key]))
    shared = {k: v for k, v in objects.items() if "b-000000" not in k and "/_pipeline/commit" not in k
              and not k.endswith(("manifest.parquet", "run.json", "lease.json", "commit_index.parquet"))}
    for key, data in shared.items():  # the root and group metadata, job.json
        backend.put_object(BUCKET_OUT, new_out + key.removeprefix(old_out), data)
    per_shard = {k: v for k, v in objects.items() if "b-000000" in k and "/c/" not in k and k not in (commit, part_key)}
    for i in range(n_shards):
        sid = f"b-{i:06d}"
        backend.put_object(BUCKET_IN, f"{folder}/in/{sid}.tar", tar)
        text = objects[commit].decode().replace(old_in, new_in).replace(old_out, new_out).replace("b-000000", sid)
        backend.put_object(BUCKET_OUT, new_out + f"_pipeline/commits/{sid}.json", text.encode())
        columns = {}
        for name in part.column_names:
            col = part.column(name)
            if pa.types.is_string(col.type):
                col = pc.replace_substring(pc.replace_substring(col, "b-000000", sid), old_in, new_in)
                if name == "key":
                    col = pc.binary_join_element_wise(sid, col, "/")
            columns[name] = col
        buf = io.BytesIO()
        pq.write_table(pa.table(columns, schema=part.schema), buf)
        backend.put_object(BUCKET_OUT, new_out + part_key.removeprefix(old_out).replace("b-000000", sid),
                           buf.getvalue())
        for key, data in per_shard.items():
            backend.put_object(BUCKET_OUT, new_out + key.removeprefix(old_out).replace("b-000000", sid), data)
    index = {"shards": [{"name": f"b-{i:06d}.tar", "samples": part.num_rows} for i in range(n_shards)]}
    backend.put_object(BUCKET_IN, f"{folder}/in/index.json", json.dumps(index).encode())
    return f"s3://{BUCKET_IN}/{folder}/in/b-{{000000..{n_shards - 1:06d}}}.tar"


def write_big_manifest(root: Path, rows: int, per_shard: int = 1000, readable_shards: int = 4) -> str:
    """A finished-looking float16 cache of `rows` samples: manifest.parquet written directly (COCO-like
    12-digit keys in shuffled order, one array per shard of `per_shard` rows, the last of each an error),
    run.json, and real arrays for the first `readable_shards` shards."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    import zarr

    from pipeline.caching import manifest
    from pipeline.caching.output_store import OutputStore

    url = str(root / "big.zarr")
    store = OutputStore(url)
    store.prepare({"bench": rows}, overwrite=False)
    rng = np.random.default_rng(0)
    ids = rng.permutation(rows * 5)[:rows]  # unique COCO-like image ids
    dim, hw = 8, (16, 16)
    with pq.ParquetWriter(str(root / "big.zarr" / "manifest.parquet"), manifest.SCHEMA,  # as the job writes it
                          use_dictionary=[n for n in manifest.SCHEMA.names if n != "key"]) as writer:
        for lo in range(0, rows, 1_000_000):
            hi = min(lo + 1_000_000, rows)
            n = hi - lo
            at = np.arange(lo, hi)
            shard = at // per_shard
            shard_names = pa.array([f"train-{s:06d}" for s in range(shard[0], shard[-1] + 1)])
            names = pc.take(shard_names, pa.array(shard - shard[0]))
            error = at % per_shard == per_shard - 1  # the last sample of each shard failed
            ok = pa.array(~error)
            array = pc.if_else(ok, pc.binary_join_element_wise("features/", names, "_1a2b3c4d", ""), None)
            columns = {
                "key": pc.utf8_lpad(pc.cast(pa.array(ids[lo:hi]), pa.string()), 12, "0"),
                "shard": names,
                "source": pc.binary_join_element_wise("s3://bucket/coco/", names, ".tar", ""),
                "sample_index": pa.array((at % per_shard).astype(np.int32)),
                "status": pc.if_else(ok, "ok", "error"),
                "error": pc.if_else(ok, None, "not an image: cannot identify image file"),
                "storage": pc.if_else(ok, "float16", None),
                "features_array": array, "lowres_array": pa.nulls(n, pa.string()),
                "labels_array": pa.nulls(n, pa.string()),
                "index": pc.if_else(ok, pa.array((at % per_shard).astype(np.int32)), None),  # errors come last
            }
            for name in ("feature_height", "feature_width", "crop_size", "crop_height", "crop_width"):
                columns[name] = pc.if_else(ok, pa.scalar(16, pa.int32()), pa.scalar(None, pa.int32()))
            for name, value in (("orig_height", 480), ("orig_width", 640), ("exif_orientation", 1),
                                ("resized_height", 16), ("resized_width", 21), ("crop_top", 0), ("crop_left", 2)):
                columns[name] = pc.if_else(ok, pa.scalar(value, pa.int32()), pa.scalar(None, pa.int32()))
            columns["orig_mode"] = pc.if_else(ok, "RGB", None)
            columns["resize"] = pc.if_else(ok, "crop", None)
            for name, value in (("scale_y", 16 / 480), ("scale_x", 21 / 640)):
                columns[name] = pc.if_else(ok, pa.scalar(value, pa.float64()), pa.scalar(None, pa.float64()))
            writer.write_table(pa.table(columns, schema=manifest.SCHEMA), row_group_size=65_536)
    # the rows of the first shards point at real arrays (plain zarr: the same for any version of the reader)
    for s in range(readable_shards):
        data = np.random.default_rng(s).standard_normal((per_shard - 1, dim, *hw)).astype(np.float16)
        zarr.create_array(f"{url}/features/train-{s:06d}_1a2b3c4d", data=data, chunks=(1, dim, *hw))
    store.put_json("run.json", {"settings": {"storage": "float16", "dim": dim, "output_size": list(hw),
                                             "image_size": 16}, "model": {"lowres_size": [1, 1]}})
    return url


# -- the measurements -------------------------------------------------------------------------------------------------
def _child(mode: str, env: dict, *args: str, timeout: float = 3600) -> dict:
    import subprocess

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=harness.ROOT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _per_shard(counts: dict[str, int], shards: int) -> dict[str, float]:
    return {k: round(v / shards, 2) for k, v in sorted(counts.items())}


def _steady_state(fs, output: str, warmup: int) -> float:
    """Seconds per shard once the run is under way: from the commit times of its shards, the first `warmup`
    left out (Ray, the actor and the model starting are not per-shard costs)."""
    folder = f"{output.removeprefix('s3://')}/_pipeline/commits"
    times = sorted(json.loads(data)["committed_at"] for data in fs.cat(fs.ls(folder)).values())
    return (times[-1] - times[warmup]) / (len(times) - 1 - warmup)


def measure_fixed_cost(server, fs, env: dict, sizes: tuple[int, int]) -> dict:
    from tests.s3_request_counter import difference

    runs = []
    for n in sizes:
        pattern = _write_inputs(fs, f"fixed-{n}", n)
        output = f"s3://{BUCKET_OUT}/fixed-{n}/out.zarr"
        before = server.counts()
        result = _child("job", env, "--inputs", pattern, "--output", output)
        result["requests"] = difference(server.counts(), before)
        result["shards"] = n
        result["steady_state_ms_per_shard"] = round(1000 * _steady_state(fs, output, warmup=max(2, n // 10)), 1)
        runs.append(result)
        print(f"  {n} shards: {result['wall_s']:.1f} s, steady state {result['steady_state_ms_per_shard']} ms/shard, "
              f"compute {result['timings']['compute_s']:.2f} s, {sum(result['requests'].values())} requests", flush=True)
    (a, b) = runs
    slope = (b["wall_s"] - a["wall_s"]) / (b["shards"] - a["shards"])
    compute_per_shard = b["timings"]["compute_s"] / b["shards"]
    diff = {k: b["requests"].get(k, 0) - a["requests"].get(k, 0) for k in set(a["requests"]) | set(b["requests"])}
    per_shard = _per_shard({k: v for k, v in diff.items() if v}, b["shards"] - a["shards"])
    return {"runs": runs, "model_per_shard_ms": round(1000 * compute_per_shard, 1),
            "fixed_cost_per_shard_ms": round(b["steady_state_ms_per_shard"] - 1000 * compute_per_shard, 1),
            "fixed_cost_note": "steady-state wall time per shard of the larger run (from its shards' commit times, "
                               "the first tenth left out) minus the model's time per shard; one actor, two shards "
                               "in flight",
            "wall_per_shard_slope_ms": round(1000 * slope, 1),
            "requests_per_shard": per_shard, "requests_per_shard_total": round(sum(per_shard.values()), 2)}


def _as_if_killed_after_checkpoint(output: str) -> bool:
    """Turns a finished output into one whose run was killed after its last commit and checkpoint, before its
    manifest: the commit index as the last checkpoint wrote it, no manifest. False for code without one."""
    try:
        from pipeline.caching.commit_log import CommitLog
    except ImportError:
        return False
    from pipeline.caching.output_store import MANIFEST_NAME, OutputStore

    store = OutputStore(f"s3://{BUCKET_OUT}/{output}")
    log = CommitLog(store)
    log.write_index(log.read_index().commits.values())  # a checkpoint claims no manifest
    store.fs.rm(store.path(MANIFEST_NAME))
    return True


def measure_resume(server, fs, env: dict, sizes: list[int], template: tuple[str, str]) -> list[dict]:
    from tests.s3_request_counter import difference

    out = []
    for n in sizes:
        start = time.perf_counter()
        pattern = synthesise(fs, *template, f"resume-{n}", n)
        entry = {"shards": n, "synthesised_s": round(time.perf_counter() - start, 1)}
        for phase in ("unfinalised", "finished", "killed_after_checkpoint"):
            if phase == "killed_after_checkpoint" and not _as_if_killed_after_checkpoint(f"resume-{n}/out.zarr"):
                continue  # code without a commit index
            before = server.counts()
            result = _child("job", env, "--inputs", pattern, "--output", f"s3://{BUCKET_OUT}/resume-{n}/out.zarr")
            requests = difference(server.counts(), before)
            entry[phase] = {"wall_s": result["wall_s"], "peak_rss_mb": result["peak_rss_mb"],
                            "manifest_s": result["timings"].get("manifest_s"),
                            "manifest_mb": _mb(result["manifest_bytes"]),
                            "skipped": result["counts"]["shards_skipped_resumed"],
                            "requests_total": sum(requests.values()), "requests": requests}
            print(f"  resume {n} shards ({phase}): {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']} MB, "
                  f"{sum(requests.values())} requests", flush=True)
        out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["job", "reader"])
    p.add_argument("--inputs")
    p.add_argument("--output")
    p.add_argument("--cache")
    p.add_argument("--lookups", type=int, default=100_000)
    p.add_argument("--worker-lookups", type=int, default=400_000)
    p.add_argument("--readable", type=int, default=3000)
    p.add_argument("--quick", action="store_true", help="smaller sizes (a check that it all works)")
    p.add_argument("--fixed", type=int, nargs=2, default=None, help="shard counts of the two fixed-cost runs")
    p.add_argument("--resume", type=int, nargs="*", default=None, help="shard counts of the resume runs")
    p.add_argument("--rows", type=int, default=None, help="rows of the synthetic manifest")
    p.add_argument("--skip", nargs="*", default=[], choices=["fixed", "resume", "reader"])
    p.add_argument("--results", default="scale", help="name of the results JSON")
    p.add_argument("--baseline", help="results JSON of the old code, embedded as 'before'")
    p.add_argument("--work-dir", default=None, help="where the synthetic cache goes (default: a temp dir)")
    args = p.parse_args()

    if args.child:
        result = child_job(args) if args.child == "job" else child_reader(args)
        print(json.dumps(result))
        return

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    fixed = tuple(args.fixed or ((20, 60) if args.quick else (50, 250)))
    resume_sizes = args.resume if args.resume is not None else ([100, 1000] if args.quick else [100, 1000, 10000])
    rows = args.rows or (1_000_000 if args.quick else 10_000_000)
    began = time.perf_counter()

    import s3fs

    from tests.conftest import free_port
    from tests.s3_request_counter import CountingS3Server

    server = CountingS3Server(free_port()).start()
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(harness.ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    os.environ.update({**CREDENTIALS, "AWS_ENDPOINT_URL": server.endpoint})
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    fs.mkdir(BUCKET_IN)
    fs.mkdir(BUCKET_OUT)
    results: dict = {"setup": {"model": "oracle backbone, bilinear, 32 px, float16 with low-res and labels arrays",
                               "images_per_shard": 2, "image_px": IMAGE_PX, "actors": 1, "s3": "moto (in the "
                               "benchmark process) on 127.0.0.1; each run a fresh child process", "quick": args.quick}}
    try:
        if "fixed" not in args.skip:
            print(f"(a) fixed cost per shard: {fixed[0]} and {fixed[1]} shards", flush=True)
            results["fixed_cost"] = measure_fixed_cost(server, fs, env, fixed)
        if "resume" not in args.skip:
            print(f"(b-d) resume, manifest, driver RSS at {resume_sizes} shards", flush=True)
            pattern = _write_inputs(fs, "template", 1)
            _child("job", env, "--inputs", pattern, "--output", f"s3://{BUCKET_OUT}/template/out.zarr")
            results["resume"] = measure_resume(server, fs, env, resume_sizes, ("template", "template/out.zarr"))
            results["resume_note"] = ("committed state synthesised: one real committed shard's objects copied under "
                                      "new names into the S3 server's store (no chunks); 'unfinalised' = first "
                                      "rerun (no manifest or commit index yet: every record and part is read), "
                                      "'finished' = the rerun after it, 'killed_after_checkpoint' = the manifest "
                                      "removed and the commit index left as a checkpoint (every part is read)")
    finally:
        server.stop()
    if "reader" not in args.skip:
        print(f"(e) FeatureCache on {rows:,} rows", flush=True)
        with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
            start = time.perf_counter()
            url = write_big_manifest(Path(tmp), rows)
            written = time.perf_counter() - start
            reader = _child("reader", env, "--cache", url, "--lookups", str(min(args.lookups, rows)),
                            "--worker-lookups", str(min(args.worker_lookups, rows)))
            reader["manifest_mb"] = _mb((Path(url) / "manifest.parquet").stat().st_size)
            reader["manifest_written_s"] = round(written, 1)
            results["reader"] = reader
            print(f"  open {reader['open_s']} s, RSS after open {reader['rss_after_open_mb']} MB, "
                  f"{reader['lookups_per_s']} lookups/s, workers {reader['workers']}", flush=True)
    if args.baseline:
        results["before"] = json.loads(Path(args.baseline).read_text())
    results["took_s"] = round(time.perf_counter() - began, 1)
    path = harness.write_results(args.results, results)
    print(f"wrote {path} ({results['took_s']} s)")


if __name__ == "__main__":
    main()
