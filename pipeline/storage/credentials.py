"""What a storage credential is, how it is masked, and how the submitter's static keys reach Ray workers.

The rule (README, "Credentials"):

* Secret: static keys in the driver's environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
  `AWS_SESSION_TOKEN`, `AWS_SECURITY_TOKEN`, `FSSPEC_<PROTOCOL>_<name>` with a credential-like name, the
  `FSSPEC_<PROTOCOL>` JSON form) and every storage option whose name looks like a credential (`is_secret_name`:
  key, secret, token, password, credential, auth, ... at any depth, e.g. `client_kwargs.aws_secret_access_key`),
  or whose value is a URL with a password in it.
* Public: endpoints, regions, the profile name and botocore's checksum settings (`PUBLIC_ENV_VARS`); they
  travel to workers in Ray runtime environments as before.
* Secrets only travel inside `Secret` values, masked in repr/str/format/JSON/logs. `for_workers` puts them in
  Ray's object store once and hands workers the object reference; `reveal` (called by
  `filesystems.resolve_options`, the one door to fsspec) fetches them in the worker and installs forwarded
  environment keys in that worker's own environment. Nothing is passed when the driver holds no static key
  (an instance role or a credentials file): workers then use their node's own credential chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import Any

MASK = "********"

# Option names (lower-cased, substring match) that hold credentials; generous on purpose.
SECRET_NAME_PARTS = ("key", "secret", "token", "passw", "passphrase", "credential", "auth", "cookie", "private",
                     "signature", "connection_string")
# Names that match a part above but hold nothing secret.
SAFE_NAMES = frozenset({"endpoint_url", "signature_version"})

# Static credential variables botocore reads first; the driver forwards them (masked) when it has them.
STATIC_KEY_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Storage variables that are not secret: they travel in Ray runtime environments.
PUBLIC_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION",
)
# The key under which `for_workers` ships the driver's static credential variables inside storage options.
FORWARDED_ENVIRONMENT = "__driver_credential_environment__"

_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s:]*:[^/?#@\s]*@")
MIN_REDACTED = 8  # shorter strings are not masked in free text (too many false hits; real keys are 16+)
_KNOWN: set[str] = set()  # secret strings this process has seen: masked wherever `redact` runs
_UNRESOLVED = object()


def is_secret_name(name: object) -> bool:
    """True for an option or variable name that may hold a credential (`key`, `aws_secret_access_key`, ...)."""
    lowered = str(name).lower()
    return lowered not in SAFE_NAMES and any(part in lowered for part in SECRET_NAME_PARTS)


def credential_names(options: Any, prefix: str = "") -> list[str]:
    """The dotted names of the credentials in (nested) storage options, e.g. ["key", "client_kwargs.token"]."""
    if not isinstance(options, Mapping):
        return []
    names = []
    for k, v in options.items():
        names += [prefix + str(k)] if is_secret_name(k) else credential_names(v, f"{prefix}{k}.")
    return names


def has_password(value: object) -> bool:
    """True for a string holding a URL with a password (`scheme://user:password@host`)."""
    return isinstance(value, str) and _USERINFO.search(value) is not None


def is_secret_env_var(name: str) -> bool:
    """True for an environment variable holding a static storage credential."""
    if name in STATIC_KEY_VARS:
        return True
    if name.startswith("FSSPEC_") and len(name) > 7:
        rest = name[7:]
        return "_" not in rest or is_secret_name(rest.split("_", 1)[1])  # FSSPEC_<P> is a JSON dict of options
    return False


def secret_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's static credential variables (and public ones whose URL carries a password)."""
    environ = os.environ if environ is None else environ
    out = {k: v for k, v in environ.items() if v and is_secret_env_var(k)}
    out.update({k: environ[k] for k in PUBLIC_ENV_VARS if has_password(environ.get(k))})
    return out


def public_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The storage variables that may travel in a Ray runtime environment: endpoints, regions, profile, checksums."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in PUBLIC_ENV_VARS if environ.get(k) and not has_password(environ[k])}


