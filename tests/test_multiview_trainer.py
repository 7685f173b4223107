"""The multi-view JBU trainer as a library: loss, checkpoints, exact resumption (featup_ops.multiview_trainer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featup_ops import FeatureModel, JBUStack, create_backbone, load_jbu
from featup_ops.multiview_trainer import (
    MultiViewTrainer,
    TrainConfig,
    checkpoint_exists,
    load_checkpoint,
    train,
)
from tests.photos import photos


@pytest.fixture(scope="module")
def images():
    return photos(("astronaut", "coffee"), 64)


def small_config(**kw) -> TrainConfig:
    base = dict(steps=40, image_size=64, views=3, channel_norm=False, lr=3e-3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def heldout_recon(trainer: MultiViewTrainer, images: torch.Tensor) -> float:
    """Reconstruction error of the upsampler on fixed views (eval mode, area downsampling)."""
    from featup_ops.backbones import imagenet_normalize
    from featup_ops.upsampler_metrics import reconstruction_sums

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


class _HalvesAveraged(torch.nn.Module):
    """What two data-parallel processes compute, in one process: the objective on each half of the batch
    from the same random state (both processes draw the same jitters and dropout), losses averaged."""

    def __init__(self, objective: torch.nn.Module):
        super().__init__()
        self.objective = objective

    def forward(self, images):
        generator, rng = self.objective.generator.get_state(), torch.get_rng_state()
        first = self.objective(images[:1])
        self.objective.generator.set_state(generator)
        torch.set_rng_state(rng)
        second = self.objective(images[1:])
        return {k: (first[k] + second[k]) / 2 for k in first}


def _ddp_worker(rank: int, world: int, port: int, images: torch.Tensor, steps: int, out: str) -> None:
    import os

    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)  # two processes on a small machine: no spinning thread pools
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = MultiViewTrainer(create_backbone("oracle"), small_config(steps=steps),
                                   wrap_model=DistributedDataParallel)
        for _ in range(steps):
            trainer.train_step(images[rank:rank + 1])  # each process its own image
        state = {f"upsampler.{k}": v for k, v in trainer.upsampler.state_dict().items()}
        state.update({f"head.{k}": v for k, v in trainer.head.state_dict().items()})
        save_file({k: v.contiguous() for k, v in state.items()}, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_data_parallel_training_averages_the_gradients(images, tmp_path):
    """Two processes under torch's DistributedDataParallel (gloo) end where one process ends when it averages
    the losses of both processes' images: the gradients were averaged, not summed, dropped or left alone."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from tests.conftest import free_port

    steps = 3
    mp.spawn(_ddp_worker, args=(2, free_port(), images, steps, str(tmp_path)), nprocs=2, join=True)
    ranks = {rank: load_file(str(tmp_path / f"rank{rank}.safetensors")) for rank in range(2)}

    reference = MultiViewTrainer(create_backbone("oracle"), small_config(steps=steps), wrap_model=_HalvesAveraged)
    initial = {k: v.clone() for k, v in reference.upsampler.state_dict().items()}
    for _ in range(steps):
        reference.train_step(images)
    expected = {f"upsampler.{k}": v for k, v in reference.upsampler.state_dict().items()}
    expected.update({f"head.{k}": v for k, v in reference.head.state_dict().items()})
    for rank, state in ranks.items():
        assert state.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=f"rank {rank}: {k}")
    moved = max((reference.upsampler.state_dict()[k] - v).abs().max().item() for k, v in initial.items())
    assert moved > 1e-3

