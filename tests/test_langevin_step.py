"""langevin_step_ (and the corrector / predictor updates, and the counter-based generator) on every backend.

Given noise: every backend equals the reference bitwise, over dtypes, shapes, layouts, step sizes and masks.
Generated noise: the same bits on every backend, equal to counter_randn, independent of the batch (sample k's
noise in a batch of 1, 7 or 64 and in shards named by sample_offset). The generator: Random123's known
answers for Philox4x32-10, the accuracy of its ln / sqrt / sincos, and its statistics (moments, CDF at
quantiles, KS, tails, correlations between neighbours, counters and seeds). The corrector against an eager
reimplementation of score_sde's LangevinCorrector; the predictor mappings against score_sde's formulas;
bad input (x untouched); the no-grad rule; opcheck and torch.compile.
"""

import math

import pytest
import torch
from _backends import base
from _backends import kernel_backends
from _backends import use

from fastscore.ops import _philox
from fastscore.ops import counter_randn
from fastscore.ops import counter_randn_ref
from fastscore.ops import langevin_corrector_step_
from fastscore.ops import langevin_corrector_step_ref
from fastscore.ops import langevin_step as lgv
from fastscore.ops import langevin_step_
from fastscore.ops import langevin_step_ref
from fastscore.ops import sde_update_
from fastscore.ops import sde_update_ref

