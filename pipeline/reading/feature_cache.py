"""Reading a feature cache back, for training: `FeatureCache(url)[key]` -> (C, H, W) numpy array.

    cache = FeatureCache("s3://bkt/feats/dinov2_jbu.zarr")
    len(cache), cache.keys()[:3], cache.manifest          # ok samples; the full manifest (pyarrow Table)
    feats = cache["000000139"]                            # whatever the storage preset, (C, H, W) features
    crop = cache.read("000000139", crop=(0, 32, 96, 96))  # only the tiles the crop covers are fetched
    labels = cache.labels("000000139")                    # (H, W) class ids aligned with the features
    train, val = cache.split(val_fraction=0.2)            # deterministic split by key
    loader = DataLoader(LabelledFeatures(cache, train, crop_size=96), batch_size=8, num_workers=4, shuffle=True)
    ds = cache.to_ray_dataset(train)                      # the same, as a Ray Data dataset

Zarr arrays are opened lazily in each process, so a DataLoader's forked workers get their own connections.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.utils.data

from pipeline.caching.output_store import (
    LABELS_GROUP,
    LOWRES_GROUP,
    MANIFEST_NAME,
    RUN_NAME,
    UPSAMPLER_NAME,
    OutputStore,
)
from pipeline.caching.presets import Preset, decode_stored_image, pca_components
from pipeline.options import ConfigError

Crop = tuple[int, int, int, int]  # top, left, height, width in high-res feature pixels
IGNORE_LABEL = 255


class CacheError(ConfigError):
    """A location that is not a finished feature cache, or a request it cannot serve."""


def split_keys(keys: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a hash of each key: stable across runs, machines and growth."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for key in keys:
        h = int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
        (val if h < val_fraction else train).append(key)
    return train, val


class FeatureCache(torch.utils.data.Dataset):
    """The ok samples of a finished caching run, indexable by key or position (a torch Dataset)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, device: str = "cpu"):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.device = device
        self.store = OutputStore(self.url, self.storage_options)
        try:
            data = self.store.fs.cat_file(self.store.path(MANIFEST_NAME))
        except FileNotFoundError:
            raise CacheError(f"{self.url} has no {MANIFEST_NAME}: not a feature cache, or its job has not "
                             "finished (rerun the job to complete it)") from None
        self.manifest: pa.Table = pq.read_table(io.BytesIO(data))
        self.run: dict = self.store.get_json(RUN_NAME) or {}
        settings = self.run.get("settings", {})
        self.storage: str = settings.get("storage", settings.get("dtype", "float16"))
        model = self.run.get("model", {})
        self.dim: int = int(settings.get("dim", model.get("dim", 0)))
        self.output_size = tuple(settings.get("output_size", model.get("output_size", (0, 0))))
        self.lowres_size = tuple(model.get("lowres_size", (0, 0)))
        self.image_size = int(settings.get("image_size", 0))
        pca = self.store.read_pca() if pca_components(self.storage) is not None else None
        self.preset = Preset(self.storage, self.dim, self.output_size, self.lowres_size, self.image_size, pca)
        ok = self.manifest.filter(pc.equal(self.manifest.column("status"), "ok"))
        self._keys: list[str] = ok.column("key").to_pylist()
        self._names: list[str] = [p.split("/", 1)[1] for p in ok.column("features_array").to_pylist()]
        self._lowres: list[str | None] = ok.column("lowres_array").to_pylist()
        self._labels: list[str | None] = (ok.column("labels_array").to_pylist() if "labels_array" in ok.column_names
                                          else [None] * len(self._keys))
        self._rows: list[int] = ok.column("index").to_pylist()
        self._position: dict[str, int] = {}
        self._duplicates: set[str] = set()
        for i, key in enumerate(self._keys):
            if key in self._position:
                self._duplicates.add(key)
            self._position[key] = i
        self._opened: dict[str, Any] = {}
        self._upsampler = None
        self._pid = os.getpid()

    # -- lookup ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def errors(self) -> pa.Table:
        """Manifest rows of the samples that could not be processed, with their reasons."""
        return self.manifest.filter(pc.equal(self.manifest.column("status"), "error"))

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
        """(train keys, validation keys), deterministic by key hash."""
        return split_keys(self._keys, val_fraction, seed)

    def position(self, key: str) -> int:
        if key in self._duplicates:
            raise KeyError(f"key {key!r} occurs in several shards; index by position (see .manifest)")
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(f"no ok sample with key {key!r} in {self.url}") from None

    def _index(self, item: int | str) -> int:
        if isinstance(item, str):
            return self.position(item)
        i = int(item)
        if not -len(self) <= i < len(self):
            raise IndexError(f"position {i} out of range for {len(self)} samples")
        return i % len(self)

    def row(self, item: int | str) -> dict:
        """The manifest row of a sample: source shard, original size, crop, where its arrays live."""
        i = self._index(item)
        mask = pc.and_(pc.equal(self.manifest.column("key"), self._keys[i]),
                       pc.equal(self.manifest.column("index"), self._rows[i]))
        rows = [r for r in self.manifest.filter(mask).to_pylist() if r["features_array"].endswith(self._names[i])]
        return rows[0]

    # -- reading --------------------------------------------------------------------------------------------
    def _array(self, group: str, name: str):
        if os.getpid() != self._pid:  # forked DataLoader worker: reopen everything in this process
            self._opened, self._pid, self._upsampler = {}, os.getpid(), None
            self.store = OutputStore(self.url, self.storage_options)
        path = f"{group}/{name}"
        if path not in self._opened:
            self._opened[path] = self.store.open_array(path)
        return self._opened[path]

    def _replay_upsampler(self):
        """The lowres preset's upsampler, rebuilt exactly as the job ran it."""
        if self._upsampler is None:
            from featup_ops import create_upsampler, load_jbu

            kind = self.run.get("settings", {}).get("upsampler")
            if kind == "jbu":
                self._upsampler = load_jbu(self.store.url_of(UPSAMPLER_NAME), self.store.resolved_options)
            else:
                self._upsampler = create_upsampler(kind, self.dim)
            self._upsampler = self._upsampler.to(self.device).eval()
        return self._upsampler

    def image(self, item: int | str) -> np.ndarray:
        """The cropped input image (3, S, S) uint8 that the lowres preset stored (JPEG, or raw in older caches)."""
        if not self.preset.needs_upsampler_at_read:
            raise CacheError(f"only the lowres preset stores the image; this cache is {self.storage}")
        i = self._index(item)
        return decode_stored_image(self._array("image", self._names[i])[self._rows[i]])

    def _replay(self, i: int) -> np.ndarray:
        from featup_ops import FeatureModel

        name, row = self._names[i], self._rows[i]
        lowres = torch.from_numpy(np.asarray(self._array(LOWRES_GROUP, name)[row])).float()[None].to(self.device)
        image = torch.from_numpy(self.image(i)).float()[None].to(self.device) / 255
        with torch.no_grad():
            highres = self._replay_upsampler()(lowres, FeatureModel.guidance(image))
        return highres[0].cpu().numpy()

    def read(self, item: int | str, crop: Crop | None = None) -> np.ndarray:
        """High-res features (C, H, W) of a sample, or of the crop (top, left, height, width) of them.

        float16/float32 come back as stored; bfloat16, int8, pca<k> and lowres are decoded to float32.
        """
        i = self._index(item)
        name, row = self._names[i], self._rows[i]
        if self.preset.needs_upsampler_at_read:
            full = self._replay(i)
            return full if crop is None else full[:, crop[0]: crop[0] + crop[2], crop[1]: crop[1] + crop[3]]
        window = (slice(None),) if crop is None else (slice(None), slice(crop[0], crop[0] + crop[2]),
                                                      slice(crop[1], crop[1] + crop[3]))
        parts = {spec.group: np.asarray(self._array(spec.group, name)[(row, *window)] if spec.spatial
                                        else self._array(spec.group, name)[row])
                 for spec in self.preset.arrays()}
        return self.preset.decode(parts)

    def __getitem__(self, item: int | str) -> np.ndarray:
        """High-res features (C, H, W) of a sample by key or position."""
        return self.read(item)

    def lowres(self, item: int | str) -> np.ndarray:
        """The backbone's low-res features (C, h, w) of a sample (when the job stored them)."""
        i = self._index(item)
        if self._lowres[i] is None:
            raise CacheError("this cache was written with --no-lowres")
        return np.asarray(self._array(LOWRES_GROUP, self._names[i])[self._rows[i]])

    def labels(self, item: int | str, crop: Crop | None = None) -> np.ndarray | None:
        """Class ids (H, W) aligned with the features (255 = ignore), or None when the sample had no label."""
        i = self._index(item)
        if self._labels[i] is None:
            return None
        arr = self._array(LABELS_GROUP, self._names[i])
        if crop is None:
            return np.asarray(arr[self._rows[i]])
        return np.asarray(arr[self._rows[i], crop[0]: crop[0] + crop[2], crop[1]: crop[1] + crop[3]])

    def to_ray_dataset(self, keys: Sequence[str] | None = None, with_labels: bool = True, crop_size: int | None = None,
                       concurrency: int = 2):
        """A Ray Data dataset of {"key", "features", "labels"} rows read by `concurrency` reader actors."""
        import ray.data

        from pipeline.ray_runtime import init_ray
        from pipeline.storage.credentials import for_workers

        init_ray()
        items = [{"key": k} for k in (keys if keys is not None else self._keys)]
        return ray.data.from_items(items).map_batches(  # credentials travel masked, by object reference
            _RayReader, fn_constructor_args=(self.url, for_workers(self.storage_options), with_labels, crop_size),
            batch_size=8, concurrency=concurrency)

    def __repr__(self) -> str:
        return f"FeatureCache({self.url!r}, samples={len(self)}, storage={self.storage})"


