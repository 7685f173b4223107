"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server (test infrastructure).

Each request is forwarded to the upstream server unless the proxy's plan (a script, then a seeded RNG)
picks a fault for it:

    refuse     the connection is reset as it opens, before anything is answered
    drop       the request is read, then the connection is closed without an answer (nothing forwarded)
    reset      reads: the upstream answer's headers and half its body, then a reset; writes: half the
               request body is read, then a reset (nothing forwarded); requests and answers without a
               body pass untouched
    slowdown   HTTP 503 with S3's SlowDown XML error
    internal   HTTP 500 with S3's InternalError XML error

With `keep_alive=False` every answer closes its connection, so each request opens a new one and "refuse"
is a per-request fault. `outage(True)` closes the listening socket and every open connection, so each
connection attempt is refused until `outage(False)` listens again on the same port (`outage_when` starts
one at a chosen request). Every fault is recorded (`faults`), with the request's method class (read or
write) and target, so a test can compare what the client reports with what was done to it.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from pipeline.storage.retries import request_target

KINDS = ("refuse", "drop", "reset", "slowdown", "internal")
READ_METHODS = ("GET", "HEAD")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "expect", "content-length"}

ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
             "<RequestId>fault-proxy</RequestId></Error>")
ERRORS = {"slowdown": (503, "SlowDown", "Please reduce your request rate."),
          "internal": (500, "InternalError", "We encountered an internal error. Please try again.")}


@dataclass
class FaultRecord:
    kind: str
    method: str
    path: str  # bucket/key?query, unquoted (pipeline.storage.retries.request_target)

    @property
    def op(self) -> str:
        return "read" if self.method in READ_METHODS else "write"


@dataclass
class FaultPlan:
    """Per-request fault probabilities (summing to the total fault rate) and the RNG seed; `script` (by "read" /
    "write") lists faults to inflict first, in order, each on the next request of that class it fits (None: let
    one request through)."""

    rates: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.03))
    seed: int = 0
    script: dict[str, list[str | None]] = field(default_factory=dict)


def _abort(sock: socket.socket) -> None:
    """Closes with a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _cut(sock: socket.socket) -> None:
    """Breaks a connection another thread is serving: its blocked read returns, and its close resets."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        self.server.proxy._track(self.connection, False)
        if self.upstream is not None:
            self.upstream.close()
        try:
            super().finish()
        except OSError:
            pass

    def _read_body(self, limit: int | None = None) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
                if limit is not None and len(out) >= limit:
                    return bytes(out)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length if limit is None else min(limit, length))

    def _proxy(self) -> None:
        proxy = self.server.proxy
        path = request_target(self.path)
        proxy.check_trigger(self.command, path)
        if proxy.in_outage:
            _abort(self.connection)
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        kind = proxy.decide(self.command, path,
                            cuttable=self.command == "GET" or (self.command != "HEAD" and length >= 2))
        if kind == "drop":
            self._read_body()
            proxy.record("drop", self.command, path)
            _abort(self.connection)
            self.close_connection = True
            return
        if kind == "reset" and self.command not in READ_METHODS:
            self._read_body(limit=length // 2)
            proxy.record("reset", self.command, path)
            _abort(self.connection)
            self.close_connection = True
            return
        body = self._read_body()
        if kind in ERRORS:
            status, code, message = ERRORS[kind]
            payload = ERROR_XML.format(code=code, message=message).encode()
            self.send_response(status)
            if not proxy.keep_alive:
                self.send_header("Connection", "close")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            proxy.record(kind, self.command, path)
            return
        status, reason, headers, data = self._forward(body)
        if kind == "reset" and len(data) < 2:
            kind = None  # no body to cut
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        if not proxy.keep_alive:
            self.send_header("Connection", "close")
        content_length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length", content_length if self.command == "HEAD" and content_length
                         else str(len(data)))
        self.end_headers()
        if kind == "reset":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            proxy.record("reset", self.command, path)
            _abort(self.connection)
            self.close_connection = True
            return
        if self.command != "HEAD":
            self.wfile.write(data)
        proxy.count_forwarded(self.command, path)

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.server.proxy.upstream, timeout=60)
            try:
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                self.upstream.close()
                self.upstream = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    proxy: "FaultProxy"

    def verify_request(self, request, client_address) -> bool:
        """Refusals happen here, per connection, once its first request line shows what it is for."""
        if self.proxy.in_outage:
            _abort(request)
            return False
        plan = self.proxy.plan
        if plan.rates.get("refuse", 0) <= 0 and not any("refuse" in kinds for kinds in plan.script.values()):
            return True
        try:
            request.settimeout(5)
            first = request.recv(2048, socket.MSG_PEEK)
            request.settimeout(None)
        except OSError:
            return False
        method, _, rest = first.decode("latin-1").partition(" ")
        path = request_target(rest.split(" ", 1)[0])
        if self.proxy.decide(method, path, at_connect=True) == "refuse":
            self.proxy.record("refuse", method, path)
            _abort(request)
            return False
        return True

    def handle_error(self, request, client_address) -> None:  # a client gone mid-request is no news here
        pass

    def shutdown_request(self, request) -> None:
        try:
            request.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.close_request(request)


