"""elu (ELU, alpha = 1): every backend that runs here against torch's ELU and its float64 reference.

Values and gradients over dtypes x shapes x layouts; NaN and infinities as torch; float64 gradcheck and
gradgradcheck; forward mode (jvp, jvp of grad, dual tensors) with non-zero tangents; out= and in place;
opcheck on every custom op; torch.compile parity; bad input.
"""

import pytest
import torch
import torch.nn.functional as F
from _backends import base
from _backends import kernel_backends
from _backends import use
from _tolerance import assert_close_to_reference

from fastscore.ops.elu import elu
from fastscore.ops.elu import elu_ref

BACKENDS = kernel_backends("cpu")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# 4-D activations (odd sizes; N = 1 with C = 40), one large enough that the C++ kernel splits it across
# threads with a ragged tail, and other ranks (the op is elementwise: any shape).
SHAPES = ((2, 3, 5, 7), (1, 40, 6, 9), (3, 37, 19, 41), (11,), (4, 6, 9))
LAYOUTS = ("contiguous", "channels_last", "strided")


def _keeps(backend, dtype, shape, layout) -> bool:
    if layout == "channels_last" and len(shape) != 4:
        return False
    if backend == "triton":  # Triton's interpreter here: small shapes, low precision on one
        return shape != SHAPES[2] and (dtype in (torch.float64, torch.float32) or shape == SHAPES[0])
    if backend == "ref":  # the reference itself (through the custom ops): the plumbing, not the numerics
        return dtype in (torch.float32, torch.bfloat16) and shape in SHAPES[:2]
    return True


def _cases():
    for backend in BACKENDS:
        for dtype in DTYPES:
            for shape in SHAPES:
                for layout in LAYOUTS:
                    if _keeps(backend, dtype, shape, layout):
                        yield pytest.param(
                            backend,
                            dtype,
                            shape,
                            layout,
                            id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{layout}",
                        )


def _in_layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # same values, not dense: every other element of a wider tensor
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    return t


def make_x(shape, dtype, layout="contiguous"):
    """Both signs, magnitudes from tiny to past expm1's float saturation (about -17), and exact zeros."""
    x = torch.randn(shape, dtype=torch.float64) * 3
    flat = x.view(-1)
    flat[::7] *= 1e-4
    flat[3::11] = -20.0
    flat[5::13] = 0.0
    return _in_layout(x.to(dtype), layout)


@pytest.mark.parametrize("backend,dtype,shape,layout", list(_cases()))
def test_forward_and_gradient_match_torch_elu(backend, dtype, shape, layout):
    x = make_x(shape, dtype, layout)
    x_before = x.clone()
    grad_out = _in_layout(torch.randn(shape, dtype=torch.float64).to(dtype), layout)
    xg = x.detach().requires_grad_()
    with use(backend):
        out = elu(x)
        (grad,) = torch.autograd.grad(elu(xg), xg, grad_out)
    x64 = x.detach().double().requires_grad_()
    ref64 = F.elu(x64)
    (grad64,) = torch.autograd.grad(ref64, x64, grad_out.double())
    plain = F.elu(xg)
    (plain_grad,) = torch.autograd.grad(plain, xg, grad_out)
    assert out.dtype == dtype and out.shape == x.shape and grad.dtype == dtype
    if layout == "channels_last":
        assert out.stride() == x.stride() and grad.stride() == x.stride(), "the result lost x's layout"
    assert_close_to_reference(out, ref64.detach(), plain.detach(), what=f"out[{backend}]")
    assert_close_to_reference(grad, grad64, plain_grad, what=f"grad x[{backend}]")
    assert torch.equal(x, x_before), "the input was modified"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_nan_and_infinities_as_torch(backend, dtype):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -1e-30, 1e-30, -100.0], dtype=dtype)
    x = x.repeat(3).requires_grad_()
    grad_out = torch.ones_like(x)
    with use(backend):
        out = elu(x)
        (grad,) = torch.autograd.grad(out, x, grad_out)
    want = F.elu(x)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    nan = x.detach().isnan()
    torch.testing.assert_close(grad[~nan], want_grad[~nan], rtol=0, atol=1e-7)
    # torch gives 1 here on its scalar path and NaN on its vector path (the ref backend is torch); the
    # kernels give 1 throughout
    if backend != "ref":
        assert torch.equal(grad[nan], torch.ones_like(grad[nan])), f"derivative at NaN: {grad[nan].tolist()}"


