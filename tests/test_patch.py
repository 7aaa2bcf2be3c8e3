"""fastscore.patch on existing models: by class name and structure, in place, weights and optimizers kept.

Two kinds of input: models built by fastscore.nn.reference (``fastscore.models.*(layers="reference")``),
and the test doubles below, minimal plain-PyTorch classes that share only the originals' class NAMES and
attribute structure with them (they are not fastscore classes and live in this file), which shows the
matching goes by name and attributes, not by import path. After patching: every recognised module has
its fastscore class, the Parameter objects and the state_dict are the same, outputs and parameter
gradients equal the unpatched model's, an optimizer created before patching steps as on the unpatched
model, unknown modules are left alone and reported, and a second patch changes nothing.
"""

from __future__ import annotations

import argparse
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _tolerance import assert_float32_within_network_rounding
from _tolerance import assert_float64_matches
from _tolerance import default_dtype
from _tolerance import nearby

import fastscore
import fastscore.nn as fsnn
from fastscore.models import NCSN
from fastscore.models import NCSNv2
from fastscore.models import get_config

NGF, L = 6, 5


pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


class Orig:
    """Minimal doubles named like ncsnv2's classes (the configurations the toy networks below use)."""

    @staticmethod
    def means(x):
        mu = torch.mean(x, dim=(2, 3))
        return (mu - mu.mean(-1, keepdim=True)) / torch.sqrt(mu.var(-1, keepdim=True) + 1e-5)

    class InstanceNorm2dPlus(nn.Module):
        def __init__(self, num_features, bias=True):
            super().__init__()
            self.num_features, self.bias = num_features, bias
            self.instance_norm = nn.InstanceNorm2d(num_features)
            self.alpha = nn.Parameter(1 + 0.1 * torch.randn(num_features))
            self.gamma = nn.Parameter(1 + 0.1 * torch.randn(num_features))
            self.beta = nn.Parameter(0.1 * torch.randn(num_features))

        def forward(self, x):
            h = self.instance_norm(x) + Orig.means(x)[..., None, None] * self.alpha[..., None, None]
            return self.gamma.view(-1, self.num_features, 1, 1) * h + self.beta.view(-1, self.num_features, 1, 1)

    class ConditionalInstanceNorm2dPlus(nn.Module):
        def __init__(self, num_features, num_classes, bias=True):
            super().__init__()
            self.num_features, self.bias = num_features, bias
            self.instance_norm = nn.InstanceNorm2d(num_features)
            self.embed = nn.Embedding(num_classes, 3 * num_features)
            self.embed.weight.data[:, : 2 * num_features].normal_(1, 0.1)

        def forward(self, x, y):
            gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
            h = self.instance_norm(x) + Orig.means(x)[..., None, None] * alpha[..., None, None]
            return gamma[..., None, None] * h + beta[..., None, None]

    class ConvMeanPool(nn.Module):
        def __init__(self, input_dim, output_dim, kernel_size=3):
            super().__init__()
            self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, padding=kernel_size // 2)

        def forward(self, x):
            o = self.conv(x)
            return sum([o[:, :, ::2, ::2], o[:, :, 1::2, ::2], o[:, :, ::2, 1::2], o[:, :, 1::2, 1::2]]) / 4.0

    class _Residual(nn.Module):
        def setup(self, cin, cout, resample, act, norm, dilation):
            self.non_linearity, self.input_dim, self.output_dim, self.resample = act, cin, cout, resample
            if resample == "down":
                self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
                self.normalize2 = norm(cin)
                self.conv2 = Orig.ConvMeanPool(cin, cout)
                self.shortcut = Orig.ConvMeanPool(cin, cout, 1)
            else:
                d = dilation or 1
                self.conv1 = nn.Conv2d(cin, cout, 3, padding=d, dilation=d)
                self.normalize2 = norm(cout)
                self.conv2 = nn.Conv2d(cout, cout, 3, padding=d, dilation=d)
            self.normalize1 = norm(cin)

        def run(self, x, *y):
            o = self.conv1(self.non_linearity(self.normalize1(x, *y)))
            o = self.conv2(self.non_linearity(self.normalize2(o, *y)))
            return (x if self.resample is None else self.shortcut(x)) + o

    class ResidualBlock(_Residual):
        def __init__(self, cin, cout, resample, act, norm, dilation=None):
            super().__init__()
            self.setup(cin, cout, resample, act, norm, dilation)

        def forward(self, x):
            return self.run(x)

    class ConditionalResidualBlock(_Residual):
        def __init__(self, cin, cout, num_classes, resample, act, norm, dilation=None):
            super().__init__()
            self.setup(cin, cout, resample, act, lambda c: norm(c, num_classes), dilation)

        def forward(self, x, y):
            return self.run(x, y)

    class RCUBlock(nn.Module):
        def __init__(self, features, n_blocks, n_stages, act, num_classes=None, normalizer=None):
            super().__init__()
            for i in range(n_blocks):
                for j in range(n_stages):
                    if normalizer is not None:
                        setattr(self, f"{i + 1}_{j + 1}_norm", normalizer(features, num_classes))
                    setattr(self, f"{i + 1}_{j + 1}_conv", nn.Conv2d(features, features, 3, padding=1, bias=False))
            self.n_blocks, self.n_stages, self.act = n_blocks, n_stages, act

        def forward(self, x, *y):
            for i in range(self.n_blocks):
                residual = x
                for j in range(self.n_stages):
                    if y:
                        x = getattr(self, f"{i + 1}_{j + 1}_norm")(x, *y)
                    x = getattr(self, f"{i + 1}_{j + 1}_conv")(self.act(x))
                x += residual
            return x

    class CondRCUBlock(RCUBlock):
        pass

    class CRPBlock(nn.Module):
        def __init__(self, features, n_stages, act, num_classes=None, normalizer=None):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1, bias=False) for _ in range(2))
            if normalizer is not None:
                self.norms = nn.ModuleList(normalizer(features, num_classes) for _ in range(2))
                self.maxpool = nn.AvgPool2d(5, 1, 2)
            else:
                self.maxpool = nn.MaxPool2d(5, 1, 2)
            self.n_stages, self.act = n_stages, act

        def forward(self, x, *y):
            x = self.act(x)
            path = x
            for i in range(self.n_stages):
                path = self.norms[i](path, *y) if y else path
                path = self.convs[i](self.maxpool(path))
                x = path + x
            return x

    class CondCRPBlock(CRPBlock):
        pass

    class MSFBlock(nn.Module):
        def __init__(self, in_planes, features, num_classes=None, normalizer=None):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1) for c in in_planes)
            if normalizer is not None:
                self.norms = nn.ModuleList(normalizer(c, num_classes) for c in in_planes)
            self.features = features

        def forward(self, xs, *rest):
            *y, shape = rest
            sums = torch.zeros(xs[0].shape[0], self.features, *shape)
            for i in range(len(self.convs)):
                h = self.norms[i](xs[i], *y) if y else xs[i]
                sums += F.interpolate(self.convs[i](h), size=shape, mode="bilinear", align_corners=True)
            return sums

    class CondMSFBlock(MSFBlock):
        pass

    class RefineBlock(nn.Module):
        def __init__(self, in_planes, features, act, start=False, end=False, num_classes=None, normalizer=None):
            super().__init__()
            cond = normalizer is not None
            rcu, msf, crp = (
                (Orig.CondRCUBlock, Orig.CondMSFBlock, Orig.CondCRPBlock)
                if cond
                else (Orig.RCUBlock, Orig.MSFBlock, Orig.CRPBlock)
            )
            self.n_blocks = len(in_planes)
            self.adapt_convs = nn.ModuleList(rcu(c, 2, 2, act, num_classes, normalizer) for c in in_planes)
            self.output_convs = rcu(features, 3 if end else 1, 2, act, num_classes, normalizer)
            if not start:
                self.msf = msf(in_planes, features, num_classes, normalizer)
            self.crp = crp(features, 2, act, num_classes, normalizer)

        def forward(self, xs, *rest):
            *y, shape = rest
            hs = [self.adapt_convs[i](x, *y) for i, x in enumerate(xs)]
            h = self.msf(hs, *y, shape) if self.n_blocks > 1 else hs[0]
            return self.output_convs(self.crp(h, *y), *y)

    class CondRefineBlock(RefineBlock):
        pass


