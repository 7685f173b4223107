"""Joining Ray: the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else a local loopback-only one."""

from __future__ import annotations

import json
import logging
import os

from pipeline.storage.credentials import is_secret_env_var, public_env

log = logging.getLogger(__name__)


def init_ray(address: str | None = None) -> None:
    """Connects to `address` (default: RAY_ADDRESS) or starts a local instance; a no-op if Ray is up.

    A local instance keeps to the loopback interface: a single-machine run has no reason to listen on
    or talk over the network (Ray otherwise picks the machine's external address). Workers get this
    process's public storage variables (endpoint, region, profile, checksums) in the job's runtime
    environment; credentials never go there (Ray shows runtime environments to anyone who can reach its
    dashboard or state API): they travel masked, see `pipeline.storage.credentials.for_workers`.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's switch for loopback-only nodes
    import ray

    if ray.is_initialized():
        return
    env = _worker_runtime_env()
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        log.info("starting a local Ray instance")
        ray.init(include_dashboard=False, runtime_env=env, log_to_driver=True)


def worker_runtime_env(taken: set[str] | frozenset[str] = frozenset()) -> dict | None:
    """The runtime environment every worker gets: this process's public storage variables, minus `taken`."""
    env = {k: v for k, v in public_env().items() if k not in taken}
    return {"env_vars": env} if env else None


def _worker_runtime_env() -> dict | None:
    """`worker_runtime_env` minus the variables a `ray job submit --runtime-env` already sets (Ray refuses to
    merge a driver's env var into the job's when both name it); warns when that runtime env holds credentials."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    taken = set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    exposed = sorted(k for k in taken if is_secret_env_var(k))
    if exposed:
        log.warning("the job's runtime environment sets %s: Ray shows runtime environments in its dashboard, "
                    "state API and logs; start the nodes with the keys (or an instance role) instead, or pass "
                    "--storage-options @file.json (README: Credentials)", ", ".join(exposed))
    return worker_runtime_env(taken)
