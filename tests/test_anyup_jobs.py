"""AnyUp wherever an upsampler is named (caching on S3 and local disk, the lowres replay, evaluation, previews,
the training jobs), and the manifest's per-sample quality columns, checked against computations made here."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import featup_ops
from featup_ops import AnyUp, FeatureModel
from featup_ops.backbones import RANDOM_INIT_SEED
from featup_ops.upsampler_metrics import lowres_agreement
from pipeline.caching.driver import run_job
from pipeline.options import ConfigError
from pipeline.reading.feature_cache import FeatureCache
from pipeline.storage.images import load_sample_image
from pipeline.storage.shards import iter_samples
from tests.reference_features import normalize, oracle_lowres, oracle_pixels
from tests.test_job import job_config

SIZE = 64  # images; the oracle's grid is SIZE / 16 = 4 cells a side


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """The weights hash a run records: sha256 over the sorted names, each with its shape and raw bytes, 16 hex."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().reshape(-1)
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def other_anyup_state() -> dict[str, torch.Tensor]:
    """AnyUp weights unlike the --random-init ones (another seed), in the published layout."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED + 1)
        return {k: v.clone() for k, v in AnyUp(attention="dense").state_dict().items()}


def dense_anyup(state: dict[str, torch.Tensor]) -> AnyUp:
    """AnyUp on its dense reference attention (all keys, masked outside the window) with `state` loaded."""
    model = AnyUp(attention="dense").eval()
    model.load_state_dict(state, strict=True)
    return model


def shard_images(url: str, size: int = SIZE, options=None) -> dict[str, torch.Tensor]:
    """key -> (1, 3, size, size) [0, 1] image, as the job crops it."""
    out = {}
    for sample in iter_samples(url, options):
        img, _ = load_sample_image(sample, size)
        out[sample["__key__"]] = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    return out


def reference(model: AnyUp, images01: torch.Tensor, lowres: torch.Tensor | None = None,
              output_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(C, H', W') AnyUp features of the oracle's low-res features of `images01` (or the given `lowres`)."""
    with torch.no_grad():
        lr = oracle_lowres(images01) if lowres is None else lowres
        return model(normalize(images01), lr, output_size=output_size)[0]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def quality_here(hr: np.ndarray, lr: np.ndarray) -> tuple[float, float]:
    """(||mean of each cell of hr - lr|| / ||lr||, mean over cells of the cosine) in float64, hr an exact
    multiple of the grid."""
    hr64, lr64 = torch.from_numpy(np.asarray(hr, np.float64))[None], torch.from_numpy(np.asarray(lr, np.float64))[None]
    pooled = F.avg_pool2d(hr64, hr64.shape[-1] // lr64.shape[-1])
    cos = (pooled * lr64).sum(1) / (pooled.norm(dim=1) * lr64.norm(dim=1))
    return ((pooled - lr64).norm() / lr64.norm()).item(), cos.mean().item()


# -- the caching job -------------------------------------------------------------------------------------------
def test_anyup_job_on_s3_weights_hash_quality_eval_and_preview(ray_local, s3_bucket, photo_shards, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(photo_shards / "photos-000000.tar"), f"{s3_bucket}/in/photos-000000.tar")
    state = other_anyup_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    weights = f"s3://{s3_bucket}/weights/anyup_paper.pth"
    fs.pipe(weights[len("s3://"):], buf.getvalue())
    shard, out = f"s3://{s3_bucket}/in/photos-000000.tar", f"s3://{s3_bucket}/feats/anyup.zarr"
    summary = run_job(job_config([shard], out, upsampler="anyup", upsampler_weights=weights, random_init=False,
                                 dtype="float32", labels="none", previews=0))
    assert summary.ok == 3

    cache = FeatureCache(out)
    model = dense_anyup(state)
    images = shard_images(shard)
    rows = {r["key"]: r for r in cache.manifest.to_pylist()}
    for key, image in images.items():
        got, expected = cache[key], reference(model, image).numpy()
        assert got.shape == (32, SIZE, SIZE)  # at the image's size, whatever the grid (4 x 4)
        assert rel(got, expected) <= 1e-5, key
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
        # the quality columns, recomputed from the stored high-res and low-res features
        rel_error, cosine = quality_here(got, cache.lowres(key))
        assert rows[key]["pooled_rel_error"] == pytest.approx(rel_error, rel=1e-4, abs=1e-6), key
        assert rows[key]["pooled_cosine"] == pytest.approx(cosine, rel=1e-5), key

    run = cache.run
    assert run["settings"]["weights"]["upsampler"] == f"file:{fingerprint(state)}"
    assert run["model"]["upsampler_weights"] == weights and run["model"]["upsampler"]["kind"] == "anyup"
    assert run["model"]["output_size"] == [SIZE, SIZE] and run["model"]["scale"] is None

    # evaluation: the same weights from S3 beside bilinear, scored against the oracle's truth computed here
    import eval_upsampler

    scores_json = tmp_path / "scores.json"
    assert eval_upsampler.main(["--input", shard, "--backbone", "oracle", "--image-size", str(SIZE),
                                "--upsampler", "bilinear", "--upsampler", "anyup", "--upsampler-weights", weights,
                                "--recon-views", "1", "--json", str(scores_json)]) == 0
    scores = json.loads(scores_json.read_text())
    batch = torch.cat(list(images.values()))
    truth = oracle_pixels(batch)
    with torch.no_grad():
        hr = model(normalize(batch), oracle_lowres(batch))
    assert scores["anyup"]["rel_error"] == pytest.approx(rel(hr, truth), rel=1e-4)
    assert scores["anyup"]["cosine"] == pytest.approx(F.cosine_similarity(hr, truth, dim=1).mean().item(), rel=1e-5)
    assert scores["anyup"]["images"] == 3 and scores["anyup"]["rel_error"] != scores["bilinear"]["rel_error"]

    # previews: AnyUp with the same weights re-run on the cached low-res features and the re-read image draws
    # the cached features again; bilinear draws something else
    import preview

    key = next(iter(images))
    assert preview.main(["--cache", out, "--key", key, "--out", str(tmp_path / "pv"), "--upsampler", "anyup",
                         "--upsampler", "bilinear", "--upsampler-weights", weights]) == 0
    strip = np.asarray(Image.open(tmp_path / "pv" / f"{key}.png")).astype(int)
    assert strip.shape == (SIZE, 5 * SIZE, 3)  # image | low-res | cached | anyup | bilinear
    cached, again, bilinear = (strip[:, i * SIZE:(i + 1) * SIZE] for i in (2, 3, 4))
    assert np.abs(again - cached).max() <= 1
    assert np.abs(bilinear - cached).mean() > 5


@pytest.fixture(scope="module")
def local_runs(ray_local, photo_shards, tmp_path_factory):
    """Two --random-init AnyUp caches of one shard at half the image's resolution: float32 (through the command
    line) and lowres."""
    import upsample_coco

    root = tmp_path_factory.mktemp("anyup_local")
    shard = f"{photo_shards}/photos-000000.tar"
    common = ["--input", shard, "--backbone", "oracle", "--upsampler", "anyup", "--random-init",
              "--output-scale", "0.5", "--image-size", str(SIZE), "--batch-size", "2", "--labels", "oracle",
              "--previews", "0"]
    assert upsample_coco.main([*common, "--output", str(root / "eager.zarr"), "--dtype", "float32"]) == 0
    assert upsample_coco.main([*common, "--output", str(root / "lowres.zarr"), "--storage", "lowres"]) == 0
    return shard, FeatureCache(str(root / "eager.zarr")), FeatureCache(str(root / "lowres.zarr"))


def test_local_random_init_job_matches_the_dense_reference_at_half_size(local_runs):
    shard, eager, lowres = local_runs
    # the stored weights file of the lowres cache, read here without the project's loader
    stored = load_file(str(Path(lowres.url) / "upsampler.safetensors"))
    with torch.random.fork_rng(devices=[]):  # --random-init: AnyUp as constructed under the documented seed
        torch.manual_seed(RANDOM_INIT_SEED)
        initial = AnyUp(attention="dense").state_dict()
    assert stored.keys() == initial.keys()
    for name in initial:
        torch.testing.assert_close(stored[name], initial[name], rtol=0, atol=0, msg=name)
    model = dense_anyup(stored)
    for key, image in shard_images(shard).items():
        got, expected = eager[key], reference(model, image, output_size=(SIZE // 2, SIZE // 2)).numpy()
        assert got.shape == (32, SIZE // 2, SIZE // 2)
        assert rel(got, expected) <= 1e-5, key
    for cache in (eager, lowres):
        assert cache.run["settings"]["upsampler_options"] == {"output_scale": 0.5}
        assert cache.run["model"]["output_size"] == [SIZE // 2, SIZE // 2]
        assert cache.run["settings"]["weights"]["upsampler"] == "random-init:seed0"
        assert "upsampler_weights" not in cache.run["model"]


def test_lowres_replay_is_the_eager_anyup(local_runs):
    shard, eager, lowres = local_runs
    model = dense_anyup(load_file(str(Path(lowres.url) / "upsampler.safetensors")))
    for key in eager.keys():
        replayed = lowres[key]
        assert replayed.shape == (32, SIZE // 2, SIZE // 2)
        # exactly AnyUp on what the cache holds: its float16 low-res features and its stored (JPEG) image
        image = torch.from_numpy(lowres.image(key).copy())[None].float() / 255
        stored_lr = torch.from_numpy(lowres.lowres(key).astype(np.float32))[None]
        expected = reference(model, image, stored_lr, output_size=(SIZE // 2, SIZE // 2)).numpy()
        assert rel(replayed, expected) <= 1e-5, key
        # and the eager features to the preset's documented bound (the JPEG changes the guidance a little)
        a, b = torch.from_numpy(replayed), torch.from_numpy(eager[key])
        assert F.cosine_similarity(a, b, dim=0).mean().item() >= 0.999, key
        assert rel(replayed, eager[key]) < 0.02, key


def test_probe_trains_on_replayed_anyup_features(local_runs, tmp_path):
    """train_probe reads the lowres AnyUp cache (replayed in a DataLoader worker process); its reported accuracy is
    the saved probe's on the replayed validation features, recomputed here."""
    from pipeline.workflows.probe_on_cache import ProbeJobConfig, load_probe, predict, run_probe

    _, _, lowres = local_runs
    metrics = run_probe(ProbeJobConfig(cache=lowres.url, output=str(tmp_path / "p"), epochs=2, batch_size=2,
                                       workers=1, val_fraction=0.5, classes=8))
    _, val = lowres.split(0.5)
    probe = load_probe(str(tmp_path / "p"))
    right = total = 0
    for key in val.to_arrow().to_pylist():
        labels = lowres.labels(key).astype(np.int64)
        assert labels.shape == (SIZE // 2, SIZE // 2)
        valid = labels != 255
        right += int((predict(probe, lowres[key])[valid] == labels[valid]).sum())
        total += int(valid.sum())
    assert metrics["val_samples"] == len(val) > 0
    assert metrics["pixel_accuracy"] == pytest.approx(right / total, abs=1e-6)


def test_no_weights_offline_stops_before_any_work(ray_local, photo_shards, tmp_path, monkeypatch):
    import upsample_coco

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # nothing cached
    with socket.socket() as s:  # a port nothing listens on: the published URL's host, unreachable
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/anyup_multi_backbone.pth"
    monkeypatch.setattr(featup_ops.anyup_weights, "ANYUP_MULTI_BACKBONE_URL", url)
    out = tmp_path / "out.zarr"
    config = job_config([f"{photo_shards}/photos-000000.tar"], out, upsampler="anyup", random_init=False)
    with pytest.raises(ConfigError, match=r"cannot download AnyUp weights from .*anyup_multi_backbone\.pth.*"
                                          r"--upsampler-weights /path/anyup_multi_backbone\.pth"):
        run_job(config)
    assert not out.exists()
    # through the command line: exit status 2, the same message
    assert upsample_coco.main(["--input", f"{photo_shards}/photos-000000.tar", "--output", str(out), "--backbone",
                               "oracle", "--upsampler", "anyup"]) == 2
    assert not out.exists()


# -- the other jobs' flags -------------------------------------------------------------------------------------
def test_weights_are_assigned_to_the_named_upsampler():
    from pipeline.upsampler_weights import assign_weights

    assert assign_weights(["bilinear", "anyup"], ["a.pth"]) == {"bilinear": None, "anyup": "a.pth"}
    assert assign_weights(["jbu", "anyup"], ["anyup=s3://b/a.pth", "jbu=ckpt/"]) == {"jbu": "ckpt/",
                                                                                   "anyup": "s3://b/a.pth"}
    assert assign_weights(["anyup"], None) == {"anyup": None}  # the published weights
    for names, weights, message in [
        (["jbu", "anyup"], ["a.pth"], "jbu and anyup are both named; say which one it is for, e.g. "
                                      "--upsampler-weights jbu=a.pth"),
        (["bilinear"], ["a.pth"], "none of --upsampler bilinear takes weights"),
        (["anyup"], ["jbu=a.pth"], "'jbu' is not among --upsampler anyup"),
        (["anyup", "bilinear"], ["bilinear=a.pth"], "the bilinear upsampler takes no weights"),
        (["anyup"], ["a.pth", "anyup=b.pth"], "two files for anyup"),
        (["jbu"], None, "--upsampler jbu needs --upsampler-weights"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            assign_weights(names, weights)


def test_eval_and_preview_refuse_ambiguous_weights(tmp_path, capsys):
    import eval_upsampler
    import preview

    assert eval_upsampler.main(["--input", "x.tar", "--backbone", "oracle", "--upsampler", "jbu", "--upsampler",
                                "anyup", "--upsampler-weights", "w.pth", "--json", str(tmp_path / "s.json")]) == 2
    assert "say which one it is for" in capsys.readouterr().err and not (tmp_path / "s.json").exists()
    assert preview.main(["--cache", str(tmp_path), "--upsampler", "bilinear", "--upsampler-weights", "w.pth"]) == 2
    assert "none of --upsampler bilinear takes weights" in capsys.readouterr().err


def test_train_jbu_refuses_anyup_before_any_work(photo_shards, tmp_path, capsys):
    import train_jbu

    args = ["--input", f"{photo_shards}/photos-000000.tar", "--backbone", "oracle", "--output",
            str(tmp_path / "run"), "--steps", "1"]
    assert train_jbu.main([*args, "--upsampler", "anyup"]) == 2
    assert "jobs/train_anyup.py" in capsys.readouterr().err
    assert train_jbu.main([*args, "--upsampler", "bilinear"]) == 2
    assert "trains the jbu upsampler only" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_caching_job_refuses_bad_anyup_settings(photo_shards, tmp_path):
    base = job_config([f"{photo_shards}/photos-000000.tar"], tmp_path / "o")
    from dataclasses import replace

    with pytest.raises(ConfigError, match="--output-scale 0.5 applies to --upsampler anyup only"):
        replace(base, upsampler="bilinear", output_scale=0.5).validate()
    with pytest.raises(ConfigError, match=r"output_scale \(--output-scale\) must be in \(0, 1\].*got 2.0"):
        run_job(replace(base, upsampler="anyup", random_init=True, output_scale=2.0))
    with pytest.raises(ConfigError, match="AnyUp weights not found"):
        run_job(replace(base, upsampler="anyup", upsampler_weights=str(tmp_path / "missing.pth")))
    assert not (tmp_path / "o").exists()


def test_output_scale_on_non_square_images():
    """AnyUp's output follows the image's shape, times the scale, and equals the dense reference there."""
    model = FeatureModel.create("oracle", "anyup", random_init=True, upsampler_options={"output_scale": 0.5})
    images = torch.rand(2, 3, 48, 80)
    lowres, highres = model(images)
    assert model.output_size(48, 80) == (24, 40) and highres.shape == (2, 32, 24, 40)
    dense = dense_anyup(model.upsampler.anyup.state_dict())
    with torch.no_grad():
        expected = dense(normalize(images), oracle_lowres(images), output_size=(24, 40))
    assert rel(highres, expected) <= 1e-5
    assert model.describe()["upsampler"]["output_size"] == "image x 0.5"


# -- the quality metric ----------------------------------------------------------------------------------------
def test_lowres_agreement_ranks_upsamplers_and_flags_bad_samples():
    torch.manual_seed(0)
    lr = torch.randn(3, 8, 4, 6)
    nearest = F.interpolate(lr, scale_factor=8, mode="nearest")  # pools back to lr exactly
    bilinear = F.interpolate(lr, scale_factor=8, mode="bilinear", align_corners=False)
    shifted = torch.roll(nearest, shifts=8, dims=3)  # one cell out of place: a deliberately bad upsampler
    broken = bilinear.clone()
    broken[1] = 0  # one sample whose features were lost
    err_n, cos_n = lowres_agreement(nearest, lr)
    err_b, cos_b = lowres_agreement(bilinear, lr)
    err_s, cos_s = lowres_agreement(shifted, lr)
    err_x, cos_x = lowres_agreement(broken, lr)
    assert err_n.max() < 1e-6 and cos_n.min() > 1 - 1e-6
    for i in range(3):  # the values, computed here in float64
        assert (err_b[i].item(), cos_b[i].item()) == pytest.approx(
            quality_here(bilinear[i].numpy(), lr[i].numpy()), rel=1e-5)
    assert (err_b < err_s).all() and (cos_b > cos_s).all()
    assert err_x[1].item() == pytest.approx(1.0) and cos_x[1].item() == 0
    torch.testing.assert_close(err_x[[0, 2]], err_b[[0, 2]])
    zero = lowres_agreement(torch.zeros(1, 8, 32, 48), torch.zeros(1, 8, 4, 6))[0]
    assert torch.isnan(zero).all()  # undefined, not a perfect score


def test_manifest_quality_finds_the_worse_upsampler(local_runs, tmp_path):
    """The oracle's exact features pool back to its low-res features; an untrained AnyUp's do not. Both columns
    hold the values computed here from the stored features."""
    import pyarrow.parquet as pq

    shard, anyup, _ = local_runs
    out = tmp_path / "truth.zarr"
    run_job(job_config([shard], out, upsampler="truth", random_init=False, dtype="float32", labels="none",
                       previews=0))
    found = {}
    for name, cache in (("truth", FeatureCache(str(out))), ("anyup", anyup)):
        table = pq.read_table(Path(cache.url) / "manifest.parquet", columns=["key", "pooled_rel_error",
                                                                             "pooled_cosine"])
        found[name] = table.to_pandas().set_index("key")
        for key in cache.keys():
            rel_error, cosine = quality_here(cache[key], cache.lowres(key))
            assert found[name].loc[key, "pooled_rel_error"] == pytest.approx(rel_error, rel=1e-4, abs=1e-6)
            assert found[name].loc[key, "pooled_cosine"] == pytest.approx(cosine, rel=1e-5)
    assert (found["truth"]["pooled_rel_error"] < 1e-5).all()
    assert (found["anyup"]["pooled_rel_error"] > 100 * found["truth"]["pooled_rel_error"]).all()
    assert (found["anyup"]["pooled_cosine"] < found["truth"]["pooled_cosine"]).all()
