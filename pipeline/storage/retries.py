"""Request-level retries on object storage: the policy every S3 client gets, and a count of what it retried.

Two layers retry a failed S3 request, and this module configures both (through `resolve_options`):

- botocore re-sends a request that failed before its response was complete: refused or reset
  connections, a connection closed before or during a response that is read whole (listings, HEAD,
  PUT), HTTP 500/502/503/504 and throttling (503 SlowDown). Up to `REQUEST_ATTEMPTS` attempts with
  "legacy" exponential backoff and full jitter (a random fraction of 1, 2, 4, 8 s): about 7 s on
  average, at most 15 s, before it gives up. Legacy rather than "standard" mode because standard
  mode's client-wide retry quota stops retrying altogether under a sustained fault rate.
- s3fs (its own default: 5 calls per operation, 0.1-0.8 s apart) re-issues a whole GET when the object's
  body breaks off mid-stream, which botocore cannot retry because the body is read after the call
  returns; a cut body is detected by aiohttp (fewer bytes than Content-Length), never returned as data.
  s3fs also repeats an operation whose botocore attempts all ended in a closed connection or SlowDown.

aiohttp's own immediate, invisible re-send of a request whose kept-alive connection failed is switched
off, so every re-sent request goes through botocore's backoff. Every retry is counted per process by
request target (`RETRIES`: bucket/key and query), so the caching job can attribute them to the shard
whose objects they touched. What is left after both layers is a storage outage, for
`is_storage_unavailable` to recognise and the shard scheduler to wait out.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections import Counter
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

import aiohttp
from aiobotocore.httpsession import AIOHTTPSession
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, IncompleteReadError
from botocore.exceptions import ConnectionError as BotoConnectionError

REQUEST_ATTEMPTS = 5  # botocore attempts per request, the first included

# Error codes and statuses of an object store that is overloaded or failing, not of a bad request.
UNAVAILABLE_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                     "ThrottlingException", "RequestLimitExceeded", "BandwidthLimitExceeded"}
UNAVAILABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EPIPE,
                      errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EBUSY, errno.EREMOTEIO}


class StorageUnavailableError(RuntimeError):
    """Object storage could not be reached (or kept failing) after every request-level retry."""

    def __init__(self, endpoint: str, detail: str):
        super().__init__(endpoint, detail)
        self.endpoint, self.detail = endpoint, detail

    def __str__(self) -> str:
        return f"storage at {self.endpoint} unavailable: {self.detail}"


def request_target(url: str) -> str:
    """What a request names: bucket/key, plus its query (a listing's prefix), unquoted."""
    parts = urlsplit(url)
    target = unquote(parts.path).lstrip("/")
    return f"{target}?{unquote(parts.query)}" if parts.query else target


class RetryCounter:
    """Retried requests of this process, by request target (`request_target`), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: Counter[str] = Counter()

    def record(self, url: str) -> None:
        target = request_target(url)
        with self._lock:
            self._by_path[target] += 1

    def take(self, markers: Iterable[str]) -> int:
        """Removes and returns the retries of request targets containing any of `markers`."""
        markers = [m for m in markers if m]
        with self._lock:
            hits = [p for p in self._by_path if any(m in p for m in markers)]
            return sum(self._by_path.pop(p) for p in hits)

    def take_all(self) -> int:
        with self._lock:
            total = sum(self._by_path.values())
            self._by_path.clear()
            return total


RETRIES = RetryCounter()


def _attempt(request) -> int:
    """The attempt number botocore writes into each request's `amz-sdk-request` header."""
    header = request.headers.get("amz-sdk-request") or ""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == "attempt" and value.isdigit():
            return int(value)
    return 1


class _CountedContent:
    """An aiohttp response stream that counts a body cut off mid-read before re-raising the error."""

    def __init__(self, content, url: str):
        self._content, self._url = content, url

    async def read(self, n: int = -1) -> bytes:
        try:
            return await self._content.read(n)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, asyncio.TimeoutError):
            RETRIES.record(self._url)  # s3fs re-issues the GET
            raise

    def __getattr__(self, name):
        return getattr(self._content, name)


class _CountedResponse:
    """An aiohttp response whose body stream is a `_CountedContent`."""

    def __init__(self, response, url: str):
        self._response = response
        self.content = _CountedContent(response.content, url)

    def __getattr__(self, name):
        return getattr(self._response, name)


class CountingHTTPSession(AIOHTTPSession):
    """aiobotocore's HTTP session, counting botocore's re-sent requests and streamed bodies that broke off.

    aiohttp's own silent re-send of an idempotent request whose connection failed is switched off, so every
    retry goes through botocore: backed off, and counted.
    """

    async def _get_session(self, proxy_url):
        session = await super()._get_session(proxy_url)
        session._retry_connection = False
        return session

    async def send(self, request):
        if _attempt(request) > 1:
            RETRIES.record(request.url)
        response = await super().send(request)
        if getattr(request, "stream_output", False) and response.status_code < 300:
            response.raw = _CountedResponse(response.raw, request.url)
        return response


def s3_retry_options() -> dict:
    """botocore client settings (s3fs `config_kwargs`) of the policy above; resolve_options puts the user's
    own keys over them."""
    return {"retries": {"mode": "legacy", "total_max_attempts": REQUEST_ATTEMPTS},
            "http_session_cls": CountingHTTPSession}


def _register_with_s3fs() -> None:
    """A body shorter than its Content-Length that ends without a transport error is also re-read."""
    import s3fs.core

    if IncompleteReadError not in s3fs.core.S3_RETRYABLE_ERRORS:
        s3fs.core.add_retryable_error(IncompleteReadError)


_register_with_s3fs()


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_storage_unavailable(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) says the store was unreachable, cut connections or answered 5xx:
    transient by nature, so the work is worth repeating once the store answers again."""
    for err in _causes(exc):
        if isinstance(err, ClientError):
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if err.response.get("Error", {}).get("Code") in UNAVAILABLE_CODES or status >= 500:
                return True
            return False  # a definite answer from the store (403, 404, ...): not an outage
        if isinstance(err, (BotoConnectionError, HTTPClientError, IncompleteReadError, aiohttp.ClientPayloadError,
                            aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, OSError) and err.errno in UNAVAILABLE_ERRNOS:
            return True
        if isinstance(err, BotoCoreError):
            return False
    return False


def endpoint_of(exc: BaseException, default: str) -> str:
    """scheme://host:port of the request that failed, when the error names it; else `default`."""
    for err in _causes(exc):
        url = getattr(err, "kwargs", {}).get("endpoint_url") if isinstance(err, BotoCoreError) else None
        if url:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.netloc}"
    return default
