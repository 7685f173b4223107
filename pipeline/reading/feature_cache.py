"""Reading a feature cache back, for training: `FeatureCache(url)[key]` -> (C, H, W) numpy array.

    cache = FeatureCache("s3://bkt/feats/dinov2_jbu.zarr")
    len(cache), cache.key(0), cache.manifest               # ok samples; the full manifest (pyarrow Table, read on use)
    feats = cache["000000139"]                            # whatever the storage preset, (C, H, W) features
    cache.shape("000000139")                              # (H, W): each sample's own with --resize fit
    crop = cache.read("000000139", crop=(0, 32, 96, 96))  # only the tiles the crop covers are fetched
    labels = cache.labels("000000139")                    # (H, W) class ids aligned with the features
    train, val = cache.split(val_fraction=0.2)            # deterministic split by key
    loader = DataLoader(LabelledFeatures(cache, train, crop_size=96), batch_size=8, num_workers=4, shuffle=True)
    ds = cache.to_ray_dataset(train)                      # the same, as a Ray Data dataset
    # --resize fit caches hold samples of several shapes: batch them by shape, or crop them to one size
    data = LabelledFeatures(cache, train)                 # pipeline.reading.shape_batches:
    loader = DataLoader(data, batch_sampler=ShapeBatchSampler(data.shapes(), batch_size=8, shuffle=True))

Built for manifests of tens of millions of rows: opening reads only the columns it needs, as Arrow and
numpy arrays (keys stay an Arrow column, array paths a dictionary code per sample), and finds a key
through a sorted hash index (`pipeline.reading.key_index`), never a Python object per sample. Forked
DataLoader workers share all of it copy-on-write. Zarr arrays are opened lazily in each process, so
each worker gets its own connections.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
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
from pipeline.reading.key_index import DuplicateKeyError, KeyIndex, KeySelection, below_fraction, hash_keys
from pipeline.storage.filesystems import protocol_of
from pipeline.upsampler_weights import WEIGHTED_UPSAMPLERS

Crop = tuple[int, int, int, int]  # top, left, height, width in high-res feature pixels
IGNORE_LABEL = 255
# What opening a cache reads of the manifest; the rest is read when asked for (row, errors, manifest).
INDEX_COLUMNS = ("key", "status", "features_array", "lowres_array", "labels_array", "index")
PATH_COLUMNS = ("status", "features_array", "lowres_array", "labels_array")  # few distinct values: dictionaries

_NULLS = object()  # what _constant says of a column with no value at all


def _constant(metadata: pq.FileMetaData, column: str) -> Any:
    """The one value every row of `column` holds (_NULLS: none), when the row-group statistics say so; else None."""
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    if index < 0:
        return None
    seen = set()
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        stats = group.column(index).statistics
        if stats is None or not stats.has_null_count:
            return None
        if stats.null_count == group.num_rows:
            seen.add(_NULLS)
        elif stats.null_count == 0 and stats.has_min_max and stats.min == stats.max:
            seen.add(stats.min)
        else:
            return None
    return seen.pop() if len(seen) == 1 else None


def _numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A null-free Arrow column as one numpy array."""
    if isinstance(column, pa.ChunkedArray):
        return np.concatenate([c.to_numpy(zero_copy_only=False) for c in column.chunks] or [np.zeros(0)])
    return column.to_numpy(zero_copy_only=False)


def upsample_lowres(upsampler: torch.nn.Module, lowres: np.ndarray, image: np.ndarray, device: str = "cpu"
                    ) -> np.ndarray:
    """High-res features (C, H', W') of one sample from its low-res features (C, h, w) and its image (3, H, W)
    uint8, as the caching job's model calls its upsampler (guided by the ImageNet-normalised image)."""
    from featup_ops import FeatureModel

    features = torch.from_numpy(np.asarray(lowres)).float()[None].to(device)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).float()[None].to(device) / 255
    with torch.no_grad():
        highres = upsampler(features, FeatureModel.guidance(pixels))
    return highres[0].cpu().numpy()


class CacheError(ConfigError):
    """A location that is not a finished feature cache, or a request it cannot serve."""


def _check_fraction(val_fraction: float) -> None:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


