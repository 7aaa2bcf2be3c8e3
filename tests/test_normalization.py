"""fastscore.nn normalisation layers against ncsnv2's originals.

The originals are re-expressed below from docs/numerics.md#normalisation-layers as test doubles (class
``Orig``): plain PyTorch as ncsnv2 writes them (``nn.InstanceNorm2d(affine=False,
track_running_stats=False)``, ``torch.mean`` / ``torch.var``, ``nn.Embedding`` initialised through
``.data`` in the original order). Each fastscore class must match its double on state_dict keys,
order and shapes, initial values under the same seed (which pins the init RNG consumption order),
outputs and gradients in float32 and float64, and must load the double's checkpoints and vice versa.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastscore
import fastscore.nn as fsnn
from fastscore import use_backend

C, L = 5, 4  # channels, noise levels
SHAPE = (3, C, 7, 9)
LABELS = (3, 0, 3)  # a repeated label: its embedding row gets a summed gradient


class Orig:
    """ncsnv2 models/normalization.py, re-expressed from docs/numerics.md#normalisation-layers in plain PyTorch."""

    @staticmethod
    def _standardised_channel_means(x):
        mu = torch.mean(x, dim=(2, 3))
        m = torch.mean(mu, dim=-1, keepdim=True)
        v = torch.var(mu, dim=-1, keepdim=True)  # unbiased across channels
        return (mu - m) / torch.sqrt(v + 1e-5)

    class ConditionalInstanceNorm2dPlus(nn.Module):
        def __init__(self, num_features, num_classes, bias=True):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
            width = 3 * num_features if bias else 2 * num_features
            self.embed = nn.Embedding(num_classes, width)  # default N(0, 1) fill consumes RNG first
            self.embed.weight.data[:, : 2 * num_features].normal_(1, 0.02)  # gamma, alpha
            if bias:
                self.embed.weight.data[:, 2 * num_features :].zero_()  # beta

        def forward(self, x, y):
            muhat = Orig._standardised_channel_means(x)
            h = self.instance_norm(x)
            rows = self.embed(y)
            if self.bias:
                gamma, alpha, beta = rows.chunk(3, dim=-1)
            else:
                gamma, alpha = rows.chunk(2, dim=-1)
            h = h + muhat[..., None, None] * alpha[..., None, None]
            out = gamma.view(-1, self.num_features, 1, 1) * h
            if self.bias:
                out = out + beta.view(-1, self.num_features, 1, 1)
            return out

    class InstanceNorm2dPlus(nn.Module):
        def __init__(self, num_features, bias=True):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
            self.alpha = nn.Parameter(torch.zeros(num_features))
            self.gamma = nn.Parameter(torch.zeros(num_features))
            self.alpha.data.normal_(1, 0.02)
            self.gamma.data.normal_(1, 0.02)
            if bias:
                self.beta = nn.Parameter(torch.zeros(num_features))

        def forward(self, x):
            muhat = Orig._standardised_channel_means(x)
            h = self.instance_norm(x)
            h = h + muhat[..., None, None] * self.alpha[..., None, None]
            out = self.gamma.view(-1, self.num_features, 1, 1) * h
            if self.bias:
                out = out + self.beta.view(-1, self.num_features, 1, 1)
            return out

    @staticmethod
    def _uniform_gamma_zero_beta(num_features, num_classes, bias):
        embed = nn.Embedding(num_classes, 2 * num_features if bias else num_features)
        embed.weight.data[:, :num_features].uniform_()
        if bias:
            embed.weight.data[:, num_features:].zero_()
        return embed

    class ConditionalInstanceNorm2d(nn.Module):
        def __init__(self, num_features, num_classes, bias=True):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
            self.embed = Orig._uniform_gamma_zero_beta(num_features, num_classes, bias)

        def forward(self, x, y):
            return Orig._affine(self, self.instance_norm(x), y, dim=-1)

    class ConditionalBatchNorm2d(nn.Module):
        def __init__(self, num_features, num_classes, bias=True):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.bn = nn.BatchNorm2d(num_features, affine=False)
            self.embed = Orig._uniform_gamma_zero_beta(num_features, num_classes, bias)

        def forward(self, x, y):
            return Orig._affine(self, self.bn(x), y, dim=1)

    class ConditionalNoneNorm2d(nn.Module):
        def __init__(self, num_features, num_classes, bias=True):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.embed = Orig._uniform_gamma_zero_beta(num_features, num_classes, bias)

        def forward(self, x, y):
            return Orig._affine(self, x, y, dim=-1)

    @staticmethod
    def _affine(mod, h, y, dim):
        if mod.bias:
            gamma, beta = mod.embed(y).chunk(2, dim=dim)
            return gamma.view(-1, mod.num_features, 1, 1) * h + beta.view(-1, mod.num_features, 1, 1)
        return mod.embed(y).view(-1, mod.num_features, 1, 1) * h

    class ConditionalVarianceNorm2d(nn.Module):
        def __init__(self, num_features, num_classes, bias=False):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.embed = nn.Embedding(num_classes, num_features)
            self.embed.weight.data.normal_(1, 0.02)

        def forward(self, x, y):
            h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + 1e-5)
            return self.embed(y).view(-1, self.num_features, 1, 1) * h

    class VarianceNorm2d(nn.Module):
        def __init__(self, num_features, bias=False):
            super().__init__()
            self.num_features = num_features
            self.bias = bias
            self.alpha = nn.Parameter(torch.zeros(num_features))
            self.alpha.data.normal_(1, 0.02)

        def forward(self, x):
            h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + 1e-5)
            return self.alpha.view(-1, self.num_features, 1, 1) * h

    class NoneNorm2d(nn.Module):
        def __init__(self, num_features, bias=True):
            super().__init__()

        def forward(self, x):
            return x


