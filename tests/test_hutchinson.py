"""fastscore.ops.hutchinson: Hutchinson divergence estimates, the exact trace, and the forward/reverse engines."""

import pytest
import torch
import torch.nn as nn
from torch.autograd import forward_ad

from fastscore import losses
from fastscore.models import get_config
from fastscore.models import get_model
from fastscore.ops import exact_divergence
from fastscore.ops import hutchinson_divergence
from fastscore.ops.hutchinson import hutchinson_divergence_ref
from fastscore.ops.hutchinson import make_probes
from fastscore.ops.hutchinson import probe_products

pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


D = 3


def _nonlinear(A: torch.Tensor):
    """A per-sample nonlinear map R^D -> R^D with a non-symmetric, input-dependent Jacobian."""

    def fn(x):
        h = x @ A.t()
        return torch.tanh(h) * (1 + x.pow(2).sum(dim=1, keepdim=True)).sqrt() + torch.sin(x).roll(1, dims=1)

    return fn


def _jacobian_trace(fn, x):
    return torch.stack([torch.trace(torch.autograd.functional.jacobian(lambda v: fn(v[None])[0], xi)) for xi in x])


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    x = torch.randn(5, D, generator=g, dtype=torch.float64)
    return _nonlinear(A), x


# ---- the exact trace -------------------------------------------------------------------------------------


def test_exact_divergence_is_the_jacobian_trace(problem):
    fn, x = problem
    fx, div = exact_divergence(fn, x)
    torch.testing.assert_close(fx, fn(x))
    torch.testing.assert_close(div, _jacobian_trace(fn, x))
    A = torch.randn(D, D, dtype=torch.float64)
    _, div_lin = exact_divergence(lambda h: h @ A.t(), x)
    torch.testing.assert_close(div_lin, torch.trace(A).expand(5))


def test_exact_divergence_images_and_graph():
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    # A convolution's Jacobian trace: each output pixel's own input pixel, through the kernel centre,
    # except where padding hides nothing (the centre always sees its own pixel).
    want = conv.weight[[0, 1], [0, 1], 1, 1].sum() * 16
    fx, div = exact_divergence(conv, x, create_graph=True)
    torch.testing.assert_close(div, want.expand(3))
    div.sum().backward()
    grad = conv.weight.grad
    assert grad[0, 0, 1, 1] == 48 and grad[1, 1, 1, 1] == 48 and grad.abs().sum() == 96


# ---- the estimator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_unbiased(problem, probe):
    fn, x = problem
    _, exact = exact_divergence(fn, x)
    # 20000 one-probe estimates per sample, as one batch of copies (fn acts per sample).
    copies = x.repeat(20000, 1)
    _, single = hutchinson_divergence(fn, copies, probe=probe, seed=3)
    single = single.reshape(20000, x.shape[0])
    mean, sem = single.mean(0), single.std(0) / single.shape[0] ** 0.5
    assert bool((sem > 0).all())
    assert bool(((mean - exact).abs() < 5 * sem).all()), f"estimate {mean} vs exact {exact} (sem {sem})"
    # n_probes averages per-probe products.
    probes = make_probes(x, 3, probe, seed=3)
    _, prods = probe_products(fn, x, probes)
    _, div = hutchinson_divergence(fn, x, n_probes=3, probe=probe, seed=3)
    torch.testing.assert_close(div, prods.mean(0))


def test_rademacher_and_gaussian_probes(problem):
    _, x = problem
    r = make_probes(x, 64, "rademacher", seed=0)
    g = make_probes(x, 64, "gaussian", seed=0)
    assert r.shape == g.shape == (64, *x.shape) and r.dtype == g.dtype == x.dtype
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(r, torch.where(g >= 0, 1.0, -1.0).to(x.dtype))  # signs of the same normals
    big = make_probes(torch.zeros(4, 1000), 8, "gaussian", seed=5)
    assert abs(float(big.mean())) < 0.02 and abs(float(big.var()) - 1) < 0.03
    # Diagonal Jacobian: every Rademacher probe gives the exact trace (v_i^2 = 1); Gaussian ones do not.
    d = torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64)
    diag = lambda h: h * d
    _, rad = probe_products(diag, x, r)
    torch.testing.assert_close(rad, torch.full_like(rad, 2.5))
    _, gau = probe_products(diag, x, g)
    assert float(gau.std()) > 0.5


