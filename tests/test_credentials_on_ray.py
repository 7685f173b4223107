"""Canary credentials through every Ray entry point, for real: the caching job on a local Ray and through
`ray start --head` + `ray job submit`, JBU training and the probe on Ray Train, `FeatureCache.to_ray_dataset`.

The S3 server (moto, its own process) checks signatures and IAM policies: user "opt" may use bucket bkt-opt
only, user "env" bkt-env only, and a request signed with any other key fails. So a job that succeeds on
bkt-opt signed with the --storage-options key, and one on bkt-env with the key in its driver's environment,
although the head node's workers hold a third (invalid) key pair of their own. Afterwards no canary key or
secret may appear in Ray's session directory, its state API (actors, tasks, jobs with details, Train runs),
the output objects, the job's output or Ray Train's storage path.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from pipeline.reading.feature_cache import FeatureCache
from pipeline.storage.filesystems import StorageError, check_reachable
from pipeline.storage.shards import resolve_shards
from tests.conftest import ROOT, RayHead, free_port, job_head_log, ray_head_node, submit_job
from tests.test_job import expected_features

pytestmark = pytest.mark.slow
SHARDS = "shards/photos-{000000..000001}.tar"  # 6 photographs
JOB_FLAGS = ["--backbone", "oracle", "--upsampler", "jbu", "--random-init", "--image-size", "64", "--batch-size", "2",
             "--labels", "oracle", "--previews", "1"]


@dataclass(frozen=True)
class KeyPair:
    key: str
    secret: str

    @classmethod
    def made_up(cls) -> KeyPair:
        return cls("AKIA" + secrets.token_hex(8).upper(), secrets.token_hex(20))


@dataclass(frozen=True)
class IamS3:
    endpoint: str
    opt: KeyPair    # may use bkt-opt: given in --storage-options
    env: KeyPair    # may use bkt-env: given in a driver's environment
    admin: KeyPair  # the test's own access, never given to a job
    options_file: Path  # {"key", "secret"} of `opt`, as an operator keeps it: a file, not the command line

    def opt_options(self) -> dict:
        """The test's own way to read what the jobs wrote with the `opt` keys."""
        return {"key": self.opt.key, "secret": self.opt.secret, "endpoint_url": self.endpoint}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.admin.key, secret=self.admin.secret, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)


# Keys no server knows, held by the head node's environment (its workers inherit them) and by the local run's
# driver: a request signed with them fails, so they can only be passed along, never used.
HEAD_KEYS, LOCAL_ENV_KEYS = KeyPair.made_up(), KeyPair.made_up()


def _policy(bucket: str) -> str:
    resources = ["arn:aws:s3:::*"] if bucket == "*" else [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    return json.dumps({"Version": "2012-10-17",
                       "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": resources}]})


@pytest.fixture(scope="module")
def iam_s3(photo_shards, tmp_path_factory):
    import boto3

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            requests.get(endpoint + "/moto-api/", timeout=5)
            break
        except requests.ConnectionError:
            assert time.time() < deadline and server.poll() is None, "the moto server did not start"
            time.sleep(0.2)
    setup = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                 region_name="us-east-1")
    iam, s3 = boto3.client("iam", **setup), boto3.client("s3", **setup)
    keys = {}
    for user, bucket in (("opt", "bkt-opt"), ("env", "bkt-env"), ("admin", "*")):
        if bucket != "*":
            s3.create_bucket(Bucket=bucket)
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=_policy(bucket))
        created = iam.create_access_key(UserName=user)["AccessKey"]
        keys[user] = KeyPair(created["AccessKeyId"], created["SecretAccessKey"])
    requests.post(endpoint + "/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()  # IAM from now on
    options_file = tmp_path_factory.mktemp("secrets") / "storage.json"
    options_file.write_text(json.dumps({"key": keys["opt"].key, "secret": keys["opt"].secret}))
    state = IamS3(endpoint, keys["opt"], keys["env"], keys["admin"], options_file)
    fs = state.fs()
    for bucket in ("bkt-opt", "bkt-env"):
        fs.put(str(photo_shards) + "/", f"{bucket}/shards/", recursive=True)
    yield state
    server.terminate()
    server.wait(timeout=30)


def canaries(s3: IamS3) -> dict[str, str]:
    return {"options key": s3.opt.key, "options secret": s3.opt.secret, "environment key": s3.env.key,
            "environment secret": s3.env.secret, "head key": HEAD_KEYS.key, "head secret": HEAD_KEYS.secret,
            "local driver key": LOCAL_ENV_KEYS.key, "local driver secret": LOCAL_ENV_KEYS.secret}


def leaks_in_text(s3: IamS3, text: str | bytes, where: str) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f"{name} in {where}" for name, value in canaries(s3).items() if value.encode() in data]