def split_keys(keys: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/validation split by a hash of each key: stable across runs, machines and growth.

    A key goes to validation when its seeded 64-bit hash (`key_index.hash_keys`) / 2**64 < val_fraction.
    """
    _check_fraction(val_fraction)
    keys = list(keys)
    to_val = below_fraction(hash_keys(keys, seed), val_fraction)
    return [k for k, v in zip(keys, to_val) if not v], [k for k, v in zip(keys, to_val) if v]


class FeatureCache(torch.utils.data.Dataset):
    """The ok samples of a finished caching run, indexable by key or position (a torch Dataset)."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, device: str = "cpu"):
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.device = device
        self.store = OutputStore(self.url, self.storage_options)
        self._load_index()
        self.run: dict = self.store.get_json(RUN_NAME) or {}
        settings = self.run.get("settings", {})
        self.storage: str = settings.get("storage", settings.get("dtype", "float16"))
        model = self.run.get("model", {})
        self.dim: int = int(settings.get("dim", model.get("dim", 0)))
        self.output_size = tuple(settings.get("output_size", model.get("output_size", (0, 0))))
        self.lowres_size = tuple(model.get("lowres_size", (0, 0)))
        self.image_size = int(settings.get("image_size", 0))
        self.resize: str = settings.get("resize", "crop")
        self.patch_size = int(model.get("patch_size", 1))
        # --resize fit: every ok sample's high-res (height, width); None: all are output_size
        self._shapes: np.ndarray | None = self._load_shapes() if self.resize != "crop" else None
        pca = self.store.read_pca() if pca_components(self.storage) is not None else None
        self.preset = Preset(self.storage, self.dim, self.output_size, self.lowres_size, self.image_size, pca)
        self._manifest: pa.Table | None = None
        self._row_group: tuple[int, pa.Table] | None = None
        self._opened: dict[str, Any] = {}
        self._upsampler = None
        self._pid = os.getpid()

    # -- the manifest ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _manifest_file(self, columns: Sequence[str] | None = None) -> Iterator[Any]:
        """What pyarrow reads the manifest from: the local path, or (object storage) a file; given `columns`,
        one that fetches just their byte ranges, concurrently."""
        path = self.store.path(MANIFEST_NAME)
        if protocol_of(self.url) == "file":
            yield path
        elif columns is None:
            with self.store.fs.open(path, "rb") as f:
                yield f
        else:
            from fsspec.parquet import open_parquet_file

            with open_parquet_file(path, fs=self.store.fs, columns=list(columns), engine="pyarrow") as f:
                yield f

    def _load_index(self) -> None:
        """Reads the key, status and location columns of the manifest and indexes the ok samples.

        Columns whose row-group statistics already say what they hold (every status "ok", no low-res or label
        arrays anywhere) are not read at all."""
        try:
            with self._manifest_file() as source:
                metadata = pq.ParquetFile(source).metadata
        except FileNotFoundError:
            raise CacheError(f"{self.url} has no {MANIFEST_NAME}: not a feature cache, or its job has not "
                             "finished (rerun the job to complete it)") from None
        names = metadata.schema.to_arrow_schema().names
        self._group_ends = np.cumsum([metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
        all_ok = _constant(metadata, "status") == "ok"
        absent = {c for c in ("lowres_array", "labels_array") if c not in names or _constant(metadata, c) is _NULLS}
        columns = [c for c in INDEX_COLUMNS if c in names and c not in absent and not (c == "status" and all_ok)
                   and c != "key"]
        with self._manifest_file(columns) as source:
            table = pq.read_table(source, columns=columns, read_dictionary=[c for c in PATH_COLUMNS if c in columns])
        table = table.unify_dictionaries()  # path columns: one dictionary of array paths for every row group
        # ok position -> manifest row; None: every row is ok. The key column keeps every row.
        self._manifest_rows: np.ndarray | None = None
        ok = None if all_ok else _numpy(pc.equal(table.column("status"), "ok")).astype(bool)
        if ok is not None and not ok.all():
            self._manifest_rows = np.nonzero(ok)[0].astype(np.int32 if len(ok) < 2**31 else np.int64)
        select = (lambda values: values) if self._manifest_rows is None else (lambda values: values[ok])
        paths = table.column("features_array")
        # "features/<name>" (or "image/<name>" for the lowres preset): every group of a sample shares <name>
        dictionary = paths.chunk(0).dictionary.to_pylist() if paths.num_chunks else []
        self._names: list[str] = [p.split("/", 1)[1] for p in dictionary]
        self._name_code: np.ndarray = select(np.concatenate(
            [c.indices.fill_null(0).to_numpy() for c in paths.chunks] or [np.zeros(0, np.int32)]))
        self._rows: np.ndarray = select(_numpy(table.column("index").fill_null(-1)))
        self._has_lowres = select(self._present(table, "lowres_array"))
        self._has_labels = select(self._present(table, "labels_array"))
        del table, paths, ok
        pa.default_memory_pool().release_unused()
        self._index = KeyIndex(self._read_keys(), self._manifest_rows)

    def _load_shapes(self) -> np.ndarray:
        """(ok samples, 2) uint16: each sample's high-res feature height and width, from the manifest."""
        columns = ["feature_height", "feature_width"]
        with self._manifest_file(columns) as source:
            table = pq.read_table(source, columns=columns)
        shapes = np.stack([_numpy(table.column(c).fill_null(0)).astype(np.uint16) for c in columns], axis=1)
        return shapes if self._manifest_rows is None else shapes[self._manifest_rows]

    def _read_keys(self) -> pa.Array:
        """The key column in one piece, kept outside Arrow's pool; read a row group at a time, so what the
        pool holds meanwhile is about the column itself, and goes back after."""
        with self._manifest_file(["key"]) as source:
            parquet = pq.ParquetFile(source)
            chunks = [parquet.read_row_group(g, columns=["key"]).column("key").chunk(0)
                      for g in range(parquet.num_row_groups)]
        keys = pa.concat_arrays(chunks, memory_pool=pa.system_memory_pool()) if chunks else pa.array([], pa.string())
        del chunks
        pa.default_memory_pool().release_unused()
        return keys

    @staticmethod
    def _present(table: pa.Table, column: str) -> np.ndarray:
        if column not in table.column_names:
            return np.zeros(table.num_rows, dtype=bool)
        return _numpy(table.column(column).is_valid()).astype(bool)

    @property
    def manifest(self) -> pa.Table:
        """The whole manifest (every row and column, errors included), read on first use."""
        if self._manifest is None:
            with self._manifest_file() as source:
                self._manifest = pq.read_table(source)
        return self._manifest

    def _manifest_row(self, r: int) -> dict:
        """Row `r` of the manifest, reading only the row group that holds it (kept for the next call)."""
        if self._manifest is not None:
            return self._manifest.slice(r, 1).to_pylist()[0]
        group = int(np.searchsorted(self._group_ends, r, side="right"))
        if self._row_group is None or self._row_group[0] != group:
            with self._manifest_file() as source:
                self._row_group = (group, pq.ParquetFile(source).read_row_group(group))
        first = int(self._group_ends[group - 1]) if group else 0
        return self._row_group[1].slice(r - first, 1).to_pylist()[0]

    # -- lookup ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> list[str]:
        """Every ok key, in manifest order, as a Python list (one str per sample: avoid for huge caches)."""
        return KeySelection(self._index, np.arange(len(self))).to_arrow().to_pylist()

    def key(self, position: int) -> str:
        """The key of the sample at `position`."""
        return self._index.key_at(self._index_of(position))

    def __contains__(self, key: object) -> bool:
        return bool(self._index.find(key)) if isinstance(key, str) else False

    def errors(self) -> pa.Table:
        """Manifest rows of the samples that could not be processed, with their reasons."""
        if self._manifest is not None:
            return self._manifest.filter(pc.equal(self._manifest.column("status"), "error"))
        with self._manifest_file() as source:
            return pq.read_table(source, filters=[("status", "==", "error")])

    def split(self, val_fraction: float = 0.2, seed: int = 0) -> tuple[KeySelection, KeySelection]:
        """(train keys, validation keys), deterministic by key hash (the rule of `split_keys`)."""
        _check_fraction(val_fraction)
        hashes = hash_keys(self._index.column, seed)
        to_val = below_fraction(hashes if self._manifest_rows is None else hashes[self._manifest_rows], val_fraction)
        return KeySelection(self._index, np.nonzero(~to_val)[0]), KeySelection(self._index, np.nonzero(to_val)[0])

    def position(self, key: str) -> int:
        """The position of the sample with `key`; KeyError when absent or held by several shards."""
        try:
            found = self._index.position(key)
        except DuplicateKeyError:
            raise KeyError(f"key {key!r} occurs in several shards; index by position (see .manifest)") from None
        if found is None:
            raise KeyError(f"no ok sample with key {key!r} in {self.url}")
        return found

    def positions(self, keys: Sequence[str] | None) -> np.ndarray:
        """Positions of many keys at once (all samples for None); KeyError naming absent or duplicated ones."""
        if keys is None:
            return np.arange(len(self), dtype=np.int64)
        if isinstance(keys, KeySelection) and keys.index is self._index:
            return keys.positions
        found = self._index.positions(keys.to_arrow() if isinstance(keys, KeySelection) else keys)
        if (found < 0).any():
            bad = np.nonzero(found < 0)[0][:5]
            query = keys if isinstance(keys, KeySelection) else list(keys)
            absent = [query[int(i)] for i in bad if found[i] == -1]
            doubled = [query[int(i)] for i in bad if found[i] == -2]
            raise KeyError(f"{int((found < 0).sum())} key(s) not found in {self.url}: absent {absent}, held by "
                           f"several shards {doubled} (index those by position)")
        return found

    def _index_of(self, item: int | str) -> int:
        if isinstance(item, str):
            return self.position(item)
        i = int(item)
        if not -len(self) <= i < len(self):
            raise IndexError(f"position {i} out of range for {len(self)} samples")
        return i % len(self)

    def location(self, item: int | str) -> tuple[str, int]:
        """(array name, row) of a sample: every group stores it at `<group>/<name>`, row `row`."""
        i = self._index_of(item)
        return self._names[self._name_code[i]], int(self._rows[i])

    def shape(self, item: int | str) -> tuple[int, int]:
        """(height, width) of a sample's high-res features (and labels): its own with --resize fit."""
        if self._shapes is None:
            self._index_of(item)
            return tuple(self.output_size)
        h, w = self._shapes[self._index_of(item)]
        return int(h), int(w)

    def shapes(self, keys: Sequence[str] | None = None) -> np.ndarray:
        """(n, 2) int: the high-res (height, width) of `keys` (all samples for None), in their order."""
        positions = self.positions(keys)
        if self._shapes is None:
            return np.tile(np.asarray(self.output_size, np.int64), (len(positions), 1))
        return self._shapes[positions].astype(np.int64)

    def row(self, item: int | str) -> dict:
        """The manifest row of a sample: source shard, original size, crop, where its arrays live."""
        i = self._index_of(item)
        return self._manifest_row(i if self._manifest_rows is None else int(self._manifest_rows[i]))

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
            from featup_ops import create_upsampler

            settings = self.run.get("settings", {})
            kind = settings.get("upsampler")
            options = dict(settings.get("upsampler_options") or {})
            if kind in WEIGHTED_UPSAMPLERS:  # the exact weights the job ran, kept with the cache
                self._upsampler = create_upsampler(kind, self.dim, weights=self.store.url_of(UPSAMPLER_NAME),
                                                   storage_options=self.store.resolved_options, **options)
            else:
                self._upsampler = create_upsampler(kind, self.dim, **options)
            self._upsampler = self._upsampler.to(self.device).eval()
        return self._upsampler

    def image(self, item: int | str) -> np.ndarray:
        """The model's input image (3, H, W) uint8 that the lowres preset stored (JPEG, or raw in older caches)."""
        if not self.preset.needs_upsampler_at_read:
            raise CacheError(f"only the lowres preset stores the image; this cache is {self.storage}")
        name, row = self.location(item)
        return decode_stored_image(self._array("image", name)[row])

    def _replay(self, name: str, row: int) -> np.ndarray:
        lowres = np.asarray(self._array(LOWRES_GROUP, name)[row])
        stored = decode_stored_image(self._array("image", name)[row])
        return upsample_lowres(self._replay_upsampler(), lowres, stored, self.device)

    def read(self, item: int | str, crop: Crop | None = None) -> np.ndarray:
        """High-res features (C, H, W) of a sample, or of the crop (top, left, height, width) of them.

        float16/float32 come back as stored; bfloat16, int8, pca<k> and lowres are decoded to float32.
        """
        name, row = self.location(item)
        if self.preset.needs_upsampler_at_read:
            full = self._replay(name, row)
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
        i = self._index_of(item)
        if not self._has_lowres[i]:
            raise CacheError("this cache was written with --no-lowres")
        name, row = self.location(i)
        return np.asarray(self._array(LOWRES_GROUP, name)[row])

    def labels(self, item: int | str, crop: Crop | None = None) -> np.ndarray | None:
        """Class ids (H, W) aligned with the features (255 = ignore), or None when the sample had no label."""
        i = self._index_of(item)
        if not self._has_labels[i]:
            return None
        name, row = self.location(i)
        arr = self._array(LABELS_GROUP, name)
        if crop is None:
            return np.asarray(arr[row])
        return np.asarray(arr[row, crop[0]: crop[0] + crop[2], crop[1]: crop[1] + crop[3]])

    def to_ray_dataset(self, keys: Sequence[str] | None = None, with_labels: bool = True, crop_size: int | None = None,
                       concurrency: int = 2):
        """A Ray Data dataset of {"key", "features", "labels", "height", "width"} rows read by `concurrency`
        reader actors; with --resize fit each row's features and labels have the sample's own (height, width)
        (Ray's variable-shaped tensors) unless `crop_size` crops them to one size."""
        import ray.data

        from pipeline.ray_runtime import init_ray
        from pipeline.storage.credentials import for_workers

        init_ray()
        positions = self.positions(keys)
        items = pa.table({"key": self._index.take(positions), "position": pa.array(positions)})
        return ray.data.from_arrow(items).map_batches(  # credentials travel masked, by object reference
            _RayReader, fn_constructor_args=(self.url, for_workers(self.storage_options), with_labels, crop_size),
            batch_size=8, concurrency=concurrency)

    def __repr__(self) -> str:
        return f"FeatureCache({self.url!r}, samples={len(self)}, storage={self.storage})"


class LabelledFeatures(torch.utils.data.Dataset):
    """(features (C,h,w), labels int64 (h,w)) pairs of a cache, optionally random crops of them.

    Features keep the stored float type (float16 stays float16: half the bytes through the DataLoader);
    the training loop casts. The samples are held as a numpy array of positions (keys are resolved once,
    vectorised), so forked workers share them with the cache's index.

    Crops are read with `FeatureCache.read(crop=...)`, so only the tiles under the crop are fetched; they have
    one size for every sample, `crop_size` or the smallest side among the samples if that is less. Without
    crops a --resize fit cache gives each sample at its own shape: batch with `ShapeBatchSampler(shapes())`.
    Samples without a label get all-ignore labels.
    """

    def __init__(self, cache: FeatureCache, keys: Sequence[str] | None = None, crop_size: int | None = None,
                 seed: int = 0):
        self.cache = cache
        self.keys = KeySelection(cache._index, cache.positions(keys))
        self.crop_size, self.seed = crop_size, seed
        self._draws = 0  # crops differ from one pass to the next, reproducibly per worker
        self._side: int | None = None  # the crops' side: fits every sample
        if crop_size is not None:
            shapes = cache.shapes(self.keys)
            self._side = int(min(crop_size, shapes.min())) if len(shapes) else crop_size

    def __len__(self) -> int:
        return len(self.keys)

    def shapes(self) -> np.ndarray:
        """(len, 2): the (height, width) of each item as returned (the crop's size when cropping)."""
        if self._side is not None:
            return np.full((len(self), 2), self._side, np.int64)
        return self.cache.shapes(self.keys)

    def _crop(self, index: int, position: int) -> Crop | None:
        if self._side is None:
            return None
        h, w = self.cache.shape(position)
        size = self._side
        self._draws += 1
        rng = np.random.default_rng([self.seed, index, self._draws, torch.initial_seed() % 2**31])
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1)), size, size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        position = int(self.keys.positions[index])
        crop = self._crop(index, position)
        feats = torch.from_numpy(np.ascontiguousarray(self.cache.read(position, crop)))
        labels = self.cache.labels(position, crop)
        if labels is None:
            labels = np.full(feats.shape[1:], IGNORE_LABEL, np.int64)
        return feats, torch.from_numpy(labels.astype(np.int64))


class _RayReader:
    """Ray Data UDF: opens the cache once per reader actor, then reads batches of samples by position."""

    def __init__(self, url: str, storage_options: Mapping[str, Any], with_labels: bool, crop_size: int | None):
        self.cache = FeatureCache(url, storage_options)
        self.pairs = LabelledFeatures(self.cache, crop_size=crop_size)  # index i is cache position i
        self.with_labels = with_labels

    def __call__(self, batch: dict) -> dict:
        feats, labels = [], []
        for position in batch["position"]:
            f, lab = self.pairs[int(position)]
            feats.append(f.numpy())
            labels.append(lab.numpy())
        out = {"key": np.asarray(batch["key"]), "features": _stack(feats),
               "height": np.asarray([f.shape[1] for f in feats], np.int32),
               "width": np.asarray([f.shape[2] for f in feats], np.int32)}
        if self.with_labels:
            out["labels"] = _stack(labels)
        return out


def _stack(arrays: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    """One array when the shapes agree; else the list (Ray Data stores it as variable-shaped tensors)."""
    return np.stack(arrays) if len({a.shape for a in arrays}) <= 1 else arrays