# The C++ kernels convert half types by bit manipulation (vectorisable); Triton uses its own casts (and its
# interpreter flushes bfloat16 subnormals, which a GPU does not).
@pytest.mark.parametrize("backend", [b for b in BACKENDS if base(b) == "cpp"])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_every_half_precision_value(backend, dtype):
    """All 65536 bit patterns (subnormals, infinities, NaNs) through the C++ kernels' conversions.

    Positive values and +inf come back bit for bit, NaN stays NaN, negative values are torch's ELU within
    an ulp of the dtype; a gradient with x > 0 is grad_out itself, bit for bit."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    with use(backend):
        out = elu(x)
        grad = torch.ops.fastscore.elu_bwd(x, torch.ones_like(x))
    nan = x.isnan()
    assert torch.equal(out.isnan(), nan), "NaN in, NaN out"
    assert torch.equal(grad.isnan(), nan)
    keep = ~nan
    assert torch.equal(grad[keep], x[keep]), "a conversion round trip changed a value"
    pos = keep & (x > 0)
    assert torch.equal(out[pos], x[pos]), "elu(x) = x for x > 0, exactly"
    neg = keep & (x <= 0)
    want = F.elu(x[neg].float())
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out[neg].float(), want, rtol=ulp, atol=torch.finfo(dtype).smallest_normal * ulp)


def test_permuted_dense_input_runs_in_its_own_memory_order():
    """Dense but neither contiguous nor channels_last: no copy, the result keeps the strides."""
    base = make_x((4, 6, 5, 3), torch.float32)
    x = base.permute(2, 0, 3, 1)  # dense, strides in no standard order
    out = elu(x)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, F.elu(x), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    x = make_x((2, 3, 4, 5), torch.float64, "channels_last")
    x = torch.where(x.abs() < 1e-3, 0.5, x).requires_grad_()  # keep finite differences off the kink at 0
    with use(backend):
        assert torch.autograd.gradcheck(elu, (x,), eps=1e-6, atol=1e-8)
        assert torch.autograd.gradgradcheck(elu, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_jvp_matches_reference_and_is_nonzero(backend, dtype):
    x = make_x((3, 5, 6, 9), dtype, "channels_last")
    v = torch.randn_like(x)
    with use(backend):
        out, out_t = torch.func.jvp(elu, (x,), (v,))
    _, ref_t = torch.func.jvp(elu_ref, (x.double(),), (v.double(),))
    _, plain_t = torch.func.jvp(elu_ref, (x,), (v,))
    assert out_t.abs().max() > 0, "zero tangent: forward-mode AD did not reach the fused kernel"
    assert_close_to_reference(out_t, ref_t, plain_t, what=f"tangent[{backend}]")
    assert_close_to_reference(out, elu_ref(x.double()), elu_ref(x), what="primal")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_grad_matches_reference(backend):
    """Forward-over-reverse (Hessian-vector products): backward must itself be differentiable."""
    x = make_x((2, 3, 5, 6), torch.float64)
    w = torch.randn_like(x)
    v = torch.randn_like(x)

    def loss(fn):
        return lambda xx: (fn(xx).square() * w).sum()

    with use(backend):
        _, hvp = torch.func.jvp(torch.func.grad(loss(elu)), (x,), (v,))
    _, hvp_ref = torch.func.jvp(torch.func.grad(loss(elu_ref)), (x,), (v,))
    assert hvp.abs().max() > 0
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-9, atol=1e-10)


def test_dual_tensor_forward_ad_matches_reference():
    import torch.autograd.forward_ad as fwAD

    x = make_x((2, 3, 5, 6), torch.float64)
    x_t = torch.randn_like(x)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(elu(fwAD.make_dual(x, x_t))).tangent
    _, ref_t = torch.func.jvp(elu_ref, (x,), (x_t,))
    assert tangent is not None and tangent.abs().max() > 0
    torch.testing.assert_close(tangent, ref_t, rtol=1e-12, atol=1e-12)


# ---- out= and in place -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_and_in_place(backend, layout):
    x = make_x((2, 5, 4, 6), torch.float32, layout)
    want = F.elu(x)
    out = torch.full_like(x, 7.0)
    y = x.clone() if layout != "strided" else _in_layout(x.clone(), "strided")
    y_base = y._base
    with use(backend), torch.no_grad():
        got = elu(x, out=out)
        same = elu(y, out=y)
        other = elu(x, out=torch.empty(x.shape))  # out in another layout than x
    assert got is out and same is y and other.is_contiguous()
    for what, t in (("out", out), ("in place", y), ("other layout", other)):
        torch.testing.assert_close(t, want, rtol=2e-6, atol=1e-7, msg=lambda m, what=what: f"{what}: {m}")
    if y_base is not None:  # the strided view was written through
        assert torch.equal(y_base[..., ::2], y)


def test_in_place_leaves_the_rest_of_a_strided_base_alone():
    base = torch.arange(-24.0, 24.0).reshape(2, 3, 8) / 4
    before = base.clone()
    view = base[..., ::2]
    with torch.no_grad():
        elu(view, out=view)
    torch.testing.assert_close(base[..., ::2], F.elu(before[..., ::2]), rtol=1e-6, atol=1e-7)
    assert torch.equal(base[..., 1::2], before[..., 1::2]), "elements outside the view were written"


def test_out_refuses_a_differentiable_input():
    x = make_x((2, 3, 4, 4), torch.float32).requires_grad_()
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="out: writing into a preallocated tensor is not differentiable"):
        elu(x, out=out)
    with torch.no_grad():
        elu(x, out=out)  # fine without grad mode
    torch.testing.assert_close(out, F.elu(x.detach()), rtol=2e-6, atol=1e-7)


def test_out_that_requires_grad_is_not_overwritten_in_grad_mode():
    """As torch refuses an in-place write to a leaf that requires grad (and out= with such an argument)."""
    x = make_x((2, 3, 4, 4), torch.float32)
    out = torch.zeros_like(x, requires_grad=True)
    with pytest.raises(ValueError, match="out: a leaf tensor that requires grad cannot be overwritten"):
        elu(x, out=out)
    assert not out.detach().any(), "out was written by a refused call"
    with torch.no_grad():
        elu(x, out=out)  # under no_grad torch allows it too
    torch.testing.assert_close(out.detach(), F.elu(x), rtol=2e-6, atol=1e-7)


def test_out_refuses_forward_mode_tangents():
    import torch.autograd.forward_ad as fwAD

    x = make_x((2, 3, 4, 4), torch.float64)
    v = torch.randn_like(x)
    with pytest.raises(ValueError, match="out: writing into a preallocated tensor is not differentiable"):
        torch.func.jvp(lambda y: elu(y, out=torch.empty_like(y)), (x,), (v,))
    with fwAD.dual_level(), torch.no_grad():
        dual = fwAD.make_dual(x, v)
        with pytest.raises(ValueError, match="forward-mode AD or a torch.func transform is active"):
            elu(dual, out=torch.empty_like(x))
        elu(x.clone(), out=torch.empty_like(x))  # a plain tensor inside the dual level is fine


# ---- custom ops and torch.compile ---------------------------------------------------------------------


def _op_samples(layout):
    x = _in_layout(make_x((2, 5, 4, 6), torch.float32), layout)
    g = torch.randn_like(x)
    return {
        "fwd": (torch.ops.fastscore.elu_fwd, (x,)),
        "fwd_out": (torch.ops.fastscore.elu_fwd_out, (x, torch.empty_like(x))),
        "bwd": (torch.ops.fastscore.elu_bwd, (g, x)),
        "jvp": (torch.ops.fastscore.elu_jvp, (x, g)),
    }


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("name", ["fwd", "fwd_out", "bwd", "jvp"])
def test_opcheck(name, layout):
    op, args = _op_samples(layout)[name]
    torch.library.opcheck(op, args)


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager_and_compiled_jvp_is_exact():
    x = make_x((2, 6, 5, 7), torch.float32, "channels_last").requires_grad_()

    def f(x):
        return elu(x) * 2 + elu(-x)

    out = torch.compile(f, fullgraph=True)(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    eager = f(x)
    (eager_grad,) = torch.autograd.grad(eager.square().sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-5, atol=1e-5)

    # Compiled jvp through an autograd.Function silently returns zeros; the op takes the reference there.
    v = torch.randn_like(x)

    def jvp(fn):
        return lambda x, v: torch.func.jvp(lambda y: fn(y) + fn(2 * y), (x,), (v,))[1]

    got = torch.compile(jvp(elu))(x.detach(), v)
    want = jvp(elu_ref)(x.detach(), v)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.compile
def test_torch_compile_fullgraph_in_place():
    x = make_x((2, 6, 5, 7), torch.float32, "channels_last")

    def f(x):
        h = x * 3
        return elu(h, out=h) + 1

    with torch.no_grad():
        got = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(got, F.elu(x * 3) + 1, rtol=2e-6, atol=1e-6)


# ---- selection, edge cases --------------------------------------------------------------------------------


def test_empty_input_gives_empty_output():
    x = torch.randn(0, 4, 3, 3)
    assert elu(x).shape == (0, 4, 3, 3)
    out = torch.empty_like(x)
    assert elu(x, out=out) is out


def test_cpu_uses_cpp_kernels_by_default():
    from fastscore import _backend

    assert _backend.select("elu", torch.device("cpu"), cpp_op="elu_fwd") == "cpp"


def test_matches_nn_elu_module():
    """ncsnv2's RefineNet blocks run nn.ELU() (alpha = 1)."""
    x = make_x((2, 8, 16, 16), torch.float32, "channels_last")
    torch.testing.assert_close(elu(x), torch.nn.ELU()(x), rtol=2e-6, atol=1e-7)


