"""The JBU stack against the reference implementation's vectors, and checkpoint loading."""

from __future__ import annotations

import io

import pytest
import torch

import featup_ops
from featup_ops import CheckpointError, JBUStack, load_jbu, save_jbu


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_lightning_checkpoint_reproduces_reference(jbu_vectors):
    stack = load_jbu(jbu_vectors["checkpoint"])
    assert not stack.training
    assert stack.dim == 32 and stack.stages == 4
    with torch.no_grad():
        out = stack(jbu_vectors["source"], jbu_vectors["image"])
    assert out.shape == jbu_vectors["expected"].shape == (2, 32, 112, 144)
    assert rel_error(out, jbu_vectors["expected"]) < 1e-4


def test_plain_torch_reference_reproduces_the_published_vectors(jbu_vectors):
    """tests.reference_features (the JBU by unfold, what the job tests compare caches with) is itself right."""
    from tests.reference_features import jbu_highres

    state = load_jbu(jbu_vectors["checkpoint"]).state_dict()  # the Lightning names mapped to this stack's
    with torch.no_grad():
        out = jbu_highres(state, jbu_vectors["source"], jbu_vectors["image"])
    assert rel_error(out, jbu_vectors["expected"]) < 1e-4


def test_lightning_checkpoint_file_and_channel_norm(jbu_vectors, tmp_path):
    path = tmp_path / "dino16_jbu_stack_cocostuff.ckpt"
    torch.save(jbu_vectors["checkpoint"], path)
    stack = load_jbu(str(path))
    state = jbu_vectors["checkpoint"]["state_dict"]
    # the channel norm comes back with the checkpoint's (perturbed) affine parameters
    assert stack.channel_norm is not None
    torch.testing.assert_close(stack.channel_norm.norm.weight, state["model.1.norm.weight"])
    feats = torch.randn(1, 32, 3, 3)
    normed = stack.normalize_features(feats)
    expected = torch.nn.functional.layer_norm(feats.permute(0, 2, 3, 1), (32,), state["model.1.norm.weight"],
                                              state["model.1.norm.bias"]).permute(0, 3, 1, 2)
    torch.testing.assert_close(normed, expected)
    # training-only entries are not part of the upsampler
    assert not any(k.startswith(("downsampler", "scale_net")) for k in stack.state_dict())


def test_own_format_round_trip(jbu_vectors, tmp_path):
    stack = load_jbu(jbu_vectors["checkpoint"])
    url = str(tmp_path / "sub" / "jbu.safetensors")
    save_jbu(stack, url)
    again = load_jbu(url)
    assert again.config() == stack.config()
    with torch.no_grad():
        torch.testing.assert_close(again(jbu_vectors["source"], jbu_vectors["image"]),
                                   stack(jbu_vectors["source"], jbu_vectors["image"]))
    # fsspec URLs work the same way
    save_jbu(stack, "memory://ckpts/jbu.safetensors")
    assert load_jbu("memory://ckpts/jbu.safetensors").config() == stack.config()


def test_parameter_count_matches_method():
    stack = JBUStack(384)
    assert sum(p.numel() for p in stack.parameters()) == 172_772
    assert sum(p.numel() for p in stack.up1.parameters()) == 6_233


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_fewer_stages_and_non_square(stages):
    stack = JBUStack(8, stages=stages).eval()
    feats = torch.randn(2, 8, 3, 5)
    image = torch.randn(2, 3, 48, 80)
    out = stack(feats, image)
    assert out.shape == (2, 8, 3 * 2**stages, 5 * 2**stages)
    assert stack.scale == 2**stages


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    stack = JBUStack(6, stages=2).train()
    feats = torch.randn(2, 6, 4, 4, requires_grad=True)
    out = stack(feats, torch.randn(2, 3, 16, 16))
    out.square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for name, p in stack.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_jbu_float64_gradcheck_through_range_kernel():
    torch.manual_seed(1)
    stack = JBUStack(3, stages=1).double().eval()
    feats = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    image = torch.randn(1, 3, 6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, i: stack(f, i), (feats, image))


def test_bad_checkpoints_are_refused(jbu_vectors, tmp_path):
    state = dict(jbu_vectors["checkpoint"]["state_dict"])
    del state["upsampler.up2.range_temp"]
    with pytest.raises(CheckpointError, match="missing"):
        load_jbu({"state_dict": state})
    with pytest.raises(CheckpointError, match="no config"):
        load_jbu({"weight": torch.zeros(3)})
    bad = tmp_path / "junk.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_jbu(str(bad))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_jbu(str(tmp_path / "absent.safetensors"))


def test_wrong_feature_width_is_a_clear_error(jbu_vectors):
    stack = load_jbu(jbu_vectors["checkpoint"])
    with pytest.raises(ValueError, match="32 channels"):
        stack(torch.randn(1, 16, 4, 4), torch.randn(1, 3, 64, 64))


def test_interpolation_baselines_share_the_call_signature():
    feats = torch.randn(2, 4, 3, 5)
    image = torch.randn(2, 3, 48, 80)
    bil = featup_ops.Bilinear()
    out = bil(feats, image)
    assert out.shape == (2, 4, 48, 80)
    torch.testing.assert_close(out, torch.nn.functional.interpolate(feats, size=(48, 80), mode="bilinear"))
    assert featup_ops.Bicubic(scale=4)(feats, image).shape == (2, 4, 12, 20)


def test_upsampler_registry():
    assert {"bilinear", "bicubic", "jbu"} <= set(featup_ops.list_upsamplers())
    with pytest.raises(featup_ops.UpsamplerError, match="trained weights"):
        featup_ops.create_upsampler("jbu", 384)
    with pytest.raises(featup_ops.UpsamplerError, match="unknown upsampler"):
        featup_ops.create_upsampler("magic", 384)
    a = featup_ops.create_upsampler("jbu", 16, random_init=True)
    b = featup_ops.create_upsampler("jbu", 16, random_init=True)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)  # random init is deterministic across workers


def test_jbu_weights_for_another_width_are_refused(jbu_vectors):
    buf = io.BytesIO()
    torch.save(jbu_vectors["checkpoint"], buf)
    with pytest.raises(featup_ops.UpsamplerError, match="32-channel"):
        featup_ops.create_upsampler("jbu", 384, weights=jbu_vectors["checkpoint"])