FUSED = {"ConditionalInstanceNorm2dPlus", "InstanceNorm2dPlus", "ConditionalInstanceNorm2d"}
CONDITIONAL = {
    "ConditionalInstanceNorm2dPlus",
    "ConditionalInstanceNorm2d",
    "ConditionalBatchNorm2d",
    "ConditionalVarianceNorm2d",
    "ConditionalNoneNorm2d",
}
# (class name, bias) for every class and both values of bias where bias changes anything.
CASES = [
    ("ConditionalInstanceNorm2dPlus", True),
    ("ConditionalInstanceNorm2dPlus", False),
    ("InstanceNorm2dPlus", True),
    ("InstanceNorm2dPlus", False),
    ("ConditionalInstanceNorm2d", True),
    ("ConditionalInstanceNorm2d", False),
    ("ConditionalBatchNorm2d", True),
    ("ConditionalBatchNorm2d", False),
    ("ConditionalVarianceNorm2d", False),
    ("ConditionalVarianceNorm2d", True),
    ("VarianceNorm2d", False),
    ("ConditionalNoneNorm2d", True),
    ("ConditionalNoneNorm2d", False),
    ("NoneNorm2d", True),
]
CASE_IDS = [f"{name}-bias={bias}" for name, bias in CASES]


def build(name, bias, *, seed=0, **kwargs):
    """(fastscore module, original double), each built right after torch.manual_seed(seed)."""
    args = (C, L, bias) if name in CONDITIONAL else (C, bias)
    torch.manual_seed(seed)
    ours = getattr(fsnn, name)(*args, **kwargs)
    torch.manual_seed(seed)
    orig = getattr(Orig, name)(*args)
    return ours, orig


def perturbed_pair(name, bias, dtype=torch.float32, **kwargs):
    """A pair with identical, non-trivial parameters (beta != 0, gamma far from 1) in `dtype`."""
    ours, orig = build(name, bias, **kwargs)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in orig.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen))
    ours.load_state_dict(orig.state_dict())
    return ours.to(dtype), orig.to(dtype)


