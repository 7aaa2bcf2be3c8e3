"""Every fastscore op on small CUDA tensors, once per fused backend: the GPU counterpart of the op tests.

The op tests (tests/test_<op>.py) prove every backend against the float64 reference on CPU tensors only
(Triton in its interpreter). This driver runs the same ops on CUDA tensors under
``fastscore.use_backend("cuda")`` and ``use_backend("triton")`` -- forced, so a backend that cannot run
fails instead of falling back to the reference -- and is run by bench/gpu_check.sh in two ways:

    python bench/gpu_sanitize.py --check        # values against the float64 reference, tests' tolerances
    compute-sanitizer --tool memcheck python bench/gpu_sanitize.py --quick      # every kernel, sanitized

Covered: cond_instance_norm (forward, out= and in place, backward, jvp, a forward-mode tangent on gamma
alone; with and without alpha / beta / ELU, conditional and not, NCHW and NHWC, planes small enough for
one block and large enough to be split), crp_pool (max and avg: forward, backward, jvp; max with ties,
-inf and NaN against PyTorch's routing), elu (forward, out=, in place, backward, jvp; contiguous,
channels_last, permuted, 1-D), langevin_step_ (given and generated noise, masks), sde_update_,
langevin_corrector_step_ (its norms pass and update) and counter_randn, and the metropolis op (MALA proposal,
HMC momentum, leapfrog, both accept steps: bitwise against the reference, decisions included). Triton
compiles a kernel per specialisation, so it runs the large shapes and the half types on a subset (like the
op tests' triton cases); the CUDA backend runs every case.

``--device cpu`` runs the same cases on CPU tensors with the cpp backend (and triton when
TRITON_INTERPRET=1): a check of this driver itself on a machine without a GPU.

Exit status: 0 every case passed, 1 a case failed, 3 no CUDA device (the cases were built, none ran).
Needs the source tree: the tolerance rule is the op tests' own (tests/_tolerance.py).
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from _tolerance import FLOOR  # noqa: E402
from _tolerance import max_abs_err  # noqa: E402

import fastscore  # noqa: E402
from fastscore.ops import cond_instance_norm  # noqa: E402
from fastscore.ops import cond_instance_norm_ref  # noqa: E402
from fastscore.ops import counter_randn  # noqa: E402
from fastscore.ops import counter_randn_ref  # noqa: E402
from fastscore.ops import crp_pool  # noqa: E402
from fastscore.ops import crp_pool_ref  # noqa: E402
from fastscore.ops import elu  # noqa: E402
from fastscore.ops import elu_ref  # noqa: E402
from fastscore.ops import langevin_corrector_step_  # noqa: E402
from fastscore.ops import langevin_corrector_step_ref  # noqa: E402
from fastscore.ops import langevin_step_  # noqa: E402
from fastscore.ops import langevin_step_ref  # noqa: E402
from fastscore.ops import metropolis as mh  # noqa: E402
from fastscore.ops import sde_update_  # noqa: E402
from fastscore.ops import sde_update_ref  # noqa: E402

NO_CUDA = 3
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
OPS = ("cond_instance_norm", "crp_pool", "elu", "langevin", "metropolis")
SEED = 0x9E3779B97F4A7C15  # above 2^63: both Philox key words in use


# ---- checking -------------------------------------------------------------------------------------


class Checker:
    """Records the checks of the case that runs; with check=False only the fused calls run (sanitizer)."""

    def __init__(self, check: bool):
        self.check = check
        self.failures: list[str] = []
        self.checks = 0
        self.worst = 0.0  # the largest error / tolerance seen

    def _fail(self, what: str, msg: str) -> None:
        self.failures.append(f"{what}: {msg}")

    def close(self, what: str, got, ref64, plain, *, floor_scale: float = 1.0) -> None:
        """got (fused) vs ref64 (float64 reference) within max(floor, 2 x plain PyTorch's own error)."""
        self.checks += 1
        got, ref64, plain = (t.detach().cpu() for t in (got, ref64, plain))
        if got.shape != ref64.shape or got.dtype != plain.dtype:
            return self._fail(what, f"{tuple(got.shape)} {got.dtype}, expected {tuple(ref64.shape)} {plain.dtype}")
        if not got.numel():
            return
        scale = max(1.0, ref64.abs().max().item()) * floor_scale
        tol = max(FLOOR[got.dtype] * scale, 2 * max_abs_err(plain, ref64))
        err = max_abs_err(got, ref64)
        self.worst = max(self.worst, err / tol if tol else math.inf)
        if not err <= tol:  # NaN fails too
            self._fail(what, f"max |fused - float64 reference| = {err:.3e} > tolerance {tol:.3e}")

    def near(self, what: str, got, want, **tol) -> None:
        """got vs want (the reference in got's dtype) within torch.testing's defaults for the dtype, or tol."""
        self.checks += 1
        try:
            torch.testing.assert_close(got.detach().cpu(), want.detach().cpu(), **tol)
        except AssertionError as exc:
            self._fail(what, " ".join(str(exc).split())[:300])

    def exact(self, what: str, got, want) -> None:
        """Bitwise equal (NaN where want has NaN)."""
        self.checks += 1
        got, want = got.detach().cpu(), want.detach().cpu()
        if got.shape != want.shape or got.dtype != want.dtype:
            return self._fail(what, f"{tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}")
        same = (got == want) | (got.isnan() & want.isnan())
        if not bool(same.all()):
            bad = (~same).nonzero()
            diff = (got.double() - want.double()).abs().nan_to_num(math.inf)
            self._fail(
                what,
                f"not bitwise equal at {bad.shape[0]} elements (first {bad[0].tolist()}; max diff {diff.max():.3e})",
            )

    def true(self, what: str, cond: bool, msg: str) -> None:
        self.checks += 1
        if not cond:
            self._fail(what, msg)


@dataclass
class Case:
    op: str
    name: str
    run: Callable[[Checker, torch.dtype, str], None]  # (checker, dtype, device)
    triton_dtypes: tuple[torch.dtype, ...] = tuple(DTYPES.values())  # dtypes the triton backend runs it in
    quick: bool = True  # part of --quick (the sanitizer runs)

    def keeps(self, backend: str, dtype: torch.dtype) -> bool:
        return backend != "triton" or dtype in self.triton_dtypes


F32 = (torch.float32, torch.float64)  # triton_dtypes of the cases triton runs in full precision only
NONE = ()  # ... and of those it skips (large shapes whose kernels the smaller cases already compile)


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else t.contiguous()


def _label(shape, layout: str = "") -> str:
    return "x".join(map(str, shape)) + (f" {layout}" if layout else "")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _plain_jvp(fn, primals, tangents):
    """The reference's tangent in the primals' own dtype (its rounding error sets the tolerance)."""
    return torch.func.jvp(fn, primals, tangents)[1]


# ---- cond_instance_norm ---------------------------------------------------------------------------

CIN_VARIANTS = {  # name: (alpha, beta, conditional (N, C) rows, act), as tests/test_cond_instance_norm.py
    "plus_cond_elu": (True, True, True, "elu"),
    "plus_uncond": (True, True, False, None),
    "plain_cond": (False, True, True, None),
    "plus_nobeta_elu": (True, False, True, "elu"),
}
# (shape, layout, full): odd planes (scalar loads), vectorised NHWC and NCHW, N = 1 with a partial
# 32-channel tile, and planes large enough that the CUDA statistics pass splits them (NCHW above 4096
# elements, NHWC above 128 rows). `full`: every variant and dtype on triton too.
CIN_SHAPES = [
    ((3, 5, 7, 9), "nchw", True),
    ((2, 16, 8, 8), "nhwc", True),
    ((1, 40, 9, 9), "nhwc", False),
    ((2, 8, 16, 16), "nchw", False),
    ((2, 3, 96, 96), "nchw", False),
    ((2, 40, 48, 48), "nhwc", False),
]


def _cin_inputs(shape, layout, variant, dtype, device):
    with_alpha, with_beta, conditional, act = CIN_VARIANTS[variant]
    g = _gen(0)
    N, C = shape[:2]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + torch.randn(N, C, 1, 1, generator=g) * 3 + 1
    rows = (N, C) if conditional else (C,)
    gamma = 1 + 0.3 * torch.randn(rows, generator=g, dtype=torch.float64)
    alpha = 1 + 0.3 * torch.randn(rows, generator=g, dtype=torch.float64) if with_alpha else None
    beta = 0.5 * torch.randn(rows, generator=g, dtype=torch.float64) if with_beta else None
    x = _layout(x.to(device, dtype), layout)
    params = [None if p is None else p.to(device, dtype) for p in (gamma, alpha, beta)]
    return x, params, act


def _cin_case(shape, layout, variant):
    def run(ck: Checker, dtype, device):
        x, (gamma, alpha, beta), act = _cin_inputs(shape, layout, variant, dtype, device)
        names = [n for n, p in zip(("x", "gamma", "alpha", "beta"), (x, gamma, alpha, beta)) if p is not None]
        present = [p for p in (x, gamma, alpha, beta) if p is not None]
        g = _gen(1)
        grad_out = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype), layout)
        tangents = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, dtype) for p in present]
        tangents[0] = _layout(tangents[0], layout)
        x_before = x.clone()

        def call(fn):
            def f(*args):
                d = dict(zip(names, args))
                return fn(d["x"], d["gamma"], d.get("alpha"), d.get("beta"), act=act)

            return f

        with torch.no_grad():
            out = cond_instance_norm(x, gamma, alpha, beta, act=act)
            out_buf = torch.empty_like(x)
            cond_instance_norm(x, gamma, alpha, beta, act=act, out=out_buf)
            in_place = x.clone(memory_format=torch.preserve_format)
            cond_instance_norm(in_place, gamma, alpha, beta, act=act, out=in_place)
        leaves = [p.detach().requires_grad_() for p in present]
        grads = torch.autograd.grad(call(cond_instance_norm)(*leaves), leaves, grad_out)
        out_j, out_t = torch.func.jvp(call(cond_instance_norm), tuple(present), tuple(tangents))
        gamma_only = None
        if variant == "plus_cond_elu":  # a tangent on gamma alone: the jvp kernels' path without x_t
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                dual = cond_instance_norm(x, fwAD.make_dual(gamma, tangents[1]), alpha, beta, act=act)
                gamma_only = fwAD.unpack_dual(dual).tangent
        if not ck.check:
            return

        cpu = [_cpu(p) for p in present]
        cpu64 = [p.double() for p in cpu]
        ref64 = call(cond_instance_norm_ref)(*cpu64)
        plain = call(cond_instance_norm_ref)(*cpu)
        ck.close("forward", out, ref64, plain)
        ck.exact("x unchanged", x, x_before)
        if layout == "nhwc":
            ck.true("layout", out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last")
        ck.close("out=", out_buf, ref64, plain)
        ck.close("in place (out=x)", in_place, ref64, plain)
        leaves64 = [p.requires_grad_() for p in cpu64]
        ref_grads = torch.autograd.grad(call(cond_instance_norm_ref)(*leaves64), leaves64, _cpu(grad_out).double())
        leaves_plain = [p.clone().requires_grad_() for p in cpu]
        plain_grads = torch.autograd.grad(call(cond_instance_norm_ref)(*leaves_plain), leaves_plain, _cpu(grad_out))
        for name, got, r, p in zip(names, grads, ref_grads, plain_grads):
            # parameter gradients sum over H * W (and N): their error grows with that count
            ck.close(f"grad {name}", got, r, p, floor_scale=1 if name == "x" else 10)
        t_cpu = [_cpu(t) for t in tangents]
        ref_j, ref_t = torch.func.jvp(call(cond_instance_norm_ref), tuple(cpu64), tuple(t.double() for t in t_cpu))
        ck.close("jvp primal", out_j, ref_j, plain)
        ck.close("jvp tangent", out_t, ref_t, _plain_jvp(call(cond_instance_norm_ref), tuple(cpu), tuple(t_cpu)))
        ck.true("jvp tangent", bool(out_t.abs().max() > 0), "zero tangent: forward-mode AD missed the kernel")
        if gamma_only is not None:
            zero = [torch.zeros_like(t) for t in t_cpu]
            only = [zero[0], t_cpu[1]] + zero[2:]
            ref_g = torch.func.jvp(call(cond_instance_norm_ref), tuple(cpu64), tuple(t.double() for t in only))[1]
            plain_g = _plain_jvp(call(cond_instance_norm_ref), tuple(cpu), tuple(only))
            ck.close("tangent of gamma alone", gamma_only, ref_g, plain_g)

    return run


def cin_cases() -> list[Case]:
    cases = []
    for shape, layout, full in CIN_SHAPES:
        for variant in CIN_VARIANTS:
            if full:
                keep = tuple(DTYPES.values())
            else:
                keep = F32 if variant == "plus_cond_elu" else NONE
            quick = full or variant == "plus_cond_elu"
            name = f"{_label(shape, layout)} {variant}"
            cases.append(Case("cond_instance_norm", name, _cin_case(shape, layout, variant), keep, quick))
    return cases


# ---- crp_pool -------------------------------------------------------------------------------------

# odd sizes in one tile; several NCHW tiles (16 x 32) with halos across their edges; a partial NHWC
# 32-channel tile; NHWC tiles of 4 x 4 pixels with an image edge inside.
CRP_SHAPES = [((2, 3, 7, 9), "nchw", True), ((2, 3, 37, 45), "nchw", False), ((2, 40, 9, 7), "nhwc", True)]
CRP_SHAPES += [((1, 8, 20, 22), "nhwc", False)]


def _crp_case(shape, layout, mode):
    def run(ck: Checker, dtype, device):
        g = _gen(2)
        n = math.prod(shape)
        if mode == "max":  # distinct values: max pooling is differentiable there
            x = (torch.randperm(n, generator=g, dtype=torch.float64) / n * 4 - 2).reshape(shape)
        else:
            x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
        x = _layout(x.to(device, dtype), layout)
        grad_out = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype), layout)
        v = _layout(torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype), layout)
        with torch.no_grad():
            out = crp_pool(x, mode=mode)
        leaf = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(crp_pool(leaf, mode=mode), leaf, grad_out)
        _, out_t = torch.func.jvp(lambda y: crp_pool(y, mode=mode), (x,), (v,))
        if not ck.check:
            return

        xc = _cpu(x)
        ref64, plain = crp_pool_ref(xc.double(), mode=mode), crp_pool_ref(xc, mode=mode)
        ck.close("forward", out, ref64, plain)
        if mode == "max":
            ck.exact("forward equals F.max_pool2d", out, F.max_pool2d(xc, 5, stride=1, padding=2))
        if layout == "nhwc":
            ck.true("layout", out.is_contiguous(memory_format=torch.channels_last), "output lost channels_last")
        x64 = xc.double().requires_grad_()
        (ref_grad,) = torch.autograd.grad(crp_pool_ref(x64, mode=mode), x64, _cpu(grad_out).double())
        xp = xc.clone().requires_grad_()
        (plain_grad,) = torch.autograd.grad(crp_pool_ref(xp, mode=mode), xp, _cpu(grad_out))
        # a max input may collect up to 25 output gradients: the error scales with that sum
        ck.close("grad x", grad, ref_grad, plain_grad, floor_scale=5 if mode == "max" else 1)
        vc = _cpu(v)
        _, ref_t = torch.func.jvp(lambda y: crp_pool_ref(y, mode=mode), (xc.double(),), (vc.double(),))
        ck.close("jvp tangent", out_t, ref_t, _plain_jvp(lambda y: crp_pool_ref(y, mode=mode), (xc,), (vc,)))

    return run


