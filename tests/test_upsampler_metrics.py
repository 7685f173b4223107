"""Upsampler metrics against the oracle truth and held-out reconstruction (featup_ops.upsampler_metrics)."""

from __future__ import annotations

import pytest
import torch

from featup_ops import create_backbone, create_upsampler, load_jbu, shipped_oracle_jbu
from featup_ops.upsampler_metrics import (
    evaluate_upsampler,
    mean_cosine,
    preview_png,
    reconstruction_sums,
    relative_error,
)
from tests.photos import photos


def test_metrics_on_known_cases():
    torch.manual_seed(0)
    truth = torch.randn(2, 8, 5, 5)
    assert relative_error(truth, truth) == 0
    assert relative_error(2 * truth, truth) == pytest.approx(1.0)
    assert relative_error(torch.zeros_like(truth), truth) == pytest.approx(1.0)
    assert mean_cosine(3 * truth, truth) == pytest.approx(1.0)
    assert mean_cosine(-truth, truth) == pytest.approx(-1.0)
    noisy = truth + 0.5 * torch.randn_like(truth)
    per_pixel = (noisy * truth).sum(1) / (noisy.norm(dim=1) * truth.norm(dim=1))
    assert mean_cosine(noisy, truth) == pytest.approx(per_pixel.mean().item(), rel=1e-6)
    assert relative_error(noisy, truth) == pytest.approx(((noisy - truth).norm() / truth.norm()).item(), rel=1e-6)


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
    assert best.images == 2


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
    stack = load_jbu(shipped_oracle_jbu())
    assert stack.dim == 32 and stack.channel_norm is None
    oracle = create_backbone("oracle")
    images = photos(("chelsea", "coffee"), 224)                         # held out from its training crops
    jbu = evaluate_upsampler(oracle, stack, [images], recon_views=2)
    bilinear = evaluate_upsampler(oracle, create_upsampler("bilinear", 32), [images], recon_views=2)
    bicubic = evaluate_upsampler(oracle, create_upsampler("bicubic", 32), [images], recon_views=2)
    assert jbu.rel_error < 0.95 * bilinear.rel_error, (jbu, bilinear)
    assert jbu.rel_error < bicubic.rel_error, (jbu, bicubic)
    assert jbu.cosine > max(bilinear.cosine, bicubic.cosine)
