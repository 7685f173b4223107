"""The caching job's driver: prepare (validate, open the output, find the work), execute (the Ray worker pool
runs the pending shards), finalize (manifest, run record, clean-up, previews).

Works the same under a local `ray.init()` and inside `ray job submit` against a running cluster (where
RAY_ADDRESS is set). Committed shards of an earlier, interrupted run are skipped; the retry rules live in
`pipeline.caching.scheduler`.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.caching import manifest
from pipeline.caching.commit_log import READ_BATCH, Commit, CommitIndex, CommitLog, manifest_digest
from pipeline.caching.job_config import JobConfig
from pipeline.caching.lease import OutputLease
from pipeline.caching.output_store import (
    MANIFEST_NAME,
    RUN_NAME,
    UPSAMPLER_NAME,
    OutputStore,
)
from pipeline.caching.presets import error_bound, pca_components
from pipeline.caching.scheduler import (
    JobFailed,
    ShardScheduler,
    describe_failures,
    run_on_ray,
)
from pipeline.caching.shard_processor import ShardResult, build_model
from pipeline.caching.worker_pool import fit_pca_on, more_actors, start_actors, stop_actors
from pipeline.options import ConfigError
from pipeline.ray_runtime import init_ray
from pipeline.storage.filesystems import check_reachable, protocol_of
from pipeline.storage.retries import RETRIES
from pipeline.storage.shards import Shard, resolve_shards
from pipeline.upsampler_weights import WEIGHTED_UPSAMPLERS

log = logging.getLogger(__name__)

__all__ = ["JobFailed", "RunSummary", "run_job"]

CHECKPOINT_EVERY_S = 60.0  # how often the commit index is written while shards complete


@dataclass
class RunSummary:
    output: str
    shards_total: int = 0
    shards_done: int = 0
    shards_skipped: int = 0
    shards_failed: list = field(default_factory=list)
    shard_errors: dict = field(default_factory=dict)
    samples_read: int = 0
    ok: int = 0
    errors: int = 0
    processed_ok: int = 0  # images computed by this run (the rest were committed by an earlier one)
    seconds: float = 0.0
    retries: dict = field(default_factory=dict)  # request and shard retries of this run (run.json "retries")
    workers: dict = field(default_factory=dict)  # actors started at first and added as the cluster grew
    run: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed_ok / self.seconds if self.seconds > 0 else 0.0


@dataclass
class PreparedRun:
    """What `prepare` established before any work: the output, the shards, what is left to do."""

    config: JobConfig
    store: OutputStore
    lease: OutputLease  # held until the run ends
    shards: list[Shard]
    identity: dict
    model_info: dict
    index: CommitIndex  # as found: written by the last run's end, or by its last checkpoint
    commits: dict[str, Commit]  # shard_id -> its commit, kept up to date as workers report
    done: set[str]
    pending: list[Shard]
    budget: int | None  # samples still allowed by --limit
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("featup-cache", "torch", "timm", "ray", "zarr", "webdataset", "fsspec", "s3fs", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _validate_model(config: JobConfig):
    """Builds the model once on CPU: unknown backbone, unreadable or mismatched weights fail here, early."""
    from featup_ops import BackboneError, CheckpointError, UpsamplerError

    try:
        model = build_model(config)
    except (BackboneError, UpsamplerError, CheckpointError, FileNotFoundError) as exc:
        raise ConfigError(str(exc)) from None
    return model


def _describe(model, config: JobConfig) -> dict:
    described = model.describe()
    described["output_size"] = list(model.output_size(config.image_size, config.image_size))
    described["lowres_size"] = list(model.lowres_size(config.image_size, config.image_size))
    source = config.upsampler_weights or getattr(model.upsampler, "weights_source", None)
    if source:  # where the upsampler's weights came from (AnyUp: the published URL when none was given)
        described["upsampler_weights"] = source
    return described


def _store_upsampler(model, store: OutputStore) -> None:
    """The lowres preset's reader re-runs the upsampler (JBU, AnyUp): keep its exact weights with the cache."""
    from featup_ops import save_upsampler

    save_upsampler(model.upsampler, store.url_of(UPSAMPLER_NAME), store.resolved_options)


def _write_previews(config: JobConfig, store: OutputStore) -> None:
    """PCA pictures (image | low-res | high-res) of the first samples, into <output>/previews/."""
    from pipeline.reading.previews import write_previews

    try:
        paths = write_previews(config.output, count=config.previews, storage_options=config.storage_options)
        log.info("wrote %d preview(s) to %s", len(paths), store.url_of("previews"))
    except Exception as exc:  # noqa: BLE001 - pictures must never fail a finished job
        log.warning("could not write previews: %s: %s", type(exc).__name__, exc)