def _crp_ties_case(shape, layout):
    """Small integers (ties), -inf windows and NaNs: output and gradient routing exactly as F.max_pool2d."""

    def run(ck: Checker, dtype, device):
        g = _gen(3)
        x = torch.randint(-2, 3, shape, generator=g).to(dtype)
        x[x == 2] = float("-inf")
        x[..., :3, :3] = float("-inf")
        flat = x.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 40 + 1]] = float("nan")
        x = _layout(x, layout)
        grad_out = _layout(torch.randint(-3, 4, shape, generator=g).to(dtype), layout)  # sums of them are exact
        leaf = x.to(device).requires_grad_()
        out = crp_pool(leaf, mode="max")
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(device))
        if not ck.check:
            return
        xc = x.clone().requires_grad_()
        want = F.max_pool2d(xc, 5, stride=1, padding=2)
        (want_grad,) = torch.autograd.grad(want, xc, grad_out)
        ck.exact("forward (ties, -inf, NaN)", out, want)
        ck.exact("gradient routing (ties, -inf, NaN)", grad, want_grad)

    return run


def crp_cases() -> list[Case]:
    cases = []
    for shape, layout, full in CRP_SHAPES:
        for mode in ("max", "avg"):
            keep = tuple(DTYPES.values()) if full else F32
            cases.append(
                Case("crp_pool", f"{_label(shape, layout)} {mode}", _crp_case(shape, layout, mode), keep, full)
            )
    for layout in ("nchw", "nhwc"):
        cases.append(Case("crp_pool", f"2x3x7x9 {layout} max ties", _crp_ties_case((2, 3, 7, 9), layout), F32, False))
    return cases