class LabelledFeatures(torch.utils.data.Dataset):
    """(features (C,h,w), labels int64 (h,w)) pairs of a cache, optionally random crops of them.

    Features keep the stored float type (float16 stays float16: half the bytes through the DataLoader);
    the training loop casts.

    Crops are read with `FeatureCache.read(crop=...)`, so only the tiles under the crop are fetched.
    Samples without a label get all-ignore labels.
    """

    def __init__(self, cache: FeatureCache, keys: Sequence[str] | None = None, crop_size: int | None = None,
                 seed: int = 0):
        self.cache = cache
        self.keys = list(keys if keys is not None else cache.keys())
        self.crop_size, self.seed = crop_size, seed
        self._draws = 0  # crops differ from one pass to the next, reproducibly per worker

    def __len__(self) -> int:
        return len(self.keys)

    def _crop(self, index: int) -> Crop | None:
        if self.crop_size is None:
            return None
        h, w = self.cache.output_size
        size = min(self.crop_size, h, w)
        self._draws += 1
        rng = np.random.default_rng([self.seed, index, self._draws, torch.initial_seed() % 2**31])
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), size, size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.keys[index]
        crop = self._crop(index)
        feats = torch.from_numpy(np.ascontiguousarray(self.cache.read(key, crop)))
        labels = self.cache.labels(key, crop)
        if labels is None:
            labels = np.full(feats.shape[1:], IGNORE_LABEL, np.int64)
        return feats, torch.from_numpy(labels.astype(np.int64))


class _RayReader:
    """Ray Data UDF: opens the cache once per reader actor, then reads batches of keys."""

    def __init__(self, url: str, storage_options: Mapping[str, Any], with_labels: bool, crop_size: int | None):
        self.cache = FeatureCache(url, storage_options)
        self.pairs = LabelledFeatures(self.cache, crop_size=crop_size)
        self.with_labels = with_labels

    def __call__(self, batch: dict) -> dict:
        keys = list(batch["key"])
        feats, labels = [], []
        for key in keys:
            position = self.pairs.keys.index(key)
            f, lab = self.pairs[position]
            feats.append(f.numpy())
            labels.append(lab.numpy())
        out = {"key": np.array(keys), "features": np.stack(feats)}
        if self.with_labels:
            out["labels"] = np.stack(labels)
        return out
