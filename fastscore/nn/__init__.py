"""Drop-in layers with the constructor arguments, state_dict keys and numerics of ncsnv2."""

from fastscore.nn.normalization import ConditionalBatchNorm2d
from fastscore.nn.normalization import ConditionalInstanceNorm2d
from fastscore.nn.normalization import ConditionalInstanceNorm2dPlus
from fastscore.nn.normalization import ConditionalNoneNorm2d
from fastscore.nn.normalization import ConditionalVarianceNorm2d
from fastscore.nn.normalization import InstanceNorm2dPlus
from fastscore.nn.normalization import NoneNorm2d
from fastscore.nn.normalization import UnknownNormalizationError
from fastscore.nn.normalization import VarianceNorm2d
from fastscore.nn.normalization import get_normalization

__all__ = [
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
    "ConditionalInstanceNorm2d",
    "ConditionalBatchNorm2d",
    "ConditionalVarianceNorm2d",
    "VarianceNorm2d",
    "ConditionalNoneNorm2d",
    "NoneNorm2d",
    "get_normalization",
    "UnknownNormalizationError",
]