# ---- elu ------------------------------------------------------------------------------------------

ELU_SHAPES = [((3, 5, 7, 9), "nchw"), ((2, 8, 6, 5), "nhwc"), ((1001,), ""), ((33, 4), "permuted")]
ELU_SHAPES += [((2, 3, 64, 64), "nhwc")]


def _elu_case(shape, layout):
    def run(ck: Checker, dtype, device):
        g = _gen(4)
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(device, dtype)
        if layout == "nhwc":
            x = _layout(x, layout)
        elif layout == "permuted":  # dense, neither contiguous nor channels_last: walked in memory order
            x = x.t().contiguous().t()
        grad_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        v = torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype)
        x_before = x.clone()
        with torch.no_grad():
            out = elu(x)
            into = torch.empty_like(x)
            elu(x, out=into)
            other = torch.empty(shape, dtype=dtype, device=device)  # out in another layout than x's
            elu(x, out=other)
            in_place = x.clone()
            elu(in_place, out=in_place)
        leaf = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(elu(leaf), leaf, grad_out)
        _, out_t = torch.func.jvp(elu, (x,), (v,))
        if not ck.check:
            return

        xc = _cpu(x)
        ref64, plain = F.elu(xc.double()), F.elu(xc)
        ck.close("forward", out, ref64, plain)
        ck.true("layout", out.stride() == x.stride(), f"strides {out.stride()} != x's {x.stride()}")
        ck.exact("x unchanged", x, x_before)
        ck.close("out=", into, ref64, plain)
        ck.close("out= in another layout", other, ref64, plain)
        ck.close("in place (out=x)", in_place, ref64, plain)
        x64 = xc.double().requires_grad_()
        (ref_grad,) = torch.autograd.grad(elu_ref(x64), x64, _cpu(grad_out).double())
        xp = xc.clone().requires_grad_()
        (plain_grad,) = torch.autograd.grad(F.elu(xp), xp, _cpu(grad_out))
        ck.close("grad x", grad, ref_grad, plain_grad)
        vc = _cpu(v)
        _, ref_t = torch.func.jvp(elu_ref, (xc.double(),), (vc.double(),))
        ck.close("jvp tangent", out_t, ref_t, _plain_jvp(F.elu, (xc,), (vc,)))

    return run


