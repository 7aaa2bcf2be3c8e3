"""cond_instance_norm (InstanceNorm++): every backend that runs here against the float64 reference.

Values and all gradients over dtypes x shapes x layouts x variants; float64 gradcheck and
gradgradcheck; forward mode (jvp, jvp of grad) with non-zero tangents; opcheck on every custom op;
torch.compile parity; the out= variant; bad input.
"""

import pytest
import torch
import torch.nn.functional as F
from _backends import kernel_backends
from _backends import use
from _tolerance import assert_close_to_reference

from fastscore.ops import cond_instance_norm
from fastscore.ops import cond_instance_norm_ref

BACKENDS = kernel_backends("cpu")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# (N, C, H, W): odd sizes, C not a multiple of any vector width, N = 1 (the kernels' phased path,
# with several channel blocks at C = 40), H * W = 1, C = 2 (the least mean reinjection allows).
SHAPES = ((3, 5, 7, 9), (1, 2, 1, 1), (2, 17, 4, 6), (1, 40, 9, 9), (4, 3, 16, 16))
LAYOUTS = ("contiguous", "channels_last", "strided")
# name: (mean reinjection, shift, conditional (N, C) rows, activation)
VARIANTS = {
    "plus_cond_elu": (True, True, True, "elu"),
    "plus_uncond": (True, True, False, None),
    "plain_cond": (False, True, True, None),
    "plus_nobeta_elu": (True, False, True, "elu"),
}


def _triton_keeps(dtype, shape, layout) -> bool:
    # Triton runs in its interpreter here (slow): small shapes, the two layouts the kernels read,
    # the low-precision dtypes on one shape.
    if shape not in SHAPES[:3] or layout == "strided":
        return False
    return dtype in (torch.float64, torch.float32) or shape == SHAPES[0]


def _cases():
    for backend in BACKENDS:
        for dtype in DTYPES:
            for shape in SHAPES:
                for layout in LAYOUTS:
                    if backend == "triton" and not _triton_keeps(dtype, shape, layout):
                        continue
                    for variant in VARIANTS:
                        yield pytest.param(
                            backend,
                            dtype,
                            shape,
                            layout,
                            variant,
                            id=f"{backend}-{str(dtype)[6:]}-{'x'.join(map(str, shape))}-{layout}-{variant}",
                        )


def make_x(shape, dtype, layout="contiguous"):
    """Activations whose channel means differ (so the "++" term matters) and sit away from 0."""
    N, C = shape[:2]
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + torch.randn(N, C, 1, 1, dtype=torch.float64) * 3 + 1
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # same values, strides of neither supported layout
        x = x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


def make_params(shape, dtype, variant):
    with_alpha, with_beta, conditional, act = VARIANTS[variant]
    N, C = shape[:2]
    rows = (N, C) if conditional else (C,)
    gamma = (1 + 0.3 * torch.randn(rows, dtype=torch.float64)).to(dtype)
    alpha = (1 + 0.3 * torch.randn(rows, dtype=torch.float64)).to(dtype) if with_alpha else None
    beta = (0.5 * torch.randn(rows, dtype=torch.float64)).to(dtype) if with_beta else None
    return gamma, alpha, beta, act


def _double(t):
    return None if t is None else t.detach().double()


@pytest.mark.parametrize("backend,dtype,shape,layout,variant", list(_cases()))
def test_forward_matches_reference(backend, dtype, shape, layout, variant):
    x = make_x(shape, dtype, layout)
    gamma, alpha, beta, act = make_params(shape, dtype, variant)
    x_before = x.clone()
    with use(backend):
        out = cond_instance_norm(x, gamma, alpha, beta, act=act)
    ref64 = cond_instance_norm_ref(x.double(), _double(gamma), _double(alpha), _double(beta), act=act)
    plain = cond_instance_norm_ref(x, gamma, alpha, beta, act=act)
    assert out.dtype == dtype and out.shape == x.shape
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), "output lost the channels_last layout"
    assert_close_to_reference(out, ref64, plain, what=f"out[{backend}]")
    assert torch.equal(x, x_before), "the input was modified"


