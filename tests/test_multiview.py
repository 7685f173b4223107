"""Multi-view training pieces: jitter consistency on the oracle, downsamplers, loss and priors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featup_ops import create_backbone
from featup_ops.downsamplers import (
    AttentionDownsampler,
    SimpleDownsampler,
    area_downsample,
    create_downsampler,
)
from featup_ops.jitter import Jitter, JitterSpec, identity, sample_jitter
from featup_ops.losses import (
    UncertaintyHead,
    blur_prior,
    magnitude_prior,
    project,
    random_projection,
    smoothness_prior,
    total_variation,
    uncertainty_loss,
)
from tests.photos import photos


@pytest.fixture(scope="module")
def oracle():
    return create_backbone("oracle")


@pytest.fixture(scope="module")
def images():
    return photos(("astronaut", "coffee"), 128)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---- jitter ------------------------------------------------------------------------------------------------------
def test_jitter_of_truth_then_pooling_matches_features_of_jittered_image(oracle, images):
    """The property the whole training rests on, checked against the oracle's known truth."""
    truth = oracle.true_features(oracle.normalize(images))               # (2,32,128,128)
    g = torch.Generator().manual_seed(3)
    consistent, unmoved = [], []
    for _ in range(8):
        jitter = sample_jitter(2, 128, JitterSpec(), generator=g)
        lr_view = oracle(oracle.normalize(jitter(images)))
        down = area_downsample(jitter(truth), lr_view.shape[2:])
        consistent.append(rel(down, lr_view))
        unmoved.append(rel(area_downsample(truth, lr_view.shape[2:]), lr_view))
    # only resampling error (the oracle is nonlinear, so f(interpolated image) != interpolated f) remains
    assert max(consistent) < 0.08, consistent
    assert np.mean(consistent) < 0.25 * np.mean(unmoved), (consistent, unmoved)


def test_unzoomed_jitter_is_exact_for_any_resolution(oracle, images):
    spec = JitterSpec(p_flip=1.0, p_zoom=0.0, pad=12)
    jitter = sample_jitter(2, 128, spec, generator=torch.Generator().manual_seed(0))
    truth = oracle.true_features(oracle.normalize(images))
    # whole-pixel shifts and flips resample exactly: jitter commutes with the per-pixel oracle
    torch.testing.assert_close(jitter(truth), oracle.true_features(oracle.normalize(jitter(images))),
                               atol=1e-4, rtol=1e-4)
    # and at twice the resolution the same transform moves the map by twice the pixels
    double = F.interpolate(truth, scale_factor=2, mode="nearest")
    torch.testing.assert_close(F.avg_pool2d(jitter(double), 2), jitter(truth), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flip", [False, True])
def test_whole_pixel_shortcut_equals_grid_sample(flip):
    from featup_ops.jitter import jitter_theta

    x = torch.randn(2, 3, 16, 20)
    for dy, dx in [(3, -5), (-7, 4), (15, -19)]:
        theta = jitter_theta(torch.tensor([flip]), torch.tensor([1.0]), torch.tensor([2 * dy / 16]),
                             torch.tensor([2 * dx / 20])).float().expand(2, 2, 3).contiguous()
        assert Jitter._whole_pixel_shift(theta, 16, 20) == (dy, dx, flip)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        expected = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        torch.testing.assert_close(Jitter(theta)(x), expected, atol=1e-5, rtol=1e-5)


def test_flip_and_identity():
    x = torch.randn(2, 5, 16, 24)
    torch.testing.assert_close(identity(2)(x), x)
    flip = sample_jitter(2, 16, JitterSpec(p_flip=1.0, p_zoom=0.0, pad=0))
    torch.testing.assert_close(flip(x), x.flip(-1))


def test_one_transform_per_batch_unless_per_sample():
    g = torch.Generator().manual_seed(0)
    shared = sample_jitter(4, 64, JitterSpec(p_zoom=1.0), generator=g)
    assert torch.equal(shared.theta[0], shared.theta[3])
    own = sample_jitter(4, 64, JitterSpec(p_zoom=1.0), per_sample=True, generator=g)
    assert not torch.equal(own.theta[0], own.theta[3])
    zoom = 1 / own.theta[:, 1, 1]
    assert ((zoom >= 1) & (zoom <= 2.0 + 1e-6)).all()


def test_jitter_rejects_bad_input():
    with pytest.raises(ValueError, match="max_zoom"):
        JitterSpec(max_zoom=0.5)
    with pytest.raises(ValueError, match="transforms for a batch"):
        Jitter(torch.zeros(3, 2, 3))(torch.zeros(2, 1, 8, 8))


# ---- downsamplers ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["simple", "attention", "area"])
def test_downsampler_shapes_and_gradients(kind):
    torch.manual_seed(0)
    down = create_downsampler(kind, dim=6, kernel_size=8)
    hr = torch.randn(3, 6, 32, 40, requires_grad=True)
    out = down(hr, (4, 5))
    assert out.shape == (3, 6, 4, 5)
    out.square().sum().backward()
    assert hr.grad is not None and torch.isfinite(hr.grad).all() and hr.grad.abs().sum() > 0
    for name, p in down.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_downsamplers_start_as_the_area_average():
    hr = torch.randn(2, 4, 32, 32)
    torch.testing.assert_close(SimpleDownsampler(16)(hr, (2, 2)), area_downsample(hr, (2, 2)))
    attention = AttentionDownsampler(4, 16).eval()
    assert rel(attention(hr, (2, 2)), area_downsample(hr, (2, 2))) < 0.1


def test_attention_downsampler_is_a_convex_combination_of_its_patch():
    torch.manual_seed(1)
    down = AttentionDownsampler(3, 4).eval()
    with torch.no_grad():
        down.logit_weight.mul_(100)          # sharp attention
    hr = torch.randn(1, 3, 8, 8)
    out = down(hr, (2, 2))
    patches = hr.reshape(1, 3, 2, 4, 2, 4)
    assert (out <= patches.amax(dim=(3, 5)) + 1e-5).all() and (out >= patches.amin(dim=(3, 5)) - 1e-5).all()


def test_batched_models_match_separate_ones():
    torch.manual_seed(0)
    batched = AttentionDownsampler(5, 4, n_models=2).eval()
    hr = torch.randn(6, 5, 8, 8)                                         # 2 models x 3 views
    out = batched(hr, (2, 2))
    for m in range(2):
        single = AttentionDownsampler(5, 4).eval()
        single.load_state_dict({k: v[m:m + 1] for k, v in batched.state_dict().items()})
        torch.testing.assert_close(out[3 * m:3 * m + 3], single(hr[3 * m:3 * m + 3], (2, 2)))


def test_downsampler_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="not 16x the target grid"):
        SimpleDownsampler(16)(torch.zeros(1, 2, 30, 32), (2, 2))
    with pytest.raises(ValueError, match="simple"):
        create_downsampler("lanczos", 4)