def test_seeded_reproducibility(problem):
    fn, x = problem
    a = hutchinson_divergence(fn, x, n_probes=3, seed=11)
    b = hutchinson_divergence(fn, x, n_probes=3, seed=11)
    c = hutchinson_divergence(fn, x, n_probes=3, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    torch.manual_seed(4)
    d = hutchinson_divergence(fn, x, seed=None)[1]
    torch.manual_seed(4)
    assert torch.equal(d, hutchinson_divergence(fn, x, seed=None)[1])
    e = hutchinson_divergence(fn, x, seed=11, counter=1)[1]
    assert not torch.equal(e, hutchinson_divergence(fn, x, seed=11)[1])


def test_batch_invariant_probes(problem):
    fn, x = problem
    for probe in ("rademacher", "gaussian"):
        full = make_probes(x, 2, probe, seed=7)
        part = make_probes(x[2:4], 2, probe, seed=7, sample_offset=2)
        assert torch.equal(part, full[:, 2:4])
    whole = hutchinson_divergence(fn, x, n_probes=2, seed=7)[1]
    piece = hutchinson_divergence(fn, x[2:4], n_probes=2, seed=7, sample_offset=2)[1]
    torch.testing.assert_close(piece, whole[2:4], rtol=1e-12, atol=1e-12)


def test_forward_and_reverse_agree(problem):
    fn, x = problem
    fwd = hutchinson_divergence(fn, x, n_probes=3, seed=2, mode="forward")
    rev = hutchinson_divergence(fn, x, n_probes=3, seed=2, mode="reverse")
    auto = hutchinson_divergence(fn, x, n_probes=3, seed=2)
    probes = make_probes(x, 3, seed=2)
    ref_fx, ref = hutchinson_divergence_ref(fn, x, probes)
    for fx, div in (fwd, rev, auto):
        torch.testing.assert_close(fx, fn(x), rtol=0, atol=0)
        torch.testing.assert_close(div, ref, rtol=1e-12, atol=1e-12)
        assert not fx.requires_grad and not div.requires_grad
    torch.testing.assert_close(ref_fx, fn(x), rtol=0, atol=0)


def test_closure_with_labels_and_explicit_probes():
    emb = nn.Embedding(4, 3).double()
    fn_y = lambda h, y: torch.tanh(h * emb(y))
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    v = make_probes(x, 1, seed=0)[0]
    _, div = hutchinson_divergence(lambda h: fn_y(h, y), x, probes=v)
    _, exact = exact_divergence(lambda h: fn_y(h, y), x)
    # Diagonal Jacobian and Rademacher probes: exact.
    torch.testing.assert_close(div, exact)


def test_create_graph_gives_parameter_gradients():
    A = torch.randn(D, D, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, D, dtype=torch.float64)
    probes = make_probes(x, 2, "gaussian", seed=9)
    fx, div = hutchinson_divergence(lambda h: h @ A.t(), x, probes=probes, create_graph=True)
    assert fx.requires_grad and div.requires_grad
    (grad,) = torch.autograd.grad(div.sum(), A)
    # d/dA of v^T A v is v v^T; summed over samples, averaged over probes.
    want = torch.einsum("pni,pnj->ij", probes, probes) / 2
    torch.testing.assert_close(grad, want)


def test_forward_mode_skips_the_weight_tangent_product():
    """The forward engine's conv/linear rule gives stock forward-mode AD's value and tangent."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ELU(), nn.Conv2d(3, 2, 1)).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    v = torch.randn_like(x)
    with torch.no_grad(), forward_ad.dual_level():
        out = net(forward_ad.make_dual(x, v))
        want_value, want_tangent = forward_ad.unpack_dual(out)
    fx, prods = probe_products(net, x, v, mode="forward")
    torch.testing.assert_close(fx, want_value, rtol=0, atol=0)
    torch.testing.assert_close(prods[0], (want_tangent * v).sum(dim=(1, 2, 3)))
    lin = nn.Linear(3, 3).double()
    xl = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        hutchinson_divergence(lin, xl, mode="forward", seed=0)[1],
        hutchinson_divergence(lin, xl, mode="reverse", seed=0)[1],
    )


def test_output_independent_of_x():
    x = torch.randn(3, 2)
    c = torch.randn(3, 2)
    for mode in ("forward", "reverse"):
        if mode == "reverse":
            with pytest.raises(RuntimeError):  # autograd: nothing connects the output to x
                hutchinson_divergence(lambda h: c.clone(), x, mode=mode, seed=0)
        else:
            fx, div = hutchinson_divergence(lambda h: c.clone(), x, mode=mode, seed=0)
            assert torch.equal(fx, c) and torch.equal(div, torch.zeros(3))


# ---- through fastscore's models ----------------------------------------------------------------------------


@pytest.fixture(params=["NCSNv2", "NCSN"])
def tiny_models(request):
    """demo_tiny's NCSNv2 (unconditional, max-pool CRP) and the conditional NCSN (label-gathered InstanceNorm++,
    average-pool CRP) in float64, reference and fused layers with the same weights.

    The models' MSF blocks accumulate in the default dtype (an ncsnv2 quirk:
    docs/numerics.md#the-msf-sum-dtype), so float64 models run with float64 as the default dtype.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        config = get_config("demo_tiny")
        config.model.arch = request.param
        ref = get_model(config, layers="reference")
        fused = get_model(config, layers="fused")
        fused.load_state_dict(ref.state_dict())
        yield config, ref, fused
    finally:
        torch.set_default_dtype(previous)


