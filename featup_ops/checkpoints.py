"""Reading and writing JBU upsampler weights.

Two formats are understood:
- this project's own: a `.safetensors` file whose metadata holds the JSON config under `featup_config`
  (a folder holding `model.safetensors` works too), or a dict {"config": {...}, "state_dict": {...}};
- a published FeatUp Lightning checkpoint (`{name}_jbu_stack_cocostuff.ckpt`): keys `upsampler.*` and
  `model.1.norm.*`; the training-only `downsampler.*` and `scale_net.*` entries are dropped.
Paths may be local or any fsspec URL (s3://, gs://, ...).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .jbu import JBUStack
from .layers import ChannelNorm

CONFIG_KEY = "featup_config"
LIGHTNING_PREFIX = "upsampler."
LIGHTNING_NORM_PREFIX = "model.1.norm."
TRAINING_ONLY_PREFIXES = ("downsampler.", "scale_net.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the upsampler it is loaded into."""


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Whole file from a local path or fsspec URL, with a clear error when it is missing."""
    try:
        with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checkpoint not found: {url}") from exc


def read_state(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
    """(state_dict, metadata) from a .safetensors file or a torch file loaded with weights_only=True."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if fs.isdir(path):
        url = url.rstrip("/") + "/model.safetensors"
    data = read_bytes(url, storage_options)
    if url.endswith(".safetensors"):
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        return load_safetensors_bytes(data), dict(header.get("__metadata__") or {})
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise CheckpointError(f"{url} is neither .safetensors nor a torch file loadable with weights_only=True: {exc}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{url} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj), {}


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Short content hash of a state dict (names, shapes, values), for run records."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _from_lightning(state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    ups = {k[len(LIGHTNING_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_PREFIX)}
    norm = {k[len(LIGHTNING_NORM_PREFIX):]: v for k, v in state.items() if k.startswith(LIGHTNING_NORM_PREFIX)}
    if "fixup_proj.1.weight" not in ups:
        raise CheckpointError("Lightning checkpoint has no upsampler.fixup_proj.1.weight: not a JBU stack checkpoint")
    stages = sorted(int(m.group(1)) for k in ups if (m := re.fullmatch(r"up(\d+)\.range_temp", k)))
    key_dim = ups["up1.range_proj.0.weight"].shape[0]
    diameter = int(round(ups["up1.fixup_proj.3.weight"].shape[0] ** 0.5))
    config = {"kind": "jbu", "dim": ups["fixup_proj.1.weight"].shape[0], "stages": len(stages),
              "key_dim": key_dim, "radius": diameter // 2, "channel_norm": bool(norm)}
    ups.update({f"channel_norm.norm.{k}": v for k, v in norm.items()})
    return config, ups


def _unwrap(obj: Mapping[str, Any]) -> tuple[dict | None, dict]:
    """(config or None, flat state dict) from the dict shapes a checkpoint file may hold."""
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        config = obj.get("config")
        return (dict(config) if isinstance(config, Mapping) else None), dict(obj["state_dict"])
    return None, {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def jbu_from_state(obj: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> JBUStack:
    """An eval-mode JBUStack from an own or Lightning state (see module docstring)."""
    config, state = _unwrap(obj)
    if config is None and metadata and CONFIG_KEY in metadata:
        config = json.loads(metadata[CONFIG_KEY])
    if any(k.startswith(LIGHTNING_PREFIX) for k in state):
        config, state = _from_lightning(state)
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    if config is None:
        raise CheckpointError("checkpoint carries no config and is not a FeatUp Lightning checkpoint; "
                              "save it with featup_ops.save_jbu")
    if config.get("kind", "jbu") != "jbu":
        raise CheckpointError(f"checkpoint is for upsampler kind {config.get('kind')!r}, not 'jbu'")
    norm = ChannelNorm(config["dim"]) if config.get("channel_norm") else None
    model = JBUStack(config["dim"], stages=config.get("stages", 4), key_dim=config.get("key_dim", 32),
                     radius=config.get("radius", 3), channel_norm=norm)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit JBUStack({config}): missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}")
    return model.eval()


def load_jbu(path_or_state: str | Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> JBUStack:
    """An eval-mode JBUStack from a path/URL (.safetensors, folder, .ckpt/.pt) or an already loaded dict.

    The channel norm of a published checkpoint is returned as `stack.channel_norm` (apply it with
    `stack.normalize_features` before upsampling).
    """
    if isinstance(path_or_state, Mapping):
        return jbu_from_state(path_or_state)
    state, metadata = read_state(str(path_or_state), storage_options)
    try:
        return jbu_from_state(state, metadata)
    except CheckpointError as exc:
        raise CheckpointError(f"{path_or_state}: {exc}") from None


def write_state(state: Mapping[str, torch.Tensor], url: str, config: Mapping[str, Any],
                storage_options: Mapping[str, Any] | None = None,
                extra_metadata: Mapping[str, str] | None = None) -> None:
    """Writes a state dict as one .safetensors file, `config` as JSON in its metadata (local or fsspec URL)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    metadata = {CONFIG_KEY: json.dumps(dict(config)), **dict(extra_metadata or {})}
    data = save_safetensors_bytes(tensors, metadata=metadata)
    with fsspec.open(url, "wb", auto_mkdir=True, **dict(storage_options or {})) as f:
        f.write(data)


def save_jbu(model: JBUStack, url: str, storage_options: Mapping[str, Any] | None = None,
             extra_metadata: Mapping[str, str] | None = None) -> None:
    """Writes `model` as one .safetensors file with its config in the metadata (local or fsspec URL)."""
    write_state(model.state_dict(), url, model.config(), storage_options, extra_metadata)


def shipped_oracle_jbu() -> str:
    """Path of the JBU stack trained for the `oracle` backbone that ships inside this package."""
    path = Path(__file__).parent / "weights" / "oracle_jbu.safetensors"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: reinstall the package (pip install -e .) to get its weights")
    return str(path)
