"""The output location: a Zarr v3 store plus the job's bookkeeping, on local disk or object storage.

Layout of <output>/:
    zarr.json, features/, lowres/      Zarr groups; one array per (shard, attempt): (N, C, H, W), one chunk per
                                       sample (one ranged GET), Blosc-zstd compressed. Plain `zarr.open` reads it.
    _pipeline/job.json                 the settings this store was started with (a rerun must match them)
    _pipeline/parts/<array>.parquet    manifest rows of one shard attempt
    _pipeline/commits/<shard>.json     written LAST: the shard is done; names its arrays and part
    labels/, image/, scale/, offset/   per-sample labels and preset-specific arrays (see pipeline/presets.py)
    pca/, upsampler.safetensors        dataset-level parts of the pca<k> and lowres presets
    manifest.parquet, run.json         written at the end of a run from the committed shards

Exactly one task writes each array (the attempt token is in its name), so zarr's whole-object rewrites
never race; a shard's outputs only count once its commit record exists.
"""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec

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


def zarr_store(url: str, storage_options: Mapping[str, Any] | None = None, read_only: bool = False):
    """A zarr v3 store for a local path or fsspec URL."""
    if protocol_of(url) == "file":
        path = url.removeprefix("file://")
        return zarr.storage.LocalStore(path, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=resolve_options(url, storage_options),
                                             read_only=read_only)


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
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Writes a whole object atomically (a local temp file renamed into place; one PUT on object storage)."""
        path = self.path(rel)
        if protocol_of(self.url) == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def get_json(self, rel: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path(rel)))
        except FileNotFoundError:
            return None

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

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

    def create_array(self, group: str, name: str, spec: "ArraySpec", capacity: int, fill_value: Any,
                     attributes: Mapping[str, Any]) -> zarr.Array:
        """A (capacity, *sample_shape) array owned by the caller alone.

        Each sample is one storage object (a Zarr shard, so one GET reads it whole); (C, H, W) maps are split
        inside it into spatial tiles, so a crop fetches only the tiles it covers; maps of one tile and vectors
        are a plain chunk per sample.
        """
        store = zarr_store(self.url_of(group, name), self.storage_options)
        shape = (capacity, *spec.sample_shape)
        per_sample = (1, *spec.sample_shape)
        h, w = spec.sample_shape[-2:] if spec.spatial and len(spec.sample_shape) >= 2 else (0, 0)
        if (tile_size(h), tile_size(w)) != (h, w):
            chunks, shards = (1, *spec.sample_shape[:-2], tile_size(h), tile_size(w)), per_sample
        else:  # one tile: a plain chunk (zarr reads back an existing shard before writing one: a GET per sample)
            chunks, shards = per_sample, None
        # write_empty_chunks: every tile is written, so zarr does not compare each one with the fill value
        return zarr.create_array(store, shape=shape, chunks=chunks, shards=shards, dtype=spec.dtype,
                                 compressors=None if spec.holds_files else [compressor()],
                                 fill_value=b"" if spec.holds_files else fill_value,
                                 attributes={"featup": {**dict(attributes), **dict(spec.attributes)}},
                                 overwrite=True, config={"write_empty_chunks": True})

    def open_array(self, array_path: str) -> zarr.Array:
        return zarr.open_array(zarr_store(self.url_of(array_path), self.storage_options, read_only=True), mode="r")

    def write_part(self, name: str, table: pa.Table) -> str:
        rel = f"{PIPELINE_DIR}/parts/{name}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.put_bytes(rel, buf.getvalue())
        return rel

    def read_part(self, rel: str) -> pa.Table:
        with self.fs.open(self.path(rel), "rb") as f:
            return pq.read_table(f)

    def commit(self, shard_id: str, record: Mapping[str, Any]) -> None:
        """Marks a shard done. Written last, after its arrays and manifest part."""
        self.put_json(f"{PIPELINE_DIR}/commits/{shard_id}.json", dict(record))

    def commits(self) -> dict[str, dict]:
        """shard_id -> commit record, for every committed shard (unreadable records count as absent)."""
        folder = self.path(PIPELINE_DIR, "commits")
        if not self.fs.exists(folder):
            return {}
        out = {}
        for path in self.fs.ls(folder, detail=False):
            if not path.endswith(".json"):
                continue
            try:
                record = json.loads(self.fs.cat_file(path))
                out[record["shard_id"]] = record
            except (ValueError, KeyError, FileNotFoundError):
                log.warning("ignoring an unreadable commit record %s (the shard will be redone)", path)
        return out

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
    def write_manifest(self, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        self.put_bytes(MANIFEST_NAME, buf.getvalue())

    def remove_unreferenced(self, keep_names: Iterable[str], keep_parts: Iterable[str]) -> int:
        """Deletes arrays and parts of failed or superseded attempts (any group); returns how many went."""
        keep_names, keep_parts = set(keep_names), set(keep_parts)
        removed = 0
        for group in ARRAY_GROUPS:
            folder = self.path(group)
            if not self.fs.exists(folder):
                continue
            for path in self.fs.ls(folder, detail=False):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if name != "zarr.json" and name not in keep_names:
                    self.fs.rm(path, recursive=True)
                    removed += 1
        parts = self.path(PIPELINE_DIR, "parts")
        if self.fs.exists(parts):
            for path in self.fs.ls(parts, detail=False):
                rel = f"{PIPELINE_DIR}/parts/{path.rsplit('/', 1)[-1]}"
                if rel not in keep_parts:
                    self.fs.rm(path)
                    removed += 1
        return removed
