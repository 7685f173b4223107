"""AnyUp: parity with the reference vectors (published checkpoint layout), fused vs dense attention on other
shapes, the convex-combination structure, strict loading from every kind of source, and the registry."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

import cuda_ext
import featup_ops
from featup_ops import CheckpointError, FeatureModel, UpsamplerError, load_anyup, random_anyup
from featup_ops import anyup_inference
from featup_ops.anyup import dense_window_attention, window_bounds
from featup_ops.checkpoints import state_fingerprint

DATA = Path(__file__).parent / "data"
HAS_FUSED = hasattr(cuda_ext, "window_attention")
requires_fused = pytest.mark.skipif(not HAS_FUSED, reason="cuda_ext.window_attention (issue 9's fused operator) "
                                                          "is not on this branch yet")
ATTENTION = "fused" if HAS_FUSED else "dense"  # the default path, wherever it exists


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@functools.cache
def vectors(name: str) -> dict:
    return torch.load(DATA / f"anyup_vectors_{name}.pt", weights_only=True)


@pytest.fixture(scope="module")
def state() -> dict:
    return vectors("small")["state_dict"]


def run(model: featup_ops.AnyUp, vec: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(vec["image"], vec["features"], vec["output_size"], **kwargs)


# --- parity with the reference vectors -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small", "resize"])
def test_dense_path_reproduces_reference(name):
    vec = vectors(name)
    model = load_anyup(vec["state_dict"], attention="dense")
    assert not model.training
    out = run(model, vec)
    assert out.shape == vec["output"].shape
    assert rel_error(out, vec["output"]) <= 1e-5
    assert max_rel_error(out, vec["output"]) <= 1e-5
    assert max_rel_error(run(model, vec, q_chunk_size=97), vec["output"]) <= 1e-5


@requires_fused
@pytest.mark.parametrize("name", ["small", "resize"])
def test_fused_path_reproduces_reference(name):
    vec = vectors(name)
    out = run(load_anyup(vec["state_dict"], attention="fused"), vec)
    assert rel_error(out, vec["output"]) <= 1e-5
    assert max_rel_error(out, vec["output"]) <= 1e-5


@requires_fused
def test_window_bounds_agree_with_the_operator_package():
    sizes = [(56, 7), (30, 7), (50, 9), (448, 32), (224, 16), (10, 10), (7, 64), (1, 1), (3, 50)]
    for n_q, n_k in sizes:
        rows, _ = cuda_ext.anyup_windows(n_q, 1, n_k, 1)
        torch.testing.assert_close(rows.cpu(), window_bounds(n_q, n_k), rtol=0, atol=0, msg=f"{n_q} -> {n_k}")


# --- other shapes, channel counts and chunking ---------------------------------------------------------------

SHAPES = {  # name: (batch, channels, feature grid, image size, output size)
    "non-square": (2, 16, (5, 7), (40, 56), None),
    "output-size": (1, 16, (5, 7), (40, 56), (24, 36)),
    "upscaled-output": (1, 8, (4, 4), (32, 32), (48, 40)),
    "one-channel": (2, 1, (6, 6), (36, 36), None),
    "384-channels": (1, 384, (8, 8), (48, 64), None),
    "grid-not-dividing": (1, 24, (7, 9), (50, 70), None),
}


def case(name: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    batch, channels, grid, image, out = SHAPES[name]
    g = torch.Generator().manual_seed(len(name))
    return torch.randn(batch, 3, *image, generator=g), torch.randn(batch, channels, *grid, generator=g), out


@requires_fused
@pytest.mark.parametrize("name", list(SHAPES))
def test_fused_matches_dense(name):
    image, feats, size = case(name)
    model = random_anyup("dense")
    with torch.no_grad():
        dense = model(image, feats, size)
        model.attention = "fused"
        fused = model(image, feats, size)
    expected = size or tuple(image.shape[2:])
    assert fused.shape == (feats.shape[0], feats.shape[1], *expected)
    assert max_rel_error(fused, dense) <= 1e-5


@pytest.mark.parametrize("name", ["output-size", "grid-not-dividing"])
def test_query_chunking_never_changes_the_result(name):
    image, feats, size = case(name)
    size = size or tuple(image.shape[2:])
    model = random_anyup("dense")
    with torch.no_grad():
        whole = model(image, feats, size)
        assert max_rel_error(model(image, feats, size, q_chunk_size=101), whole) <= 1e-6
        e = model.embed(image)
        q, k = model.queries(e, size), model.keys(e, feats)
        rows, cols = window_bounds(size[0], feats.shape[2]), window_bounds(size[1], feats.shape[3])
        first_rows = dense_window_attention(q[:, :, :4], k, feats, rows[:4], cols)
        assert max_rel_error(first_rows, whole[:, :, :4]) <= 1e-5
        for chunk in (1, 37, 10**6):  # float rounding of differently blocked matmuls, nothing more
            chunked = dense_window_attention(q[:, :, :4], k, feats, rows[:4], cols, q_chunk_size=chunk)
            assert max_rel_error(chunked, first_rows) <= 1e-6
    with pytest.raises(ValueError, match="q_chunk_size"):
        model(image, feats, size, q_chunk_size=0)


def test_output_is_a_windowed_convex_combination_of_the_input_vectors():
    """With one-hot features (one channel per grid cell) the output *is* the attention map: non-negative,
    summing to one, zero outside each query's window; scaling each cell's vector by a positive factor
    leaves the keys (built from l2-normalised features) unchanged, so it scales the weights' columns."""
    h, w, H, W = 5, 6, 20, 30
    onehot = torch.eye(h * w).reshape(1, h * w, h, w)
    image = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    model = random_anyup(ATTENTION)
    with torch.no_grad():
        attn = model(image, onehot).reshape(h, w, H, W)
        scale = torch.rand(h, w, generator=torch.Generator().manual_seed(4)) + 0.5
        scaled = model(image, onehot * scale[None, None]).reshape(h, w, H, W)
    assert attn.min() >= 0
    torch.testing.assert_close(attn.sum(dim=(0, 1)), torch.ones(H, W))
    rows, cols = window_bounds(H, h).tolist(), window_bounds(W, w).tolist()
    inside = torch.zeros(h, w, H, W, dtype=torch.bool)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            inside[r0:r1, c0:c1, i, j] = True
    assert attn[~inside].abs().max() == 0
    assert attn[inside].min() > 0
    torch.testing.assert_close(scaled, attn * scale[:, :, None, None], rtol=1e-5, atol=1e-7)