class _Progress:
    """tqdm bar over shards with images/s, errors and the samples of shards still in flight."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="shard", desc="caching features", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.ok = self.errors = self.in_flight_samples = 0

    def shard_done(self, result: ShardResult) -> None:
        self.ok += result.ok
        self.errors += result.errors
        self.bar.update(1)
        self.refresh()

    def in_flight(self, samples: int) -> None:
        self.in_flight_samples = samples
        self.refresh()

    def refresh(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(images=self.ok, img_s=f"{self.ok / elapsed:.1f}", errors=self.errors,
                             in_flight=self.in_flight_samples, refresh=True)

    def close(self) -> None:
        self.bar.close()


def prepare(config: JobConfig) -> PreparedRun:
    """Everything that can refuse the job, before any work: settings, model (its weights downloaded, or a refusal
    naming the file to pass when offline), storage, shards, output identity."""
    config.validate()
    RETRIES.take_all()  # request retries counted in this process so far belong to no part of this run
    model = _validate_model(config)
    store = OutputStore(config.output, config.storage_options)
    if protocol_of(config.output) in ("s3", "s3a"):
        check_reachable(config.output, config.storage_options)
    shards = resolve_shards(list(config.inputs), config.storage_options)
    log.info("%d input shard(s), first %s", len(shards), shards[0].url)
    model_info = _describe(model, config)
    identity = {**config.identity(), "weights": model_info["weights"], "output_size": model_info["output_size"],
                "dim": model_info["dim"]}
    store.check(identity, config.overwrite)  # refuses a foreign or different output before writing anything
    lease = OutputLease(config.output, config.storage_options, config.lease_ttl).acquire()
    try:
        resumed = store.prepare(identity, config.overwrite)
        if config.storage_preset == "lowres" and config.upsampler in WEIGHTED_UPSAMPLERS:
            _store_upsampler(model, store)
        del model
        commit_log = CommitLog(store)
        index = commit_log.read_index() if resumed else CommitIndex({})
        commits = commit_log.scan(index.commits) if resumed else {}
    except BaseException:
        lease.release()
        raise
    done = {s.shard_id for s in shards if s.shard_id in commits and commits[s.shard_id].complete}
    if resumed:
        log.info("resuming: %d of %d shards are already committed and will be skipped", len(done), len(shards))
    budget = None
    if config.limit is not None:
        budget = config.limit - sum(commits[s].samples_read for s in done)
    return PreparedRun(config, store, lease, shards, identity, model_info, index, commits, done,
                       [s for s in shards if s.shard_id not in done], budget)


def execute(run: PreparedRun, summary: RunSummary) -> dict:
    """Runs the pending shards on the Ray worker pool; returns what the storage preset learned (pca fit)."""
    config, preset_info = run.config, {}
    if not run.pending or (run.budget is not None and run.budget <= 0):
        return preset_info
    init_ray()
    actors = start_actors(config, len(run.pending))
    progress = _Progress(len(run.pending))
    try:
        if pca_components(config.storage_preset) is not None and run.store.read_pca() is None:
            preset_info = fit_pca_on(actors[0], config, run.pending, run.store)
        scheduler = ShardScheduler(run.pending, len(actors), config.max_attempts, config.max_actor_restarts,
                                   run.budget, storage_patience=config.storage_patience)

        commit_log, checkpointed = CommitLog(run.store), time.monotonic()

        def on_result(result: ShardResult) -> None:
            nonlocal checkpointed
            run.lease.check()
            run.commits[result.shard_id] = Commit.from_record(result.commit, result.commit_version)
            if time.monotonic() - checkpointed >= CHECKPOINT_EVERY_S:  # a crash now costs a rerun few reads
                commit_log.write_index(run.commits.values())
                checkpointed = time.monotonic()
            if result.shard_error:
                summary.shard_errors[result.url] = result.shard_error
                log.warning("shard %s: %s", result.url, result.shard_error)
            progress.shard_done(result)

        def on_progress(samples: int) -> None:
            run.lease.check()  # another run took the output over: stop
            progress.in_flight(samples)

        summary.workers = {"started": len(actors), "added": 0}

        def grow(live: int, left: int) -> list:
            added = more_actors(config, live, left)
            summary.workers["added"] += len(added)
            return added

        try:
            run_on_ray(scheduler, actors, on_result, on_progress, grow=grow)
        finally:
            summary.retries = {"request_retries_shards": sum(r.request_retries for r in scheduler.results),
                               "shard_retries": scheduler.shard_retries,
                               "storage_waits": scheduler.storage_requeues}
        summary.processed_ok = sum(r.ok for r in scheduler.results)
        summary.shards_failed = scheduler.failed
    finally:
        progress.close()
        stop_actors(actors)
    return preset_info


def _retry_counts(of_execute: dict) -> dict:
    """run.json "retries": storage requests re-sent (by this run's shards, including their commit writes, and by
    the driver), shard attempts beyond the first, and shards put back unharmed while storage was unavailable."""
    shards = of_execute.get("request_retries_shards", 0)
    driver = RETRIES.take_all()
    return {"request_retries": shards + driver, "request_retries_shards": shards, "request_retries_driver": driver,
            "shard_retries": of_execute.get("shard_retries", 0), "storage_waits": of_execute.get("storage_waits", 0)}
def _read_parts(store: OutputStore, committed: list[Commit]):
    """The manifest parts of `committed`, in order, fetched concurrently a batch at a time."""
    for path, data in store.cat_many([store.path(c.part) for c in committed], READ_BATCH):
        if isinstance(data, BaseException):
            raise RuntimeError(f"the manifest part {path} of a committed shard cannot be read ({data}): delete "
                               "that shard's record under _pipeline/commits/ to have it redone") from data
        yield pq.read_table(pa.BufferReader(data))


def finalize(run: PreparedRun, summary: RunSummary, preset_info: dict) -> RunSummary:
    """Assembles the manifest from the committed shards, writes run.json, removes leftovers, renders previews.

    A rerun with nothing left to do keeps a manifest that already covers exactly the committed shards (and
    the clean-up that followed it): the commit index says what it was built from.
    """
    config, store, shards = run.config, run.store, run.shards
    run.lease.check()
    commit_log = CommitLog(store)
    # after work, list again: catches commits whose worker's answer was lost (nothing else writes: the lease)
    commits = commit_log.scan(run.commits) if run.pending else run.commits
    committed = [commits[s.shard_id] for s in shards if s.shard_id in commits]
    digest = manifest_digest(committed)
    clock = time.perf_counter()
    current = (not run.pending and run.index.manifest_digest == digest and run.index.manifest_version is not None
               and commit_log.manifest_version() == run.index.manifest_version)
    if current:
        log.info("the manifest already covers the %d committed shards", len(committed))
    else:
        manifest_version = store.put_bytes(MANIFEST_NAME,
                                           manifest.assemble(_read_parts(store, committed)).to_pybytes())
    manifest_seconds = time.perf_counter() - clock
    for c in committed:
        if c.shard_error:
            summary.shard_errors[c.url] = c.shard_error
    summary.ok = sum(c.ok for c in committed)
    summary.errors = sum(c.errors for c in committed)
    summary.samples_read = summary.ok + summary.errors
    summary.shards_done = len(committed)
    if not current:
        if not summary.shards_failed:  # arrays and parts of every commit stay, inputs of this run or not
            removed = store.remove_unreferenced([c.array_name for c in commits.values()],
                                                [c.part for c in commits.values()])
            if removed:
                log.info("removed %d leftover objects of failed attempts", removed)
        commit_log.write_index(commits.values(), manifest_version, digest)
    summary.seconds = time.perf_counter() - run.clock
    summary.run = {
        "settings": run.identity, "model": run.model_info,
        "storage": {"preset": config.storage_preset, **preset_info,
                    "error_bound": error_bound(config.storage_preset)}, "versions": _versions(),
        "flags": config.record(),
        "counts": {"shards": len(shards), "shards_committed": len(committed), "shards_skipped_resumed": len(run.done),
                   "shards_failed": len(summary.shards_failed), "samples": summary.samples_read, "ok": summary.ok,
                   "errors": summary.errors, "ok_this_run": summary.processed_ok},
        "retries": _retry_counts(summary.retries), "workers": summary.workers,
        "shard_errors": summary.shard_errors, "failed_shards": summary.shards_failed,
        "timings": {"started": run.started, "finished": time.time(), "elapsed_s": round(summary.seconds, 3),
                    "images_per_s": round(summary.images_per_second, 3),
                    "compute_s": round(sum(c.compute_seconds for c in committed), 3),
                    "manifest_s": round(manifest_seconds, 3)},
        "manifest": MANIFEST_NAME,
    }
    store.put_json(RUN_NAME, summary.run)
    if config.previews and summary.ok:
        _write_previews(config, store)
    if summary.shards_failed:
        raise JobFailed(describe_failures(summary.shards_failed, config.max_attempts, len(committed)))
    return summary


def run_job(config: JobConfig) -> RunSummary:
    """Runs the caching job to completion; refuses bad configuration (ConfigError) before any work."""
    run = prepare(config)
    try:
        summary = RunSummary(output=config.output, shards_total=len(run.shards), shards_skipped=len(run.done))
        preset_info = execute(run, summary)
        return finalize(run, summary, preset_info)
    finally:
        try:
            run.lease.release()
        except Exception as exc:  # noqa: BLE001 - e.g. the store is unreachable: never hide why the run ended
            log.warning("could not release the lease of %s (%s: %s); another run may take it over once it is "
                        "older than --lease-ttl (%.0f s), or at once from this host", config.output,
                        type(exc).__name__, exc, config.lease_ttl)
