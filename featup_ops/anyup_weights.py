"""Where AnyUp's published weights live, how they load, and the `anyup` entry of the upsampler registry.

Sources: an already loaded state dict; a local path or any fsspec URL (s3://, gs://, memory://, ...) to a
`.pth` torch state dict (loaded with weights_only=True) or a `.safetensors` file; an http(s) URL, downloaded
once into torch.hub's cache (`$TORCH_HOME/hub/checkpoints/`). Loading is strict: a missing or extra key is
an error naming it. No weights are never silently replaced by random ones.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

import torch

import cuda_ext

from .anyup import ATTENTION_KINDS, AnyUp, AnyUpUpsampler
from .backbones import RANDOM_INIT_SEED
from .checkpoints import CheckpointError, read_state, state_fingerprint, write_state
from .model import UpsamplerError, register_upsampler

log = logging.getLogger(__name__)

RELEASES = "https://github.com/wimmerth/anyup/releases/download"
ANYUP_MULTI_BACKBONE_URL = f"{RELEASES}/checkpoint_v2/anyup_multi_backbone.pth"  # DINOv2(-reg), CLIP, SigLIP, ViT
ANYUP_PAPER_URL = f"{RELEASES}/checkpoint/anyup_paper.pth"  # the paper's, trained on DINOv2 ViT-S/14
DOWNLOAD_TIMEOUT_S = 10.0


def _is_http(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def hub_cache_path(url: str) -> str:
    """Where torch.hub keeps (or will keep) the download of `url`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _offline_hint(url: str) -> str:
    return (f"download {url} on a machine with network access and pass the file "
            f"(--upsampler-weights /path/{os.path.basename(urlparse(url).path)}, local or s3://), "
            f"or copy it to {hub_cache_path(url)}")


def _download_state(url: str, timeout: float) -> dict:
    """State dict at an http(s) URL through torch.hub's cache; unreachable hosts fail within `timeout`."""
    cached = hub_cache_path(url)
    if not os.path.exists(cached):
        try:  # torch.hub's download has no timeout: find out quickly whether the host answers at all
            urllib.request.urlopen(url, timeout=timeout).close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CheckpointError(f"cannot download AnyUp weights from {url} ({reason}): "
                                  f"{_offline_hint(url)}") from None
        log.info("downloading AnyUp weights %s into %s", url, cached)
    try:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, OSError) as exc:
        raise CheckpointError(f"cannot download AnyUp weights from {url} ({exc}): {_offline_hint(url)}") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{cached} (downloaded from {url}) is not a torch state dict loadable with "
                              f"weights_only=True ({first_line}); delete it and retry, or pass a local copy "
                              "of the file") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{url} holds a {type(state).__name__}, expected a state dict of tensors")
    return dict(state)


def read_anyup_state(source: str, storage_options: Mapping[str, Any] | None = None,
                     timeout: float = DOWNLOAD_TIMEOUT_S) -> dict:
    """The raw state dict at a path or URL (see the module docstring), with errors that say what to pass."""
    if _is_http(source):
        return _download_state(source, timeout)
    try:
        return read_state(source, storage_options)[0]
    except FileNotFoundError:
        raise CheckpointError(f"AnyUp weights not found: {source}. Pass an existing file, e.g. a copy of "
                              f"{ANYUP_MULTI_BACKBONE_URL}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read AnyUp weights {source}: {exc}") from None


def anyup_from_state(state: Mapping[str, torch.Tensor], attention: str = "fused", name: str = "<state dict>") -> AnyUp:
    """An eval-mode AnyUp holding exactly `state` (strict: every key present, no key extra, shapes equal)."""
    model = AnyUp(attention=attention)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name} is not an AnyUp state dict in the published layout: "
                              f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                              f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{name}: tensors of the wrong shape: {', '.join(wrong[:4])}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_anyup(source: str | Mapping[str, torch.Tensor], storage_options: Mapping[str, Any] | None = None,
               attention: str = "fused", timeout: float = DOWNLOAD_TIMEOUT_S) -> AnyUp:
    """An eval-mode AnyUp from a state dict, a path/fsspec URL or an http(s) URL (e.g. ANYUP_MULTI_BACKBONE_URL).

    `model.weights_id` fingerprints the weights (`file:` for a file or URL, `state:` for a dict);
    `model.weights_source` is the path or URL they came from (None for a dict).
    """
    if isinstance(source, Mapping):
        model = anyup_from_state(source, attention)
        model.weights_id = f"state:{state_fingerprint(source)}"
        return model
    state = read_anyup_state(str(source), storage_options, timeout)
    model = anyup_from_state(state, attention, name=str(source))
    model.weights_id = f"file:{state_fingerprint(state)}"
    model.weights_source = str(source)
    return model


def save_anyup(model: AnyUp, url: str, storage_options: Mapping[str, Any] | None = None,
               extra_metadata: Mapping[str, str] | None = None) -> None:
    """Writes `model`'s exact weights (the published layout) as one .safetensors file that `load_anyup` reads."""
    write_state(model.state_dict(), url, model.config(), storage_options, extra_metadata)


def random_anyup(attention: str = "fused") -> AnyUp:
    """A deterministic, randomly initialised AnyUp (seed RANDOM_INIT_SEED), for tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = AnyUp(attention=attention).eval()
    model.weights_id = f"random-init:seed{RANDOM_INIT_SEED}"
    return model


@register_upsampler("anyup", "AnyUp (ICLR 2026): one set of weights for any backbone, output at the image size "
                             "(published multi-backbone weights unless --upsampler-weights PATH|URL)")
def create_anyup(dim: int, weights: str | Mapping | None = None, random_init: bool = False,
                 storage_options: Mapping[str, Any] | None = None, attention: str = "fused",
                 q_chunk_size: int | None = None, output_scale: float = 1.0) -> AnyUpUpsampler:
    """Any `dim` works (AnyUp never projects the features). No weights: the published multi-backbone
    checkpoint, downloaded through torch.hub's cache, unless `random_init` asks for an untrained model.
    `output_scale` (0 < s <= 1): the output's size relative to the image's."""
    if attention not in ATTENTION_KINDS or (attention == "fused" and not hasattr(cuda_ext, "window_attention")):
        raise UpsamplerError(f"anyup attention {attention!r}: choose 'dense' or 'fused' (the latter needs "
                             "cuda_ext.window_attention)")
    if q_chunk_size is not None and int(q_chunk_size) < 1:
        raise UpsamplerError(f"anyup q_chunk_size must be a positive number of queries, got {q_chunk_size}")
    _check_output_scale(output_scale)
    if weights is None and random_init:
        return AnyUpUpsampler(random_anyup(attention), q_chunk_size, output_scale)
    if weights is None:
        log.info("no AnyUp weights given: using the published multi-backbone checkpoint %s", ANYUP_MULTI_BACKBONE_URL)
        weights = ANYUP_MULTI_BACKBONE_URL
    return AnyUpUpsampler(load_anyup(weights, storage_options, attention=attention), q_chunk_size, output_scale)


def _check_output_scale(output_scale: float) -> None:
    """Refuses an AnyUp output scale outside (0, 1]: its queries are pooled from the image's pixels, so a larger
    output would only repeat them."""
    if not 0 < float(output_scale) <= 1:
        raise UpsamplerError(f"anyup output_scale (--output-scale) must be in (0, 1], the output's size relative "
                             f"to the image's; got {output_scale}")
