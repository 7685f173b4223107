"""FeatUp, the method: backbones, the JBU upsampler, baselines and checkpoints (pure PyTorch).

Nothing here knows about Ray, storage or shards; the data plane uses `FeatureModel` only.
"""

from . import oracle as _oracle  # noqa: F401 - registers the `oracle` backbone
from .backbones import Backbone, BackboneError, create_backbone, list_backbones, register_backbone
from .baselines import Bicubic, Bilinear, InterpolationUpsampler
from .checkpoints import CheckpointError, load_jbu, save_jbu
from .jbu import JBULayer, JBUStack
from .layers import ChannelNorm
from .model import FeatureModel, UpsamplerError, create_upsampler, list_upsamplers

__all__ = [
    "Backbone", "BackboneError", "create_backbone", "list_backbones", "register_backbone",
    "Bicubic", "Bilinear", "InterpolationUpsampler",
    "CheckpointError", "load_jbu", "save_jbu",
    "JBULayer", "JBUStack", "ChannelNorm",
    "FeatureModel", "UpsamplerError", "create_upsampler", "list_upsamplers",
]

# Multi-view training, the implicit upsampler and evaluation (issue 4).
from . import implicit as _implicit  # noqa: E402,F401 - registers the `implicit` upsampler
from .downsamplers import AttentionDownsampler, SimpleDownsampler, area_downsample, create_downsampler  # noqa: E402
from .implicit import ImplicitConfig, ImplicitFit, ImplicitUpsampler, fit_implicit  # noqa: E402
from .jitter import Jitter, JitterSpec, sample_jitter  # noqa: E402
from .training import MultiViewTrainer, TrainConfig, load_checkpoint, save_checkpoint, train  # noqa: E402

__all__ += [
    "AttentionDownsampler", "SimpleDownsampler", "area_downsample", "create_downsampler",
    "ImplicitConfig", "ImplicitFit", "ImplicitUpsampler", "fit_implicit",
    "Jitter", "JitterSpec", "sample_jitter",
    "MultiViewTrainer", "TrainConfig", "load_checkpoint", "save_checkpoint", "train",
]