def test_constant_features_stay_constant_and_scale_passes_through():
    model = random_anyup(ATTENTION)
    image = torch.randn(2, 3, 32, 48)
    vector = torch.randn(2, 40, 1, 1)
    with torch.no_grad():
        out = model(image, vector.expand(2, 40, 4, 6).contiguous())
        feats = torch.randn(2, 40, 4, 6)
        assert max_rel_error(model(image, 2.5 * feats), 2.5 * model(image, feats)) <= 1e-5
    torch.testing.assert_close(out, vector.expand_as(out), rtol=1e-5, atol=1e-6)


def test_channel_order_matters_only_through_the_published_unification():
    """The published feature-unification reads its (C*d) responses as (d, C) in the same memory, so the keys,
    unlike the values, are not invariant to the channel order: permuting channels is NOT a plain permutation
    of the output (checked here so nobody "fixes" the layout and silently leaves the published weights)."""
    vec = vectors("small")
    model = load_anyup(vec["state_dict"], attention="dense")
    perm = torch.randperm(vec["features"].shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        permuted = model(vec["image"], vec["features"][:, perm])
    assert rel_error(permuted, vec["output"][:, perm]) > 1e-3


def test_autocast_and_half_inputs_compute_in_float32():
    image, feats, _ = case("non-square")
    model = random_anyup(ATTENTION)
    with torch.no_grad():
        ref = model(image, feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(image, feats)
        half = model(image.bfloat16(), feats.bfloat16())
        ref_half = model(image.bfloat16().float(), feats.bfloat16().float())
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, ref, rtol=1e-6, atol=1e-6)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref_half, rtol=1e-2, atol=1e-2)  # bfloat16 output rounding only


