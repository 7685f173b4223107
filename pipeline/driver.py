"""The job's driver: validate everything, start GPU-pinned Ray actors, schedule shards, assemble the result.

Works the same under a local `ray.init()` and inside `ray job submit` against a running cluster (where
RAY_ADDRESS is set). Each actor works on two shards at once: the model runs one batch at a time while
the next shard streams in and decodes and the last one drains its writes and commits, so the accelerator
never idles at shard boundaries. A shard whose actor died is retried (Ray restarts the dead actor, and it
gets work again once it answers); committed shards of an earlier, interrupted run are skipped.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field

import pyarrow as pa

from . import manifest
from .config import ConfigError, JobConfig
from .ray_runtime import init_ray
from .shards import Shard, resolve_shards
from .storage import check_reachable, protocol_of, worker_env
from .presets import error_bound, pca_components
from .store import MANIFEST_NAME, RUN_NAME, UPSAMPLER_NAME, OutputStore
from .worker import ShardProcessor, ShardResult, ShardTask, build_model

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2  # shards per actor at once: one computes while the other streams in or drains
STATUS_POLL_S = 2.0


class JobFailed(RuntimeError):
    """Some shards could not be processed after every retry; rerunning the command resumes them."""


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
    run: dict = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.processed_ok / self.seconds if self.seconds > 0 else 0.0


class ShardWorker:
    """Ray actor: one FeatureModel per actor, called once per shard (Ray's batch-inference pattern)."""

    def __init__(self, config: JobConfig, torch_threads: int | None):
        self.processor = ShardProcessor(config, torch_threads=torch_threads)
        self._parent = os.getppid()  # the node's raylet

    def _orphaned(self) -> bool:
        """True once this node's Ray runtime is gone (e.g. its machine's driver was killed): stop writing."""
        return os.getppid() != self._parent

    def process(self, task: ShardTask) -> ShardResult:
        return self.processor.process(task, should_stop=self._orphaned)

    def fit_pca(self, shards: list[Shard], images: int, k: int) -> tuple:
        return self.processor.fit_pca(shards, images, k)

    def status(self) -> dict:
        return dict(self.processor.status)

    def describe(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.processor.device),
                "torch_threads": __import__("torch").get_num_threads()}


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
    return described


def _store_upsampler(model, store: OutputStore) -> None:
    """The lowres preset's reader re-runs the JBU: keep its exact weights with the cache."""
    from featup_ops import save_jbu

    save_jbu(model.upsampler, store.url_of(UPSAMPLER_NAME), store.storage_options)


def _write_previews(config: JobConfig, store: OutputStore) -> None:
    """PCA pictures (image | low-res | high-res) of the first samples, into <output>/previews/."""
    from .previews import write_previews

    try:
        paths = write_previews(config.output, count=config.previews, storage_options=config.storage_options)
        log.info("wrote %d preview(s) to %s", len(paths), store.url_of("previews"))
    except Exception as exc:  # noqa: BLE001 - pictures must never fail a finished job
        log.warning("could not write previews: %s: %s", type(exc).__name__, exc)


