"""The caching job's Ray worker pool: one `ShardWorker` actor per GPU (or CPU slot), restarted by Ray on death.

Each actor loads the model once (Ray's batch-inference pattern) and works on up to `IN_FLIGHT_PER_ACTOR`
shards at once in its `compute` concurrency group; a one-slot `status` group answers readiness probes and
progress reports even while both compute slots are busy. An actor Ray gave a GPU that torch cannot see
computes on CPU and says so once. When the job sized the pool itself (no --actors) and the cluster gains
GPUs while it runs, `more_actors` starts actors for them.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace

from pipeline.caching.job_config import JobConfig
from pipeline.caching.output_store import OutputStore
from pipeline.caching.presets import pca_components
from pipeline.caching.shard_processor import ShardProcessor, ShardResult, ShardTask
from pipeline.ray_runtime import worker_runtime_env
from pipeline.storage.credentials import for_workers
from pipeline.storage.shards import Shard

log = logging.getLogger(__name__)
IN_FLIGHT_PER_ACTOR = 2  # shards per actor at once: one computes while the other streams in or drains


def compute_device(assigned_gpus: list) -> str | None:
    """The device of an actor Ray gave `assigned_gpus`: cuda if torch can use them; cpu, with one warning, if it
    cannot see them (no driver, a CPU-only torch build, scheduling-only GPU resources); None (torch's choice)
    when it was given none."""
    import torch

    if not assigned_gpus:
        return None
    if torch.cuda.is_available():
        return "cuda"
    log.warning("this worker was given GPU %s by Ray, but torch sees no CUDA device (CUDA_VISIBLE_DEVICES=%r, torch "
                "%s, built for CUDA %s): computing on CPU", ",".join(map(str, assigned_gpus)),
                os.environ.get("CUDA_VISIBLE_DEVICES"), torch.__version__, torch.version.cuda)
    return "cpu"


class ShardWorker:
    """Ray actor: one ShardProcessor (model loaded once), called once per shard."""

    def __init__(self, config: JobConfig, torch_threads: int | None):
        import ray

        context = ray.get_runtime_context()
        worker = {"node": context.get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
        self.processor = ShardProcessor(config, device=compute_device(ray.get_gpu_ids()), torch_threads=torch_threads,
                                        worker=worker)
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
        import torch

        return {"host": socket.gethostname(), "pid": os.getpid(), "device": str(self.processor.device),
                "torch_threads": torch.get_num_threads()}


def actor_layout(config: JobConfig) -> tuple[int, float, float]:
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


def _new_actors(config: JobConfig, count: int, gpus: float, cpus: float) -> list:
    """`count` actors with these resources. They get the public storage variables in their runtime environment
    and credentials only inside their config's storage options, masked and by object reference
    (`credentials.for_workers`)."""
    import ray

    remote_cls = ray.remote(concurrency_groups={"compute": IN_FLIGHT_PER_ACTOR, "status": 1})(ShardWorker)
    actor_opts = dict(num_gpus=gpus, num_cpus=cpus, max_restarts=config.max_actor_restarts, max_task_retries=0,
                      runtime_env=worker_runtime_env())
    shipped = replace(config, storage_options=for_workers(config.storage_options))
    return [remote_cls.options(**actor_opts).remote(shipped, int(cpus)) for _ in range(count)]


def start_actors(config: JobConfig, shards_to_do: int) -> list:
    """The pool: each actor pinned to its GPU(s) (or CPUs), torch threads sized to its CPUs."""
    n_actors, gpus, cpus = actor_layout(config)
    return _new_actors(config, min(n_actors, max(1, shards_to_do)), gpus, cpus)


def more_actors(config: JobConfig, live: int, shards_left: int) -> list:
    """Actors for GPUs the cluster gained since the pool was sized: up to one per `--gpus-per-actor` GPUs,
    never more actors than shards left; none when --actors fixed the pool or the pool runs on CPUs."""
    import ray

    if config.actors or config.gpus_per_actor <= 0:
        return []
    gpus = ray.cluster_resources().get("GPU", 0.0)
    if gpus <= 0:
        return []
    extra = min(int(gpus // config.gpus_per_actor), shards_left) - live
    if extra <= 0:
        return []
    _, gpus_each, cpus_each = actor_layout(config)
    log.info("the cluster has %.0f GPU(s) for %d actor(s): starting %d more", gpus, live, extra)
    return _new_actors(config, extra, gpus_each, cpus_each)


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def fit_pca_on(actor, config: JobConfig, shards: list[Shard], store: OutputStore) -> dict:
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
