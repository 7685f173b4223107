"""An S3 server on 127.0.0.1 that counts the requests it answers, by kind (test and benchmark infrastructure).

A moto server (the real S3 API, in memory) behind a WSGI layer that records each request as
`(operation, object kind)`: the operation is GET, HEAD, PUT, DELETE, LIST (a bucket listing) or
BATCH_DELETE; the object kind says which part of a caching job's output the key is (`zarr.json`,
`chunk`, `part`, `commit`, ...). `counts()` returns a snapshot; subtracting two snapshots gives what
happened in between, so a test or benchmark can say how many round trips one shard costs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from urllib.parse import parse_qs, unquote

OBJECT_KINDS = (
    ("_pipeline/commits/", "commit"),
    ("_pipeline/parts/", "part"),
    ("_pipeline/lease.json", "lease"),
    ("_pipeline/job.json", "job"),
    ("manifest.parquet", "manifest"),
    ("run.json", "run"),
)


def object_kind(key: str) -> str:
    """Which part of a caching job's output an object key is (or "tar", "other")."""
    for marker, kind in OBJECT_KINDS:
        if marker in key:
            return kind
    if key.endswith("zarr.json"):
        return "zarr.json"
    if "/c/" in key or key.endswith("/c"):
        return "chunk"
    if key.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    if key.endswith("index.json"):
        return "index"
    return "other"


def request_kind(method: str, path: str, query: str) -> tuple[str, str]:
    """(operation, object kind) of one path-style S3 request."""
    bucket, _, key = unquote(path).lstrip("/").partition("/")
    params = parse_qs(query, keep_blank_values=True)
    if method == "POST" and "delete" in params:
        return "BATCH_DELETE", "objects"
    if not key:
        if method == "GET" and ("list-type" in params or "prefix" in params or "delimiter" in params or not params):
            prefix = params.get("prefix", [""])[0]
            return "LIST", object_kind(prefix) if prefix else "bucket"
        return method, "bucket"
    if "uploads" in params or "uploadId" in params:
        return f"{method}_MULTIPART", object_kind(key)
    return method, object_kind(key)


class CountingS3Server:
    """A moto S3 server on 127.0.0.1:`port` that counts requests by (operation, object kind)."""

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self._counts: Counter = Counter()
        self._lock = threading.Lock()
        self._server = None
        self._thread: threading.Thread | None = None

    def _app(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        moto = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            kind = request_kind(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"),
                                environ.get("QUERY_STRING", ""))
            with self._lock:
                self._counts[kind] += 1
            return moto(environ, start_response)

        return counting

    def start(self) -> "CountingS3Server":
        from moto.moto_server.werkzeug_app import MotoRequestHandler
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = make_server("127.0.0.1", self.port, self._app(), threaded=True,
                                   request_handler=MotoRequestHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="counting-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()

    def counts(self) -> Counter:
        """A snapshot of the requests answered so far, by (operation, object kind)."""
        with self._lock:
            return Counter(self._counts)


def difference(after: Counter, before: Counter) -> dict[str, int]:
    """Requests between two snapshots as {"OPERATION object-kind": count}, zero entries left out."""
    out = {f"{op} {kind}": after[(op, kind)] - before.get((op, kind), 0) for op, kind in after}
    return {k: v for k, v in sorted(out.items()) if v}
