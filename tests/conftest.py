"""Shared fixtures. Tests use real components; GPU tests skip only where no CUDA device exists."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray nodes started by the tests keep to 127.0.0.1 (Ray's switch for loopback-only nodes); set before
# ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("TQDM_DISABLE", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
requires_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
    reason="needs the CUDA compiler nvcc (not installed here)",
)


@pytest.fixture(scope="session")
def conv_vectors() -> dict:
    return torch.load(DATA / "adaptive_conv_vectors.pt", weights_only=True)


@pytest.fixture(scope="session")
def jbu_vectors() -> dict:
    return torch.load(DATA / "jbu_vectors_small.pt", weights_only=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: a moto server on 127.0.0.1 and a free port, with dummy credentials (never real ones).

    The endpoint and credentials go into the environment, as a user would set them; Ray workers inherit
    them through the job's runtime_env.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket per test."""
    import s3fs

    name = "bkt-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    fs.mkdir(name)
    yield name
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (2 CPUs, like this machine)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory) -> Path:
    """Real photographs (scikit-image) in 3 shards with an index.json."""
    from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo_samples
    from pipeline.ingest.shard_writer import write_shards

    root = tmp_path_factory.mktemp("photo_shards")
    names = COLOR_PHOTOS[:5] + GRAY_PHOTOS[:4]
    write_shards(photo_samples(names), str(root), samples_per_shard=3, prefix="photos")
    return root


# jobs/ holds scripts, not a package: make them importable for in-process CLI tests.
import sys  # noqa: E402

sys.path.insert(0, str(ROOT / "jobs"))
