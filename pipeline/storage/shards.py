"""WebDataset shards: resolving input patterns to shard URLs, and streaming a shard's samples.

Shards are read through fsspec (webdataset 1.0.2 cannot open s3:// by itself) and grouped into samples
with webdataset's own key convention (`group_by_keys`). Reading is strict about completeness: a tar whose
end-of-archive marker is missing, or whose sample count disagrees with the shard index written by
`jobs/make_shards.py`, is reported, never silently short.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys

from pipeline.options import ConfigError
from pipeline.storage.filesystems import (
    StorageError,
    check_reachable,
    filesystem,
    protocol_of,
)

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
READ_BLOCK = 8 * 2**20  # readahead per request: a few large sequential GETs per shard


class InputError(ConfigError):
    """Input patterns that resolve to no shard, or to shards that do not exist."""


class TruncatedShardError(RuntimeError):
    """The tar ends early: a permanent defect of the shard, not a passing read error."""

    def __init__(self, url: str, samples_read: int, broken_key: str | None, reason: str):
        self.url, self.samples_read, self.broken_key, self.reason = url, samples_read, broken_key, reason
        super().__init__(f"{url}: truncated tar after {samples_read} samples ({reason})")


@dataclass(frozen=True)
class Shard:
    """One input shard: its URL, a store-safe id, and the sample count its index promises (if any)."""

    url: str
    shard_id: str
    expected_samples: int | None = None
    size: int | None = None  # bytes, when the listing that found the shard said (saves a request per read)


def _stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _with_protocol(fs, path: str, like: str) -> str:
    proto = protocol_of(like)
    return path if proto == "file" else f"{proto}://{path}"


def _read_list_file(url: str, options: Mapping[str, Any] | None) -> list[str]:
    """Shard URLs from a list file (one per line, '#' comments) or a shard index.json."""
    fs, path = filesystem(url, options)
    text = fs.cat_file(path).decode()
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    if url.endswith(".json"):
        entries = [s["name"] for s in json.loads(text).get("shards", [])]
    else:
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [e if ("://" in e or e.startswith("/")) else f"{base}/{e}" for e in entries]


def expand_patterns(patterns: Sequence[str], options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs from brace patterns ({000..123}), globs, list files and plain paths, in order."""
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            fs, path = filesystem(item, options)
            if any(ch in path for ch in "*?["):
                found = sorted(fs.glob(path))
                if not found:
                    raise InputError(f"input pattern {item!r} matches no file")
                urls += [_with_protocol(fs, p, item) for p in found]
            elif not item.endswith(TAR_SUFFIXES) and fs.isfile(path):
                urls += _read_list_file(item, options)
            else:
                urls.append(item)
    seen, unique = set(), []
    for u in urls:
        if u not in seen:
            seen.add(u)
            unique.append(u)
    return unique


def _expected_counts(urls: Sequence[str], options: Mapping[str, Any] | None) -> dict[str, int]:
    """Sample counts from index.json files next to the shards (written by jobs/make_shards.py)."""
    counts: dict[str, int] = {}
    for folder in sorted({u.rsplit("/", 1)[0] for u in urls if "/" in u}):
        index_url = f"{folder}/{INDEX_NAME}"
        fs, path = filesystem(index_url, options)
        try:
            if not fs.exists(path):
                continue
            index = json.loads(fs.cat_file(path))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable shard index %s: %s", index_url, exc)
            continue
        for entry in index.get("shards", []):
            counts[f"{folder}/{entry['name']}"] = int(entry["samples"])
    return counts


LIST_FOLDER_FROM = 8  # inputs in one folder from which listing it beats checking each shard on its own


def _existing(urls: Sequence[str], options: Mapping[str, Any] | None) -> dict[str, int | None]:
    """url -> size of each shard that exists: one listing per folder holding many inputs (a page per
    thousand objects on object storage), one check per shard otherwise."""
    by_folder: dict[str, list[str]] = {}
    for url in urls:
        by_folder.setdefault(url.rsplit("/", 1)[0], []).append(url)
    found: dict[str, int | None] = {}
    for members in by_folder.values():
        fs, first = filesystem(members[0], options)
        if len(members) >= LIST_FOLDER_FROM:
            folder = first.rsplit("/", 1)[0]
            try:
                listing = {e["name"].rstrip("/"): e for e in fs.ls(folder, detail=True, refresh=True)}
            except FileNotFoundError:
                listing = {}
            finally:
                fs.invalidate_cache(folder)  # fsspec would keep the listing: memory per shard
            for url in members:
                entry = listing.get(filesystem(url, options)[1].rstrip("/"))
                if entry is not None and entry.get("type") == "file":
                    found[url] = entry.get("size")
            continue
        for url in members:
            fs, path = filesystem(url, options)
            try:
                info = fs.info(path)
            except FileNotFoundError:
                continue
            if info.get("type") == "file":
                found[url] = info.get("size")
    return found


