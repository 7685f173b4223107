"""One output, one owner: the run lease on local disk and on the S3 server (conditional create / replace)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from pipeline.caching.driver import run_job
from pipeline.caching.lease import (
    LeaseLost,
    LeaseRecord,
    OutputLease,
    OutputLeased,
    _Backend,
)
from pipeline.storage.filesystems import filesystem

from .test_job import job_config


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out.zarr")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out.zarr"


def _foreign_record(host: str = "other-host.example", pid: int = 4242, age_s: float = 0.0, ttl_s: float = 300.0
                    ) -> dict:
    now = time.time()
    return LeaseRecord("foreign0run", host, pid, now - age_s - 10, now - age_s, ttl_s).__dict__


def _plant(output: str, record: dict) -> None:
    """A lease written by some other driver."""
    backend = OutputLease(output)._backend
    assert backend.create(record) is not None


def test_second_driver_is_refused_while_the_first_holds_the_lease(output):
    first = OutputLease(output, ttl_s=60).acquire()
    try:
        with pytest.raises(OutputLeased, match=f"run {first.holder} on host {socket.gethostname()}"):
            OutputLease(output, ttl_s=60).acquire()
    finally:
        first.release()
    second = OutputLease(output, ttl_s=60).acquire()  # free again once released
    second.release()
    fs, path = filesystem(f"{output}/_pipeline/lease.json")
    assert not fs.exists(path)  # released means deleted


def test_a_stale_lease_is_taken_over_and_its_holder_learns_it_lost(output):
    _plant(output, _foreign_record(age_s=120, ttl_s=30))  # heartbeat two minutes old, ttl 30 s
    taker = OutputLease(output, ttl_s=0.4).acquire()
    try:
        content, _ = taker._backend.read()
        assert content["holder"] == taker.holder
        # Another run now takes the lease from `taker` (as if taker had stalled): its heartbeat must notice.
        current = taker._backend.read()
        assert taker._backend.replace(_foreign_record(), current[1]) is not None
        deadline = time.time() + 10
        while taker.lost is None and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(LeaseLost, match="taken over by another run"):
            taker.check()
    finally:
        taker.release()
    content, _ = _Backend(f"{output}/_pipeline/lease.json", None).read()
    assert content["holder"] == "foreign0run"  # a run that lost its lease does not delete the new holder's


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(output):
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    _plant(output, _foreign_record(host=socket.gethostname(), pid=dead_pid))  # fresh heartbeat, dead process
    lease = OutputLease(output, ttl_s=60).acquire()
    lease.release()


def test_a_live_foreign_lease_is_not_taken_over(output):
    _plant(output, _foreign_record(host="other-host.example", age_s=5, ttl_s=300))
    with pytest.raises(OutputLeased, match="other-host.example .pid 4242.*last heartbeat 5 s ago"):
        OutputLease(output, ttl_s=60).acquire()


def test_the_job_refuses_a_leased_output_before_any_work(ray_local, photo_shards, output):
    _plant(output, _foreign_record())
    with pytest.raises(OutputLeased, match="is being written by another run"):
        run_job(job_config([f"{photo_shards}/photos-000000.tar"], output))
    fs, path = filesystem(output)
    assert [p.rsplit("/", 1)[-1] for p in fs.find(path)] == ["lease.json"]  # nothing else was written


def test_the_job_holds_the_lease_while_it_runs_and_releases_it(ray_local, photo_shards, tmp_path):
    out = tmp_path / "o.zarr"
    seen = []
    import pipeline.caching.driver as driver

    original = driver.execute

    def spy(run, summary):
        seen.append(json.loads((out / "_pipeline" / "lease.json").read_text())["holder"])
        return original(run, summary)

    driver.execute = spy
    try:
        summary = run_job(job_config([f"{photo_shards}/photos-000000.tar"], out, overwrite=True))
    finally:
        driver.execute = original
    assert summary.ok == 3 and len(seen) == 1
    assert not (out / "_pipeline" / "lease.json").exists()
    # --overwrite of a finished run works under the lease and keeps nothing of the old run
    summary = run_job(job_config([f"{photo_shards}/photos-000000.tar"], out, overwrite=True, image_size=32))
    assert summary.shards_skipped == 0 and summary.ok == 3