def _actor_layout(config: JobConfig) -> tuple[int, float, float]:
    """(actors, gpus per actor, cpus per actor) for this cluster; CPU-only clusters get CPU actors."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if gpus > 0 and config.gpus_per_actor > 0:
        n = config.actors or max(1, int(gpus // config.gpus_per_actor))
        cpus_each = config.cpus_per_actor or max(1.0, min(8.0, (cpus - 1) // n))
        log.info("%d actor(s), %.2f GPU and %.0f CPU each (cluster: %.0f GPUs, %.0f CPUs)", n,
                 config.gpus_per_actor, cpus_each, gpus, cpus)
        return n, config.gpus_per_actor, cpus_each
    n = config.actors or 1
    cpus_each = config.cpus_per_actor or max(1.0, float(int(cpus // n)))
    log.warning("no GPUs in the Ray cluster: %d actor(s) run on CPU with %.0f CPU(s) each", n, cpus_each)
    return n, 0.0, cpus_each


class _Progress:
    """tqdm bar over shards with images/s, errors and the samples of shards still in flight."""

    def __init__(self, total: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="shard", desc="caching features", dynamic_ncols=True,
                        disable=os.environ.get("TQDM_DISABLE") == "1")
        self.start = time.perf_counter()
        self.ok = self.errors = self.in_flight_samples = 0

    def shard_done(self, result: ShardResult) -> None:
        self.ok += result.ok
        self.errors += result.errors
        self.bar.update(1)
        self.refresh()

    def refresh(self) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(images=self.ok, img_s=f"{self.ok / elapsed:.1f}", errors=self.errors,
                             in_flight=self.in_flight_samples, refresh=True)

    def close(self) -> None:
        self.bar.close()


def _start_actors(config: JobConfig, shards_to_do: int) -> list:
    """The worker pool: each actor pinned to its GPU(s) (or CPUs), restarted by Ray if its process dies."""
    import ray

    n_actors, gpus, cpus = _actor_layout(config)
    n_actors = min(n_actors, max(1, shards_to_do))
    remote_cls = ray.remote(concurrency_groups={"compute": IN_FLIGHT_PER_ACTOR, "status": 1})(ShardWorker)
    actor_opts = dict(num_gpus=gpus, num_cpus=cpus, max_restarts=config.max_actor_restarts, max_task_retries=0,
                      runtime_env={"env_vars": worker_env()})
    return [remote_cls.options(**actor_opts).remote(config, int(cpus)) for _ in range(n_actors)]


def _fit_pca(actor, config: JobConfig, shards: list[Shard], store: OutputStore) -> dict:
    """Fits the dataset's pca<k> projection on one worker and stores it once, before any shard is written."""
    import ray

    k = pca_components(config.storage_preset)
    log.info("fitting the %s projection on the first %d images", config.storage_preset, config.pca_samples)
    mean, components, explained, pixels = ray.get(
        actor.fit_pca.options(concurrency_group="compute").remote(shards, config.pca_samples, k))
    store.write_pca(mean, components, explained, pixels)
    log.info("%s keeps %.2f%% of the feature variance (fitted on %d pixels)", config.storage_preset,
             100 * explained, pixels)
    return {"explained_variance": explained, "fitted_on_pixels": pixels}