class FaultProxy:
    """The proxy; `with FaultProxy(upstream_url, plan) as proxy:` serves on `proxy.url`."""

    def __init__(self, upstream_url: str, plan: FaultPlan | None = None, port: int = 0, keep_alive: bool = True):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.keep_alive = keep_alive
        self.plan = plan or FaultPlan(rates={})
        self._rng = random.Random(self.plan.seed)
        self._script = {op: list(kinds) for op, kinds in self.plan.script.items()}
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.faults: list[FaultRecord] = []
        self.log: list[FaultRecord] = []  # every request in arrival order; kind "ok" when it was forwarded
        self.forwarded = 0
        self._armed_when = None  # faults start with the first request this predicate accepts
        self.in_outage = False
        self.outages: list[tuple[float, float | None]] = []  # (start, end) monotonic times
        self._trigger: tuple | None = None
        self._server = self._serve(port)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    # -- serving ---------------------------------------------------------------------------------------------
    def _serve(self, port: int) -> _Server:
        server = _Server(("127.0.0.1", port), _Handler)
        server.proxy = self
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return server

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            for conn in list(self._conns):
                _cut(conn)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- faults ----------------------------------------------------------------------------------------------
    def decide(self, method: str, path: str, at_connect: bool = False, cuttable: bool = True) -> str | None:
        """The fault for one request to `path` (at_connect: for the connection it opens, where only "refuse" applies),
        from the script first, then drawn from the seeded RNG. `cuttable`: it has a body a reset can cut."""
        op = "read" if method in READ_METHODS else "write"
        with self._lock:
            if self._armed_when is not None:
                if not self._armed_when(method, path):
                    return None
                self._armed_when = None
            script = self._script.get(op)
            if script:
                kind = script[0]
                if kind is None:  # a request let through
                    if not at_connect:
                        script.pop(0)
                    return None
                fits = (kind == "refuse") == at_connect and (kind != "reset" or cuttable)
                if fits:
                    script.pop(0)
                    return kind
                if kind == "refuse" or at_connect:
                    return None
            draw = self._rng.random()
        edge = 0.0
        for kind in KINDS:
            edge += self.plan.rates.get(kind, 0.0)
            if draw < edge:
                if (kind == "refuse") != at_connect or (kind == "reset" and not cuttable):
                    return None
                return kind
        return None

    def record(self, kind: str, method: str, path: str) -> None:
        with self._lock:
            self.faults.append(FaultRecord(kind, method, path))
            self.log.append(self.faults[-1])

    def count_forwarded(self, method: str, path: str) -> None:
        with self._lock:
            self.forwarded += 1
            self.log.append(FaultRecord("ok", method, path))

    def arm_when(self, predicate) -> None:
        """No faults until a request for which `predicate(method, path)` holds (that one may get one)."""
        self._armed_when = predicate

    def summary(self) -> dict:
        """Requests answered, faults by kind and by (kind, read/write), and the fault rate."""
        with self._lock:
            faults = list(self.faults)
            forwarded = self.forwarded
        total = forwarded + len(faults)
        return {"requests": total, "forwarded": forwarded, "faults": len(faults),
                "rate": len(faults) / total if total else 0.0,
                "by_kind": dict(Counter(f.kind for f in faults)),
                "by_kind_and_op": {f"{k}/{o}": n for (k, o), n in Counter((f.kind, f.op) for f in faults).items()}}

    # -- outages ---------------------------------------------------------------------------------------------
    def outage_when(self, predicate, seconds: float | None = None) -> None:
        """Starts an outage at the first request for which `predicate(method, path)` holds (that request
        included), ending it `seconds` later (None: it lasts until `outage(False)`)."""
        self._trigger = (predicate, seconds)

    def check_trigger(self, method: str, path: str) -> None:
        with self._lock:
            trigger = self._trigger
            if trigger is None or not trigger[0](method, path):
                return
            self._trigger = None
        self.outage(True)
        if trigger[1] is not None:
            timer = threading.Timer(trigger[1], self.outage, args=(False,))
            timer.daemon = True
            timer.start()

    def outage(self, on: bool) -> None:
        """On: stop listening and reset every open connection (each connect is refused). Off: listen again."""
        if on == self.in_outage:
            return
        if on:
            self.in_outage = True
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                for conn in list(self._conns):
                    _cut(conn)
            self.outages.append((time.monotonic(), None))
        else:
            self._server = self._serve(self.port)
            self.in_outage = False
            self.outages[-1] = (self.outages[-1][0], time.monotonic())