def leaks_in_files(s3: IamS3, root: str | Path) -> list[str]:
    """Every file under `root` (logs, runtime-env agent logs, packages, spilled objects ...) holding a canary."""
    patterns = [arg for value in canaries(s3).values() for arg in ("-e", value)]
    found = subprocess.run(["grep", "-rlaF", *patterns, str(root)], capture_output=True, text=True)
    assert found.returncode in (0, 1), found.stderr
    return [f"canary in {path}" for path in found.stdout.split()]


def leaks_in_objects(s3: IamS3, prefix: str) -> list[str]:
    fs = s3.fs()
    paths = fs.find(prefix)
    assert paths, f"nothing under {prefix}"
    return [leak for path in paths for leak in leaks_in_text(s3, fs.cat_file(path), path)]


def leaks_in_state(s3: IamS3, head: RayHead, train_runs: int = 0) -> list[str]:
    """Canaries in what the state API and the dashboard show (at least `train_runs` Ray Train runs with their
    loop configs among it)."""
    dump = subprocess.run([sys.executable, "-m", "tests.ray_state", head.address], env=head.env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert dump.returncode == 0, dump.stderr[-3000:]
    state = json.loads(dump.stdout)
    assert state["actors"] and state["tasks"] and state["jobs"]
    if train_runs:
        runs = state["train_runs"]["train_runs"]
        assert len(runs) >= train_runs and all("storage_options" in json.dumps(r["run_settings"]) for r in runs)
    return leaks_in_text(s3, dump.stdout, "Ray's state API")


def train_run_leaks(s3: IamS3, head: RayHead, out: str, driver_tmp: Path, proc: subprocess.CompletedProcess,
                    where: str) -> list[str]:
    """Canaries left by a Ray Train run: in the head's session, the state API (one Train run at least), the
    run's output objects, the driver's temp folder (Ray Train's storage path) and the driver's output."""
    return (leaks_in_files(s3, head.temp_dir) + leaks_in_state(s3, head, train_runs=1) + leaks_in_objects(s3, out)
            + leaks_in_files(s3, driver_tmp) + leaks_in_text(s3, proc.stdout + proc.stderr, where))


def driver_env(head: RayHead, keys: KeyPair, tmp: Path) -> dict[str, str]:
    """A driver on the head's machine with its own keys; TMPDIR catches Ray Train's storage path, and Ray Train
    reports its runs, loop configs included, to the dashboard."""
    tmp.mkdir(exist_ok=True)
    env = dict(head.env, RAY_ADDRESS=head.gcs_address, AWS_ACCESS_KEY_ID=keys.key, AWS_SECRET_ACCESS_KEY=keys.secret,
               TMPDIR=str(tmp), RAY_TRAIN_ENABLE_STATE_TRACKING="1")  # the dashboard shows Train loop configs
    env.pop("TQDM_DISABLE", None)  # progress bars on: their output is searched too
    return env


@pytest.fixture(scope="module")
def head(iam_s3, tmp_path_factory):
    """`ray start --head` whose environment holds static keys, the issue's set-up (its own, unknown to S3)."""
    env = {"AWS_ACCESS_KEY_ID": HEAD_KEYS.key, "AWS_SECRET_ACCESS_KEY": HEAD_KEYS.secret, "AWS_SESSION_TOKEN": None,
           "AWS_ENDPOINT_URL": iam_s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1", "TQDM_DISABLE": None}
    with ray_head_node(tmp_path_factory.mktemp("head"), env) as node:
        yield node


@pytest.fixture(scope="module")
def submitted(head, iam_s3):
    """The caching job submitted with `ray job submit`, storage keys in a file: its process and output URL."""
    out = "s3://bkt-opt/submitted.zarr"
    proc = submit_job(head, ["jobs/upsample_coco.py", "--input", f"s3://bkt-opt/{SHARDS}", "--output", out,
                             "--storage-options", f"@{iam_s3.options_file}", *JOB_FLAGS])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:] + job_head_log(head.temp_dir)
    return proc, out


def _check_features(cache: FeatureCache, photo_shards: Path) -> None:
    urls = [s.url for s in resolve_shards([f"{photo_shards}/photos-{{000000..000001}}.tar"])]
    expected = expected_features(urls)
    assert len(cache) == len(expected) == 6
    for key, ref in expected.items():
        np.testing.assert_allclose(cache[key].astype(np.float32), ref.astype(np.float32), atol=2e-3)


def test_local_ray_job_keeps_credentials_secret(ray_local, iam_s3, photo_shards, monkeypatch, capfd, caplog):
    import upsample_coco

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LOCAL_ENV_KEYS.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LOCAL_ENV_KEYS.secret)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", iam_s3.endpoint)
    out = "s3://bkt-opt/local.zarr"
    code = upsample_coco.main(["--input", f"s3://bkt-opt/{SHARDS}", "--output", out,
                               "--storage-options", f"@{iam_s3.options_file}", *JOB_FLAGS])
    printed = capfd.readouterr()
    assert code == 0, printed.err[-3000:]
    _check_features(FeatureCache(out, iam_s3.opt_options()), photo_shards)

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    gcs = json.dumps({"actors": ray._private.state.actors(), "jobs": ray._private.state.jobs()}, default=str)
    leaks = (leaks_in_files(iam_s3, session) + leaks_in_objects(iam_s3, out)
             + leaks_in_text(iam_s3, printed.out + printed.err + caplog.text, "the job's output")
             + leaks_in_text(iam_s3, gcs, "Ray's actor and job tables"))
    assert not leaks, leaks


