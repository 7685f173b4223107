"""JBU training: the library loop, its checkpoints and resumption, and jobs/train_jbu.py end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from featup_ops import FeatureModel, JBUStack, create_backbone, load_jbu
from featup_ops.training import (
    MultiViewTrainer, TrainConfig, checkpoint_exists, load_checkpoint, train,
)
from pipeline.demo import photo_samples
from pipeline.shard_writer import write_shards

from .conftest import ROOT
from .test_multiview import photos

JOB = ROOT / "jobs" / "train_jbu.py"


@pytest.fixture(scope="module")
def images():
    return photos(("astronaut", "coffee"), 64)


def small_config(**kw) -> TrainConfig:
    base = dict(steps=40, image_size=64, views=3, channel_norm=False, lr=3e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def heldout_recon(trainer: MultiViewTrainer, images: torch.Tensor) -> float:
    """Reconstruction error of the upsampler on fixed views (eval mode, area downsampling)."""
    from featup_ops.evaluation import reconstruction_sums
    from featup_ops.backbones import imagenet_normalize

    trainer.upsampler.eval()
    with torch.no_grad():
        lr = trainer.features(images)
        hr = trainer.upsampler(lr, imagenet_normalize(images))
    err, ref = reconstruction_sums(trainer.backbone, hr, images, 6, torch.Generator().manual_seed(5))
    return (err / ref) ** 0.5


def test_short_training_lowers_loss_and_reconstruction_error(images, tmp_path):
    trainer = MultiViewTrainer(create_backbone("oracle"), small_config())
    before = heldout_recon(trainer, images)
    history = train(trainer, iter(lambda: images, None), checkpoint_url=str(tmp_path / "ckpt"),
                    checkpoint_every=1000, progress=False)
    after = heldout_recon(trainer, images)
    assert len(history) == 40 and trainer.step == 40
    first, last = np.mean([h["loss"] for h in history[:5]]), np.mean([h["loss"] for h in history[-5:]])
    assert last < first
    first_mse = np.mean([h["relative_mse"] for h in history[:5]])
    last_mse = np.mean([h["relative_mse"] for h in history[-5:]])
    assert last_mse < first_mse
    assert after < 0.9 * before, (before, after)
    # the final checkpoint is a JBU stack that load_jbu reads and FeatureModel uses
    stack = load_jbu(str(tmp_path / "ckpt"))
    assert isinstance(stack, JBUStack) and stack.dim == 32
    for k, v in trainer.upsampler.state_dict().items():
        torch.testing.assert_close(stack.state_dict()[k], v)
    model = FeatureModel.create("oracle", "jbu", upsampler_weights=str(tmp_path / "ckpt" / "model.safetensors"))
    lowres, highres = model(images)
    assert highres.shape == (2, 32, 64, 64)


def test_resumed_training_continues_exactly(images):
    """3 steps + save + load + 3 steps == 6 steps straight (same batches), through a memory:// store."""
    straight = MultiViewTrainer(create_backbone("oracle"), small_config(steps=6))
    train(straight, iter(lambda: images, None), progress=False)

    first = MultiViewTrainer(create_backbone("oracle"), small_config(steps=3))
    url = "memory://featup-test/resume"
    train(first, iter(lambda: images, None), checkpoint_url=url, checkpoint_every=3, progress=False)
    assert checkpoint_exists(url)
    resumed = MultiViewTrainer(create_backbone("oracle"), small_config(steps=6))
    assert load_checkpoint(resumed, url) == 3
    history = train(resumed, iter(lambda: images, None), progress=False)
    assert [h["step"] for h in history] == [4, 5, 6]
    for k, v in straight.upsampler.state_dict().items():
        torch.testing.assert_close(resumed.upsampler.state_dict()[k], v, msg=k)
    for k, v in straight.downsampler.state_dict().items():
        torch.testing.assert_close(resumed.downsampler.state_dict()[k], v, msg=k)


def test_resume_refuses_other_settings(images):
    url = "memory://featup-test/other"
    trainer = MultiViewTrainer(create_backbone("oracle"), small_config(steps=1))
    train(trainer, iter(lambda: images, None), checkpoint_url=url, progress=False)
    other = MultiViewTrainer(create_backbone("oracle"), small_config(steps=2, lr=1e-2))
    with pytest.raises(ValueError, match="lr"):
        load_checkpoint(other, url)


def test_bad_training_config_is_refused():
    with pytest.raises(ValueError, match="steps must be > 0"):
        small_config(steps=0).validate()
    with pytest.raises(ValueError, match="downsampler"):
        MultiViewTrainer(create_backbone("oracle"), small_config(downsampler="max"))


def test_iterator_that_runs_dry_is_an_error(images):
    trainer = MultiViewTrainer(create_backbone("oracle"), small_config(steps=3))
    with pytest.raises(ValueError, match="iterator ended at step 1"):
        train(trainer, iter([images]), progress=False)


# ---- the job -----------------------------------------------------------------------------------------------------
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
def test_job_refuses_bad_configuration_before_work(shards, tmp_path, args, message):
    from .test_eval import load_job

    base = {"--input": shards, "--backbone": "oracle", "--output": str(tmp_path / "o"), "--steps": "2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit, match=re.escape(message)):
        load_job(JOB).main([x for kv in base.items() for x in kv])
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_job_data_parallel_on_ray_train(shards, tmp_path):
    """Two Ray Train workers (gloo all-reduce) on a local Ray instance."""
    out = str(tmp_path / "ray_run")
    proc = run_job("--input", shards, "--backbone", "oracle", "--image-size", "64", "--batch-size", "1",
                   "--output", out, "--steps", "3", "--num-workers", "2", "--preview-images", "0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((tmp_path / "ray_run" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 3
    assert load_jbu(out).dim == 32
