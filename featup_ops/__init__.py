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
