"""FeatureCache on a cache written here sample by sample (no Ray, no model): lookup by key and by position,
duplicates across shards, missing keys, crops, rows of a manifest in several row groups, errors, splits,
LabelledFeatures through forked DataLoader workers, and the same cache on the S3 server."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.caching import manifest
from pipeline.caching.output_store import MANIFEST_NAME, RUN_NAME, OutputStore, StagedArray
from pipeline.caching.presets import ArraySpec
from pipeline.reading.feature_cache import FeatureCache, KeySelection, LabelledFeatures, split_keys
from pipeline.storage.images import Geometry

DIM, HW = 3, (16, 16)
GEOMETRY = Geometry(40, 60, "RGB", 1, 16, 24, 0, 4, 16)
# shard -> its samples (key, ok?); "dup" is in two shards, "bad*" failed to decode
SHARDS = {
    "s-000000": [("a", True), ("bad0", False), ("b", True), ("dup", True)],
    "s-000001": [("c", True), ("dup", True), ("d", True)],
    "s-000002": [("e", True), ("bad1", False), ("f", True), ("g", True), ("h", True)],
}


def _features(shard: str, row: int) -> np.ndarray:
    seed = int(shard[-1]) * 100 + row
    return np.random.default_rng(seed).standard_normal((DIM, *HW)).astype(np.float32)


def _labels(shard: str, row: int) -> np.ndarray:
    return ((np.arange(HW[0] * HW[1]).reshape(HW) + 7 * row + int(shard[-1])) % 5).astype(np.uint16)


def write_cache(url: str, options=None) -> list[dict]:
    """A float32 cache of SHARDS with labels for odd rows only; returns the manifest rows in order."""
    store = OutputStore(url, options)
    store.prepare({"test": 1}, overwrite=False)
    rows, parts = [], []
    for shard, samples in SHARDS.items():
        name = f"{shard}_0000abcd"
        ok = [key for key, good in samples if good]
        features = StagedArray("features", name, ArraySpec("features", (DIM, *HW), "float32"), 0, len(ok))
        labels = StagedArray("labels", name, ArraySpec("labels", HW, "uint16"), 255, len(ok))
        store.put_many(features.encode(0, np.stack([_features(shard, i) for i in range(len(ok))])))
        store.put_many(labels.encode(0, np.stack([_labels(shard, i) if i % 2 else np.full(HW, 255, np.uint16)
                                                  for i in range(len(ok))])))
        store.put_many({**features.metadata(len(ok), {}), **labels.metadata(len(ok), {})})
        part, row = [], 0
        for index, (key, good) in enumerate(samples):
            if good:
                part.append(manifest.ok_row(key, shard, f"/in/{shard}.tar", index, "float32", f"features/{name}", None,
                                            f"labels/{name}" if row % 2 else None, row, HW, GEOMETRY))
                row += 1
            else:
                part.append(manifest.error_row(key, shard, f"/in/{shard}.tar", index, "cannot decode"))
        rows += part
        parts.append(manifest.to_table(part))
    store.put_bytes(MANIFEST_NAME, manifest.assemble(parts).to_pybytes())
    store.put_json(RUN_NAME, {"settings": {"storage": "float32", "dim": DIM, "output_size": list(HW),
                                           "image_size": 16}, "model": {"lowres_size": [1, 1]}})
    return rows


@pytest.fixture(scope="module")
def written(tmp_path_factory, request):
    """The cache on local disk, its manifest in row groups of 4 rows (so a row lookup crosses groups)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(manifest, "ROW_GROUP_ROWS", 4)
    url = str(tmp_path_factory.mktemp("cache") / "feats.zarr")
    rows = write_cache(url)
    patch.undo()
    return url, rows


def _ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok"]


def test_positions_keys_rows_and_locations(written):
    url, rows = written
    cache = FeatureCache(url)
    ok = _ok_rows(rows)
    assert len(cache) == len(ok) == 10
    assert cache.keys() == [r["key"] for r in ok] and [cache.key(i) for i in range(len(cache))] == cache.keys()
    meta = pq.ParquetFile(f"{url}/manifest.parquet").metadata  # 12 rows, streamed in row groups of 4
    assert len(rows) == 12 and [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 4]
    for i, r in enumerate(ok):
        assert cache.row(i) == r  # the whole manifest row, from the row group holding it
        assert cache.location(i) == (r["features_array"].split("/", 1)[1], r["index"])
        np.testing.assert_array_equal(cache[i], _features(r["shard"], r["index"]))
        labels = cache.labels(i)
        if r["labels_array"] is None:
            assert labels is None
        else:
            np.testing.assert_array_equal(labels, _labels(r["shard"], r["index"]))
    assert cache.row(-1) == ok[-1] and cache.row("g") == next(r for r in ok if r["key"] == "g")
    with pytest.raises(IndexError, match="out of range"):
        cache.read(len(ok))
    errors = cache.errors()
    assert errors.column("key").to_pylist() == ["bad0", "bad1"] and set(errors.column("error").to_pylist()) == {
        "cannot decode"}
    assert cache.manifest.num_rows == len(rows)  # the full manifest, read on demand
    assert cache.row(3) == ok[3]  # from the loaded manifest now