@pytest.mark.parametrize("backend,dtype,shape,layout,variant", list(_cases()))
def test_gradients_match_reference(backend, dtype, shape, layout, variant):
    x = make_x(shape, dtype, layout)
    gamma, alpha, beta, act = make_params(shape, dtype, variant)
    inputs = [t.requires_grad_() for t in (x, gamma, alpha, beta) if t is not None]
    names = [n for n, t in zip(("x", "gamma", "alpha", "beta"), (x, gamma, alpha, beta)) if t is not None]
    grad_out = torch.randn(shape, dtype=torch.float64).to(dtype)

    with use(backend):
        fused = torch.autograd.grad(cond_instance_norm(x, gamma, alpha, beta, act=act), inputs, grad_out)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    args64 = dict(zip(names, inputs64))
    ref64 = torch.autograd.grad(
        cond_instance_norm_ref(args64["x"], args64["gamma"], args64.get("alpha"), args64.get("beta"), act=act),
        inputs64,
        grad_out.double(),
    )
    plain = torch.autograd.grad(cond_instance_norm_ref(x, gamma, alpha, beta, act=act), inputs, grad_out)
    for name, g, r, p in zip(names, fused, ref64, plain):
        assert g.dtype == dtype, f"grad {name}: dtype {g.dtype}, expected {dtype}"
        # gamma/alpha/beta gradients sum over H*W (and N): their error scales with that count.
        assert_close_to_reference(g, r, p, what=f"grad {name}[{backend}]", floor_scale=1 if name == "x" else 10)


SMALL = (2, 3, 3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradcheck_and_gradgradcheck(backend, variant):
    x = make_x(SMALL, torch.float64, "channels_last" if variant == "plain_cond" else "contiguous")
    gamma, alpha, beta, act = make_params(SMALL, torch.float64, variant)
    inputs = tuple(t.requires_grad_() for t in (x, gamma, alpha, beta) if t is not None)
    with_alpha, with_beta = alpha is not None, beta is not None

    def f(*args):
        args = list(args)
        xx, g = args.pop(0), args.pop(0)
        a = args.pop(0) if with_alpha else None
        b = args.pop(0) if with_beta else None
        return cond_instance_norm(xx, g, a, b, act=act)

    with use(backend):
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)
        if backend != "triton":  # gradgradcheck differentiates the reference: backend-independent
            assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_jvp_matches_reference_and_is_nonzero(backend, variant, dtype):
    shape = (3, 5, 4, 6)
    x = make_x(shape, dtype, "channels_last" if variant == "plus_uncond" else "contiguous")
    gamma, alpha, beta, act = make_params(shape, dtype, variant)
    primals = tuple(t for t in (x, gamma, alpha, beta) if t is not None)
    tangents = tuple(torch.randn_like(t) for t in primals)
    with_alpha, with_beta = alpha is not None, beta is not None

    def call(fn):
        def f(*args):
            args = list(args)
            xx, g = args.pop(0), args.pop(0)
            a = args.pop(0) if with_alpha else None
            b = args.pop(0) if with_beta else None
            return fn(xx, g, a, b, act=act)

        return f

    with use(backend):
        out, out_t = torch.func.jvp(call(cond_instance_norm), primals, tangents)
    ref_out, ref_t = torch.func.jvp(
        call(cond_instance_norm_ref), tuple(t.double() for t in primals), tuple(t.double() for t in tangents)
    )
    _, plain_t = torch.func.jvp(call(cond_instance_norm_ref), primals, tangents)
    assert out_t.abs().max() > 0, "zero tangent: forward-mode AD did not reach the fused kernel"
    assert_close_to_reference(out_t, ref_t, plain_t, what=f"tangent[{backend}]")
    assert_close_to_reference(out, ref_out, call(cond_instance_norm_ref)(*primals), what=f"primal under jvp[{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_of_grad_matches_reference(backend):
    """Forward-over-reverse (Hessian-vector products): backward must itself be differentiable."""
    x = make_x(SMALL, torch.float64)
    gamma, alpha, beta, act = make_params(SMALL, torch.float64, "plus_cond_elu")
    w = torch.randn(SMALL, dtype=torch.float64)
    v = torch.randn(SMALL, dtype=torch.float64)

    def loss(fn):
        return lambda xx: (fn(xx, gamma, alpha, beta, act=act) * w).sum()

    with use(backend):
        _, hvp = torch.func.jvp(torch.func.grad(loss(cond_instance_norm)), (x,), (v,))
    _, hvp_ref = torch.func.jvp(torch.func.grad(loss(cond_instance_norm_ref)), (x,), (v,))
    assert hvp.abs().max() > 0
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-9, atol=1e-10)


