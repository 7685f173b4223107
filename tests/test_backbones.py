"""The backbone registry: presets, weights handling, the oracle."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

import featup_ops
from featup_ops import BackboneError, create_backbone
from featup_ops.oracle import OracleBackbone, oracle_weights

# name -> (dim, grid at 224 px), as documented in featup_ops.backbones.PRESETS
PRESET_GRIDS = {
    "dino16": (384, 14), "dino8": (384, 28), "dinov2": (384, 16), "clip": (512, 14), "vit": (384, 14),
    "resnet50": (2048, 7), "oracle": (32, 14),
}


@pytest.mark.parametrize("name", sorted(PRESET_GRIDS))
def test_preset_builds_and_gives_documented_grid(name):
    dim, grid = PRESET_GRIDS[name]
    bb = create_backbone(name, random_init=True)
    assert bb.dim == dim
    with torch.no_grad():
        out = bb(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, dim, grid, grid)
    assert bb.grid_size(224, 224) == (grid, grid)
    assert torch.isfinite(out).all()


@functools.cache
def _random_backbone(name: str):
    return create_backbone(name, random_init=True)


@pytest.mark.parametrize("name", ["dino16", "dinov2", "clip", "vit"])
def test_vit_features_are_the_last_normed_patch_tokens(name):
    """Against the whole-model forward: final tokens, prefix (CLS) tokens dropped, CLIP's head per token."""
    bb = _random_backbone(name)
    p = bb.patch_size
    x = torch.randn(2, 3, 5 * p, 7 * p, generator=torch.Generator().manual_seed(3))  # interpolated positions
    with torch.no_grad():
        tokens = bb.model.forward_features(x)[:, bb.model.num_prefix_tokens:]
        if name == "clip":
            tokens = bb.model.head(tokens)
        got = bb(x)
    assert got.shape == (2, bb.dim, 5, 7)
    torch.testing.assert_close(got, tokens.transpose(1, 2).reshape(2, bb.dim, 5, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dino16", "clip"])
def test_vit_features_match_the_blocks_run_by_hand(name):
    """At the native 224 px: patchify conv, CLS token, position embeddings, the blocks, the final norm."""
    bb = _random_backbone(name)
    m = bb.model
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens = m.patch_embed.proj(x).flatten(2).transpose(1, 2)             # (1, 196, D)
        tokens = torch.cat([m.cls_token.expand(1, -1, -1), tokens], dim=1) + m.pos_embed
        tokens = m.norm_pre(tokens)                                           # identity except CLIP
        for block in m.blocks:
            tokens = block(tokens)
        patches = m.norm(tokens)[:, 1:]
        if name == "clip":
            patches = patches @ m.head.weight.T + m.head.bias
        expected = patches.transpose(1, 2).reshape(1, -1, 14, 14)
        got = bb(x)
    assert m.num_prefix_tokens == 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_vit_position_embeddings_interpolate_for_other_sizes():
    bb = create_backbone("dino16", random_init=True)
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 160, 288))
    assert out.shape == (1, 384, 10, 18)


def test_any_timm_id_works():
    bb = create_backbone("resnet18", random_init=True)
    assert bb.dim == 512 and bb.patch_size == 32
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 128, 96)).shape == (1, 512, 4, 3)


def test_no_weights_is_an_error_not_a_random_model():
    with pytest.raises(BackboneError, match="random-init"):
        create_backbone("dino16")


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="unknown backbone 'not_a_model'"):
        create_backbone("not_a_model", random_init=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_weights_from_a_file_are_loaded(tmp_path, fmt):
    torch.manual_seed(123)
    source = create_backbone("vit_tiny_patch16_224", random_init=True)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in source.model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    loaded = create_backbone("vit_tiny_patch16_224", weights=str(path))
    torch.testing.assert_close(loaded.model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert loaded.weights_id.startswith("file:")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(loaded(x), source(x))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"something.weight": torch.zeros(3)}, str(path))
    with pytest.raises(BackboneError, match="missing tensors"):
        create_backbone("vit_tiny_patch16_224", weights=str(path))


def test_channel_norm_option():
    bb = create_backbone("oracle", channel_norm=True)
    with torch.no_grad():
        out = bb(torch.randn(1, 3, 64, 64))
    torch.testing.assert_close(out.mean(1), torch.zeros(1, 4, 4), atol=1e-5, rtol=0)


def test_oracle_definition():
    w1, w2 = oracle_weights(32)
    g = torch.Generator().manual_seed(1)
    torch.testing.assert_close(w1, torch.randn(32, 3, generator=g) / 2)
    torch.testing.assert_close(w2, torch.randn(32, 32, generator=g) / 5)
    bb = OracleBackbone()
    x = torch.randn(1, 3, 32, 48)
    f = torch.tanh(3 * torch.einsum("oh,bhyx->boyx", w2, torch.tanh(3 * torch.einsum("hc,bcyx->bhyx", w1, x))))
    torch.testing.assert_close(bb.true_features(x), f)
    torch.testing.assert_close(bb(x), torch.nn.functional.avg_pool2d(f, 16))
    assert bb.true_features(x, (16, 24)).shape == (1, 32, 16, 24)
    with pytest.raises(BackboneError):
        create_backbone("oracle", weights="x.safetensors")


def test_feature_model_lowres_and_highres_sizes():
    model = featup_ops.FeatureModel.create("oracle", "jbu", random_init=True)
    lr, hr = model(torch.rand(2, 3, 64, 96))
    assert lr.shape == (2, 32, 4, 6) and hr.shape == (2, 32, 64, 96)
    assert model.output_size(64, 96) == (64, 96)
    assert model.describe()["weights"]["backbone"].startswith("oracle")


def test_registering_a_name_twice_warns(recwarn):
    from featup_ops.backbones import _FACTORIES, register_backbone
    from featup_ops.model import _UPSAMPLERS, register_upsampler

    def factory(**kwargs):
        raise AssertionError("never built")

    try:
        register_backbone("dup_test_net")(factory)
        register_upsampler("dup_test_up", "x")(factory)
        assert not recwarn.list  # a first registration is silent
        with pytest.warns(UserWarning, match="backbone 'dup_test_net' registered twice"):
            register_backbone("dup_test_net")(factory)
        with pytest.warns(UserWarning, match="upsampler 'dup_test_up' registered twice"):
            register_upsampler("dup_test_up", "x")(factory)
        with pytest.warns(UserWarning, match="backbone 'dinov2' registered twice"):
            register_backbone("dinov2")(factory)  # a preset name counts too
    finally:
        for name in ("dup_test_net", "dinov2"):
            _FACTORIES.pop(name, None)
        _UPSAMPLERS.pop("dup_test_up", None)
