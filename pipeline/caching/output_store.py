"""The output location: a Zarr v3 store plus the job's bookkeeping, on local disk or object storage.

Layout of <output>/:
    zarr.json, features/, lowres/      Zarr groups; one array per (shard, attempt): (N, C, H, W), one chunk per
                                       sample (one ranged GET), Blosc-zstd compressed. Plain `zarr.open` reads it.
                                       `--resize fit`: one array per (shard, attempt, image shape), named
                                       <shard>_<attempt>_<H>x<W> (`bucket_name`)
    _pipeline/job.json                 the settings this store was started with (a rerun must match them)
    _pipeline/parts/<array>.parquet    manifest rows of one shard attempt
    _pipeline/commits/<shard>.json     written LAST: the shard is done; names its arrays and part
    _pipeline/commit_index.parquet     every commit record and its version, as of the last finished run
                                       (so a rerun need not read them one by one; see commit_log.py)
    labels/, image/, scale/, offset/   per-sample labels and preset-specific arrays (see pipeline/presets.py)
    pca/, upsampler.safetensors        dataset-level parts of the pca<k> and lowres presets
    manifest.parquet, run.json         written at the end of a run from the committed shards

Exactly one task writes each array (the attempt token is in its name), so zarr's whole-object rewrites
never race; a shard's outputs only count once its commit record exists. Per shard a worker makes one
write per sample and array, one per array's zarr.json (stored once, with the final count), the part and
the commit record: no reads, listings or existence checks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import uuid
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

from pipeline.caching.presets import IMAGE_VLEN
from pipeline.options import ConfigError
from pipeline.storage.filesystems import filesystem, join, protocol_of, resolve_options

if TYPE_CHECKING:
    from pipeline.caching.presets import ArraySpec

log = logging.getLogger(__name__)
# zarr-python warns, whenever it writes such an array's metadata, that its variable-length bytes type has no
# Zarr v3 specification yet. This project pins zarr and stores one encoded image per sample with it (the
# lowres preset), so the warning says nothing a user could act on.
warnings.filterwarnings("ignore", message=r"The data type \(VariableLengthBytes\(\)\)", category=FutureWarning)

FORMAT_VERSION = 1
PIPELINE_DIR = "_pipeline"
FEATURES_GROUP = "features"
LOWRES_GROUP = "lowres"
LABELS_GROUP = "labels"
# Groups holding one array per shard attempt.
ARRAY_GROUPS = (FEATURES_GROUP, LOWRES_GROUP, LABELS_GROUP, "image", "scale", "offset")
PCA_GROUP = "pca"
UPSAMPLER_NAME = "upsampler.safetensors"
MANIFEST_NAME = "manifest.parquet"
RUN_NAME = "run.json"
LEASE_FILE = "lease.json"  # under _pipeline/, see lease.py


_BUCKET_SUFFIX = re.compile(r"_\d+x\d+$")


def bucket_name(attempt: str, image_hw: tuple[int, int]) -> str:
    """The array name of an attempt's samples of one image shape (`--resize fit` stores one per shape)."""
    return f"{attempt}_{image_hw[0]}x{image_hw[1]}"


def attempt_of(array: str) -> str:
    """The attempt name an array belongs to: itself, or the attempt of a `bucket_name`."""
    return _BUCKET_SUFFIX.sub("", array)


class OutputExistsError(ConfigError):
    """The output holds a run with other settings; refused unless --overwrite."""


def compressor() -> BloscCodec:
    """Blosc zstd level 1 with byte shuffle: measured on float16 feature maps, the same ratio as level 3 with
    bit shuffle (about 2.2x) at half the compression time and two thirds of the decompression time. Blocks of
    1 MiB (a whole tile, where blosc would pick ~32 KiB at level 1) compress 1.4-1.6x faster, decompress
    1.5x faster and a few percent smaller (benchmarks/bench_dataplane.py)."""
    return BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)


def tile_size(length: int) -> int:
    """Inner chunk edge along one side of a (C, H, W) map: an exact quarter, third or half of it (tiles of at
    least 16 px), so a crop reads a few tiles; small maps are one tile."""
    for parts in (4, 3, 2):
        if length % parts == 0 and length // parts >= 16:
            return length // parts
    return length


