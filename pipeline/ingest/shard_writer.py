"""Writing WebDataset shards (local or any fsspec URL) with an index of per-shard sample counts.

The index (`index.json` beside the shards) is what lets readers prove a shard was read completely.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pipeline.storage.filesystems import filesystem
from pipeline.storage.shards import INDEX_NAME

log = logging.getLogger(__name__)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True).encode()


class ShardWriter:
    """Streams samples into numbered tar shards of at most `samples_per_shard` samples each."""

    def __init__(self, output: str, samples_per_shard: int = 1000, prefix: str = "shard",
                 storage_options: Mapping[str, Any] | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.output, self.samples_per_shard, self.prefix = output.rstrip("/"), samples_per_shard, prefix
        self.options = storage_options
        self.fs, self.root = filesystem(self.output, storage_options)
        self.fs.makedirs(self.root, exist_ok=True)
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._file = None
        self._count = 0
        self._keys: set[str] = set()

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._file = self.fs.open(f"{self.root}/{name}", "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)
        self.shards.append({"name": name, "samples": 0})
        self._count = 0

    def _close_current(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self.shards[-1]["bytes"] = self.fs.size(f"{self.root}/{self.shards[-1]['name']}")
            self._tar = self._file = None

    def write(self, sample: Mapping[str, Any]) -> None:
        """One sample: {"__key__": str, "<ext>": bytes | str | json-able, ...}."""
        key = str(sample["__key__"])
        if "." in key.rsplit("/", 1)[-1]:
            raise ValueError(f"sample key {key!r} contains a '.', which WebDataset reads as an extension")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        self._keys.add(key)
        if self._tar is None or self._count >= self.samples_per_shard:
            self._open_next()
        mtime = time.time()
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _as_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), mtime, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.shards[-1]["samples"] += 1

    def close(self) -> dict:
        """Finishes the last shard and writes index.json; returns the index."""
        self._close_current()
        index = {"shards": self.shards, "total_samples": sum(s["samples"] for s in self.shards)}
        with self.fs.open(f"{self.root}/{INDEX_NAME}", "w") as f:
            json.dump(index, f, indent=1)
        log.info("wrote %d samples in %d shards to %s", index["total_samples"], len(self.shards), self.output)
        return index

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()


def write_shards(samples: Iterable[Mapping[str, Any]], output: str, samples_per_shard: int = 1000,
                 prefix: str = "shard", storage_options: Mapping[str, Any] | None = None) -> dict:
    """Writes all samples; returns the index ({"shards": [{"name", "samples", "bytes"}], "total_samples"})."""
    writer = ShardWriter(output, samples_per_shard, prefix, storage_options)
    for sample in samples:
        writer.write(sample)
    return writer.close()
