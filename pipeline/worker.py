"""Processing one shard end to end: stream, decode, compute, write, commit. No Ray in here.

Three stages overlap, so the accelerator never waits on I/O: a reader thread streams the tar, a thread
pool decodes and crops images ahead of the model, and a writer thread stores batch n while batch n+1
computes. The model (`featup_ops.FeatureModel`) is loaded once per worker, Ray's batch-inference pattern.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import manifest
from .config import JobConfig
from .images import Geometry, SampleError, load_sample_image
from .shards import Shard, TruncatedShardError, iter_samples
from .store import FEATURES_GROUP, LOWRES_GROUP, OutputStore

log = logging.getLogger(__name__)

TORCH_STORED_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
_END = object()


class ShardAborted(RuntimeError):
    """Processing stopped because the caller went away (nothing of the attempt is committed)."""


@dataclass(frozen=True)
class ShardTask:
    shard: Shard
    max_samples: int | None = None  # stop after this many samples (the job's --limit)
    attempt: int = 1


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
    commit: dict = field(default_factory=dict)


@dataclass
class _Decoded:
    sample_index: int
    key: str
    image: np.ndarray | None = None
    geometry: Geometry | None = None
    error: str | None = None


class _Stream:
    """Reader thread + ordered decode pool: yields _Decoded items in shard order, `prefetch` ahead."""

    def __init__(self, url: str, config: JobConfig, pool: ThreadPoolExecutor, prefetch: int):
        self.url, self.config, self.pool, self.prefetch = url, config, pool, prefetch
        self.samples: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        self.truncation: TruncatedShardError | None = None
        self.thread = threading.Thread(target=self._read, name="shard-reader", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for sample in iter_samples(self.url, self.config.storage_options):
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
                                                self.config.min_side)
            return _Decoded(index, key, image, geometry)
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
    """The only writer of one shard attempt's arrays; runs in its own thread behind a small queue."""

    def __init__(self, store: OutputStore, name: str, config: JobConfig, hr_shape: tuple, lr_shape: tuple,
                 capacity: int, source: str):
        self.store, self.name, self.config = store, name, config
        self.hr_shape, self.lr_shape, self.capacity, self.source = hr_shape, lr_shape, max(capacity, 1), source
        self.jobs: queue.Queue = queue.Queue(maxsize=2)
        self.rows = 0
        self.failure: BaseException | None = None
        self.arrays: dict = {}
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        while self.capacity < needed:
            self.capacity *= 2
        for arr in self.arrays.values():
            arr.resize((self.capacity, *arr.shape[1:]))

    def _run(self) -> None:
        try:
            attrs = {"shard": self.source}
            self.arrays[FEATURES_GROUP] = self.store.create_array(FEATURES_GROUP, self.name, self.hr_shape,
                                                                  self.config.dtype, self.capacity, attrs)
            if self.config.store_lowres:
                self.arrays[LOWRES_GROUP] = self.store.create_array(LOWRES_GROUP, self.name, self.lr_shape,
                                                                    self.config.dtype, self.capacity, attrs)
            while True:
                job = self.jobs.get()
                if job is _END:
                    return
                hr, lr = job
                n = hr.shape[0]
                self._ensure_capacity(self.rows + n)
                self.arrays[FEATURES_GROUP][self.rows : self.rows + n] = hr
                if LOWRES_GROUP in self.arrays:
                    self.arrays[LOWRES_GROUP][self.rows : self.rows + n] = lr
                self.rows += n
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.failure = exc
            while True:  # drain so the producer never blocks on a dead writer
                if self.jobs.get() is _END:
                    return

    def put(self, hr: np.ndarray, lr: np.ndarray) -> None:
        if self.failure is not None:
            raise self.failure
        self.jobs.put((hr, lr))

    def finish(self, keys: list[str]) -> None:
        """Waits for pending writes, trims the arrays to the rows written and records their keys."""
        self.jobs.put(_END)
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        for arr in self.arrays.values():
            if arr.shape[0] != self.rows:
                arr.resize((self.rows, *arr.shape[1:]))
            arr.update_attributes({"featup": {**arr.attrs.get("featup", {}), "keys": keys}})

    def abort(self) -> None:
        self.jobs.put(_END)
        self.thread.join(timeout=60)