def test_dual_tensor_forward_ad_matches_reference():
    import torch.autograd.forward_ad as fwAD

    x = make_x(SMALL, torch.float64)
    gamma, alpha, beta, act = make_params(SMALL, torch.float64, "plus_cond_elu")
    x_t, gamma_t = torch.randn_like(x), torch.randn_like(gamma)
    with fwAD.dual_level():
        out = cond_instance_norm(fwAD.make_dual(x, x_t), fwAD.make_dual(gamma, gamma_t), alpha, beta, act=act)
        tangent = fwAD.unpack_dual(out).tangent
    _, ref_t = torch.func.jvp(
        lambda xx, g: cond_instance_norm_ref(xx, g, alpha, beta, act=act), (x, gamma), (x_t, gamma_t)
    )
    assert tangent is not None and tangent.abs().max() > 0
    torch.testing.assert_close(tangent, ref_t, rtol=1e-9, atol=1e-10)


def _op_samples():
    x = make_x((2, 5, 3, 4), torch.float32)
    gamma, alpha, beta, _ = make_params((2, 5, 3, 4), torch.float32, "plus_cond_elu")
    gamma, alpha, beta = (p.expand(2, 5) if p.dim() == 1 else p for p in (gamma, alpha, beta))
    out, mean, rstd = torch.ops.fastscore.cond_instance_norm_fwd(x, gamma, alpha, beta, 1e-5, "elu")
    grad = torch.randn_like(x)
    return {
        "fwd": (x, gamma, alpha, beta, 1e-5, "elu"),
        "fwd_nobeta": (x, gamma, alpha, None, 1e-5, "none"),
        "fwd_out": (x, gamma, alpha, beta, 1e-5, "elu", torch.empty_like(x)),
        "bwd": (grad, x, gamma, alpha, beta, mean, rstd, 1e-5, "elu"),
        "jvp": (
            x,
            gamma,
            alpha,
            beta,
            mean,
            rstd,
            torch.randn_like(x),
            torch.randn_like(gamma),
            None,
            None,
            1e-5,
            "elu",
        ),
    }


@pytest.mark.parametrize("name", ["fwd", "fwd_nobeta", "fwd_out", "bwd", "jvp"])
def test_opcheck(name):
    op = {
        "fwd": torch.ops.fastscore.cond_instance_norm_fwd,
        "fwd_nobeta": torch.ops.fastscore.cond_instance_norm_fwd,
        "fwd_out": torch.ops.fastscore.cond_instance_norm_fwd_out,
        "bwd": torch.ops.fastscore.cond_instance_norm_bwd,
        "jvp": torch.ops.fastscore.cond_instance_norm_jvp,
    }[name]
    torch.library.opcheck(op, _op_samples()[name])


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager():
    shape = (2, 6, 5, 5)
    x = make_x(shape, torch.float32).requires_grad_()
    gamma, alpha, beta, act = make_params(shape, torch.float32, "plus_cond_elu")
    params = [p.requires_grad_() for p in (gamma, alpha, beta)]

    def f(x, gamma, alpha, beta):
        return cond_instance_norm(x, gamma, alpha, beta, act="elu") * 2

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, *params)
    grads = torch.autograd.grad(out.square().sum(), [x, *params])
    eager = f(x, *params)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, *params])
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.compile
def test_torch_compile_of_jvp_gives_the_reference_tangent():
    """Compiled jvp through an autograd.Function silently returns zeros; the op takes the reference there."""
    shape = (2, 4, 3, 3)
    x = make_x(shape, torch.float32)
    gamma, alpha, beta, act = make_params(shape, torch.float32, "plus_uncond")
    v = torch.randn_like(x)

    def jvp(fn):
        return lambda x, v: torch.func.jvp(lambda y: fn(y, gamma, alpha, beta, act="elu"), (x,), (v,))[1]

    got = torch.compile(jvp(cond_instance_norm))(x, v)
    want = jvp(cond_instance_norm_ref)(x, v)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- out= and in place ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_out_and_in_place(backend, layout):
    shape = (3, 5, 6, 7)
    x = make_x(shape, torch.float32, layout)
    gamma, alpha, beta, act = make_params(shape, torch.float32, "plus_cond_elu")
    want = cond_instance_norm_ref(x.double(), gamma.double(), alpha.double(), beta.double(), act=act)
    plain = cond_instance_norm_ref(x, gamma, alpha, beta, act=act)
    out = torch.empty_like(x)
    with use(backend):
        result = cond_instance_norm(x, gamma, alpha, beta, act=act, out=out)
        assert result is out
        assert_close_to_reference(out, want, plain, what="out=")
        y = x.clone()
        assert cond_instance_norm(y, gamma, alpha, beta, act=act, out=y) is y
    assert_close_to_reference(y, want, plain, what="in place (out=x)")