def elu_cases() -> list[Case]:
    cases = []
    for i, (shape, layout) in enumerate(ELU_SHAPES):
        full = i < 2
        keep = tuple(DTYPES.values()) if full else F32
        cases.append(Case("elu", _label(shape, layout), _elu_case(shape, layout), keep, full or layout == ""))
    return cases


# ---- langevin_step_, sde_update_, langevin_corrector_step_, counter_randn ---------------------------

# vectors and images; D not a multiple of 4 (Philox blocks straddle samples); NHWC; samples of several
# 1024-element blocks (several programs, and norms pieces, per sample).
LGV_SHAPES = [((5, 7), "", True), ((3, 5, 7, 9), "nchw", True), ((2, 17, 3, 5), "nhwc", False)]
LGV_SHAPES += [((2, 3, 40, 40), "nhwc", False), ((1, 1), "", False)]


def _lgv_case(shape, layout):
    def run(ck: Checker, dtype, device):
        g = _gen(5)
        N = shape[0]

        def make(scale=1.0, shift=0.0):
            t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)
            return _layout(t, layout) if layout else t

        x, score, noise = make(2, 0.5), make(), make()
        step = (torch.rand(N, generator=g) * 0.05).to(device)
        soft = torch.rand((1,) + shape[1:], generator=g).to(device, dtype)
        known = make()
        snr = 0.16
        alpha = torch.linspace(0.9, 1.0, N, dtype=torch.float64).to(device, dtype)
        scales = dict(x_scale=1.01, score_scale=step * 2, noise_scale=step.sqrt())

        def fresh():
            return x.clone(memory_format=torch.preserve_format)

        with torch.no_grad():
            given = langevin_step_(fresh(), score, 0.0123, noise=noise)
            masked = langevin_step_(fresh(), score, step, noise=noise, mask=soft, known=known)
            generated = langevin_step_(fresh(), score, step, seed=SEED, counter=17, sample_offset=3)
            mean = torch.empty_like(x)
            sde = sde_update_(fresh(), score, x_mean=mean, seed=SEED, counter=5, **scales)
            corrected = {}
            for per_sample in (True, False):
                for kw in ({"noise": noise}, {"seed": SEED, "counter": 4}):
                    key = (per_sample, "noise" in kw)
                    c_mean = torch.empty_like(x)
                    y = langevin_corrector_step_(
                        fresh(), score, snr, alpha=alpha, per_sample=per_sample, x_mean=c_mean, **kw
                    )
                    corrected[key] = (y, c_mean, kw)
            randn = {
                dt: counter_randn(shape, seed=SEED, counter=2**40 + 7, sample_offset=5, dtype=dt, device=device)
                for dt in (torch.float32, dtype)
            }
        if not ck.check:
            return

        xc, sc, nc = _cpu(x), _cpu(score), _cpu(noise)
        stc = _cpu(step)
        ck.exact("langevin_step_ given noise", given, langevin_step_ref(xc, sc, 0.0123, noise=nc))
        want = langevin_step_ref(xc, sc, stc, noise=nc, mask=_cpu(soft), known=_cpu(known))
        ck.exact("langevin_step_ mask", masked, want)
        ck.exact(
            "langevin_step_ generated",
            generated,
            langevin_step_ref(xc, sc, stc, seed=SEED, counter=17, sample_offset=3),
        )
        if layout == "nhwc":
            ck.true("layout", generated.is_contiguous(memory_format=torch.channels_last), "x lost channels_last")
        scales_c = {k: _cpu(v) if isinstance(v, torch.Tensor) else v for k, v in scales.items()}
        want, want_mean = sde_update_ref(xc, sc, seed=SEED, counter=5, **scales_c)
        ck.near("sde_update_ x", sde, want)
        ck.near("sde_update_ x_mean", mean, want_mean)
        tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}
        for (per_sample, given_noise), (y, c_mean, kw) in corrected.items():
            kw_c = {k: _cpu(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            want, want_mean = langevin_corrector_step_ref(xc, sc, snr, alpha=_cpu(alpha), per_sample=per_sample, **kw_c)
            what = f"corrector per_sample={per_sample} {'given' if given_noise else 'generated'} noise"
            ck.near(what + " x", y, want, **tol)
            ck.near(what + " x_mean", c_mean, want_mean, **tol)
        want = counter_randn_ref(shape, seed=SEED, counter=2**40 + 7, sample_offset=5)
        for dt, got in randn.items():
            ck.exact(f"counter_randn {str(dt)[6:]}", got, want.to(dt))

    return run


def lgv_cases() -> list[Case]:
    cases = []
    for shape, layout, full in LGV_SHAPES:
        keep = tuple(DTYPES.values()) if full else F32
        cases.append(Case("langevin", _label(shape, layout), _lgv_case(shape, layout), keep, full or layout == "nhwc"))
    return cases


# ---- metropolis: MALA / HMC proposals, leapfrog, accept steps ------------------------------------------------

# a sample in several 1024-element pieces (several blocks / programs per sample, and the pieces' sums added),
# NHWC, D = 1.
MH_SHAPES = [((5, 7), "", True), ((3, 5, 7, 9), "nhwc", True), ((2, 3, 40, 40), "nchw", False), ((4, 1), "", False)]


def _mh_case(shape, layout):
    def run(ck: Checker, dtype, device):
        g = _gen(7)
        N = shape[0]

        def make(scale=1.0):
            t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)
            return _layout(t, layout) if layout else t

        x, score, other, p = make(2), make(), make(), make()
        step = (torch.rand(N, generator=g, dtype=torch.float64) * 0.2 + 0.01).to(device)
        e = (torch.randn(N, generator=g, dtype=torch.float64) * 10).to(device)
        ep = e + torch.randn(N, generator=g, dtype=torch.float64).to(device)
        kw = dict(seed=SEED, counter=2**40 + 3, sample_offset=5)
        with torch.no_grad():
            prop = mh.mala_propose(x, score, step, **kw)
            start = mh.hmc_momentum(x, score, step, **kw)
            xl, pl = x.clone(memory_format=torch.preserve_format), p.clone(memory_format=torch.preserve_format)
            mh.hmc_leapfrog_(xl, pl, score, step)
            xm, sm, em = (
                x.clone(memory_format=torch.preserve_format),
                score.clone(memory_format=torch.preserve_format),
                e.clone(),
            )
            dm = mh.mala_accept_(xm, sm, em, prop.x, other, ep, prop.z_sq, step, **kw)
            xh, sh, eh = (
                x.clone(memory_format=torch.preserve_format),
                score.clone(memory_format=torch.preserve_format),
                e.clone(),
            )
            dh = mh.hmc_accept_(xh, sh, eh, start.x, other, ep, p, start.p_sq, step, **kw)
        if not ck.check:
            return
        xc, sc, oc, pc, stc, ec, epc = (_cpu(t) for t in (x, score, other, p, step, e, ep))
        want = mh.mala_propose_ref(xc, sc, stc, **kw)
        ck.exact("mala_propose x", prop.x, want.x)
        ck.exact("mala_propose |z|^2", prop.z_sq, want.z_sq)
        for name, got, ref in zip(("x", "p", "|p0|^2"), start, mh.hmc_momentum_ref(xc, sc, stc, **kw)):
            ck.exact(f"hmc_momentum {name}", got, ref)
        wx, wp = mh.hmc_leapfrog_ref(xc, pc, sc, stc)
        ck.exact("hmc_leapfrog_ x", xl, wx)
        ck.exact("hmc_leapfrog_ p", pl, wp)
        wm = mh.mala_accept_ref(xc, sc, ec, want.x, oc, epc, want.z_sq, stc, **kw)
        wh = mh.hmc_accept_ref(xc, sc, ec, _cpu(start.x), oc, epc, pc, _cpu(start.p_sq), stc, **kw)
        for kind, (d, xs, ss, es), w in (("mala", (dm, xm, sm, em), wm), ("hmc", (dh, xh, sh, eh), wh)):
            ck.exact(f"{kind}_accept_ log alpha", d.log_alpha, w.log_alpha)
            ck.exact(f"{kind}_accept_ decisions", d.accepted, w.accepted)
            ck.exact(f"{kind}_accept_ x", xs, w.x)
            ck.exact(f"{kind}_accept_ score", ss, w.score)
            ck.exact(f"{kind}_accept_ energy", es, w.energy)
        if layout == "nhwc":
            ck.true(
                "layout", prop.x.is_contiguous(memory_format=torch.channels_last), "the proposal lost channels_last"
            )

    return run


def mh_cases() -> list[Case]:
    cases = []
    for shape, layout, full in MH_SHAPES:
        keep = tuple(DTYPES.values()) if full else F32
        cases.append(Case("metropolis", _label(shape, layout), _mh_case(shape, layout), keep, full))
    return cases


ALL_CASES = {
    "cond_instance_norm": cin_cases,
    "crp_pool": crp_cases,
    "elu": elu_cases,
    "langevin": lgv_cases,
    "metropolis": mh_cases,
}


# ---- driver ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _default_backends(device: str) -> list[str]:
    if device == "cuda":
        return ["cuda", "triton"]
    return ["cpp"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _where(exc: Exception) -> str:
    """file:line of the innermost frame in fastscore, its kernels or this driver (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if any(part in f.filename for part in ("fastscore", "kernels", "bench"))]
    frame = (ours or frames)[-1]
    return f"{pathlib.Path(frame.filename).parent.name}/{pathlib.Path(frame.filename).name}:{frame.lineno}"


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare every result with the float64 reference")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", type=_csv, help="comma-separated (default: cuda,triton; cpu: cpp)")
    parser.add_argument("--ops", type=_csv, default=list(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--dtypes", type=_csv, default=["float32", "float16"], help=f"of {','.join(DTYPES)}")
    parser.add_argument("--quick", action="store_true", help="fewer shapes (the sanitizer runs)")
    parser.add_argument("--verbose", action="store_true", help="a line per case")
    args = parser.parse_args(argv)
    bad = [o for o in args.ops if o not in OPS] + [d for d in args.dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown op or dtype: {', '.join(bad)}")
    backends = args.backends or _default_backends(args.device)
    cases = [case for op in args.ops for case in ALL_CASES[op]() if case.quick or not args.quick]
    print(
        f"gpu_sanitize: {len(cases)} cases of {', '.join(args.ops)}; backends {', '.join(backends)}; "
        f"dtypes {', '.join(args.dtypes)}; {'checking values' if args.check else 'calls only'}",
        flush=True,
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: needs a CUDA device; none is available (nothing ran)", flush=True)
        return NO_CUDA
    if args.device == "cuda":
        print(
            f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; backends available on cuda: "
            + ", ".join(n for n, i in fastscore.backends().items() if "cuda" in i["devices"]),
            flush=True,
        )

    failures, total_checks, ran, rows = [], 0, 0, []
    for backend in backends:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            for op in args.ops:
                group = [c for c in cases if c.op == op and c.keeps(backend, dtype)]
                if not group:
                    continue
                ck = Checker(args.check)
                start, group_failures = time.perf_counter(), 0
                for case in group:
                    what = f"{backend} {dtype_name} {op} {case.name}"
                    before = len(ck.failures)
                    try:
                        with fastscore.use_backend(backend):
                            case.run(ck, dtype, args.device)
                        _sync(args.device)
                    except Exception as exc:  # one case's failure must not stop the others
                        ck.failures.append(
                            f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                            f"({_where(exc)})"
                        )
                    ran += 1
                    new = ck.failures[before:]
                    group_failures += bool(new)
                    for msg in new:
                        line = f"FAIL {what}: {msg}"
                        failures.append(line)
                        print(line, flush=True)
                    if args.verbose:
                        print(f"{'FAIL' if new else 'ok  '} {what}", flush=True)
                total_checks += ck.checks
                worst = f"{ck.worst:.2f}" if args.check else "-"
                rows.append(
                    (backend, dtype_name, op, len(group), group_failures, ck.checks, worst, time.perf_counter() - start)
                )
                print(
                    f"done {backend} {dtype_name} {op}: {len(group)} cases, {group_failures} failed "
                    f"({time.perf_counter() - start:.1f} s)",
                    flush=True,
                )

    print()
    print(f"{'backend':<8} {'dtype':<9} {'op':<19} {'cases':>5} {'failed':>6} {'checks':>6} {'err/tol':>8} {'s':>6}")
    for backend, dtype_name, op, n, nf, nc, worst, secs in rows:
        print(f"{backend:<8} {dtype_name:<9} {op:<19} {n:>5} {nf:>6} {nc:>6} {worst:>8} {secs:>6.1f}")
    if args.check:
        print(
            "err/tol: the largest max|fused - float64 reference| / tolerance of the group (< 1 passes; exact "
            "comparisons count as checks but not here)"
        )
    verdict = "FAILED" if failures else "passed"
    print(f"gpu_sanitize: {verdict}: {ran} case runs, {total_checks} checks, {len(failures)} failures", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
