"""PCA preview pictures of cached samples, written next to the cache as <output>/previews/<key>.png: image |
low-res | high-res features, and optionally more upsamplers re-run on the cached low-res features, side by side."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.options import ConfigError, option
from pipeline.reading.feature_cache import FeatureCache, upsample_lowres
from pipeline.storage.filesystems import join, put_bytes, resolve_options
from pipeline.storage.images import load_sample_image
from pipeline.storage.shards import iter_samples
from pipeline.upsampler_weights import WEIGHTS_HELP, assign_weights


def sample_images(cache: FeatureCache, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The model's input images of `keys` (centre crops, or whole images at their own aspect ratio with
    --resize fit): from the store (lowres preset) or re-read from their shards."""
    if cache.preset.needs_upsampler_at_read:
        return {key: cache.image(key).transpose(1, 2, 0) for key in keys}
    wanted: dict[str, set[str]] = {}
    for key in keys:
        wanted.setdefault(cache.row(key)["source"], set()).add(key)
    images: dict[str, np.ndarray] = {}
    for source, names in wanted.items():
        for sample in iter_samples(source, cache.storage_options):
            if sample["__key__"] in names:
                images[sample["__key__"]] = load_sample_image(sample, cache.image_size, resize=cache.resize,
                                                              multiple=cache.patch_size)[0]
                if names <= images.keys():
                    break
    return images


def render(cache: FeatureCache, key: str, image: np.ndarray,
           upsamplers: Mapping[str, torch.nn.Module] | None = None) -> np.ndarray:
    """image | low-res | high-res strip of one cached sample at its own aspect ratio, then one panel per
    upsampler in `upsamplers`, re-run on the sample's cached low-res features and image."""
    from featup_ops.visualize import preview_strip

    try:
        lowres = cache.lowres(key)
    except Exception:  # noqa: BLE001 - caches written with --no-lowres show image | high-res
        lowres = None
    if upsamplers and lowres is None:
        raise ConfigError(f"--upsampler re-runs upsamplers on the cached low-res features, but {cache.url} was "
                          "written with --no-lowres")
    others = [upsample_lowres(up, lowres, image.transpose(2, 0, 1)) for up in (upsamplers or {}).values()]
    return preview_strip(image, cache.read(key), lowres, others)


def build_upsamplers(cache: FeatureCache, weights: Mapping[str, str | None], random_init: bool = False,
                     storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.nn.Module]:
    """The upsamplers named in `weights` ({name: weights or None}), for the cache's feature width; refused
    (ConfigError) when one cannot be built or needs the backbone itself."""
    from featup_ops import BackboneError, CheckpointError, UpsamplerError, create_upsampler

    built = {}
    for name, source in weights.items():
        try:
            built[name] = create_upsampler(name, cache.dim, weights=source, random_init=random_init,
                                           storage_options=resolve_options(source, storage_options))
        except (BackboneError, CheckpointError, UpsamplerError) as exc:
            raise ConfigError(str(exc)) from None
        if getattr(built[name], "needs_backbone", False):
            raise ConfigError(f"--upsampler {name} needs the backbone, not just its cached low-res features: "
                              "preview it from a cache written with it (jobs/upsample_coco.py --upsampler "
                              f"{name})")
    return built


def write_previews(url: str, keys: Sequence[str] | None = None, count: int = 4, out: str | None = None,
                   storage_options: Mapping[str, Any] | None = None,
                   upsamplers: Mapping[str, str | None] | None = None, random_init: bool = False) -> list[str]:
    """Renders PNG previews for `keys` (default: the first `count` samples) into `out` (default
    <url>/previews), with a panel for each of `upsamplers` ({name: weights or None}, see `build_upsamplers`);
    returns the written paths."""
    cache = FeatureCache(url, storage_options)
    keys = list(keys) if keys else [cache.key(i) for i in range(min(count, len(cache)))]
    missing = [k for k in keys if k not in cache]
    if missing:
        raise ConfigError(f"not in the cache {url}: {missing[:5]}; see FeatureCache(url).keys() for what it holds")
    extra = build_upsamplers(cache, upsamplers or {}, random_init, storage_options)
    images = sample_images(cache, keys)
    folder = (out or cache.store.url_of("previews")).rstrip("/")
    written = []
    for key in keys:
        buf = io.BytesIO()
        Image.fromarray(render(cache, key, images[key], extra)).save(buf, format="PNG")
        written.append(join(folder, f"{key.replace('/', '_')}.png"))
        put_bytes(written[-1], buf.getvalue(), storage_options)
    return written


@dataclass(frozen=True)
class PreviewConfig:
    """The preview job's options."""

    cache: str = option(required=True, help="feature cache (local or fsspec URL)")
    key: list[str] | None = option(None, repeat=True, help="sample key to render; repeat (default: the first --count)")
    count: int = option(4, help="how many samples when no --key is given")
    out: str | None = option(None, help="folder for the PNGs (default: <cache>/previews)")
    upsampler: list[str] | None = option(None, repeat=True,
                                         help="add a panel: this upsampler (e.g. anyup, bilinear, jbu) re-run on "
                                              "the cached low-res features and image; repeatable")
    upsampler_weights: list[str] | None = option(None, repeat=True, metavar="[NAME=]PATH|URL",
                                                 help=WEIGHTS_HELP)
    random_init: bool = option(False, help="untrained JBU or AnyUp for an --upsampler without weights (tests)")
    storage_options: Mapping[str, Any] = option({}, help="fsspec options: JSON or @file.json")


def run(config: PreviewConfig) -> list[str]:
    """Renders the previews and prints where they went."""
    weights = assign_weights(config.upsampler or [], config.upsampler_weights, config.random_init)
    paths = write_previews(config.cache, config.key, config.count, config.out, config.storage_options, weights,
                           config.random_init)
    print("\n".join(paths))
    return paths