def test_empty_batch_gives_empty_output():
    x = torch.randn(0, 4, 3, 3)
    assert cond_instance_norm(x, torch.ones(4), torch.ones(4), torch.zeros(4)).shape == (0, 4, 3, 3)


def test_cpu_uses_cpp_kernels_by_default():
    from fastscore import _backend

    assert _backend.select("cond_instance_norm", torch.device("cpu"), cpp_op="cond_instance_norm_fwd") == "cpp"


# ---- bad input -----------------------------------------------------------------------------------


def _good():
    x = make_x((2, 4, 3, 3), torch.float32)
    return {"x": x, "gamma": torch.ones(2, 4), "alpha": torch.ones(4), "beta": torch.zeros(2, 4)}


BAD = {
    "x not a tensor": (lambda a: a.update(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    "x integer": (lambda a: a.update(x=a["x"].long()), TypeError, "x: expected float16"),
    "x 3-D": (lambda a: a.update(x=a["x"][0]), ValueError, "x: expected a 4-D"),
    "gamma wrong C": (lambda a: a.update(gamma=torch.ones(2, 5)), ValueError, "gamma: expected shape (4,) or (2, 4)"),
    "alpha wrong N": (lambda a: a.update(alpha=torch.ones(3, 4)), ValueError, "alpha: expected shape"),
    "beta 3-D": (lambda a: a.update(beta=torch.zeros(2, 4, 1)), ValueError, "beta: expected shape"),
    "gamma integer": (lambda a: a.update(gamma=torch.ones(4, dtype=torch.long)), TypeError, "gamma: expected float"),
    "gamma None": (lambda a: a.update(gamma=None), TypeError, "gamma: expected a torch.Tensor"),
    "alpha with C=1": (
        lambda a: a.update(x=a["x"][:, :1], gamma=torch.ones(1), alpha=torch.ones(1), beta=None),
        ValueError,
        "alpha: mean reinjection needs at least 2 channels",
    ),
    "gamma on meta": (
        lambda a: a.update(gamma=torch.ones(4, device="meta")),
        ValueError,
        "gamma: expected a tensor on",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tensor_arguments_name_the_argument(case):
    args = _good()
    mutate, exc, message = BAD[case]
    mutate(args)
    snapshot = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        cond_instance_norm(args["x"], args["gamma"], args["alpha"], args["beta"])
    for k, v in snapshot.items():
        assert torch.equal(args[k], v), f"{k} was modified by a failing call"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"act": "relu"}, "act: expected None or 'elu'"),
        ({"act": 1}, "act: expected None or 'elu'"),
        ({"eps": 0.0}, "eps: expected a positive number"),
        ({"eps": "1e-5"}, "eps: expected a positive number"),
        ({"eps": float("inf")}, "eps: expected a positive number finite in float32"),
        ({"eps": 1e300}, "eps: expected a positive number finite in float32"),  # inf in the float32 kernels
        ({"out": torch.empty(2, 4, 3, 4)}, "out: expected shape"),
        ({"out": torch.empty(2, 4, 3, 3, dtype=torch.float64)}, "out: expected dtype torch.float32"),
        ({"out": torch.empty(2, 3, 3, 4).permute(0, 3, 1, 2)}, "out: expected a contiguous tensor"),
    ],
)
def test_bad_keyword_arguments_name_the_argument(kwargs, message):
    args = _good()
    out = kwargs.get("out")
    before = None if out is None else out.clone()
    # the rule of fastscore._validate: a wrong type or dtype is a TypeError, a wrong value a ValueError
    wrong_kind = isinstance(kwargs.get("act", "elu"), int) or isinstance(kwargs.get("eps", 0.0), str)
    wrong_kind |= out is not None and out.dtype != args["x"].dtype
    with pytest.raises(TypeError if wrong_kind else ValueError, match=message):
        cond_instance_norm(args["x"], args["gamma"], args["alpha"], args["beta"], **kwargs)
    if out is not None:
        assert torch.equal(out.nan_to_num(0), before.nan_to_num(0)), "out was modified by a failing call"


