"""Evaluation metrics against the oracle truth, held-out reconstruction, and jobs/eval_upsampler.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import featup_ops
from featup_ops import create_backbone, create_upsampler, load_jbu
from featup_ops.evaluation import (
    evaluate_upsampler, mean_cosine, preview_png, reconstruction_sums, relative_error,
)
from pipeline.demo import photo_samples
from pipeline.shard_writer import write_shards

from .conftest import ROOT
from .test_multiview import photos

JOB = ROOT / "jobs" / "eval_upsampler.py"
SHIPPED = Path(featup_ops.__file__).parent / "weights" / "oracle_jbu.safetensors"


def test_metrics_on_known_cases():
    torch.manual_seed(0)
    truth = torch.randn(2, 8, 5, 5)
    assert relative_error(truth, truth) == 0
    assert relative_error(2 * truth, truth) == pytest.approx(1.0)
    assert relative_error(torch.zeros_like(truth), truth) == pytest.approx(1.0)
    assert mean_cosine(3 * truth, truth) == pytest.approx(1.0)
    assert mean_cosine(-truth, truth) == pytest.approx(-1.0)
    noisy = truth + 0.5 * torch.randn_like(truth)
    assert 0 < mean_cosine(noisy, truth) < 1


class TruthUpsampler(torch.nn.Module):
    """Cheats with the oracle's truth: the best possible upsampler, to check that the metrics reward it."""

    def __init__(self, oracle):
        super().__init__()
        self.oracle = oracle

    def forward(self, lowres, guidance):
        return self.oracle.true_features(guidance)


def test_truth_scores_best_and_recon_error_ranks_like_rel_error():
    oracle = create_backbone("oracle")
    images = photos(("astronaut", "rocket"), 96)
    best = evaluate_upsampler(oracle, TruthUpsampler(oracle), [images])
    bilinear = evaluate_upsampler(oracle, create_upsampler("bilinear", 32), [images])
    assert best.rel_error < 1e-6 and best.cosine > 0.9999
    assert bilinear.rel_error > 0.2 and bilinear.cosine < best.cosine
    # the truth-free measure agrees: the truth reconstructs jittered views far better than bilinear
    assert best.recon_error < 0.5 * bilinear.recon_error
    assert best.images == 2 and best.seconds_per_image > 0


def test_recon_views_are_the_same_for_every_upsampler():
    oracle = create_backbone("oracle")
    images = photos(("coffee",), 64)
    hr = torch.randn(1, 32, 64, 64)
    a = reconstruction_sums(oracle, hr, images, 3, torch.Generator().manual_seed(4))
    b = reconstruction_sums(oracle, hr, images, 3, torch.Generator().manual_seed(4))
    assert a == b


def test_preview_png_grid():
    import io

    from PIL import Image

    png = preview_png(torch.rand(2, 3, 32, 32), torch.randn(2, 8, 2, 2), torch.randn(2, 8, 32, 32), size=32)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (3 * 32, 2 * 32)  # two rows of image | low-res | high-res


def test_shipped_oracle_jbu_beats_bilinear_on_heldout_photos():
    """The demo's upsampler (featup_ops/weights/oracle_jbu.safetensors) on photos it was not trained on."""
    assert SHIPPED.exists(), f"{SHIPPED} is missing: run benchmarks/bench_quality.py --ship"
    stack = load_jbu(str(SHIPPED))
    assert stack.dim == 32 and stack.channel_norm is None
    oracle = create_backbone("oracle")
    images = photos(("chelsea", "coffee"), 224)                         # held out from its training crops
    jbu = evaluate_upsampler(oracle, stack, [images], recon_views=2)
    bilinear = evaluate_upsampler(oracle, create_upsampler("bilinear", 32), [images], recon_views=2)
    bicubic = evaluate_upsampler(oracle, create_upsampler("bicubic", 32), [images], recon_views=2)
    assert jbu.rel_error < 0.95 * bilinear.rel_error, (jbu, bilinear)
    assert jbu.rel_error < bicubic.rel_error, (jbu, bicubic)
    assert jbu.cosine > max(bilinear.cosine, bicubic.cosine)


# ---- the job -----------------------------------------------------------------------------------------------------
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
                   "--upsampler", "bicubic", "--upsampler", "jbu", "--upsampler-weights", str(SHIPPED),
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


def load_job(path: Path):
    """The job script as a module (jobs/ is not a package), to call its main() in this process."""
    import importlib.util

    name = f"featup_job_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                                      # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--upsampler", "lanczos9"], "unknown --upsampler 'lanczos9'"),
    (["--upsampler", "jbu"], "needs --upsampler-weights"),
    (["--upsampler", "bilinear", "--image-size", "0"], "--image-size must be >= 1"),
    (["--upsampler", "bilinear", "--backbone", "no_such_backbone_xyz"], "unknown backbone"),
    (["--upsampler", "bilinear", "--input", "/nonexistent/shard-000000.tar"], "do not exist"),
])
def test_job_refuses_bad_configuration(shards, tmp_path, args, message):
    base = {"--input": shards, "--backbone": "oracle", "--json": str(tmp_path / "x.json")}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, value]
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_job(JOB).main([x for kv in base.items() for x in kv] + extra)
    assert not (tmp_path / "x.json").exists()
