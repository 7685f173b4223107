"""Prints, as JSON, what Ray shows about a running cluster: actors, tasks and jobs with details (the state API
behind `ray list ... --detail`) and the dashboard's Ray Train runs (with their loop configs, shown when the
drivers ran with RAY_TRAIN_ENABLE_STATE_TRACKING=1). Run in the cluster's (token) environment:

    python -m tests.ray_state http://127.0.0.1:8265
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import urllib.request
from pathlib import Path


def dashboard_get(address: str, route: str) -> object:
    """GET a dashboard route with the cluster's token; the error text when the route answers with one."""
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(address + route, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except Exception as exc:  # noqa: BLE001 - recorded in the dump, which the caller searches
        return f"{type(exc).__name__}: {exc}"


def main(address: str) -> None:
    from ray.util.state import list_actors, list_jobs, list_tasks

    out: dict[str, object] = {}
    for name, listing in (("actors", list_actors), ("tasks", list_tasks), ("jobs", list_jobs)):
        rows = listing(address=address, detail=True, limit=10_000, raise_on_missing_output=False)
        out[name] = [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in rows]
    out["train_runs"] = dashboard_get(address, "/api/train/v2/runs/v1")  # needs RAY_TRAIN_ENABLE_STATE_TRACKING=1
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
