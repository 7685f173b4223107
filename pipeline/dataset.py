"""Reading a feature cache back: `FeatureCache(url)[key]` -> (C, H, W) numpy array; a torch Dataset.

    cache = FeatureCache("s3://bkt/feats/dinov2_jbu.zarr")
    len(cache), cache.keys()[:3], cache.manifest          # ok samples; the full manifest (pyarrow Table)
    feats = cache["000000139"]                            # one ranged GET for one sample
    loader = torch.utils.data.DataLoader(cache, batch_size=8, num_workers=4, shuffle=True)

Zarr arrays are opened lazily in each process, so a DataLoader's forked workers each get their own
connections.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import torch.utils.data

from .store import MANIFEST_NAME, RUN_NAME, OutputStore, from_stored


class CacheError(RuntimeError):
    """A location that is not a finished feature cache."""


class FeatureCache(torch.utils.data.Dataset):
    """The ok samples of a finished caching run, indexable by key or position."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.store = OutputStore(self.url, self.storage_options)
        try:
            data = self.store.fs.cat_file(self.store.path(MANIFEST_NAME))
        except FileNotFoundError:
            raise CacheError(f"{self.url} has no {MANIFEST_NAME}: not a feature cache, or its job has not "
                             "finished (rerun the job to complete it)") from None
        self.manifest: pa.Table = pq.read_table(io.BytesIO(data))
        run = self.store.get_json(RUN_NAME) or {}
        self.run: dict = run
        self.dtype: str = run.get("settings", {}).get("dtype", "float16")
        ok = self.manifest.filter(pa.compute.equal(self.manifest.column("status"), "ok"))
        self._keys: list[str] = ok.column("key").to_pylist()
        self._arrays: list[str] = ok.column("features_array").to_pylist()
        self._lowres: list[str | None] = ok.column("lowres_array").to_pylist()
        self._rows: list[int] = ok.column("index").to_pylist()
        self._position: dict[str, int] = {}
        self._duplicates: set[str] = set()
        for i, key in enumerate(self._keys):
            if key in self._position:
                self._duplicates.add(key)
            self._position[key] = i
        self._opened: dict[str, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._position

    def errors(self) -> pa.Table:
        """Manifest rows of the samples that could not be processed, with their reasons."""
        return self.manifest.filter(pa.compute.equal(self.manifest.column("status"), "error"))

    def position(self, key: str) -> int:
        if key in self._duplicates:
            raise KeyError(f"key {key!r} occurs in several shards; index by position (see .manifest)")
        try:
            return self._position[key]
        except KeyError:
            raise KeyError(f"no ok sample with key {key!r} in {self.url}") from None

    def _array(self, path: str):
        if os.getpid() != self._pid:  # forked DataLoader worker: reopen everything in this process
            self._opened, self._pid = {}, os.getpid()
            self.store = OutputStore(self.url, self.storage_options)
        if path not in self._opened:
            self._opened[path] = self.store.open_array(path)
        return self._opened[path]

    def _read(self, path: str, row: int) -> np.ndarray:
        return np.asarray(from_stored(self._array(path)[row], self.dtype))

    def _index(self, item: int | str) -> int:
        if isinstance(item, str):
            return self.position(item)
        i = int(item)
        if not -len(self) <= i < len(self):
            raise IndexError(f"position {i} out of range for {len(self)} samples")
        return i % len(self)

    def __getitem__(self, item: int | str) -> np.ndarray:
        """High-res features (C, H, W) of a sample by key or position, in the stored dtype."""
        i = self._index(item)
        return self._read(self._arrays[i], self._rows[i])

    def lowres(self, item: int | str) -> np.ndarray:
        """The backbone's low-res features (C, h, w) of a sample (when the job stored them)."""
        i = self._index(item)
        if self._lowres[i] is None:
            raise CacheError("this cache was written with --no-lowres")
        return self._read(self._lowres[i], self._rows[i])

    def row(self, item: int | str) -> dict:
        """The manifest row of a sample: source shard, original size, crop, where its features live."""
        i = self._index(item)
        key, path = self._keys[i], self._arrays[i]
        mask = pa.compute.and_(pa.compute.equal(self.manifest.column("key"), key),
                               pa.compute.equal(self.manifest.column("features_array"), path))
        return self.manifest.filter(mask).to_pylist()[0]

    def __repr__(self) -> str:
        return f"FeatureCache({self.url!r}, samples={len(self)}, dtype={self.dtype})"
