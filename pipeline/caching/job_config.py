"""The caching job's configuration: one typed object, its command line generated from it, validated before work."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.options import ConfigError, option, record_of
from pipeline.storage.images import RESIZE_MODES

DTYPES = ("float16", "bfloat16", "float32")
LABEL_SOURCES = ("auto", "oracle", "none")
UPSAMPLERS = ("jbu", "anyup", "bilinear", "bicubic", "implicit", "truth")
UPSAMPLERS_WITHOUT_WEIGHTS = ("bilinear", "bicubic", "implicit", "truth")
# Upsamplers a reader can re-run from stored low-res features and the image (the `lowres` preset).
REPLAYABLE_UPSAMPLERS = ("jbu", "anyup", "bilinear", "bicubic")
# Upsamplers whose output size is free (not a fixed multiple of the feature grid): --output-scale applies.
FREE_SIZE_UPSAMPLERS = ("anyup",)

IO, MODEL, STORED, RUN = "input and output", "model", "what is stored", "execution"

__all__ = ["ConfigError", "JobConfig", "DTYPES"]


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of the caching job needs. Fields that change the features form its identity."""

    inputs: tuple[str, ...] = option(
        (), flag="--input", repeat=True, metavar="PATTERN", group=IO,
        help="shards: brace pattern ('train-{000..123}.tar'), glob, local path, s3:// or any fsspec URL, or a file "
             "listing shards (one per line) / a shard index.json; repeat for several")
    output: str = option("", group=IO, help="Zarr store location: a local path or s3://bucket/path.zarr")
    storage_options: Mapping[str, Any] = option(
        {}, group=IO, help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\', or @file.json '
                           "(keys belong in a file or the environment, never the command line: README, Credentials); "
                           "the S3 endpoint is also read from AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL")
    overwrite: bool = option(False, group=IO, help="replace an existing output written with other settings "
                                                   "(default: refuse)")
    limit: int | None = option(None, group=IO, help="process at most this many samples (in input order), e.g. for "
                                                    "a trial")
    backbone: str = option("dinov2", group=MODEL, help="preset (dino16, dino8, dinov2, clip, vit, resnet50, oracle) "
                                                       "or any timm model id")
    backbone_options: Mapping[str, Any] = option(
        {}, group=MODEL, help='extra backbone arguments as JSON, e.g. \'{"dim": 384}\' for a 384-channel oracle')
    backbone_weights: str | None = option(None, group=MODEL, help="backbone weights, local or fsspec URL "
                                          "(.safetensors or a torch state dict); default: the local timm/HF cache")
    upsampler: str = option("jbu", group=MODEL, choices=UPSAMPLERS,
                            help="jbu: FeatUp JBU stack (needs --upsampler-weights); anyup: AnyUp, one model for "
                                 "every backbone, output at the image's size (published multi-backbone weights "
                                 "unless --upsampler-weights); bilinear/bicubic: baselines; implicit: per-image "
                                 "fitted implicit model (slow); truth: the oracle's exact features (oracle backbone "
                                 "only, an evaluation ceiling)")
    upsampler_weights: str | None = option(None, group=MODEL, metavar="PATH|URL",
                                           help="jbu: this project's .safetensors or a published FeatUp .ckpt; anyup: "
                                                "a published .pth (e.g. anyup_paper.pth) or .safetensors; local, "
                                                "fsspec URL (s3://) or, for anyup, http(s) (downloaded through "
                                                "torch.hub's cache)")
    output_scale: float = option(1.0, group=MODEL, help="anyup: high-res size relative to the image's, in (0, 1] "
                                                        "(e.g. 0.5 stores features at half the image's resolution)")
    implicit_steps: int | None = option(None, group=MODEL, help="implicit upsampler: optimisation steps per image")
    implicit_views: int | None = option(None, group=MODEL, help="implicit upsampler: jittered views per step")
    random_init: bool = option(False, group=MODEL, help="explicitly allow deterministic random weights when none "
                                                        "are given (tests, demos)")
    image_size: int = option(224, group=MODEL, help="--resize crop: images are resized (shorter side) and "
                                                    "centre-cropped to this size; fit: about this size squared pixels")
    resize: str = option("crop", group=MODEL, choices=RESIZE_MODES,
                         help="crop: resize + centre crop to a square (the paper's protocol); fit: the whole image at "
                              "its own aspect ratio, about --image-size^2 pixels, each side a multiple of the "
                              "backbone's patch, no padding (samples of one shape are batched and stored together)")
    dtype: str = option("float16", group=MODEL, choices=DTYPES,
                        help="compute precision on GPU, and the stored float type unless --storage says otherwise")
    storage: str | None = option(None, group=STORED, metavar="PRESET",
                                 help="float16 | bfloat16 | float32 | int8 (per-sample per-channel 8-bit) | pca<k> "
                                      "(k principal components, fitted on --pca-samples images) | lowres (low-res "
                                      "features + image; the upsampler re-runs on read). Default: --dtype")
    pca_samples: int = option(64, group=STORED, help="images the pca<k> projection is fitted on")
    labels: str = option("auto", group=STORED, choices=LABEL_SOURCES,
                         help="auto: store each sample's seg.png/label.png aligned with the features; oracle: "
                              "known-truth labels of the oracle features (tests, benchmarks); none")
    store_lowres: bool = option(True, group=STORED, negate="--no-lowres",
                                help="do not store the backbone's low-res features")
    previews: int = option(4, group=STORED, help="PCA preview PNGs of the first N samples into <output>/previews/ "
                                                 "(0 = none)")
    batch_size: int = option(8, group=RUN, help="images per forward pass")
    actors: int | None = option(None, group=RUN, help="worker actors (default: one per GPU, or 1 on a CPU-only "
                                                      "cluster)")
    gpus_per_actor: float = option(1.0, group=RUN, help="GPUs pinned to each actor")
    cpus_per_actor: float | None = option(None, group=RUN, help="CPUs per actor, also its torch threads (default: "
                                                                "an even share)")
    decode_threads: int = option(4, group=RUN, help="image decode threads per actor")
    max_attempts: int = option(3, group=RUN, help="tries per shard before it is reported failed")
    max_actor_restarts: int = option(3, group=RUN, help="restarts Ray gives a dead worker actor before it leaves "
                                                        "the pool")
    lease_ttl: float = option(300.0, group=RUN, help="seconds without a heartbeat after which another run may take "
                                                     "this output over (a crashed run on the same host at once)")
    storage_patience: float = option(
        300.0, group=RUN, metavar="SECONDS",
        help="how long object storage may stay unavailable (refusing connections or answering 5xx after every "
             "request retry) before the job stops; meanwhile shards wait, with backoff, without losing attempts")
    max_pixels: int = option(89_478_485, group=RUN, help="decompression-bomb limit: larger images are recorded as "
                                                         "errors (~89 MP)")
    min_side: int = option(16, group=RUN, help="images with a shorter side are recorded as errors")

    def validate(self) -> "JobConfig":
        """Cheap checks on the values themselves (models and storage are checked by the driver)."""
        if not self.inputs:
            raise ConfigError("no input shards: pass --input PATTERN (e.g. 's3://bkt/train-{000000..000123}.tar')")
        if not self.output:
            raise ConfigError("no --output location")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"--resize {self.resize!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.upsampler not in UPSAMPLERS:
            raise ConfigError(f"--upsampler {self.upsampler!r} is not one of {', '.join(UPSAMPLERS)}")
        positive = {"--image-size": self.image_size, "--batch-size": self.batch_size,
                    "--decode-threads": self.decode_threads, "--max-attempts": self.max_attempts,
                    "--pca-samples": self.pca_samples}
        for flag, value in positive.items():
            if value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        for flag, value in {"--actors": self.actors, "--limit": self.limit, "--implicit-steps": self.implicit_steps,
                            "--implicit-views": self.implicit_views}.items():
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1, got {value}")
        if self.storage_patience <= 0:
            raise ConfigError(f"--storage-patience must be > 0 seconds, got {self.storage_patience}")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.previews < 0 or self.max_actor_restarts < 0:
            raise ConfigError(f"--previews and --max-actor-restarts must be >= 0, got {self.previews} and "
                              f"{self.max_actor_restarts}")
        if (self.implicit_steps or self.implicit_views) and self.upsampler != "implicit":
            raise ConfigError("--implicit-steps/--implicit-views only apply to --upsampler implicit")
        if self.output_scale != 1.0 and self.upsampler not in FREE_SIZE_UPSAMPLERS:
            raise ConfigError(f"--output-scale {self.output_scale} applies to --upsampler "
                              f"{'/'.join(FREE_SIZE_UPSAMPLERS)} only: {self.upsampler} outputs a fixed multiple of "
                              "the feature grid")
        from pipeline.caching.presets import PresetError, validate

        try:
            validate(self.storage_preset)
        except PresetError as exc:
            raise ConfigError(f"--storage: {exc}") from None
        if self.storage_preset == "lowres" and self.upsampler not in REPLAYABLE_UPSAMPLERS:
            raise ConfigError(f"--storage lowres re-runs the upsampler when reading, which works for "
                              f"{', '.join(REPLAYABLE_UPSAMPLERS)}, not {self.upsampler!r}")
        if self.labels not in LABEL_SOURCES:
            raise ConfigError(f"--labels {self.labels!r} is not one of {', '.join(LABEL_SOURCES)}")
        if self.upsampler in UPSAMPLERS_WITHOUT_WEIGHTS and self.upsampler_weights:
            raise ConfigError(f"--upsampler {self.upsampler} takes no weights; drop --upsampler-weights")
        if self.upsampler == "jbu" and not self.upsampler_weights and not self.random_init:
            raise ConfigError("--upsampler jbu needs --upsampler-weights (a trained checkpoint, local or s3://); "
                              "pass --random-init to accept an untrained stack for tests")
        return self

    @property
    def storage_preset(self) -> str:
        return self.storage or self.dtype

    @property
    def upsampler_options(self) -> dict[str, Any]:
        """Constructor arguments of the upsampler beyond its weights (the implicit model's fitting budget, AnyUp's
        output scale); the reader of a lowres cache rebuilds the upsampler with them."""
        pairs = (("steps", self.implicit_steps), ("views", self.implicit_views),
                 ("output_scale", self.output_scale if self.output_scale != 1.0 else None))
        return {k: v for k, v in pairs if v is not None}

    def identity(self) -> dict:
        """The settings that determine the stored features; a rerun must match them to resume."""
        return {"backbone": self.backbone, "backbone_options": dict(self.backbone_options),
                "upsampler": self.upsampler, "image_size": self.image_size, "resize": self.resize, "dtype": self.dtype,
                "storage": self.storage_preset, "store_lowres": self.store_lowres, "labels": self.labels,
                "random_init": self.random_init, "upsampler_options": self.upsampler_options,
                "max_pixels": self.max_pixels, "min_side": self.min_side}

    def record(self) -> dict:
        """The flags for run.json (storage options stay out: they may hold credentials)."""
        return record_of(self)
