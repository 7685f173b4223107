"""`--resize fit`: whole images at their own aspect ratio (4:3, 3:4, 2:1, 1:1), shape buckets, aligned labels,
every preset and upsampler on non-square maps, and reading across shapes (crops, shape batches, probe, Ray
Data, previews).

The photos are scikit-image's, cropped to sizes whose fit at 64 px (patch 16) is an exact scale, with a
synthetic label mask of 48 px blocks, one class per block: each block border lands on a stored pixel border,
so the stored labels must equal the mask evaluated at the stored pixels' centres, everywhere.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from PIL import Image

from pipeline.caching.driver import run_job
from pipeline.caching.output_store import OutputStore, attempt_of, bucket_name
from pipeline.ingest.shard_writer import write_shards
from pipeline.options import ConfigError, parse_config
from pipeline.reading.feature_cache import FeatureCache, LabelledFeatures
from pipeline.reading.shape_batches import ShapeBatchSampler
from pipeline.storage.images import fit_shape, load_sample_image
from tests.corpus import BAD_KINDS, GOOD_KINDS, corpus_samples
from tests.photos import photo
from tests.reference_features import jbu_highres, normalize, random_jbu_state, reference_features
from tests.test_job import job_config

SIZE, PATCH, BLOCK = 64, 16, 48
# key: (photo, height, width, the fit shape at 64 px with 16 px patches, worked out by hand from the rule)
PHOTOS = {
    "wide43": ("coffee", 192, 256, (48, 64)),
    "tall34": ("astronaut", 256, 192, (64, 48)),
    "pano21": ("rocket", 128, 256, (48, 96)),
    "square": ("chelsea", 192, 192, (64, 64)),
    "wide43b": ("immunohistochemistry", 192, 256, (48, 64)),
    "tall34b": ("camera", 256, 192, (64, 48)),
    "unlabelled": ("retina", 128, 256, (48, 96)),
}
SHARDS = (("wide43", "tall34", "pano21", "square", "wide43b"), ("tall34b", "unlabelled"))


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def block_class(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The synthetic mask: one class per 48 px block of the original image, numbered row by row."""
    return (np.floor(y / BLOCK) * 6 + np.floor(x / BLOCK)).astype(np.int64)


def source_image(key: str) -> np.ndarray:
    name, h, w, _ = PHOTOS[key]
    return np.ascontiguousarray(photo(name)[:h, :w])


def expected_labels(key: str, shape: tuple[int, int]) -> np.ndarray:
    """The mask at the stored pixels' centres, mapped back to the original image by the whole-image scale."""
    _, h, w, _ = PHOTOS[key]
    rows, cols = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    return block_class(rows[:, None] * h / shape[0], cols[None, :] * w / shape[1])


def reference(key: str, upsampler: str = "jbu") -> tuple[np.ndarray, np.ndarray]:
    """(low-res, high-res) float32 features of the whole photo resized with Pillow to its fit shape, computed
    with tests.reference_features (no FeatureModel, no pipeline code)."""
    hw = PHOTOS[key][3]
    resized = Image.fromarray(source_image(key)).resize((hw[1], hw[0]), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None]
    lowres, highres = reference_features(x, upsampler)
    return lowres[0].numpy(), highres[0].numpy()


@pytest.fixture(scope="module")
def aspect_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("aspects")
    for i, keys in enumerate(SHARDS):
        samples = []
        for key in keys:
            _, h, w, _ = PHOTOS[key]
            sample = {"__key__": key, "png": _png(source_image(key))}
            if key != "unlabelled":
                yy, xx = np.mgrid[:h, :w]
                sample["seg.png"] = _png(block_class(yy, xx).astype(np.uint8), "L")
            samples.append(sample)
        write_shards(samples, str(root / f"part{i}"), prefix=f"aspect{i}")
    return root


def _inputs(root: Path) -> list[str]:
    return [f"{root}/part{i}/aspect{i}-000000.tar" for i in range(len(SHARDS))]


@pytest.fixture(scope="module")
def fit_cache(ray_local, aspect_shards, tmp_path_factory) -> FeatureCache:
    out = tmp_path_factory.mktemp("fit") / "fit.zarr"
    summary = run_job(job_config(_inputs(aspect_shards), out, resize="fit", labels="auto"))
    assert (summary.ok, summary.errors, summary.shards_done) == (7, 0, 2)
    return FeatureCache(str(out))


