"""jobs/train_anyup.py: a short run end to end (shards in, strictly loadable weights out) and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from featup_ops import create_backbone, load_anyup, random_anyup
from featup_ops.checkpoints import state_fingerprint
from pipeline.ingest.sample_photos import photo_samples
from pipeline.ingest.shard_writer import write_shards
from tests.conftest import ROOT

JOB = ROOT / "jobs" / "train_anyup.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("anyup_train_shards")
    write_shards(photo_samples(("astronaut", "coffee", "camera", "rocket")), str(out), samples_per_shard=2)
    return str(out / "shard-{000000..000001}.tar")


def common(shards: str, out: str) -> list[str]:
    return ["--input", shards, "--output", out, "--backbone-seed", "2", "--backbone-seed", "3", "--backbone-dim", "8",
            "--patch-size", "4", "--image-size", "32", "--batch-size", "2", "--shuffle-buffer", "2"]


def test_job_trains_and_writes_weights_load_anyup_reads(shards, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(JOB), *common(shards, str(out)), "--steps", "3",
                           "--checkpoint-every", "2"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["oracles"] == [{"seed": 2, "dim": 8, "patch_size": 4},
                                                           {"seed": 3, "dim": 8, "patch_size": 4}]
    assert len(summary["load_average_before"]) == 3 and summary["cpu_count"] >= 1
    model = load_anyup(str(out))  # strict: every published key, nothing else
    assert state_fingerprint(model.state_dict()) == summary["weights_fingerprint"]
    assert summary["weights_fingerprint"] != state_fingerprint(random_anyup().state_dict())
    oracle = create_backbone("oracle", seed=2, dim=8, patch_size=4)
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(image, oracle(image)).shape == (1, 8, 32, 48)

    again = subprocess.run([sys.executable, str(JOB), *common(shards, str(out)), "--steps", "3"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already holds model.safetensors" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1 (got 0)"),
    (["--lr", "-1"], "--lr must be > 0 (got -1.0)"),
    (["--backbone-seed", "-4"], "--backbone-seed must be >= 0 (got [-4])"),
    (["--backbone-seed", "2"], "--backbone-seed is given twice for the same value: [2, 3, 2]"),
    (["--patch-size", "32"], "--image-size 32 gives a feature grid under 2 x 2 with patch size 32: use at least 64"),
    (["--backbone", "no_such_backbone_xyz"], "unknown backbone 'no_such_backbone_xyz'"),
    (["--backbone", "resnet18"], "no weights for backbone 'resnet18'"),
    (["--input", "/nonexistent/shard-000000.tar"], "do not exist"),
    (["--time-limit", "0"], "--time-limit must be > 0 minutes (got 0.0)"),
])
def test_bad_configuration_is_refused_before_work(shards, tmp_path, capsys, args, message):
    from jobs.train_anyup import main

    assert main([*common(shards, str(tmp_path / "out")), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