# ---- loss and priors ---------------------------------------------------------------------------------------------
def test_uncertainty_loss_formula_and_gradients():
    torch.manual_seed(0)
    head = UncertaintyHead(8)
    lr = torch.randn(2, 8, 3, 3)
    s = head(lr)
    assert s.shape == (2, 1, 3, 3)
    assert torch.allclose(s, torch.full_like(s, float(np.exp(0.1))), atol=0.01)   # small init
    pred = torch.randn(2, 8, 3, 3, requires_grad=True)
    loss = uncertainty_loss(pred, lr, s)
    expected = ((pred - lr).square() / (2 * s.square()) + s.log()).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert pred.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    # the optimal s for a fixed error is the error's RMS: the loss is lower there than elsewhere
    err = torch.full((1, 1, 2, 2), 0.3)
    values = {sv: uncertainty_loss(err, torch.zeros_like(err), torch.full_like(err, sv)).item() for sv in (0.1, 0.3, 1)}
    assert values[0.3] < values[0.1] and values[0.3] < values[1]
    per_model = uncertainty_loss(pred.detach(), lr, s.detach(), per_model=2)
    assert per_model.shape == (2,)
    torch.testing.assert_close(per_model.mean(), loss.detach())


def test_random_projection_keeps_distances_on_average():
    g = torch.Generator().manual_seed(0)
    p = random_projection(64, 30, g)
    assert p.shape == (64, 30)
    x = torch.randn(4, 64, 5, 5)
    ratio = project(x, p).square().sum() / x.square().sum()
    assert 0.3 < ratio.item() < 0.7                                     # E = 30/64


def test_priors_vanish_on_constant_maps_and_have_gradients():
    const = torch.ones(2, 4, 16, 16)
    assert total_variation(const).abs().max() == 0
    assert blur_prior(const).abs().max() < 1e-10
    noisy = torch.randn(2, 4, 16, 16, requires_grad=True)
    guidance = torch.rand(2, 3, 16, 16)
    terms = [total_variation(noisy).sum(), blur_prior(noisy).sum(), magnitude_prior(noisy).sum(),
             smoothness_prior(noisy, guidance, samples=64, generator=torch.Generator().manual_seed(0))]
    for t in terms:
        grad, = torch.autograd.grad(t, noisy)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # known values: a unit ramp along x, a +-1 checkerboard, a constant, one impulse
    ramp = torch.arange(16.0).expand(1, 2, 16, 16)
    torch.testing.assert_close(total_variation(ramp), torch.tensor([1.0]))
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]).remainder(2).float().mul(2).sub(1)[None, None]
    torch.testing.assert_close(total_variation(checker), torch.tensor([4.0]))
    torch.testing.assert_close(magnitude_prior(3 * const), torch.full((2,), 9.0))
    impulse = torch.zeros(1, 1, 16, 16)
    impulse[0, 0, 8, 8] = 1
    g = np.exp(-np.arange(-2, 3) ** 2 / 2)
    g2 = np.outer(g, g) / g.sum() ** 2                  # the 5x5 Gaussian, sigma 1, that blur_prior uses
    expected = ((g2 ** 2).sum() - 2 * g2[2, 2] + 1) / 256  # sum of (blur - x)^2 over the 16x16 map, as a mean
    assert blur_prior(impulse).item() == pytest.approx(expected, rel=1e-5)
    assert smoothness_prior(const, guidance, samples=64).item() == 0
    # smoother maps score lower
    smooth = F.avg_pool2d(noisy.detach(), 5, 1, 2, count_include_pad=False)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert smoothness_prior(smooth, guidance, 256, g1) < smoothness_prior(noisy.detach(), guidance, 256, g2)
