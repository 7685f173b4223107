"""A multi-node Ray cluster on 127.0.0.1 (`ray.cluster_utils.Cluster`) that loses and gains nodes while the caching
job runs; started in its own process by tests/test_cluster_faults.py, so no other Ray shares the process.

    python -m tests.cluster_scenario --input PATTERN --output DIR --report FILE

The head node has no resources (like cluster.yaml's); each worker node declares one CPU and one GPU (a
scheduling resource: on a machine without a GPU torch sees none), so the job places one actor per worker
node. Scenario:

1. the job starts on one worker node (A), one actor;
2. after A's first commit its actor is frozen (SIGSTOP: a machine about to be preempted), holding its shards,
   and a second worker node (B) joins: the job grows its pool onto B's GPU;
3. once B has committed a shard, A is removed without warning (its actor killed, then its raylet): the shards
   A held are redone on B, and Ray cannot restart A's actor (no free GPU); B finishes the job;
4. the report (JSON) names the nodes, the cluster's temp dir (worker logs) and the job's outcome.

Freezing A makes the order of events certain on a machine of any speed: nothing A holds can finish before
B has joined and A is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from tests.conftest import free_port


def _worker_node_args(temp_dir: str) -> dict:
    return dict(num_cpus=1, num_gpus=1, node_ip_address="127.0.0.1", temp_dir=temp_dir,
                object_store_memory=80 * 2**20, dashboard_agent_listen_port=free_port(),
                runtime_env_agent_port=free_port(), metrics_export_port=free_port(), metrics_agent_port=free_port())


def _workers(output: Path) -> dict[str, int]:
    """node -> actor process id, of the workers that committed shards so far."""
    found = {}
    for path in (output / "_pipeline" / "commits").glob("*.json"):
        try:
            worker = json.loads(path.read_text())["worker"]
        except (ValueError, KeyError, OSError):
            continue  # being written
        found[worker["node"]] = worker["pid"]
    return found


def _wait(condition, timeout: float = 300) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--report", required=True)
    args = parser.parse_args(argv)

    import logging

    import ray
    from ray.cluster_utils import Cluster

    from pipeline.caching.driver import run_job
    from pipeline.ray_runtime import init_ray
    from tests.test_job import job_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    os.environ["RAY_TMPDIR"] = root  # the cluster's address file stays out of the shared /tmp/ray
    temp_dir = os.path.join(root, "ray")
    os.makedirs(temp_dir)
    head_args = dict(num_cpus=0, num_gpus=0, node_ip_address="127.0.0.1", temp_dir=temp_dir, include_dashboard=False,
                     gcs_server_port=free_port(), object_store_memory=80 * 2**20, ray_client_server_port=free_port(),
                     dashboard_agent_listen_port=free_port(), runtime_env_agent_port=free_port(),
                     metrics_export_port=free_port(), metrics_agent_port=free_port())
    # a lost node is declared dead after ~3 s of failed health checks (Ray's default waits much longer)
    head_args["_system_config"] = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                                   "health_check_timeout_ms": 1000}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    output = Path(args.output)
    events: dict = {"temp_dir": temp_dir, "root": root}
    outcome: dict = {}

    def job() -> None:
        try:
            # float32: on a machine with a real GPU (which both "GPU 0"s then are) it computes what the CPU does
            config = job_config([args.input], output, batch_size=1, cpus_per_actor=1, previews=0, dtype="float32")
            summary = run_job(config)
            outcome["summary"] = {"ok": summary.ok, "errors": summary.errors, "shards_done": summary.shards_done,
                                  "shards_failed": summary.shards_failed, "seconds": summary.seconds}
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(exc)

    try:
        node_a = cluster.add_node(**_worker_node_args(temp_dir))
        events["node_a"] = node_a.node_id
        init_ray(cluster.address)
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        # Ray starts and stops nodes from the main thread only: the churn happens here, the job runs beside it
        _wait(lambda: node_a.node_id in _workers(output) or not thread.is_alive())
        a_actor = _workers(output).get(node_a.node_id)
        events["a_committed"], events["a_pid"] = a_actor is not None, a_actor
        if a_actor is not None:
            os.kill(a_actor, signal.SIGSTOP)
        node_b = cluster.add_node(**_worker_node_args(temp_dir))
        events["node_b"] = node_b.node_id
        _wait(lambda: node_b.node_id in _workers(output) or not thread.is_alive())
        events["b_committed"] = node_b.node_id in _workers(output)
        events["job_running_at_removal"] = thread.is_alive()
        if a_actor is not None:
            os.kill(a_actor, signal.SIGKILL)
        cluster.remove_node(node_a, allow_graceful=False)
        thread.join(timeout=400)
        events.update(outcome)
    finally:
        Path(args.report).write_text(json.dumps(events, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
