"""crp_pool (RefineNet CRP 5x5 pooling): every backend that runs here against the float64 reference.

Values and gradients over dtypes x shapes x layouts x modes; max-mode routing identical to PyTorch's on
ties, -inf and NaN; float64 gradcheck and gradgradcheck; forward mode (jvp, jvp of grad) with non-zero
tangents; opcheck on every custom op; torch.compile parity; bad input.
"""

import pytest
import torch
import torch.nn.functional as F
from _backends import kernel_backends
from _backends import use
from _tolerance import assert_close_to_reference

from fastscore.ops import crp_pool
from fastscore.ops import crp_pool_ref

BACKENDS = kernel_backends("cpu")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
MODES = ("max", "avg")
# (N, C, H, W): H * W = 1; H and W below the window (5); odd sizes; N = 1 with C = 40 (the C++
# kernel splits channels_last channels into blocks of 16, 16 and 8); a larger one that runs on
# several threads with rows that are not a whole number of vectors.
SHAPES = ((2, 3, 1, 1), (1, 5, 3, 7), (3, 17, 9, 11), (1, 40, 6, 9), (2, 6, 33, 70))
LAYOUTS = ("contiguous", "channels_last", "strided")


def _keeps(backend, dtype, shape, layout) -> bool:
    if backend == "triton":
        # Triton runs in its interpreter here (slow): small shapes, the two layouts the kernels read,
        # the low-precision dtypes on one shape.
        if shape not in SHAPES[:3] or layout == "strided":
            return False
        return dtype in (torch.float64, torch.float32) or shape == SHAPES[1]
    if backend == "ref":  # the reference itself (through the custom ops): the plumbing, not the numerics
        return dtype in (torch.float32, torch.bfloat16) and shape in SHAPES[1:4]
    return True


def _cases():
    for backend in BACKENDS:
        for dtype in DTYPES:
            for shape in SHAPES:
                for layout in LAYOUTS:
                    if not _keeps(backend, dtype, shape, layout):
                        continue
                    for mode in MODES:
                        yield pytest.param(
                            backend,
                            dtype,
                            shape,
                            layout,
                            mode,
                            id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{layout}-{mode}",
                        )


def _in_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # same values, strides of neither supported layout
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def make_x(shape, dtype, layout="contiguous"):
    """Activations away from 0 with a spread of magnitudes (ties only where the dtype rounds them)."""
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    return _in_layout(x.to(dtype), layout)


def make_distinct(shape, dtype=torch.float64):
    """Values without ties (max pooling is differentiable there): a shuffled grid."""
    n = torch.Size(shape).numel()
    return (torch.randperm(n, dtype=torch.float64) / n * 4 - 2).reshape(shape).to(dtype)


