"""Reading inputs: shard patterns, strict tar streaming, and the bad-image corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.ingest.shard_writer import write_shards
from pipeline.storage.filesystems import StorageError
from pipeline.storage.images import (
    Geometry,
    SampleError,
    decode_image,
    load_sample_image,
    resize_and_crop,
)
from pipeline.storage.shards import (
    InputError,
    TruncatedShardError,
    expand_patterns,
    iter_samples,
    resolve_shards,
)
from tests.corpus import BAD_KINDS, GOOD_KINDS, corpus_samples


def _keys(url: str) -> list[str]:
    return [s["__key__"] for s in iter_samples(url)]


def test_patterns_braces_globs_lists_and_index(photo_shards):
    d = str(photo_shards)
    by_brace = expand_patterns([f"{d}/photos-{{000000..000002}}.tar"])
    assert [u.rsplit("/", 1)[1] for u in by_brace] == ["photos-000000.tar", "photos-000001.tar", "photos-000002.tar"]
    assert expand_patterns([f"{d}/photos-*.tar"]) == by_brace
    # several patterns, duplicates dropped, order kept
    assert expand_patterns([f"{d}/photos-000002.tar", f"{d}/photos-00000[01].tar"]) == [by_brace[2], *by_brace[:2]]
    listing = photo_shards / "list.txt"
    listing.write_text("# my shards\nphotos-000001.tar\n\n" + by_brace[0] + "\n")
    assert expand_patterns([str(listing)]) == [f"{d}/photos-000001.tar", by_brace[0]]
    assert expand_patterns([f"{d}/index.json"]) == by_brace
    shards = resolve_shards([f"{d}/photos-{{000000..000002}}.tar"])
    assert [s.expected_samples for s in shards] == [3, 3, 3]
    assert [s.shard_id for s in shards] == ["photos-000000", "photos-000001", "photos-000002"]


def test_missing_inputs_fail_before_work(photo_shards, tmp_path):
    with pytest.raises(InputError, match="1 of 3 input shards do not exist"):
        resolve_shards([f"{photo_shards}/photos-{{000001..000003}}.tar"])
    with pytest.raises(InputError, match="matches no file"):
        resolve_shards([f"{tmp_path}/nothing-*.tar"])


def test_same_names_in_two_folders_get_distinct_ids(photo_shards, tmp_path):
    other = tmp_path / "copy"
    write_shards(corpus_samples()[:2], str(other), prefix="photos")
    shards = resolve_shards([f"{photo_shards}/photos-000000.tar", f"{other}/photos-000000.tar"])
    assert len({s.shard_id for s in shards}) == 2


def test_stream_reads_every_sample_in_order(photo_shards):
    assert _keys(f"{photo_shards}/photos-000000.tar") == ["astronaut", "chelsea", "coffee"]
    sample = next(iter_samples(f"{photo_shards}/photos-000001.tar"))
    assert set(sample) >= {"__key__", "__url__", "jpg", "json"}
    assert json.loads(sample["json"])["source"] == "skimage.data.rocket"


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary", "no_end_marker"])
def test_truncated_tars_are_detected(photo_shards, tmp_path, cut):
    data = (photo_shards / "photos-000000.tar").read_bytes()
    import tarfile

    with tarfile.open(photo_shards / "photos-000000.tar") as tf:
        members = tf.getmembers()
    # members: astronaut.jpg, astronaut.json, chelsea.jpg, ... ; offsets from tarfile
    second = [m for m in members if m.name.startswith("chelsea")][0]
    if cut == "mid_member":
        data = data[: second.offset_data + second.size // 2]
    elif cut == "member_boundary":
        data = data[: second.offset]  # exactly before chelsea's header
    else:
        data = data[: members[-1].offset_data + ((members[-1].size + 511) // 512) * 512]  # all data, no trailer
    path = tmp_path / "cut.tar"
    path.write_bytes(data)
    got = []
    with pytest.raises(TruncatedShardError) as info:
        for s in iter_samples(str(path)):
            got.append(s["__key__"])
    if cut == "mid_member":
        assert got == ["astronaut"] and info.value.broken_key == "chelsea"
    elif cut == "member_boundary":
        assert got == ["astronaut"]
    else:
        assert got == ["astronaut", "chelsea", "coffee"]
    assert info.value.samples_read == len(got)


def test_not_a_tar(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"this is not a tar file at all" * 40)
    with pytest.raises(TruncatedShardError, match="not a readable tar"):
        list(iter_samples(str(path)))


def test_unreachable_bucket_is_a_clear_error(s3_endpoint):
    with pytest.raises(StorageError, match="no-such-bucket"):
        resolve_shards(["s3://no-such-bucket/train-{000..003}.tar"])
    with pytest.raises(StorageError, match="unreachable"):
        resolve_shards(["s3://bkt/x.tar"], {"endpoint_url": "http://127.0.0.1:9", "config_kwargs":
                                            {"connect_timeout": 1, "retries": {"max_attempts": 1}}})


def test_shards_on_s3(s3_bucket, photo_shards):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(photo_shards) + "/", f"{s3_bucket}/shards/", recursive=True)
    shards = resolve_shards([f"s3://{s3_bucket}/shards/photos-{{000000..000001}}.tar"])
    assert [s.expected_samples for s in shards] == [3, 3]
    assert _keys(shards[1].url) == ["rocket", "hubble_deep_field", "camera"]


def test_bad_image_corpus():
    results = {}
    for sample in corpus_samples():
        try:
            img, geometry = load_sample_image(sample, 64)
            assert img.shape == (64, 64, 3) and img.dtype == np.uint8
            results[sample["__key__"]] = geometry
        except SampleError as exc:
            results[sample["__key__"]] = str(exc)
    assert all(isinstance(results[k], Geometry) for k in GOOD_KINDS), results
    assert all(isinstance(results[k], str) for k in BAD_KINDS), results
    assert "decompression-bomb" in results["huge"] and "9500x9500" in results["huge"]
    assert "no image" in results["no_image"] and "json" in results["no_image"]
    assert "unsupported image format 'heic'" in results["unsupported_format"]
    assert "truncated" in results["truncated_jpeg"]
    assert "minimum side" in results["tiny"]
    assert results["cmyk_jpeg"].orig_mode == "CMYK" and results["sixteen_bit_png"].orig_mode.startswith("I")


def test_exif_orientation_is_applied():
    from tests.corpus import exif_rotated_jpeg

    rgb, _, orientation = decode_image(exif_rotated_jpeg())
    assert orientation == 6
    assert rgb.shape[:2] == (300, 200)  # upright: 300 tall, 200 wide
    from pipeline.ingest.sample_photos import photo

    expected = photo("astronaut")[:300, :200].astype(float)
    assert np.abs(rgb.astype(float) - expected).mean() < 8  # same picture, JPEG noise only


def test_sixteen_bit_is_rescaled_not_clipped():
    from pipeline.ingest.sample_photos import photo
    from tests.corpus import sixteen_bit_png

    rgb, mode, _ = decode_image(sixteen_bit_png())
    assert mode.startswith("I")
    np.testing.assert_allclose(rgb[..., 0].astype(float), photo("camera").astype(float), atol=1)


def test_alpha_is_composited_on_white():
    import io

    from PIL import Image

    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    rgb, _, _ = decode_image(buf.getvalue())
    assert (rgb == 255).all()


@pytest.mark.parametrize("name,size", [("astronaut", 32), ("coffee", 48), ("retina", 64)])
def test_large_jpegs_decoded_reduced_stay_close_to_the_full_decode(name, size):
    """A JPEG far larger than the target is decoded at 1/2-1/8 scale (Image.draft): same geometry as the full
    decode + resize, pixels within the bound stated in images._open_rgb."""
    from pipeline.ingest.sample_photos import encode, photo

    arr = photo(name)
    sideways = np.ascontiguousarray(arr.swapaxes(0, 1))  # and not square: portrait
    for source in (arr, sideways):
        data = encode(source, quality=90)
        got, geometry = load_sample_image({"jpg": data}, size)
        rgb, mode, orientation = decode_image(data)  # the reference: full decode, then resize and crop
        want, want_geometry = resize_and_crop(rgb, size, mode, orientation)
        assert geometry == want_geometry and got.shape == want.shape == (size, size, 3)
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.any()  # the reduced decode really ran
        assert diff.mean() <= 0.5 and diff.max() <= 16, (diff.mean(), diff.max())


def test_resize_and_crop_geometry():
    img = np.zeros((300, 600, 3), np.uint8)
    img[:, 300:] = 255  # right half white
    out, g = resize_and_crop(img, 100)
    assert (g.resized_height, g.resized_width, g.crop_top, g.crop_left, g.crop_size) == (100, 200, 0, 50, 100)
    # the white/black border lands at resized x=100, i.e. crop column 50
    assert out[:, 45].mean() < 10 and out[:, 55].mean() > 245
