"""Options declared once: a job's typed config dataclass is its command line.

    @dataclass(frozen=True)
    class TrainConfig:
        input: tuple[str, ...] = option(help="shard pattern; repeatable", repeat=True, required=True)
        steps: int = option(2000, help="optimisation steps")

    config = parse_config(TrainConfig, argv, description=__doc__)   # flags, help and defaults from the fields

Each field's flag is `--field-name` (or `flag=`), its type comes from the annotation (bool fields are
switches; `X | None` takes an X; Mapping fields parse JSON, inline or `@file`; tuple/list fields with
`repeat=True` collect repeated flags), its default and help are the field's own. `ConfigError` is the one error
every job raises for a configuration it refuses before doing any work.

Credentials: the JSON of a `CREDENTIAL_FIELDS` field (storage options) is masked as soon as it is parsed
(`pipeline.storage.credentials.mask`), left out of run records, and never echoed in an error message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.storage.credentials import credential_names, mask, redact, redact_logs

T = TypeVar("T")
_MISSING = dataclasses.MISSING
CREDENTIAL_FIELDS = ("storage_options",)  # fields that may hold credentials: masked on parse, never recorded
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration a job refuses before doing any work; the message names the value and the fix (with any
    credential in it masked)."""

    def __init__(self, *args: Any):
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


def option(default: Any = _MISSING, *, help: str, flag: str | None = None, choices: Sequence[Any] | None = None,
           metavar: str | None = None, repeat: bool = False, required: bool = False, negate: str | None = None,
           group: str | None = None, cli: bool = True, default_factory: Any = _MISSING) -> Any:
    """A dataclass field that is also a command-line option.

    negate: for a bool field that defaults to True, the switch that turns it off (e.g. "--no-lowres").
    cli=False keeps a field out of the command line (set by code, e.g. backbone options built from flags).
    """
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "metavar": metavar,
            "repeat": repeat, "required": required, "negate": negate, "group": group, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={"option": meta})
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"option": meta})
    return dataclasses.field(default=default, metadata={"option": meta})


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def _json_object(text: str) -> dict:
    """A JSON object given inline or as `@path` (a file; keeps credentials off the command line). Errors never
    repeat the text: it may hold credentials."""
    source = "JSON"
    try:
        if text.startswith("@"):
            source = f"the JSON file {text[1:]}"
            text = Path(text[1:]).expanduser().read_text()
        value = json.loads(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {source}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{source} is not valid ({exc.msg} at line {exc.lineno} column "
                                         f"{exc.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected {source} to hold an object like '{{\"key\": 1}}', got a "
                                         f"{type(value).__name__}")
    if source == "JSON" and credential_names(value):
        log.warning("credentials (%s) given on the command line, where ps, shell history and Ray's job table see "
                    "them: pass @file.json or use the environment or an instance role (README: Credentials)",
                    ", ".join(credential_names(value)))
    return value


def _masked_json_object(text: str) -> dict:
    """`_json_object` with every credential wrapped in a masked `Secret`."""
    return mask(_json_object(text))


def _flag(f: dataclasses.Field) -> str:
    return f.metadata["option"]["flag"] or "--" + f.name.replace("_", "-")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser whose flags, types, help and defaults all come from `cls`'s option fields."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None or not meta["cli"]:
            continue
        target = parser
        if meta["group"]:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, _ = _base_type(hints[f.name])
        origin = typing.get_origin(kind) or kind
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"]}
        if kind is bool:
            if meta["negate"]:
                target.add_argument(meta["negate"], action="store_false", **kwargs)
            else:
                target.add_argument(_flag(f), action="store_true", **kwargs)
            parser.set_defaults(**{f.name: default})
            continue
        if meta["repeat"]:
            inner = (typing.get_args(kind) or (str,))[0]
            kwargs.update(action="append", type=inner)
        elif origin in (dict, Mapping) or origin is typing.Mapping:
            parse = _masked_json_object if f.name in CREDENTIAL_FIELDS else _json_object
            kwargs.update(type=parse, metavar=meta["metavar"] or "JSON")
        elif kind in (int, float, str):
            kwargs["type"] = kind
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"] and "metavar" not in kwargs:
            kwargs["metavar"] = meta["metavar"]
        if meta["required"]:
            kwargs["required"] = True
        elif not meta["repeat"]:
            kwargs["default"] = default
            if default not in (None, "", {}, ()) and "default" not in meta["help"]:
                kwargs["help"] = f"{meta['help']} (default: {default})"
        target.add_argument(_flag(f), **kwargs)
    return parser


def config_from_namespace(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """The config of parsed flags: repeated flags become tuples/lists as the field's type wants."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not hasattr(namespace, f.name):
            continue
        value = getattr(namespace, f.name)
        if f.metadata.get("option", {}).get("repeat"):
            kind, _ = _base_type(hints[f.name])
            if value is None:
                continue
            value = tuple(value) if (typing.get_origin(kind) or kind) is tuple else list(value)
        values[f.name] = value
    values.update(overrides)
    return cls(**values)


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str | None = None) -> T:
    """Parses `argv` into an instance of `cls` (argparse exits with usage on malformed flags)."""
    return config_from_namespace(cls, build_parser(cls, description).parse_args(argv))


def record_of(config: Any, hidden: Sequence[str] = CREDENTIAL_FIELDS) -> dict:
    """A config as JSON-able settings for run records, without the fields named in `hidden`."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in hidden}


def run_command(name: str, cls: type[T], run: Any, argv: Sequence[str] | None, description: str | None) -> int:
    """A job's whole `main`: logging, flags -> config, `run(config)`; a refused configuration exits with 2 and a
    one-line message naming the job (no traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()
    try:
        run(parse_config(cls, argv, description))
    except ConfigError as exc:
        logging.getLogger(name).error("%s", exc)
        print(f"{name}: {exc}", file=__import__("sys").stderr)
        return 2
    return 0
