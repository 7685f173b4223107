"""Cluster faults, for real: a multi-node Ray cluster on 127.0.0.1 gains a node and loses one while the caching job
runs (tests/cluster_scenario.py, in its own process so that no other Ray shares it). Worker nodes declare one GPU
each, so actors are placed one per node; without a real GPU they cannot see theirs and compute on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo_samples
from pipeline.ingest.shard_writer import write_shards
from pipeline.reading.feature_cache import FeatureCache
from pipeline.storage.shards import resolve_shards
from tests.conftest import ROOT
from tests.test_job import expected_features

pytestmark = pytest.mark.slow
GPU_WARNING = "by Ray, but torch sees no CUDA device"


def test_nodes_join_and_leave_mid_job(tmp_path):
    shards = tmp_path / "shards"
    write_shards(photo_samples((COLOR_PHOTOS + GRAY_PHOTOS)[:12]), str(shards), samples_per_shard=1, prefix="c")
    out, report_path = tmp_path / "feats.zarr", tmp_path / "report.json"
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.cluster_scenario", "--input", f"{shards}/c-*.tar",
                           "--output", str(out), "--report", str(report_path)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    try:
        assert proc.returncode == 0 and "summary" in report, (report, proc.stderr[-4000:])
        logs = {int(p.stem.rsplit("-", 1)[1]): p.read_text() for p in
                Path(report["temp_dir"]).glob("session_*/logs/worker-*.err") if not p.parent.parent.is_symlink()}
    finally:
        shutil.rmtree(report.get("root", "/nonexistent"), ignore_errors=True)
    assert report["a_committed"] and report["b_committed"] and report["job_running_at_removal"]
    assert report["summary"]["ok"] == 12 and not report["summary"]["shards_failed"]

    # exactly once, with the features of an independent computation
    cache = FeatureCache(str(out))
    keys = cache.manifest.column("key").to_pylist()
    assert len(keys) == 12 and Counter(keys).most_common(1)[0][1] == 1
    expected = expected_features([s.url for s in resolve_shards([f"{shards}/c-*.tar"])])
    assert set(keys) == set(expected)
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)
    stored = {f"features/{p.name}" for p in (out / "features").iterdir() if p.is_dir()}
    assert stored == set(cache.manifest.column("features_array").to_pylist())  # the lost attempts are gone

    commits = [json.loads(p.read_text()) for p in (out / "_pipeline" / "commits").glob("*.json")]
    # (A's first commit may be superseded: A can be frozen after writing it and before the driver heard of it;
    # the shard is then redone on B like the one A was computing)
    nodes = {c["worker"]["node"] for c in commits}
    assert report["node_b"] in nodes and nodes <= {report["node_a"], report["node_b"]}  # the pool grew onto B
    # A's shards were redone on B. The one A was computing loses an attempt, unless A froze between two shards
    # (its next one still streaming in, not computing): then nothing is charged. Either way run.json's count
    # is exactly the attempts the commits show beyond the first.
    run = cache.run
    assert run["retries"]["shard_retries"] == sum(c["attempt"] - 1 for c in commits) <= 1
    assert all(c["worker"]["node"] == report["node_b"] for c in commits if c["attempt"] > 1)
    assert run["workers"]["added"] == 1

    # each actor process was given a GPU: one torch cannot see (no GPU here) means CPU and exactly one warning;
    # on a machine with a GPU both nodes' "GPU 0" is the real one, and the actors use it silently
    pids = {c["worker"]["pid"] for c in commits} | {report["a_pid"]}
    assert len(pids) == 2
    visible = torch.cuda.is_available()
    assert {c["worker"]["device"] for c in commits} == ({"cuda"} if visible else {"cpu"})
    for pid in pids:
        assert logs[pid].count(GPU_WARNING) == (0 if visible else 1), logs[pid][-2000:]
