"""The oracle backbone's seeds and widths: other, exactly known backbones; the default one unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup_ops import BackboneError, FeatureModel, create_backbone


def formula_features(images: torch.Tensor, seed: int, dim: int, patch: int = 16) -> torch.Tensor:
    """The oracle's definition written out: W1 (32x3) = N(0,1)/2 then W2 (dim x 32) = N(0,1)/5 from a Generator
    seeded with `seed`, f = tanh(3 W2 tanh(3 W1 x)) per pixel, averaged over patch x patch cells."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(32, 3, generator=g) / 2
    w2 = torch.randn(dim, 32, generator=g) / 5
    hidden = torch.tanh(3 * torch.einsum("oc,bchw->bohw", w1, images))
    return F.avg_pool2d(torch.tanh(3 * torch.einsum("oc,bchw->bohw", w2, hidden)), patch)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))


def test_default_oracle_is_unchanged(images):
    expected = formula_features(images, seed=1, dim=32)
    for backbone in (create_backbone("oracle"), create_backbone("oracle", seed=1)):
        torch.testing.assert_close(backbone(images), expected, rtol=1e-5, atol=1e-6)
        assert backbone.weights_id == "oracle:C32:seed1"  # what existing caches recorded


def test_seeds_and_widths_are_other_backbones(images):
    default = create_backbone("oracle")(images)
    other = create_backbone("oracle", seed=7, dim=48)
    feats = other(images)
    torch.testing.assert_close(feats, formula_features(images, seed=7, dim=48), rtol=1e-5, atol=1e-6)
    assert other.weights_id == "oracle:C48:seed7" and other.seed == 7
    assert feats.shape == (2, 48, 3, 4)
    same_width = create_backbone("oracle", seed=7)(images)
    assert ((same_width - default).norm() / default.norm()).item() > 0.5
    truth = other.true_features(images)
    assert truth.shape == (2, 48, 48, 64)
    torch.testing.assert_close(F.avg_pool2d(truth, 16), feats, rtol=1e-5, atol=1e-6)


def test_feature_model_passes_the_seed_through_the_registry():
    model = FeatureModel.create("oracle", "bilinear", backbone_options={"seed": 3, "dim": 16, "patch_size": 8})
    images01 = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lowres, highres = model(images01)
    expected = formula_features(model.backbone.normalize(images01), seed=3, dim=16, patch=8)
    torch.testing.assert_close(lowres, expected, rtol=1e-5, atol=1e-6)
    assert model.weights_ids["backbone"] == "oracle:C16:seed3" and highres.shape == (1, 16, 64, 64)


@pytest.mark.parametrize("options, message", [
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"seed": "3"}, "seed must be an integer >= 0, got '3'"),
    ({"dim": 0}, "dim must be a positive integer, got 0"),
    ({"weights": "w.safetensors"}, "pass seed=N"),
])
def test_bad_oracle_options_are_refused(options, message):
    with pytest.raises(BackboneError, match=message):
        create_backbone("oracle", **options)
