"""The conditional NCSN RefineNets: ermongroup/ncsn's ``CondRefineNetDilated`` (= ncsnv2's ``NCSN``) and
ncsnv2's ``NCSNdeeper``.

``NCSN(config, *, layers="fused"|"reference")`` is the network of "Generative Modeling by Estimating
Gradients of the Data Distribution" (Song & Ermon, 2019): 4 residual stages and 4 RefineNet blocks whose
every norm is a conditional InstanceNorm++ selected by the noise-level label; the output is the raw score
(not divided by sigma). It reads both repos' configs:

* an ermongroup/ncsn config (``anneal.yml``: no ``model.normalization``) gives ncsn's
  ``CondRefineNetDilated``: InstanceNorm++, ELU, input ``2x - 1`` unless ``data.logit_transform``;
* an ermongroup/ncsnv2 config gives ncsnv2's ``NCSN``: ``model.normalization``, ``model.nonlinearity``,
  ``model.spec_norm`` and ``data.rescaled`` are honoured as ncsnv2 does.

The two originals have the same parameters, registration order and numerics (ncsn's blocks are ncsnv2's
conditional blocks without spectral norm), so one class serves both: MNIST 28x28 at ngf 64 with 10
levels has 7,638,657 parameters and 173 state_dict keys; CIFAR-10 32x32 at ngf 128, 30,117,635.
Checkpoints of either load strictly (:func:`fastscore.models.load_checkpoint`).
"""

from __future__ import annotations

import torch.nn as nn

from fastscore.models.configs import field
from fastscore.models.ncsnv2 import NCSNv2
from fastscore.models.ncsnv2 import NCSNv2Deeper
from fastscore.models.ncsnv2 import _as_config
from fastscore.models.ncsnv2 import _common_fields
from fastscore.models.ncsnv2 import _RefineNet
from fastscore.models.ncsnv2 import layer_namespace

__all__ = ["NCSN", "NCSNdeeper", "CondRefineNetDilated"]


_ABSENT = object()


class _ConditionalBase(_RefineNet):
    _CONDITIONAL = True
    _DIVIDE_BY_SIGMA = False

    def __init__(self, config, *, layers: str = "fused"):
        super().__init__()
        ns = layer_namespace(layers)
        config = _as_config(config)
        who = type(self).__name__
        _common_fields(self, config, who)
        self.layers = layers
        # ermongroup/ncsn hard-codes InstanceNorm++ and ELU; ncsnv2 reads them (and spec_norm) from the config.
        if field(config, "model.normalization", "any", _ABSENT) is _ABSENT:
            config_view = _Defaults(config, normalization="InstanceNorm++", nonlinearity="elu")
        else:
            config_view = config
        field(config_view, "model.nonlinearity", "str", who=who)
        self.norm = ns.get_normalization(config_view, conditional=True)
        self.ngf = ngf = field(config, "model.ngf", "int+", who=who)
        self.num_classes = field(config, "model.num_classes", "int+", who=who)
        self.act = act = ns.get_act(config_view)
        self.config = config

        channels = config.data.channels
        self.begin_conv = nn.Conv2d(channels, ngf, 3, stride=1, padding=1)
        self.spec_norm = spec_norm = field(config, "model.spec_norm", "bool", False, who=who)
        self.normalizer = ns.build_norm(self.norm, act, ngf, self.num_classes)
        self.end_conv = nn.Conv2d(ngf, channels, 3, stride=1, padding=1)
        self._build_stages(ns, act, spec_norm=spec_norm)

    def extra_repr(self) -> str:
        return f"layers={self.layers!r}"


class _Defaults:
    """A read-only view of a config whose ``model`` section gets defaults for absent fields."""

    def __init__(self, config, **model_defaults):
        self._config = config
        self.model = _Section(config.model, model_defaults)

    def __getattr__(self, name):
        return getattr(self._config, name)


class _Section:
    def __init__(self, section, defaults):
        self._section = section
        self._defaults = defaults

    def __getattr__(self, name):
        if hasattr(self._section, name):
            return getattr(self._section, name)
        if name in self._defaults:
            return self._defaults[name]
        raise AttributeError(name)


class NCSN(_ConditionalBase):
    """ermongroup/ncsn ``CondRefineNetDilated`` / ncsnv2 ``NCSN``: conditional RefineNet, raw score output.

    Stages as :class:`fastscore.models.NCSNv2` (res1 ngf; res2 halves to 2 ngf; res3, res4 dilated 2 and
    4; ``adjust_padding`` on res4 at image size 28, a no-op on that dilated block), conditional blocks
    (average-pooling CRP). Forward ``(x, y)``; ``y`` (N,) int64 labels select the norms' embedding rows.
    """

    _RES = NCSNv2._RES
    _REFINE = NCSNv2._REFINE
    _CHAIN = NCSNv2._CHAIN


CondRefineNetDilated = NCSN


class NCSNdeeper(_ConditionalBase):
    """ncsnv2 ``NCSNdeeper``: the conditional twin of :class:`fastscore.models.NCSNv2Deeper` (5 stages,
    5 refine blocks); raw score output."""

    _RES = NCSNv2Deeper._RES
    _REFINE = NCSNv2Deeper._REFINE
    _CHAIN = NCSNv2Deeper._CHAIN
