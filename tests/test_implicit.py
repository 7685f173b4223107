"""The implicit upsampler: per-image fits beat bilinear against the oracle truth, batching, the registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup_ops import FeatureModel, UpsamplerError, create_backbone, create_upsampler
from featup_ops.backbones import imagenet_normalize
from featup_ops.implicit import (
    BatchedImplicitMLP,
    ImplicitConfig,
    fit_implicit,
    fit_pca,
    from_pca,
    to_pca,
)
from featup_ops.upsampler_metrics import reconstruction_sums, relative_error
from tests.photos import photos


@pytest.fixture(scope="module")
def oracle():
    return create_backbone("oracle")


@pytest.fixture(scope="module")
def image():
    return photos(("astronaut",), 64)


@pytest.fixture(scope="module")
def fitted(oracle, image):
    return fit_implicit(oracle, image, ImplicitConfig(steps=120, total_views=120, fit_scale=16, early_stop=False))


def bilinear_error(oracle, image, size):
    lowres = oracle(oracle.normalize(image))
    truth = oracle.true_features(imagenet_normalize(image), size=size)
    return relative_error(F.interpolate(lowres, size=size, mode="bilinear", align_corners=False), truth), truth


def test_fit_on_one_small_image_beats_bilinear(oracle, image, fitted):
    base, truth = bilinear_error(oracle, image, (64, 64))
    hr = fitted.render(image)
    assert hr.shape == (1, 32, 64, 64)
    err = relative_error(hr, truth)
    assert err < 0.8 * base, (err, base)
    assert fitted.steps_run.tolist() == [120]
    # its last training window reconstructed the jittered views better than the bilinear resize does
    bilinear = F.interpolate(oracle(oracle.normalize(image)), size=(64, 64), mode="bilinear", align_corners=False)
    err, ref = reconstruction_sums(oracle, bilinear, image, 8, torch.Generator().manual_seed(0))
    assert fitted.final_error.item() < err / ref


def test_render_at_another_resolution(oracle, image, fitted):
    base, truth = bilinear_error(oracle, image, (128, 128))
    hr = fitted.render(image, size=(128, 128))
    assert hr.shape == (1, 32, 128, 128)
    assert relative_error(hr, truth) < 0.8 * base


def test_network_state_is_resolution_free_form(fitted):
    state = fitted.network_state(0)
    assert state["w1"].shape == (128, 303) and state["pca_basis"].shape == (32, 32)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_batched_networks_are_independent():
    torch.manual_seed(0)
    mlp = BatchedImplicitMLP(3, 8, hidden=16).eval()
    images = torch.rand(3, 3, 8, 8)
    out = mlp(mlp.encode(images))
    assert out.shape == (3, 64, 8)
    out[0].sum().backward()
    for name, p in mlp.named_parameters():
        assert p.grad[1:].abs().sum() == 0, name          # image 0's output depends on its own network only
    assert mlp.w1.grad[0].abs().sum() > 0


def test_pca_round_trip():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 6, 3, 3)
    mean, basis = fit_pca(feats, 128)
    assert basis.shape == (2, 6, 6)                          # D = min(128, C)
    coeffs = to_pca(feats, mean, basis)
    back = from_pca(coeffs[:, 0], mean, basis)
    torch.testing.assert_close(back, feats[:, 0], atol=1e-4, rtol=1e-4)


def test_early_stopping_ends_a_converged_fit(oracle, image):
    fit = fit_implicit(oracle, image.repeat(2, 1, 1, 1), ImplicitConfig(
        steps=400, total_views=60, fit_scale=8, patience=10, tolerance=0.5, batch_size=2))
    assert (fit.steps_run < 400).all()
    assert fit.steps_run.min() >= 20


def test_implicit_upsampler_in_feature_model(oracle):
    images = photos(("coffee", "rocket"), 48)
    up = create_upsampler("implicit", 32, steps=60, views=4, total_views=60, fit_scale=8, batch_size=2)
    model = FeatureModel(oracle, up)
    lowres, highres = model(images)
    assert lowres.shape == (2, 32, 3, 3) and highres.shape == (2, 32, 48, 48)
    assert len(up.last_fits) == 1 and up.last_fits[0].mlp.n == 2
    assert model.describe()["upsampler"]["kind"] == "implicit"
    truth = oracle.true_features(imagenet_normalize(images))
    bilinear = F.interpolate(lowres, size=(48, 48), mode="bilinear", align_corners=False)
    assert relative_error(highres, truth) < relative_error(bilinear, truth)


def test_implicit_options_are_checked():
    with pytest.raises(UpsamplerError, match="unknown implicit upsampler option"):
        create_upsampler("implicit", 32, stpes=10)
    with pytest.raises(UpsamplerError, match="takes no weights"):
        create_upsampler("implicit", 32, weights="x.safetensors")
    with pytest.raises(UpsamplerError, match="steps must be >= 1"):
        create_upsampler("implicit", 32, steps=0)
    ref = create_upsampler("implicit", 32, reference=True)
    assert ref.settings.steps == 1200 and ref.settings.total_views == 3000 and ref.settings.lr == 2e-3
    with pytest.raises(UpsamplerError, match="backbone="):
        ref(torch.zeros(1, 32, 2, 2), torch.zeros(1, 3, 32, 32))
