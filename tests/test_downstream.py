"""Downstream use of a cache: aligned labels, storage presets, the probe job, previews, training readers."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from featup_ops import FeatureModel
from pipeline.caching.driver import run_job
from pipeline.caching.job_config import ConfigError
from pipeline.ingest.coco import annotation_mask, rasterize
from pipeline.ingest.sample_photos import photo_samples
from pipeline.ingest.shard_writer import write_shards
from pipeline.reading.feature_cache import FeatureCache, LabelledFeatures, split_keys
from pipeline.storage.images import load_sample_image
from pipeline.storage.shards import iter_samples
from tests.test_job import job_config


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


# -- labels -----------------------------------------------------------------------------------------------------
def _two_halves(width: int, height: int, split: int) -> tuple[bytes, bytes]:
    """A red | blue image and its label map (1 | 2), the border at column `split`."""
    img = np.zeros((height, width, 3), np.uint8)
    img[:, :split] = (220, 30, 30)
    img[:, split:] = (30, 30, 220)
    label = np.where(np.arange(width)[None, :] < split, 1, 2).repeat(height, 0).astype(np.uint8)
    return _png(img), _png(label, "L")


def test_labels_stay_aligned_with_features(ray_local, tmp_path):
    image, label = _two_halves(500, 300, 260)
    # stored sideways with EXIF orientation 6; its label is in the upright orientation
    upright = np.zeros((300, 200, 3), np.uint8)
    upright[:100] = (220, 30, 30)
    upright[100:] = (30, 30, 220)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    rot_label = np.where(np.arange(300)[:, None] < 100, 1, 2).repeat(200, 1).astype(np.uint8)
    samples = [{"__key__": "halves", "png": image, "seg.png": label},
               {"__key__": "turned", "jpg": buf.getvalue(), "seg.png": _png(rot_label, "L")},
               {"__key__": "unlabelled", "png": image}]
    write_shards(samples, str(tmp_path / "s"), prefix="lab")
    out = tmp_path / "feats.zarr"
    run_job(job_config([f"{tmp_path}/s/lab-000000.tar"], out, upsampler="truth", random_init=False))
    cache = FeatureCache(str(out))
    # halves: resized 64 x 107 (w), crop left 21; the border at 260 * 64/300 = 55.5 -> crop column 34.5
    lab = cache.labels("halves")
    assert lab.shape == (64, 64) and lab.dtype == np.uint16
    assert (lab[:, :34] == 1).all() and (lab[:, 35:] == 2).all()
    feats = cache["halves"].astype(np.float32)
    jumps = np.abs(np.diff(feats, axis=2)).sum(axis=(0, 1))  # where the features change, column-wise
    assert abs(int(np.argmax(jumps)) + 1 - 35) <= 1
    # turned: upright 200 x 300 -> resized 64 x 96, crop top 16; border at row 100 * 64/200 = 32 -> crop row 16
    lab = cache.labels("turned")
    assert (lab[:16] == 1).all() and (lab[16:] == 2).all()
    assert cache.labels("unlabelled") is None
    row = cache.row("halves")
    assert row["labels_array"].startswith("labels/") and cache.row("unlabelled")["labels_array"] is None


def test_label_of_the_wrong_size_is_a_sample_error(ray_local, tmp_path):
    image, _ = _two_halves(120, 80, 60)
    write_shards([{"__key__": "bad", "png": image, "seg.png": _png(np.zeros((10, 10), np.uint8), "L")}],
                 str(tmp_path / "s"), prefix="x")
    summary = run_job(job_config([f"{tmp_path}/s/x-000000.tar"], tmp_path / "o.zarr", upsampler="bilinear",
                                 random_init=False))
    assert summary.errors == 1
    assert "label is 10x10 but the image is 120x80" in FeatureCache(str(tmp_path / "o.zarr")).errors()["error"][0].as_py()


def _rle_encode(counts: list[int]) -> str:
    """COCO's compressed RLE string, written from the format description (independent of the decoder)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _runs(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a bool mask, starting with a run of zeros (COCO's uncompressed RLE)."""
    counts, value, run = [], False, 0
    for bit in mask.T.flatten():
        if bit != value:
            counts.append(run)
            value, run = bit, 0
        run += 1
    counts.append(run)
    return counts


def _inside_polygon(polygon: list[float], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel centre inside the polygon, distance of the centre to the nearest edge), by crossing numbers."""
    pts = np.asarray(polygon, float).reshape(-1, 2)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    inside = np.zeros((height, width), bool)
    dist = np.full((height, width), np.inf)
    for (x0, y0), (x1, y1) in zip(pts, np.roll(pts, -1, axis=0)):
        crosses = ((y0 > ys) != (y1 > ys)) & (xs < x0 + (ys - y0) * (x1 - x0) / (y1 - y0 + 1e-300))
        inside ^= crosses
        t = np.clip(((xs - x0) * (x1 - x0) + (ys - y0) * (y1 - y0)) / ((x1 - x0) ** 2 + (y1 - y0) ** 2), 0, 1)
        dist = np.minimum(dist, np.hypot(xs - x0 - t * (x1 - x0), ys - y0 - t * (y1 - y0)))
    return inside, dist