def resolve_shards(patterns: Sequence[str], options: Mapping[str, Any] | None = None) -> list[Shard]:
    """Expands the input patterns and checks, before any work, that every shard exists."""
    if not patterns:
        raise InputError("no --input given")
    first = patterns[0]
    check_reachable(first if "{" not in first else next(iter(braceexpand(first))), options)
    try:
        urls = expand_patterns(patterns, options)
    except FileNotFoundError as exc:
        raise InputError(f"input not found: {exc}") from None
    if not urls:
        raise InputError(f"input patterns {list(patterns)} resolve to no shard")
    try:
        sizes = _existing(urls, options)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{urls[0]}: cannot check the input shards ({type(exc).__name__}: {exc})") from None
    missing = [u for u in urls if u not in sizes]
    if missing:
        raise InputError(f"{len(missing)} of {len(urls)} input shards do not exist, e.g. {missing[:3]}")
    stems = [_stem(u) for u in urls]
    unique = len(set(stems)) == len(stems)
    counts = _expected_counts(urls, options)
    return [Shard(u, s if unique else f"{s}-{hashlib.sha1(u.encode()).hexdigest()[:8]}", counts.get(u), sizes[u])
            for u, s in zip(urls, stems)]


class _RangedReads(io.RawIOBase):
    """A read-only file of known size on object storage whose only requests are its ranged reads
    (fsspec's own remote files first ask for the object's details: one more request per shard)."""

    def __init__(self, fs, path: str, size: int):
        self.fs, self.path, self.size, self.pos = fs, path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        data = self.fs.cat_file(self.path, start=self.pos, end=self.pos + n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _tar_files(url: str, options: Mapping[str, Any] | None, progress: list, size: int | None) -> Iterator[dict]:
    """The regular files of a tar as webdataset file dicts; checks the end-of-archive marker.

    On damage, the sample before the damaged one is flushed (an empty dict tells group_by_keys to yield
    what it holds) when it is complete, then TruncatedShardError is raised.
    """
    fs, path = filesystem(url, options)
    if size is not None and protocol_of(url) != "file":
        opened = io.BufferedReader(_RangedReads(fs, path, size), buffer_size=READ_BLOCK)
    else:
        opened = fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead")
    with opened as raw:
        try:
            tf = tarfile.open(fileobj=raw, mode="r:")
        except tarfile.ReadError as exc:
            raise TruncatedShardError(url, 0, None, f"not a readable tar: {exc}") from None
        member, last_key = None, None
        try:
            for member in tf:
                if not member.isfile():
                    continue
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                name = member.name.removeprefix("./")
                last_key = base_plus_ext(name)[0]
                yield {"fname": name, "data": data, "__url__": url}
        except tarfile.ReadError as exc:
            name = member.name.removeprefix("./") if member is not None else "?"
            broken = base_plus_ext(name)[0] if member is not None else None
            if broken != last_key:
                yield {}  # the previous sample is whole: let it through
            raise TruncatedShardError(url, progress[0], broken, f"{exc} while reading {name}") from None
        raw.seek(tf.offset)
        if raw.read(1024) != bytes(1024):
            yield {}  # files read so far are intact; the last sample may lack entries (decoding will say)
            raise TruncatedShardError(url, progress[0], None, "no end-of-archive marker: the file was cut short")


def iter_samples(url: str, options: Mapping[str, Any] | None = None, size: int | None = None) -> Iterator[dict]:
    """Samples of one shard as webdataset dicts: {"__key__", "__url__", "<ext>": bytes, ...}.

    `size` (bytes, e.g. `Shard.size`) spares the request that would ask for it. Raises TruncatedShardError
    for a damaged tar (after yielding the samples before the damage) and lets transient read errors
    propagate, so the caller can retry the whole shard.
    """
    progress = [0]
    for sample in group_by_keys(_tar_files(url, options, progress, size)):
        progress[0] += 1
        yield sample