def _tiny_inputs(config, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = config.data.channels, config.data.image_size
    x = torch.rand(n, c, s, s, generator=g, dtype=torch.float64)
    y = torch.randint(0, config.model.num_classes, (n,), generator=g)
    return x, y


def test_jvp_through_models_matches_reference_layers(tiny_models):
    config, ref, fused = tiny_models
    x, y = _tiny_inputs(config)
    v = torch.randn_like(x)
    out_r, tan_r = torch.func.jvp(lambda h: ref(h, y), (x,), (v,))
    out_f, tan_f = torch.func.jvp(lambda h: fused(h, y), (x,), (v,))
    assert float(tan_r.detach().abs().max()) > 1e-3
    torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tan_f, tan_r, rtol=1e-7, atol=1e-7)
    with torch.no_grad(), forward_ad.dual_level():
        tan_ad = forward_ad.unpack_dual(fused(forward_ad.make_dual(x, v), y)).tangent
    torch.testing.assert_close(tan_ad, tan_r, rtol=1e-7, atol=1e-7)


def test_divergence_through_models(tiny_models):
    config, ref, fused = tiny_models
    x, y = _tiny_inputs(config, seed=1)
    probes = make_probes(x, 2, seed=4)
    ref_fx, ref_div = hutchinson_divergence_ref(lambda h: ref(h, y), x, probes)
    assert float(ref_div.abs().min()) > 0
    for mode in ("forward", "reverse"):
        fx, div = hutchinson_divergence(lambda h: fused(h, y), x, probes=probes, mode=mode)
        torch.testing.assert_close(fx, ref_fx, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(div, ref_div, rtol=1e-7, atol=1e-7)
    # channels_last input: the probes follow x's layout, results do not change.
    xc = x.contiguous(memory_format=torch.channels_last)
    for mode in ("forward", "reverse"):
        fx, div = hutchinson_divergence(lambda h: fused(h, y), xc, probes=probes, mode=mode)
        torch.testing.assert_close(div, ref_div, rtol=1e-7, atol=1e-7)


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_ssm_parameter_gradients_fused_equal_reference(tiny_models):
    """Sliced score matching differentiates the network twice: fused layers give the reference gradients."""
    config, ref, fused = tiny_models
    x, y = _tiny_inputs(config, seed=2)
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.1])

    def loss(model):
        torch.manual_seed(5)
        return losses.anneal_sliced_score_matching(model, x, sigmas, y, n_particles=2)

    g_ref, g_fused = _grads(ref, loss(ref)), _grads(fused, loss(fused))
    assert g_ref.keys() == g_fused.keys() and len(g_ref) > 10
    for k in g_ref:
        torch.testing.assert_close(g_fused[k], g_ref[k], rtol=1e-6, atol=1e-8, msg=lambda m, k=k: f"{k}: {m}")
    assert any(float(g.abs().max()) > 0 for g in g_ref.values())


# ---- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        ({"fn": 3}, TypeError, "fn"),
        ({"x": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "x"),
        ({"x": torch.zeros(3)}, ValueError, "x"),
        ({"x": [1.0, 2.0]}, TypeError, "x"),
        ({"n_probes": 0}, ValueError, "n_probes"),
        ({"n_probes": 1.5}, TypeError, "n_probes"),
        ({"probe": "sphere"}, ValueError, "probe"),
        ({"mode": "both"}, ValueError, "mode"),
        ({"mode": "forward", "create_graph": True}, ValueError, "mode"),
        ({"create_graph": 1}, TypeError, "create_graph"),
        ({"probes": torch.zeros(2, 3)}, ValueError, "probes"),
        ({"probes": torch.zeros(1, 3, 2)}, ValueError, "probes"),
        ({"fn": lambda h: h.sum(dim=1)}, ValueError, "fn"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_input(kwargs, exc, name):
    args = {"fn": torch.tanh, "x": torch.zeros(4, 2), **kwargs}
    fn, x = args.pop("fn"), args.pop("x")
    with pytest.raises(exc, match=rf"^{name}\b"):
        hutchinson_divergence(fn, x, **args)
    with pytest.raises((TypeError, ValueError), match=r"^fn\b"):
        exact_divergence(None, torch.zeros(2, 2))
