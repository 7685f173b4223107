"""Faults, for real: a worker actor SIGKILLed mid-shard, a driver SIGKILLed mid-run and resumed, and the job
submitted with `ray job submit` to a `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.caching.driver import run_job
from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo_samples
from pipeline.ingest.shard_writer import write_shards
from pipeline.reading.feature_cache import FeatureCache
from pipeline.storage.shards import resolve_shards
from tests.conftest import ROOT, job_head_log, submit_job
from tests.test_job import expected_features, job_config

pytestmark = pytest.mark.slow
PY = sys.executable


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    """16 photographs, 4 per shard."""
    root = tmp_path_factory.mktemp("many")
    write_shards(photo_samples(COLOR_PHOTOS + GRAY_PHOTOS), str(root), samples_per_shard=4, prefix="p")
    return root


def _check_exactly_once_and_equal(out: Path, shard_dir: Path, size: int = 64) -> dict:
    cache = FeatureCache(str(out))
    keys = cache.manifest.column("key").to_pylist()
    assert Counter(keys).most_common(1)[0][1] == 1, "a sample appears twice in the manifest"
    urls = [s.url for s in resolve_shards([f"{shard_dir}/p-*.tar"])]
    expected = expected_features(urls, size)
    assert set(keys) == set(expected)
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)
    # nothing of the failed attempts is left behind
    stored = {f"features/{p.name}" for p in (out / "features").iterdir() if p.is_dir()}
    assert stored == set(cache.manifest.column("features_array").to_pylist())
    return json.loads((out / "run.json").read_text())


def _shard_workers() -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any("ShardWorker" in part for part in (p.info["cmdline"] or [])):
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def test_actor_killed_mid_shard_is_retried(ray_local, many_shards, tmp_path):
    out = tmp_path / "feats.zarr"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            commits = {p.stem for p in (out / "_pipeline" / "commits").glob("*.json")} if out.exists() else set()
            feats = out / "features"
            partial = [p for p in feats.iterdir() if p.is_dir() and p.name.rsplit("_", 1)[0] not in commits
                       and (p / "c").exists()] if feats.exists() else []
            workers = _shard_workers()
            if partial and workers:
                # A shard has rows on storage but no commit: kill every worker, the one writing it included
                # (each actor runs two shards at once, so its process title no longer names the busy method).
                for proc in workers:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    summary = run_job(job_config([f"{many_shards}/p-*.tar"], out, batch_size=1, actors=2, cpus_per_actor=1))
    thread.join(timeout=5)
    assert killed, "the worker was never caught mid-shard"
    assert summary.ok == 16 and not summary.shards_failed
    run = _check_exactly_once_and_equal(out, many_shards)
    commits = [json.loads(p.read_text()) for p in (out / "_pipeline" / "commits").glob("*.json")]
    assert max(c["attempt"] for c in commits) >= 2  # the killed shard was redone
    assert run["counts"]["ok"] == 16


def test_driver_killed_then_resumed(many_shards, tmp_path):
    out = tmp_path / "feats.zarr"
    cmd = [PY, str(ROOT / "jobs" / "upsample_coco.py"), "--input", f"{many_shards}/p-*.tar", "--output", str(out),
           "--backbone", "oracle", "--upsampler", "jbu", "--random-init", "--image-size", "64", "--batch-size", "1"]
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    commits = out / "_pipeline" / "commits"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if commits.exists() and len(list(commits.glob("*.json"))) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be interrupted: " + proc.stderr.read().decode()[-2000:]
    workers = _shard_workers()
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray processes, like a lost machine
    proc.wait()
    # Workers outside the process group notice their node is gone and stop without committing.
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"worker processes outlived their node: {alive}"
    done_before = len(list(commits.glob("*.json")))
    assert 1 <= done_before < 4 and not (out / "manifest.parquet").exists()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = _check_exactly_once_and_equal(out, many_shards)
    assert run["counts"]["shards_skipped_resumed"] == done_before
    assert run["counts"]["ok"] == 16


def test_ray_job_submit_against_a_head_node(ray_head, photo_shards, tmp_path):
    out = tmp_path / "submitted.zarr"
    proc = submit_job(ray_head, [
        "jobs/upsample_coco.py", "--input", f"{photo_shards}/photos-{{000000..000002}}.tar", "--output", str(out),
        "--backbone", "oracle", "--upsampler", "jbu", "--random-init", "--image-size", "64", "--batch-size", "2"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + job_head_log(ray_head.temp_dir)
    assert "succeeded" in proc.stdout + proc.stderr
    assert "connecting to the Ray cluster" in proc.stdout + proc.stderr
    cache = FeatureCache(str(out))
    assert len(cache) == 9
    urls = [s.url for s in resolve_shards([f"{photo_shards}/photos-*.tar"])]
    expected = expected_features(urls)
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)