def test_coco_rle_masks_decode_to_the_encoded_pixels():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    mask = rng.random((23, 17)) < 0.3
    counts = _runs(mask)
    compressed = _rle_encode(counts)
    # our encoder (written from the format description) and pycocotools agree on the string
    assert mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode() == compressed
    for seg in ({"size": [23, 17], "counts": compressed}, {"size": [23, 17], "counts": compressed.encode()},
                {"size": [23, 17], "counts": counts}):
        np.testing.assert_array_equal(annotation_mask(seg, 23, 17), mask)
    with pytest.raises(ValueError, match=r"RLE of size \[23, 17\] for an image of 17x23"):
        annotation_mask({"size": [23, 17], "counts": counts}, 17, 23)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
def test_coco_polygons_cover_the_pixels_whose_centres_they_contain():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(1)
    height, width = 40, 50
    for _ in range(10):
        n = int(rng.integers(3, 9))
        angles, radii = np.sort(rng.random(n)) * 2 * np.pi, rng.uniform(4, 18, n)
        polygon = np.stack([25 + radii * np.cos(angles), 20 + radii * np.sin(angles)], 1).ravel().round(2).tolist()
        got = annotation_mask([polygon], height, width)
        expected = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)
        np.testing.assert_array_equal(got, expected)
        inside, dist = _inside_polygon(polygon, height, width)
        clear = dist > 0.25  # centres on an edge may go either way
        np.testing.assert_array_equal(got[clear], inside[clear])
        assert inside[clear].sum() > 20
    assert not annotation_mask([[1, 1, 5, 5]], height, width).any()  # a degenerate polygon covers nothing


def test_coco_annotations_rasterise_to_a_category_map():
    height, width = 24, 20
    crowd = np.zeros((height, width), bool)
    crowd[0:2] = True
    crowd[8:10, 8:10] = True
    third = np.zeros((height, width), bool)
    third[15:22, 14:20] = True
    anns = [  # listed smallest first: the order of drawing comes from the areas
        {"category_id": 9, "area": 20, "segmentation": [[6, 6, 10, 6, 10, 10, 6, 10], [12, 20, 14, 20, 14, 22, 12, 22]]},
        {"category_id": 5, "area": 256, "segmentation": [[2, 2, 18, 2, 18, 18, 2, 18]]},
        {"category_id": 3, "area": 42, "segmentation": {"size": [height, width], "counts": _runs(third)}},
        {"category_id": 1, "area": 44, "iscrowd": 1,
         "segmentation": {"size": [height, width], "counts": _rle_encode(_runs(crowd))}},
        {"category_id": 7, "area": 0, "segmentation": []},
    ]
    expected = np.zeros((height, width), np.uint16)
    expected[2:18, 2:18] = 5
    expected[third] = 3
    expected[6:10, 6:10] = 9
    expected[20:22, 12:14] = 9
    expected[crowd] = 255
    label = rasterize(anns, height, width)
    assert label.dtype == np.uint16
    np.testing.assert_array_equal(label, expected)