class ToyNet(nn.Module):
    """A small RefineNet from the doubles (its own class is unknown to fastscore: it is the root)."""

    def __init__(self, conditional=False):
        super().__init__()
        self.conditional = conditional
        self.act = act = nn.ELU()
        self.begin_conv = nn.Conv2d(3, NGF, 3, padding=1)
        if conditional:
            norm = Orig.ConditionalInstanceNorm2dPlus
            self.normalizer = norm(NGF, L)
            block = lambda *a, **k: Orig.ConditionalResidualBlock(a[0], a[1], L, *a[2:], **k)  # noqa: E731
            refine = lambda *a, **k: Orig.CondRefineBlock(*a, **k, num_classes=L, normalizer=norm)  # noqa: E731
        else:
            norm = Orig.InstanceNorm2dPlus
            self.normalizer = norm(NGF)
            block, refine = Orig.ResidualBlock, Orig.RefineBlock
        self.end_conv = nn.Conv2d(NGF, 3, 3, padding=1)
        self.res1 = nn.ModuleList([block(NGF, NGF, None, act, norm)])
        self.res2 = nn.ModuleList([block(NGF, 2 * NGF, "down", act, norm), block(2 * NGF, 2 * NGF, None, act, norm, 2)])
        self.refine1 = refine([2 * NGF], 2 * NGF, act, start=True)
        self.refine2 = refine([NGF, 2 * NGF], NGF, act, end=True)

    def forward(self, x, y):
        c = (y,) if self.conditional else ()
        h = self.begin_conv(x)
        for m in self.res1:
            h = m(h, *c)
        layer1 = h
        for m in self.res2:
            h = m(h, *c)
        r1 = self.refine1([h], *c, h.shape[2:])
        r2 = self.refine2([layer1, r1], *c, layer1.shape[2:])
        return self.end_conv(self.act(self.normalizer(r2, *c)))


