"""Drop-in layers with the constructor arguments, state_dict keys and numerics of ncsnv2.

Normalisation layers (normalization.py) and the fused RefineNet blocks (layers.py); their plain-PyTorch
twins, re-expressing the originals, are in fastscore.nn.reference.
"""

from fastscore.nn.layers import CondCRPBlock
from fastscore.nn.layers import ConditionalResidualBlock
from fastscore.nn.layers import CondMSFBlock
from fastscore.nn.layers import CondRCUBlock
from fastscore.nn.layers import CondRefineBlock
from fastscore.nn.layers import ConvMeanPool
from fastscore.nn.layers import CRPBlock
from fastscore.nn.layers import MeanPoolConv
from fastscore.nn.layers import MSFBlock
from fastscore.nn.layers import RCUBlock
from fastscore.nn.layers import RefineBlock
from fastscore.nn.layers import ResidualBlock
from fastscore.nn.layers import UpsampleConv
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
    "ConditionalResidualBlock",
    "ResidualBlock",
    "CondRCUBlock",
    "RCUBlock",
    "CondCRPBlock",
    "CRPBlock",
    "CondMSFBlock",
    "MSFBlock",
    "CondRefineBlock",
    "RefineBlock",
    "ConvMeanPool",
    "MeanPoolConv",
    "UpsampleConv",
]