@pytest.mark.parametrize("big_maps", [False, True], ids=["small-maps", "big-maps"])
@pytest.mark.parametrize("name", ["non-square", "output-size", "upscaled-output"])
def test_inference_buffers_match_the_module_path(name, big_maps, monkeypatch):
    """Without gradients the full-resolution encoders write into reused buffers (anyup_inference); with
    gradients the plain modules run. Both compute the same function. `big_maps` treats every map as too big
    for the heap, as 448 px maps are, so the buffer-reusing GroupNorm runs too."""
    if big_maps:
        monkeypatch.setattr(anyup_inference, "HEAP_SERVED_BYTES", 0)
    image, feats, size = case(name)
    model = random_anyup(ATTENTION)
    with torch.no_grad():
        fast = model(image, feats, size)
    modules = model(image, feats, size).detach()
    assert max_rel_error(fast, modules) <= 1e-5
    vec = vectors("small")
    model = load_anyup(vec["state_dict"], attention=ATTENTION)
    assert max_rel_error(model(vec["image"], vec["features"]).detach(), vec["output"]) <= 1e-5


def test_buffer_group_norm_is_as_accurate_as_the_module():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 40, 50, generator=g) * 3 + 20  # an offset mean: one-pass statistics would suffer
    norm = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(norm.weight, generator=g)
    torch.nn.init.normal_(norm.bias, generator=g)
    with torch.no_grad():
        exact = torch.nn.functional.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double())
        module = norm(x)
        into = anyup_inference.group_norm_into(x, norm, torch.empty_like(x))
        in_place = x.clone()
        anyup_inference.group_norm_into(in_place, norm, in_place)
    assert max_rel_error(into.double(), exact) <= 2 * max(max_rel_error(module.double(), exact), 1e-7)
    torch.testing.assert_close(in_place, into)


