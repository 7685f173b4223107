"""One output, one owner: a lease object `<output>/_pipeline/lease.json` held by the driver for the whole run.

A second driver started on an output that a live run holds is refused with a message naming the holder.
The lease is created atomically (S3 conditional create `If-None-Match: *`, exclusive create on local disk)
and renewed by a heartbeat thread (S3: a conditional overwrite `If-Match: <our ETag>`, so a driver that lost
its lease notices instead of overwriting its successor). A lease whose heartbeat is older than its time to
live is stale and is taken over the same compare-and-swap way, as is one held by a process that no longer
exists on this very host (a rerun after a crash need not wait for the expiry).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.caching.output_store import LEASE_FILE, PIPELINE_DIR
from pipeline.options import ConfigError
from pipeline.storage.filesystems import filesystem, join, protocol_of

log = logging.getLogger(__name__)


class OutputLeased(ConfigError):
    """Another live run holds the output."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it looked stale to another driver): stop writing."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds."""

    holder: str  # random id of the owning run
    host: str
    pid: int
    started: float
    heartbeat: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        return now - self.heartbeat > self.ttl_s

    def holder_is_gone(self) -> bool:
        """True when the holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def describe(self, now: float) -> str:
        return (f"run {self.holder} on host {self.host} (pid {self.pid}), started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}, last heartbeat "
                f"{now - self.heartbeat:.0f} s ago (stale after {self.ttl_s:.0f} s)")


class _Backend:
    """Compare-and-swap on one object: create if absent, replace if unchanged, read with a version tag."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None):
        self.url = url
        self.fs, self.path = filesystem(url, storage_options)
        self.local = protocol_of(url) == "file"
        self.s3 = protocol_of(url) in ("s3", "s3a")

    def read(self) -> tuple[dict, str] | None:
        """(content, version tag) or None when absent."""
        if self.local:
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            return json.loads(data), data.decode()
        if self.s3:
            try:
                data, etag = _s3_get(self.fs, self.path)
            except FileNotFoundError:
                return None
            return json.loads(data), etag
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return json.loads(data), data.decode()

    def create(self, content: dict) -> str | None:
        """Writes `content` if the object does not exist; its version tag, or None when it existed."""
        data = json.dumps(content).encode()
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                with open(self.path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return None
            return data.decode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001 - botocore/s3fs map 412 to different types
                if _precondition_failed(exc):
                    return None
                raise
            self.fs.invalidate_cache(self.path)
            return out["ETag"]
        if self.fs.exists(self.path):  # no conditional create on this protocol: best effort
            return None
        self.fs.pipe_file(self.path, data)
        return data.decode()

    def replace(self, content: dict, expected: str) -> str | None:
        """Overwrites the object if it still has version `expected`; the new tag, or None when it changed."""
        data = json.dumps(content).encode()
        if self.s3:
            bucket, key, _ = self.fs.split_path(self.path)
            try:
                out = self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=expected)
            except Exception as exc:  # noqa: BLE001
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return None
                raise
            self.fs.invalidate_cache(self.path)
            return out["ETag"]
        if self.local:
            # Move the expected version aside atomically: of two drivers racing, only one rename succeeds.
            aside = f"{self.path}.{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return None
            with open(aside, "rb") as f:
                if f.read().decode() != expected:  # changed under us: put it back, we lost
                    os.rename(aside, self.path)
                    return None
            os.unlink(aside)
            return self.create(content)
        current = self.read()
        if current is None or current[1] != expected:
            return None
        self.fs.pipe_file(self.path, data)
        return data.decode()

    def delete(self) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    """(bytes, ETag) of one object in one request, so the content and its version tag always agree."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        out = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with out["Body"] as body:
            return await body.read(), out["ETag"]

    return sync(fs.loop, get)


def _precondition_failed(exc: BaseException) -> bool:
    """An HTTP 412 of a conditional write (s3fs translates it to FileExistsError)."""
    if isinstance(exc, FileExistsError):
        return True
    text = f"{type(exc).__name__} {exc}".lower().replace("-", "")
    return "precondition" in text or " 412" in text


class OutputLease:
    """The run's hold on its output; `acquire()` or refuse, `release()` at the end (a context manager too)."""

    def __init__(self, output: str, storage_options: Mapping[str, Any] | None = None, ttl_s: float = 300.0):
        if ttl_s <= 0:
            raise ConfigError(f"--lease-ttl must be > 0 seconds, got {ttl_s}")
        self.output = output
        self.url = join(output, PIPELINE_DIR, LEASE_FILE)
        self.ttl_s = ttl_s
        self.holder = uuid.uuid4().hex[:12]
        self._backend = _Backend(self.url, storage_options)
        self._tag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    def _record(self) -> dict:
        now = time.time()
        return asdict(LeaseRecord(self.holder, socket.gethostname(), os.getpid(), self._started, now, self.ttl_s))

    def acquire(self) -> "OutputLease":
        """Takes the lease, taking over a stale one; OutputLeased when a live run holds it."""
        self._started = time.time()
        for _ in range(5):
            tag = self._backend.create(self._record())
            if tag is not None:
                self._tag = tag
                break
            current = self._backend.read()
            if current is None:
                continue  # released between our create and read: try again
            content, tag = current
            other = LeaseRecord(**content)
            now = time.time()
            if not (other.expired(now) or other.holder_is_gone()):
                raise OutputLeased(f"{self.output} is being written by another run: {other.describe(now)}. Wait for "
                                   "it to finish, or, if that run is dead, rerun after its lease expires.")
            reason = "its process is gone" if other.holder_is_gone() else "its heartbeat expired"
            new_tag = self._backend.replace(self._record(), tag)
            if new_tag is not None:
                log.warning("took over the lease of %s from %s: %s", self.output, other.describe(now), reason)
                self._tag = new_tag
                break
        else:
            raise OutputLeased(f"could not take the lease of {self.output}: other drivers keep taking it")
        self._thread = threading.Thread(target=self._heartbeat, name="output-lease", daemon=True)
        self._thread.start()
        log.info("holding the lease of %s as run %s", self.output, self.holder)
        return self

    def _heartbeat(self) -> None:
        interval = max(self.ttl_s / 4, 0.05)
        while not self._stop.wait(interval):
            try:
                tag = self._backend.replace(self._record(), self._tag)
            except Exception as exc:  # noqa: BLE001 - a passing storage error: the next beat retries
                log.warning("lease heartbeat for %s failed (%s: %s); retrying", self.output, type(exc).__name__, exc)
                continue
            if tag is None:
                self.lost = LeaseLost(f"the lease of {self.output} was taken over by another run (this run's "
                                      f"heartbeat was older than {self.ttl_s:.0f} s); stop writing")
                log.error("%s", self.lost)
                return
            self._tag = tag

    def check(self) -> None:
        """Raises LeaseLost once another run has taken the output over."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.lost is None and self._tag is not None:
            current = self._backend.read()
            if current is not None and current[0].get("holder") == self.holder:
                self._backend.delete()
        self._tag = None

    def __enter__(self) -> "OutputLease":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