# -- the rule ------------------------------------------------------------------------------------------------------
def test_fit_shape_keeps_the_aspect_ratio_at_about_the_pixel_count():
    for key, (_, h, w, want) in PHOTOS.items():
        assert fit_shape(h, w, SIZE, PATCH) == want, key
    assert fit_shape(480, 640, 224, 16) == (192, 256) and fit_shape(1024, 2048, 224, 16) == (160, 320)
    assert fit_shape(480, 640, 224, 14) == (196, 266)  # DINOv2's 14 px patches
    rng = np.random.default_rng(0)
    for h, w, size, m in zip(rng.integers(100, 4000, 300), rng.integers(100, 4000, 300),
                             rng.choice([64, 224, 448], 300), rng.choice([8, 14, 16, 32], 300)):
        fh, fw = fit_shape(int(h), int(w), int(size), int(m))
        assert fh % m == 0 and fw % m == 0 and min(fh, fw) >= m
        (short, long), (fshort, flong) = sorted((h, w)), sorted((fh, fw))
        assert (fh <= fw) == (h <= w) or fh == fw
        if fshort > m:  # the longer side follows the aspect ratio to within half a patch
            assert abs(flong - fshort * long / short) <= m / 2 + 1e-9
        if short * size / np.sqrt(h * w) >= 4 * m:  # away from one-patch sides: about size^2 pixels
            assert 0.6 < fh * fw / size**2 < 1.6
    with pytest.raises(ValueError, match="positive"):
        fit_shape(0, 10, 64, 16)


def test_fit_resizes_the_whole_image_and_records_the_scale():
    img = source_image("pano21")
    out, g = load_sample_image({"png": _png(img)}, SIZE, resize="fit", multiple=PATCH)
    want = np.asarray(Image.fromarray(img).resize((96, 48), Image.BICUBIC))  # Pillow on the whole picture
    np.testing.assert_array_equal(out, want)
    assert (g.resize, g.crop_top, g.crop_left, g.crop_size) == ("fit", 0, 0, None)
    assert (g.resized_height, g.resized_width, g.crop_height, g.crop_width) == (48, 96, 48, 96)
    assert (g.scale_y, g.scale_x) == (48 / 128, 96 / 256)
    square, g = load_sample_image({"png": _png(img)}, SIZE)  # the default stays the paper's square crop
    assert square.shape == (64, 64, 3) and (g.resize, g.crop_left, g.crop_width) == ("crop", 32, 64)
    with pytest.raises(ConfigError, match="--resize 'pad' is not one of crop, fit"):
        job_config(["x"], "y", resize="pad").validate()
    from pipeline.caching.job_config import JobConfig

    assert parse_config(JobConfig, ["--input", "x", "--output", "y", "--resize", "fit"]).resize == "fit"


# -- the job -------------------------------------------------------------------------------------------------------
def test_every_aspect_ratio_is_kept_whole_with_aligned_labels(fit_cache):
    cache = fit_cache
    assert sorted(cache.keys()) == sorted(PHOTOS) and cache.resize == "fit"
    for key, (_, h, w, hw) in PHOTOS.items():
        lowres, highres = reference(key)
        got = cache[key]
        assert got.shape == (32, *hw) and cache.shape(key) == hw
        np.testing.assert_allclose(got.astype(np.float32), highres, atol=2e-3, err_msg=key)
        np.testing.assert_allclose(np.asarray(cache.lowres(key), np.float32), lowres, atol=2e-3, err_msg=key)
        row = cache.row(key)
        assert (row["orig_height"], row["orig_width"]) == (h, w)
        # the whole image: no crop, the features cover all of it, the scale maps it back
        assert (row["resize"], row["crop_top"], row["crop_left"], row["crop_size"]) == ("fit", 0, 0, None)
        assert (row["resized_height"], row["resized_width"]) == (row["crop_height"], row["crop_width"]) == hw
        assert (row["feature_height"], row["feature_width"]) == hw
        assert row["scale_y"] * h == pytest.approx(hw[0]) and row["scale_x"] * w == pytest.approx(hw[1])
        labels = cache.labels(key)
        if key == "unlabelled":
            assert labels is None and row["labels_array"] is None
            continue
        np.testing.assert_array_equal(labels, expected_labels(key, hw), err_msg=key)
        first, last = block_class(np.array([0]), np.array([0]))[0], block_class(np.array([h - 1]), np.array([w - 1]))[0]
        assert labels[0, 0] == first and labels[-1, -1] == last  # the image's corners are there


