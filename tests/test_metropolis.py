"""The metropolis op (MALA / HMC steps: fastscore.ops.metropolis) on every backend.

Every backend (ref, cpp at each CPU capability level, Triton in its interpreter) against the references,
bitwise: proposals, momenta, leapfrog steps, per-sample sums, log-acceptance ratios, decisions and the in-place
replacement, over dtypes, shapes (one element, odd sizes, samples longer than a piece), layouts and per-sample
step sizes. The references against the equations in float64 (Gaussian proposal densities, the change of the
total energy along a leapfrog trajectory). The randomness: the proposal's noise is counter_randn's (so the MALA
proposal is the Langevin step), the uniforms are a stream of their own (statistics, independence from the
normals), and everything a sample gets is independent of its batch and of the threads. Bad input (every
argument named, nothing modified), the no-grad rule, opcheck and torch.compile.
"""

import math

import pytest
import torch
from _backends import base
from _backends import kernel_backends
from _backends import use

import fastscore
from fastscore.ops import counter_randn
from fastscore.ops import counter_randn_ref
from fastscore.ops import langevin_step_ref
from fastscore.ops import metropolis as mh
from fastscore.ops.metropolis import counter_uniform_ref
from fastscore.ops.metropolis import hmc_accept_
from fastscore.ops.metropolis import hmc_accept_ref
from fastscore.ops.metropolis import hmc_leapfrog_
from fastscore.ops.metropolis import hmc_leapfrog_ref
from fastscore.ops.metropolis import hmc_momentum
from fastscore.ops.metropolis import hmc_momentum_ref
from fastscore.ops.metropolis import mala_accept_
from fastscore.ops.metropolis import mala_accept_ref
from fastscore.ops.metropolis import mala_propose
from fastscore.ops.metropolis import mala_propose_ref