def test_keys_duplicates_missing_and_crops(written):
    url, rows = written
    cache = FeatureCache(url)
    ok = _ok_rows(rows)
    for i, r in enumerate(ok):
        if r["key"] != "dup":
            assert cache.position(r["key"]) == i and r["key"] in cache
            np.testing.assert_array_equal(cache[r["key"]], cache[i])
    assert "dup" in cache and "bad0" not in cache and "zzz" not in cache and 3 not in cache
    with pytest.raises(KeyError, match="several shards"):
        cache["dup"]
    with pytest.raises(KeyError, match="no ok sample with key 'bad0'"):
        cache.read("bad0")
    with pytest.raises(KeyError, match="absent \\['zzz'\\], held by several shards \\['dup'\\]"):
        cache.positions(["a", "zzz", "dup"])
    np.testing.assert_array_equal(cache.positions(["h", "a", "c"]), [ok.index(next(r for r in ok if r["key"] == k))
                                                                     for k in ("h", "a", "c")])
    dups = [i for i, r in enumerate(ok) if r["key"] == "dup"]  # both copies stay readable by position
    assert len(dups) == 2 and not np.array_equal(cache[dups[0]], cache[dups[1]])
    crop = (3, 5, 7, 9)
    got = cache.read("f", crop=crop)
    r = next(r for r in ok if r["key"] == "f")
    np.testing.assert_array_equal(got, _features(r["shard"], r["index"])[:, 3:10, 5:14])
    np.testing.assert_array_equal(cache.labels("f", crop=crop), _labels(r["shard"], r["index"])[3:10, 5:14])


def test_split_is_a_selection_of_positions(written):
    url, _ = written
    cache = FeatureCache(url)
    train, val = cache.split(0.4, seed=2)
    assert isinstance(train, KeySelection) and len(train) + len(val) == len(cache)
    assert (list(train), list(val)) == split_keys(cache.keys(), 0.4, seed=2)  # the same rule, keys of any source
    assert (train, val) == split_keys(cache.keys(), 0.4, seed=2)
    assert sorted(np.concatenate([train.positions, val.positions])) == list(range(len(cache)))
    assert sorted(train + val) == sorted(cache.keys()) and train[1:3] == list(train)[1:3]
    assert all(k in train for k in list(train)) and not any(k in train for k in list(val))
    assert cache.split(0.4, seed=2) == (train, val) and cache.split(0.4, seed=3) != (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        cache.split(1.0)


def test_split_rule_is_uniform_and_stable_as_keys_are_added():
    keys = [f"{i:012d}" for i in range(20_000)]
    train, val = split_keys(keys, 0.25, seed=0)
    assert abs(len(val) / len(keys) - 0.25) < 0.015
    more_train, more_val = split_keys(keys + [f"x{i}" for i in range(500)], 0.25, seed=0)
    assert [k for k in more_val if not k.startswith("x")] == val


def test_labelled_features_in_forked_workers(written):
    url, rows = written
    cache = FeatureCache(url)
    keys = ["h", "a", "e", "c"]
    by_keys = LabelledFeatures(cache, keys)
    assert len(by_keys) == 4 and list(by_keys.keys) == keys
    everything, _ = cache.split(0.0)  # a selection of this cache: its positions, no lookup (duplicates included)
    assert LabelledFeatures(cache, everything).keys.positions.tolist() == list(range(len(cache)))
    assert LabelledFeatures(cache).keys == cache.keys()
    loader = torch.utils.data.DataLoader(by_keys, batch_size=2, num_workers=2, multiprocessing_context="fork")
    feats = torch.cat([f for f, _ in loader]).numpy()
    ok = {r["key"]: r for r in _ok_rows(rows)}
    np.testing.assert_array_equal(feats, np.stack([_features(ok[k]["shard"], ok[k]["index"]) for k in keys]))
    _, labels = by_keys[1]  # "a" has no label: all ignore
    assert labels.dtype == torch.int64 and (labels == 255).all()
    cropped = LabelledFeatures(cache, keys, crop_size=8)
    f, lab = cropped[0]
    assert f.shape == (DIM, 8, 8) and lab.shape == (8, 8)
    with pytest.raises(KeyError, match="several shards"):
        LabelledFeatures(cache, ["a", "dup"])


def test_the_same_cache_on_s3(s3_bucket):
    url = f"s3://{s3_bucket}/feats.zarr"
    rows = write_cache(url)
    cache = FeatureCache(url)
    ok = _ok_rows(rows)
    assert cache.keys() == [r["key"] for r in ok] and cache.row(5) == ok[5]
    np.testing.assert_array_equal(cache["e"], _features("s-000002", 0))
    assert cache.errors().num_rows == 2
