"""FeatUp, the method: backbones, the JBU, implicit and AnyUp upsamplers, baselines, their training, checkpoints.

Pure PyTorch: nothing here knows about Ray, storage or shards; the data plane uses `FeatureModel` only.
"""

from . import implicit as _implicit  # noqa: F401 - registers the `implicit` upsampler
from . import oracle as _oracle  # noqa: F401 - registers the `oracle` backbone
from .anyup import AnyUp, AnyUpUpsampler
from .anyup_training import AnyUpTrainConfig, AnyUpTrainer
from .anyup_weights import (  # registers the `anyup` upsampler
    ANYUP_MULTI_BACKBONE_URL,
    ANYUP_PAPER_URL,
    load_anyup,
    random_anyup,
    save_anyup,
)
from .backbones import (
    Backbone,
    BackboneError,
    create_backbone,
    list_backbones,
    register_backbone,
)
from .baselines import Bicubic, Bilinear, InterpolationUpsampler
from .checkpoints import CheckpointError, load_jbu, save_jbu, shipped_oracle_jbu
from .downsamplers import (
    AttentionDownsampler,
    SimpleDownsampler,
    area_downsample,
    create_downsampler,
)
from .implicit import ImplicitConfig, ImplicitFit, ImplicitUpsampler, fit_implicit
from .jbu import JBULayer, JBUStack
from .jitter import Jitter, JitterSpec, sample_jitter
from .layers import ChannelNorm
from .model import FeatureModel, UpsamplerError, create_upsampler, list_upsamplers, save_upsampler
from .multiview_trainer import (
    MultiViewTrainer,
    TrainConfig,
    load_checkpoint,
    save_checkpoint,
    train,
)

__all__ = [
    "AnyUp", "AnyUpUpsampler", "ANYUP_MULTI_BACKBONE_URL", "ANYUP_PAPER_URL", "load_anyup", "random_anyup", "save_anyup",
    "AnyUpTrainConfig", "AnyUpTrainer",
    "Backbone", "BackboneError", "create_backbone", "list_backbones", "register_backbone",
    "Bicubic", "Bilinear", "InterpolationUpsampler",
    "CheckpointError", "load_jbu", "save_jbu", "shipped_oracle_jbu",
    "AttentionDownsampler", "SimpleDownsampler", "area_downsample", "create_downsampler",
    "ImplicitConfig", "ImplicitFit", "ImplicitUpsampler", "fit_implicit",
    "JBULayer", "JBUStack", "Jitter", "JitterSpec", "sample_jitter", "ChannelNorm",
    "FeatureModel", "UpsamplerError", "create_upsampler", "list_upsamplers", "save_upsampler",
    "MultiViewTrainer", "TrainConfig", "load_checkpoint", "save_checkpoint", "train",
]