class ShardProcessor:
    """Loads the model once; `process(task)` turns one shard into a committed set of arrays and rows."""

    def __init__(self, config: JobConfig, device: str | None = None, torch_threads: int | None = None):
        from featup_ops import FeatureModel

        if torch_threads:
            torch.set_num_threads(max(1, int(torch_threads)))
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.compute_dtype = TORCH_STORED_DTYPE[config.dtype] if self.device.type == "cuda" else torch.float32
        self.model = FeatureModel.create(
            config.backbone, config.upsampler, backbone_weights=config.backbone_weights,
            upsampler_weights=config.upsampler_weights, random_init=config.random_init,
            storage_options=config.storage_options, upsampler_options=config.upsampler_options,
        ).to(self.device).eval()
        self.store = OutputStore(config.output, config.storage_options)
        size = config.image_size
        self.hr_hw = self.model.output_size(size, size)
        self.lr_hw = self.model.lowres_size(size, size)
        self.pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="decode")
        self.status = {"shard": None, "samples": 0}
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny batch through the model: builds/loads the fused kernels before the first shard."""
        size = self.config.image_size
        self._compute(np.zeros((1, size, size, 3), dtype=np.uint8))

    def _compute(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(images).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        lowres, highres = self.model(x, compute_dtype=self.compute_dtype)
        stored = TORCH_STORED_DTYPE[self.config.dtype]

        def to_numpy(t: torch.Tensor) -> np.ndarray:
            t = t.to(stored)
            if stored == torch.bfloat16:
                t = t.view(torch.int16)  # raw bits; stored as uint16 (numpy has no bfloat16)
            out = t.cpu().numpy()
            return out.view(np.uint16) if stored == torch.bfloat16 else out

        return to_numpy(highres), to_numpy(lowres)

    def process(self, task: ShardTask, should_stop: Callable[[], bool] | None = None) -> ShardResult:
        """Streams, computes and writes one shard, then commits it. `should_stop` is polled per sample:
        when it says so the attempt is abandoned uncommitted (its arrays are garbage-collected later)."""
        shard, cfg = task.shard, self.config
        t0 = time.perf_counter()
        result = ShardResult(shard.shard_id, shard.url)
        name = OutputStore.new_array_name(shard.shard_id)
        features_path = f"{FEATURES_GROUP}/{name}"
        lowres_path = f"{LOWRES_GROUP}/{name}" if cfg.store_lowres else None
        writer = _Writer(self.store, name, cfg, (self.model.dim, *self.hr_hw), (self.model.dim, *self.lr_hw),
                         shard.expected_samples or 64, shard.url)
        stream = _Stream(shard.url, cfg, self.pool, prefetch=2 * cfg.batch_size + cfg.decode_threads)
        rows: list[dict] = []
        keys: list[str] = []
        batch: list[_Decoded] = []
        self.status = {"shard": shard.shard_id, "samples": 0}

        def flush() -> None:
            if not batch:
                return
            t = time.perf_counter()
            hr, lr = self._compute(np.stack([b.image for b in batch]))
            result.compute_seconds += time.perf_counter() - t
            writer.put(hr, lr)
            result.bytes_written += hr.nbytes + lr.nbytes
            for item in batch:
                rows.append(manifest.ok_row(item.key, shard.shard_id, shard.url, item.sample_index, features_path,
                                            lowres_path, len(keys), self.hr_hw, item.geometry))
                keys.append(item.key)
            batch.clear()

        try:
            items = stream.items()
            for item in items:
                if task.max_samples is not None and result.samples_read >= task.max_samples:
                    result.complete = False
                    break
                if should_stop is not None and should_stop():
                    raise ShardAborted(f"{shard.url}: abandoned, the job that asked for it is gone")
                result.samples_read += 1
                self.status["samples"] = result.samples_read
                if item.error is not None:
                    rows.append(manifest.error_row(item.key, shard.shard_id, shard.url, item.sample_index, item.error))
                    continue
                batch.append(item)
                if len(batch) >= cfg.batch_size:
                    flush()
            flush()
            writer.finish(keys)
        except BaseException:
            stream.close()
            writer.abort()
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
        result.ok = len(keys)
        result.errors = len(rows) - len(keys)
        part = self.store.write_part(name, manifest.to_table(rows))
        result.seconds = time.perf_counter() - t0
        result.commit = {
            "shard_id": shard.shard_id, "url": shard.url, "attempt": task.attempt, "complete": result.complete,
            "features_array": features_path, "lowres_array": lowres_path, "part": part,
            "samples_read": result.samples_read, "ok": result.ok, "errors": result.errors,
            "expected_samples": shard.expected_samples, "shard_error": result.shard_error,
            "seconds": round(result.seconds, 3), "compute_seconds": round(result.compute_seconds, 3),
            "bytes_uncompressed": result.bytes_written, "committed_at": time.time(),
        }
        self.store.commit(shard.shard_id, result.commit)
        self.status = {"shard": None, "samples": 0}
        return result