# ---- bad input -----------------------------------------------------------------------------------------------

BAD = {
    "x not a tensor": ({"x": [[1.0]]}, TypeError, "x: expected a torch.Tensor"),
    "x integer": ({"x": torch.ones(2, 3, 4, 4, dtype=torch.long)}, TypeError, "x: expected float16"),
    "x bool": ({"x": torch.ones(2, 3, dtype=torch.bool)}, TypeError, "x: expected float16"),
    "x complex": ({"x": torch.ones(2, 3, dtype=torch.complex64)}, TypeError, "x: expected float16"),
    "out not a tensor": ({"out": [1.0]}, TypeError, "out: expected a torch.Tensor"),
    "out wrong shape": ({"out": torch.zeros(2, 3, 4, 5)}, ValueError, "out: expected shape (2, 3, 4, 4)"),
    "out wrong dtype": ({"out": torch.zeros(2, 3, 4, 4, dtype=torch.float64)}, ValueError, "and dtype torch.float32"),
    "out integer": ({"out": torch.zeros(2, 3, 4, 4, dtype=torch.int32)}, ValueError, "out: expected shape"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_name_the_argument(case):
    change, exc, message = BAD[case]
    args = {"x": make_x((2, 3, 4, 4), torch.float32), "out": None, **change}
    x, out = args["x"], args["out"]
    snapshots = [t.clone() for t in (x, out) if isinstance(t, torch.Tensor)]
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        elu(x, out=out)
    for before, now in zip(snapshots, [t for t in (x, out) if isinstance(t, torch.Tensor)]):
        assert torch.equal(before, now), "a failing call modified its arguments"


def test_cpp_op_checks_its_arguments():
    """The C++ kernels are the safety net for direct torch.ops.fastscore_C calls."""
    ops = torch.ops.fastscore_C
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        ops.elu_fwd(x.long())
    with pytest.raises(ValueError, match="x: expected a dense, non-overlapping tensor"):
        ops.elu_fwd(x[..., ::2])
    with pytest.raises(ValueError, match="grad_out: expected shape"):
        ops.elu_bwd(x[:1], x)
    with pytest.raises(TypeError, match="x_t: expected dtype"):
        ops.elu_jvp(x, x.double())
    with pytest.raises(ValueError, match="x_t: expected the memory layout"):
        ops.elu_jvp(x, x.contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="out: expected the memory layout"):
        ops.elu_fwd_out(x, torch.empty_like(x, memory_format=torch.channels_last))
    storage = torch.randn(x.numel() + 1)
    with pytest.raises(RuntimeError, match="refer to a single memory location"):
        ops.elu_fwd_out(storage[1:].view(x.shape), storage[:-1].view(x.shape))


# ---- use in the RefineNet blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("grad", (False, True), ids=("no_grad", "grad"))
def test_refinenet_blocks_run_the_fused_elu_and_match_their_reference(monkeypatch, grad):
    """RCUBlock / CRPBlock apply nn.ELU() on the fused op (in place on convolution outputs without autograd);
    outputs and gradients stay those of the reference blocks, and the block inputs are not modified."""
    from fastscore.nn import layers
    from fastscore.nn import reference

    calls = []

    def counting(x, *, out=None):
        calls.append("out" if out is not None else "new")
        return elu(x, out=out)

    monkeypatch.setattr(layers, "_fused_elu", counting)
    for name, args in (("RCUBlock", (8, 2, 2)), ("CRPBlock", (8, 2))):
        torch.manual_seed(0)
        fused = getattr(layers, name)(*args, act=torch.nn.ELU())
        torch.manual_seed(0)
        ref = getattr(reference, name)(*args, act=torch.nn.ELU())
        x = make_x((2, 8, 6, 6), torch.float32, "channels_last").requires_grad_(grad)
        x_before = x.detach().clone()
        calls.clear()
        with torch.set_grad_enabled(grad):
            out = fused(x)
        want = ref(x)
        assert calls, f"{name} did not call the fused elu"
        if name == "RCUBlock" and not grad:
            assert "out" in calls, "RCUBlock did not apply the ELU in place on a convolution's output"
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(x.detach(), x_before), f"{name} modified its input"
        if not grad:  # forward mode through the block: the in-place ELU must keep the tangent
            v = torch.randn_like(x)
            _, got_t = torch.func.jvp(fused, (x,), (v,))
            _, want_t = torch.func.jvp(ref, (x,), (v,))
            assert got_t.abs().max() > 0
            torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-5)
        if grad:
            got_grads = torch.autograd.grad(out.square().sum(), [x, *fused.parameters()])
            want_grads = torch.autograd.grad(want.square().sum(), [x, *ref.parameters()])
            for g, w in zip(got_grads, want_grads):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