def _remember(value: Any) -> None:
    if isinstance(value, str):
        if len(value) >= MIN_REDACTED:
            _KNOWN.add(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            _remember(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _remember(v)


class Secret:
    """One credential value (a string or a JSON-like structure), masked in repr, str, format, JSON and logs.

    Pickles by value (for local subprocesses) until `for_workers` shares it through Ray's object store; from
    then on its pickled form is only the object reference, and `reveal()` in a worker fetches the value.
    """

    __slots__ = ("_value", "_ref", "_slot")

    def __init__(self, value: Any):
        self._value = value.reveal() if isinstance(value, Secret) else _reveal_tree(value)
        self._ref = None
        self._slot = 0
        _remember(self._value)
        redact_logs()

    def reveal(self) -> Any:
        """The real value (fetched from Ray's object store, once per process, when it came by reference)."""
        if self._value is _UNRESOLVED:
            self._value = _fetch_shared(self._ref)[self._slot]
            _remember(self._value)
            redact_logs()
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict) -> Secret:
        return self

    def __reduce__(self):
        if self._ref is not None:
            return _shared_secret, (self._ref, self._slot)
        return Secret, (self._value,)


def _shared_secret(ref: Any, slot: int) -> Secret:
    secret = Secret.__new__(Secret)
    secret._value, secret._ref, secret._slot = _UNRESOLVED, ref, slot
    return secret


_FETCHED: dict[bytes, list] = {}  # object id -> values: one object-store read per process
_SHARED: list = []  # the driver keeps every shared reference alive (restarted actors fetch it again)


def _fetch_shared(ref: Any) -> list:
    key = ref.binary()
    if key not in _FETCHED:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("this credential was shared with Ray workers by object reference; it can only be "
                               "revealed in a process connected to the same Ray job")
        _FETCHED[key] = ray.get(ref)
    return _FETCHED[key]


def _secrets_in(value: Any) -> Iterator[Secret]:
    if isinstance(value, Secret):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _secrets_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _secrets_in(v)


def _mask_value(name: object, value: Any) -> Any:
    if isinstance(value, Secret):
        return Secret(value)
    if value is None or isinstance(value, bool):
        return value
    if is_secret_name(name) or has_password(value):
        return Secret(value)
    if isinstance(value, Mapping):
        return {k: _mask_value(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_mask_value("", v) for v in value)
    return value


def mask(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of storage options with every credential (by name, at any depth) wrapped in a fresh `Secret`."""
    return {k: _mask_value(k, v) for k, v in (options or {}).items()}


def _reveal_tree(value: Any) -> Any:
    if isinstance(value, Secret):
        return value.reveal()
    if isinstance(value, Mapping):
        return {k: _reveal_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_reveal_tree(v) for v in value)
    return value


def reveal(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Plain storage options for fsspec: `Secret`s revealed; credential variables forwarded by the driver are
    installed in this process's environment (where botocore and fsspec look for them) and taken out."""
    opts = dict(options or {})
    forwarded = opts.pop(FORWARDED_ENVIRONMENT, None)
    if forwarded is not None:
        install_environment(forwarded.reveal() if isinstance(forwarded, Secret) else forwarded)
    return _reveal_tree(opts)


def for_workers(options: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Storage options as they are handed to Ray workers (actor arguments, train loop configs, Ray Data).

    Credentials (by name, and this process's static credential variables under FORWARDED_ENVIRONMENT) become
    `Secret`s shared through Ray's object store, so what Ray stores, shows or logs of the arguments holds an
    object reference, never a key. Without any credential the options come back unchanged. Needs Ray initialised.
    """
    shipped = mask(options)
    variables = secret_env(environ)
    if variables:
        shipped[FORWARDED_ENVIRONMENT] = Secret(variables)
    secrets = list(_secrets_in(shipped))
    if secrets:
        import ray

        ref = ray.put([s.reveal() for s in secrets])
        _SHARED.append(ref)
        for slot, secret in enumerate(secrets):
            secret._ref, secret._slot = ref, slot
    return shipped


_INSTALLED: list[str] = []  # digest of the forwarded variables installed in this process


def install_environment(variables: Mapping[str, str]) -> None:
    """Makes the driver's credential variables this process's own. AWS keys replace the worker's as a group
    (the worker's session token goes when the driver's keys came without one); fsspec's config and cached S3
    clients follow."""
    digest = hashlib.sha256(json.dumps(sorted(variables.items())).encode()).hexdigest()
    if _INSTALLED and _INSTALLED[-1] == digest:
        return
    _remember(dict(variables))
    redact_logs()
    if any(k in variables for k in STATIC_KEY_VARS):
        for name in STATIC_KEY_VARS:
            if name not in variables:
                os.environ.pop(name, None)
    os.environ.update(variables)
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:  # fsspec read FSSPEC_* variables when it was imported
        fsspec.config.set_conf_env(fsspec.config.conf, {k: v for k, v in variables.items() if k.startswith("FSSPEC_")})
    if "s3fs" in sys.modules:
        sys.modules["s3fs"].S3FileSystem.clear_instance_cache()
    _INSTALLED.append(digest)


def redact(text: str) -> str:
    """`text` with every credential this process knows (options, forwarded or environment keys) and every
    URL password replaced by the mask."""
    known = _KNOWN | {v for v in secret_env().values() if len(v) >= MIN_REDACTED}
    for value in sorted(known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, MASK)
    return _USERINFO.sub(r"\g<1>" + MASK + "@", text)


_REDACTING: list[bool] = []


def redact_logs() -> None:
    """Masks credentials in every log record this process creates from now on (message, arguments, traceback)."""
    if _REDACTING:
        return
    _REDACTING.append(True)
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the handler's business, not ours
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(factory)