def test_one_array_per_shard_attempt_and_shape(fit_cache):
    cache = fit_cache
    rows = cache.manifest.to_pylist()
    root = zarr.open(cache.url, mode="r")
    for group in ("features", "lowres", "labels"):
        names = sorted(root[group].array_keys())
        shapes_by_shard = {}
        for name in names:
            shapes_by_shard.setdefault(attempt_of(name), set()).add(tuple(root[group][name].shape[-2:]))
        assert sorted(map(len, shapes_by_shard.values())) == [2, 4], (group, names)  # the shards' shapes
    for name in root["features"].array_keys():
        arr = root["features"][name]
        keys = arr.attrs["featup"]["keys"]
        assert arr.shape == (len(keys), 32, *PHOTOS[keys[0]][3])
        assert name == bucket_name(attempt_of(name), PHOTOS[keys[0]][3])
        for i, key in enumerate(keys):  # the manifest names the bucket and the row
            assert cache.location(key) == (name, i)
            assert PHOTOS[key][3] == PHOTOS[keys[0]][3]
    assert [r["key"] for r in rows if r["shard"] == "aspect0-000000"] == list(SHARDS[0])  # in shard order
    commits = [json.loads(p.read_text()) for p in Path(cache.url, "_pipeline", "commits").glob("*.json")]
    assert sorted(len(c["arrays"]) for c in commits) == [2, 4] and all(c["features_array"] is None for c in commits)


def test_rerun_resumes_and_other_resize_is_refused(fit_cache, aspect_shards):
    before = fit_cache.manifest
    again = run_job(job_config(_inputs(aspect_shards), fit_cache.url, resize="fit", labels="auto"))
    assert again.shards_skipped == 2 and again.ok == 7
    assert FeatureCache(fit_cache.url).manifest.equals(before)
    from pipeline.caching.output_store import OutputExistsError

    with pytest.raises(OutputExistsError, match="resize"):
        run_job(job_config(_inputs(aspect_shards), fit_cache.url, labels="auto"))


def test_leftover_buckets_of_failed_attempts_are_removed(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    kept, lost = "s-000001_0123abcd", "s-000001_89abcdef"
    for name in (kept, bucket_name(kept, (48, 64)), bucket_name(kept, (64, 48)), bucket_name(lost, (48, 64)),
                 lost, "s_48x64-000002_00ff00ff"):
        store.put_bytes(f"features/{name}/zarr.json", b"{}")
    removed = store.remove_unreferenced([kept, "s_48x64-000002_00ff00ff"], [])
    assert removed == 2
    assert sorted(p.name for p in (tmp_path / "out" / "features").iterdir()) == sorted(
        [kept, bucket_name(kept, (48, 64)), bucket_name(kept, (64, 48)), "s_48x64-000002_00ff00ff"])


def test_bad_inputs_are_recorded_and_skipped_in_fit_mode(ray_local, tmp_path):
    write_shards(corpus_samples(), str(tmp_path / "bad"), samples_per_shard=7, prefix="mixed")
    out = tmp_path / "bad.zarr"
    summary = run_job(job_config([f"{tmp_path}/bad/mixed-*.tar"], out, resize="fit", upsampler="bilinear",
                                 random_init=False, labels="none", previews=0))
    cache = FeatureCache(str(out))
    rows = {r["key"]: r for r in cache.manifest.to_pylist()}
    assert {k for k, r in rows.items() if r["status"] == "ok"} == set(GOOD_KINDS)
    assert {k for k, r in rows.items() if r["status"] == "error"} == set(BAD_KINDS) and summary.errors == len(BAD_KINDS)
    assert "decompression-bomb" in rows["huge"]["error"]
    # the EXIF-rotated photo is 200 wide and 300 tall upright: cached upright, taller than wide
    assert cache.shape("exif_rotated") == fit_shape(300, 200, SIZE, PATCH) == (80, 48)
    assert cache.shape("photo_jpeg") == fit_shape(400, 600, SIZE, PATCH) == (48, 80)


# -- every preset and upsampler on non-square maps -------------------------------------------------------------
@pytest.fixture(scope="module")
def fit_presets(ray_local, aspect_shards, tmp_path_factory) -> dict[str, FeatureCache]:
    root = tmp_path_factory.mktemp("fit_presets")
    caches = {}
    for preset in ("int8", "pca32", "lowres"):
        out = root / f"{preset}.zarr"
        run_job(job_config(_inputs(aspect_shards)[:1], out, resize="fit", storage=preset, labels="oracle",
                           pca_samples=3, previews=0))
        caches[preset] = FeatureCache(str(out))
    return caches


def test_anyup_caches_whole_images_at_their_own_size(ray_local, aspect_shards, tmp_path):
    """AnyUp in the job, --resize fit: each sample's features at its image's own non-square size, equal to AnyUp's
    dense reference attention (the same random-init weights) run here on the oracle's low-res features; the
    lowres preset replays it at read time from the whole stored image."""
    from featup_ops import AnyUp
    from featup_ops.backbones import RANDOM_INIT_SEED
    from tests.reference_features import oracle_lowres

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        dense = AnyUp(attention="dense").eval()
    caches = {}
    for storage in ("float32", "lowres"):
        out = tmp_path / f"{storage}.zarr"
        run_job(job_config(_inputs(aspect_shards)[:1], out, resize="fit", upsampler="anyup", storage=storage,
                           labels="none", previews=0, dtype="float32"))
        caches[storage] = FeatureCache(str(out))
    for key in ("tall34", "pano21"):
        hw = PHOTOS[key][3]
        x = _resized_photo(key, hw)
        with torch.no_grad():
            want = dense(normalize(x), oracle_lowres(x))[0].numpy()
        got = caches["float32"][key]
        assert got.shape == want.shape == (32, *hw)
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), key
        replayed = caches["lowres"][key]  # guided by the JPEG of the whole image: close, not equal
        assert replayed.shape == (32, *hw)
        assert np.linalg.norm(replayed - want) <= 0.05 * np.linalg.norm(want), key