def test_make_shards_writes_labels(tmp_path):
    import make_shards

    from pipeline.ingest.sample_photos import photo
    from pipeline.storage.shards import iter_samples

    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(photo("coffee")).save(images / "000000000285.jpg")
    coco = {"images": [{"id": 285, "file_name": "000000000285.jpg", "height": 400, "width": 600}],
            "annotations": [{"id": 1, "image_id": 285, "category_id": 47, "area": 2500, "iscrowd": 0,
                             "bbox": [100, 100, 50, 50], "segmentation": [[100, 100, 150, 100, 150, 150, 100, 150]]}],
            "categories": [{"id": 47, "name": "cup"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    assert make_shards.main(["--images", str(images), "--annotations", str(tmp_path / "ann.json"),
                             "--output", str(tmp_path / "a")]) == 0
    seg = np.asarray(Image.open(io.BytesIO(next(iter_samples(str(tmp_path / "a/shard-000000.tar")))["seg.png"])))
    assert seg.shape == (400, 600) and seg[125, 125] == 47 and seg[10, 10] == 0
    stuff = tmp_path / "stuff"
    stuff.mkdir()
    Image.fromarray(np.full((400, 600), 7, np.uint8)).save(stuff / "000000000285.png")
    assert make_shards.main(["--images", str(images), "--labels", str(stuff), "--output", str(tmp_path / "b")]) == 0
    seg = np.asarray(Image.open(io.BytesIO(next(iter_samples(str(tmp_path / "b/shard-000000.tar")))["seg.png"])))
    assert (seg == 7).all()
    assert make_shards.main(["--images", str(images), "--oracle-labels", "--output", str(tmp_path / "c")]) == 0
    seg = np.asarray(Image.open(io.BytesIO(next(iter_samples(str(tmp_path / "c/shard-000000.tar")))["seg.png"])))
    assert seg.shape == (400, 600) and seg.max() < 8 and len(np.unique(seg)) >= 3


# -- storage presets ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preset_caches(ray_local, photo_shards, tmp_path_factory) -> dict[str, FeatureCache]:
    root = tmp_path_factory.mktemp("presets")
    caches = {}
    for preset in ("float32", "float16", "bfloat16", "int8", "pca6", "lowres"):
        out = root / f"{preset}.zarr"
        run_job(job_config([f"{photo_shards}/photos-*.tar"], out, storage=preset, labels="oracle", pca_samples=4))
        caches[preset] = FeatureCache(str(out))
    return caches


def _stack(cache: FeatureCache) -> np.ndarray:
    return np.stack([np.asarray(cache[k], np.float32) for k in sorted(cache.keys())])


def _source_images(cache: FeatureCache, keys: list[str]) -> dict[str, np.ndarray]:
    """The cropped input images (S, S, 3) of `keys`, re-read from their shards (not from the cache)."""
    out = {}
    for source in {cache.row(k)["source"] for k in keys}:
        for sample in iter_samples(source):
            if sample["__key__"] in keys:
                out[sample["__key__"]] = load_sample_image(sample, cache.image_size)[0]
    return out


def _replay_on_jpeg(cache: FeatureCache, keys: list[str]) -> np.ndarray:
    """The test's own replay: the job's upsampler on the stored low-res features and the source image put
    through a JPEG round trip (quality 95, 4:4:4) with Pillow."""
    model = FeatureModel.create("oracle", "jbu", random_init=True)
    images = _source_images(cache, keys)
    out = []
    for key in keys:
        buf = io.BytesIO()
        Image.fromarray(images[key]).save(buf, format="JPEG", quality=95, subsampling=0)
        jpeg = np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255
        guidance = model.guidance(torch.from_numpy(jpeg).permute(2, 0, 1)[None])
        lowres = torch.from_numpy(np.asarray(cache.lowres(key), np.float32))[None]
        with torch.no_grad():
            out.append(model.upsampler(lowres, guidance)[0].numpy())
    return np.stack(out)


def test_lowres_caches_with_raw_images_still_read(preset_caches, tmp_path):
    """Caches written before the image was stored as JPEG hold it raw, uint8 (N, 3, S, S): the reader replays
    those exactly (to float16 precision) against the eager features."""
    old = tmp_path / "old.zarr"
    shutil.copytree(preset_caches["lowres"].url, old)
    for array in sorted((old / "image").iterdir()):
        if not array.is_dir():
            continue
        keys = zarr.open_array(str(array), mode="r").attrs["featup"]["keys"]
        shutil.rmtree(array)
        images = _source_images(preset_caches["lowres"], keys)
        raw = np.stack([images[k].transpose(2, 0, 1) for k in keys])
        zarr.create_array(str(array), data=raw, chunks=(1, *raw.shape[1:]))  # the old layout
    cache = FeatureCache(str(old))
    keys = sorted(cache.keys())
    got = np.stack([cache[k] for k in keys])
    ref = _stack(preset_caches["float32"])
    scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
    assert (np.abs(got - ref) <= 2.0**-10 * scale).all()
    np.testing.assert_array_equal(cache.image(keys[0]), _source_images(cache, keys[:1])[keys[0]].transpose(2, 0, 1))


def test_int8_quantisation_matches_the_plain_formula(monkeypatch):
    """The chunked quantiser gives the codes of round((x - min) / scale) computed in one go, for float32 and
    float16 inputs and chunks that split a sample's channels."""
    from pipeline.caching import presets

    monkeypatch.setattr(presets, "QUANTIZE_CHUNK", 3 * 20 * 24)  # 3 channels per step: 7 steps for 2 x 10
    x = torch.randn(2, 10, 20, 24, generator=torch.Generator().manual_seed(0)) * 3
    x[1, 4] = 0.5  # a constant channel
    for inp in (x, x.half()):
        xf = inp.float()
        lo, hi = xf.amin(dim=(2, 3)), xf.amax(dim=(2, 3))
        scale = ((hi - lo) / 255).clamp_min(1e-12)
        want = ((xf - lo[..., None, None]) / scale[..., None, None]).round().clamp(0, 255).to(torch.uint8)
        codes, got_scale, got_lo = presets.quantize_uint8(inp)
        torch.testing.assert_close(codes, want, rtol=0, atol=0)
        torch.testing.assert_close(got_scale, scale, rtol=0, atol=0)
        torch.testing.assert_close(got_lo, lo, rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["float16", "bfloat16", "int8", "pca6", "lowres"])
def test_presets_round_trip_within_their_bound(preset_caches, preset):
    ref = _stack(preset_caches["float32"])
    cache = preset_caches[preset]
    got = _stack(cache)
    assert got.shape == ref.shape
    err = np.abs(got - ref)
    if preset == "float16":
        assert (err <= 2.0**-11 * np.abs(ref) + 6e-8).all()
    elif preset in ("bfloat16",):
        assert (err <= 2.0**-8 * np.abs(ref) + 1e-30).all()
    elif preset == "lowres":  # the upsampler re-run on the stored JPEG: close to the eager features, and
        # exactly (to float16 precision) what it gives on the same JPEG decoded independently here
        cos_img = ((got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)).mean((1, 2))
        assert cos_img.min() >= 0.999, cos_img
        expected = _replay_on_jpeg(cache, sorted(cache.keys()))
        scale = np.abs(ref).max(axis=(1, 2, 3), keepdims=True)
        assert (np.abs(got - expected) <= 2.0**-10 * scale).all()
        assert not np.array_equal(got, ref)  # the guidance really is the lossy image
    elif preset == "int8":
        keys = sorted(cache.keys())
        for i, key in enumerate(keys):
            name, row = cache.location(key)
            scale = np.asarray(cache._array("scale", name)[row])
            assert (err[i] <= scale[:, None, None] / 2 + 1e-6).all()
    else:  # pca: exactly the projection of the float32 features, up to float16 coefficients
        mean, comps = cache.store.read_pca()
        proj = np.einsum("kc,nkhw->nchw", comps, np.einsum("kc,nchw->nkhw", comps, ref - mean[None, :, None, None]))
        proj += mean[None, :, None, None]
        assert np.abs(got - proj).max() <= 2e-3 * np.abs(ref).max()
        explained = cache.store.get_json("run.json")["storage"]["explained_variance"]
        assert explained > 0.9
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    assert cos.mean() > 0.98
    assert cache.manifest.column("storage").to_pylist()[0] == preset
    assert cache.run["storage"]["preset"] == preset and cache.run["storage"]["error_bound"]


def test_unsupported_preset_combinations_are_refused(photo_shards, tmp_path):
    with pytest.raises(ConfigError, match="unknown storage preset"):
        run_job(job_config([f"{photo_shards}/photos-000000.tar"], tmp_path / "a", storage="int4"))
    with pytest.raises(ConfigError, match="lowres"):
        run_job(job_config([f"{photo_shards}/photos-000000.tar"], tmp_path / "b", storage="lowres",
                           upsampler="truth", random_init=False))


# -- reading for training ----------------------------------------------------------------------------------------
def test_split_crops_and_loaders(preset_caches):
    cache = preset_caches["float16"]
    train, val = cache.split(0.3, seed=1)
    assert sorted(train + val) == sorted(cache.keys()) and not set(train) & set(val)
    assert (train, val) == split_keys(cache.keys(), 0.3, seed=1)  # deterministic
    assert split_keys(["a", "b"] + cache.keys(), 0.3, seed=1)[1] == [k for k in ["a", "b"] if k in
                                                                     split_keys(["a", "b"], 0.3, seed=1)[1]] + val
    key = cache.keys()[0]
    crop = cache.read(key, crop=(5, 17, 20, 30))
    np.testing.assert_array_equal(crop, np.asarray(cache[key])[:, 5:25, 17:47])
    np.testing.assert_array_equal(cache.labels(key, crop=(5, 17, 20, 30)), cache.labels(key)[5:25, 17:47])
    data = LabelledFeatures(cache, train, crop_size=32, seed=3)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, shuffle=True)
    feats, labels = next(iter(loader))
    assert feats.shape == (2, 32, 32, 32) and labels.shape == (2, 32, 32) and labels.dtype == torch.int64


def test_ray_data_path(ray_local, preset_caches):
    cache = preset_caches["float16"]
    rows = cache.to_ray_dataset(cache.keys()[:4], concurrency=1).take_all()
    assert sorted(r["key"] for r in rows) == sorted(cache.keys()[:4])
    row = next(r for r in rows if r["key"] == cache.keys()[0])
    np.testing.assert_array_equal(row["features"], np.asarray(cache[cache.keys()[0]], np.float32))
    np.testing.assert_array_equal(row["labels"], cache.labels(cache.keys()[0]).astype(np.int64))


# -- the probe -------------------------------------------------------------------------------------------------
def test_probe_job_beats_chance(ray_local, tmp_path):
    import train_probe

    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS

    write_shards(photo_samples(COLOR_PHOTOS + GRAY_PHOTOS), str(tmp_path / "s"), samples_per_shard=8, prefix="p")
    out = tmp_path / "truth.zarr"
    run_job(job_config([f"{tmp_path}/s/p-*.tar"], out, upsampler="truth", random_init=False, labels="oracle",
                       image_size=64))
    rc = train_probe.main(["--cache", str(out), "--output", str(tmp_path / "probe"), "--epochs", "15",
                           "--batch-size", "4", "--lr", "0.05", "--workers", "1", "--val-fraction", "0.25"])
    assert rc == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert metrics["classes"] == 8 and metrics["val_samples"] >= 2
    # chance: always predict the most frequent training class
    cache = FeatureCache(str(out))
    train, val = cache.split(0.25, 0)
    counts = np.bincount(np.concatenate([cache.labels(k).ravel() for k in train]), minlength=8)
    majority = int(np.argmax(counts))
    from featup_ops.linear_probe import SegmentationScore

    conf = torch.zeros(8, 8, dtype=torch.int64)
    for k in val:
        lab = torch.from_numpy(cache.labels(k).astype(np.int64)).flatten()
        conf[:, majority] += torch.bincount(lab, minlength=8)
    chance = SegmentationScore(conf)
    assert metrics["miou"] > chance.miou + 0.3 and metrics["pixel_accuracy"] > chance.pixel_accuracy + 0.2
    from pipeline.workflows.probe_on_cache import load_probe, predict

    probe = load_probe(str(tmp_path / "probe"))
    assert predict(probe, cache[val[0]]).shape == (64, 64)


def test_probe_refuses_a_cache_without_labels(ray_local, photo_shards, tmp_path):
    import train_probe

    out = tmp_path / "nolabels.zarr"
    run_job(job_config([f"{photo_shards}/photos-*.tar"], out, labels="none", upsampler="bilinear", random_init=False))
    assert train_probe.main(["--cache", str(out), "--epochs", "1", "--workers", "0"]) == 2


def _scores(confusion: np.ndarray) -> tuple[float, float]:
    """(pixel accuracy, mIoU over the classes present in the truth) of a confusion matrix (truth x prediction)."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = confusion.sum(1) > 0
    return tp.sum() / confusion.sum(), float(np.mean(tp[present] / union[present]))


@pytest.mark.slow
def test_probe_data_parallel_with_ray_train(ray_local, preset_caches, tmp_path):
    from pipeline.workflows.probe_on_cache import ProbeJobConfig, load_probe, predict, run_probe

    cache = preset_caches["float16"]
    metrics = run_probe(ProbeJobConfig(cache=cache.url, output=str(tmp_path / "p"), epochs=6, batch_size=2,
                                       workers=0, ray_workers=2, val_fraction=0.3, lr=0.05))
    assert metrics["world_size"] == 2 and metrics["classes"] == 8
    # the reported scores are the saved probe's on the held-out split, recomputed here from the labels
    train, val = cache.split(0.3, 0)
    assert metrics["val_samples"] == len(val) and metrics["train_samples"] == len(train)
    probe = load_probe(str(tmp_path / "p"))
    confusion = np.zeros((8, 8), np.int64)
    for key in val:
        truth, pred = cache.labels(key).astype(np.int64).ravel(), predict(probe, cache[key]).ravel()
        confusion += np.bincount(truth * 8 + pred, minlength=64).reshape(8, 8)
    accuracy, miou = _scores(confusion)
    assert metrics["pixel_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["miou"] == pytest.approx(miou, abs=1e-6)
    # and the probe learned: better than always answering the most frequent training class
    majority = int(np.argmax(np.bincount(np.concatenate([cache.labels(k).ravel() for k in train]), minlength=8)))
    chance = np.zeros((8, 8), np.int64)
    chance[:, majority] = confusion.sum(1)
    chance_accuracy, chance_miou = _scores(chance)
    assert accuracy > chance_accuracy + 0.1 and miou > chance_miou + 0.1, (accuracy, miou, chance_accuracy, chance_miou)


# -- pictures --------------------------------------------------------------------------------------------------
def test_previews_are_pngs_of_the_expected_size(preset_caches, tmp_path):
    import preview

    cache = preset_caches["float16"]
    written = sorted(Path(cache.url, "previews").glob("*.png"))
    assert len(written) == 4
    img = Image.open(written[0])
    assert img.format == "PNG" and img.size == (3 * 64, 64) and img.mode == "RGB"
    key = cache.keys()[-1]
    assert preview.main(["--cache", cache.url, "--key", key, "--out", str(tmp_path / "pv")]) == 0
    img = Image.open(tmp_path / "pv" / f"{key}.png")
    assert img.size == (192, 64)
    arr = np.asarray(img)
    assert arr[:, 128:].std() > 5  # the feature panel is a picture, not a flat fill
    assert preview.main(["--cache", cache.url, "--key", "no-such-key"]) == 2
    # the lowres preset renders from its stored image
    lowres = preset_caches["lowres"]
    assert Image.open(sorted(Path(lowres.url, "previews").glob("*.png"))[0]).size == (192, 64)


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (4, 2), (1, 2)])
def test_data_parallel_ranks_get_equal_shares_covering_every_key(n, world):
    """DDP all-reduces each step: ranks with unequal batch counts would deadlock (seen with 5 keys on 2 ranks)."""
    from pipeline.workflows.probe_on_cache import rank_share

    keys = [f"k{i}" for i in range(n)]
    shares = [rank_share(keys, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == -(-n // world)
    assert set().union(*shares) == set(keys)
