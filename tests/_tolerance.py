"""Comparison against a float64 reference with a tolerance earned by the dtype.

One op: tolerance = max(floor, 2 x the error plain PyTorch makes in that dtype against float64), as in
mamba's tests: a fused kernel may be as inexact as PyTorch itself (twice), never more. Blocks, networks
and training steps (many ops deep, with max pooling): the section "composite results" below.
"""

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(got, ref64, plain, *, what: str, dtype=None, floor_scale: float = 1.0):
    """got (fused, in `dtype`) vs ref64 (float64 reference); plain = the same reference run in `dtype`."""
    dtype = dtype or got.dtype
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{what}: the reference itself is not finite"
    scale = max(1.0, ref64.abs().max().item()) * floor_scale
    tol = max(FLOOR[dtype] * scale, 2 * max_abs_err(plain, ref64))
    err = (got.double() - ref64).abs()
    if not (err.max().item() <= tol):
        worst = torch.nonzero(err == err.max())[0].tolist()
        raise AssertionError(
            f"{what}: max |fused - float64 reference| = {err.max().item():.3e} at {worst} "
            f"(fused {got.double().flatten()[err.flatten().argmax()].item():.6g}, "
            f"reference {ref64.flatten()[err.flatten().argmax()].item():.6g}) exceeds tolerance {tol:.3e} "
            f"(plain PyTorch {dtype} error {max_abs_err(plain, ref64):.3e})"
        )


# ---- composite results: blocks, networks, training steps ----------------------------------------------------
#
# A block or a network is many ops deep, and two things make its float32 result differ from the float64
# reference by more than the per-op rule above allows, on some CPUs and not others:
#
# 1. Max pooling is discontinuous where two inputs of a window tie. Two values of a window can lie within
#    float32 rounding of each other; the float32 run then picks one input and the float64 reference (or a
#    float32 run on a CPU that rounds differently) the other, and the gradient goes to another place: an
#    error of the size of the gradient, not of rounding. So the float64 reference that judges a float32
#    run is evaluated on the same piece of the piecewise-smooth function: each of its max poolings routes
#    to the input the float32 run picked (`max_pool_choices`, `pinned_max_pools`). Near a tie the two
#    inputs are equal up to rounding, so the reference's forward result moves by no more than that.
#
# 2. The network amplifies rounding (an instance norm divides by the spread of a small plane, the bias
#    gradient behind a norm is a sum that cancels to almost nothing), and in these small networks a few
#    early roundings dominate every later result. The error a float32 run makes on one tensor is then one
#    draw of a quantity whose size depends on where its roundings happen to fall: on one tensor two correct
#    implementations differ by 8x on one CPU and not on another, so "within k x the float32 reference's own
#    error on this tensor" has no k that holds everywhere (the reference's own error on a tensor can be
#    small by chance). What is stable is the size of the rounding error the network makes: the largest
#    error the float32 reference makes on any of the results, at several nearby inputs (a nearby input
#    draws every rounding anew). A float32 result may be at most RESULT_SCALE times that, on every tensor
#    and at every input (`assert_float32_within_network_rounding`). Which formulas the fused code computes
#    is then checked exactly in float64 (`assert_float64_matches`): float64 has no such ties in random
#    data, and its rounding, amplified as much as the float32 comparison shows this network amplifies
#    float32's (2^-29 times that error), stays far below the float64 floor; the check says so if not.

# The multiple of the network's float32 rounding error (the reference's largest over its results and the
# nearby inputs) a fused result may have: the per-op rule's 2 (a fused kernel may be twice as inexact as
# PyTorch; where a fused backward sums its terms in another order it is, on the sums that cancel), times 2
# for the spread between the largest of one set of rounding errors and the largest of another. That
# spread shrinks with the number of draws: with one input it exceeds 3 (the largest error is then one
# dominant rounding, a single draw), with 8 it still reaches ~3.6 on some CPU paths, with 16 it stays at
# most ~2.3 (the small networks of tests/test_models.py, 6 weight seeds each, under every fastscore and
# ATen capability level and oneDNN's AVX2 and AVX-512 code).
RESULT_SCALE = 4
NEARBY_INPUTS = 16  # inputs at which the float32 errors are measured: the given one and 15 perturbed copies
U32_TO_U64 = 2.0**-29  # float64's unit roundoff over float32's


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|)."""
    return max_abs_err(got, want) / max(1.0, want.abs().max().item()) if want.numel() else 0.0


def nearby(point, n: int = NEARBY_INPUTS, *, scale: float = 1e-3, seed: int = 0) -> list:
    """`point` and n - 1 copies with every floating tensor in it moved by ~scale x its largest magnitude.

    `point` is a tensor or a (nested) tuple / list of them and other values (labels, shapes: kept). A move
    of 1e-3 changes every rounding of the computation and not how much the computation amplifies them.
    """
    gen = torch.Generator().manual_seed(seed)

    def move(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            step = scale * max(1.0, v.abs().max().item())
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float64)
            moved = (v.double() + step * noise).to(v.dtype)
            return moved.contiguous(memory_format=torch.channels_last) if _channels_last(v) else moved
        if isinstance(v, (tuple, list)):
            return type(v)(move(e) for e in v)
        return v

    return [point] + [move(point) for _ in range(n - 1)]


def _channels_last(v: torch.Tensor) -> bool:
    return v.dim() == 4 and not v.is_contiguous() and v.is_contiguous(memory_format=torch.channels_last)


def _choice(x: torch.Tensor, pool) -> torch.Tensor:
    """The flat H*W index of the input each output of the pooling takes (PyTorch's choice; fastscore's
    crp_pool routes its gradients to the same inputs, see tests/test_crp_pool.py)."""
    kernel, stride, padding, dilation = pool
    return F.max_pool2d(x.detach(), kernel, stride, padding, dilation, return_indices=True)[1]


def _pool_args(module: nn.MaxPool2d):
    return module.kernel_size, module.stride, module.padding, module.dilation


@contextlib.contextmanager
def max_pool_choices():
    """Records, in call order, the input every max pooling run inside picks for each output: the fused
    layers' crp_pool calls and every nn.MaxPool2d module (the reference layers). Yields the list."""
    from fastscore.nn import layers
    from fastscore.ops.crp_pool import KERNEL
    from fastscore.ops.crp_pool import PADDING
    from fastscore.ops.crp_pool import STRIDE

    choices = []
    real = layers.crp_pool

    def recording_crp_pool(x, *, mode="max"):
        if mode == "max":
            choices.append(_choice(x, (KERNEL, STRIDE, PADDING, 1)))
        return real(x, mode=mode)

    def record(module, args):
        if type(module) is nn.MaxPool2d:
            choices.append(_choice(args[0], _pool_args(module)))

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    layers.crp_pool = recording_crp_pool
    try:
        yield choices
    finally:
        layers.crp_pool = real
        handle.remove()


