"""The caching job's configuration: one typed object, validated before any work starts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

DTYPES = ("float16", "bfloat16", "float32")
LABEL_SOURCES = ("auto", "oracle", "none")
UPSAMPLERS_WITHOUT_WEIGHTS = ("bilinear", "bicubic", "implicit", "truth")
# Upsamplers a reader can re-run from stored low-res features and the image (the `lowres` preset).
REPLAYABLE_UPSAMPLERS = ("jbu", "bilinear", "bicubic")


class ConfigError(ValueError):
    """A configuration the job refuses before doing any work."""


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of the caching job needs. Fields that change the features form its identity."""

    inputs: tuple[str, ...]
    output: str
    backbone: str = "dinov2"
    backbone_weights: str | None = None
    backbone_options: Mapping[str, Any] = field(default_factory=dict)  # extra constructor arguments, e.g. oracle dim
    upsampler: str = "jbu"
    upsampler_weights: str | None = None
    upsampler_options: Mapping[str, Any] = field(default_factory=dict)
    random_init: bool = False
    image_size: int = 224
    dtype: str = "float16"  # compute precision on GPU; also the stored float type unless `storage` says otherwise
    storage: str | None = None  # preset (pipeline/presets.py); default: `dtype`
    store_lowres: bool = True
    labels: str = "auto"  # auto: the sample's seg.png/label.png when present; oracle: known-truth labels; none
    pca_samples: int = 64  # images the pca<k> projection is fitted on
    previews: int = 4  # PCA preview PNGs for the first samples
    batch_size: int = 8
    actors: int | None = None  # default: one per GPU, or one on a CPU-only cluster
    gpus_per_actor: float = 1.0
    cpus_per_actor: float | None = None
    decode_threads: int = 4
    limit: int | None = None
    overwrite: bool = False
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    max_pixels: int = 89_478_485
    min_side: int = 16
    max_attempts: int = 3
    max_actor_restarts: int = 3

    def validate(self) -> "JobConfig":
        """Cheap checks on the values themselves (models and storage are checked by the driver)."""
        if not self.inputs:
            raise ConfigError("no input shards: pass --input PATTERN (e.g. 's3://bkt/train-{000000..000123}.tar')")
        if not self.output:
            raise ConfigError("no --output location")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        positive = {"--image-size": self.image_size, "--batch-size": self.batch_size,
                    "--decode-threads": self.decode_threads, "--max-attempts": self.max_attempts}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.actors is not None and self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")
        from .presets import PresetError, validate

        try:
            validate(self.storage_preset)
        except PresetError as exc:
            raise ConfigError(f"--storage: {exc}") from None
        if self.storage_preset == "lowres" and self.upsampler not in REPLAYABLE_UPSAMPLERS:
            raise ConfigError(f"--storage lowres re-runs the upsampler when reading, which works for "
                              f"{', '.join(REPLAYABLE_UPSAMPLERS)}, not {self.upsampler!r}")
        if self.labels not in LABEL_SOURCES:
            raise ConfigError(f"--labels {self.labels!r} is not one of {', '.join(LABEL_SOURCES)}")
        if self.pca_samples < 1 or self.previews < 0:
            raise ConfigError("--pca-samples must be >= 1 and --previews >= 0")
        if self.upsampler in UPSAMPLERS_WITHOUT_WEIGHTS and self.upsampler_weights:
            raise ConfigError(f"--upsampler {self.upsampler} takes no weights; drop --upsampler-weights")
        if self.upsampler == "jbu" and not self.upsampler_weights and not self.random_init:
            raise ConfigError("--upsampler jbu needs --upsampler-weights (a trained checkpoint, local or s3://); "
                              "pass --random-init to accept an untrained stack for tests")
        return self

    @property
    def storage_preset(self) -> str:
        return self.storage or self.dtype

    def identity(self) -> dict:
        """The settings that determine the stored features; a rerun must match them to resume."""
        return {"backbone": self.backbone, "backbone_options": dict(self.backbone_options), "upsampler": self.upsampler, "image_size": self.image_size,
                "dtype": self.dtype, "storage": self.storage_preset, "store_lowres": self.store_lowres,
                "labels": self.labels, "random_init": self.random_init,
                "upsampler_options": dict(self.upsampler_options), "max_pixels": self.max_pixels,
                "min_side": self.min_side}

    def to_json(self) -> str:
        d = asdict(self)
        d["storage_options"] = "<redacted>" if self.storage_options else {}
        return json.dumps(d, sort_keys=True, default=str)