def test_gradients_reach_every_used_parameter():
    model = random_anyup("dense").train()
    image, feats = torch.randn(1, 3, 24, 20), torch.randn(1, 6, 4, 3, requires_grad=True)
    model(image, feats).square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    unused = ("cross_decode.cross_attn.attention.out_proj.weight", "cross_decode.cross_attn.attention.out_proj.bias")
    for name, p in model.named_parameters():
        if name not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dense_attention_masks_outside_the_window():
    """The reference formula on hand-made heads: a key outside the window never contributes."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 3, 4, 8, generator=g), torch.randn(1, 2, 5, 5, 8, generator=g)
    v = torch.randn(1, 3, 5, 5, generator=g)
    rows = torch.tensor([[0, 2], [1, 4], [3, 5]])
    cols = torch.tensor([[0, 1], [0, 3], [2, 5], [4, 5]])
    out = dense_window_attention(q, k, v, rows, cols)
    for i in range(3):
        for j in range(4):
            (r0, r1), (c0, c1) = rows[i].tolist(), cols[j].tolist()
            keys = k[0, :, r0:r1, c0:c1].reshape(2, -1, 8)
            weights = torch.softmax(keys @ q[0, :, i, j, :, None] / 8**0.5, dim=1).mean(0)[:, 0]
            expected = v[0, :, r0:r1, c0:c1].reshape(3, -1) @ weights
            torch.testing.assert_close(out[0, :, i, j], expected)


def test_bad_calls_are_clear_errors():
    model = random_anyup("dense")
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        model(torch.randn(1, 4, 8, 8), torch.randn(1, 2, 2, 2))
    with pytest.raises(ValueError, match="batch"):
        model(torch.randn(2, 3, 8, 8), torch.randn(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"2 x 2.*\(1, 5\)"):
        model(torch.randn(1, 3, 8, 8), torch.randn(1, 2, 1, 5))
    with pytest.raises(ValueError, match="output_size"):
        model(torch.randn(1, 3, 8, 8), torch.randn(1, 2, 2, 2), output_size=(0, 4))
    with pytest.raises(ValueError, match="attention"):
        model.attention = "sparse"


# --- loading ------------------------------------------------------------------------------------------------

def test_state_dict_layout_is_the_published_one(state):
    model = random_anyup("dense")
    assert sorted(model.state_dict()) == sorted(state)
    assert len(state) == 73
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values())


def test_strict_loading_names_the_offending_key(state):
    missing = {k: v for k, v in state.items() if k != "rope.freqs"}
    with pytest.raises(CheckpointError, match=r"missing keys \['rope.freqs'\]"):
        load_anyup(missing, attention="dense")
    extra = {**state, "decoder.head.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \['decoder.head.weight'\]"):
        load_anyup(extra, attention="dense")
    wrong = {**state, "key_features_encoder.0.basis": torch.zeros(128, 1, 3, 3)}
    with pytest.raises(CheckpointError, match=r"key_features_encoder.0.basis \(128, 1, 3, 3\)"):
        load_anyup(wrong, attention="dense")


def test_loads_local_pth_safetensors_and_memory_urls(state, tmp_path):
    from safetensors.torch import save_file

    vec = vectors("small")
    torch.save(state, tmp_path / "anyup_paper.pth")
    save_file(state, str(tmp_path / "anyup.safetensors"))
    import fsspec

    with fsspec.open("memory://weights/anyup.pth", "wb") as f:
        torch.save(state, f)
    for source in (str(tmp_path / "anyup_paper.pth"), str(tmp_path / "anyup.safetensors"),
                   "memory://weights/anyup.pth"):
        model = load_anyup(source, attention="dense")
        assert model.weights_id == f"file:{state_fingerprint(state)}"
        assert max_rel_error(run(model, vec), vec["output"]) <= 1e-5
    with pytest.raises(CheckpointError, match="anyup_multi_backbone.pth"):
        load_anyup(f"file://{tmp_path}/absent.pth", attention="dense")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_anyup(str(tmp_path / "junk.pth"), attention="dense")


def test_loads_from_s3(state, s3_bucket):
    import s3fs

    with s3fs.S3FileSystem().open(f"{s3_bucket}/ckpt/anyup.pth", "wb") as f:
        torch.save(state, f)
    model = load_anyup(f"s3://{s3_bucket}/ckpt/anyup.pth", attention="dense")
    torch.testing.assert_close(model.state_dict()["rope.freqs"], state["rope.freqs"])


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet test output
        pass


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder, stop)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Files, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, server.shutdown
    server.shutdown()
    server.server_close()


def test_http_download_goes_through_the_hub_cache(state, http_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    base, root, stop = http_root
    torch.save(state, root / "anyup_multi_backbone.pth")
    url = f"{base}/anyup_multi_backbone.pth"
    model = load_anyup(url, attention="dense")
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "anyup_multi_backbone.pth"
    assert cached.exists()
    assert model.weights_id == f"file:{state_fingerprint(state)}"
    stop()  # the host is gone: the cached copy serves
    again = load_anyup(url, attention="dense")
    torch.testing.assert_close(again.state_dict()["rope.freqs"], state["rope.freqs"])


def test_corrupt_download_names_the_cached_file(http_root, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    base, root, _ = http_root
    (root / "broken.pth").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(CheckpointError, match=r"broken.pth.*delete it"):
        load_anyup(f"{base}/broken.pth", attention="dense")


def test_offline_is_a_clear_error_saying_which_file_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    url = f"http://127.0.0.1:{closed}/anyup_multi_backbone.pth"
    with pytest.raises(CheckpointError, match=r"cannot download .*anyup_multi_backbone.pth.*pass the file") as err:
        load_anyup(url, attention="dense")
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "anyup_multi_backbone.pth") in str(err.value)
    # a host that accepts the connection but never answers: the short timeout ends it
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        with pytest.raises(CheckpointError, match="timed out"):
            load_anyup(f"http://127.0.0.1:{silent.getsockname()[1]}/anyup.pth", attention="dense", timeout=0.5)
    # no weights: the registry names the published multi-backbone checkpoint (here pointed at the closed port)
    monkeypatch.setattr(featup_ops.anyup_weights, "ANYUP_MULTI_BACKBONE_URL", url)
    with pytest.raises(CheckpointError, match=url):
        featup_ops.create_upsampler("anyup", 384, attention="dense")


# --- registry and FeatureModel -------------------------------------------------------------------------------

def test_registry_builds_anyup_for_any_width(state):
    assert "anyup" in featup_ops.list_upsamplers()
    assert featup_ops.ANYUP_MULTI_BACKBONE_URL.endswith("/checkpoint_v2/anyup_multi_backbone.pth")
    assert featup_ops.ANYUP_PAPER_URL.endswith("/checkpoint/anyup_paper.pth")
    up = featup_ops.create_upsampler("anyup", 7, weights=state, attention=ATTENTION, q_chunk_size=64)
    assert not up.training and up.weights_id == f"state:{state_fingerprint(state)}"
    vec = vectors("small")
    with torch.no_grad():  # the registry's call order: features first, then the guidance image
        out = up(vec["features"], vec["image"])
    assert max_rel_error(out, vec["output"]) <= 1e-5
    a = featup_ops.create_upsampler("anyup", 16, random_init=True, attention=ATTENTION)
    b = featup_ops.create_upsampler("anyup", 16, random_init=True, attention=ATTENTION)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, msg=n)  # random init is deterministic across workers
    with pytest.raises(UpsamplerError, match="attention"):
        featup_ops.create_upsampler("anyup", 16, random_init=True, attention="sparse")
    with pytest.raises(UpsamplerError, match="q_chunk_size"):
        featup_ops.create_upsampler("anyup", 16, random_init=True, attention=ATTENTION, q_chunk_size=0)


def test_feature_model_outputs_at_the_image_size(state, tmp_path):
    model = FeatureModel.create("oracle", "anyup", random_init=True, upsampler_options={"attention": ATTENTION})
    images = torch.rand(2, 3, 48, 80)
    lowres, highres = model(images)
    assert lowres.shape == (2, model.dim, 3, 5)
    assert highres.shape == (2, model.dim, 48, 80)
    assert model.output_size(48, 80) == (48, 80) and model.output_size(50, 70) == (50, 70)
    described = model.describe()
    assert described["upsampler"]["kind"] == "anyup" and described["upsampler"]["output_size"] == "image"
    assert described["scale"] is None
    assert described["weights"]["upsampler"] == "random-init:seed0"
    with torch.no_grad():
        direct = model.upsampler.anyup(FeatureModel.guidance(images), lowres)
    torch.testing.assert_close(highres, direct)
    # weights from a file: fingerprinted as the file's state
    torch.save(state, tmp_path / "anyup_paper.pth")
    loaded = FeatureModel.create("oracle", "anyup", upsampler_weights=str(tmp_path / "anyup_paper.pth"),
                                 upsampler_options={"attention": ATTENTION})
    assert loaded.describe()["weights"]["upsampler"] == f"file:{state_fingerprint(state)}"
    # a fixed-factor upsampler keeps its grid-based size
    bilinear = FeatureModel.create("oracle", "bilinear")
    assert bilinear.output_size(50, 70) == (48, 64) and bilinear.scale == 16
