"""jobs/eval_upsampler.py end to end: every upsampler scored on shards, bad configurations refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from featup_ops import shipped_oracle_jbu
from pipeline.ingest.sample_photos import photo_samples
from pipeline.ingest.shard_writer import write_shards
from tests.conftest import ROOT

JOB = ROOT / "jobs" / "eval_upsampler.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_shards")
    write_shards(photo_samples(("chelsea", "camera")), str(out), samples_per_shard=8)
    return str(out / "shard-000000.tar")


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600)


def test_job_scores_every_upsampler(shards, tmp_path):
    out = tmp_path / "scores.json"
    proc = run_job("--input", shards, "--backbone", "oracle", "--image-size", "64", "--upsampler", "bilinear",
                   "--upsampler", "bicubic", "--upsampler", "jbu", "--upsampler-weights", shipped_oracle_jbu(),
                   "--upsampler", "implicit", "--implicit-steps", "40", "--implicit-total-views", "40",
                   "--recon-views", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = json.loads(out.read_text())
    assert list(scores) == ["bilinear", "bicubic", "jbu", "implicit"]
    for name, s in scores.items():
        assert set(s) >= {"rel_error", "cosine", "recon_error", "seconds_per_image"}, name
        assert 0 < s["rel_error"] < 2 and -1 <= s["cosine"] <= 1 and s["recon_error"] > 0 and s["images"] == 2
    assert scores["implicit"]["rel_error"] < scores["bilinear"]["rel_error"]
    assert scores["implicit"]["seconds_per_image"] > scores["bilinear"]["seconds_per_image"]
    assert "rel_error" in proc.stdout and "implicit" in proc.stdout              # the printed table


def test_job_without_truth_reports_recon_error_only(shards, tmp_path):
    out = tmp_path / "scores.json"
    proc = run_job("--input", shards, "--backbone", "resnet18", "--random-init", "--image-size", "64",
                   "--upsampler", "bilinear", "--recon-views", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())["bilinear"]
    assert s["rel_error"] is None and s["cosine"] is None and s["recon_error"] > 0


@pytest.mark.parametrize("args, message", [
    (["--upsampler", "lanczos9"], "unknown --upsampler 'lanczos9'"),
    (["--upsampler", "jbu"], "needs --upsampler-weights"),
    (["--upsampler", "bilinear", "--image-size", "0"], "--image-size must be >= 1"),
    (["--upsampler", "bilinear", "--backbone", "no_such_backbone_xyz"], "unknown backbone"),
    (["--upsampler", "bilinear", "--input", "/nonexistent/shard-000000.tar"], "do not exist"),
])
def test_job_refuses_bad_configuration(shards, tmp_path, args, message, capsys):
    import eval_upsampler

    base = {"--input": shards, "--backbone": "oracle", "--json": str(tmp_path / "x.json")}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    assert eval_upsampler.main([x for kv in base.items() for x in kv] + extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
