"""Object-storage plumbing: fsspec filesystems, endpoints from the environment, path joining.

Every URL the pipeline touches (shards, output store, checkpoints) goes through `filesystem()`, so a
local path, `s3://` (AWS or any S3-compatible endpoint) and other fsspec protocols behave the same.
Storage options reach fsspec only through `resolve_options`, which reveals masked credentials
(`pipeline.storage.credentials`) at the last moment.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import fsspec

from pipeline.options import ConfigError
from pipeline.storage.credentials import reveal


class StorageError(ConfigError):
    """Storage that cannot be reached or used (bucket missing, endpoint down, no permission); like every
    ConfigError, its message has credentials masked."""


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def s3_endpoint_from_env() -> str | None:
    for var in ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def resolve_options(url: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Storage options for `url`, as fsspec takes them: the user's with credentials revealed, plus an S3
    endpoint from the environment when they name none.

    S3 clients get the request-retry policy of `pipeline.storage.retries` (the user's own `config_kwargs` keys
    win) and no listing cache: other processes write what this one lists (workers commit shards the driver
    then looks for), so a cached listing would be stale. A custom (non-AWS) S3 endpoint gets checksums
    "when_required": newer botocore defaults add checksum headers that S3-compatible servers often reject.
    """
    opts = reveal(options)
    if url and protocol_of(url) in ("s3", "s3a"):
        from pipeline.storage.retries import s3_retry_options

        policy = s3_retry_options()
        config = {**policy, **(opts.get("config_kwargs") or {})}
        opts.setdefault("use_listings_cache", False)
        client_kwargs = dict(opts.get("client_kwargs") or {})
        endpoint = opts.get("endpoint_url") or client_kwargs.get("endpoint_url") or s3_endpoint_from_env()
        if endpoint:
            opts.setdefault("endpoint_url", endpoint)
            if "amazonaws.com" not in endpoint:
                config.setdefault("request_checksum_calculation", "when_required")
                config.setdefault("response_checksum_validation", "when_required")
        opts["config_kwargs"] = config
    return opts


def endpoint_name(url: str, options: Mapping[str, Any] | None = None) -> str:
    """Where `url`'s storage lives, for messages: the S3 endpoint (or "AWS S3"), else the protocol."""
    if protocol_of(url) in ("s3", "s3a"):
        return resolve_options(url, options).get("endpoint_url") or "AWS S3"
    return f"{protocol_of(url)}://"


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or fsspec URL."""
    return fsspec.core.url_to_fs(url, **resolve_options(url, options))


def put_bytes(url: str, data: bytes, options: Mapping[str, Any] | None = None) -> None:
    """Writes one whole object (a local file: its folder is created) with the storage options every write uses."""
    fs, path = filesystem(url, options)
    if protocol_of(url) == "file":
        fs.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fs.pipe_file(path, data)


def put_json(url: str, payload: Any, options: Mapping[str, Any] | None = None) -> None:
    put_bytes(url, json.dumps(payload, indent=1, default=str).encode(), options)


def join(base: str, *parts: str) -> str:
    """Joins URL/path segments with '/', keeping the protocol."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def check_reachable(url: str, options: Mapping[str, Any] | None = None, must_exist: bool = False) -> None:
    """Fails fast, naming the URL, when its storage cannot be reached (or the object/dir is missing)."""
    try:
        fs, path = filesystem(url, options)
        if must_exist and not fs.exists(path):
            raise FileNotFoundError(f"{url} does not exist")
        if protocol_of(url) in ("s3", "s3a"):
            bucket = path.split("/", 1)[0]
            fs.ls(bucket, refresh=True)  # raises for a missing bucket, bad credentials, dead endpoint
    except FileNotFoundError as exc:
        raise StorageError(f"{url}: not found ({exc}); check the bucket/path name") from None
    except PermissionError as exc:
        raise StorageError(f"{url}: permission denied ({exc}); check the credentials") from None
    except OSError as exc:
        raise StorageError(f"{url}: storage unreachable ({type(exc).__name__}: {exc}); check the endpoint "
                           "(--storage-options or AWS_ENDPOINT_URL) and the network") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are not OSErrors
        raise StorageError(f"{url}: storage unreachable ({type(exc).__name__}: {exc})") from None