@contextlib.contextmanager
def pinned_max_pools(choices):
    """Inside, the i-th nn.MaxPool2d call returns its input at `choices[i]` instead of each window's
    maximum (for the reference layers, which pool with nn.MaxPool2d): the value of the input a float32 run
    picked there, with the gradient going to it. Checks that the calls match the recorded ones."""
    calls = iter(choices)

    def pinned(module, args, out):
        if type(module) is not nn.MaxPool2d:
            return None
        index = next(calls, None)
        assert index is not None and index.shape == out.shape, "the pinned run pools other tensors than recorded"
        x = args[0]
        return x.flatten(2).gather(2, index.flatten(2).to(x.device)).view(out.shape)

    handle = nn.modules.module.register_module_forward_hook(pinned)
    try:
        yield
    finally:
        handle.remove()
    assert next(calls, None) is None, "the pinned run pooled fewer tensors than the recorded one"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """The originals' MSF blocks sum in a buffer of the default dtype (docs/numerics.md#the-msf-sum-dtype): a
    float64 run of the reference layers needs it set."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def assert_float64_matches(got, want, labels, *, network_error: float | None = None):
    """Fused float64 results `got` vs the float64 reference's `want` (lists, named by `labels`): each within
    FLOOR[float64] x max(1, max |want|). `network_error` (the largest relative float32 error of the
    reference, from assert_float32_within_network_rounding) checks that the floor covers float64 rounding
    amplified as much as this computation amplifies float32 rounding."""
    tol = FLOOR[torch.float64]
    if network_error is not None:
        amplified = RESULT_SCALE * network_error * U32_TO_U64
        assert amplified <= tol, f"float64 rounding here may reach {amplified:.1e}, above the floor {tol:.0e}"
    assert len(got) == len(want) == len(labels)
    for what, a, b in zip(labels, got, want):
        assert a.dtype == b.dtype == torch.float64, f"{what}: {a.dtype} vs {b.dtype}"
        err = rel_err(a, b)
        assert err <= tol, f"{what}: float64 fused vs float64 reference {err:.2e} > {tol:.0e} (a formula differs)"


def assert_float32_within_network_rounding(fused, ref, ref64, points, labels, *, fused_points=None) -> float:
    """Every float32 result of `fused` within RESULT_SCALE x the largest error the float32 reference makes.

    fused(point), ref(point): the float32 results (a list of tensors named by `labels`) at one input;
    ref64(point): the reference's results in float64 at that input (run under pinned_max_pools, so on
    the same side of every max-pooling tie as the float32 run it judges). `points`: the input and nearby
    copies (`nearby`); the fused results are taken at the first `fused_points` of them (default all).
    Errors are relative: max |error| / max(1, max |reference|). Returns the reference's largest error.
    """
    fused_points = len(points) if fused_points is None else fused_points
    worst = {what: (0.0, None) for what in labels}
    own = 0.0
    for i, point in enumerate(points):
        cache = []  # (choices, float64 results): one float64 run per distinct set of max-pooling choices
        sides = [("fused", fused), ("ref", ref)] if i < fused_points else [("ref", ref)]
        for side, run in sides:
            with max_pool_choices() as choices:
                got = run(point)
            want = next((w for c, w in cache if _same(c, choices)), None)
            if want is None:
                with pinned_max_pools(choices):
                    want = ref64(point)
                cache.append((choices, want))
            assert len(got) == len(want) == len(labels)
            errs = [rel_err(a, b) for a, b in zip(got, want)]
            if side == "ref":
                own = max(own, *errs)
            else:
                for what, err in zip(labels, errs):
                    worst[what] = max(worst[what], (err, i), key=lambda e: e[0])
    tol = max(FLOOR[torch.float32], RESULT_SCALE * own)
    for what, (err, i) in worst.items():
        assert err <= tol, (
            f"{what}: float32 error {err:.2e} (input {i}) exceeds {tol:.2e} = max(floor, {RESULT_SCALE} x {own:.2e}, "
            f"the largest error the float32 reference makes on any result at {len(points)} nearby inputs)"
        )
    return own


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
