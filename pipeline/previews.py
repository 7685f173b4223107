"""PCA preview pictures of cached samples, written next to the cache as <output>/previews/<key>.png."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from .dataset import FeatureCache
from .images import load_sample_image
from .shards import iter_samples


def sample_images(cache: FeatureCache, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The cropped input images of `keys`: from the store (lowres preset) or re-read from their shards."""
    if "image" in {s.group for s in cache.preset.arrays()}:
        out = {}
        for key in keys:
            i = cache.position(key)
            out[key] = np.asarray(cache._array("image", cache._names[i])[cache._rows[i]]).transpose(1, 2, 0)
        return out
    wanted: dict[str, set[str]] = {}
    for key in keys:
        wanted.setdefault(cache.row(key)["source"], set()).add(key)
    images: dict[str, np.ndarray] = {}
    for source, names in wanted.items():
        for sample in iter_samples(source, cache.storage_options):
            if sample["__key__"] in names:
                images[sample["__key__"]] = load_sample_image(sample, cache.image_size)[0]
                if names <= images.keys():
                    break
    return images


def render(cache: FeatureCache, key: str, image: np.ndarray) -> np.ndarray:
    """image | low-res | high-res strip of one cached sample."""
    from featup_ops.visualize import preview_strip

    try:
        lowres = cache.lowres(key)
    except Exception:  # noqa: BLE001 - caches written with --no-lowres show image | high-res
        lowres = None
    return preview_strip(image, cache.read(key), lowres)


def write_previews(url: str, keys: Sequence[str] | None = None, count: int = 4, out: str | None = None,
                   storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Renders PNG previews for `keys` (default: the first `count` samples) into `out` (default
    <url>/previews); returns the written paths."""
    cache = FeatureCache(url, storage_options)
    keys = list(keys) if keys else cache.keys()[:count]
    missing = [k for k in keys if k not in cache]
    if missing:
        raise KeyError(f"not in the cache: {missing[:5]}")
    images = sample_images(cache, keys)
    target = _Folder(out or cache.store.url_of("previews"), storage_options)
    written = []
    for key in keys:
        buf = io.BytesIO()
        Image.fromarray(render(cache, key, images[key])).save(buf, format="PNG")
        written.append(target.put(f"{key.replace('/', '_')}.png", buf.getvalue()))
    return written


class _Folder:
    """A folder (local or fsspec URL) to drop files into."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None):
        from .storage import filesystem

        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)

    def put(self, name: str, data: bytes) -> str:
        self.fs.pipe_file(f"{self.root}/{name}", data)
        return f"{self.url}/{name}"
