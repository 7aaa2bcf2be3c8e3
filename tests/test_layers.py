"""fastscore.nn's fused RefineNet blocks against their plain-PyTorch twins in fastscore.nn.reference.

Every block is built twice under the same seed, once from each namespace (the fused one with the fused
normalisers of fastscore.nn, the reference one with the reference normalisers), and must match on:
state_dict keys, order and shapes, module tree, initial values (which pins the init RNG consumption),
outputs and every gradient on odd shapes, in float32 and float64. Also checked: the fused blocks keep
channels_last activations channels_last, run under bfloat16 autocast close to float32, fold the ELU into
the norm only where that is exact (ELU with alpha 1 after an InstanceNorm++ / conditional instance norm),
and reproduce the originals' quirks (dilated "down" blocks keep the resolution; adjust_padding 7 -> 4;
average pooling in the conditional CRP, max in the unconditional one; ConvMeanPool's sum order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from _tolerance import FLOOR
from _tolerance import RESULT_SCALE
from _tolerance import assert_float32_within_network_rounding
from _tolerance import default_dtype
from _tolerance import nearby
from _tolerance import rel_err

import fastscore
import fastscore.nn as fsnn
from fastscore.nn import layers as fused_ns
from fastscore.nn import reference as ref_ns

C, L = 6, 4
B = 2
LABELS = torch.tensor([3, 1])


def norms(ns, conditional=True):
    """The InstanceNorm++ class of a namespace (fused: fastscore.nn's, reference: plain PyTorch)."""
    src = fsnn if ns is fused_ns else ref_ns
    return src.ConditionalInstanceNorm2dPlus if conditional else src.InstanceNorm2dPlus


# Each case: (id, builder(ns) -> module, input shapes, kind) with kind in
# "cx" (x, y), "x" (x), "cxs" (xs, y, shape), "xs" (xs, shape).
CASES = [
    (
        "condres-same",
        lambda ns: ns.ConditionalResidualBlock(C, C, L, act=nn.ELU(), normalization=norms(ns)),
        [(B, C, 7, 9)],
        "cx",
    ),
    (
        "condres-down",
        lambda ns: ns.ConditionalResidualBlock(C, 2 * C, L, "down", nn.ELU(), norms(ns)),
        [(B, C, 8, 10)],
        "cx",
    ),
    (
        "condres-down-adjust-7to4",
        lambda ns: ns.ConditionalResidualBlock(C, 2 * C, L, "down", nn.ELU(), norms(ns), adjust_padding=True),
        [(B, C, 7, 7)],
        "cx",
    ),
    (
        "condres-down-dilated-keeps-size",
        lambda ns: ns.ConditionalResidualBlock(C, 2 * C, L, "down", nn.ELU(), norms(ns), dilation=2),
        [(B, C, 7, 9)],
        "cx",
    ),
    (
        "condres-dilated-adjust-ignored",
        lambda ns: ns.ConditionalResidualBlock(C, C, L, "down", nn.ELU(), norms(ns), adjust_padding=True, dilation=4),
        [(B, C, 7, 9)],
        "cx",
    ),
    ("res-same", lambda ns: ns.ResidualBlock(C, C, act=nn.ELU(), normalization=norms(ns, False)), [(B, C, 7, 9)], "x"),
    (
        "res-widen-conv1x1",
        lambda ns: ns.ResidualBlock(C, 2 * C, act=nn.ELU(), normalization=norms(ns, False)),
        [(B, C, 5, 3)],
        "x",
    ),
    ("res-down", lambda ns: ns.ResidualBlock(C, 2 * C, "down", nn.ELU(), norms(ns, False)), [(B, C, 6, 10)], "x"),
    (
        "res-down-adjust-7to4",
        lambda ns: ns.ResidualBlock(C, 2 * C, "down", nn.ELU(), norms(ns, False), adjust_padding=True),
        [(B, C, 7, 7)],
        "x",
    ),
    (
        "res-down-dilated",
        lambda ns: ns.ResidualBlock(C, C, "down", nn.ELU(), norms(ns, False), dilation=2),
        [(B, C, 9, 7)],
        "x",
    ),
    ("res-relu-plain-instancenorm", lambda ns: ns.ResidualBlock(C, C, act=nn.ReLU()), [(B, C, 5, 7)], "x"),
    ("condrcu", lambda ns: ns.CondRCUBlock(C, 2, 2, L, norms(ns), nn.ELU()), [(B, C, 7, 9)], "cx"),
    ("rcu-elu", lambda ns: ns.RCUBlock(C, 2, 2, nn.ELU()), [(B, C, 7, 9)], "x"),
    ("rcu-relu-3stages", lambda ns: ns.RCUBlock(C, 1, 3, nn.ReLU()), [(B, C, 5, 4)], "x"),
    ("condcrp-avg", lambda ns: ns.CondCRPBlock(C, 2, L, norms(ns), nn.ELU()), [(B, C, 7, 9)], "cx"),
    ("crp-max", lambda ns: ns.CRPBlock(C, 2, nn.ELU()), [(B, C, 7, 9)], "x"),
    ("crp-avg", lambda ns: ns.CRPBlock(C, 2, nn.ELU(), maxpool=False), [(B, C, 7, 9)], "x"),
    (
        "condmsf-upsample",
        lambda ns: ns.CondMSFBlock([C, 2 * C], C, L, norms(ns)),
        [(B, C, 8, 10), (B, 2 * C, 4, 5)],
        "cxs",
    ),
    ("msf-same-size", lambda ns: ns.MSFBlock([C, C], 2 * C), [(B, C, 7, 9), (B, C, 7, 9)], "xs"),
    (
        "condrefine-end",
        lambda ns: ns.CondRefineBlock([C, 2 * C], C, L, norms(ns), nn.ELU(), end=True),
        [(B, C, 8, 6), (B, 2 * C, 4, 3)],
        "cxs",
    ),
    (
        "condrefine-start",
        lambda ns: ns.CondRefineBlock([C], C, L, norms(ns), nn.ELU(), start=True),
        [(B, C, 5, 7)],
        "cxs",
    ),
    ("refine", lambda ns: ns.RefineBlock([C, 2 * C], C, nn.ELU()), [(B, C, 8, 6), (B, 2 * C, 4, 3)], "xs"),
    ("refine-start-end", lambda ns: ns.RefineBlock([C], C, nn.ELU(), start=True, end=True), [(B, C, 5, 7)], "xs"),
    ("convmeanpool", lambda ns: ns.ConvMeanPool(C, 2 * C), [(B, C, 8, 6)], "x"),
    ("convmeanpool-adjust-7to4", lambda ns: ns.ConvMeanPool(C, 2 * C, 1, adjust_padding=True), [(B, C, 7, 7)], "x"),
    ("meanpoolconv", lambda ns: ns.MeanPoolConv(C, 2 * C), [(B, C, 6, 8)], "x"),
    ("upsampleconv", lambda ns: ns.UpsampleConv(C, 2 * C), [(B, C, 3, 5)], "x"),
]
IDS = [c[0] for c in CASES]
CASE = {c[0]: c for c in CASES}


def build_pair(case, *, seed=0, perturb=True):
    """(fused, reference), built under the same seed; with perturb, identical non-trivial parameters."""
    _, builder, _, _ = case
    torch.manual_seed(seed)
    fused = builder(fused_ns)
    torch.manual_seed(seed)
    ref = builder(ref_ns)
    if perturb:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
        fused.load_state_dict(ref.state_dict())
    return fused, ref


def make_inputs(shapes, dtype=torch.float32, channels_last=False):
    gen = torch.Generator().manual_seed(2)
    xs = []
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
        x = x + 2 * torch.randn(1, shape[1], 1, 1, generator=gen, dtype=torch.float64)  # distinct channel means
        x = x.to(dtype)
        xs.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
    return xs


def call(module, kind, xs):
    if kind == "cx":
        return module(xs[0], LABELS)
    if kind == "x":
        return module(xs[0])
    if kind == "cxs":
        return module(list(xs), LABELS, xs[0].shape[2:])
    return module(list(xs), xs[0].shape[2:])


def assert_close(got, want, rtol, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.1e} * {scale:.3g}"


RTOL = {torch.float64: 1e-11}  # float32 results: assert_float32_within_block_rounding


pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


# ---- structure and init ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_module_tree_and_init_match(case):
    fused, ref = build_pair(case, seed=7, perturb=False)
    assert type(fused).__name__ == type(ref).__name__
    assert isinstance(fused, type(ref))  # the fused class shares its twin's constructor
    assert [(k, tuple(v.shape)) for k, v in fused.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]
    assert [k for k, _ in fused.named_modules()] == [k for k, _ in ref.named_modules()]
    for (k, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{k} differs at init (RNG consumed in another order?)"


def test_every_fused_block_is_exported_and_has_a_twin():
    for name in fused_ns.__all__:
        cls = getattr(fused_ns, name)
        if isinstance(cls, type):
            assert getattr(fsnn, name) is cls
            assert issubclass(cls, getattr(ref_ns, name))
            assert cls is not getattr(ref_ns, name)


# ---- forward and gradients --------------------------------------------------------------------------------


def block_results(module, kind, xs, grad=None):
    """[output, grad of each input, grad of each parameter (empty where none)] of ``module`` at inputs
    ``xs`` in their dtype, with ``grad`` as the output's gradient; without ``grad``, [output] only."""
    module.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(grad is not None) for x in xs]
    with default_dtype(xs[0].dtype):
        out = call(module, kind, xs)
    if grad is None:
        return [out.detach()]
    out.backward(grad.to(out.dtype))
    params = [p.grad if p.grad is not None else out.new_empty(0) for p in module.parameters()]
    return [out.detach(), *(x.grad for x in xs), *params]


def in_float64(xs):
    return [x.double() for x in xs]


def assert_float32_within_block_rounding(fused, ref, kind, x0, grad=None, labels=("output",), *, fused_run=None):
    """The float32 results of ``fused`` within the rounding error the float32 ``ref`` block makes, at x0 and
    nearby inputs, max pooling judged on the side of each near-tie the float32 run took (tests/_tolerance.py)."""
    ref64 = copy.deepcopy(ref).double()
    return assert_float32_within_network_rounding(
        fused_run or (lambda xs: block_results(fused, kind, xs, grad)),
        lambda xs: block_results(ref, kind, xs, grad),
        lambda xs: block_results(ref64, kind, in_float64(xs), grad),
        nearby(x0),
        list(labels),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_and_all_gradients_match_reference(case, dtype):
    fused, ref = build_pair(case)
    fused, ref = fused.to(dtype), ref.to(dtype)
    kind, shapes = case[3], case[2]
    x0 = make_inputs(shapes, dtype)
    with default_dtype(dtype):
        shape = call(ref, kind, x0).shape
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    got, want = block_results(fused, kind, x0, grad), block_results(ref, kind, x0, grad)
    assert got[0].dtype == want[0].dtype == dtype
    for i in range(len(x0)):
        assert got[1 + i].abs().max() > 0, f"input {i} got no gradient"
    for (k, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), k
    labels = ["output", *(f"grad of input {i}" for i in range(len(x0)))]
    labels += [f"grad {k}" for k, _ in fused.named_parameters()]
    if dtype == torch.float32:
        assert_float32_within_block_rounding(fused, ref, kind, x0, grad, labels)
    else:  # the same formulas
        for what, a, b in zip(labels, got, want):
            assert_close(a, b, RTOL[dtype], what)
    xs = [x.clone().requires_grad_() for x in x0]
    with default_dtype(dtype):
        call(fused, kind, xs).backward(grad)
    for a, b in zip(x0, xs):
        assert torch.equal(a, b.detach()), "the block modified its input"


@pytest.mark.parametrize("name", ["condres-down", "rcu-elu", "crp-max", "condcrp-avg", "msf-same-size"])
def test_no_grad_forward_matches_and_leaves_inputs_alone(name):
    # Without autograd more sums run in place: the results and the inputs must not change.
    case = CASE[name]
    fused, ref = build_pair(case)
    x0 = make_inputs(case[2])
    xs = [x.clone() for x in x0]
    with torch.no_grad():
        call(fused, case[3], xs)
    for a, b in zip(x0, xs):
        assert torch.equal(a, b)

    def no_grad(xs):
        with torch.no_grad():
            return [call(fused, case[3], [x.clone() for x in xs])]

    assert_float32_within_block_rounding(fused, ref, case[3], x0, labels=[name], fused_run=no_grad)


@pytest.mark.parametrize("name", ["condres-down", "res-down-adjust-7to4", "condrcu", "crp-max", "condmsf-upsample"])
def test_forced_reference_backend_matches(name):
    case = CASE[name]
    fused, ref = build_pair(case)

    def forced(xs):
        with fastscore.use_backend("ref"):
            return block_results(fused, case[3], xs)

    assert_float32_within_block_rounding(fused, ref, case[3], make_inputs(case[2]), labels=[name], fused_run=forced)


# ---- quirks ----------------------------------------------------------------------------------------------------


def test_resolutions_dilated_down_keeps_size_and_adjust_padding_7_to_4():
    x = make_inputs([(B, C, 7, 9)])[0]
    fused, ref = build_pair(CASE["condres-down-dilated-keeps-size"])
    assert fused(x, LABELS).shape == ref(x, LABELS).shape == (B, 2 * C, 7, 9)
    x7 = make_inputs([(B, C, 7, 7)])[0]
    fused, ref = build_pair(CASE["condres-down-adjust-7to4"])
    assert fused(x7, LABELS).shape == ref(x7, LABELS).shape == (B, 2 * C, 4, 4)
    assert "conv2.conv.1.weight" in fused.state_dict() and "shortcut.conv.1.weight" in fused.state_dict()
    fused, _ = build_pair(CASE["condres-dilated-adjust-ignored"])
    assert fused(make_inputs([(B, C, 7, 9)])[0], LABELS).shape == (B, C, 7, 9)
    assert "shortcut.weight" in fused.state_dict()  # a dilated conv, not a ConvMeanPool


def test_conv_mean_pool_is_bitwise_the_original_sum_order():
    fused, ref = build_pair(CASE["convmeanpool"])
    x = make_inputs([(B, C, 8, 6)])[0]
    out = fused(x)
    assert torch.equal(out, ref(x))
    o = ref.conv(x)
    a, b, c, d = o[:, :, ::2, ::2], o[:, :, 1::2, ::2], o[:, :, ::2, 1::2], o[:, :, 1::2, 1::2]
    assert torch.equal(out, (((a + b) + c) + d) / 4)
    odd = make_inputs([(B, C, 7, 6)])[0]  # odd size without adjust_padding fails in both, as in the originals
    with pytest.raises(RuntimeError):
        ref(odd)
    with pytest.raises(RuntimeError):
        fused(odd)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_mean_pool_backward_is_bitwise_autograd_through_the_slices_and_twice_differentiable(channels_last):
    x = make_inputs([(B, C, 6, 8)], torch.float64, channels_last)[0].requires_grad_()
    xr = x.detach().clone().requires_grad_()
    out = fused_ns.mean_pool_2x2(x)
    want = ref_ns.mean_pool_2x2(xr)
    assert torch.equal(out, want)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grad = grad.contiguous(memory_format=torch.channels_last) if channels_last else grad
    (gx,) = torch.autograd.grad(out, x, grad, create_graph=True)
    (gr,) = torch.autograd.grad(want, xr, grad, create_graph=True)
    assert torch.equal(gx, gr)
    assert gx.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.autograd.gradgradcheck(fused_ns.mean_pool_2x2, (x,))
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(fused_ns.mean_pool_2x2, (x.detach(),), (tangent,))
    assert torch.equal(jvp, ref_ns.mean_pool_2x2(tangent))


def test_mean_pool_compiled_backward_is_the_one_pass_function_and_bitwise_eager():
    """Compiled training differentiates the pooling with _MeanPool2x2's backward (a nearest upsampling; Inductor's
    own gradient of the four slices, zero-filled slice_backward sums, compiles to a slow masked gather), and
    its gradient is bitwise the eager one."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    x = make_inputs([(B, C, 6, 8)], torch.float32, True)[0]
    grad = torch.randn((B, C, 3, 4), generator=torch.Generator().manual_seed(4))
    grad = grad.contiguous(memory_format=torch.channels_last)

    def backward_ops(pool):
        graphs = []

        def keep_backward(gm, example_inputs):
            graphs.append(gm)
            return make_boxed_func(gm.forward)

        backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=keep_backward)
        torch._dynamo.reset()
        xc = x.clone().requires_grad_()
        torch.compile(lambda t: (pool(t * 2.0) * grad).sum(), backend=backend, fullgraph=True)(xc).backward()
        return {str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"}

    assert "aten.slice_backward.default" in backward_ops(ref_ns.mean_pool_2x2)  # what the test guards against
    assert "aten.slice_backward.default" not in backward_ops(fused_ns.mean_pool_2x2)

    def loss(t):
        return (fused_ns.mean_pool_2x2(t * 2.0) * grad).sum()

    torch._dynamo.reset()
    xc = x.clone().requires_grad_()
    torch.compile(loss, fullgraph=True, dynamic=False)(xc).backward()
    xe = x.clone().requires_grad_()
    loss(xe).backward()
    assert torch.equal(xc.grad, xe.grad)
    assert xc.grad.is_contiguous(memory_format=torch.channels_last)


def test_a_max_pooling_near_tie_is_judged_on_the_side_the_float32_run_took():
    """Two inputs of a pooling window that are equal in float32 and not in float64: the float32 blocks
    route the window's gradient to the first of them, the float64 reference to the larger. Against the
    plain float64 reference that is an error of the size of the gradient; the reference pinned to the
    float32 run's choices (tests/_tolerance.py) sees only rounding."""
    case = CASE["crp-max"]
    fused, ref = build_pair(case)
    x64 = make_inputs(case[2], torch.float64)[0]
    top = x64.abs().max().item() + 1.0  # above every other input: the maximum of every window that holds it
    x64[0, 0, 3, 4] = top
    x64[0, 0, 3, 5] = top * (1 + 2.0**-30)  # larger in float64, the same float32 number
    x = x64.float()
    assert x[0, 0, 3, 4] == x[0, 0, 3, 5]
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    got = block_results(fused, "x", [x], grad)
    plain = block_results(copy.deepcopy(ref).double(), "x", [x64], grad)
    tie = rel_err(got[1], plain[1])  # the error the tie puts into the input's gradient
    # The first input has the tie; the nearby ones are ordinary inputs.
    labels = ["output", "grad of input 0", *(f"grad {k}" for k, _ in fused.named_parameters())]
    points = [[x]] + nearby([x])[1:]
    ref64 = copy.deepcopy(ref).double()
    own = assert_float32_within_network_rounding(
        lambda xs: block_results(fused, "x", xs, grad),
        lambda xs: block_results(ref, "x", xs, grad),
        lambda xs: block_results(ref64, "x", in_float64(xs) if xs[0] is not x else [x64], grad),
        points,
        labels,
    )
    # Pinned, the float32 reference's errors stay rounding-sized: the tie alone exceeds the tolerance.
    assert tie > max(FLOOR[torch.float32], RESULT_SCALE * own), (tie, own)


def test_crp_pool_modes_follow_the_pool_module():
    cond, _ = build_pair(CASE["condcrp-avg"])
    assert isinstance(cond.maxpool, nn.AvgPool2d) and fused_ns.crp_pool_mode(cond.maxpool) == "avg"
    crp, _ = build_pair(CASE["crp-max"])
    assert isinstance(crp.maxpool, nn.MaxPool2d) and fused_ns.crp_pool_mode(crp.maxpool) == "max"
    crp_avg, _ = build_pair(CASE["crp-avg"])
    assert fused_ns.crp_pool_mode(crp_avg.maxpool) == "avg"
    assert fused_ns.crp_pool_mode(nn.MaxPool2d(3, 1, 1)) is None  # any other pooling runs as the module itself
    assert fused_ns.crp_pool_mode(nn.AvgPool2d(5, 1, 2, count_include_pad=False)) is None
    # A CRP block whose pooling crp_pool does not cover still matches the reference.
    fused, ref = build_pair(CASE["crp-max"])
    fused.maxpool = ref.maxpool = nn.MaxPool2d(3, 1, 1)
    assert_float32_within_block_rounding(fused, ref, "x", make_inputs([(B, C, 7, 9)]), labels=["crp with a 3x3 pool"])


def test_norm_elu_fusion_only_for_elu_alpha_one_after_an_instance_norm_plus():
    block = fsnn.ConditionalResidualBlock(C, C, L, act=nn.ELU(), normalization=fsnn.ConditionalInstanceNorm2dPlus)
    assert block.normalize1.act == "elu" and block.normalize2.act == "elu"
    block = fsnn.ResidualBlock(C, C, act=nn.ELU(alpha=0.5), normalization=fsnn.InstanceNorm2dPlus)
    assert block.normalize1.act is None
    block = fsnn.ResidualBlock(C, C, act=nn.ReLU(), normalization=fsnn.InstanceNorm2dPlus)
    assert block.normalize1.act is None
    rcu = fsnn.CondRCUBlock(C, 1, 2, L, fsnn.ConditionalInstanceNorm2d, nn.ELU())
    assert rcu._modules["1_1_norm"].act == "elu"
    crp = fsnn.CondCRPBlock(C, 2, L, fsnn.ConditionalInstanceNorm2dPlus, nn.ELU())
    assert all(n.act is None for n in crp.norms)  # pooled, not activated, after the norm
    bn = fsnn.ConditionalResidualBlock(C, C, L, act=nn.ELU(), normalization=fsnn.ConditionalBatchNorm2d)
    assert not hasattr(bn.normalize1, "act")
    # A block whose activation was swapped after construction refuses to apply the wrong one.
    block = fsnn.ResidualBlock(C, C, act=nn.ELU(), normalization=fsnn.InstanceNorm2dPlus)
    block.non_linearity = nn.ReLU()
    with pytest.raises(RuntimeError, match="ELU"):
        block(make_inputs([(B, C, 5, 5)])[0])


def test_alpha_half_elu_block_matches_reference():
    torch.manual_seed(0)
    fused = fsnn.ResidualBlock(C, C, act=nn.ELU(alpha=0.5), normalization=fsnn.InstanceNorm2dPlus)
    torch.manual_seed(0)
    ref = ref_ns.ResidualBlock(C, C, act=nn.ELU(alpha=0.5), normalization=ref_ns.InstanceNorm2dPlus)
    assert_float32_within_block_rounding(fused, ref, "x", make_inputs([(B, C, 5, 7)]), labels=["ELU(alpha=0.5) block"])


def test_conditional_block_without_kernel_size_shortcut_fails_clearly():
    # ncsn / ncsnv2 call nn.Conv2d(in, out) without a kernel size here (a TypeError); so do we, with a message.
    for ns in (fused_ns, ref_ns):
        with pytest.raises(TypeError, match="kernel size"):
            ns.ConditionalResidualBlock(C, 2 * C, L, None, nn.ELU(), norms(ns))


def test_msf_sums_in_the_activation_dtype_where_the_original_needs_the_default_dtype():
    fused, ref = build_pair(CASE["condmsf-upsample"])
    fused, ref = fused.double(), ref.double()
    xs = make_inputs(CASE["condmsf-upsample"][2], torch.float64)
    out = fused(xs, LABELS, xs[0].shape[2:])
    assert out.dtype == torch.float64  # the documented deviation: no default-dtype buffer
    # the original silently downcasts (docs/numerics.md#the-msf-sum-dtype)
    assert ref(xs, LABELS, xs[0].shape[2:]).dtype == torch.float32
    with default_dtype(torch.float64):
        assert_close(out, ref(xs, LABELS, xs[0].shape[2:]), RTOL[torch.float64], "float64 MSF")


# ---- layout and autocast -----------------------------------------------------------------------------------


# torch's own nn.InstanceNorm2d (the fallback normaliser of that case) returns contiguous tensors.
CL_CASES = [c for c in CASES if c[0] != "res-relu-plain-instancenorm"]


@pytest.mark.parametrize("case", CL_CASES, ids=[c[0] for c in CL_CASES])
def test_channels_last_stays_channels_last(case):
    fused, ref = build_pair(case)
    kind, shapes = case[3], case[2]
    xs = make_inputs(shapes, channels_last=True)
    not_cl = []

    def hook(module, inputs, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] > 1:
            if not output.is_contiguous(memory_format=torch.channels_last):
                not_cl.append(type(module).__name__)

    handles = [m.register_forward_hook(hook) for m in fused.modules()]
    try:
        out = call(fused, kind, xs)
    finally:
        for h in handles:
            h.remove()
    assert not not_cl, f"activations left channels_last in {not_cl}"
    assert out.is_contiguous(memory_format=torch.channels_last)

    def channels_last(xs):
        return block_results(fused, kind, [x.contiguous(memory_format=torch.channels_last) for x in xs])

    x0 = make_inputs(shapes)
    assert_float32_within_block_rounding(fused, ref, kind, x0, labels=["channels_last output"], fused_run=channels_last)


@pytest.mark.parametrize("name", ["condres-down", "res-down-adjust-7to4", "condrefine-end", "refine", "crp-max"])
def test_bfloat16_autocast_runs_and_is_close(name):
    case = CASE[name]
    fused, ref = build_pair(case)
    xs = make_inputs(case[2], channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(fused, case[3], xs)
        out_ref_autocast = call(ref, case[3], make_inputs(case[2]))
    want = call(ref, case[3], make_inputs(case[2]))
    assert torch.isfinite(out).all()
    scale = want.abs().max().item()
    err = (out.float() - want).abs().max().item()
    err_ref = (out_ref_autocast.float() - want).abs().max().item()
    assert err <= max(4 * err_ref, 2e-2 * scale), f"bf16 error {err:.3e} (reference under autocast {err_ref:.3e})"
    out.float().sum().backward()  # and the backward runs
