"""AnyUp training against known truth: the loss, a short run that learns, weights that load strictly, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from featup_ops import create_backbone, load_anyup, random_anyup
from featup_ops.anyup_training import AnyUpTrainConfig, AnyUpTrainer, augment_colours, upsampling_loss
from featup_ops.backbones import imagenet_normalize
from featup_ops.checkpoints import state_fingerprint
from pipeline.ingest.sample_photos import photo
from tests.conftest import ROOT

REFERENCE_VECTORS = ROOT / "tests" / "data" / "anyup_vectors_small.pt"


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photographs as a [0,1] batch of 32 x 32 images."""
    squares = []
    for name in ("astronaut", "coffee"):
        a = photo(name)[..., :3]
        side = min(a.shape[:2])
        square = torch.from_numpy(np.ascontiguousarray(a[:side, :side])).permute(2, 0, 1)[None].float() / 255
        squares.append(F.interpolate(square, size=(32, 32), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(squares).clamp(0, 1)


@pytest.fixture(scope="module")
def oracles():
    return [create_backbone("oracle", seed=2, dim=8, patch_size=4), create_backbone("oracle", seed=3, dim=12,
                                                                                    patch_size=8)]


def error_vs_truth(model, backbone, images01: torch.Tensor) -> float:
    """||AnyUp(image, lowres) - truth|| / ||truth||, written out here."""
    x = backbone.normalize(images01)
    with torch.no_grad():
        out = model.eval()(imagenet_normalize(images01), backbone(x))
    truth = backbone.true_features(x)
    return ((out - truth).norm() / truth.norm()).item()


def fit_loss(trainer: AnyUpTrainer, backbone, images01: torch.Tensor) -> float:
    """The training loss's fit term for one backbone on `images01`, without a step."""
    with torch.no_grad():
        return trainer.losses(images01, backbone)["fit"].item()


def test_loss_is_the_papers_formula():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    cos_terms, mse_terms = [], []
    p, t = pred.double().numpy(), target.double().numpy()
    for b in range(2):
        for i in range(3):
            for j in range(4):
                pv, tv = p[b, :, i, j], t[b, :, i, j]
                cos_terms.append(1 - pv @ tv / (np.linalg.norm(pv) * np.linalg.norm(tv)))
                lo, hi = tv.min(), tv.max()
                mse_terms.append(np.mean(((pv - lo) / (hi - lo) - (tv - lo) / (hi - lo)) ** 2))
    expected = 0.7 * np.mean(cos_terms) + 1.3 * np.mean(mse_terms)
    assert upsampling_loss(pred, target, 0.7, 1.3).item() == pytest.approx(expected, rel=1e-5)
    assert upsampling_loss(target, target).item() == pytest.approx(0, abs=1e-6)


def test_colour_augmentation_changes_colours_within_range(photos):
    noisy = augment_colours(photos, 0.2, 0.02, torch.Generator().manual_seed(0))
    assert noisy.shape == photos.shape and noisy.min() >= 0 and noisy.max() <= 1
    assert 0.005 < (noisy - photos).abs().mean().item() < 0.2


def test_short_run_lowers_the_error_and_moves_the_weights(photos, oracles):
    trainer = AnyUpTrainer(oracles, AnyUpTrainConfig(steps=12, lr=3e-3, warmup_steps=0, lr_schedule="constant"))
    before_state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    before = [error_vs_truth(trainer.model, b, photos) for b in oracles]
    loss_before = [fit_loss(trainer, b, photos) for b in oracles]
    records = [trainer.train_step(photos) for _ in range(12)]
    after = [error_vs_truth(trainer.model, b, photos) for b in oracles]
    loss_after = [fit_loss(trainer, b, photos) for b in oracles]
    assert all(a < 0.95 * b for a, b in zip(after, before)) and sum(after) < 0.85 * sum(before), (before, after)
    assert all(a < b for a, b in zip(loss_after, loss_before)), (loss_before, loss_after)
    assert {r["backbone"] for r in records} == {0, 1}  # both oracles were drawn
    moved = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before_state[k])]
    for key in ("image_encoder.0.weight", "key_features_encoder.0.basis", "cross_decode.conv2d.weight",
                "cross_decode.cross_attn.attention.in_proj_weight", "rope.freqs", "aggregation.0.weight"):
        assert key in moved
    assert trainer.step == 12


def test_saved_weights_load_strictly_and_give_identical_outputs(photos, oracles, tmp_path):
    trainer = AnyUpTrainer(oracles, AnyUpTrainConfig(steps=2, seed=4))
    for _ in range(2):
        trainer.train_step(photos)
    trainer.save(str(tmp_path / "run"))
    published_keys = set(torch.load(REFERENCE_VECTORS, weights_only=True)["state_dict"])
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == published_keys
        record = json.loads(f.metadata()["anyup_training"])
    assert record["step"] == 2 and [o["seed"] for o in record["oracles"]] == [2, 3]
    lowres = oracles[0](oracles[0].normalize(photos))
    with torch.no_grad():
        expected = trainer.model.eval()(imagenet_normalize(photos), lowres)
    for source in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):
        loaded = load_anyup(str(source))
        assert state_fingerprint(loaded.state_dict()) == trainer.weights_fingerprint()
        with torch.no_grad():
            assert torch.equal(loaded(imagenet_normalize(photos), lowres), expected)
    assert trainer.weights_fingerprint() != state_fingerprint(random_anyup().state_dict())


def test_refusals_name_the_problem(photos, oracles):
    with pytest.raises(ValueError, match="steps must be > 0, got 0"):
        AnyUpTrainer(oracles, AnyUpTrainConfig(steps=0))
    with pytest.raises(ValueError, match="lr_schedule must be 'constant' or 'cosine', got 'linear'"):
        AnyUpTrainConfig(lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="nothing would be learned"):
        AnyUpTrainConfig(cosine_weight=0, mse_weight=0).validate()
    with pytest.raises(ValueError, match="at least one backbone"):
        AnyUpTrainer([], AnyUpTrainConfig())
    no_truth = create_backbone("resnet18", random_init=True)
    with pytest.raises(ValueError, match=r"without a known high-res truth.*resnet18"):
        AnyUpTrainer([oracles[0], no_truth], AnyUpTrainConfig())
    trainer = AnyUpTrainer([oracles[1]], AnyUpTrainConfig())
    with pytest.raises(ValueError, match=r"grid under 2 x 2: use images of at least 16 px"):
        trainer.train_step(photos[:, :, :12, :12])
    with pytest.raises(ValueError, match=r"expected a batch of RGB images \(B,3,H,W\), got \(3, 32, 32\)"):
        trainer.train_step(photos[0])