def test_out_refuses_autograd():
    args = _good()
    x = args["x"].requires_grad_()
    with pytest.raises(ValueError, match="out: writing into a preallocated tensor is not differentiable"):
        cond_instance_norm(x, args["gamma"], out=torch.empty_like(x))


def test_out_that_requires_grad_is_not_overwritten_in_grad_mode():
    """As torch refuses an in-place write to a leaf that requires grad: out=parameter is an error in grad
    mode (it was overwritten behind autograd's back), and allowed under no_grad, as torch allows it."""
    args = _good()
    x, gamma = args["x"], args["gamma"]
    out = torch.nn.Parameter(torch.zeros_like(x))
    with pytest.raises(ValueError, match="out: a leaf tensor that requires grad cannot be overwritten"):
        cond_instance_norm(x, gamma, out=out)
    assert not out.detach().any(), "out was written by a refused call"
    with torch.no_grad():
        cond_instance_norm(x, gamma, out=out)
    torch.testing.assert_close(out.detach(), cond_instance_norm_ref(x, gamma), rtol=1e-5, atol=1e-5)


def test_nan_propagates_to_its_sample_only():
    """Documented policy: inputs are not scanned; a NaN poisons its sample (all channels, via the
    channel means) and nothing else."""
    x = make_x((3, 4, 5, 5), torch.float32)
    x[1, 2, 3, 3] = float("nan")
    out = cond_instance_norm(x, torch.ones(4), torch.ones(4), torch.zeros(4))
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_matches_ncsnv2_formulation_with_instance_norm():
    """The reference equals ncsnv2's own code path (F.instance_norm + torch.mean/var) in float64."""
    x = make_x((3, 6, 5, 7), torch.float64)
    gamma, alpha, beta, _ = make_params((3, 6, 5, 7), torch.float64, "plus_cond_elu")
    means = torch.mean(x, dim=(2, 3))
    m = torch.mean(means, dim=-1, keepdim=True)
    v = torch.var(means, dim=-1, keepdim=True)
    means = (means - m) / torch.sqrt(v + 1e-5)
    h = F.instance_norm(x) + means[..., None, None] * alpha[..., None, None]
    ncsnv2 = gamma.view(-1, 6, 1, 1) * h + beta.view(-1, 6, 1, 1)
    torch.testing.assert_close(cond_instance_norm_ref(x, gamma, alpha, beta), ncsnv2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cond_instance_norm(x, gamma, alpha, beta), ncsnv2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x_dtype,p_dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float16, torch.float32),
     (torch.bfloat16, torch.float64)],
)  # fmt: skip
def test_mixed_dtypes_give_x_dtype_in_op_and_reference(backend, x_dtype, p_dtype):
    """The promotion rule: the result has x's dtype, whatever the parameters' dtypes, in the fused op and in
    the reference alike (the reference computes in the promoted dtype, then rounds to x's); gradients come
    back in each input's own dtype. The layers promote x first (ncsnv2's dtype): test_normalization."""
    shape = (2, 5, 6, 7)
    x = make_x(shape, x_dtype)
    gamma, alpha, beta, act = make_params(shape, p_dtype, "plus_cond_elu")
    with use(backend):
        out = cond_instance_norm(x, gamma, alpha, beta, act=act)
    ref = cond_instance_norm_ref(x, gamma, alpha, beta, act=act)
    assert out.dtype == ref.dtype == x_dtype
    exact = cond_instance_norm_ref(x.double(), gamma.double(), alpha.double(), beta.double(), act=act)
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[x_dtype]
    torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
    torch.testing.assert_close(ref.double(), exact, rtol=tol, atol=tol)
    leaves = [t.detach().requires_grad_() for t in (x, gamma, alpha, beta)]
    for fn in (cond_instance_norm, cond_instance_norm_ref):
        with use(backend):
            grads = torch.autograd.grad(fn(*leaves, act=act).float().sum(), leaves)
        assert [g.dtype for g in grads] == [x_dtype, p_dtype, p_dtype, p_dtype]