BACKENDS = kernel_backends("cpu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# vectors (N, D), images (N, C, H, W): N = 1, odd sizes, D and H * W not multiples of 4 (Philox blocks
# straddle samples), C = 1 (contiguous and channels_last at once).
SHAPES = ((5, 7), (1, 1), (3, 2), (3, 5, 7, 9), (1, 3, 4, 4), (2, 17, 3, 5), (4, 1, 5, 3))
TRITON_SHAPES = ((5, 7), (3, 5, 7, 9), (1, 3, 4, 4))
SEED = 0x9E3779B97F4A7C15  # above 2^63: both key words in use


def _id(shape):
    return "x".join(map(str, shape))


def _cases():
    for backend in BACKENDS:
        for dtype in DTYPES:
            for shape in TRITON_SHAPES if backend == "triton" else SHAPES:
                yield pytest.param(backend, dtype, shape, id=f"{backend}-{str(dtype)[6:]}-{_id(shape)}")


def _layouts(shape):
    yield "contiguous"
    if len(shape) == 4:
        yield "channels_last"
    yield "strided_score"  # score in another layout: copied into x's


def make(shape, dtype, layout="contiguous", *, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    score = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
        score = score.contiguous(memory_format=torch.channels_last)
    elif layout == "strided_score":
        score = score.transpose(0, -1).contiguous().transpose(0, -1)
    return x, score


def _assert_bitwise(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        i = int(diff.flatten().argmax())
        raise AssertionError(
            f"{what}: not bitwise equal; max |diff| {diff.max().item():.3e} at flat index {i} "
            f"(got {got.flatten()[i].item():.9g}, want {want.flatten()[i].item():.9g})"
        )


def _masks(shape, dtype):
    """(name, mask, known): a soft shared mask, a per-sample bool mask broadcast over channels."""
    g = torch.Generator().manual_seed(3)
    known = torch.randn(shape, generator=g).to(dtype)
    soft = torch.rand((1,) + shape[1:], generator=g)
    yield "shared_soft", soft, known
    if len(shape) == 4:
        hard = torch.rand((shape[0], 1) + shape[2:], generator=g) > 0.5
        yield "per_sample_bool", hard, known[:1]  # known broadcast too
    else:
        yield "full", torch.rand(shape, generator=g), known


# ---- the generator -------------------------------------------------------------------------------------


def test_philox_random123_known_answers():
    """Random123's kat_vectors for philox4x32_10 (counter, key -> output)."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in cases:
        words = _philox.philox4x32_10(*(torch.tensor([c], dtype=torch.int64) for c in ctr), *key)
        assert tuple(int(w) for w in words) == want, f"philox4x32_10({ctr}, {key})"


def _ulps(got: torch.Tensor, want64: torch.Tensor) -> torch.Tensor:
    ulp = torch.nextafter(want64.abs().float(), torch.tensor(math.inf)).double() - want64.abs().float().double()
    return (got.double() - want64).abs() / ulp


def test_ln_sincos_accuracy():
    """The generator's own functions (the bits every backend computes) against float64, on their whole domains
    (exhaustive checks are in the header's comments: 1.6, 1.72 and 1.24 ulp)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0x2F800000, 0x3F800001, (200000,), generator=g, dtype=torch.int64)  # floats in [2^-32, 1]
    u = bits.to(torch.int32).view(torch.float32)
    ln = _philox._log_unit(u)
    ref = torch.log(u.double())
    nz = ref != 0
    assert _ulps(ln[nz], ref[nz]).max() <= 1.6, "ln"
    v = torch.cat([torch.randint(0, 1 << 24, (200000,), generator=g), torch.arange(0, 1 << 24, 1 << 19)])
    s, c = _philox._sincos_turns(v)
    angle = v.double() * (2 * math.pi / 2**24)
    assert (s.double() - angle.sin()).abs().max() <= 1.2e-7 and (c.double() - angle.cos()).abs().max() <= 1.2e-7
    big = angle.sin().abs() > 1e-3
    assert _ulps(s[big], angle.sin()[big]).max() <= 2.0, "sin"
    big = angle.cos().abs() > 1e-3
    assert _ulps(c[big], angle.cos()[big]).max() <= 2.0, "cos"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_noise_is_the_same_bits_on_every_backend(backend):
    cases = [
        ((7, 3, 5, 5), SEED, 0, 0),
        ((3, 1001), 12345, 2**40 + 7, 5),  # counter above 2^32: both counter words in use
        ((1, 1), 2**64 - 1, 2**64 - 1, 2**40),
        ((5, 4, 3, 3), 1, 3, 2**57 - 3),  # block index above 2^32: both block words in use
        ((4,), 7, 0, 0),  # 1-D: one element per sample
    ]
    for shape, seed, counter, offset in cases:
        want = counter_randn_ref(shape, seed=seed, counter=counter, sample_offset=offset)
        with use(backend):
            got = counter_randn(shape, seed=seed, counter=counter, sample_offset=offset)
            for dtype in (torch.float64, torch.bfloat16, torch.float16):
                other = counter_randn(shape, seed=seed, counter=counter, sample_offset=offset, dtype=dtype)
                _assert_bitwise(other, want.to(dtype), f"counter_randn[{backend}] {shape} {dtype}")
        _assert_bitwise(got, want, f"counter_randn[{backend}] {shape} seed={seed} counter={counter} offset={offset}")
    # and against the other backends directly (ref above is the common ground)
    assert counter_randn((0, 3), seed=1).shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_batch_invariant_and_shardable(backend):
    shape = (64, 3, 5, 5) if backend != "triton" else (16, 3, 5, 5)
    N = shape[0]
    with use(backend):
        full = counter_randn(shape, seed=SEED, counter=9)
        for k in (0, 5, N - 1):
            alone = counter_randn((1,) + shape[1:], seed=SEED, counter=9, sample_offset=k)
            _assert_bitwise(alone[0], full[k], f"sample {k} alone")
        seven = counter_randn((7,) + shape[1:], seed=SEED, counter=9, sample_offset=3)
        _assert_bitwise(seven, full[3:10], "a batch of 7")
        shards = [
            counter_randn((n,) + shape[1:], seed=SEED, counter=9, sample_offset=o) for o, n in ((0, 5), (5, N - 5))
        ]
        _assert_bitwise(torch.cat(shards), full, "two shards")
        # through the update itself: sample k updated in a batch of 7 and alone
        x, score = make((7,) + shape[1:], torch.float32)
        batch = langevin_step_(x.clone(), score, 0.01, seed=SEED, counter=9, sample_offset=10)
        for k in (0, 6):
            one = langevin_step_(
                x[k : k + 1].clone(), score[k : k + 1], 0.01, seed=SEED, counter=9, sample_offset=10 + k
            )
            _assert_bitwise(one[0], batch[k], f"update of sample {k} alone")


def _normal_cdf(q: float) -> float:
    return 0.5 * math.erfc(-q / math.sqrt(2))


def _check_normal(z: torch.Tensor, what: str) -> None:
    """Moments, CDF at quantiles, KS, tails, bounds: each within ~5 standard errors (fixed seeds: no flakes)."""
    z = z.double().flatten()
    n = z.numel()
    assert torch.isfinite(z).all(), what
    mean, var = z.mean().item(), z.var().item()
    assert abs(mean) < 5 / math.sqrt(n), f"{what}: mean {mean}"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"{what}: variance {var}"
    c = z - mean
    skew = (c**3).mean().item() / var**1.5
    kurt = (c**4).mean().item() / var**2
    assert abs(skew) < 5 * math.sqrt(6 / n), f"{what}: skewness {skew}"
    assert abs(kurt - 3) < 5 * math.sqrt(24 / n), f"{what}: kurtosis {kurt}"
    for q in (-3.0, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0):
        p = _normal_cdf(q)
        emp = (z <= q).double().mean().item()
        assert abs(emp - p) < 5 * math.sqrt(p * (1 - p) / n) + 1 / n, f"{what}: P(z <= {q}) = {emp}, Phi = {p}"
    zs, _ = z.sort()
    cdf = torch.special.ndtr(zs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"{what}: Kolmogorov-Smirnov D = {ks} (0.1% level {1.95 / math.sqrt(n)})"
    # Box-Muller tails: |z| <= sqrt(-2 ln 2^-32) = 6.66 by construction; beyond 3 and 4 as a normal's
    assert z.abs().max() <= 6.67, what
    for t in (3.0, 4.0):
        expect = n * 2 * (1 - _normal_cdf(t))
        got = (z.abs() > t).sum().item()
        assert abs(got - expect) < 5 * math.sqrt(expect) + 2, f"{what}: {got} beyond {t}, expected {expect:.1f}"


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_statistics(backend):
    n = {"cpp": 1 << 20, "ref": 1 << 19}.get(base(backend), 1 << 16)  # the interpreter is slow
    with use(backend):
        z = counter_randn((n // 64, 64), seed=SEED, counter=1)
        _check_normal(z, f"counter_randn[{backend}]")
        lim = 5 / math.sqrt(n // 4)
        flat = z.flatten()
        for lag in (1, 2, 3, 4, 64):  # neighbours: within a Box-Muller pair (1), a Philox block (2, 3), next blocks
            r = _corr(flat[:-lag], flat[lag:])
            assert abs(r) < 5 / math.sqrt(n), f"{backend}: correlation {r} at lag {lag}"
        quad = flat.reshape(-1, 4)
        assert abs(_corr(quad[:, 0] ** 2, quad[:, 1] ** 2)) < lim, "squares of a Box-Muller pair are correlated"
        assert abs(_corr(quad[:, 0] ** 2, quad[:, 2] ** 2)) < lim, "squares of a Philox block's pairs are correlated"
        m = n // 8
        first = counter_randn((m,), seed=SEED, counter=1)
        for what, other in (
            ("next counter", counter_randn((m,), seed=SEED, counter=2)),
            ("next seed", counter_randn((m,), seed=SEED + 1, counter=1)),
            ("seed high word", counter_randn((m,), seed=SEED ^ (1 << 32), counter=1)),
            ("counter high word", counter_randn((m,), seed=SEED, counter=1 + (1 << 32))),
            ("next sample_offset", counter_randn((m,), seed=SEED, counter=1, sample_offset=1)),
        ):
            r = _corr(first, other)
            assert abs(r) < 5 / math.sqrt(m), f"{backend}: correlation {r} with the {what}"
            assert abs(_corr(first**2, other**2)) < 5 / math.sqrt(m) * 2, f"{backend}: squares vs the {what}"
        _check_normal(counter_randn((m,), seed=SEED, counter=2), f"counter_randn[{backend}] counter 2")


# ---- the update ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,shape", list(_cases()))
def test_given_noise_matches_reference_exactly(backend, dtype, shape):
    N = shape[0]
    steps = {"scalar": 0.0123, "per_sample": torch.rand(N, generator=torch.Generator().manual_seed(1)) * 0.1}
    for layout in _layouts(shape):
        x, score = make(shape, dtype, layout)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        for step_name, step in steps.items():
            variants = [("no mask", None, None)] + list(_masks(shape, dtype))
            for mask_name, mask, known in variants:
                want = langevin_step_ref(x, score, step, noise=noise, mask=mask, known=known)
                if mask is None:  # the equation itself, in float64
                    s = step if isinstance(step, float) else step.double().reshape((N,) + (1,) * (len(shape) - 1))
                    exact = x.double() + s * score.double() + (2 * s) ** 0.5 * noise.double()
                    torch.testing.assert_close(
                        want.double(), exact, rtol=0, atol=4 * (exact.abs().max().item() + 1) * torch.finfo(dtype).eps
                    )
                y = x.clone(memory_format=torch.preserve_format)
                with use(backend):
                    out = langevin_step_(y, score, step, noise=noise, mask=mask, known=known)
                what = f"[{backend}] {layout} {step_name} {mask_name}"
                assert out is y, f"{what}: did not return x"
                _assert_bitwise(y, want, what)
                if layout == "channels_last":
                    assert y.is_contiguous(memory_format=torch.channels_last), what


@pytest.mark.parametrize("backend,dtype,shape", list(_cases()))
def test_generated_noise_update_equals_counter_randn(backend, dtype, shape):
    x, score = make(shape, dtype, "channels_last" if len(shape) == 4 else "contiguous")
    step = torch.rand(shape[0], generator=torch.Generator().manual_seed(5)) * 0.05
    with use(backend):
        y = langevin_step_(
            x.clone(memory_format=torch.preserve_format), score, step, seed=SEED, counter=17, sample_offset=3
        )
    z = counter_randn(shape, seed=SEED, counter=17, sample_offset=3)  # float32 normals
    want = langevin_step_ref(x, score, step, seed=SEED, counter=17, sample_offset=3)
    _assert_bitwise(y, want, f"[{backend}] generated noise vs the reference")
    if dtype in (torch.float32, torch.float64):  # the noise is exactly representable: identical to given noise
        _assert_bitwise(y, langevin_step_ref(x, score, step, noise=z.to(dtype)), f"[{backend}] vs noise=counter_randn")
    else:  # the kernel uses the float32 normal, the given noise would be rounded first
        tol = 2 * torch.finfo(dtype).eps * (x.double().abs().max().item() + 1)
        torch.testing.assert_close(
            y.double(), langevin_step_ref(x, score, step, noise=z.to(dtype)).double(), rtol=0, atol=tol
        )


def test_seed_none_uses_torchs_generator():
    x, score = make((3, 4, 5), torch.float32)
    torch.manual_seed(7)
    a = langevin_step_(x.clone(), score, 0.1)
    torch.manual_seed(7)
    b = langevin_step_(x.clone(), score, 0.1)
    c = langevin_step_(x.clone(), score, 0.1)
    assert torch.equal(a, b), "torch.manual_seed does not make seed=None reproducible"
    assert not torch.equal(b, c), "two calls with seed=None drew the same noise"
    torch.manual_seed(7)
    seed = int(torch.randint(2**63 - 1, (), dtype=torch.int64))
    assert torch.equal(a, langevin_step_(x.clone(), score, 0.1, seed=seed)), "seed=None is not torch's next 63-bit draw"


def test_zero_step_and_empty_batch():
    x, score = make((3, 5), torch.float32)
    assert torch.equal(langevin_step_(x.clone(), score, 0.0, seed=1), x)
    empty = torch.empty(0, 4)
    assert langevin_step_(empty, empty, 0.1, seed=1) is empty
    assert langevin_corrector_step_(empty, empty, 0.1, seed=1) is empty


def test_cpu_uses_cpp_kernels_by_default():
    from fastscore import _backend

    assert _backend.select("langevin_step", torch.device("cpu"), cpp_op="langevin_step_update") == "cpp"


# ---- corrector and predictors --------------------------------------------------------------------------


def score_sde_langevin_corrector(x, grad, noise, snr, alpha):
    """score_sde_pytorch sampling.LangevinCorrector.update_fn, one step (n_steps = 1), noise given."""
    grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
    noise_norm = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1).mean()
    step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
    view = (-1,) + (1,) * (x.dim() - 1)
    x_mean = x + step_size.reshape(view) * grad
    x = x_mean + torch.sqrt(step_size * 2).reshape(view) * noise
    return x, x_mean


def per_sample_corrector(x, grad, noise, snr, alpha):
    """The same with each sample's own norms."""
    g = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1)
    z = torch.norm(noise.reshape(noise.shape[0], -1), dim=-1)
    step_size = (snr * z / g) ** 2 * 2 * alpha
    view = (-1,) + (1,) * (x.dim() - 1)
    x_mean = x + step_size.reshape(view) * grad
    return x_mean + torch.sqrt(step_size * 2).reshape(view) * noise, x_mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_corrector_matches_score_sde(backend, dtype):
    shape = (6, 3, 8, 8) if backend != "triton" else (3, 3, 4, 4)
    x, score = make(shape, dtype, "channels_last" if dtype == torch.float32 else "contiguous")
    score = score * torch.linspace(0.5, 3, shape[0], dtype=dtype).reshape(-1, 1, 1, 1)  # norms differ per sample
    alpha = torch.linspace(0.9, 1.0, shape[0], dtype=dtype)  # VP: alpha_i = 1 - beta_i, per sample time
    z = counter_randn(shape, seed=SEED, counter=4, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for per_sample, eager in ((False, score_sde_langevin_corrector), (True, per_sample_corrector)):
        want, want_mean = eager(x.double(), score.double(), z.double(), 0.16, alpha.double())
        for kw in ({"noise": z}, {"seed": SEED, "counter": 4}):
            y = x.clone(memory_format=torch.preserve_format)
            x_mean = torch.empty_like(x)
            with use(backend):
                langevin_corrector_step_(y, score, 0.16, alpha=alpha, per_sample=per_sample, x_mean=x_mean, **kw)
            what = f"[{backend}] per_sample={per_sample} {list(kw)}"
            torch.testing.assert_close(y.double(), want, **tol, msg=lambda m, what=what: f"x {what}: {m}")
            torch.testing.assert_close(
                x_mean.double(), want_mean, **tol, msg=lambda m, what=what: f"x_mean {what}: {m}"
            )
            ref, ref_mean = langevin_corrector_step_ref(x, score, 0.16, alpha=alpha, per_sample=per_sample, **kw)
            torch.testing.assert_close(y, ref, **tol)
            torch.testing.assert_close(x_mean, ref_mean, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_norms_partial_sums_match_the_reference_for_any_number_of_pieces(backend, dtype):
    """The corrector's reduction pass: out (N, P, 2) holds per piece of ceil(D / P) memory positions the sums
    of score^2 and z^2, for any P (one piece, uneven pieces, more pieces than elements: the rest are 0)."""
    shape = (3, 5, 7, 9) if backend != "triton" else (2, 3, 4, 5)
    D = math.prod(shape[1:])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    for layout in ("contiguous", "channels_last"):
        _, score = make(shape, dtype, layout)
        noise = torch.randn_like(score, dtype=torch.float64).to(dtype)  # laid out as score
        for P in (1, 3, D + 2):
            for given in (None, noise):
                want = torch.full((shape[0], P, 2), float("nan"), dtype=torch.float64)
                lgv._norms_ref_impl(score, given, -5, 2, 3, want)
                got = torch.full_like(want, float("nan"))
                with use(backend):
                    lgv._norms_into(score, given, -5, 2, 3, got)
                what = f"[{backend}] {layout} P={P} noise={'given' if given is not None else 'generated'}"
                torch.testing.assert_close(got, want, **tol, msg=lambda m, what=what: f"{what}: {m}")
                # The pieces add up to the sample's sums of squares.
                z = counter_randn(shape, seed=2**64 - 5, counter=2, sample_offset=3) if given is None else given
                whole = torch.stack([t.double().square().flatten(1).sum(1) for t in (score, z)], dim=1)
                torch.testing.assert_close(got.sum(1), whole, **tol)
                if P > D:
                    assert (got[:, D:] == 0).all(), what


def test_corrector_batch_rule_depends_on_the_batch_and_per_sample_rule_does_not():
    x, score = make((4, 2, 3, 3), torch.float32)
    score[0] *= 10
    kw = dict(seed=SEED, counter=2)
    full = langevin_corrector_step_(x.clone(), score, 0.2, per_sample=True, **kw)
    last = langevin_corrector_step_(x[3:].clone(), score[3:], 0.2, per_sample=True, sample_offset=3, **kw)
    _assert_bitwise(last[0], full[3], "per-sample corrector, sample 3 alone")
    full = langevin_corrector_step_(x.clone(), score, 0.2, per_sample=False, **kw)
    last = langevin_corrector_step_(x[3:].clone(), score[3:], 0.2, per_sample=False, sample_offset=3, **kw)
    assert not torch.allclose(last[0], full[3]), "the batch-averaged rule should see the other samples"


def _view(v, x):
    return v.reshape((-1,) + (1,) * (x.dim() - 1)) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("backend", BACKENDS)
def test_predictor_mappings_match_score_sde(backend):
    """score_sde's predictors (docs/numerics.md#predictors) written as score_sde does, against sde_update_ with
    the mapping of its docstring; per-sample times (a (N,) t)."""
    N, dt = 4, 1 / 1000
    x, score = make((N, 3, 4, 4), torch.float64)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3, 0.01], dtype=torch.float64)
    smin, smax, b0, b1 = 0.01, 50.0, 0.1, 20.0
    sigma = smin * (smax / smin) ** t
    g_ve = sigma * math.sqrt(2 * (math.log(smax) - math.log(smin)))
    beta_t = b0 + t * (b1 - b0)
    sig_i, sig_prev = sigma, torch.where(t > 0.05, smin * (smax / smin) ** (t - dt), torch.zeros_like(t))
    beta_i = beta_t * dt
    v = lambda a: _view(a, x)  # noqa: E731
    cases = {
        # name: (score_sde's x_mean, its noise scale, the mapping (a, b, c))
        "em_ve": (x + v(g_ve**2 * dt) * score, v(g_ve * math.sqrt(dt)), (1.0, g_ve**2 * dt, g_ve * math.sqrt(dt))),
        "em_vp": (
            x - (v(-0.5 * beta_t) * x - v(beta_t) * score) * dt,
            v(beta_t.sqrt() * math.sqrt(dt)),
            (1 + beta_t * dt / 2, beta_t * dt, beta_t.sqrt() * math.sqrt(dt)),
        ),
        "reverse_diffusion_ve": (
            x + v(sig_i**2 - sig_prev**2) * score,
            v((sig_i**2 - sig_prev**2).sqrt()),
            (1.0, sig_i**2 - sig_prev**2, (sig_i**2 - sig_prev**2).sqrt()),
        ),
        "reverse_diffusion_vp": (
            x - ((1 - v(beta_i)).sqrt() * x - x) + v(beta_i) * score,
            v(beta_i.sqrt()),
            (2 - (1 - beta_i).sqrt(), beta_i, beta_i.sqrt()),
        ),
        "ancestral_ve": (
            x + v(sig_i**2 - sig_prev**2) * score,
            v((sig_prev**2 * (sig_i**2 - sig_prev**2) / sig_i**2).sqrt()),
            (1.0, sig_i**2 - sig_prev**2, (sig_prev**2 * (sig_i**2 - sig_prev**2) / sig_i**2).sqrt()),
        ),
        "ancestral_vp": (
            (x + v(beta_i) * score) / v((1 - beta_i).sqrt()),
            v(beta_i.sqrt()),
            (1 / (1 - beta_i).sqrt(), beta_i / (1 - beta_i).sqrt(), beta_i.sqrt()),
        ),
    }
    for name, (want_mean, noise_scale, (a, b, c)) in cases.items():
        want = want_mean + noise_scale * z
        y, y_mean = x.clone(), torch.empty_like(x)
        with use(backend):
            out = sde_update_(y, score, x_scale=a, score_scale=b, noise_scale=c, x_mean=y_mean, noise=z)
        assert out is y
        torch.testing.assert_close(y_mean, want_mean, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n} x_mean: {m}")
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n} x: {m}")
        ref, ref_mean = sde_update_ref(x, score, x_scale=a, score_scale=b, noise_scale=c, noise=z)
        _assert_bitwise(y, ref, f"{name} vs sde_update_ref")
        _assert_bitwise(y_mean, ref_mean, f"{name} x_mean vs sde_update_ref")


def test_sde_update_with_generated_noise_is_langevin_step():
    x, score = make((3, 2, 5, 5), torch.float32)
    step = 0.03
    a = sde_update_(x.clone(), score, score_scale=step, noise_scale=math.sqrt(2 * step), seed=SEED, counter=8)
    b = langevin_step_(x.clone(), score, step, seed=SEED, counter=8)
    _assert_bitwise(a, b, "sde_update_ with Langevin coefficients")


# ---- bad input -------------------------------------------------------------------------------------------


def _good():
    x, score = make((2, 3, 4, 4), torch.float32)
    return {"x": x, "score": score, "step_size": 0.1, "kw": {}}


def _set_kw(**kw):
    return lambda a: a["kw"].update(kw)


BAD = {
    "x not a tensor": (lambda a: a.update(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    "x integer": (lambda a: a.update(x=a["x"].long(), score=a["score"].long()), TypeError, "x: expected float16"),
    "x 0-d": (
        lambda a: a.update(x=a["x"][0, 0, 0, 0], score=a["score"][0, 0, 0, 0]),
        ValueError,
        "x: expected a tensor of shape",
    ),
    "x strided": (
        lambda a: a.update(x=a["x"].transpose(2, 3)),
        ValueError,
        "x: expected a contiguous or channels_last",
    ),
    "score shape": (lambda a: a.update(score=a["score"][:, :2]), ValueError, r"score: expected shape \(2, 3, 4, 4\)"),
    "score dtype": (lambda a: a.update(score=a["score"].double()), TypeError, "score: expected dtype torch.float32"),
    "score on meta": (lambda a: a.update(score=a["score"].to("meta")), ValueError, "score: expected a tensor on"),
    "step negative": (lambda a: a.update(step_size=-0.1), ValueError, "step_size: expected a non-negative"),
    "step nan": (lambda a: a.update(step_size=float("nan")), ValueError, "step_size: expected a non-negative"),
    "step string": (lambda a: a.update(step_size="0.1"), TypeError, "step_size: expected a float"),
    "step tensor shape": (
        lambda a: a.update(step_size=torch.ones(3)),
        ValueError,
        r"step_size: expected .* shape \(2,\)",
    ),
    "step tensor negative": (
        lambda a: a.update(step_size=torch.tensor([0.1, -0.1])),
        ValueError,
        "step_size: expected non-negative",
    ),
    "step tensor inf": (
        lambda a: a.update(step_size=torch.tensor([math.inf, 0.1])),
        ValueError,
        "step_size: expected non-negative finite values",
    ),
    "step tensor overflows x's dtype": (  # a float64 1e300 was inf in the float32 update
        lambda a: a.update(step_size=torch.tensor([1e300, 0.1], dtype=torch.float64)),
        ValueError,
        r"step_size: expected non-negative finite values of at most 1\.70141e\+38",
    ),
    "step tensor 2 step overflows": (  # finite in float32, but sqrt(2 step) is not
        lambda a: a.update(step_size=torch.tensor([3e38, 0.1])),
        ValueError,
        "step_size and 2 \\* step_size must be finite in float32",
    ),
    "step float overflows x's dtype": (
        lambda a: a.update(step_size=1e300),
        ValueError,
        "step_size: expected a non-negative finite number of at most",
    ),
    "step float overflows float16 x": (
        lambda a: a.update(x=a["x"].half(), score=a["score"].half(), step_size=1e5),
        ValueError,
        "step_size must be finite in float16, x's dtype",
    ),
    "step tensor integer": (
        lambda a: a.update(step_size=torch.ones(2, dtype=torch.long)),
        TypeError,
        "step_size: expected float",
    ),
    "noise shape": (_set_kw(noise=torch.randn(2, 3, 4)), ValueError, "noise: expected shape"),
    "noise dtype": (_set_kw(noise=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "noise: expected dtype"),
    "mask without known": (_set_kw(mask=torch.ones(1, 3, 4, 4)), ValueError, "mask: given without known"),
    "known without mask": (_set_kw(known=torch.ones(2, 3, 4, 4)), ValueError, "known: given without mask"),
    "mask not broadcastable": (
        _set_kw(mask=torch.ones(3, 4, 5), known=torch.ones(2, 3, 4, 4)),
        ValueError,
        "mask: shape",
    ),
    "mask out of range": (
        _set_kw(mask=torch.full((1, 3, 4, 4), 1.5), known=torch.ones(2, 3, 4, 4)),
        ValueError,
        r"mask: expected values in \[0, 1\]",
    ),
    "known integer": (
        _set_kw(mask=torch.ones(1, 3, 4, 4), known=torch.ones(2, 3, 4, 4, dtype=torch.long)),
        TypeError,
        "known: expected float",
    ),
    "seed negative": (_set_kw(seed=-1), ValueError, r"seed: expected an integer in \[0, 18446744073709551616\)"),
    "seed too big": (_set_kw(seed=2**64), ValueError, "seed: expected an integer in"),
    "seed float": (_set_kw(seed=1.0), TypeError, "seed: expected an integer"),
    "counter negative": (_set_kw(counter=-3), ValueError, "counter: expected an integer in"),
    "sample_offset negative": (_set_kw(sample_offset=-1), ValueError, "sample_offset: expected an integer in"),
    "sample_offset too big": (_set_kw(sample_offset=2**62), ValueError, "sample_offset: the global element index"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_name_the_argument_and_leave_x_alone(case):
    args = _good()
    mutate, exc, message = BAD[case]
    mutate(args)
    x = args["x"]
    before = x.clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else None
    with pytest.raises(exc, match=message):
        langevin_step_(x, args["score"], args["step_size"], **args["kw"])
    if before is not None:
        assert torch.equal(x, before), f"{case}: x was modified by a failing call"


def test_other_functions_check_their_arguments():
    x, score = make((2, 3, 4, 4), torch.float32)
    before = x.clone()
    with pytest.raises(ValueError, match="snr: expected a non-negative"):
        langevin_corrector_step_(x, score, -0.1)
    with pytest.raises(TypeError, match="per_sample: expected a bool"):
        langevin_corrector_step_(x, score, 0.1, per_sample=1)
    with pytest.raises(ValueError, match="alpha: expected"):
        langevin_corrector_step_(x, score, 0.1, alpha=torch.ones(5))
    with pytest.raises(ValueError, match="x_mean: expected shape"):
        langevin_corrector_step_(x, score, 0.1, x_mean=torch.empty(2, 3, 4, 5))
    with pytest.raises(ValueError, match="x_mean: expected a tensor other than x"):
        sde_update_(x, score, score_scale=0.1, noise_scale=0.1, x_mean=x)
    with pytest.raises(ValueError, match="score_scale: expected a finite number"):
        sde_update_(x, score, score_scale=float("inf"), noise_scale=0.1)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'noise_scale'"):
        sde_update_(x, score, score_scale=0.1)
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="shape: expected"):
        counter_randn((-1, 3), seed=1)
    with pytest.raises(TypeError, match="dtype: expected"):
        counter_randn((2, 3), seed=1, dtype=torch.int32)
    with pytest.raises(TypeError, match="seed: expected an integer"):
        counter_randn((2, 3), seed="1")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if base(b) in ("cpp", "triton")])
def test_norms_kernels_check_their_output_buffer(backend):
    """The sampler hands the norms pass its own buffer: a wrong one is refused by name, not written past."""
    _, score = make((2, 3, 4, 4), torch.float32)
    good = torch.empty(2, 5, 2, dtype=torch.float64)
    bad = {
        "shape": (torch.empty(2, 5, 3, dtype=torch.float64), ValueError, r"out: expected an \(2, P, 2\) tensor"),
        "no pieces": (torch.empty(2, 0, 2, dtype=torch.float64), ValueError, "out: expected an"),
        "dtype": (torch.empty(2, 5, 2), (TypeError, ValueError), "out: expected .*float64"),
        "strided": (good.transpose(0, 1).contiguous().transpose(0, 1), ValueError, "out: expected a contiguous"),
    }
    for out, exc, message in bad.values():
        with use(backend), pytest.raises(exc, match=message):
            lgv._norms_into(score, None, 1, 0, 0, out)


def test_refuses_autograd_and_runs_under_no_grad():
    x, score = make((2, 5), torch.float32)
    score.requires_grad_()
    with pytest.raises(ValueError, match="not differentiable.*torch.no_grad"):
        langevin_step_(x, score, 0.1, seed=1)
    with pytest.raises(ValueError, match="not differentiable"):
        langevin_corrector_step_(x, score, 0.1, seed=1)
    with torch.no_grad():
        langevin_step_(x, score, 0.1, seed=1)


def test_per_sample_scales_must_be_finite_in_the_dtype_of_the_update():
    x, score = make((2, 3, 4, 4), torch.float32)
    before = x.clone()
    with pytest.raises(ValueError, match="snr: expected non-negative finite values"):
        langevin_corrector_step_(x, score, torch.tensor([math.inf, 0.1]), seed=1)
    with pytest.raises(ValueError, match="alpha: expected non-negative finite values"):
        langevin_corrector_step_(x, score, 0.1, alpha=torch.tensor([1.0, math.inf]), seed=1)
    with pytest.raises(ValueError, match="x_scale: expected finite values .*not finite in float32"):
        sde_update_(x, score, x_scale=torch.tensor([1e300, 1.0], dtype=torch.float64), score_scale=0.1, noise_scale=0.1)
    with pytest.raises(ValueError, match="score_scale: expected a finite number .*not finite in float32"):
        sde_update_(x, score, score_scale=1e300, noise_scale=0.1)
    assert torch.equal(x, before)
    # float64 x updates in float64: the same values are fine there
    x64, score64 = make((2, 3), torch.float64)
    sde_update_(x64, score64, score_scale=1e300, noise_scale=0.0, noise=torch.zeros_like(x64))
    langevin_step_(x64, torch.zeros_like(x64), 1e300, noise=torch.zeros_like(x64))


def test_x_mean_that_requires_grad_is_not_overwritten_in_grad_mode():
    """As torch refuses an in-place write to a leaf that requires grad in grad mode (and allows it under
    no_grad): x_mean=parameter was overwritten behind autograd's back."""
    x, score = make((2, 3, 4, 4), torch.float32)
    calls = {
        "corrector": lambda x, m: langevin_corrector_step_(x, score, 0.1, seed=1, x_mean=m),
        "sde_update": lambda x, m: sde_update_(x, score, score_scale=0.1, noise_scale=0.1, seed=1, x_mean=m),
    }
    for name, call in calls.items():
        x_mean = torch.zeros_like(x, requires_grad=True)
        state = x.clone()
        with pytest.raises(ValueError, match="x_mean: a leaf tensor that requires grad cannot be overwritten"):
            call(state, x_mean)
        assert torch.equal(state, x) and not x_mean.detach().any(), f"{name}: a refused call wrote"
        with torch.no_grad():
            call(state, x_mean)
        assert x_mean.detach().any(), f"{name}: x_mean not written under no_grad"


def test_one_seed_rule_for_the_references_and_the_fused_ops():
    """numpy integers are Python ints everywhere; bools and floats are refused everywhere."""
    np = pytest.importorskip("numpy")
    from fastscore.data import toy_sample
    from fastscore.ops.hutchinson import make_probes

    x, score = make((2, 3), torch.float32)
    noise_of = {
        "counter_randn_ref": lambda seed: counter_randn_ref((2, 3), seed=seed, counter=np.uint64(2)),
        "counter_randn": lambda seed: counter_randn((2, 3), seed=seed, counter=np.uint64(2)),
        "langevin_step_ref": lambda seed: langevin_step_ref(x, score, 0.1, seed=seed),
        "langevin_step_": lambda seed: langevin_step_(x.clone(), score, 0.1, seed=seed),
        "langevin_corrector_step_ref": lambda seed: langevin_corrector_step_ref(x, score, 0.1, seed=seed)[0],
        "langevin_corrector_step_": lambda seed: langevin_corrector_step_(x.clone(), score, 0.1, seed=seed),
        "sde_update_ref": lambda seed: sde_update_ref(x, score, score_scale=0.1, noise_scale=0.1, seed=seed)[0],
        "sde_update_": lambda seed: sde_update_(x.clone(), score, score_scale=0.1, noise_scale=0.1, seed=seed),
        "make_probes": lambda seed: make_probes(x, 2, "gaussian", seed=seed),
        "toy_sample": lambda seed: toy_sample("moons", 4, seed=seed),
    }
    for name, noise in noise_of.items():
        want = noise(3)
        for seed in (np.int64(3), np.uint64(3), np.int32(3)):
            assert torch.equal(noise(seed), want), f"{name}: seed {seed!r} is not the int 3"
        for seed in (True, 3.0, np.float64(3.0), torch.tensor(3)):
            with pytest.raises(TypeError, match="seed: expected an integer"):
                noise(seed)
        for seed in (-1, np.int64(-1), 2**64):
            with pytest.raises(ValueError, match="seed: expected an integer in"):
                noise(seed)


# ---- custom ops: opcheck and torch.compile ---------------------------------------------------------------


def test_opcheck():
    x, score = make((2, 3, 4, 5), torch.float32)
    coef = torch.tensor([[1.0, 0.1, 0.2], [1.0, 0.3, 0.4]])
    mask = torch.rand(1, 3, 4, 5)
    known = torch.randn(2, 3, 4, 5)
    ops = torch.ops.fastscore
    torch.library.opcheck(ops.langevin_step_update, (x, score, coef, None, 5, 1, 0, None, None, torch.empty_like(x)))
    torch.library.opcheck(ops.langevin_step_update, (x, score, coef, torch.randn_like(x), 5, 1, 0, mask, known, None))
    torch.library.opcheck(ops.langevin_step_norms, (score, None, -5, 2, 3, torch.empty(2, 4, 2, dtype=torch.float64)))
    torch.library.opcheck(ops.langevin_step_randn, (torch.empty(3, 7), 5, 1, 2))


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager():
    x, score = make((3, 2, 4, 4), torch.float32)

    def step(x, score, noise):
        langevin_step_(x, score, 0.05, seed=11, counter=2)
        return langevin_step_(x, score, 0.05, noise=noise)

    noise = torch.randn_like(x)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x.clone(), score, noise)
    want = step(x.clone(), score, noise)
    _assert_bitwise(got, want, "compiled langevin_step_")