@pytest.mark.parametrize("preset", ["int8", "pca32", "lowres"])
def test_presets_on_non_square_maps(fit_presets, preset):
    cache = fit_presets[preset]
    from featup_ops.oracle import oracle_labels

    for key in SHARDS[0]:
        hw = PHOTOS[key][3]
        _, ref = reference(key)
        got = np.asarray(cache[key], np.float32)
        assert got.shape == (32, *hw)
        if preset == "int8":
            name, row = cache.location(key)
            scale = np.asarray(cache._array("scale", name)[row])
            assert (np.abs(got - ref) <= scale[:, None, None] / 2 + 1e-4).all(), key
        elif preset == "pca32":  # all 32 components: the features, up to float16 coefficients
            assert np.abs(got - ref).max() <= 2e-2, key
        else:  # replayed at read time from the low-res features and the stored JPEG of the whole image
            assert cache.image(key).shape == (3, *hw)
            cos = (got * ref).sum(0) / (np.linalg.norm(got, axis=0) * np.linalg.norm(ref, axis=0) + 1e-12)
            assert cos.mean() >= 0.995, (key, cos.mean())
        # labels at the same shape: the oracle's known-truth classes of the resized image
        resized = Image.fromarray(source_image(key)).resize((hw[1], hw[0]), Image.BICUBIC)
        x = normalize(torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None])
        truth = oracle_labels(x, hw)[0].numpy()
        labels = cache.labels(key)
        assert labels.shape == hw and (labels == truth).mean() > 0.999, key


