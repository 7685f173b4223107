"""Faults, for real: a worker actor SIGKILLed mid-shard, a driver SIGKILLed mid-run and resumed, and the job
submitted with `ray job submit` to a `ray start --head` cluster."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
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
from tests.conftest import ROOT, free_port
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


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head` on 127.0.0.1 with a private token, torn down with its whole process group."""
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(32))
    dash = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    log = open(tmp_path / "ray-start.log", "w")
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PATH=f"{Path(PY).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={free_port()}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # fixed default ports would collide with the local Ray of the other tests: its agent would not start
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    ray_cli = str(Path(PY).parent / "ray")
    deadline = time.time() + 240
    while time.time() < deadline:  # up once it accepts a job: its job agent starts after the job API answers
        probe = subprocess.run([ray_cli, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                               env=env, capture_output=True, timeout=120)
        if probe.returncode == 0:
            break
        assert head.poll() is None, "ray start --head exited: " + (tmp_path / "ray-start.log").read_text()[-2000:]
        time.sleep(2)
    else:
        pytest.fail("the head never accepted a job within 240 s: " + probe.stderr.decode()[-2000:]
                    + _job_head_log(temp_dir))
    yield address, env, temp_dir
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def _job_head_log(temp_dir: str) -> str:
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_JobHead.log"))
    return "\n--- dashboard_JobHead.log ---\n" + logs[-1].read_text()[-3000:] if logs else ""


def test_ray_job_submit_against_a_head_node(ray_head, photo_shards, tmp_path):
    address, env, temp_dir = ray_head
    out = tmp_path / "submitted.zarr"
    submit = [str(Path(PY).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "python", "jobs/upsample_coco.py", "--input", f"{photo_shards}/photos-{{000000..000002}}.tar",
              "--output", str(out), "--backbone", "oracle", "--upsampler", "jbu", "--random-init",
              "--image-size", "64", "--batch-size", "2"]
    for _ in range(3):  # Ray's job head answers "No available agent ..., please try again later" when it is slow
        proc = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode == 0 or "No available agent" not in proc.stderr:
            break
        time.sleep(5)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + _job_head_log(temp_dir)
    assert "succeeded" in proc.stdout + proc.stderr
    assert "connecting to the Ray cluster" in proc.stdout + proc.stderr
    cache = FeatureCache(str(out))
    assert len(cache) == 9
    urls = [s.url for s in resolve_shards([f"{photo_shards}/photos-*.tar"])]
    expected = expected_features(urls)
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)
