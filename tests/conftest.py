"""Shared fixtures. Tests use real components; GPU tests skip only where no CUDA device exists."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
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

    The endpoint and credentials go into the environment, as a user would set them; Ray workers get the
    endpoint through the job's runtime_env and the keys masked (pipeline.storage.credentials).
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


RAY_CLI = str(Path(sys.executable).parent / "ray")


@dataclass(frozen=True)
class RayHead:
    address: str      # the dashboard (job submission, state API)
    gcs_address: str  # for drivers that connect with ray.init
    env: dict         # the environment that talks to it: token auth
    temp_dir: str     # Ray's temp dir: the session directory with every log lives under it


@contextmanager
def ray_head_node(workdir: Path, env: Mapping[str, str | None] | None = None) -> Iterator[RayHead]:
    """`ray start --head` on 127.0.0.1 with a private token and free ports, torn down with its process group.

    `env` adds (or, with None, removes) variables of the head's environment, which its workers inherit.
    """
    token = workdir / "token"
    token.write_text(secrets.token_hex(32))
    dash, gcs_port = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix socket paths must fit 107 chars
    log = open(workdir / "ray-start.log", "w")
    head_env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                    PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    head_env.pop("RAY_ADDRESS", None)
    for name, value in (env or {}).items():
        if value is None:
            head_env.pop(name, None)
        else:
            head_env[name] = value
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", "--block", f"--port={gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # fixed default ports would collide with the local Ray of the other tests: its agent would not start
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=head_env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # up once it accepts a job: its job agent starts after the job API answers
            probe = subprocess.run([RAY_CLI, "job", "submit", "--address", address, "--", "python", "-c", "pass"],
                                   env=head_env, capture_output=True, timeout=120)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited: " + (workdir / "ray-start.log").read_text()[-2000:]
            time.sleep(2)
        else:
            pytest.fail("the head never accepted a job within 240 s: " + probe.stderr.decode()[-2000:]
                        + job_head_log(temp_dir))
        yield RayHead(address, f"127.0.0.1:{gcs_port}", head_env, temp_dir)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a few seconds to stop cleanly (its processes rarely all do); the test's checks are done by now
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head(tmp_path) -> Iterator[RayHead]:
    """A fresh `ray start --head` for one test."""
    with ray_head_node(tmp_path) as head:
        yield head


def job_head_log(temp_dir: str) -> str:
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_JobHead.log"))
    return "\n--- dashboard_JobHead.log ---\n" + logs[-1].read_text()[-3000:] if logs else ""


def submit_job(head: RayHead, args: list[str], env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- python ARGS` against `head`, waiting for the job's end."""
    submit = [RAY_CLI, "job", "submit", "--address", head.address, "--working-dir", str(ROOT), "--", "python", *args]
    for _ in range(3):  # Ray's job head answers "No available agent ..., please try again later" when it is slow
        proc = subprocess.run(submit, env=dict(env or head.env), capture_output=True, text=True, timeout=600, cwd=ROOT)
        if proc.returncode == 0 or "No available agent" not in proc.stderr:
            break
        time.sleep(5)
    return proc


# jobs/ holds scripts, not a package: make them importable for in-process CLI tests.
sys.path.insert(0, str(ROOT / "jobs"))


def compile_cuda_family(family: str, load_check: str) -> None:
    """Compiles an operator family's CUDA kernels with nvcc (no GPU needed), then runs `load_check`, a script
    that loads the built module without a GPU and prints CHECKED once its entry points refused bad operands."""
    import textwrap

    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    proc = subprocess.run([sys.executable, "-m", "cuda_ext.build", "--cuda", "yes", "--family", family],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert f"{family} cuda: built" in proc.stdout
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(load_check)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "CHECKED" in proc.stdout, proc.stdout + proc.stderr[-4000:]
