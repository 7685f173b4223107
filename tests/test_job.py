"""The caching job end to end on a real local Ray: local files, S3 (moto), bad inputs, resume, refusals."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.caching.driver import run_job
from pipeline.caching.job_config import JobConfig
from pipeline.caching.output_store import OutputExistsError
from pipeline.ingest.shard_writer import write_shards
from pipeline.options import ConfigError, parse_config
from pipeline.reading.feature_cache import CacheError, FeatureCache
from pipeline.storage.images import load_sample_image
from pipeline.storage.shards import iter_samples, resolve_shards
from tests.corpus import BAD_KINDS, GOOD_KINDS, corpus_samples
from tests.reference_features import random_jbu_state, reference_features

SIZE = 64


def job_config(inputs, output, **kw) -> JobConfig:
    base = dict(inputs=tuple(inputs), output=str(output), backbone="oracle", upsampler="jbu", random_init=True,
                image_size=SIZE, batch_size=2, decode_threads=2)
    base.update(kw)
    return JobConfig(**base)


def expected_features(shard_urls, size: int = SIZE, dtype=np.float16, options=None, upsampler: str = "jbu",
                      lowres: bool = False) -> dict[str, np.ndarray]:
    """Features of the same shards computed independently of the job: the oracle's formula and the JBU (or
    bilinear) evaluated with plain torch ops (tests.reference_features), without Ray, storage or FeatureModel.
    `lowres=True` gives the backbone's low-res features instead."""
    out = {}
    for url in shard_urls:
        for sample in iter_samples(url, options):
            img, _ = load_sample_image(sample, size)
            x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
            features = reference_features(x, upsampler)[0 if lowres else 1]
            out[sample["__key__"]] = features[0].numpy().astype(dtype)
    return out


