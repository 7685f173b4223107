"""What a credential is and how it is masked: Secret values, storage options, environment variables, error
messages, logs, the command line, runtime environments, and the by-reference hand-over to a real Ray actor."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import pickle
import pprint
import secrets

import pytest
from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

from pipeline.caching.job_config import JobConfig
from pipeline.options import ConfigError, parse_config
from pipeline.ray_runtime import _worker_runtime_env, worker_runtime_env
from pipeline.storage.credentials import (
    FORWARDED_ENVIRONMENT,
    MASK,
    Secret,
    for_workers,
    is_secret_name,
    mask,
    public_env,
    redact_logs,
    secret_env,
)
from pipeline.storage.filesystems import StorageError, resolve_options


def canary_key() -> str:
    return "AKIA" + secrets.token_hex(8).upper()


def canary_secret() -> str:
    return secrets.token_hex(20)


def canary_options() -> tuple[dict, list[str]]:
    key, secret, token = canary_key(), canary_secret(), canary_secret()
    options = {"key": key, "secret": secret, "endpoint_url": "http://minio.internal:9000",
               "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": token}}
    return options, [key, secret, token]


@pytest.mark.parametrize("name", ["key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key",
                                  "aws_session_token", "client_secret", "sas_token", "account_key", "SSECustomerKey",
                                  "Authorization", "credentials", "passwd", "connection_string"])
def test_credential_names(name):
    assert is_secret_name(name)


@pytest.mark.parametrize("name", ["endpoint_url", "region_name", "anon", "use_ssl", "signature_version",
                                  "requester_pays", "profile", "max_pool_connections", "config_kwargs"])
def test_names_that_are_not_credentials(name):
    assert not is_secret_name(name)


def test_secret_values_are_masked_wherever_they_are_shown():
    from ray.train.v2._internal.state.schema import _to_json_serializable_value  # how Ray Train shows loop configs

    options, canaries = canary_options()
    masked = mask(options)
    config = JobConfig(inputs=("x",), output="y", storage_options=masked)
    shown = [repr(masked), str(masked), pprint.pformat(masked), f"{masked['key']}", "{:>50}".format(masked["secret"]),
             json.dumps(masked, default=str), repr(config), repr(copy.deepcopy(masked)),
             repr(dataclasses.asdict(config)), json.dumps(config.record(), default=str),
             json.dumps(_to_json_serializable_value({"job": {"storage_options": masked}})),
             json.dumps(_to_json_serializable_value({"storage_options": masked}))]
    for text in shown:
        assert not [c for c in canaries if c in text], text
    assert MASK in repr(masked) and "minio.internal:9000" in repr(masked) and "eu-west-1" in repr(masked)
    assert "storage_options" not in config.record()


def test_secret_values_reach_fsspec_and_survive_a_pickle_round_trip():
    options, _ = canary_options()
    for masked in (mask(options), pickle.loads(pickle.dumps(mask(options)))):
        resolved = resolve_options("s3://bucket/key", masked)
        assert resolved["key"] == options["key"] and resolved["secret"] == options["secret"]
        assert resolved["client_kwargs"] == options["client_kwargs"]
        assert resolved["endpoint_url"] == options["endpoint_url"]
    assert resolve_options("/local/path", mask(options))["key"] == options["key"]
    assert Secret(Secret("abc")).reveal() == "abc"


def test_environment_variables_are_sorted_into_secret_and_public():
    key, secret, password = canary_key(), canary_secret(), canary_secret()
    environ = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": secret + "t",
               "FSSPEC_S3_KEY": key, "FSSPEC_S3_SECRET": secret, "FSSPEC_GCS": '{"token": "x"}',
               "AWS_ENDPOINT_URL": "http://minio:9000", "FSSPEC_S3_ENDPOINT_URL": "http://minio:9000",
               "AWS_ENDPOINT_URL_S3": f"http://admin:{password}@minio:9000", "AWS_REGION": "eu-west-1",
               "AWS_PROFILE": "team", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
               "AWS_SHARED_CREDENTIALS_FILE": "/home/u/.aws/credentials", "HOME": "/home/u"}
    assert set(secret_env(environ)) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                        "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_GCS", "AWS_ENDPOINT_URL_S3"}
    assert public_env(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1",
                                   "FSSPEC_S3_ENDPOINT_URL": "http://minio:9000", "AWS_PROFILE": "team",
                                   "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}


def test_runtime_environments_hold_public_variables_only(monkeypatch, caplog):
    key, secret = canary_key(), canary_secret()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    env_vars = worker_runtime_env()["env_vars"]
    assert env_vars["AWS_ENDPOINT_URL"] == "http://minio:9000" and env_vars["AWS_REGION"] == "eu-west-1"
    assert key not in json.dumps(env_vars) and secret not in json.dumps(env_vars)
    # a `ray job submit --runtime-env-json` that sets keys itself: named (not shown) in a warning
    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, json.dumps(
        {"runtime_env": {"env_vars": {"AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "eu-west-1"}}}))
    with caplog.at_level(logging.WARNING):
        env = _worker_runtime_env()
    assert "AWS_REGION" not in env["env_vars"] and "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
    assert "AWS_SECRET_ACCESS_KEY" in caplog.text and secret not in caplog.text


def test_error_messages_and_logs_mask_credentials(caplog):
    options, canaries = canary_options()
    mask(options)  # this process now holds them
    password = canary_secret()
    error = StorageError(f"s3://b/x: storage unreachable at http://admin:{password}@minio:9000 with "
                         f"{options['secret']}")
    assert password not in str(error) and options["secret"] not in str(error) and "minio:9000" in str(error)
    assert options["key"] not in str(ConfigError(f"bad key {options['key']}"))
    redact_logs()
    with caplog.at_level(logging.INFO):
        logging.getLogger("pipeline.test").info("signing with %s and %s", options["key"], options["secret"])
        try:
            raise RuntimeError(f"failed with token {canaries[2]}")
        except RuntimeError:
            logging.getLogger("pipeline.test").exception("request failed")
    assert "signing with" in caplog.text and "request failed" in caplog.text
    assert not [c for c in canaries if c in caplog.text]


def test_storage_options_from_a_file_are_masked_on_parse(tmp_path, caplog):
    options, canaries = canary_options()
    path = tmp_path / "storage.json"
    path.write_text(json.dumps(options))
    with caplog.at_level(logging.WARNING):
        config = parse_config(JobConfig, ["--input", "x", "--output", "y", "--storage-options", f"@{path}"])
    assert isinstance(config.storage_options["key"], Secret)
    assert resolve_options("s3://b/k", config.storage_options)["secret"] == options["secret"]
    assert not [c for c in canaries if c in repr(config) + json.dumps(config.record(), default=str)]
    assert not caplog.text  # a file is the recommended way: no warning

    with caplog.at_level(logging.WARNING):
        parse_config(JobConfig, ["--input", "x", "--output", "y", "--storage-options", json.dumps(options)])
    assert "command line" in caplog.text and "key, secret, client_kwargs.aws_session_token" in caplog.text
    assert not [c for c in canaries if c in caplog.text]


@pytest.mark.parametrize("text", ['{"key": "%s", "secret": "%s"', '["%s", "%s"]'])
def test_bad_storage_options_json_is_refused_without_echoing_it(text, capsys):
    key, secret = canary_key(), canary_secret()
    with pytest.raises(SystemExit):
        parse_config(JobConfig, ["--input", "x", "--output", "y", "--storage-options", text % (key, secret)])
    err = capsys.readouterr().err
    assert "--storage-options" in err and ("not valid" in err or "got a list" in err)
    assert key not in err and secret not in err


def test_credentials_reach_a_ray_actor_by_reference_only(ray_local):
    import ray

    options, canaries = canary_options()
    env_key, env_secret = canary_key(), canary_secret()
    environ = {"AWS_ACCESS_KEY_ID": env_key, "AWS_SECRET_ACCESS_KEY": env_secret, "AWS_REGION": "eu-west-1"}
    shipped = for_workers(options, environ=environ)
    for blob in (pickle.dumps(shipped), ray.cloudpickle.dumps(shipped)):
        assert not [c for c in [*canaries, env_key, env_secret] if c.encode() in blob]

    @ray.remote(num_cpus=0)
    class Receiver:
        def receive(self, shipped: dict) -> tuple[dict, dict]:
            from pipeline.storage.filesystems import resolve_options as resolve

            resolved = resolve("s3://bucket/key", shipped)
            names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION")
            return resolved, {k: os.environ.get(k) for k in names}

    # the worker's own session token must not pair with the driver's keys
    receiver = Receiver.options(runtime_env={"env_vars": {"AWS_SESSION_TOKEN": "the-nodes-own-token",
                                                          "AWS_REGION": "us-east-2"}}).remote()
    try:
        resolved, environ_seen = ray.get(receiver.receive.remote(shipped), timeout=120)
    finally:
        ray.kill(receiver)
    assert {k: resolved[k] for k in ("key", "secret", "endpoint_url")} == {
        k: options[k] for k in ("key", "secret", "endpoint_url")}
    assert resolved["client_kwargs"] == options["client_kwargs"] and FORWARDED_ENVIRONMENT not in resolved
    assert environ_seen == {"AWS_ACCESS_KEY_ID": env_key, "AWS_SECRET_ACCESS_KEY": env_secret,
                            "AWS_SESSION_TOKEN": None, "AWS_REGION": "us-east-2"}  # public variables: the node's


def test_nothing_is_shipped_without_static_credentials():
    options = {"endpoint_url": "http://minio:9000", "anon": False}
    assert for_workers(options, environ={"AWS_REGION": "eu-west-1", "AWS_PROFILE": "team"}) == options