def _resized_photo(key: str, hw: tuple[int, int]) -> torch.Tensor:
    img = Image.fromarray(source_image(key)).resize((hw[1], hw[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]


def test_upsamplers_on_non_square_maps():
    """JBU against the independent unfold evaluation; bilinear and bicubic commute with a transpose (a 2:1 map
    and its 1:2 transpose); AnyUp gives maps at the non-square size the model promises."""
    from featup_ops import FeatureModel

    x = _resized_photo("pano21", (48, 96))
    jbu = FeatureModel.create("oracle", "jbu", random_init=True)
    lowres, highres = jbu(x)
    assert highres.shape == (1, 32, 48, 96) and jbu.output_size(48, 96) == (48, 96)
    want = jbu_highres(random_jbu_state(), lowres, normalize(x))
    torch.testing.assert_close(highres, want, atol=1e-4, rtol=1e-4)
    for mode in ("bilinear", "bicubic"):
        model = FeatureModel.create("oracle", mode)
        _, wide = model(x)
        _, tall = model(x.transpose(2, 3).contiguous())
        assert wide.shape == (1, 32, 48, 96)
        torch.testing.assert_close(tall.transpose(2, 3), wide, atol=1e-5, rtol=1e-5)
    anyup = FeatureModel.create("oracle", "anyup", random_init=True)
    assert anyup(x)[1].shape == (1, 32, 48, 96)


@pytest.mark.slow
def test_implicit_fits_non_square_images():
    """Fitted on a 2:1 image (jittered views shift by whole pixels along each axis): nearer the oracle's truth
    than the bilinear resize of the same low-res features."""
    from featup_ops import FeatureModel

    x = _resized_photo("pano21", (32, 64))
    model = FeatureModel.create("oracle", "implicit", upsampler_options={"steps": 30, "views": 2, "total_views": 30,
                                                                        "pca_views": 10})
    lowres, highres = model(x)
    assert highres.shape == (1, 32, 32, 64)
    truth = model.backbone.true_features(normalize(x))
    bilinear = F.interpolate(lowres, size=(32, 64), mode="bilinear", align_corners=False)
    error, baseline = ((y - truth).norm() / truth.norm() for y in (highres, bilinear))
    assert error < 0.9 * baseline, (error, baseline)


def test_vit_with_14px_patches_caches_non_square_images(aspect_shards, tmp_path):
    """A timm ViT (DINOv2's 14 px patches, interpolated position embeddings) through the shard processor."""
    from pipeline.caching.shard_processor import ShardProcessor, ShardTask
    from pipeline.storage.shards import resolve_shards

    config = job_config(_inputs(aspect_shards)[:1], tmp_path / "vit.zarr", backbone="dinov2", upsampler="bilinear",
                        resize="fit", labels="auto")
    OutputStore(config.output).prepare(config.identity(), overwrite=False)
    processor = ShardProcessor(config)
    result = processor.process(ShardTask(resolve_shards(config.inputs)[0]))
    assert result.ok == 5
    root = zarr.open(config.output, mode="r")
    shapes = {}
    for name in root["features"].array_keys():
        for key in root["features"][name].attrs["featup"]["keys"]:
            shapes[key] = root["features"][name].shape[-2:], root["lowres"][name].shape[-2:]
    for key in SHARDS[0]:
        h, w = fit_shape(*PHOTOS[key][1:3], SIZE, 14)
        assert h % 14 == 0 and w % 14 == 0
        assert shapes[key] == ((h // 14 * 16, w // 14 * 16), (h // 14, w // 14)), key
    assert shapes["pano21"][1] == (3, 6)  # 42 x 84 px: 2:1 stays 2:1


# -- reading across shapes -------------------------------------------------------------------------------------
def test_crops_of_one_size_and_batches_of_one_shape(fit_cache):
    cache = fit_cache
    data = LabelledFeatures(cache, crop_size=40, seed=1)
    assert (data.shapes() == 40).all()
    feats, labels = next(iter(torch.utils.data.DataLoader(data, batch_size=7)))
    assert feats.shape == (7, 32, 40, 40) and labels.shape == (7, 40, 40)
    big = LabelledFeatures(cache, crop_size=1000)  # as large as the smallest side allows
    assert big[0][0].shape == (32, 48, 48)
    whole = LabelledFeatures(cache)
    sampler = ShapeBatchSampler(whole.shapes(), batch_size=2, shuffle=True, seed=0)
    seen = []
    for feats, labels in torch.utils.data.DataLoader(whole, batch_sampler=sampler):
        assert feats.shape[2:] == labels.shape[1:]
        seen.append(feats.shape[0])
    assert sum(seen) == len(cache) and len(seen) == len(sampler) == 4  # 2 + 2 + 2 + 1 samples of 4 shapes
    key = cache.keys()[0]
    np.testing.assert_array_equal(cache.read(key, crop=(3, 5, 20, 30)), np.asarray(cache[key])[:, 3:23, 5:35])


def test_shape_batch_sampler_groups_shuffles_and_splits_evenly():
    shapes = np.array([[48, 64]] * 5 + [[64, 48]] * 3 + [[48, 96]] * 2)
    sampler = ShapeBatchSampler(shapes, batch_size=2, shuffle=True, seed=3)
    first, second = list(sampler), list(sampler)
    for batches in (first, second):
        assert sorted(i for b in batches for i in b) == list(range(10))
        assert all(len({tuple(shapes[i]) for i in b}) == 1 for b in batches)
    assert first != second and len(first) == len(sampler) == 6  # 3 + 2 + 1 batches
    assert list(ShapeBatchSampler(shapes, 2, True, seed=3)) == first  # reproducible
    assert len(list(ShapeBatchSampler(shapes, 2, drop_last=True))) == 4
    parts = [list(ShapeBatchSampler(shapes, 2, True, seed=3, rank=r, replicas=4)) for r in range(4)]
    assert {len(p) for p in parts} == {1}  # 6 batches over 4 replicas: one each, the same number
    assert not set(map(tuple, sum(parts, []))) - set(map(tuple, first))
    with pytest.raises(ValueError, match="rank"):
        ShapeBatchSampler(shapes, 2, rank=2, replicas=2)


def test_probe_trains_and_scores_every_validation_pixel_at_its_own_shape(fit_cache, tmp_path):
    from pipeline.workflows.probe_on_cache import ProbeJobConfig, load_probe, predict, run_probe

    cache = fit_cache
    metrics = run_probe(ProbeJobConfig(cache=cache.url, output=str(tmp_path / "p"), epochs=2, batch_size=2,
                                       workers=0, val_fraction=0.4, lr=0.05, seed=1))
    train, val = cache.split(0.4, 1)
    val = [k for k in val if cache.labels(k) is not None]
    assert metrics["val_samples"] >= 2 and len({cache.shape(k) for k in cache.split(0.4, 1)[1]}) >= 2
    probe = load_probe(str(tmp_path / "p"))
    classes = metrics["classes"]
    correct = total = 0
    for key in val:
        truth, pred = cache.labels(key).astype(np.int64), predict(probe, cache[key])
        assert pred.shape == cache.shape(key)
        keep = truth < classes
        correct, total = correct + int((truth == pred)[keep].sum()), total + int(keep.sum())
    assert metrics["pixel_accuracy"] == pytest.approx(correct / total, abs=1e-6)
    cropped = run_probe(ProbeJobConfig(cache=cache.url, epochs=1, batch_size=2, workers=0, val_fraction=0.4,
                                       crop_size=32, seed=1))
    assert cropped["train_samples"] == metrics["train_samples"]
    # data-parallel ranks (Ray Train's DDP all-reduces every step) get the same number of batches, both ways
    from pipeline.workflows.probe_on_cache import _loader

    for crop_size in (None, 32):
        config = ProbeJobConfig(cache=cache.url, batch_size=2, workers=0, crop_size=crop_size)
        loaders = [_loader(cache, cache.keys(), config, True, True, rank=r, world=2) for r in range(2)]
        counts = [sum(1 for _ in loader) for loader in loaders]
        assert counts[0] == counts[1] >= 2, (crop_size, counts)
        if crop_size is None:  # batches of one shape, together covering all but a left-over batch
            batches = [b for loader in loaders for b in loader.batch_sampler]
            assert all(len({cache.shape(cache.key(i)) for i in b}) == 1 for b in batches)


def test_ray_dataset_carries_each_shape(ray_local, fit_cache):
    cache = fit_cache
    keys = ["wide43", "tall34", "pano21", "square"]
    rows = {r["key"]: r for r in cache.to_ray_dataset(keys, concurrency=1).take_all()}
    assert sorted(rows) == sorted(keys)
    for key, row in rows.items():
        assert (row["height"], row["width"]) == cache.shape(key) == row["features"].shape[1:]
        np.testing.assert_array_equal(row["features"], np.asarray(cache[key], np.float32))
        np.testing.assert_array_equal(row["labels"], cache.labels(key).astype(np.int64))


def test_previews_keep_the_aspect_ratio(fit_cache, tmp_path):
    written = sorted(Path(fit_cache.url, "previews").glob("*.png"))
    assert len(written) == 4
    for path in written:
        h, w = fit_cache.shape(path.stem)
        assert Image.open(path).size == (3 * w, h)
    from pipeline.reading.previews import sample_images

    image = sample_images(fit_cache, ["pano21"])["pano21"]
    np.testing.assert_array_equal(image, np.asarray(Image.fromarray(source_image("pano21")).resize((96, 48),
                                                                                                  Image.BICUBIC)))


def test_jitter_shifts_non_square_images_by_whole_pixels_along_each_axis():
    from featup_ops.jitter import JitterSpec, sample_jitter

    theta = sample_jitter(200, (48, 64), JitterSpec(p_flip=0, p_zoom=0, pad=10), per_sample=True,
                          generator=torch.Generator().manual_seed(0)).theta.double()
    dy, dx = theta[:, 1, 2] * 48 / 2, theta[:, 0, 2] * 64 / 2  # the shift in pixels of each axis
    for shift in (dy, dx):
        torch.testing.assert_close(shift, shift.round(), atol=1e-4, rtol=0)
        assert shift.abs().max() <= 10 and len(shift.round().unique()) > 10
    square = sample_jitter(4, 64, generator=torch.Generator().manual_seed(1)).theta
    torch.testing.assert_close(square, sample_jitter(4, (64, 64), generator=torch.Generator().manual_seed(1)).theta)
