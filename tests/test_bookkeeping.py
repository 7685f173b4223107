"""Bookkeeping at scale, counted on an S3 server that tallies every request: what one shard costs, what resuming
reads (after a crash: only what the last checkpoint lacks; after a finished run: nothing per shard), that changed
commit records are still noticed, a lost commit index costs only reads, and the manifest streamed in row groups."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
import zarr

from featup_ops import FeatureModel
from pipeline.caching import manifest
from pipeline.caching.driver import run_job
from pipeline.caching.job_config import JobConfig
from pipeline.caching.output_store import OutputStore
from pipeline.caching.shard_processor import ShardProcessor, ShardTask
from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo_samples
from pipeline.ingest.shard_writer import write_shards
from pipeline.storage.images import images_to_tensor, load_sample_image
from pipeline.storage.shards import LIST_FOLDER_FROM, InputError, iter_samples, resolve_shards
from tests.conftest import free_port
from tests.s3_request_counter import CountingS3Server, difference

SHARDS = LIST_FOLDER_FROM  # enough shards in one folder that resolving them is one listing


@pytest.fixture(scope="module")
def counting_s3(s3_endpoint):
    """A second S3 server, counting requests by kind (the credentials are the session server's dummies)."""
    server = CountingS3Server(free_port()).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    write_shards(photo_samples((COLOR_PHOTOS + GRAY_PHOTOS)[: 2 * SHARDS]), str(root), samples_per_shard=2, prefix="t")
    return root


def _bucket(server: CountingS3Server, name: str, shards) -> tuple[s3fs.S3FileSystem, str]:
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    fs.mkdir(name)
    fs.put(f"{shards}/", f"{name}/in/", recursive=True)
    return fs, f"s3://{name}/in/t-{{000000..{SHARDS - 1:06d}}}.tar"


def _config(server: CountingS3Server, pattern: str, output: str, **kw) -> JobConfig:
    return JobConfig(inputs=(pattern,), output=output, storage_options={"endpoint_url": server.endpoint},
                     backbone="oracle", upsampler="bilinear", random_init=True, image_size=32, batch_size=2,
                     decode_threads=1, actors=1, previews=0, **kw)


def test_a_shard_costs_one_write_per_object_and_nothing_else(counting_s3, tiny_shards):
    _, pattern = _bucket(counting_s3, "shard-cost", tiny_shards)
    config = _config(counting_s3, pattern, "s3://shard-cost/out.zarr")
    options = config.storage_options
    before = counting_s3.counts()
    shards = resolve_shards([pattern], options)
    spent = difference(counting_s3.counts(), before)
    assert "HEAD tar" not in spent and spent.get("LIST other") == 1  # one listing of the folder, no check per shard
    assert [s.size for s in shards] == [(tiny_shards / f"t-{i:06d}.tar").stat().st_size for i in range(SHARDS)]

    OutputStore(config.output, options).prepare(config.identity(), overwrite=False)
    processor = ShardProcessor(config)
    before = counting_s3.counts()
    result = processor.process(ShardTask(shards[0]))
    spent = difference(counting_s3.counts(), before)
    arrays = len(result.commit["groups"])
    assert arrays == 3 and result.ok == 2  # features, low-res features, labels
    assert spent == {"GET tar": 1, "PUT chunk": 2 * arrays, "PUT zarr.json": arrays, "PUT part": 1, "PUT commit": 1}

    # what was written in those few requests is a complete zarr array with the model's features
    model = FeatureModel.create("oracle", "bilinear", random_init=True)
    images = [load_sample_image(s, 32)[0] for s in iter_samples(shards[0].url, options)]
    expected = model(images_to_tensor(np.stack(images), torch.device("cpu")))[1].numpy().astype(np.float16)
    arr = zarr.open_array(f"{config.output}/{result.commit['features_array']}", mode="r", storage_options=options)
    assert arr.shape == (2, 32, 32, 32) and arr.attrs["featup"]["keys"] == [s["__key__"] for s in
                                                                             iter_samples(shards[0].url, options)]
    np.testing.assert_allclose(arr[:].astype(np.float32), expected.astype(np.float32), atol=2e-3)


def _manifest(fs: s3fs.S3FileSystem, output: str) -> pa.Table:
    return pq.read_table(fs.open(f"{output.removeprefix('s3://')}/manifest.parquet", "rb"))


@pytest.mark.slow
def test_resume_reads_nothing_per_shard_and_still_sees_changed_commits(ray_local, counting_s3, tiny_shards,
                                                                       monkeypatch):
    from pipeline.caching import driver

    fs, pattern = _bucket(counting_s3, "resume-cost", tiny_shards)
    output = "s3://resume-cost/out.zarr"

    def killed(*args, **kwargs):
        raise RuntimeError("the driver died here")

    # a run killed after its last commit, before its manifest: a rerun reads only what its checkpoint lacks
    monkeypatch.setattr(driver, "CHECKPOINT_EVERY_S", 0.0)  # the commit index after every shard
    with monkeypatch.context() as patch:
        patch.setattr(driver, "finalize", killed)
        with pytest.raises(RuntimeError, match="died here"):
            run_job(_config(counting_s3, pattern, output))
    assert not fs.exists("resume-cost/out.zarr/manifest.parquet")
    before = counting_s3.counts()
    again = run_job(_config(counting_s3, pattern, output))
    spent = difference(counting_s3.counts(), before)
    assert again.shards_skipped == SHARDS and "GET commit" not in spent  # every record was in the checkpoint
    assert spent["GET part"] == SHARDS
    clean = _manifest(fs, output)
    assert clean.num_rows == 2 * SHARDS and sorted(clean.column("key").to_pylist()) == sorted(
        s["__key__"] for i in range(SHARDS) for s in iter_samples(str(tiny_shards / f"t-{i:06d}.tar")))

    before = counting_s3.counts()  # a finished job, rerun: every answer comes from listings and the commit index
    again = run_job(_config(counting_s3, pattern, output))
    spent = difference(counting_s3.counts(), before)
    assert again.shards_skipped == SHARDS and again.ok == 2 * SHARDS
    per_shard = {k for k in spent if k.split()[0] != "LIST" and k.split()[1] in ("commit", "part", "tar", "chunk",
                                                                               "zarr.json")}
    assert not per_shard and spent["LIST commit"] == 1, spent  # one page of records; nothing ran: no second look
    assert "PUT manifest" not in spent and _manifest(fs, output).equals(clean)

    # a commit record changed behind the index's back (say, by hand) is read again: its version differs
    commit = "resume-cost/out.zarr/_pipeline/commits/t-000003.json"
    record = json.loads(fs.cat_file(commit))
    fs.pipe_file(commit, json.dumps({**record, "shard_error": "noted by hand"}).encode())
    before = counting_s3.counts()
    again = run_job(_config(counting_s3, pattern, output))
    spent = difference(counting_s3.counts(), before)
    assert spent["GET commit"] == 1 and spent["GET part"] == SHARDS  # that record; the manifest is rebuilt
    assert again.shard_errors == {record["url"]: "noted by hand"}
    assert _manifest(fs, output).equals(clean)

    # without the commit index (e.g. a run killed before writing it) every record is read, concurrently
    fs.rm("resume-cost/out.zarr/_pipeline/commit_index.parquet")
    before = counting_s3.counts()
    run_job(_config(counting_s3, pattern, output))
    spent = difference(counting_s3.counts(), before)
    assert spent["GET commit"] == SHARDS and _manifest(fs, output).equals(clean)

    # a rerun on some of the inputs describes those in its manifest and keeps the others' arrays
    first_half = f"s3://resume-cost/in/t-{{000000..{SHARDS // 2 - 1:06d}}}.tar"
    run_job(_config(counting_s3, first_half, output))
    assert _manifest(fs, output).equals(clean.slice(0, 2 * (SHARDS // 2)))
    everything = run_job(_config(counting_s3, pattern, output))
    assert everything.shards_skipped == SHARDS and _manifest(fs, output).equals(clean)
    arrays = {p.rsplit("/", 1)[-1] for p in fs.ls("resume-cost/out.zarr/features")} - {"zarr.json"}
    assert {f"features/{a}" for a in arrays} == set(clean.column("features_array").to_pylist())


def test_manifest_is_streamed_in_row_groups(monkeypatch):
    monkeypatch.setattr(manifest, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(manifest, "COMPACT_EVERY", 2)
    parts = [manifest.to_table([manifest.error_row(f"k{s}-{i}", f"s{s}", f"/s{s}.tar", i, "x") for i in range(n)])
             for s, n in enumerate([3, 4, 0, 9, 1])]
    table = pq.read_table(pa.BufferReader(manifest.assemble(parts)))
    meta = pq.ParquetFile(pa.BufferReader(manifest.assemble(parts))).metadata
    assert table.equals(pa.concat_tables(parts)) and table.schema.equals(manifest.SCHEMA)
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [5, 5, 5, 2]
    assert pq.read_table(pa.BufferReader(manifest.assemble([]))).num_rows == 0


def test_a_missing_shard_is_named_when_found_by_listing(tmp_path):
    write_shards(photo_samples(COLOR_PHOTOS[:1]), str(tmp_path), samples_per_shard=1, prefix="one")
    for i in range(1, SHARDS + 2):
        if i != 5:
            (tmp_path / f"one-{i:06d}.tar").write_bytes((tmp_path / "one-000000.tar").read_bytes())
    with pytest.raises(InputError, match=r"1 of 10 input shards do not exist, e.g. \['.*one-000005.tar'\]"):
        resolve_shards([f"{tmp_path}/one-{{000000..000009}}.tar"])