def make_x(dtype, channels_last=False, shape=SHAPE):
    gen = torch.Generator().manual_seed(2)
    # Per-channel offsets and scales so the channel means (the "++" term) are far from each other.
    x = 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.rand(1, shape[1], 1, 1, generator=gen, dtype=torch.float64).add(0.5)
    x = (x + 2 * torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def call(mod, name, x, y=None):
    return mod(x, torch.tensor(LABELS) if y is None else y) if name in CONDITIONAL else mod(x)


def assert_close(got, want, rtol, what):
    """max |got - want| <= rtol * max(1, max |want|); rtol 0 demands bitwise equality."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype} {got.shape} vs {want.dtype}"
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.1e} * {scale:.3g}"


def rtol_for(name, dtype):
    if name not in FUSED:
        return 0.0  # plain PyTorch written as ncsnv2 writes it: bitwise
    return 1e-5 if dtype == torch.float32 else 1e-12


# ---- structure and init ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bias"), CASES, ids=CASE_IDS)
def test_state_dict_keys_order_shapes_and_module_tree(name, bias):
    ours, orig = build(name, bias)
    assert [(k, tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape), v.dtype) for k, v in orig.state_dict().items()
    ]
    assert [k for k, _ in ours.named_parameters()] == [k for k, _ in orig.named_parameters()]
    assert [k for k, _ in ours.named_modules()] == [k for k, _ in orig.named_modules()]
    for attr in ("num_features", "bias"):
        if hasattr(orig, attr):
            assert getattr(ours, attr) == getattr(orig, attr)


@pytest.mark.parametrize(("name", "bias"), CASES, ids=CASE_IDS)
def test_init_is_bitwise_equal_and_consumes_the_same_rng(name, bias):
    ours, orig = build(name, bias, seed=123)
    after_orig = torch.rand(8)  # the generator state after building orig (built second)
    torch.manual_seed(123)
    getattr(fsnn, name)(*((C, L, bias) if name in CONDITIONAL else (C, bias)))
    assert torch.equal(torch.rand(8), after_orig), "construction consumed a different amount of RNG"
    for (k, a), (_, b) in zip(ours.state_dict().items(), orig.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} differs at init"


def test_init_distributions():
    torch.manual_seed(0)
    plus = fsnn.ConditionalInstanceNorm2dPlus(64, 50)
    w = plus.embed.weight
    assert w.shape == (50, 192)
    assert abs(w[:, :128].mean().item() - 1) < 0.01 and abs(w[:, :128].std().item() - 0.02) < 0.002
    assert torch.all(w[:, 128:] == 0)
    inorm = fsnn.ConditionalInstanceNorm2d(64, 50)
    g = inorm.embed.weight[:, :64]
    assert g.min() >= 0 and g.max() < 1 and abs(g.mean().item() - 0.5) < 0.03  # U[0, 1), not N(1, .02)
    assert torch.all(inorm.embed.weight[:, 64:] == 0)
    unc = fsnn.InstanceNorm2dPlus(64)
    assert torch.all(unc.beta == 0) and abs(unc.alpha.mean().item() - 1) < 0.01


# ---- forward and backward parity --------------------------------------------------------------------

# The fused classes also run on every other backend that can take CPU tensors here (ref; triton in its
# interpreter, which tests/conftest.py switches on when there is no GPU); "default" is the automatic choice.
_FORCED = [b for b in ("ref", "triton") if "cpu" in fastscore.backends()[b]["devices"]]


PARITY = [pytest.param(name, bias, "default") for name, bias in CASES] + [
    pytest.param(name, bias, backend) for backend in _FORCED for name, bias in CASES if name in FUSED
]
PARITY_IDS = [f"{p.values[0]}-bias={p.values[1]}-{p.values[2]}" for p in PARITY]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("name", "bias", "backend"), PARITY, ids=PARITY_IDS)
def test_forward_and_gradients_match_original(name, bias, backend, dtype, channels_last, train):
    ours, orig = perturbed_pair(name, bias, dtype)
    ours.train(train)
    orig.train(train)
    x0 = make_x(dtype, channels_last)
    xo, xr = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=dtype)
    rtol = rtol_for(name, dtype)

    with contextlib.nullcontext() if backend == "default" else use_backend(backend):
        out = call(ours, name, xo)
        want = call(orig, name, xr)
        assert_close(out, want, rtol, "output")
        out.backward(grad_out)
    want.backward(grad_out)

    assert_close(xo.grad, xr.grad, rtol, "grad x")
    for (k, p), (_, q) in zip(ours.named_parameters(), orig.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol, f"grad {k}")
    # Buffers (BatchNorm running stats, updated in train mode only) stay identical.
    for (k, b), (_, c) in zip(ours.named_buffers(), orig.named_buffers(), strict=True):
        assert torch.equal(b, c), f"buffer {k}"
    assert torch.equal(x0, xo.detach()), "input modified"


def test_batchnorm_running_stats_then_eval_match_original():
    ours, orig = perturbed_pair("ConditionalBatchNorm2d", True)
    y = torch.tensor(LABELS)
    for step in range(3):
        x = make_x(torch.float32) * (step + 1)
        assert torch.equal(ours(x, y), orig(x, y))
    assert int(ours.bn.num_batches_tracked) == 3
    assert not torch.allclose(ours.bn.running_var, torch.ones(C))  # the stats did move
    for k, v in orig.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    ours.eval()
    orig.eval()
    x = make_x(torch.float32)
    assert torch.equal(ours(x, y), orig(x, y))
    assert not torch.allclose(ours(x, y), ours.train()(x, y))  # eval really used the running stats


@pytest.mark.parametrize("name", sorted(FUSED))
def test_double_backward_matches_original(name):
    # Sliced score matching differentiates d(out)/dx again (create_graph=True).
    ours, orig = perturbed_pair(name, True, torch.float64)
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for mod in (ours, orig):
        x = make_x(torch.float64).requires_grad_()
        (gx,) = torch.autograd.grad((call(mod, name, x) * v).sum(), x, create_graph=True)
        (gx * v).sum().backward()
        # beta does not reach d(out)/dx, so its second-order grad is None in both.
        results.append([gx.detach(), x.grad] + [p.grad for p in mod.parameters()])
    assert results[0][0].abs().max() > 0
    for got, want in zip(*results, strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert_close(got, want, 1e-11, name)


@pytest.mark.parametrize("name", sorted(FUSED))
def test_float64_input_into_float32_module_promotes_like_original(name):
    ours, orig = perturbed_pair(name, True)
    x = make_x(torch.float64)
    out, want = call(ours, name, x), call(orig, name, x)
    assert out.dtype == want.dtype == torch.float64
    assert_close(out, want, 1e-12, name)


def test_int32_labels_accepted():
    ours, _ = perturbed_pair("ConditionalInstanceNorm2dPlus", True)
    x = make_x(torch.float32)
    y = torch.tensor(LABELS)
    assert torch.equal(ours(x, y.int()), ours(x, y))


# ---- checkpoints both ways ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "bias"), CASES, ids=CASE_IDS)
def test_state_dict_loads_strictly_both_ways(name, bias):
    ours, orig = build(name, bias, seed=0)
    donor_ours, donor_orig = perturbed_pair(name, bias)
    ours.load_state_dict(donor_orig.state_dict(), strict=True)  # raises on any missing/unexpected/mis-shaped key
    for k, v in donor_orig.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    orig.load_state_dict(donor_ours.state_dict(), strict=True)
    for k, v in donor_ours.state_dict().items():
        assert torch.equal(orig.state_dict()[k], v), k
    x = make_x(torch.float32)
    assert_close(call(ours, name, x), call(orig, name, x), rtol_for(name, torch.float32), name)


# ---- the final-normaliser quirk and get_normalization -------------------------------------------------


def config(normalization):
    return SimpleNamespace(model=SimpleNamespace(normalization=normalization))


def test_final_normaliser_quirk_instance_norm_plus_gets_beta():
    ngf, num_classes = 8, 232
    norm = fsnn.get_normalization(config("InstanceNorm++"), conditional=False)
    assert norm is fsnn.InstanceNorm2dPlus
    torch.manual_seed(0)
    final = norm(ngf, num_classes)
    torch.manual_seed(0)
    orig = Orig.InstanceNorm2dPlus(ngf, num_classes)
    assert final.bias == num_classes
    assert list(final.state_dict()) == list(orig.state_dict()) == ["alpha", "gamma", "beta"]
    x = make_x(torch.float32, shape=(2, ngf, 5, 3))
    assert_close(final(x), orig(x), 1e-5, "final InstanceNorm2dPlus")


@pytest.mark.parametrize(("normalization", "cls"), [("InstanceNorm", nn.InstanceNorm2d), ("BatchNorm", nn.BatchNorm2d)])
def test_final_normaliser_quirk_torch_norms_get_eps_num_classes(normalization, cls):
    ngf, num_classes = 8, 232
    norm = fsnn.get_normalization(config(normalization), conditional=False)
    assert norm is cls
    final = norm(ngf, num_classes)
    assert final.eps == num_classes


@pytest.mark.parametrize("name", ["VarianceNorm2d", "NoneNorm2d"])
def test_final_normaliser_quirk_ignored_by_variance_and_none(name):
    torch.manual_seed(0)
    final = getattr(fsnn, name)(C, L)
    torch.manual_seed(0)
    orig = getattr(Orig, name)(C, L)
    assert not hasattr(final, "beta")
    assert list(final.state_dict()) == list(orig.state_dict())
    x = make_x(torch.float32)
    assert torch.equal(final(x), orig(x))


def test_get_normalization_mapping():
    conditional = {
        "NoneNorm": fsnn.ConditionalNoneNorm2d,
        "InstanceNorm++": fsnn.ConditionalInstanceNorm2dPlus,
        "InstanceNorm": fsnn.ConditionalInstanceNorm2d,
        "BatchNorm": fsnn.ConditionalBatchNorm2d,
        "VarianceNorm": fsnn.ConditionalVarianceNorm2d,
    }
    unconditional = {
        "BatchNorm": nn.BatchNorm2d,
        "InstanceNorm": nn.InstanceNorm2d,
        "InstanceNorm++": fsnn.InstanceNorm2dPlus,
        "VarianceNorm": fsnn.VarianceNorm2d,
        "NoneNorm": fsnn.NoneNorm2d,
        None: None,
    }
    for key, cls in conditional.items():
        assert fsnn.get_normalization(config(key)) is cls
        assert fsnn.get_normalization(config(key), conditional=True) is cls
    for key, cls in unconditional.items():
        assert fsnn.get_normalization(config(key), conditional=False) is cls


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("value", ["GroupNorm", "instancenorm++", 3])
def test_get_normalization_unknown_raises_naming_the_field(value, conditional):
    with pytest.raises(ValueError, match=r"config\.model\.normalization") as info:
        fsnn.get_normalization(config(value), conditional=conditional)
    assert repr(value) in str(info.value)
    assert isinstance(info.value, NotImplementedError)  # what ncsnv2 raises, still catchable as such


def test_get_normalization_conditional_none_raises():
    with pytest.raises(ValueError, match=r"config\.model\.normalization.*None"):
        fsnn.get_normalization(config(None), conditional=True)


# ---- act="elu" ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_act_elu_equals_elu_of_unfused(name, bias, dtype):
    plain, _ = perturbed_pair(name, bias, dtype)
    fused, _ = perturbed_pair(name, bias, dtype, act="elu")
    assert fused.act == "elu" and plain.act is None
    assert list(fused.state_dict()) == list(plain.state_dict())
    x0 = make_x(dtype)
    grad_out = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5), dtype=dtype)
    xf, xp = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    out = call(fused, name, xf)
    want = F.elu(call(plain, name, xp))
    assert (want < 0).any() and (want > 0).any()  # both branches of the ELU are exercised
    out.backward(grad_out)
    want.backward(grad_out)
    rtol = rtol_for(name, dtype)
    assert_close(out, want, rtol, "output")
    assert_close(xf.grad, xp.grad, rtol, "grad x")
    for (k, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        assert_close(p.grad, q.grad, rtol, f"grad {k}")


@pytest.mark.parametrize("name", sorted(FUSED))
@pytest.mark.parametrize("act", ["relu", "ELU", "none2", 1])
def test_bad_act_raises_naming_act(name, act):
    args = (C, L) if name in CONDITIONAL else (C,)
    with pytest.raises(ValueError, match=r"^act: "):
        getattr(fsnn, name)(*args, act=act)


def test_act_is_keyword_only():
    with pytest.raises(TypeError):
        fsnn.ConditionalInstanceNorm2dPlus(C, L, True, "elu")
    with pytest.raises(TypeError):
        fsnn.InstanceNorm2dPlus(C, True, "elu")


# ---- bad inputs ---------------------------------------------------------------------------------------

CONDITIONAL_CASES = [(name, bias) for name, bias in CASES if name in CONDITIONAL]
UNCONDITIONAL_CASES = [(name, bias) for name, bias in CASES if name not in CONDITIONAL]


def bad_calls():
    x = make_x(torch.float32)
    y = torch.tensor(LABELS)
    return {
        "x wrong C": (ValueError, r"^x: .*5 channels", torch.randn(3, C + 1, 7, 9), y),
        "x 3-D": (ValueError, r"^x: .*4-D", torch.randn(C, 7, 9), y),
        "x int": (TypeError, r"^x: ", torch.zeros(SHAPE, dtype=torch.int64), y),
        "x list": (TypeError, r"^x: ", [[1.0]], y),
        "y float": (TypeError, r"^y: .*int64", x, y.float()),
        "y int16": (TypeError, r"^y: .*int64", x, y.to(torch.int16)),
        "y list": (TypeError, r"^y: ", x, list(LABELS)),
        "y (N, 1)": (ValueError, r"^y: .*shape \(3,\)", x, y[:, None]),
        "y too short": (ValueError, r"^y: .*shape \(3,\)", x, y[:2]),
        "y scalar": (ValueError, r"^y: .*shape \(3,\)", x, y[0]),
        "y negative": (ValueError, r"^y: .*\[0, 4\)", x, torch.tensor([0, -1, 2])),
        "y == num_classes": (ValueError, r"^y: .*\[0, 4\)", x, torch.tensor([0, L, 2])),
    }


BAD = bad_calls()


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize(("name", "bias"), CONDITIONAL_CASES, ids=[f"{n}-{b}" for n, b in CONDITIONAL_CASES])
def test_bad_input_conditional_raises_naming_argument_and_modifies_nothing(name, bias, case):
    ours, _ = perturbed_pair(name, bias)
    exc, pattern, x, y = BAD[case]
    x_before = x.clone() if isinstance(x, torch.Tensor) else x
    y_before = y.clone() if isinstance(y, torch.Tensor) else y
    state_before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(exc, match=pattern):
        ours(x, y)
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, x_before)
    if isinstance(y, torch.Tensor):
        assert torch.equal(y, y_before)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state_before[k]), f"{k} modified"


@pytest.mark.parametrize("case", ["x wrong C", "x 3-D", "x int", "x list"])
@pytest.mark.parametrize(("name", "bias"), UNCONDITIONAL_CASES, ids=[f"{n}-{b}" for n, b in UNCONDITIONAL_CASES])
def test_bad_input_unconditional_raises_naming_x(name, bias, case):
    ours, _ = perturbed_pair(name, bias)
    exc, pattern, x, _ = BAD[case]
    x_before = x.clone() if isinstance(x, torch.Tensor) else x
    with pytest.raises(exc, match=pattern):
        ours(x)
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, x_before)


@pytest.mark.parametrize("name", ["ConditionalInstanceNorm2dPlus", "InstanceNorm2dPlus"])
def test_instance_norm_plus_single_channel_raises_naming_x(name):
    mod = getattr(fsnn, name)(*((1, L) if name in CONDITIONAL else (1,)))
    with pytest.raises(ValueError, match=r"^x: .*at least 2 channels"):
        call(mod, name, torch.randn(3, 1, 4, 4))
