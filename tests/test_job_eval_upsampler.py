"""jobs/eval_upsampler.py end to end: every upsampler scored on shards, bad configurations refused."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featup_ops import shipped_oracle_jbu
from pipeline.ingest.sample_photos import photo_samples
from pipeline.ingest.shard_writer import write_shards
from tests.conftest import ROOT
from tests.reference_features import oracle_lowres, oracle_pixels

JOB = ROOT / "jobs" / "eval_upsampler.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_shards")
    write_shards(photo_samples(("chelsea", "camera")), str(out), samples_per_shard=8)
    return str(out / "shard-000000.tar")


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=600)


def _images(shard: str, size: int = 64) -> torch.Tensor:
    from pipeline.storage.images import load_sample_image
    from pipeline.storage.shards import iter_samples

    arrays = [load_sample_image(sample, size)[0] for sample in iter_samples(shard)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _recon_error(features, hr: torch.Tensor, images: torch.Tensor, views: int, seed: int = 0) -> float:
    """||mean over each cell of jitter(hr) - features(jitter(image))|| / ||features(jitter(image))|| over
    `views` jittered views per image, drawn as the evaluation documents (per image, from one seeded generator)."""
    from featup_ops.jitter import sample_jitter
    from featup_ops.upsampler_metrics import EVAL_JITTER

    generator = torch.Generator().manual_seed(seed)
    err = ref = 0.0
    for _ in range(views):
        jitter = sample_jitter(images.shape[0], images.shape[-1], EVAL_JITTER, per_sample=True, generator=generator)
        target = features(jitter(images)).double()
        cell = hr.shape[-1] // target.shape[-1]
        err += (F.avg_pool2d(jitter(hr), cell).double() - target).square().sum().item()
        ref += target.square().sum().item()
    return (err / ref) ** 0.5


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
        assert s["images"] == 2, name
    # the interpolation baselines' figures, computed here from the images and the oracle's formula
    images = _images(shards)
    truth, lowres = oracle_pixels(images), oracle_lowres(images)
    for mode in ("bilinear", "bicubic"):
        hr = F.interpolate(lowres, size=(64, 64), mode=mode, align_corners=False)
        rel = ((hr - truth).double().square().sum() / truth.double().square().sum()).sqrt().item()
        cosine = F.cosine_similarity(hr.double(), truth.double(), dim=1).mean().item()
        assert scores[mode]["rel_error"] == pytest.approx(rel, rel=1e-5), mode
        assert scores[mode]["cosine"] == pytest.approx(cosine, rel=1e-5), mode
        assert scores[mode]["recon_error"] == pytest.approx(_recon_error(oracle_lowres, hr, images, 2), rel=1e-4)
    # the learned upsamplers recover more of the truth than the resize they start from
    assert scores["jbu"]["rel_error"] < scores["bilinear"]["rel_error"]
    assert scores["implicit"]["rel_error"] < scores["bilinear"]["rel_error"]
    assert "rel_error" in proc.stdout and "implicit" in proc.stdout              # the printed table


def test_job_without_truth_reports_recon_error_only(shards, tmp_path):
    from featup_ops import create_backbone

    out = tmp_path / "scores.json"
    proc = run_job("--input", shards, "--backbone", "resnet18", "--random-init", "--image-size", "64",
                   "--upsampler", "bilinear", "--recon-views", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())["bilinear"]
    assert s["rel_error"] is None and s["cosine"] is None
    backbone = create_backbone("resnet18", random_init=True)  # the same seeded weights as the job's
    images = _images(shards)
    with torch.no_grad():
        def features(x):
            return backbone(backbone.normalize(x))

        hr = F.interpolate(features(images), scale_factor=16, mode="bilinear", align_corners=False)
        assert s["recon_error"] == pytest.approx(_recon_error(features, hr, images, 1), rel=1e-4)


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