def _schedule(config: JobConfig, actors: list, pending: list[Shard], budget: int | None, summary: RunSummary
              ) -> list[ShardResult]:
    """Runs the pending shards on the actor pool; returns the results of the shards that committed.

    A worker death costs the shard it was running one attempt; the actor is then left alone until a
    readiness probe answers, so retries do not burn their attempts on an actor that is still restarting.
    """
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

    n_actors = len(actors)
    in_flight: dict = {}  # ObjectRef -> (task, actor index, reserved samples)
    probes: dict = {}  # ObjectRef -> actor index, for actors being restarted by Ray
    load = [0] * n_actors
    deaths = [0] * n_actors
    alive = set(range(n_actors))
    restarting: set[int] = set()
    queue_ = [ShardTask(s) for s in pending]
    results: list[ShardResult] = []
    progress = _Progress(len(pending))
    last_poll = 0.0

    def reserved() -> int:
        return sum(r for _, _, r in in_flight.values())

    def submit() -> None:
        while queue_:
            ready_actors = alive - restarting
            if not ready_actors:
                return
            idx = min(ready_actors, key=lambda i: load[i])
            if load[idx] >= IN_FLIGHT_PER_ACTOR:
                return
            task = queue_[0]
            reserve = 0
            if budget is not None:
                room = budget - reserved()
                if room <= 0:
                    if not in_flight:
                        queue_.clear()  # the --limit is used up
                    return
                reserve = min(room, task.shard.expected_samples or room)
                task = ShardTask(task.shard, max_samples=room, attempt=task.attempt)
            queue_.pop(0)
            method = getattr(actors[idx].process, "options")(concurrency_group="compute")
            in_flight[method.remote(task)] = (task, idx, reserve)
            load[idx] += 1

    def probe(idx: int) -> None:
        probes[actors[idx].status.options(concurrency_group="status").remote()] = idx

    def retry_or_fail(task: ShardTask, reason: str, count_attempt: bool = True) -> None:
        if not count_attempt:
            queue_.insert(0, task)
        elif task.attempt >= config.max_attempts:
            log.error("shard %s failed %d times, giving up: %s", task.shard.url, task.attempt, reason)
            summary.shards_failed.append({"url": task.shard.url, "error": reason})
        else:
            log.warning("shard %s failed (attempt %d/%d), retrying: %s", task.shard.url, task.attempt,
                        config.max_attempts, reason)
            queue_.insert(0, ShardTask(task.shard, attempt=task.attempt + 1))

    def actor_lost(idx: int, task: ShardTask, exc: Exception) -> None:
        reason = f"worker died ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        if idx in restarting or idx not in alive:
            # a casualty of a death already counted (queued behind the task that was running): no attempt lost
            retry_or_fail(task, reason, count_attempt=False)
            return
        deaths[idx] += 1
        if deaths[idx] > config.max_actor_restarts:
            alive.discard(idx)
            log.error("actor %d died %d times; removed from the pool", idx, deaths[idx])
        else:
            restarting.add(idx)
            probe(idx)
        retry_or_fail(task, reason)

    def probe_answered(ref, idx: int) -> None:
        try:
            ray.get(ref)
        except ActorUnavailableError:
            time.sleep(0.5)  # still restarting: ask again shortly
            probe(idx)
            return
        except RayActorError as exc:
            alive.discard(idx)
            restarting.discard(idx)
            log.error("actor %d is gone for good (%s); removed from the pool", idx, type(exc).__name__)
            return
        restarting.discard(idx)
        log.info("actor %d is back after a restart", idx)

    try:
        submit()
        while in_flight or (queue_ and probes):
            ready, _ = ray.wait(list(in_flight) + list(probes), num_returns=1, timeout=STATUS_POLL_S)
            for ref in ready:
                if ref in probes:
                    probe_answered(ref, probes.pop(ref))
                    continue
                task, idx, _ = in_flight.pop(ref)
                load[idx] -= 1
                try:
                    result: ShardResult = ray.get(ref)
                except RayActorError as exc:
                    actor_lost(idx, task, exc)
                    continue
                except RayTaskError as exc:
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    retry_or_fail(task, f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
                    continue
                if budget is not None:
                    budget -= result.samples_read
                results.append(result)
                if result.shard_error:
                    summary.shard_errors[result.url] = result.shard_error
                    log.warning("shard %s: %s", result.url, result.shard_error)
                progress.shard_done(result)
            if not alive and (queue_ or in_flight):
                raise JobFailed("every actor died repeatedly; see the worker logs (`ray logs`) for the cause")
            if time.perf_counter() - last_poll > STATUS_POLL_S:
                last_poll = time.perf_counter()
                progress.in_flight_samples = _poll_in_flight(actors, alive - restarting)
                progress.refresh()
            submit()
        if queue_:
            raise JobFailed(f"{len(queue_)} shard(s) left with no actor to run them; see the worker logs (`ray logs`)")
    finally:
        progress.close()
    return results


def _poll_in_flight(actors: list, alive: set) -> int:
    import ray

    refs = [actors[i].status.options(concurrency_group="status").remote() for i in sorted(alive)]
    total = 0
    for ref in refs:
        try:
            total += ray.get(ref, timeout=1.0).get("samples", 0)
        except Exception:  # noqa: BLE001 - a busy or restarting actor just does not report this round
            pass
    return total


def run_job(config: JobConfig) -> RunSummary:
    """Runs the caching job to completion; raises ConfigError/InputError/StorageError before any work."""
    started = time.time()
    t0 = time.perf_counter()
    config.validate()
    store = OutputStore(config.output, config.storage_options)
    if protocol_of(config.output) in ("s3", "s3a"):
        check_reachable(config.output, config.storage_options)
    shards = resolve_shards(list(config.inputs), config.storage_options)
    log.info("%d input shard(s), first %s", len(shards), shards[0].url)
    model = _validate_model(config)
    model_info = _describe(model, config)
    identity = {**config.identity(), "weights": model_info["weights"], "output_size": model_info["output_size"],
                "dim": model_info["dim"]}
    resumed = store.prepare(identity, config.overwrite)
    if config.storage_preset == "lowres" and config.upsampler == "jbu":
        _store_upsampler(model, store)
    del model

    commits = store.commits()
    done = {s.shard_id for s in shards if commits.get(s.shard_id, {}).get("complete")}
    pending = [s for s in shards if s.shard_id not in done]
    summary = RunSummary(output=config.output, shards_total=len(shards), shards_skipped=len(done))
    if resumed:
        log.info("resuming: %d of %d shards are already committed and will be skipped", len(done), len(shards))
    budget = None
    if config.limit is not None:
        budget = config.limit - sum(commits[s]["samples_read"] for s in done)

    preset_info: dict = {}
    if pending and (budget is None or budget > 0):
        init_ray()
        import ray

        actors = _start_actors(config, len(pending))
        try:
            if pca_components(config.storage_preset) is not None and store.read_pca() is None:
                preset_info = _fit_pca(actors[0], config, pending, store)
            results = _schedule(config, actors, pending, budget, summary)
            summary.processed_ok = sum(r.ok for r in results)
        finally:
            for actor in actors:
                ray.kill(actor)

    commits = store.commits()
    committed = [commits[s.shard_id] for s in shards if s.shard_id in commits]
    tables = [store.read_part(c["part"]) for c in committed]
    table = pa.concat_tables(tables) if tables else manifest.to_table([])
    store.write_manifest(table)
    for c in committed:
        if c.get("shard_error"):
            summary.shard_errors[c["url"]] = c["shard_error"]
    statuses = table.column("status").to_pylist()
    summary.ok = statuses.count("ok")
    summary.errors = statuses.count("error")
    summary.samples_read = len(statuses)
    summary.shards_done = len(committed)
    summary.seconds = time.perf_counter() - t0
    if not summary.shards_failed:
        removed = store.remove_unreferenced([c["array_name"] for c in committed], [c["part"] for c in committed])
        if removed:
            log.info("removed %d leftover objects of failed attempts", removed)
    summary.run = {
        "settings": identity, "model": model_info,
        "storage": {"preset": config.storage_preset, **preset_info,
                    "error_bound": error_bound(config.storage_preset)}, "versions": _versions(),
        "flags": {k: v for k, v in vars(config).items() if k not in ("storage_options",)},
        "counts": {"shards": len(shards), "shards_committed": len(committed), "shards_skipped_resumed": len(done),
                   "shards_failed": len(summary.shards_failed), "samples": summary.samples_read, "ok": summary.ok,
                   "errors": summary.errors, "ok_this_run": summary.processed_ok},
        "shard_errors": summary.shard_errors, "failed_shards": summary.shards_failed,
        "timings": {"started": started, "finished": time.time(), "elapsed_s": round(summary.seconds, 3),
                    "images_per_s": round(summary.images_per_second, 3),
                    "compute_s": round(sum(c.get("compute_seconds", 0) for c in committed), 3)},
        "manifest": MANIFEST_NAME,
    }
    store.put_json(RUN_NAME, summary.run)
    if config.previews and summary.ok:
        _write_previews(config, store)
    if summary.shards_failed:
        raise JobFailed(f"{len(summary.shards_failed)} shard(s) failed after {config.max_attempts} attempts, e.g. "
                        f"{summary.shards_failed[0]}; the manifest covers the {len(committed)} committed shards. "
                        "Rerun the same command to retry the rest.")
    return summary