def version_of(info: Mapping) -> str | None:
    """An object's version from a listing entry or a write's answer: its ETag; None where storage has none."""
    tag = info.get("ETag") or info.get("etag")
    return str(tag).strip('"') if tag else None


def zarr_store(url: str, storage_options: Mapping[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or fsspec URL."""
    if protocol_of(url) == "file":
        path = url.removeprefix("file://")
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=resolve_options(url, storage_options),
                                             read_only=read_only)


@functools.lru_cache(maxsize=64)
def _metadata_template(sample_shape: tuple[int, ...], dtype: str, spatial: bool, fill_value: Any) -> dict:
    """Zarr's own zarr.json for arrays of one sample kind (built once per process and kind).

    Each sample is one storage object: (C, H, W) maps of several tiles are a Zarr shard split inside into
    spatial tiles, so a crop fetches only the tiles it covers; maps of one tile and vectors are a plain chunk.
    Encoded files (variable-length bytes) get no further compressor.
    """
    per_sample = (1, *sample_shape)
    h, w = sample_shape[-2:] if spatial and len(sample_shape) >= 2 else (0, 0)
    if (tile_size(h), tile_size(w)) != (h, w):
        chunks, shards = (1, *sample_shape[:-2], tile_size(h), tile_size(w)), per_sample
    else:
        chunks, shards = per_sample, None
    files = dtype == IMAGE_VLEN
    documents: dict = {}
    zarr.create_array(zarr.storage.MemoryStore(documents), shape=per_sample, chunks=chunks, shards=shards,
                      dtype=dtype, compressors=None if files else [compressor()],
                      fill_value=b"" if files else fill_value)
    return json.loads(documents["zarr.json"].to_bytes())


def array_metadata(spec: "ArraySpec", count: int, fill_value: Any, attributes: Mapping[str, Any]) -> bytes:
    """The zarr.json of a (count, *sample_shape) array with `attributes` and the spec's own under "featup"
    (no storage round trip)."""
    template = _metadata_template(tuple(spec.sample_shape), spec.dtype, spec.spatial, fill_value)
    document = {**template, "shape": [count, *spec.sample_shape],
                "attributes": {"featup": {**dict(attributes), **dict(spec.attributes)}}}
    return json.dumps(document, indent=2).encode()


class StagedArray:
    """One shard attempt's (capacity, *sample_shape) array at <group>/<name>, written by its caller alone.

    Samples are encoded in memory and handed back as objects to store, one per sample; the metadata is
    stored once, at the end, with the final count. (Zarr writing to storage itself would first read each
    shard it replaces: two more requests per sample.) A sample's object name does not depend on the
    count, so the capacity grows in memory without touching what is stored.
    """

    def __init__(self, group: str, name: str, spec: "ArraySpec", fill_value: Any, capacity: int):
        self.path, self.spec, self.fill_value = f"{group}/{name}", spec, fill_value
        self._objects: dict = {}
        self._resize(max(capacity, 1))

    def _resize(self, capacity: int) -> None:
        metadata = json.loads(array_metadata(self.spec, capacity, self.fill_value, {}))
        memory = zarr.storage.StorePath(zarr.storage.MemoryStore(self._objects))
        # every sample is stored, even one equal to the fill value (zarr would otherwise delete its object)
        self.array = zarr.Array.from_dict(memory, metadata).with_config({"write_empty_chunks": True})
        self.capacity = capacity

    def encode(self, start: int, data: np.ndarray) -> dict[str, bytes]:
        """Samples start, start+1, ... -> {relative path: object bytes} to store."""
        if start + len(data) > self.capacity:
            capacity = self.capacity
            while capacity < start + len(data):
                capacity *= 2
            self._resize(capacity)
        self.array[start: start + len(data)] = data
        out = {f"{self.path}/{key}": buffer.to_bytes() for key, buffer in self._objects.items()}
        self._objects.clear()
        return out

    def metadata(self, rows: int, attributes: Mapping[str, Any]) -> dict[str, bytes]:
        """{relative path: zarr.json} for the array of `rows` samples, with `attributes` under "featup"."""
        return {f"{self.path}/zarr.json": array_metadata(self.spec, rows, self.fill_value, attributes)}


class OutputStore:
    """Read/write access to one output location; safe to construct in any process."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(self.url, self.storage_options)

    @property
    def resolved_options(self) -> dict[str, Any]:
        """The storage options every access to this output uses (endpoint, checksums), for code outside fsspec."""
        return resolve_options(self.url, self.storage_options)

    # -- paths ---------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, *parts: str) -> str:
        return join(self.url, *parts)

    # -- small files ---------------------------------------------------------------------------------------
    def put_bytes(self, rel: str, data: bytes) -> str | None:
        """Writes a whole object atomically (a local temp file renamed into place; one PUT on object storage);
        returns its storage version (the ETag) where the storage answers one."""
        path = self.path(rel)
        if protocol_of(self.url) == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return None
        answer = self.fs.pipe_file(path, data)
        return version_of(answer) if isinstance(answer, Mapping) else None

    def put_many(self, objects: Mapping[str, bytes], durable: bool | Collection[str] = True) -> None:
        """Writes several whole objects ({relative path: bytes}); on object storage concurrently. Locally, those
        not `durable` (all when True) are written in place without syncing (array objects and their
        metadata: only a commit makes them count)."""
        if protocol_of(self.url) == "file":
            for rel, data in objects.items():
                if durable is True or (durable is not False and rel in durable):
                    self.put_bytes(rel, data)
                else:
                    path = self.path(rel)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
        elif objects:
            self.fs.pipe({self.path(rel): data for rel, data in objects.items()})

    def get_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None

    def put_json(self, rel: str, obj: Any) -> str | None:
        return self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel) if rel else self.root)

    # -- job identity ----------------------------------------------------------------------------------------
    def _content(self) -> list[str]:
        """What the output location holds, except the run lease (which guards it, see lease.py)."""
        if not self.exists():
            return []
        top = self.fs.ls(self.root, detail=False)
        lease_dir = self.path(PIPELINE_DIR).rstrip("/")
        if any(p.rstrip("/") == lease_dir for p in top):
            rest = [p for p in self.fs.ls(lease_dir, detail=False) if p.rstrip("/").rsplit("/", 1)[-1] != LEASE_FILE]
            top = [p for p in top if p.rstrip("/") != lease_dir] + rest
        return top

    def check(self, identity: Mapping[str, Any], overwrite: bool) -> bool:
        """Read-only: True when this is a resumable run with `identity`, False when the output is empty or
        `overwrite` will replace it; a different run or a foreign folder in the way is refused."""
        job = {"format_version": FORMAT_VERSION, "identity": dict(identity)}
        content = self._content()
        existing = self.get_json(f"{PIPELINE_DIR}/job.json") if content else None
        if existing is not None and existing == json.loads(json.dumps(job, default=str)) and not overwrite:
            return True
        if content and not overwrite:
            if existing is None:
                raise OutputExistsError(f"{self.url} exists and was not written by this job; choose another "
                                        "--output or pass --overwrite to replace it")
            diff = {k: (existing.get("identity", {}).get(k), v) for k, v in job["identity"].items()
                    if existing.get("identity", {}).get(k) != v}
            raise OutputExistsError(f"{self.url} holds a run with other settings {diff} (stored, requested); "
                                    "pass --overwrite to replace it, or use another --output")
        return False

    def prepare(self, identity: Mapping[str, Any], overwrite: bool) -> bool:
        """Creates the store for a run with `identity`, or checks an existing one matches (call it holding
        the output's lease). Returns True when resuming; `overwrite` deletes a different run first."""
        if self.check(identity, overwrite):
            return True
        content = self._content()
        if content:
            log.warning("--overwrite: deleting %s", self.url)
            self.fs.rm(content, recursive=True)  # everything but the lease this run holds
        root = zarr.open_group(zarr_store(self.url, self.storage_options), mode="a",
                               attributes={"featup": {"format_version": FORMAT_VERSION, **dict(identity)}})
        for group in ARRAY_GROUPS:
            root.create_group(group)
        self.put_json(f"{PIPELINE_DIR}/job.json", {"format_version": FORMAT_VERSION, "identity": dict(identity)})
        return False

    # -- per-shard outputs -------------------------------------------------------------------------------------
    @staticmethod
    def new_array_name(shard_id: str) -> str:
        return f"{shard_id}_{uuid.uuid4().hex[:8]}"

    def open_array(self, array_path: str) -> zarr.Array:
        return zarr.open_array(zarr_store(self.url_of(array_path), self.storage_options, read_only=True), mode="r")

    def write_part(self, name: str, table: pa.Table, alongside: Mapping[str, bytes] | None = None) -> str:
        """Writes an attempt's manifest part, and with it (concurrently on object storage) `alongside`, e.g. its
        arrays' metadata; returns the part's relative path."""
        rel = f"{PIPELINE_DIR}/parts/{name}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.put_many({**(alongside or {}), rel: buf.getvalue()}, durable={rel})
        return rel

    def commit(self, shard_id: str, record: Mapping[str, Any]) -> str | None:
        """Marks a shard done. Written last, after its arrays and manifest part; returns the record's version."""
        return self.put_json(f"{PIPELINE_DIR}/commits/{shard_id}.json", dict(record))

    def cat_many(self, paths: Sequence[str], batch: int) -> Iterator[tuple[str, bytes | BaseException]]:
        """(path, content or the error reading it) for whole objects at filesystem paths, in order; fetched
        `batch` at a time, concurrently on object storage (fsspec's many-path cat)."""
        # small objects: one GET each (s3fs would otherwise ask each object's size first)
        single = {"max_concurrency": 1} if protocol_of(self.url) in ("s3", "s3a") else {}
        for start in range(0, len(paths), batch):
            chunk = list(paths[start: start + batch])
            found = self.fs.cat(chunk, on_error="return", **single) if chunk else {}
            for path in chunk:
                data = found.get(path, found.get(self.fs._strip_protocol(path)))
                yield path, (data if data is not None else FileNotFoundError(path))

    # -- dataset-level artefacts -------------------------------------------------------------------------------
    def write_pca(self, mean: np.ndarray, components: np.ndarray, explained: float, fitted_on: int) -> None:
        """The dataset's projection for the pca<k> preset, as plain Zarr arrays under pca/."""
        group = zarr.open_group(zarr_store(self.url_of(PCA_GROUP), self.storage_options), mode="w",
                                attributes={"featup": {"explained_variance": explained, "fitted_on_pixels": fitted_on}})
        group.create_array("mean", data=np.asarray(mean, np.float32))
        group.create_array("components", data=np.asarray(components, np.float32))

    def read_pca(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.exists(f"{PCA_GROUP}/zarr.json"):
            return None
        group = zarr.open_group(zarr_store(self.url_of(PCA_GROUP), self.storage_options, read_only=True), mode="r")
        return np.asarray(group["mean"][:]), np.asarray(group["components"][:])

    # -- end of run ------------------------------------------------------------------------------------------
    def remove_unreferenced(self, keep_names: Iterable[str], keep_parts: Iterable[str]) -> int:
        """Deletes arrays and parts of failed or superseded attempts (any group); returns how many went.
        One listing per group, one batched delete."""
        keep_names, keep_parts = set(keep_names), set(keep_parts)
        doomed = []
        for group in ARRAY_GROUPS:
            for path in self._ls(self.path(group)):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name != "zarr.json" and name not in keep_names and attempt_of(name) not in keep_names:
                    doomed.append(path)
        for path in self._ls(self.path(PIPELINE_DIR, "parts")):
            if f"{PIPELINE_DIR}/parts/{path.rstrip('/').rsplit('/', 1)[-1]}" not in keep_parts:
                doomed.append(path)
        if doomed:
            self.fs.rm(doomed, recursive=True)
        return len(doomed)

    def _ls(self, folder: str) -> list[str]:
        try:
            return self.fs.ls(folder, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        finally:
            self.fs.invalidate_cache(folder)  # fsspec would keep the listing: memory per shard