def make_ties(shape, dtype, layout="contiguous"):
    """Small integers (many ties), some -inf (whole -inf windows at the corners), a few NaNs."""
    x = torch.randint(-2, 3, shape).to(dtype)
    x[x == 2] = float("-inf")
    if shape[2] * shape[3] >= 9:
        x[..., :3, :3] = float("-inf")
    flat = x.view(-1)
    flat[torch.randperm(flat.numel())[: max(1, flat.numel() // 40)]] = float("nan")
    return _in_layout(x, layout)


@pytest.mark.parametrize("backend,dtype,shape,layout,mode", list(_cases()))
def test_forward_matches_reference(backend, dtype, shape, layout, mode):
    x = make_x(shape, dtype, layout)
    x_before = x.clone()
    with use(backend):
        out = crp_pool(x, mode=mode)
    ref64 = crp_pool_ref(x.double(), mode=mode)
    plain = crp_pool_ref(x, mode=mode)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last layout"
    assert_close_to_reference(out, ref64, plain, what=f"out[{backend}]")
    if mode == "max":
        assert torch.equal(out, plain), "max pooling is exact: the fused result must equal PyTorch's"
    assert torch.equal(x, x_before), "the input was modified"


@pytest.mark.parametrize("backend,dtype,shape,layout,mode", list(_cases()))
def test_gradient_matches_reference(backend, dtype, shape, layout, mode):
    x = make_x(shape, dtype, layout).requires_grad_()
    grad_out = _in_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
    with use(backend):
        (fused,) = torch.autograd.grad(crp_pool(x, mode=mode), x, grad_out)
    x64 = x.detach().double().requires_grad_()
    (ref64,) = torch.autograd.grad(crp_pool_ref(x64, mode=mode), x64, grad_out.double())
    (plain,) = torch.autograd.grad(crp_pool_ref(x, mode=mode), x, grad_out)
    assert fused.dtype == dtype and fused.shape == x.shape
    # a max input may collect up to 25 output gradients: the error scales with that sum
    assert_close_to_reference(fused, ref64, plain, what=f"grad x[{backend}]", floor_scale=5 if mode == "max" else 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_max_routing_equals_pytorch_with_ties_inf_and_nan(backend, dtype, layout):
    """Same output and the same input gets each output's gradient as F.max_pool2d, exactly."""
    shape = (2, 3, 7, 9) if backend != "triton" else (1, 3, 6, 7)
    x = make_ties(shape, dtype, layout).requires_grad_()
    # small integers: every sum of them is exact, so the comparison can be exact too
    grad_out = _in_layout(torch.randint(-3, 4, shape).to(dtype), layout)
    with use(backend):
        out = crp_pool(x, mode="max")
        (grad,) = torch.autograd.grad(out, x, grad_out)
    want = F.max_pool2d(x, 5, stride=1, padding=2)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    assert torch.isnan(want).any() and torch.isneginf(want).any(), "the data lacks NaN or -inf windows"
    assert torch.equal(out.isnan(), want.isnan()), "NaN outputs differ"
    assert torch.equal(out.nan_to_num(0), want.nan_to_num(0)), "outputs differ"
    diff = torch.nonzero(grad != want_grad)
    assert diff.numel() == 0, f"gradient routed differently from PyTorch at {diff[:5].tolist()}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_and_gradgradcheck(backend, mode):
    shape = (1, 2, 6, 7)  # every 5x5 window position (corners, edges, interior); the Jacobians are numel^2
    x = make_distinct(shape)
    x = (x if mode == "max" else x.contiguous(memory_format=torch.channels_last)).requires_grad_()

    def f(xx):
        return crp_pool(xx, mode=mode)

    with use(backend):
        # fast mode (random projections) in Triton's interpreter: a full Jacobian is ~250 launches there
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, fast_mode=backend == "triton")
        if backend != "triton":  # gradgradcheck differentiates the reference: backend-independent
            assert torch.autograd.gradgradcheck(f, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_jvp_matches_reference_and_is_nonzero(backend, mode, dtype):
    shape = (3, 5, 6, 9)
    x = _in_layout(make_distinct(shape, dtype), "channels_last" if mode == "avg" else "contiguous")
    v = torch.randn_like(x)
    with use(backend):
        out, out_t = torch.func.jvp(lambda y: crp_pool(y, mode=mode), (x,), (v,))
    _, ref_t = torch.func.jvp(lambda y: crp_pool_ref(y, mode=mode), (x.double(),), (v.double(),))
    _, plain_t = torch.func.jvp(lambda y: crp_pool_ref(y, mode=mode), (x,), (v,))
    assert out_t.abs().max() > 0, "zero tangent: forward-mode AD did not reach the fused kernel"
    assert_close_to_reference(out_t, ref_t, plain_t, what=f"tangent[{backend}]")
    assert_close_to_reference(out, crp_pool_ref(x.double(), mode=mode), crp_pool_ref(x, mode=mode), what="primal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_jvp_picks_the_tangent_pytorch_picks(backend):
    """With ties, -inf and NaN: the tangent of each output is the tangent of the input PyTorch routes to."""
    shape = (2, 3, 7, 9) if backend != "triton" else (1, 2, 6, 7)
    x = make_ties(shape, torch.float32)
    v = torch.randn_like(x)
    with use(backend):
        _, out_t = torch.func.jvp(lambda y: crp_pool(y, mode="max"), (x,), (v,))
    _, idx = F.max_pool2d(x, 5, stride=1, padding=2, return_indices=True)
    want = v.flatten(2).gather(2, idx.flatten(2)).view(shape)
    assert torch.equal(out_t, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_jvp_of_grad_matches_reference(backend, mode):
    """Forward-over-reverse (Hessian-vector products): backward must itself be differentiable."""
    shape = (2, 3, 5, 6)
    x = make_distinct(shape)
    w = torch.randn(shape, dtype=torch.float64)
    v = torch.randn(shape, dtype=torch.float64)

    def loss(fn):
        return lambda xx: (fn(xx, mode=mode).square() * w).sum()

    with use(backend):
        _, hvp = torch.func.jvp(torch.func.grad(loss(crp_pool)), (x,), (v,))
    _, hvp_ref = torch.func.jvp(torch.func.grad(loss(crp_pool_ref)), (x,), (v,))
    assert hvp.abs().max() > 0
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-9, atol=1e-10)


def test_dual_tensor_forward_ad_matches_reference():
    import torch.autograd.forward_ad as fwAD

    x = make_distinct((2, 3, 5, 6))
    x_t = torch.randn_like(x)
    for mode in MODES:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(crp_pool(fwAD.make_dual(x, x_t), mode=mode)).tangent
        _, ref_t = torch.func.jvp(lambda y, mode=mode: crp_pool_ref(y, mode=mode), (x,), (x_t,))
        assert tangent is not None and tangent.abs().max() > 0
        torch.testing.assert_close(tangent, ref_t, rtol=1e-12, atol=1e-12)


def _op_samples(layout):
    x = _in_layout(make_x((2, 5, 4, 6), torch.float32), layout)
    g = torch.randn_like(x)
    return {
        "fwd": (torch.ops.fastscore.crp_pool_fwd, (x,)),
        "bwd": (torch.ops.fastscore.crp_pool_bwd, (g, x)),
        "jvp": (torch.ops.fastscore.crp_pool_jvp, (x, g)),
    }


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["fwd", "bwd", "jvp"])
def test_opcheck(name, mode, layout):
    op, args = _op_samples(layout)[name]
    torch.library.opcheck(op, (*args, mode))


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager_and_compiled_jvp_is_exact():
    shape = (2, 6, 5, 7)
    x = make_x(shape, torch.float32, "channels_last").requires_grad_()

    def f(x):
        return crp_pool(x, mode="max") * 2 + crp_pool(x, mode="avg")

    out = torch.compile(f, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    eager = f(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)

    # Compiled jvp through an autograd.Function silently returns zeros; the op takes the reference there.
    v = torch.randn_like(x)

    def jvp(fn):
        return lambda x, v: torch.func.jvp(lambda y: fn(y, mode="max") + fn(y, mode="avg"), (x,), (v,))[1]

    got = torch.compile(jvp(crp_pool))(x.detach(), v)
    want = jvp(crp_pool_ref)(x.detach(), v)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_empty_batch_gives_empty_output():
    x = torch.randn(0, 4, 3, 3)
    for mode in MODES:
        assert crp_pool(x, mode=mode).shape == (0, 4, 3, 3)


def test_cpu_uses_cpp_kernels_by_default():
    from fastscore import _backend

    assert _backend.select("crp_pool", torch.device("cpu"), cpp_op="crp_pool_fwd") == "cpp"


def test_matches_the_ncsnv2_modules():
    """ncsnv2 CRPBlock runs nn.MaxPool2d(5, 1, 2), CondCRPBlock nn.AvgPool2d(5, 1, 2)."""
    x = make_x((2, 8, 16, 16), torch.float32, "channels_last")
    torch.testing.assert_close(crp_pool(x, mode="max"), torch.nn.MaxPool2d(5, 1, 2)(x), rtol=0, atol=0)
    torch.testing.assert_close(crp_pool(x, mode="avg"), torch.nn.AvgPool2d(5, 1, 2)(x), rtol=1e-6, atol=1e-6)


# ---- bad input -----------------------------------------------------------------------------------

BAD = {
    "x not a tensor": ({"x": [[1.0]]}, TypeError, "x: expected a torch.Tensor"),
    "x integer": ({"x": torch.ones(2, 3, 4, 4, dtype=torch.long)}, TypeError, "x: expected float16"),
    "x 3-D": ({"x": torch.ones(3, 4, 4)}, ValueError, "x: expected a 4-D"),
    "x no channels": ({"x": torch.ones(2, 0, 4, 4)}, ValueError, "x: expected C >= 1"),
    "mode unknown": ({"mode": "min"}, ValueError, "mode: expected one of 'max', 'avg', got 'min'"),
    "mode None": ({"mode": None}, TypeError, "mode: expected one of 'max', 'avg', got NoneType"),
    "mode not a string": ({"mode": 5}, TypeError, "mode: expected one of 'max', 'avg', got int"),
    "mode upper case": ({"mode": "MAX"}, ValueError, "mode: expected one of 'max', 'avg'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_name_the_argument(case):
    change, exc, message = BAD[case]
    args = {"x": make_x((2, 3, 4, 4), torch.float32), "mode": "max", **change}
    snapshot = args["x"].clone() if isinstance(args["x"], torch.Tensor) else None
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        crp_pool(args["x"], mode=args["mode"])
    if snapshot is not None:
        assert torch.equal(args["x"], snapshot), "x was modified by a failing call"
    if case.startswith("mode"):
        with pytest.raises(exc, match="mode: expected"):
            crp_pool_ref(args["x"], mode=args["mode"])


def test_cpp_op_checks_its_arguments():
    """The C++ kernels are the safety net for direct torch.ops.fastscore_C calls."""
    ops = torch.ops.fastscore_C
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="mode: expected 'max' or 'avg'"):
        ops.crp_pool_fwd(x, "sum")
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        ops.crp_pool_fwd(x[0], "max")
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        ops.crp_pool_bwd(x[:1], x, "max")
    with pytest.raises(ValueError, match="x_t: expected the memory layout of x"):
        ops.crp_pool_jvp(x, x.contiguous(memory_format=torch.channels_last), "avg")
