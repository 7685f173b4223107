"""The driver's view of the committed shards, at the cost of a listing rather than a request per shard.

Workers write one commit record per shard (`_pipeline/commits/<shard>.json`, see output_store.py). The
driver needs a few fields of each: `Commit`. It finds them with one listing of the commit folder (a page
per thousand records on object storage) and reads only the records it does not know yet, concurrently.
What it knows comes from the records this run's workers returned (with the version their write got), and
from the commit index: a Parquet file (`_pipeline/commit_index.parquet`) with every record and its
storage version (the object's ETag), written every minute while shards complete and at the end of each
run, then with the version of the manifest built from them. A record whose version matches the index is
not read again: a finished job is resumed with a few dozen requests in all, an interrupted one reads
only the records of its last minute (and every manifest part, for its manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.caching.output_store import MANIFEST_NAME, PIPELINE_DIR, OutputStore, version_of

log = logging.getLogger(__name__)

COMMITS_DIR = f"{PIPELINE_DIR}/commits"
INDEX_NAME = f"{PIPELINE_DIR}/commit_index.parquet"
READ_BATCH = 512  # records or parts fetched per concurrent batch: bounds what is held at once


@dataclass(frozen=True, slots=True)
class Commit:
    """What the driver keeps of one shard's commit record."""

    shard_id: str
    url: str
    array_name: str
    part: str
    complete: bool
    samples_read: int
    ok: int
    errors: int
    shard_error: str | None
    compute_seconds: float
    version: str | None = None  # the record's storage version (ETag) when known

    @classmethod
    def from_record(cls, record: Mapping, version: str | None = None) -> "Commit":
        return cls(record["shard_id"], record["url"], record["array_name"], record["part"], bool(record["complete"]),
                   int(record["samples_read"]), int(record.get("ok", 0)), int(record.get("errors", 0)),
                   record.get("shard_error"), float(record.get("compute_seconds", 0.0)), version)


def manifest_digest(committed: Sequence[Commit]) -> str:
    """Names the commits a manifest is built from, in order: equal digests, equal manifests."""
    h = hashlib.sha256()
    for c in committed:
        h.update(f"{c.shard_id}\0{c.version}\0{c.array_name}\n".encode())
    return h.hexdigest()


@dataclass
class CommitIndex:
    """The commit index as read back: known records and what the manifest was last built from."""

    commits: dict[str, Commit]
    manifest_version: str | None = None
    manifest_digest: str | None = None


class CommitLog:
    """Lists, reads and indexes the commit records of one output."""

    def __init__(self, store: OutputStore):
        self.store = store

    def _listing(self) -> dict[str, tuple[str, str | None]]:
        """shard_id -> (path, version) of every commit record: one listing."""
        folder = self.store.path(COMMITS_DIR)
        try:
            entries = self.store.fs.ls(folder, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        finally:
            self.store.fs.invalidate_cache(folder)  # fsspec would keep the listing: memory per shard
        out = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry.get("type") == "file" and name.endswith(".json"):
                out[name.removesuffix(".json")] = (entry["name"], version_of(entry))
        return out

    def scan(self, known: Mapping[str, Commit] | None = None) -> dict[str, Commit]:
        """shard_id -> Commit for every committed shard. Records in `known` with the listed version are not
        read again; a known record without a version is one this run's worker returned: taken as current."""
        known = known or {}
        listing = self._listing()
        out: dict[str, Commit] = {}
        to_read: list[str] = []
        for shard_id, (path, version) in listing.items():
            have = known.get(shard_id)
            if have is not None and (have.version is None or have.version == version):
                out[shard_id] = have if have.version == version else replace(have, version=version)
            else:
                to_read.append(path)
        for path, data in self.store.cat_many(to_read, READ_BATCH):
            try:
                if isinstance(data, BaseException):
                    raise data
                record = json.loads(data)
                out[record["shard_id"]] = Commit.from_record(record, listing[record["shard_id"]][1])
            except FileNotFoundError:
                continue  # removed since the listing (an --overwrite by the same holder cannot happen mid-run)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring an unreadable commit record %s (the shard will be redone)", path)
        if to_read:
            log.info("read %d commit record(s); %d known already", len(to_read), len(out) - len(to_read))
        return out

    # -- the index ---------------------------------------------------------------------------------------------
    def read_index(self) -> CommitIndex:
        """The commit index of the last finished run, or an empty one."""
        try:
            data = self.store.fs.cat_file(self.store.path(INDEX_NAME))
            table = pq.read_table(io.BytesIO(data))
        except FileNotFoundError:
            return CommitIndex({})
        except Exception as exc:  # noqa: BLE001 - a damaged index only costs reading the records
            log.warning("ignoring an unreadable commit index (%s: %s)", type(exc).__name__, exc)
            return CommitIndex({})
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        names = [f.name for f in fields(Commit)]
        if table.column_names != names:
            return CommitIndex({})
        commits = {row["shard_id"]: Commit(**row) for row in table.to_pylist()}
        return CommitIndex(commits, meta.get("manifest_version") or None, meta.get("manifest_digest") or None)

    def write_index(self, commits: Iterable[Commit], manifest_version: str | None = None, digest: str = "") -> None:
        """Records every commit whose version is known, and what the manifest (of `manifest_version`) was built
        from; without them, a checkpoint: what a rerun after a crash need not read again."""
        rows = [{f.name: getattr(c, f.name) for f in fields(Commit)} for c in commits if c.version is not None]
        schema = pa.schema([("shard_id", pa.string()), ("url", pa.string()), ("array_name", pa.string()),
                            ("part", pa.string()), ("complete", pa.bool_()), ("samples_read", pa.int64()),
                            ("ok", pa.int64()), ("errors", pa.int64()), ("shard_error", pa.string()),
                            ("compute_seconds", pa.float64()), ("version", pa.string())],
                           metadata={"manifest_version": manifest_version or "", "manifest_digest": digest})
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
        self.store.put_bytes(INDEX_NAME, buf.getvalue())

    def manifest_version(self) -> str | None:
        """The storage version of manifest.parquet (None when absent, or where storage has no versions)."""
        try:
            return version_of(self.store.fs.info(self.store.path(MANIFEST_NAME)))
        except FileNotFoundError:
            return None