def reference_model(kind):
    torch.manual_seed(0)
    if kind == "NCSNv2":
        return NCSNv2(get_config("demo_tiny"), layers="reference")
    config = get_config("mnist")
    config.model.ngf = 4
    return NCSN(config, layers="reference")


def build(kind):
    if kind in ("NCSNv2", "NCSN"):
        return reference_model(kind)
    torch.manual_seed(0)
    return ToyNet(conditional=kind == "toy-conditional")


def data(model, batch=3):
    gen = torch.Generator().manual_seed(5)
    config = getattr(model, "config", None)
    channels, size = (config.data.channels, config.data.image_size) if config else (3, 8)
    x = torch.rand(batch, channels, size, size, generator=gen)
    return x, torch.randint(0, getattr(model, "num_classes", L), (batch,), generator=gen)


KINDS = ["NCSNv2", "NCSN", "toy", "toy-conditional"]
RECOGNISED = {
    "ConditionalInstanceNorm2dPlus",
    "InstanceNorm2dPlus",
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
}


def patch_quietly(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean model must not warn
        return fastscore.patch(model)


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_replaced_same_parameters_same_state_dict(kind):
    model = build(kind)
    recognised = [(n, type(m).__name__) for n, m in model.named_modules() if type(m).__name__ in RECOGNISED]
    assert recognised
    params = [(n, id(p)) for n, p in model.named_parameters()]
    state = copy.deepcopy(model.state_dict())
    modules = {n: id(m) for n, m in model.named_modules()}

    assert patch_quietly(model) is model
    assert model.fastscore_unpatched == []
    assert len(model.fastscore_patched) == len(recognised)
    for (name, cls), entry in zip(recognised, model.fastscore_patched):
        assert entry.startswith(f"{name}: {cls} -> fastscore.nn.{cls}"), entry
    for name, cls in recognised:
        module = model.get_submodule(name)
        assert type(module).__name__ == cls and type(module).__module__.startswith("fastscore.nn.")
        assert type(module).__module__ != "fastscore.nn.reference"
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert {n: id(m) for n, m in model.named_modules()} == modules  # the same module objects, re-classed
    assert list(model.state_dict()) == list(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def results(model, point):
    """[output, every parameter gradient] of ``model`` at ``point`` = (x, y), in x's dtype (the loss
    ``mean(output^2)``); a parameter without a gradient gives an empty tensor."""
    x, y = point
    model.zero_grad(set_to_none=True)
    with default_dtype(x.dtype):  # the doubles' MSF sums in a buffer of the default dtype, as the originals
        out = model(x, y)
    out.square().mean().backward()
    return [out.detach(), *(x.new_empty(0) if p.grad is None else p.grad for p in model.parameters())]


def in_float64(point):
    x, y = point
    return x.double(), y


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_parameter_gradients_equal_the_unpatched_model(kind):
    model = build(kind)
    original = copy.deepcopy(model)
    patch_quietly(model)
    point = data(model)
    labels = ["output", *(f"grad {k}" for k, _ in model.named_parameters())]
    results(model, point)
    results(original, point)
    for (k, p), (_, q) in zip(model.named_parameters(), original.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), k
    # float32 within the rounding the unpatched network itself makes (max pooling judged on the side of
    # each near-tie the float32 run took: tests/_tolerance.py); float64: the same formulas.
    original64 = copy.deepcopy(original).double()
    own = assert_float32_within_network_rounding(
        lambda pt: results(model, pt),
        lambda pt: results(original, pt),
        lambda pt: results(original64, in_float64(pt)),
        nearby(point),
        labels,
    )
    got64 = results(copy.deepcopy(model).double(), in_float64(point))
    assert_float64_matches(got64, results(original64, in_float64(point)), labels, network_error=own)


def test_elu_folded_only_where_the_patched_forward_applies_it():
    fs_model = build("NCSNv2")
    patch_quietly(fs_model)
    assert fs_model.normalizer.act == "elu"  # fastscore's model forward goes through norm_act
    assert fs_model.res2[0].normalize1.act == "elu" and fs_model.res2[0].normalize2.act == "elu"
    ncsn = build("NCSN")
    patch_quietly(ncsn)
    assert ncsn.refine2.crp.norms[0].act is None and ncsn.refine2.msf.norms[0].act is None
    assert ncsn.refine2.adapt_convs[0]._modules["1_1_norm"].act == "elu"
    toy = build("toy")
    patch_quietly(toy)
    assert toy.normalizer.act is None  # ToyNet.forward applies its own ELU after the normaliser
    assert isinstance(toy.normalizer, fsnn.InstanceNorm2dPlus)
    assert toy.res1[0].normalize1.act == "elu"


@pytest.mark.parametrize("kind", ["NCSNv2", "toy-conditional"])
def test_optimizer_created_before_patching_steps_like_the_unpatched_one(kind):
    # In float64. The two runs differ only by rounding, but each step amplifies the previous one's (the next
    # gradient is taken at parameters that already differ, and a max-pooling near-tie may go either way):
    # in float32 that is ~1e-6 relative after one step and ~2e-5 after two on some CPU paths, less on
    # others. In float64 it stays ~1e-14, far below float64's floor, while a parameter the optimizer does
    # not update, or updates twice, is off by a whole step.
    model = build(kind).double()
    original = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_original = torch.optim.SGD(original.parameters(), lr=0.05, momentum=0.9)
    patch_quietly(model)
    x, y = in_float64(data(model))
    with default_dtype(torch.float64):
        for _ in range(2):
            for m, o in ((model, opt), (original, opt_original)):
                o.zero_grad()
                m(x, y).square().mean().backward()
                o.step()
        labels = [k for k, _ in model.named_parameters()]
        assert_float64_matches(
            [p.detach() for p in model.parameters()], [q.detach() for q in original.parameters()], labels
        )
        assert not torch.equal(model.begin_conv.weight, build(kind).double().begin_conv.weight)  # it did train
        adam = torch.optim.Adam(model.parameters())
        patch_quietly(model)
        model(x, y).sum().backward()
        adam.step()
    assert all(id(p) in {id(q) for q in model.parameters()} for p in adam.param_groups[0]["params"])


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(NGF, NGF, 1)

    def forward(self, x):
        return x + self.proj(x)


class ResidualBlock(nn.Module):  # the right name, the wrong structure (no conv2 / normalize2)
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(NGF, NGF, 3, padding=1)
        self.norm = Orig.InstanceNorm2dPlus(NGF)

    def forward(self, x):
        return x + self.conv1(self.norm(x))


class BaselineNorm(nn.Module):
    pass


def test_unknown_and_mismatched_modules_left_alone_and_reported_once():
    model = build("toy")
    model.extra = SelfAttention()
    model.odd = ResidualBlock()
    baseline = type("InstanceNorm2dPlus", (nn.Module,), {})  # ncsn's baseline kind: forward(x, y)
    baseline.forward = lambda self, x, y: x
    model.baseline = baseline()
    model.baseline.num_features, model.baseline.bias = NGF, False
    model.baseline.alpha = nn.Parameter(torch.ones(NGF))
    model.baseline.gamma = nn.Parameter(torch.ones(NGF))
    with pytest.warns(UserWarning, match="left 3 module") as record:
        fastscore.patch(model)
    assert len(record) == 1
    unpatched = model.fastscore_unpatched
    assert len(unpatched) == 3
    assert unpatched[0].startswith("extra: SelfAttention (not an NCSN")
    assert unpatched[1].startswith("odd: ResidualBlock (named like the original but no sub-module 'conv2')")
    assert unpatched[2].startswith("baseline: InstanceNorm2dPlus (") and "(x, y)" in unpatched[2]
    assert type(model.extra) is SelfAttention and type(model.odd) is ResidualBlock
    assert type(model.baseline) is baseline
    assert isinstance(model.odd.norm, fsnn.InstanceNorm2dPlus)  # children of unknown modules are still patched
    assert model.odd.norm.act is None  # ... but their parent applies no ELU for them
    assert any(e.startswith("res1.0: ResidualBlock") for e in model.fastscore_patched)


@pytest.mark.parametrize("kind", ["NCSN", "toy"])
def test_patching_twice_changes_nothing(kind):
    model = build(kind)
    patch_quietly(model)
    classes = [(n, type(m)) for n, m in model.named_modules()]
    entries = list(model.fastscore_patched)
    x, y = data(model)
    out = model(x, y)
    patch_quietly(model)
    assert model.fastscore_patched == entries
    assert [(n, type(m)) for n, m in model.named_modules()] == classes
    assert torch.equal(model(x, y), out)


def test_patch_a_fused_model_is_a_no_op_and_bad_input_is_refused():
    torch.manual_seed(0)
    model = NCSNv2(get_config("demo_tiny"))
    patch_quietly(model)
    assert model.fastscore_patched == [] and model.fastscore_unpatched == []
    with pytest.raises(TypeError, match="model"):
        fastscore.patch("NCSNv2")
    block = Orig.ConvMeanPool(3, 4)
    patch_quietly(block)
    assert isinstance(block, fsnn.ConvMeanPool) and block.fastscore_patched == [
        "(root): ConvMeanPool -> fastscore.nn.ConvMeanPool"
    ]


# ---- copies rebuilt from the model's class (ncsnv2's EMAHelper.ema_copy) -------------------------------------


class ConfigNet(ToyNet):
    """A root model built as ncsnv2 builds its networks: ``Model(config)``, keeping ``self.config``."""

    def __init__(self, config):
        super().__init__(conditional=config.model.conditional)
        self.config = config


def ncsnv2_ema_copy(module):
    """ermongroup/ncsnv2 models/ema.py EMAHelper.ema_copy: the model rebuilt from its class and config, its
    state_dict loaded (ema_copy then copies the EMA weights in, which changes no module)."""
    if isinstance(module, nn.DataParallel):
        inner_module = module.module
        module_copy = type(inner_module)(inner_module.config).to(inner_module.config.device)
        module_copy.load_state_dict(inner_module.state_dict())
        module_copy = nn.DataParallel(module_copy)
    else:
        module_copy = type(module)(module.config).to(module.config.device)
        module_copy.load_state_dict(module.state_dict())
    return module_copy


def assert_patched_like(copy_, model, patched):
    assert type(copy_) is type(model) and type(copy_).__name__ == "ConfigNet" and isinstance(copy_, ConfigNet)
    layers = {n: type(m) for n, m in copy_.named_modules() if type(m).__name__ in RECOGNISED}
    assert layers and all(cls.__module__.startswith("fastscore.nn") for cls in layers.values()), layers
    assert copy_.fastscore_patched == patched
    x, y = data(copy_)
    assert torch.equal(copy_(x, y), model(x, y))


@pytest.mark.parametrize("wrapped", [False, True])
def test_copies_rebuilt_from_the_model_class_are_patched_too(wrapped):
    config = argparse.Namespace(
        model=argparse.Namespace(conditional=True), data=argparse.Namespace(channels=3, image_size=8), device="cpu"
    )
    torch.manual_seed(0)
    model = ConfigNet(config)
    target = nn.DataParallel(model) if wrapped else model
    patch_quietly(target)
    patched = [entry.removeprefix("module.") for entry in target.fastscore_patched]
    assert len(patched) > 10
    copy_ = ncsnv2_ema_copy(target)
    assert isinstance(copy_, nn.DataParallel) == wrapped
    assert_patched_like(copy_.module if wrapped else copy_, model, patched)
    # deepcopy (fastscore's EMAHelper.ema_copy) and pickling keep the class and the fused layers; the pickle
    # names the original class only, so loading it needs no class made by fastscore
    model.fastscore_patched = patched
    assert_patched_like(copy.deepcopy(model), model, patched)
    assert_patched_like(pickle.loads(pickle.dumps(model)), model, patched)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert_patched_like(torch.load(buffer, weights_only=False), model, patched)
    assert repr(type(model)) == repr(ConfigNet) and type(model).__qualname__ == "ConfigNet"
    patch_quietly(model)  # patching again keeps the class
    assert type(model).__mro__[1] is ConfigNet