def test_ray_job_submit_keeps_credentials_secret(head, iam_s3, submitted, photo_shards):
    proc, out = submitted
    assert "succeeded" in proc.stdout + proc.stderr
    _check_features(FeatureCache(out, iam_s3.opt_options()), photo_shards)
    leaks = (leaks_in_files(iam_s3, head.temp_dir) + leaks_in_state(iam_s3, head) + leaks_in_objects(iam_s3, out)
             + leaks_in_text(iam_s3, proc.stdout + proc.stderr, "ray job submit's output"))
    assert not leaks, leaks


def test_jbu_training_on_ray_train_keeps_credentials_secret(head, iam_s3, tmp_path):
    """The keys come from the driver's environment only; the head's workers hold others (unknown to S3)."""
    env = driver_env(head, iam_s3.env, tmp_path / "driver-tmp")
    out = "s3://bkt-env/jbu"
    proc = subprocess.run([sys.executable, "jobs/train_jbu.py", "--input", f"s3://bkt-env/{SHARDS}",
                           "--backbone", "oracle", "--image-size", "64", "--batch-size", "1", "--steps", "2",
                           "--checkpoint-every", "1", "--num-workers", "2", "--preview-images", "1", "--output", out],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(iam_s3.fs().cat_file("bkt-env/jbu/summary.json"))
    assert summary["workers"] == 2 and summary["steps"] == 2
    assert list((tmp_path / "driver-tmp").glob("featup-train-jbu-*")), "Ray Train's storage path moved"
    leaks = train_run_leaks(iam_s3, head, out, tmp_path / "driver-tmp", proc, "the training's output")
    assert not leaks, leaks


PROBE_THEN_RAY_DATA = """
import json, sys
import numpy as np
sys.path.insert(0, "jobs")
import train_probe
from pipeline.reading.feature_cache import FeatureCache
cache_url, options_file, out = sys.argv[1:4]
code = train_probe.main(["--cache", cache_url, "--ray-workers", "2", "--epochs", "2", "--batch-size", "2",
                         "--workers", "0", "--val-fraction", "0.3", "--output", out,
                         "--storage-options", "@" + options_file])
assert code == 0, code
cache = FeatureCache(cache_url, json.loads(open(options_file).read()))
rows = cache.to_ray_dataset(cache.keys()[:4], concurrency=1).take_all()
same = all(np.array_equal(r["features"], cache[str(r["key"])]) for r in rows)
print(json.dumps({"rows": len(rows), "same": bool(same)}))
"""


def test_probe_on_ray_train_and_ray_dataset_keep_credentials_secret(head, iam_s3, submitted, tmp_path):
    """One driver: the probe job on two Ray Train workers, then `FeatureCache.to_ray_dataset` on the cache."""
    _, cache_url = submitted
    env = driver_env(head, iam_s3.env, tmp_path / "driver-tmp")
    out = "s3://bkt-opt/probe"
    proc = subprocess.run([sys.executable, "-c", PROBE_THEN_RAY_DATA, cache_url, str(iam_s3.options_file), out],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rows": 4, "same": True}
    metrics = json.loads(iam_s3.fs().cat_file("bkt-opt/probe/metrics.json"))
    _, val = FeatureCache(cache_url, iam_s3.opt_options()).split(0.3, 0)  # the job's split (--val-fraction 0.3)
    assert metrics["world_size"] == 2 and metrics["val_samples"] == len(val) >= 1
    assert list((tmp_path / "driver-tmp").glob("featup-probe-*")), "Ray Train's storage path moved"
    leaks = train_run_leaks(iam_s3, head, out, tmp_path / "driver-tmp", proc, "the driver's output")
    assert not leaks, leaks


def test_refused_credentials_are_not_repeated_in_the_error(iam_s3):
    wrong = {"key": iam_s3.opt.key, "secret": KeyPair.made_up().secret}
    with pytest.raises(StorageError) as refused:
        check_reachable("s3://bkt-opt/x.zarr", {**wrong, "endpoint_url": iam_s3.endpoint})
    assert "signature" in str(refused.value).lower()
    assert wrong["key"] not in str(refused.value) and wrong["secret"] not in str(refused.value)