BACKENDS = kernel_backends("cpu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# vectors and images; one element; D not a multiple of 4 (Philox blocks straddle samples); D above one piece
# (1024) with a short last piece; C = 1 (contiguous and channels_last at once).
SHAPES = ((5, 7), (1, 1), (6, 2), (3, 2500), (3, 5, 7, 9), (2, 3, 20, 30), (4, 1, 5, 3))
TRITON_SHAPES = ((5, 7), (3, 1300), (3, 5, 7, 9))
SEED = 0x9E3779B97F4A7C15  # above 2^63: both key words in use


def _id(shape):
    return "x".join(map(str, shape))


def _cases(dtypes=DTYPES):
    for backend in BACKENDS:
        for dtype in dtypes:
            for shape in TRITON_SHAPES if base(backend) == "triton" else SHAPES:
                yield pytest.param(backend, dtype, shape, id=f"{backend}-{str(dtype)[6:]}-{_id(shape)}")


def _layouts(shape):
    return ("contiguous", "channels_last") if len(shape) == 4 else ("contiguous",)


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def make(shape, dtype, *, gen_seed=0):
    """x, score, a per-sample step, and a second score and momentum, as float64 draws rounded to dtype."""
    g = torch.Generator().manual_seed(gen_seed)
    N = shape[0]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    score = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    step = torch.rand(N, generator=g, dtype=torch.float64) * 0.2 + 0.01
    other = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, score, step, other, p


def energies(N, *, gen_seed=1, spread=3.0):
    g = torch.Generator().manual_seed(gen_seed)
    e = torch.randn(N, generator=g, dtype=torch.float64) * 10
    return e, e + torch.randn(N, generator=g, dtype=torch.float64) * spread


def _bitwise(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape}"
    if not torch.equal(got, want):
        diff = (got.double() - want.double()).abs()
        i = int(diff.flatten().nan_to_num(nan=math.inf).argmax())
        raise AssertionError(
            f"{what}: not bitwise equal; max |diff| {diff.max().item():.3e} at flat index {i} "
            f"(got {got.flatten()[i].item():.17g}, want {want.flatten()[i].item():.17g})"
        )


# ---- the per-sample sums ------------------------------------------------------------------------------------


def test_sum_squares_ref_is_the_halving_tree_and_close_to_the_exact_sum():
    g = torch.Generator().manual_seed(0)
    for D in (1, 2, 3, 7, 1024, 1025, 2500, 4096):
        v = torch.randn(4, D, generator=g, dtype=torch.float64)
        got = mh.sum_squares_ref(v)
        exact = torch.tensor([math.fsum(r.square().tolist()) for r in v], dtype=torch.float64)
        torch.testing.assert_close(got, exact, rtol=4 * math.log2(D + 1) * 2**-53, atol=0)
        # the order, spelled out for one sample: pieces of 1024 by the halving tree, then left to right
        total = None
        for start in range(0, D, mh.PIECE):
            piece = v[0, start : start + mh.PIECE].square().tolist()
            width = 1 << max(0, (len(piece) - 1).bit_length())
            q = piece + [0.0] * (width - len(piece))
            while len(q) > 1:
                h = len(q) // 2
                q = [q[k] + q[k + h] for k in range(h)]
            total = q[0] if total is None else total + q[0]
        assert got[0].item() == total, f"D={D}"
    assert mh.sum_squares_ref(torch.empty(3, 0)).tolist() == [0.0, 0.0, 0.0]


# ---- the proposal ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,shape", list(_cases()))
def test_proposals_match_the_reference_bitwise(backend, dtype, shape):
    x, score, step, _, _ = make(shape, dtype)
    kw = dict(seed=SEED, counter=2**40 + 3, sample_offset=5)  # counter above 2^32: both counter words in use
    for step_name, st in (("per_sample", step), ("scalar", 0.037)):
        want = mala_propose_ref(x, score, st, **kw)
        want_h = hmc_momentum_ref(x, score, st, **kw)
        for layout in _layouts(shape):
            fmt = _fmt(layout)
            xl, sl = x.contiguous(memory_format=fmt), score.contiguous(memory_format=fmt)
            before = xl.clone()
            with use(backend):
                got = mala_propose(xl, sl, st, **kw)
                got_h = hmc_momentum(xl, sl, st, **kw)
            what = f"[{backend}] {layout} {step_name}"
            _bitwise(got.x, want.x, f"{what}: MALA proposal")
            _bitwise(got.z_sq, want.z_sq, f"{what}: |z|^2")
            for name, a, b in zip(("x_prop", "p", "p_sq"), got_h, want_h):
                _bitwise(a, b, f"{what}: HMC {name}")
            assert torch.equal(xl, before), f"{what}: x was modified"
            if layout == "channels_last":
                assert got.x.is_contiguous(memory_format=torch.channels_last), what
                assert got_h.p.is_contiguous(memory_format=torch.channels_last), what


def test_the_mala_proposal_is_the_langevin_step_and_z_sq_the_noise_norm():
    x, score, step, _, _ = make((6, 3, 4, 5), torch.float32)
    kw = dict(seed=SEED, counter=11, sample_offset=2)
    prop = mala_propose(x, score, step, **kw)
    _bitwise(prop.x, langevin_step_ref(x, score, step.float(), **kw), "proposal vs langevin_step_ref")
    z = counter_randn(x.shape, **kw).double()
    torch.testing.assert_close(prop.z_sq, z.square().flatten(1).sum(1), rtol=1e-14, atol=0)
    # and the proposal is x + eps s + sqrt(2 eps) z in float64, to float32 rounding
    e = step.reshape(-1, 1, 1, 1)
    exact = x.double() + e * score.double() + (2 * e).sqrt() * z
    torch.testing.assert_close(prop.x.double(), exact, rtol=0, atol=4 * (exact.abs().max().item() + 1) * 2**-24)
    # HMC: p = z + h/2 s, x' = x + h p
    h = hmc_momentum(x, score, step, **kw)
    torch.testing.assert_close(h.p.double(), z + e / 2 * score.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.x.double(), x.double() + e * h.p.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(h.p_sq, prop.z_sq, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sample_gets_the_same_bits_in_any_batch_and_from_any_number_of_threads(backend):
    shape = (7, 3, 4, 5) if base(backend) != "triton" else (4, 2, 3, 3)
    N = shape[0]
    x, score, step, other, p = make(shape, torch.float32)
    e, ep = energies(N)
    kw = dict(seed=SEED, counter=9)
    with use(backend):
        batch = mala_propose(x, score, step, **kw, sample_offset=10)
        xs, ss, es = x.clone(), score.clone(), e.clone()
        d = mala_accept_(xs, ss, es, batch.x, other, ep, batch.z_sq, step, **kw, sample_offset=10)
        for k in (0, N - 1):
            sl = slice(k, k + 1)
            one = mala_propose(x[sl], score[sl], step[sl], **kw, sample_offset=10 + k)
            _bitwise(one.x, batch.x[sl], f"[{backend}] sample {k} alone: proposal")
            _bitwise(one.z_sq, batch.z_sq[sl], f"[{backend}] sample {k} alone: |z|^2")
            x1, s1, e1 = x[sl].clone(), score[sl].clone(), e[sl].clone()
            d1 = mala_accept_(x1, s1, e1, one.x, other[sl], ep[sl], one.z_sq, step[sl], **kw, sample_offset=10 + k)
            _bitwise(d1.log_alpha, d.log_alpha[sl], f"[{backend}] sample {k} alone: log alpha")
            _bitwise(d1.accepted, d.accepted[sl], f"[{backend}] sample {k} alone: decision")
            _bitwise(x1, xs[sl], f"[{backend}] sample {k} alone: new state")
    if base(backend) == "cpp":
        threads = torch.get_num_threads()
        big = make((3, 5000), torch.float32)
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            try:
                with use(backend):
                    outs.append(mala_propose(big[0], big[1], big[2], **kw))
            finally:
                torch.set_num_threads(threads)
        _bitwise(outs[0].x, outs[1].x, "1 vs 2 threads: proposal")
        _bitwise(outs[0].z_sq, outs[1].z_sq, "1 vs 2 threads: |z|^2")


# ---- the leapfrog step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dtype,shape", list(_cases()))
def test_leapfrog_matches_the_reference_bitwise(backend, dtype, shape):
    x, score, step, _, p = make(shape, dtype)
    want_x, want_p = hmc_leapfrog_ref(x, p, score, step)
    for layout in _layouts(shape):
        fmt = _fmt(layout)
        xl, pl = x.clone(memory_format=fmt), p.clone(memory_format=fmt)
        with use(backend):
            out = hmc_leapfrog_(xl, pl, score, step)
        assert out is xl
        _bitwise(xl, want_x, f"[{backend}] {layout}: x")
        _bitwise(pl, want_p, f"[{backend}] {layout}: p")


def test_an_hmc_trajectory_is_the_leapfrog_integrator_and_log_alpha_the_energy_change():
    """Gaussian energy E = |A x|^2 / 2 (a per-coordinate precision): hmc_momentum, leapfrog steps and the accept
    step against an eager float64 leapfrog; log alpha = H(x, p0) - H(x', p_L)."""
    N, D, L, h = 5, 9, 4, 0.3
    prec = torch.linspace(0.5, 2.0, D, dtype=torch.float64)

    def energy(x):
        return 0.5 * (prec * x * x).sum(1)

    def score(x):
        return -prec * x

    x0 = torch.randn(N, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(seed=SEED, counter=4)
    start = hmc_momentum(x0, score(x0), h, **kw)
    xp, p = start.x.clone(), start.p.clone()
    for _ in range(L - 1):
        hmc_leapfrog_(xp, p, score(xp), h)
    xs, ss, es = x0.clone(), score(x0), energy(x0)
    d = hmc_accept_(xs, ss, es, xp, score(xp), energy(xp), p, start.p_sq, h, **kw)
    # eager leapfrog
    q, m = x0.clone(), counter_randn_ref(x0.shape, **kw).double()
    h0 = energy(q) + 0.5 * (m * m).sum(1)
    m = m + h / 2 * score(q)
    for i in range(L):
        q = q + h * m
        m = m + (h if i < L - 1 else h / 2) * score(q)
    torch.testing.assert_close(xp, q, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(d.log_alpha, h0 - (energy(q) + 0.5 * (m * m).sum(1)), rtol=1e-10, atol=1e-12)
    assert d.log_alpha.abs().max() < 0.5, "a small step should nearly conserve H"


# ---- the accept step ------------------------------------------------------------------------------------------


def _accept_case(kind, x, score, step, other, p, e, ep, kw):
    """(reference result, a call of the fused op on copies in `fmt`)."""
    if kind == "mala":
        prop = mala_propose_ref(x, score, step, **kw)
        want = mala_accept_ref(x, score, e, prop.x, other, ep, prop.z_sq, step, **kw)
        extra = (prop.z_sq,)
    else:
        prop = hmc_momentum_ref(x, score, step, **kw)
        want = hmc_accept_ref(x, score, e, prop.x, other, ep, p, prop.p_sq, step, **kw)
        extra = (p, prop.p_sq)

    def call(fmt):
        xs, ss, es = x.clone(memory_format=fmt), score.clone(memory_format=fmt), e.clone()
        xp, sp = prop.x.contiguous(memory_format=fmt), other.contiguous(memory_format=fmt)
        args = [t.contiguous(memory_format=fmt) if t.dim() > 1 else t for t in extra]
        fn = mala_accept_ if kind == "mala" else hmc_accept_
        d = fn(xs, ss, es, xp, sp, ep, *args, step, **kw)
        return d, xs, ss, es

    return want, prop, call


@pytest.mark.parametrize("kind", ["mala", "hmc"])
@pytest.mark.parametrize("backend,dtype,shape", list(_cases()))
def test_accept_matches_the_reference_bitwise(backend, dtype, shape, kind):
    x, score, step, other, p = make(shape, dtype)
    e, ep = energies(shape[0], spread=1.0 if shape[0] > 1 else 0.2)
    kw = dict(seed=SEED, counter=7, sample_offset=3)
    want, prop, call = _accept_case(kind, x, score, step, other, p, e, ep, kw)
    for layout in _layouts(shape):
        with use(backend):
            d, xs, ss, es = call(_fmt(layout))
        what = f"[{backend}] {kind} {layout}"
        _bitwise(d.log_alpha, want.log_alpha, f"{what}: log alpha")
        _bitwise(d.accepted, want.accepted, f"{what}: decisions")
        _bitwise(xs, want.x, f"{what}: x")
        _bitwise(ss, want.score, f"{what}: score")
        _bitwise(es, want.energy, f"{what}: energy")
        keep = ~d.accepted
        assert torch.equal(xs[keep], x[keep]) and torch.equal(es[keep], e[keep]), f"{what}: a rejected sample moved"
        assert torch.equal(xs[d.accepted], prop.x[d.accepted]), f"{what}: an accepted sample is not the proposal"
        assert torch.equal(ss[d.accepted], other[d.accepted]) and torch.equal(es[d.accepted], ep[d.accepted])


def test_mala_log_alpha_is_the_metropolis_hastings_ratio_of_the_gaussian_proposals():
    """log alpha = log pi(x') q(x | x') - log pi(x) q(x' | x), pi = exp(-E), q(y | x) = N(y; x + eps s(x), 2 eps I),
    in float64 with torch.distributions (normalising constants included: they cancel)."""
    shape = (8, 3, 4, 4)
    x, score, step, other, _ = make(shape, torch.float64)
    e, ep = energies(shape[0])
    kw = dict(seed=SEED, counter=1)
    prop = mala_propose(x, score, step, **kw)
    d = mala_accept_(x.clone(), score.clone(), e.clone(), prop.x, other, ep, prop.z_sq, step, **kw)
    s = step.reshape(-1, 1, 1, 1)
    fwd = torch.distributions.Normal(x + s * score, (2 * s).sqrt()).log_prob(prop.x).flatten(1).sum(1)
    rev = torch.distributions.Normal(prop.x + s * other, (2 * s).sqrt()).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(d.log_alpha, (-ep + rev) - (-e + fwd), rtol=1e-9, atol=1e-9)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in Triton's interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_decisions_are_the_uniforms_test_and_extreme_ratios_are_handled(backend):
    """accepted == (log u <= log alpha) with u = counter_uniform_ref, exactly; log alpha = +inf is accepted,
    -inf and NaN rejected (a proposal whose energy is NaN or inf never enters the chain)."""
    N = 64
    x, score, step, other, _ = make((N, 3), torch.float32)
    e, ep = energies(N, spread=1.5)
    ep[0], ep[1], ep[2] = -math.inf, math.inf, math.nan
    e[3] = ep[3] = math.inf
    kw = dict(seed=123, counter=2**63 + 5, sample_offset=7)
    prop = mala_propose(x, score, step, **kw)
    xs = x.clone()
    with use(backend):
        d = mala_accept_(xs, score.clone(), e.clone(), prop.x, other, ep, prop.z_sq, step, **kw)
    u = counter_uniform_ref(N, **kw)
    assert torch.equal(d.accepted, torch.log(u) <= d.log_alpha)
    assert d.accepted[0] and not d.accepted[1] and not d.accepted[2], d.log_alpha[:3]
    assert math.isnan(d.log_alpha[3]) and not d.accepted[3], "inf - inf is NaN: rejected"
    assert torch.equal(xs[1:4], x[1:4])
    e[4], ep[4] = math.inf, 0.0  # a chain stuck at an infinite energy leaves it at once
    with use(backend):
        d = mala_accept_(x.clone(), score.clone(), e.clone(), prop.x, other, ep, prop.z_sq, step, **kw)
    assert d.log_alpha[4] == math.inf and d.accepted[4]
    assert 0.05 < d.accepted[4:].float().mean() < 0.95, "the test case should accept some and reject some"


# ---- the uniforms -----------------------------------------------------------------------------------------------


def test_uniforms_are_uniform_independent_and_a_stream_of_their_own():
    n = 1 << 17
    u = counter_uniform_ref(n, seed=SEED, counter=3)
    assert bool(((u > 0) & (u <= 1)).all())
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    us, _ = u.sort()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - us, us - (i - 1) / n).max().item()
    assert ks < 1.95 / math.sqrt(n), f"Kolmogorov-Smirnov D = {ks}"
    lim = 5 / math.sqrt(n)
    corr = lambda a, b: torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()  # noqa: E731
    assert abs(corr(u[:-1], u[1:])) < lim, "neighbouring samples' uniforms are correlated"
    assert abs(corr(u, counter_uniform_ref(n, seed=SEED, counter=4))) < lim, "next counter"
    assert abs(corr(u, counter_uniform_ref(n, seed=SEED + 1, counter=3))) < lim, "next seed"
    # not the normals of the same key: the proposal's noise of sample n (any element) and its uniform
    z = counter_randn_ref((n, 4), seed=SEED, counter=3)
    for k in range(4):
        assert abs(corr(u, z[:, k])) < lim and abs(corr(u, z[:, k].abs())) < lim, f"uniforms vs normals {k}"
    # batch invariance: sample k's uniform is that of global index sample_offset + k
    _bitwise(counter_uniform_ref(5, seed=SEED, counter=3, sample_offset=100), u[100:105], "sample_offset")


# ---- the whole step: a chain on a Gaussian, all backends the same chain ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mala_chain_is_the_same_bits_on_every_backend(backend):
    N, D = (64, 5) if base(backend) != "triton" else (16, 5)
    x = torch.zeros(N, D)
    n_steps = 12 if base(backend) != "triton" else 4

    def run():
        state = x.clone()
        s, e = -state, 0.5 * state.double().square().sum(1)
        accepts = torch.zeros(N)
        for k in range(n_steps):
            prop = mala_propose(state, s, 0.9, seed=SEED, counter=k)
            ep = 0.5 * prop.x.double().square().sum(1)
            d = mala_accept_(state, s, e, prop.x, -prop.x, ep, prop.z_sq, 0.9, seed=SEED, counter=k)
            accepts += d.accepted
        return state, accepts

    with fastscore.use_backend("ref"):
        want, want_acc = run()
    with use(backend):
        got, acc = run()
    _bitwise(got, want, f"[{backend}] chain state")
    assert torch.equal(acc, want_acc)
    assert 0 < acc.mean() < n_steps


# ---- bad input -------------------------------------------------------------------------------------------------


def _good():
    x, score, step, other, p = make((3, 2, 4, 4), torch.float32)
    e, ep = energies(3)
    z_sq = torch.full((3,), 32.0, dtype=torch.float64)
    return {
        "x": x,
        "score": score,
        "energy": e,
        "x_prop": other.clone(),
        "score_prop": other,
        "energy_prop": ep,
        "z_sq": z_sq,
        "p": p,
        "step_size": 0.1,
        "kw": {"seed": 1, "counter": 0},
    }


def _set(**kw):
    return lambda a: a.update(kw)


def _set_kw(**kw):
    return lambda a: a["kw"].update(kw)


CALLS = {
    "mala_propose": lambda a: mala_propose(a["x"], a["score"], a["step_size"], **a["kw"]),
    "hmc_momentum": lambda a: hmc_momentum(a["x"], a["score"], a["step_size"], **a["kw"]),
    "hmc_leapfrog_": lambda a: hmc_leapfrog_(a["x"], a["p"], a["score"], a["step_size"]),
    "mala_accept_": lambda a: mala_accept_(
        a["x"],
        a["score"],
        a["energy"],
        a["x_prop"],
        a["score_prop"],
        a["energy_prop"],
        a["z_sq"],
        a["step_size"],
        **a["kw"],
    ),
    "hmc_accept_": lambda a: hmc_accept_(
        a["x"],
        a["score"],
        a["energy"],
        a["x_prop"],
        a["score_prop"],
        a["energy_prop"],
        a["p"],
        a["z_sq"],
        a["step_size"],
        **a["kw"],
    ),
}
SEEDED = ("mala_propose", "hmc_momentum", "mala_accept_", "hmc_accept_")
ACCEPT = ("mala_accept_", "hmc_accept_")

# name: (functions it applies to, mutation, exception, message)
BAD = {
    "x not a tensor": (tuple(CALLS), _set(x=[[1.0]]), TypeError, "x: expected a torch.Tensor"),
    "x integer": (tuple(CALLS), lambda a: a.update(x=a["x"].long()), TypeError, "x: expected float16"),
    "x strided": (tuple(CALLS), lambda a: a.update(x=a["x"].transpose(2, 3)), ValueError, "x: expected a contiguous"),
    "score shape": (tuple(CALLS), lambda a: a.update(score=a["score"][:, :1]), ValueError, "score: expected shape"),
    "score dtype": (tuple(CALLS), lambda a: a.update(score=a["score"].double()), TypeError, "score: expected dtype"),
    "step negative": (tuple(CALLS), _set(step_size=-0.1), ValueError, "step_size: expected a positive"),
    "step zero": (tuple(CALLS), _set(step_size=0.0), ValueError, "step_size: expected a positive"),
    "step nan": (tuple(CALLS), _set(step_size=math.nan), ValueError, "step_size: expected a positive"),
    "step string": (tuple(CALLS), _set(step_size="0.1"), TypeError, "step_size: expected a float"),
    "step bool": (tuple(CALLS), _set(step_size=True), TypeError, "step_size: expected a float"),
    "step tensor shape": (tuple(CALLS), _set(step_size=torch.ones(4)), ValueError, r"step_size: .*shape \(3,\)"),
    "step tensor zero": (tuple(CALLS), _set(step_size=torch.tensor([0.1, 0.0, 0.1])), ValueError, "step_size: exp"),
    "step tensor integer": (tuple(CALLS), _set(step_size=torch.ones(3, dtype=torch.long)), TypeError, "step_size"),
    "step overflows float32": (tuple(CALLS), _set(step_size=1e300), ValueError, "step_size: .*finite in float32"),
    "step underflows float32": (tuple(CALLS), _set(step_size=1e-40), ValueError, r"step_size: .*in \[1.17549e-38"),
    "seed none": (SEEDED, _set_kw(seed=None), TypeError, "seed: expected an integer, got None"),
    "seed negative": (SEEDED, _set_kw(seed=-1), ValueError, "seed: expected an integer in"),
    "seed float": (SEEDED, _set_kw(seed=1.0), TypeError, "seed: expected an integer"),
    "counter negative": (SEEDED, _set_kw(counter=-1), ValueError, "counter: expected an integer in"),
    "counter too big": (SEEDED, _set_kw(counter=2**64), ValueError, "counter: expected an integer in"),
    "sample_offset negative": (SEEDED, _set_kw(sample_offset=-2), ValueError, "sample_offset: expected"),
    "sample_offset too big": (SEEDED, _set_kw(sample_offset=2**62), ValueError, "sample_offset: the global"),
    "p dtype": (("hmc_leapfrog_", "hmc_accept_"), lambda a: a.update(p=a["p"].double()), TypeError, "p: expected"),
    "p layout": (
        ("hmc_leapfrog_",),
        lambda a: a.update(p=a["p"].contiguous(memory_format=torch.channels_last)),
        ValueError,
        "p: expected a contiguous tensor",
    ),
    "p is x": (("hmc_leapfrog_",), lambda a: a.update(p=a["x"]), ValueError, "p: expected a tensor that does not"),
    "energy float32": (ACCEPT, lambda a: a.update(energy=a["energy"].float()), TypeError, "energy: expected dtype"),
    "energy shape": (ACCEPT, lambda a: a.update(energy=a["energy"][:2]), ValueError, r"energy: expected shape \(3,\)"),
    "energy strided": (
        ACCEPT,
        lambda a: a.update(energy=torch.zeros(6, dtype=torch.float64)[::2]),
        ValueError,
        "energy: expected a contiguous",
    ),
    "energy_prop dtype": (ACCEPT, lambda a: a.update(energy_prop=a["energy_prop"].half()), TypeError, "energy_prop"),
    "x_prop shape": (ACCEPT, lambda a: a.update(x_prop=a["x_prop"][:2]), ValueError, "x_prop: expected shape"),
    "x_prop is x": (ACCEPT, lambda a: a.update(x_prop=a["x"]), ValueError, "x_prop: expected a tensor that does not"),
    "score_prop dtype": (ACCEPT, lambda a: a.update(score_prop=a["score_prop"].half()), TypeError, "score_prop"),
    "score strided": (
        ACCEPT,
        lambda a: a.update(score=a["score"].contiguous(memory_format=torch.channels_last)),
        ValueError,
        "score: expected a contiguous tensor",
    ),
    "z_sq shape": (ACCEPT, lambda a: a.update(z_sq=a["z_sq"][:1]), ValueError, r"(z|p)_sq: expected shape"),
    "z_sq not a tensor": (ACCEPT, _set(z_sq=3.0), TypeError, "(z|p)_sq: expected a torch.Tensor"),
}


def _params():
    for case, (fns, *_rest) in BAD.items():
        for fn in fns:
            yield pytest.param(case, fn, id=f"{fn}-{case}")


@pytest.mark.parametrize("case,fn", list(_params()))
def test_bad_arguments_name_the_argument_and_modify_nothing(case, fn):
    args = _good()
    _, mutate, exc, message = BAD[case]
    mutate(args)
    watched = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=message):
        CALLS[fn](args)
    for k, before in watched.items():
        assert torch.equal(args[k], before), f"{fn} / {case}: {k} was modified by a failing call"


def test_outputs_given_are_checked_and_used():
    x, score, step, other, p = make((3, 5), torch.float32)
    out, z_sq = torch.empty_like(x), torch.empty(3, dtype=torch.float64)
    prop = mala_propose(x, score, step, seed=1, out=out, z_sq=z_sq)
    assert prop.x is out and prop.z_sq is z_sq
    with pytest.raises(TypeError, match="out: expected dtype"):
        mala_propose(x, score, step, seed=1, out=torch.empty_like(x, dtype=torch.float64))
    with pytest.raises(ValueError, match="out: expected a tensor that does not share memory with x"):
        mala_propose(x, score, step, seed=1, out=x)
    with pytest.raises(TypeError, match="z_sq: expected dtype torch.float64"):
        mala_propose(x, score, step, seed=1, z_sq=torch.empty(3))
    e, ep = energies(3)
    acc, la = torch.empty(3, dtype=torch.bool), torch.empty(3, dtype=torch.float64)
    d = mala_accept_(
        x.clone(), score.clone(), e, prop.x, other, ep, prop.z_sq, step, seed=1, accepted=acc, log_alpha=la
    )
    assert d.accepted is acc and d.log_alpha is la
    with pytest.raises(TypeError, match="accepted: expected dtype torch.bool"):
        mala_accept_(x, score, e, prop.x, other, ep, prop.z_sq, step, seed=1, accepted=torch.empty(3))


def test_refuses_autograd_and_runs_under_no_grad():
    x, score, step, other, p = make((2, 5), torch.float32)
    score.requires_grad_()
    with pytest.raises(ValueError, match="not differentiable.*torch.no_grad"):
        mala_propose(x, score, step, seed=1)
    with pytest.raises(ValueError, match="not differentiable"):
        hmc_momentum(x, score, step, seed=1)
    e, ep = energies(2)
    with pytest.raises(ValueError, match="score: a leaf tensor that requires grad"):
        mala_accept_(x, score, e, x + 1, x, ep, ep.abs(), step, seed=1)
    with torch.no_grad():
        prop = mala_propose(x, score, step, seed=1)
        mala_accept_(x, score, e, prop.x, -prop.x, ep, prop.z_sq, step, seed=1)


def test_empty_batches_and_samples():
    empty = torch.empty(0, 4)
    prop = mala_propose(empty, empty, 0.1, seed=1)
    assert prop.x.shape == (0, 4) and prop.z_sq.shape == (0,)
    none = torch.empty(3, 0)
    prop = mala_propose(none, none, 0.1, seed=1)
    assert prop.z_sq.tolist() == [0.0, 0.0, 0.0]
    e = torch.zeros(3, dtype=torch.float64)
    d = mala_accept_(
        none,
        none.clone(),
        e,
        prop.x,
        prop.x.clone(),
        torch.full((3,), -1.0, dtype=torch.float64),
        prop.z_sq,
        0.1,
        seed=1,
    )
    assert d.accepted.all() and e.tolist() == [-1.0, -1.0, -1.0], "log alpha = E - E' = 1 > 0: accepted"


# ---- custom ops: opcheck and torch.compile -------------------------------------------------------------------


def test_opcheck():
    x, score, step, other, p = make((2, 3, 4, 5), torch.float32)
    coef = mh._step_coef(step, x, "mala")
    hcoef = mh._step_coef(step, x, "hmc")
    sq = torch.empty(2, dtype=torch.float64)
    e, ep = energies(2)
    ops = torch.ops.fastscore
    torch.library.opcheck(ops.metropolis_propose, (x, score, coef, 5, 1, 0, torch.empty_like(x), None, sq))
    torch.library.opcheck(
        ops.metropolis_propose, (x, score, hcoef, 5, 1, 0, torch.empty_like(x), torch.empty_like(x), sq.clone())
    )
    torch.library.opcheck(ops.metropolis_leapfrog, (x.clone(), p.clone(), score, hcoef))
    acc, la = torch.empty(2, dtype=torch.bool), torch.empty(2, dtype=torch.float64)
    z = torch.full((2,), 60.0, dtype=torch.float64)
    torch.library.opcheck(
        ops.metropolis_accept, (x.clone(), score.clone(), e.clone(), other, -other, ep, None, z, coef, 5, 1, 0, acc, la)
    )
    torch.library.opcheck(
        ops.metropolis_accept,
        (x.clone(), score.clone(), e.clone(), other, -other, ep, p, z, hcoef, 5, 1, 0, acc.clone(), la.clone()),
    )


@pytest.mark.compile
def test_torch_compile_fullgraph_matches_eager():
    x, score, step, other, _ = make((3, 2, 4, 4), torch.float32)
    e, ep = energies(3)

    def step_fn(x, score, e, other, ep):
        prop = mala_propose(x, score, 0.05, seed=11, counter=2)
        d = mala_accept_(x, score, e, prop.x, other, ep, prop.z_sq, 0.05, seed=11, counter=2)
        return x, score, e, d.accepted, d.log_alpha

    compiled = torch.compile(step_fn, fullgraph=True)
    got = compiled(x.clone(), score.clone(), e.clone(), other, ep)
    want = step_fn(x.clone(), score.clone(), e.clone(), other, ep)
    for g_, w_ in zip(got, want):
        _bitwise(g_, w_, "compiled metropolis step")