def test_full_job_local(ray_local, photo_shards, tmp_path):
    pattern = f"{photo_shards}/photos-{{000000..000002}}.tar"
    out = tmp_path / "feats.zarr"
    summary = run_job(job_config([pattern], out))
    assert (summary.ok, summary.errors, summary.shards_done) == (9, 0, 3)

    cache = FeatureCache(str(out))
    assert len(cache) == 9 and Counter(cache.manifest.column("key").to_pylist()).most_common(1)[0][1] == 1
    urls = [s.url for s in resolve_shards([pattern])]
    expected = expected_features(urls)
    expected_lowres = expected_features(urls, lowres=True)
    assert set(cache.keys()) == set(expected)
    for key, ref in expected.items():
        got = cache[key]
        assert got.shape == (32, SIZE, SIZE) and got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(np.asarray(cache.lowres(key), np.float32), expected_lowres[key].astype(np.float32),
                                   atol=2e-3)

    row = cache.row("coffee")
    assert (row["orig_height"], row["orig_width"], row["crop_left"], row["crop_size"]) == (400, 600, 16, SIZE)
    assert row["source"].endswith("photos-000000.tar") and row["status"] == "ok"

    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["backbone"] == "oracle" and run["settings"]["dtype"] == "float16"
    from featup_ops.checkpoints import state_fingerprint

    assert run["settings"]["weights"]["upsampler"] == f"state:{state_fingerprint(random_jbu_state())}"
    assert run["counts"]["ok"] == 9 and run["versions"]["torch"].startswith("2.14")
    timings = run["timings"]  # consistent with each other and with the counts
    assert timings["elapsed_s"] <= timings["finished"] - timings["started"]
    assert timings["images_per_s"] == pytest.approx(run["counts"]["ok_this_run"] / timings["elapsed_s"], rel=0.01)

    # a plain zarr reader sees the arrays, one chunk per sample, compressed
    root = zarr.open(str(out), mode="r")
    arrays = list(root["features"].array_keys())
    assert len(arrays) == 3
    arr = root["features"][arrays[0]]
    # one storage object per sample, tiled inside for cheap crops
    assert arr.shards == (1, 32, SIZE, SIZE) and arr.chunks == (1, 32, SIZE // 4, SIZE // 4) and arr.shape[0] == 3
    assert arr.attrs["featup"]["keys"] and arr.compressors

    # rerunning the same command resumes: nothing is redone, nothing changes
    before = {k: cache[k].copy() for k in cache.keys()}
    again = run_job(job_config([pattern], out))
    assert again.shards_skipped == 3 and again.ok == 9
    cache2 = FeatureCache(str(out))
    assert cache2.manifest.column("features_array").to_pylist() == cache.manifest.column("features_array").to_pylist()
    for k, v in before.items():
        np.testing.assert_array_equal(cache2[k], v)

    # other settings into the same output: refused, unless --overwrite
    with pytest.raises(OutputExistsError, match="image_size"):
        run_job(job_config([pattern], out, image_size=32))
    summary = run_job(job_config([pattern], out, image_size=32, overwrite=True))
    assert FeatureCache(str(out))[0].shape == (32, 32, 32) and summary.shards_skipped == 0


def test_cli_limit_dtype_and_torch_dataset(ray_local, photo_shards, tmp_path):
    import upsample_coco

    out = tmp_path / "bf16.zarr"
    rc = upsample_coco.main(["--input", f"{photo_shards}/photos-*.tar", "--output", str(out), "--backbone", "oracle",
                             "--upsampler", "bilinear", "--image-size", "32", "--dtype", "bfloat16", "--limit", "4",
                             "--batch-size", "3", "--no-lowres"])
    assert rc == 0
    cache = FeatureCache(str(out))
    assert len(cache) == 4 and cache.storage == "bfloat16"
    x = cache[0]
    assert x.dtype == np.float32 and x.shape == (32, 32, 32)
    assert np.all((x.view(np.uint32) & 0xFFFF) == 0)  # exactly representable in bfloat16
    expected = expected_features([s.url for s in resolve_shards([f"{photo_shards}/photos-*.tar"])], 32,
                                 dtype=np.float32, upsampler="bilinear")
    for key in cache.keys():  # the bilinear resize of the oracle's features, to bfloat16 rounding
        ref = expected[key]
        assert np.all(np.abs(cache[key] - ref) <= 2.0**-8 * np.abs(ref) + 1e-6), key
    with pytest.raises(CacheError, match="no-lowres"):
        cache.lowres(0)
    loader = torch.utils.data.DataLoader(cache, batch_size=2, num_workers=2, shuffle=True)
    batches = list(loader)
    assert len(batches) == 2 and batches[0].shape == (2, 32, 32, 32)
    # raising the limit later completes the rest; every sample once
    rc = upsample_coco.main(["--input", f"{photo_shards}/photos-*.tar", "--output", str(out), "--backbone", "oracle",
                             "--upsampler", "bilinear", "--image-size", "32", "--dtype", "bfloat16",
                             "--batch-size", "3", "--no-lowres"])
    assert rc == 0
    keys = FeatureCache(str(out)).manifest.column("key").to_pylist()
    assert len(keys) == 9 and len(set(keys)) == 9


def test_bad_inputs_are_recorded_and_skipped(ray_local, photo_shards, tmp_path):
    bad = tmp_path / "bad"
    write_shards(corpus_samples(), str(bad), samples_per_shard=5, prefix="mixed")
    # one more shard, cut in the middle of its second sample
    write_shards(corpus_samples()[:3], str(tmp_path / "cut"), prefix="cut")
    data = (tmp_path / "cut" / "cut-000000.tar").read_bytes()
    import tarfile

    with tarfile.open(tmp_path / "cut" / "cut-000000.tar") as tf:
        second = tf.getmember("gray_png.png")
    (bad / "cut-000000.tar").write_bytes(data[: second.offset_data + second.size // 2])
    out = tmp_path / "feats.zarr"
    summary = run_job(job_config([f"{bad}/mixed-*.tar", f"{bad}/cut-000000.tar"], out))
    cache = FeatureCache(str(out))
    rows = {r["key"]: r for r in cache.manifest.to_pylist() if r["source"].endswith(tuple(f"mixed-00000{i}.tar"
                                                                                           for i in range(3)))}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == set(GOOD_KINDS)
    assert {k for k, r in rows.items() if r["status"] == "error"} == set(BAD_KINDS)
    assert all(r["error"] for r in rows.values() if r["status"] == "error")
    assert "decompression-bomb" in rows["huge"]["error"]
    cut_rows = [r for r in cache.manifest.to_pylist() if r["shard"] == "cut-000000"]
    assert [(r["key"], r["status"]) for r in cut_rows] == [("photo_jpeg", "ok"), ("gray_png", "error")]
    assert "truncated tar" in cut_rows[1]["error"]
    assert any("truncated tar" in v for v in summary.shard_errors.values())
    assert summary.ok == len(GOOD_KINDS) + 1
    assert summary.errors == len(BAD_KINDS) + 1


def test_count_mismatch_with_the_index_is_reported(ray_local, photo_shards, tmp_path):
    folder = tmp_path / "shards"
    write_shards(corpus_samples()[:4], str(folder), prefix="s")
    index = json.loads((folder / "index.json").read_text())
    index["shards"][0]["samples"] = 5  # the stream holds 4: one was lost somewhere
    (folder / "index.json").write_text(json.dumps(index))
    summary = run_job(job_config([f"{folder}/s-000000.tar"], tmp_path / "out.zarr"))
    assert "index lists 5 samples, the tar holds 4" in next(iter(summary.shard_errors.values()))


def test_job_on_s3(ray_local, s3_bucket, photo_shards):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(photo_shards) + "/", f"{s3_bucket}/coco/", recursive=True)
    pattern = f"s3://{s3_bucket}/coco/photos-{{000000..000002}}.tar"
    out = f"s3://{s3_bucket}/feats/oracle_jbu.zarr"
    summary = run_job(job_config([pattern], out))
    assert summary.ok == 9
    assert fs.exists(f"{s3_bucket}/feats/oracle_jbu.zarr/manifest.parquet")
    assert fs.exists(f"{s3_bucket}/feats/oracle_jbu.zarr/run.json")
    cache = FeatureCache(out)
    expected = expected_features([s.url for s in resolve_shards([pattern])])
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)
    # plain zarr over fsspec reads it too
    root = zarr.open_group(f"{out}", mode="r", storage_options={"endpoint_url": cache.store.fs.client_kwargs.get(
        "endpoint_url") or __import__("os").environ["AWS_ENDPOINT_URL"]})
    assert len(list(root["features"].array_keys())) == 3


def test_refusals_before_any_work(ray_local, photo_shards, tmp_path, s3_endpoint):
    good = [f"{photo_shards}/photos-000000.tar"]
    with pytest.raises(ConfigError, match="unknown backbone"):
        run_job(job_config(good, tmp_path / "a", backbone="no_such_net"))
    with pytest.raises(ConfigError, match="needs --upsampler-weights"):
        run_job(job_config(good, tmp_path / "b", random_init=False))
    with pytest.raises(ConfigError, match="checkpoint not found"):
        run_job(job_config(good, tmp_path / "c", upsampler_weights=str(tmp_path / "missing.safetensors")))
    from pipeline.storage.filesystems import StorageError
    from pipeline.storage.shards import InputError

    with pytest.raises(InputError):
        run_job(job_config([f"{photo_shards}/nope-{{0..3}}.tar"], tmp_path / "d"))
    with pytest.raises(StorageError, match="no-such-bucket"):
        run_job(job_config(good, "s3://no-such-bucket/out.zarr"))
    with pytest.raises(ConfigError, match="--dtype"):
        run_job(replace(job_config(good, tmp_path / "e"), dtype="int8"))
    for name in "abcde":
        assert not (tmp_path / name).exists()  # nothing was written


def test_foreign_output_is_not_clobbered(ray_local, photo_shards, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.txt").write_text("do not delete")
    with pytest.raises(OutputExistsError, match="not written by this job"):
        run_job(job_config([f"{photo_shards}/photos-000000.tar"], out))
    assert (out / "thesis.txt").exists()


def test_reading_an_unfinished_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="no manifest.parquet"):
        FeatureCache(str(tmp_path))


def test_the_demo_runs(ray_local, tmp_path):
    from pipeline.caching.demo import demo_config

    config = demo_config(tmp_path)
    summary = run_job(replace(config, image_size=64))
    assert summary.ok == 16 and summary.errors == 0
    assert Path(config.output, "manifest.parquet").exists()


def test_implicit_upsampler_in_the_caching_job(ray_local, tmp_path):
    import upsample_coco

    from pipeline.ingest.sample_photos import photo_samples

    write_shards(photo_samples(("astronaut", "coffee")), str(tmp_path / "s"), prefix="imp")
    out = tmp_path / "implicit.zarr"
    rc = upsample_coco.main(["--input", f"{tmp_path}/s/imp-000000.tar", "--output", str(out), "--backbone", "oracle",
                             "--upsampler", "implicit", "--implicit-steps", "30", "--implicit-views", "2",
                             "--image-size", "32", "--batch-size", "2", "--dtype", "float32"])
    assert rc == 0
    cache = FeatureCache(str(out))
    assert len(cache) == 2 and cache.run["settings"]["upsampler"] == "implicit"
    assert cache.run["settings"]["upsampler_options"] == {"steps": 30, "views": 2}
    # fitted per image: nearer the oracle's truth than the bilinear resize of the same low-res features
    truth = expected_features([f"{tmp_path}/s/imp-000000.tar"], 32, np.float32, upsampler="truth")
    bilinear = expected_features([f"{tmp_path}/s/imp-000000.tar"], 32, np.float32, upsampler="bilinear")
    for key in ("astronaut", "coffee"):
        feats = cache[key]
        assert feats.shape == (32, 32, 32)
        error, baseline = (np.linalg.norm(x - truth[key]) / np.linalg.norm(truth[key]) for x in (feats, bilinear[key]))
        assert error < 0.9 * baseline, (key, error, baseline)
    with pytest.raises(ConfigError, match="only apply to --upsampler implicit"):
        parse_config(JobConfig, ["--input", "x", "--output", "y", "--implicit-steps", "5"]).validate()
