"""Processing one shard end to end: stream, decode, compute, write, commit. No Ray in here.

Three stages overlap, so the accelerator never waits on I/O: a reader thread streams the tar, a thread
pool decodes and crops images ahead of the model, and a writer thread stores batch n while batch n+1
computes. The model (`featup_ops.FeatureModel`) is loaded once per worker, Ray's batch-inference pattern.
With `--resize fit` images keep their aspect ratio: samples are grouped by shape into buckets, a batch
holds one shape, and each bucket is its own array (see `output_store.bucket_name`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.caching import manifest
from pipeline.caching.job_config import JobConfig
from pipeline.caching.output_store import (
    FEATURES_GROUP,
    LABELS_GROUP,
    LOWRES_GROUP,
    OutputStore,
    StagedArray,
    bucket_name,
)
from pipeline.caching.presets import ArraySpec, Preset, fit_pca, pca_components
from pipeline.storage.filesystems import endpoint_name, protocol_of, resolve_options
from pipeline.storage.images import (
    Geometry,
    SampleError,
    align_label,
    decode_label,
    find_label,
    fit_shape,
    images_to_tensor,
    load_sample_image,
)
from pipeline.storage.retries import RETRIES, StorageUnavailableError, endpoint_of, is_storage_unavailable
from pipeline.storage.shards import Shard, TruncatedShardError, iter_samples

log = logging.getLogger(__name__)

COMPUTE_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
IGNORE_LABEL = 255  # label value of pixels without a class (COCO-Stuff convention)
MAX_PENDING_BATCHES = 4  # --resize fit: decoded samples held for unfilled buckets, in batches, before one is run
_END = object()


class ShardAborted(RuntimeError):
    """Processing stopped because the caller went away (nothing of the attempt is committed)."""


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    max_samples: int | None = None  # stop after this many samples (the job's --limit)
    attempt: int = 1
    storage_waits: int = 0  # times this attempt found storage unavailable and was put back


@dataclass
class ShardResult:
    shard_id: str
    url: str
    samples_read: int = 0
    ok: int = 0
    errors: int = 0
    complete: bool = True
    shard_error: str | None = None  # a defect of the shard itself (truncated tar, count mismatch)
    seconds: float = 0.0
    compute_seconds: float = 0.0
    bytes_written: int = 0
    request_retries: int = 0  # storage requests re-sent for this shard's objects (its commit write included)
    commit: dict = field(default_factory=dict)
    commit_version: str | None = None  # the commit record's storage version (ETag), where storage gives one


@dataclass
class _Decoded:
    sample_index: int
    key: str
    image: np.ndarray | None = None
    geometry: Geometry | None = None
    label: np.ndarray | None = None
    error: str | None = None


class _Stream:
    """Reader thread + ordered decode pool: yields _Decoded items in shard order, `prefetch` ahead."""

    def __init__(self, shard: Shard, config: JobConfig, pool: ThreadPoolExecutor, prefetch: int,
                 label_hw: Callable[[tuple[int, int]], tuple[int, int]] | None, multiple: int = 1):
        """label_hw: the labels' shape for an image's shape (None: no labels); multiple: fit's side multiple."""
        self.shard, self.config, self.pool, self.prefetch, self.label_hw = shard, config, pool, prefetch, label_hw
        self.multiple = multiple
        self.samples: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.truncation: TruncatedShardError | None = None
        self.thread = threading.Thread(target=self._read, name="shard-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for sample in iter_samples(self.shard.url, self.config.storage_options, self.shard.size):
                while not self.stop.is_set():
                    try:
                        self.samples.put(sample, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.samples.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self.samples.put(exc)

    def _decode(self, index: int, sample: dict) -> _Decoded:
        key = sample.get("__key__", f"#{index}")
        try:
            image, geometry = load_sample_image(sample, self.config.image_size, self.config.max_pixels,
                                                self.config.min_side, self.config.resize, self.multiple)
            label = None
            if self.label_hw is not None and (data := find_label(sample)) is not None:
                label = align_label(decode_label(data), geometry, self.label_hw(image.shape[:2]))
            return _Decoded(index, key, image, geometry, label)
        except SampleError as exc:
            return _Decoded(index, key, error=str(exc))

    def items(self) -> Iterator[_Decoded]:
        pending: deque[Future] = deque()
        index = 0
        done = False
        while True:
            while not done and len(pending) < self.prefetch:
                item = self.samples.get()
                if item is _END:
                    done = True
                elif isinstance(item, TruncatedShardError):
                    self.truncation, done = item, True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    pending.append(self.pool.submit(self._decode, index, item))
                    index += 1
            if not pending:
                return
            yield pending.popleft().result()

    def close(self) -> None:
        self.stop.set()


class _Writer:
    """The only writer of one shard attempt's arrays; runs in its own thread behind a small queue.

    One array per group and bucket (samples of one image shape; `--resize crop` has one bucket). Per sample
    and array one storage write; `finish` gives each array's metadata with the final count, stored once,
    together with the manifest part (see `StagedArray`).
    """

    def __init__(self, store: OutputStore, specs: Callable[[tuple[int, int]], list[ArraySpec]], capacity: int,
                 source: str, preset: str):
        self.store, self.specs, self.capacity, self.source, self.preset = store, specs, capacity, source, preset
        self.buckets: dict[str, dict[str, StagedArray]] = {}
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.rows: dict[str, int] = {}
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def bucket(self, name: str, image_hw: tuple[int, int]) -> None:
        """Opens the arrays of bucket `name` (images of `image_hw`), once."""
        if name not in self.buckets:
            self.buckets[name] = {spec.group: StagedArray(spec.group, name, spec, IGNORE_LABEL if spec.group ==
                                                          LABELS_GROUP else 0, self.capacity)
                                  for spec in self.specs(image_hw)}
            self.rows[name] = 0

    def _run(self) -> None:
        try:
            while True:
                job = self.jobs.get()
                if job is _END:
                    return
                name, data = job
                objects: dict[str, bytes] = {}
                for group, values in data.items():
                    objects.update(self.buckets[name][group].encode(self.rows[name], values))
                self.store.put_many(objects, durable=False)
                self.rows[name] += len(next(iter(data.values())))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.failure = exc
            while True:  # drain so the producer never blocks on a dead writer
                if self.jobs.get() is _END:
                    return

    def put(self, name: str, image_hw: tuple[int, int], batch: dict[str, np.ndarray]) -> None:
        if self.failure is not None:
            raise self.failure
        self.bucket(name, image_hw)
        self.jobs.put((name, batch))

    def finish(self, keys: Mapping[str, list[str]]) -> dict[str, bytes]:
        """Waits for pending writes; returns each array's metadata (the rows written and their keys) to store."""
        self.jobs.put(_END)
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        documents: dict[str, bytes] = {}
        for name, arrays in self.buckets.items():
            for group, array in arrays.items():
                documents.update(array.metadata(self.rows[name], {"shard": self.source, "storage": self.preset,
                                                                  "role": group, "keys": keys.get(name, [])}))
        return documents

    def abort(self) -> None:
        self.jobs.put(_END)
        self.thread.join(timeout=60)


def build_model(config: JobConfig):
    """The job's FeatureModel (backbone + upsampler), exactly as every worker builds it."""
    from featup_ops import FeatureModel

    options = dict(config.upsampler_options)
    remote = next((u for u in (config.upsampler_weights, config.backbone_weights) if u and protocol_of(u) != "file"),
                  None)  # the weights file whose storage options need resolving (endpoint, checksums)
    if config.upsampler == "implicit" and config.dtype != "float32":
        options.setdefault("compute_dtype", config.dtype)  # its fit runs its own autocast (GPU only)
    return FeatureModel.create(
        config.backbone, config.upsampler, backbone_weights=config.backbone_weights,
        upsampler_weights=config.upsampler_weights, random_init=config.random_init,
        storage_options=resolve_options(remote, config.storage_options), upsampler_options=options,
        backbone_options=config.backbone_options)


def _object_path(url: str) -> str:
    """bucket/key of an object-storage URL (how its requests name it); "" for local paths."""
    return url.split("://", 1)[1] if protocol_of(url) != "file" else ""


class ShardProcessor:
    """Loads the model once; `process(task)` turns one shard into a committed set of arrays and rows.

    `worker` (e.g. the Ray node and process) is recorded in each commit record: where the shard was computed.
    """

    def __init__(self, config: JobConfig, device: str | None = None, torch_threads: int | None = None,
                 worker: Mapping[str, Any] | None = None):
        if torch_threads:
            torch.set_num_threads(max(1, int(torch_threads)))
        self.config = config
        self.worker = dict(worker or {})
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype = COMPUTE_DTYPE[config.dtype] if self.device.type == "cuda" else torch.float32
        self.model = build_model(config).to(self.device).eval()
        self.store = OutputStore(config.output, config.storage_options)
        self.multiple = self.model.patch_size if config.resize == "fit" else 1
        size = config.image_size
        square = fit_shape(size, size, size, self.multiple) if config.resize == "fit" else (size, size)
        self.hr_hw = self.model.output_size(*square)  # of a square image; --resize fit: each shape its own
        self.lr_hw = self.model.lowres_size(*square)
        self._preset: Preset | None = None
        self.pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
        self._progress: dict[str, int] = {}  # samples read so far, per shard in progress
        # Two shards may be in progress on one processor (the next one streams and decodes, the last one
        # drains its writes and commits); the model runs one batch at a time.
        self._model_lock = threading.Lock()
        self._compute(np.zeros((1, *square, 3), dtype=np.uint8))  # builds/loads the fused kernels now

    @property
    def preset(self) -> Preset:
        """The storage preset; a pca<k> projection is read from the store on first use (the driver fits it)."""
        if self._preset is None:
            name = self.config.storage_preset
            pca = self.store.read_pca() if pca_components(name) is not None else None
            self._preset = Preset(name, self.model.dim, self.hr_hw, self.lr_hw, self.config.image_size, pca)
        return self._preset

    def _specs(self, image_hw: tuple[int, int] | None = None) -> list[ArraySpec]:
        """The arrays of samples whose image is `image_hw` (default: the square --image-size)."""
        hr_hw, lr_hw = self.hr_hw, self.lr_hw
        if image_hw is not None:
            hr_hw, lr_hw = self.model.output_size(*image_hw), self.model.lowres_size(*image_hw)
        specs = list(self.preset.arrays(hr_hw))
        if self.config.store_lowres or self.preset.needs_upsampler_at_read:
            specs.append(ArraySpec(LOWRES_GROUP, (self.model.dim, *lr_hw), self.preset.lowres_dtype()))
        if self.config.labels != "none":
            specs.append(ArraySpec(LABELS_GROUP, hr_hw, "uint16"))
        return specs

    @property
    def status(self) -> dict:
        """What this processor is working on, for the driver's progress bar."""
        progress = dict(self._progress)
        return {"shards": sorted(progress), "samples": sum(progress.values())}

    def _compute(self, images: np.ndarray, timing: list[float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 (B,H,W,3) -> (low-res, high-res features, ImageNet-normalised images) on the device.
        `timing` gets the seconds the model ran (not the wait for another shard's batch)."""
        with self._model_lock:
            t = time.perf_counter()
            x = images_to_tensor(images, self.device)
            lowres, highres = self.model(x, compute_dtype=self.compute_dtype)
            guidance = self.model.guidance(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            if timing is not None:
                timing.append(time.perf_counter() - t)
            return lowres, highres, guidance

    def _encode(self, images: np.ndarray, items: list[_Decoded], timing: list[float] | None = None
                ) -> tuple[dict[str, np.ndarray], list[bool], list[dict]]:
        """A batch -> arrays by group, whether each sample has a label, and each sample's quality columns."""
        from featup_ops.upsampler_metrics import lowres_agreement

        lowres, highres, guidance = self._compute(images, timing)
        rel_error, cosine = lowres_agreement(highres, lowres)  # on the device, from the tensors in hand
        quality = [manifest.quality(e, c) for e, c in zip(rel_error.tolist(), cosine.tolist())]
        hr_hw = tuple(highres.shape[2:])
        out = self.preset.encode(highres, images)
        if LOWRES_GROUP in {s.group for s in self._specs()}:
            out[LOWRES_GROUP] = lowres.to(getattr(torch, self.preset.lowres_dtype())).cpu().numpy()
        has_label = [False] * len(items)
        if self.config.labels == "oracle":
            from featup_ops.oracle import oracle_labels

            out[LABELS_GROUP] = oracle_labels(guidance.float(), hr_hw).to(torch.int32).cpu().numpy().astype(np.uint16)
            has_label = [True] * len(items)
        elif self.config.labels == "auto":
            labels = np.full((len(items), *hr_hw), IGNORE_LABEL, np.uint16)
            for i, item in enumerate(items):
                if item.label is not None:
                    labels[i], has_label[i] = item.label, True
            out[LABELS_GROUP] = labels
        return out, has_label, quality

    def fit_pca(self, shards: list[Shard], images: int, k: int, pixels_per_image: int = 4096, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Fits the pca<k> projection on random pixels of the high-res features of the first `images`
        decodable images of `shards`; returns (mean, components, explained variance, pixels used)."""
        rng = torch.Generator().manual_seed(seed)
        picked: list[torch.Tensor] = []
        seen = 0

        def take(batch: list[np.ndarray]) -> None:
            hr = self._compute(np.stack(batch))[1].float().cpu()
            flat = hr.permute(0, 2, 3, 1).reshape(-1, hr.shape[1])
            picked.append(flat[torch.randint(len(flat), (pixels_per_image * len(batch),), generator=rng)])

        for shard in shards:
            stream = _Stream(shard, self.config, self.pool, prefetch=self.config.batch_size, label_hw=None,
                             multiple=self.multiple)
            batches: dict[tuple, list[np.ndarray]] = {}  # by image shape: a forward pass takes one shape
            try:
                for item in stream.items():
                    if item.error is not None:
                        continue
                    batch = batches.setdefault(item.image.shape, [])
                    batch.append(item.image)
                    if len(batch) == self.config.batch_size or seen + sum(map(len, batches.values())) >= images:
                        for batch in [b for b in batches.values() if b]:
                            take(batch)
                            seen += len(batch)
                        batches.clear()
                        if seen >= images:
                            break
                for batch in [b for b in batches.values() if b]:
                    take(batch)
                    seen += len(batch)
            finally:
                stream.close()
            if seen >= images:
                break
        if not picked:
            raise RuntimeError("no decodable image to fit the PCA projection on")
        samples = torch.cat(picked)
        mean, components, explained = fit_pca(samples, k)
        return mean, components, explained, len(samples)

    def process(self, task: ShardTask, should_stop: Callable[[], bool] | None = None) -> ShardResult:
        """Streams, computes and writes one shard, then commits it. `should_stop` is polled per sample:
        when it says so the attempt is abandoned uncommitted (its arrays are garbage-collected later).

        Raises StorageUnavailableError when storage stayed unreachable (or kept answering 5xx) through every
        request-level retry: an outage to wait out, not a defect of the shard."""
        try:
            return self._process(task, should_stop)
        except Exception as exc:
            if is_storage_unavailable(exc):
                default = endpoint_name(self.config.output, self.config.storage_options)
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                raise StorageUnavailableError(endpoint_of(exc, default), detail) from exc
            raise
        finally:
            self._progress.pop(task.shard.shard_id, None)

    def _process(self, task: ShardTask, should_stop: Callable[[], bool] | None) -> ShardResult:
        shard, cfg = task.shard, self.config
        t0 = time.perf_counter()
        result = ShardResult(shard.shard_id, shard.url)
        name = OutputStore.new_array_name(shard.shard_id)
        groups = {s.group for s in self._specs()}
        features_group = "image" if self.preset.needs_upsampler_at_read else FEATURES_GROUP  # what a reader starts from

        def paths(bucket: str) -> dict[str, str | None]:
            out = {g: (f"{g}/{bucket}" if g in groups else None) for g in (FEATURES_GROUP, LOWRES_GROUP, LABELS_GROUP)}
            out[FEATURES_GROUP] = f"{features_group}/{bucket}"
            return out

        writer = _Writer(self.store, self._specs, shard.expected_samples or 64, shard.url, self.preset.name)
        if cfg.resize == "crop":  # one shape: one bucket named after the attempt, written even when empty
            writer.bucket(name, (cfg.image_size, cfg.image_size))
        stream = _Stream(shard, cfg, self.pool, prefetch=2 * cfg.batch_size + cfg.decode_threads,
                         label_hw=(lambda hw: self.model.output_size(*hw)) if cfg.labels == "auto" else None,
                         multiple=self.multiple)
        rows: list[dict] = []
        keys: dict[str, list[str]] = {}  # bucket -> keys in row order
        pending: dict[str, list[_Decoded]] = {}  # bucket -> samples waiting for a full batch of their shape
        started_at = time.time()
        self._progress[shard.shard_id] = 0

        def bucket_of(item: _Decoded) -> str:
            return name if cfg.resize == "crop" else bucket_name(name, item.image.shape[:2])

        def flush(bucket: str) -> None:
            batch = pending.pop(bucket, [])
            if not batch:
                return
            timing: list[float] = []
            arrays, has_label, quality = self._encode(np.stack([b.image for b in batch]), batch, timing)
            result.compute_seconds += sum(timing)
            writer.put(bucket, batch[0].image.shape[:2], arrays)
            result.bytes_written += sum(sum(map(len, a)) if a.dtype == object else a.nbytes for a in arrays.values())
            path, hr_hw = paths(bucket), self.model.output_size(*batch[0].image.shape[:2])
            bucket_keys = keys.setdefault(bucket, [])
            for item, labelled, agreement in zip(batch, has_label, quality):
                rows.append(manifest.ok_row(item.key, shard.shard_id, shard.url, item.sample_index, self.preset.name,
                                            path[FEATURES_GROUP], path[LOWRES_GROUP],
                                            path[LABELS_GROUP] if labelled else None, len(bucket_keys), hr_hw,
                                            item.geometry))
                rows[-1].update(agreement)
                bucket_keys.append(item.key)

        try:
            for item in stream.items():
                if task.max_samples is not None and result.samples_read >= task.max_samples:
                    result.complete = False
                    break
                if should_stop is not None and should_stop():
                    raise ShardAborted(f"{shard.url}: abandoned, the job that asked for it is gone")
                result.samples_read += 1
                self._progress[shard.shard_id] = result.samples_read
                if item.error is not None:
                    rows.append(manifest.error_row(item.key, shard.shard_id, shard.url, item.sample_index, item.error))
                    continue
                bucket = bucket_of(item)
                pending.setdefault(bucket, []).append(item)
                if len(pending[bucket]) >= cfg.batch_size:
                    flush(bucket)
                elif sum(map(len, pending.values())) > MAX_PENDING_BATCHES * cfg.batch_size:
                    flush(max(pending, key=lambda b: len(pending[b])))  # bounded memory: the fullest one goes
            for bucket in list(pending):
                flush(bucket)
            metadata = writer.finish(keys)
        except BaseException:
            stream.close()
            writer.abort()
            RETRIES.take([name, _object_path(shard.url)])  # a failed attempt's retries are not reported
            raise
        stream.close()

        if stream.truncation is not None and result.complete:
            trunc = stream.truncation
            result.shard_error = f"truncated tar: {trunc.reason}"
            if trunc.broken_key is not None:
                rows.append(manifest.error_row(trunc.broken_key, shard.shard_id, shard.url, result.samples_read,
                                               f"sample cut off by a truncated tar: {trunc.reason}"))
                result.samples_read += 1
        elif result.complete and shard.expected_samples is not None and result.samples_read != shard.expected_samples:
            result.shard_error = (f"sample count mismatch: the shard index lists {shard.expected_samples} samples, "
                                  f"the tar holds {result.samples_read}")
        result.ok = sum(map(len, keys.values()))
        result.errors = len(rows) - result.ok
        rows.sort(key=lambda r: r["sample_index"])  # shard order, whatever order the buckets filled in
        part = self.store.write_part(name, manifest.to_table(rows), alongside=metadata)  # before the commit
        result.request_retries = RETRIES.take([name, _object_path(shard.url)])
        result.seconds = time.perf_counter() - t0
        result.commit = {
            "shard_id": shard.shard_id, "url": shard.url, "attempt": task.attempt, "complete": result.complete,
            "array_name": name, "groups": sorted(groups), "arrays": sorted(writer.buckets),  # fit: one per shape
            "features_array": paths(name)[FEATURES_GROUP] if cfg.resize == "crop" else None,
            "lowres_array": paths(name)[LOWRES_GROUP] if cfg.resize == "crop" else None, "part": part,
            "samples_read": result.samples_read, "ok": result.ok, "errors": result.errors,
            "expected_samples": shard.expected_samples, "shard_error": result.shard_error,
            "seconds": round(result.seconds, 3), "compute_seconds": round(result.compute_seconds, 3),
            "bytes_uncompressed": result.bytes_written, "started_at": started_at, "committed_at": time.time(),
            "request_retries": result.request_retries, "worker": {**self.worker, "device": str(self.device)},
        }
        try:
            result.commit_version = self.store.commit(shard.shard_id, result.commit)
        finally:
            result.request_retries += RETRIES.take([f"commits/{shard.shard_id}.json"])
        return result
