"""jobs/train_jbu.py end to end: training, checkpoints, resumption, previews, Ray Train data parallelism."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from featup_ops import load_jbu
from pipeline.ingest.sample_photos import photo_samples
from pipeline.ingest.shard_writer import write_shards
from tests.conftest import ROOT

JOB = ROOT / "jobs" / "train_jbu.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("train_shards")
    write_shards(photo_samples(("astronaut", "coffee", "camera", "rocket")), str(out), samples_per_shard=2)
    return str(out / "shard-{000000..000001}.tar")


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600)


def test_job_trains_checkpoints_resumes_and_previews(shards, tmp_path):
    out = str(tmp_path / "run")
    common = ["--input", shards, "--backbone", "oracle", "--image-size", "64", "--batch-size", "2",
              "--output", out, "--checkpoint-every", "2", "--preview-images", "2"]
    proc = run_job(*common, "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["backbone"] == "oracle"
    assert summary["recipe"]["channel_norm"] is False                  # auto: off for the oracle
    assert (tmp_path / "run" / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stack = load_jbu(out)
    assert stack.dim == 32

    refused = run_job(*common, "--steps", "5")
    assert refused.returncode != 0 and "--resume" in refused.stderr

    proc = run_job(*common, "--steps", "5", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "at step 3 of 5" in proc.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 5
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "training_state.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "5"


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be > 0"),
    (["--backbone", "no_such_backbone_xyz"], "unknown backbone"),
    (["--input", "/nonexistent/shard-000000.tar"], "do not exist"),
])
def test_job_refuses_bad_configuration_before_work(shards, tmp_path, args, message, capsys):
    import train_jbu

    base = {"--input": shards, "--backbone": "oracle", "--output": str(tmp_path / "o"), "--steps": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    assert train_jbu.main([x for kv in base.items() for x in kv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_job_data_parallel_on_ray_train(shards, tmp_path):
    """Two Ray Train workers (DDP over gloo) on a local Ray instance: each trains on its own images, yet both
    end with the same weights, which moved away from the initial ones and are what the checkpoint holds."""
    from featup_ops import MultiViewTrainer, create_backbone, load_checkpoint
    from pipeline.workflows.train_on_shards import TrainJobConfig, train_config

    out = str(tmp_path / "ray_run")
    proc = run_job("--input", shards, "--backbone", "oracle", "--image-size", "64", "--batch-size", "1",
                   "--output", out, "--steps", "3", "--num-workers", "2", "--preview-images", "0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "ray_run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3
    assert load_jbu(out).dim == 32
    job = TrainJobConfig(input=[shards], backbone="oracle", output=out, steps=3, image_size=64, batch_size=1)
    backbone = create_backbone("oracle")
    initial = MultiViewTrainer(backbone, train_config(job, backbone))
    start = initial.weights_fingerprint()
    fingerprints = summary["replica_fingerprints"]
    assert len(fingerprints) == 2
    assert fingerprints[0] == fingerprints[1], "the workers' weights diverged: gradients were not averaged"
    assert fingerprints[0] != start, "training did not change the weights"
    assert load_checkpoint(initial, out) == 3
    assert initial.weights_fingerprint() == fingerprints[0]  # rank 0's checkpoint holds the common weights
