r"""Langevin and SDE sampler updates with counter-based Gaussian noise generated inside the kernel.

One Langevin step of ncsn / ncsnv2 (docs/numerics.md#annealed-langevin-dynamics) reads x and the score, draws a
normal per element and writes x: on CPU the random numbers are most of its time (torch.randn ~3.4 ns per
normal). Here the noise is made inside the update kernel by a counter-based generator -- Philox4x32-10
keyed by (seed, counter) and indexed by the element's global index ``(sample_offset + n) * D + i`` --
so it costs no memory traffic, is the same on every backend and every run, and a sample's noise does
not depend on the batch it is drawn in (the layout: csrc/include/langevin_step_math.h).

This file reads top to bottom:
1. the generator in pure PyTorch (``counter_randn_ref``, on fastscore.ops._philox): the same bits as the
   kernels;
2. the references: ``langevin_step_ref``, ``langevin_corrector_step_ref``, ``sde_update_ref``;
3. the custom ops ``fastscore::langevin_step_{update,norms,randn}`` and the implementations each backend
   provides for them (ref, cpp, triton, cuda; chosen per call by fastscore._backend);
4. :class:`FusedUpdate`: the update bound to a sampler's chain (state, noise key, backend chosen once);
5. the public ``counter_randn``, ``langevin_step_``, ``langevin_corrector_step_`` and ``sde_update_``,
   which validate their arguments (fastscore._validate, and this op's own checks) and dispatch.

These are sampler updates: they are not differentiable (there is no autograd Function), and they refuse
inputs that require grad while grad mode is on. Run them under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastscore import _backend
from fastscore import _validate
from fastscore.ops import _philox

OP = "langevin_step"

# ---- 1. the generator ---------------------------------------------------------------------------------
# Philox4x32-10 + Box-Muller emulated in PyTorch (fastscore.ops._philox): the same bits as every kernel.


def _u64(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def counter_randn_ref(
    shape,
    *,
    seed: int,
    counter: int = 0,
    sample_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    r"""The noise of :func:`counter_randn` in pure PyTorch (the same bits as every kernel).

    ``shape`` is (N, ...) with D = prod(shape[1:]) elements per sample; element (n, i) (i row-major within
    the sample) is the normal of global element :math:`e = (\text{sample\_offset} + n) D + i`: word
    ``e % 4`` of the Philox4x32-10 block with key (seed_lo, seed_hi) and counter
    (block_lo, block_hi, counter_lo, counter_hi), ``block = e // 4``, through Box-Muller on the word pairs
    (0, 1) and (2, 3):

    .. math::
        u_1 = \lfloor w_0 / 2 \rfloor 2^{-31} + 2^{-32} \in (0, 1], \quad
        u_2 = \lfloor w_1 / 2^8 \rfloor 2^{-24} \in [0, 1), \quad
        z_0, z_1 = \sqrt{-2 \ln u_1}\,(\cos, \sin)(2 \pi u_2)

    computed in float32 with the header's own ln and sincos (within 1.7 ulp) and a correctly rounded sqrt,
    then converted to ``dtype``. Computed on the CPU, then moved to ``device``.
    """
    shape = tuple(int(s) for s in shape)
    N = shape[0]
    D = math.prod(shape[1:])
    # the rule of every seed (fastscore.ops._validate.seed): numpy integers are Python ints, bools and floats refused
    seed = _validate.seed(seed)
    if seed is None:
        raise TypeError("seed: expected an integer, got None (counter_randn_ref draws no seed)")
    counter = _integer(counter, "counter", 0, _U64)
    sample_offset = _integer(sample_offset, "sample_offset", 0, 2**63)
    e0 = sample_offset * D
    total = N * D
    if total == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    b0, b1 = e0 // 4, (e0 + total + 3) // 4
    block = torch.arange(b0, b1, dtype=torch.int64)
    seed, counter = _u64(seed), _u64(counter)
    w = _philox.philox4x32_10(
        block & _philox.MASK32,
        block >> 32,
        torch.full_like(block, counter & _philox.MASK32),
        torch.full_like(block, counter >> 32),
        seed & _philox.MASK32,
        seed >> 32,
    )
    z0, z1 = _philox.box_muller(w[0], w[1])
    z2, z3 = _philox.box_muller(w[2], w[3])
    z = torch.stack([z0, z1, z2, z3], dim=1).reshape(-1)[e0 - 4 * b0 : e0 - 4 * b0 + total]
    return z.reshape(shape).to(device=device, dtype=dtype)


# ---- 2. references -----------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The compute dtype of the update: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample_view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def _update_ref(x, score, coef, z, mask, known) -> tuple[Tensor, Tensor]:
    """(x_new, x_mean) of the generic update, in the kernels' order of operations (compute dtype):
    x_mean = a x + b score, x_new = x_mean + c z, then x_new = mask known + (1 - mask) x_new."""
    acc = acc_dtype(x.dtype)
    a, b, c = (_per_sample_view(coef[:, k].to(acc), x) for k in range(3))
    mean = a * x.to(acc) + b * score.to(acc)
    out = mean + c * z.to(acc)
    if mask is not None:
        m = mask.to(x.dtype).to(acc)  # the kernels read mask and known in x's dtype
        out = m * known.to(x.dtype).to(acc) + (1 - m) * out
    return out.to(x.dtype), mean.to(x.dtype)


_coef_rows: dict[tuple, Tensor] = {}  # (step, N, dtype, device) -> (N, 3); samplers repeat a few step sizes


def _langevin_coef(step_size, N: int, acc: torch.dtype, device) -> Tensor:
    """(N, 3) rows (1, step, sqrt(2 step)); a Python step is rounded once to the compute dtype."""
    if isinstance(step_size, Tensor):
        s = step_size.to(device=device, dtype=acc).expand(N)
        return torch.stack([torch.ones_like(s), s, torch.sqrt(2 * s)], dim=1)
    step = float(step_size)
    if torch.compiler.is_compiling():
        return torch.tensor([[1.0, step, math.sqrt(2 * step)]], dtype=acc, device=device).expand(N, 3)
    key = (step, N, acc, device)
    rows = _coef_rows.get(key)
    if rows is None:
        if len(_coef_rows) >= 64:
            _coef_rows.clear()
        row = torch.tensor([[1.0, step, math.sqrt(2 * step)]], dtype=acc, device=device)
        rows = _coef_rows[key] = row.expand(N, 3)
    return rows


def _noise_for(x: Tensor, noise, seed, counter, sample_offset) -> Tensor:
    if noise is not None:
        return noise
    return counter_randn_ref(x.shape, seed=seed, counter=counter, sample_offset=sample_offset, device=x.device)


def langevin_step_ref(
    x: Tensor,
    score: Tensor,
    step_size,
    *,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    mask: Tensor | None = None,
    known: Tensor | None = None,
    sample_offset: int = 0,
) -> Tensor:
    r"""One Langevin step in plain PyTorch; returns the new x (x itself is not modified).

    .. math::
        x \leftarrow x + \epsilon\, s + \sqrt{2 \epsilon}\, z, \qquad
        x \leftarrow m \odot k + (1 - m) \odot x \ \text{(with a mask)}

    ``x``, ``score``: (N, ...); ``step_size`` :math:`\epsilon`: a float or an (N,) tensor; ``z`` is
    ``noise`` (x's shape and dtype) or ``counter_randn_ref(x.shape, seed=seed, counter=counter,
    sample_offset=sample_offset)``; ``mask``, ``known``: broadcastable to x, read in x's dtype. Computed
    in float32 (float64 for float64 x) with :math:`\sqrt{2\epsilon}` rounded once, in the same order as
    the kernels. ``seed=None`` with no ``noise`` draws a seed from torch's default generator.
    """
    seed = _validate.seed(seed)
    if seed is None and noise is None:
        seed = _draw_seed()
    coef = _langevin_coef(step_size, x.shape[0], acc_dtype(x.dtype), x.device)
    if mask is not None:
        mask, known = mask.expand_as(x), known.expand_as(x)
    return _update_ref(x, score, coef, _noise_for(x, noise, seed, counter, sample_offset), mask, known)[0]


def _corrector_coef(sums: Tensor, snr, alpha, per_sample: bool, acc: torch.dtype) -> Tensor:
    """(N, 3) rows (1, eps, sqrt(2 eps)) of score_sde's LangevinCorrector from the per-sample sums of
    squares (N, 2) float64: eps = (snr |z| / |g|)^2 * 2 * alpha, norms batch-averaged unless per_sample."""
    g_norm, z_norm = sums[:, 0].sqrt(), sums[:, 1].sqrt()
    if not per_sample:
        g_norm, z_norm = g_norm.mean().expand_as(g_norm), z_norm.mean().expand_as(z_norm)
    snr = snr.to(torch.float64) if isinstance(snr, Tensor) else float(snr)
    alpha = alpha.to(torch.float64) if isinstance(alpha, Tensor) else float(alpha)
    eps = (snr * z_norm / g_norm) ** 2 * 2 * alpha
    return torch.stack([torch.ones_like(eps), eps, torch.sqrt(2 * eps)], dim=1).to(acc)


def _sums_ref(score: Tensor, z: Tensor) -> Tensor:
    dims = tuple(range(1, score.dim()))
    g2 = score.to(torch.float64).square().sum(dims) if dims else score.to(torch.float64).square()
    z2 = z.to(torch.float64).square().sum(dims) if dims else z.to(torch.float64).square()
    return torch.stack([g2, z2], dim=1)


def langevin_corrector_step_ref(
    x: Tensor,
    score: Tensor,
    snr,
    *,
    alpha=1.0,
    per_sample: bool = False,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    sample_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""score_sde's LangevinCorrector step (docs/numerics.md#langevin-corrector-step-size) in plain PyTorch.

    Returns ``(x_new, x_mean)``; x is not modified. With :math:`\|g\|`, :math:`\|z\|` the per-sample L2
    norms over all non-batch dims (batch means of them when ``per_sample=False``: score_sde's rule, one
    step for the whole batch):

    .. math::
        \epsilon = 2 \alpha \left(\frac{\mathrm{snr}\,\|z\|}{\|g\|}\right)^2, \quad
        x_{mean} = x + \epsilon g, \quad x = x_{mean} + \sqrt{2\epsilon}\, z

    ``snr``, ``alpha``: floats or (N,) tensors. Norms and :math:`\epsilon` in float64, the update in the
    compute dtype. A sample with :math:`\|g\| = 0` gets an infinite step, as in score_sde.
    """
    seed = _validate.seed(seed)
    if seed is None and noise is None:
        seed = _draw_seed()
    z = _noise_for(x, noise, seed, counter, sample_offset)
    coef = _corrector_coef(_sums_ref(score, z), snr, alpha, per_sample, acc_dtype(x.dtype))
    return _update_ref(x, score, coef, z, None, None)


def _sde_coef(x_scale, score_scale, noise_scale, N: int, acc: torch.dtype, device) -> Tensor:
    cols = []
    for v in (x_scale, score_scale, noise_scale):
        if isinstance(v, Tensor):
            cols.append(v.to(device=device, dtype=acc).expand(N))
        else:
            cols.append(torch.full((N,), float(v), dtype=acc, device=device))
    return torch.stack(cols, dim=1)


def sde_update_ref(
    x: Tensor,
    score: Tensor,
    *,
    x_scale=1.0,
    score_scale,
    noise_scale,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    sample_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""The generic predictor update of :func:`sde_update_` in plain PyTorch; returns ``(x_new, x_mean)``:
    :math:`x_{mean} = a x + b s`, :math:`x = x_{mean} + c z` with per-sample ``x_scale`` a,
    ``score_scale`` b, ``noise_scale`` c (floats or (N,) tensors)."""
    seed = _validate.seed(seed)
    if seed is None and noise is None:
        seed = _draw_seed()
    coef = _sde_coef(x_scale, score_scale, noise_scale, x.shape[0], acc_dtype(x.dtype), x.device)
    return _update_ref(x, score, coef, _noise_for(x, noise, seed, counter, sample_offset), None, None)


# ---- 3. custom ops and their implementations -------------------------------------------------------------
# Arguments as the kernels take them: x, score, noise, x_mean (N, ...) in one layout (contiguous, or
# channels_last (N, C, H, W)), one dtype; coef (N, 3) in the compute dtype, unit column stride (a shared row
# arrives as a stride-0 expand); mask / known (1 or N, ...) in x's layout and dtype; seed and counter the
# 64-bit patterns as signed int64; sample_offset >= 0.


def _unwrap(v: int) -> int:
    return v & 0xFFFFFFFFFFFFFFFF


def _wrap(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def _update_ref_impl(x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean):
    z = _noise_for(x, noise, _unwrap(seed), _unwrap(counter), sample_offset)
    if mask is not None:
        mask, known = mask.expand_as(x), known.expand_as(x)
    new, mean = _update_ref(x, score, coef, z, mask, known)
    x.copy_(new)
    if x_mean is not None:
        x_mean.copy_(mean)


def _memory_rows(t: Tensor) -> Tensor:
    """(N, D) view of t's samples with each row in memory order (t contiguous or channels_last)."""
    return t.as_strided((t.shape[0], t[0].numel()), (t.stride(0), 1))


def _norms_ref_impl(score, noise, seed, counter, sample_offset, out):
    # Piece p of a sample: its memory positions [p L, (p + 1) L), L = ceil(D / P). The kernels generate the
    # normal of element index m at memory position m (a sum of squares does not care which is which), so the
    # generated noise's rows are read in index order and given noise in memory order, like the score.
    N, P = out.shape[0], out.shape[1]
    D = score[0].numel() if N else 0
    z = _noise_for(score, noise, _unwrap(seed), _unwrap(counter), sample_offset)
    L = max(1, -(-D // P))
    for k, rows in enumerate((_memory_rows(score), _memory_rows(z))):
        squares = torch.nn.functional.pad(rows.to(torch.float64).square(), (0, L * P - D))
        out[:, :, k] = squares.reshape(N, P, L).sum(2)


def _randn_ref_impl(out, seed, counter, sample_offset):
    out.copy_(counter_randn_ref(out.shape, seed=_unwrap(seed), counter=_unwrap(counter), sample_offset=sample_offset))


class _Impl(NamedTuple):
    update: object
    norms: object
    randn: object
    # Elements per piece of a sample in the norms pass: every kernel takes any number of pieces (the partial
    # sums' shape says how many); this is the split each one is fastest with. CPU: one noise chunk per
    # task. CUDA: a block of 256 threads per 8192 elements. Triton: one program per BLOCK.
    norm_piece: int


def _impl(backend: str) -> _Impl:
    if backend == "ref":
        return _Impl(_update_ref_impl, _norms_ref_impl, _randn_ref_impl, 8192)
    if backend in ("cpp", "cuda"):  # one C++ op; the dispatcher routes CPU / CUDA tensors
        ops = torch.ops.fastscore_C  # .default: skips the overload resolution on every call
        return _Impl(
            ops.langevin_step_update.default,
            ops.langevin_step_norms.default,
            ops.langevin_step_randn.default,
            1024 if backend == "cpp" else 8192,
        )
    from fastscore._triton import langevin_step as kernels

    return _Impl(kernels.update, kernels.norms, kernels.randn, kernels.NORM_PIECE)


# Order on CUDA tensors (not yet measured on a GPU here: both are memory-bound with the noise made in
# registers; the CUDA kernel runs one Philox block per 4 elements, the Triton one per element).
PREFERRED_CUDA = ("cuda", "triton")


def _impl_for(t: Tensor) -> _Impl:
    return _backend.chosen_impl(OP, t.device, _impl, cpp_op="langevin_step_update", cuda_order=PREFERRED_CUDA)


@torch.library.custom_op("fastscore::langevin_step_update", mutates_args=("x", "x_mean"))
def _update_op(
    x: Tensor,
    score: Tensor,
    coef: Tensor,
    noise: Tensor | None,
    seed: int,
    counter: int,
    sample_offset: int,
    mask: Tensor | None,
    known: Tensor | None,
    x_mean: Tensor | None,
) -> None:
    _impl_for(x).update(x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean)


@_update_op.register_fake
def _(x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean):
    return None


@torch.library.custom_op("fastscore::langevin_step_norms", mutates_args=("out",))
def _norms_op(score: Tensor, noise: Tensor | None, seed: int, counter: int, sample_offset: int, out: Tensor) -> None:
    _impl_for(score).norms(score, noise, seed, counter, sample_offset, out)


@_norms_op.register_fake
def _(score, noise, seed, counter, sample_offset, out):
    return None


@torch.library.custom_op("fastscore::langevin_step_randn", mutates_args=("out",))
def _randn_op(out: Tensor, seed: int, counter: int, sample_offset: int) -> None:
    _impl_for(out).randn(out, seed, counter, sample_offset)


@_randn_op.register_fake
def _(out, seed, counter, sample_offset):
    return None


# In eager mode the public functions call the chosen implementation directly: the custom-op wrapper costs
# tens of microseconds per call (argument normalisation, mutation bookkeeping), a large share of a step on a
# (64, 3, 32, 32) batch. Under torch.compile they go through the custom ops, which the compiler can trace.


def _update(x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean) -> None:
    if torch.compiler.is_compiling():
        torch.ops.fastscore.langevin_step_update(
            x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean
        )
    else:
        _impl_for(x).update(x, score, coef, noise, seed, counter, sample_offset, mask, known, x_mean)


def norm_partials(score: Tensor) -> Tensor:
    """An uninitialised (N, P, 2) float64 buffer for :func:`_norms_into`'s partial sums of score's samples,
    with the number of pieces P the backend chosen for score is fastest with."""
    D = score[0].numel() if score.shape[0] else 0
    return torch.empty(
        (score.shape[0], max(1, -(-D // _impl_for(score).norm_piece)), 2), dtype=torch.float64, device=score.device
    )


def _norms_into(score, noise, seed, counter, sample_offset, partials: Tensor) -> None:
    """partials (N, P, 2) float64 <- per sample and piece (memory order, ceil(D / P) elements each), the sums
    of score^2 and z^2. Allocates nothing: a sampler adds the pieces into its own buffer."""
    if torch.compiler.is_compiling():
        torch.ops.fastscore.langevin_step_norms(score, noise, seed, counter, sample_offset, partials)
    else:
        _impl_for(score).norms(score, noise, seed, counter, sample_offset, partials)


def _norms(score, noise, seed, counter, sample_offset) -> Tensor:
    """(N, 2) float64: per sample, the sums of score^2 and z^2."""
    partials = norm_partials(score)
    _norms_into(score, noise, seed, counter, sample_offset, partials)
    return partials.sum(1)  # the pieces in a fixed order


def _randn(out, seed, counter, sample_offset) -> None:
    if torch.compiler.is_compiling():
        torch.ops.fastscore.langevin_step_randn(out, seed, counter, sample_offset)
    else:
        _impl_for(out).randn(out, seed, counter, sample_offset)


# ---- 4. the update bound to a chain (what the samplers use) -----------------------------------------------


class FusedUpdate:
    r"""The fused update bound to one chain: its state ``x`` (updated in place), noise key and backend, checked
    and chosen once, so that a sampler's step is one call:

    .. math::
        x_{mean} = a x + b s, \qquad x \leftarrow x_{mean} + c z, \qquad
        x \leftarrow m \odot k + (1 - m) \odot x \ \text{(with a mask)}

    with ``coef`` the (N, 3) rows (a, b, c) in :attr:`compute_dtype` (one row per sample; a stride-0 view of
    one row serves a whole batch) and z the counter-based normals of ``(seed, counter)`` at global sample
    index ``sample_offset + n`` (:func:`counter_randn`), or a given ``noise`` tensor. ``x``: a floating
    contiguous or channels_last (N, ...) tensor; the scores and noise passed in must be in its layout
    (:attr:`layout`). ``seed`` (checked by :func:`noise_key`; None draws one, unless ``noise_given``: the
    caller brings every normal, the seed is unused). No checks per step: what the sampler hands in is its
    own, already checked, state. Under torch.compile the steps go through the custom ops (traceable);
    eagerly, straight to the kernels of the backend chosen at construction (the choice costs ~10 us, a
    large share of a step on a small batch)."""

    def __init__(self, x: Tensor, *, seed, sample_offset: int = 0, noise_given: bool = False):
        self.layout = _validate.updatable(x)
        self.x = x
        self.compute_dtype = acc_dtype(x.dtype)
        self.seed, _, self.sample_offset = noise_key(
            seed, 0, sample_offset, x.shape[0], math.prod(x.shape[1:]), draw=not noise_given
        )
        self._seed = _wrap(self.seed)
        self._impl = None if torch.compiler.is_compiling() else _impl_for(x)

    def __call__(self, score: Tensor, coef: Tensor, counter: int, *, noise=None, mask=None, known=None, x_mean=None):
        """One update of x with the normals of ``counter`` (or ``noise``); ``x_mean`` receives a x + b s;
        ``mask``, ``known``: (1 or N, ...) tensors in x's dtype and layout."""
        update = self._impl.update if self._impl is not None else _update
        update(self.x, score, coef, noise, self._seed, _wrap(counter), self.sample_offset, mask, known, x_mean)

    def norm_partials(self) -> Tensor:
        """An uninitialised (N, P, 2) float64 buffer for :meth:`norms_into`, with the number of pieces P the
        chosen backend is fastest with."""
        return norm_partials(self.x)

    def norms_into(self, score: Tensor, counter: int, partials: Tensor, *, noise=None) -> None:
        """partials (N, P, 2) <- per sample and piece, the sums of score^2 and z^2 (the noise of ``counter``,
        or ``noise``), for score_sde's norm-based corrector step. Allocates nothing."""
        _norms_into(score, noise, self._seed, _wrap(counter), self.sample_offset, partials)

    def randn_into(self, out: Tensor, counter: int) -> Tensor:
        """out (x's shape) <- the normals of ``counter`` under this chain's key (element (n, i) the normal of
        logical index i of sample n, whatever out's layout); allocates nothing when out is contiguous."""
        if out.is_contiguous():
            _randn(out, self._seed, _wrap(counter), self.sample_offset)
            return out
        z = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _randn(z, self._seed, _wrap(counter), self.sample_offset)
        return out.copy_(z)


# ---- 5. public functions ----------------------------------------------------------------------------------

_U64 = 1 << 64


def _draw_seed() -> int:
    """A 63-bit seed from torch's default CPU generator (so torch.manual_seed makes runs reproducible)."""
    return int(torch.randint(2**63 - 1, (), dtype=torch.int64).item())


_integer = _validate.integer  # v as a Python int in [low, high) (numpy integers too), else an error naming it


def noise_key(seed, counter, sample_offset, N: int, D: int, *, draw: bool = True) -> tuple[int, int, int]:
    """(seed, counter, sample_offset) of the noise of a batch of N samples of D elements, checked: seed and
    counter in [0, 2^64), sample_offset >= 0 with the global element index ``(sample_offset + N) * D`` below
    2^64. A seed is drawn from torch's default generator when None (0 when ``draw`` is False: the noise is
    given, the seed unused)."""
    seed = _validate.seed(seed)
    if seed is None:
        seed = _draw_seed() if draw else 0
    counter = _integer(counter, "counter", 0, _U64)
    sample_offset = _integer(sample_offset, "sample_offset", 0, 2**63)
    if (sample_offset + N) * D > _U64:
        raise ValueError(
            f"sample_offset: the global element index (sample_offset + N) * D = {(sample_offset + N) * D} exceeds 2^64"
        )
    return seed, counter, sample_offset


def _kernel_key(seed, counter, sample_offset, x_shape, noise) -> tuple[int, int, int]:
    """:func:`noise_key` as the custom ops take it: seed and counter as int64 words."""
    seed, counter, sample_offset = noise_key(
        seed, counter, sample_offset, x_shape[0], math.prod(x_shape[1:]), draw=noise is None
    )
    return _wrap(seed), _wrap(counter), sample_offset


def _per_sample(v, name: str, x: Tensor, *, nonneg: bool, limit: tuple[float, str] | None = None) -> object:
    """A float, or an (N,) (or 0-d) float tensor on x's device: finite, >= 0 when nonneg, and at most
    ``limit = (bound, why)`` in magnitude -- by default the largest finite value of the compute dtype, since
    the coefficients are computed in it (a float64 1e300 would become inf in float32)."""
    N = x.shape[0]
    if limit is None:
        acc = acc_dtype(x.dtype)
        limit = (torch.finfo(acc).max, f"larger values are not finite in {_dtype_name(acc)}, the dtype of x's update")
    bound, why = limit
    if isinstance(v, Tensor):
        _validate.floating(v, name)
        if v.shape not in ((N,), ()):
            raise ValueError(
                f"{name}: expected a float or a tensor of shape ({N},) (one per sample), got shape {tuple(v.shape)}"
            )
        _validate.same_device(v, name, x)
        if _validate.values_checkable():
            w = v.detach().to(torch.float64)
            ok = torch.isfinite(w) & (w.abs() <= bound)
            if nonneg:
                ok &= w >= 0
            if not bool(ok.all()):
                kind = "non-negative finite" if nonneg else "finite"
                raise ValueError(f"{name}: expected {kind} values of at most {bound:.6g} ({why}), got {v.tolist()}")
        return v.detach()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float or a tensor of shape ({N},), got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v) or (nonneg and v < 0) or abs(v) > bound:
        kind = "non-negative finite" if nonneg else "finite"
        raise ValueError(f"{name}: expected a {kind} number of at most {bound:.6g} ({why}), got {v}")
    return v


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def step_limit(x: Tensor) -> tuple[float, str]:
    """(bound, why): the largest Langevin step for x: finite in x's dtype, with 2 step finite in the compute
    dtype (the update takes sqrt(2 step))."""
    acc = acc_dtype(x.dtype)
    bound = min(torch.finfo(x.dtype).max, torch.finfo(acc).max / 2)
    d, a = _dtype_name(x.dtype), _dtype_name(acc)
    if x.dtype == acc:
        return bound, f"step_size and 2 * step_size must be finite in {d}, x's dtype"
    return bound, f"step_size must be finite in {d}, x's dtype, and 2 * step_size in {a}, the dtype of its update"


def _mask_known(mask, known, x: Tensor, fmt: torch.memory_format):
    """mask, known as (1 or N, ...) tensors in x's dtype and layout (copied only when needed)."""
    if mask is None and known is None:
        return None, None
    if mask is None:
        raise ValueError("known: given without mask (x = mask * known + (1 - mask) * x needs both)")
    if known is None:
        raise ValueError("mask: given without known (x = mask * known + (1 - mask) * x needs both)")
    out = []
    for t, name in ((mask, "mask"), (known, "known")):
        _validate.tensor(t, name)
        if t.dtype != torch.bool:
            _validate.floating(t, name)
        _validate.same_device(t, name, x)
        try:
            full = torch.broadcast_to(t, x.shape)
        except RuntimeError:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to x's {tuple(x.shape)}") from None
        shared = x.shape[0] == 1 or full.stride(0) == 0
        rows = full[:1] if shared else full
        out.append(rows.to(x.dtype).contiguous(memory_format=fmt))
    if _validate.values_checkable() and mask.dtype != torch.bool and not bool(((mask >= 0) & (mask <= 1)).all()):
        raise ValueError("mask: expected values in [0, 1]")
    return out[0], out[1]


def counter_randn(
    shape,
    *,
    seed: int | None,
    counter: int = 0,
    sample_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Standard normal noise from the counter-based generator the Langevin kernels use (a new tensor).

    ``shape`` (N, ...): element (n, i) is the normal of global element ``(sample_offset + n) * D + i``
    (D = prod(shape[1:]), i row-major within the sample) under ``(seed, counter)``: see
    :func:`counter_randn_ref` for the layout and csrc/include/langevin_step_math.h for the arithmetic. So
    ``counter_randn(shape, seed=s, counter=c)[k]`` is the noise ``langevin_step_(..., seed=s, counter=c)``
    adds to sample k, in any batch (shift by ``sample_offset``), on any backend, bitwise. The normals are
    float32 values, converted to ``dtype``. ``seed`` (0 <= seed < 2^64) and ``counter`` (0 <= counter <
    2^64) are integers; ``seed=None`` draws one from torch's default generator.
    """
    shape = _validate.shape(shape)
    _validate.float_dtype(dtype)
    seed, counter, sample_offset = _kernel_key(seed, counter, sample_offset, shape, None)
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel():
        _randn(out, seed, counter, sample_offset)
    return out


def langevin_step_(
    x: Tensor,
    score: Tensor,
    step_size,
    *,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    mask: Tensor | None = None,
    known: Tensor | None = None,
    sample_offset: int = 0,
) -> Tensor:
    r"""One Langevin step, in place, with the noise generated inside the kernel; returns x.

    .. math::
        x \leftarrow x + \epsilon\, s + \sqrt{2 \epsilon}\, z, \qquad
        x \leftarrow m \odot k + (1 - m) \odot x \ \text{(when a mask is given)}

    - ``x`` (updated in place), ``score``: the same shape (N, ...) -- images (N, C, H, W) or vectors
      (N, D) -- and dtype (float16, bfloat16, float32, float64; arithmetic in float32, float64 for
      float64). x must be contiguous or channels_last (it is never copied); a ``score`` (or ``noise``) in
      another layout is copied into x's.
    - ``step_size`` :math:`\epsilon \ge 0`: a float, or an (N,) tensor (one step per sample); finite, and
      small enough that :math:`\epsilon` is finite in x's dtype and :math:`2\epsilon` in the compute dtype
      (inf, NaN or e.g. 1e300 for float32 x is an error naming it: it would make the update inf).
    - ``z``: ``noise`` when given (x's shape and dtype; the result then equals :func:`langevin_step_ref`
      up to float rounding), else generated from ``(seed, counter)`` and each element's global index
      ``(sample_offset + n) * D + i``: exactly ``counter_randn(x.shape, seed=seed, counter=counter,
      sample_offset=sample_offset)``, bitwise the same on every backend and run, and for sample n
      independent of the batch it is in (``sample_offset`` names a shard's first sample). Use a new
      ``counter`` (e.g. the step index) for every step of a chain. ``seed=None`` draws a 63-bit seed from
      torch's default CPU generator, so ``torch.manual_seed`` makes runs reproducible.
    - ``mask``, ``known``: both or neither; broadcastable to x (e.g. (1, C, H, W) or (N, 1, H, W)), mask
      values in [0, 1] (or bool), both read in x's dtype: the inpainting update of ncsn / ncsnv2.

    Not differentiable: a sampler update, run it under ``torch.no_grad()`` (an input that requires grad
    in grad mode is an error). Every argument is checked before x is touched.
    """
    fmt = _validate.updatable(x)
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("langevin_step_", x, score, noise)
    step_size = _per_sample(step_size, "step_size", x, nonneg=True, limit=step_limit(x))
    if noise is not None:
        noise = _validate.like(noise, "noise", x, fmt)
    mask, known = _mask_known(mask, known, x, fmt)
    N = x.shape[0]
    seed, counter, sample_offset = _kernel_key(seed, counter, sample_offset, x.shape, noise)
    if x.numel() == 0:
        return x
    coef = _langevin_coef(step_size, N, acc_dtype(x.dtype), x.device)
    _update(x, score, coef, noise, seed, counter, sample_offset, mask, known, None)
    return x


def langevin_corrector_step_(
    x: Tensor,
    score: Tensor,
    snr,
    *,
    alpha=1.0,
    per_sample: bool = False,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    sample_offset: int = 0,
    x_mean: Tensor | None = None,
) -> Tensor:
    r"""score_sde's Langevin corrector step, in place: one reduction pass and one update pass; returns x.

    .. math::
        \epsilon = 2 \alpha \left(\frac{\mathrm{snr}\,\|z\|}{\|g\|}\right)^2, \quad
        x_{mean} = x + \epsilon g, \quad x \leftarrow x_{mean} + \sqrt{2\epsilon}\, z

    with :math:`\|g\|`, :math:`\|z\|` the L2 norms of each sample's score and noise over all non-batch
    dims. ``per_sample=False`` (the default) reproduces score_sde's ``LangevinCorrector``, which uses the
    **batch means** of the norms (one step for the whole batch, so a sample's update depends on its batch).
    ``per_sample=True`` gives each sample the step of its own norms; a step that depends on the current
    state, without a Metropolis correction, samples a wider distribution (the variance grows by about
    (D + 2) / D in D dimensions), so :func:`fastscore.sampling.pc_sampler` uses neither by default but a
    step from the norms' expected values. ``snr`` > 0 and ``alpha`` (score_sde's
    :math:`\alpha_i = 1 - \beta_i` for VP / sub-VP SDEs, 1 for VE) are floats or (N,) tensors, finite in
    the compute dtype.

    The noise is regenerated from ``(seed, counter)`` in both passes (never stored), as in
    :func:`langevin_step_`, or read from ``noise``. ``x_mean``: a preallocated tensor (x's shape, dtype
    and layout; not one that requires grad in grad mode) that receives :math:`x + \epsilon g` (the
    corrector's ``x_mean``). Norms and :math:`\epsilon` in float64. A sample with :math:`\|g\| = 0` gets an
    infinite step, as in score_sde.
    Shapes, dtypes, layouts and the no-grad rule as :func:`langevin_step_`.
    """
    fmt = _validate.updatable(x)
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("langevin_corrector_step_", x, score, noise)
    snr = _per_sample(snr, "snr", x, nonneg=True)
    alpha = _per_sample(alpha, "alpha", x, nonneg=True)
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample: expected a bool, got {type(per_sample).__name__}")
    if noise is not None:
        noise = _validate.like(noise, "noise", x, fmt)
    x_mean = _validate.other_output(x_mean, x, "x_mean")
    seed, counter, sample_offset = _kernel_key(seed, counter, sample_offset, x.shape, noise)
    if x.numel() == 0:
        return x
    sums = _norms(score, noise, seed, counter, sample_offset)
    coef = _corrector_coef(sums, snr, alpha, per_sample, acc_dtype(x.dtype))
    _update(x, score, coef, noise, seed, counter, sample_offset, None, None, x_mean)
    return x


def sde_update_(
    x: Tensor,
    score: Tensor,
    *,
    x_scale=1.0,
    score_scale,
    noise_scale,
    x_mean: Tensor | None = None,
    noise: Tensor | None = None,
    seed: int | None = None,
    counter: int = 0,
    sample_offset: int = 0,
) -> Tensor:
    r"""The reverse-SDE predictor update, in place: :math:`x_{mean} = a x + b s`, :math:`x \leftarrow
    x_{mean} + c z`; returns x.

    ``x_scale`` a, ``score_scale`` b, ``noise_scale`` c: floats or (N,) tensors (per sample, e.g. at
    per-sample times), finite in the compute dtype. ``x_mean``: a preallocated tensor (x's shape, dtype,
    layout; not one that requires grad in grad mode, which torch refuses to overwrite too) that receives
    :math:`x_{mean}` (score_sde's predictors return it; the PC sampler's denoised output is the last one).
    Noise, shapes, dtypes, layouts and the no-grad rule as :func:`langevin_step_`.

    score_sde's predictors (docs/numerics.md#predictors, :math:`\Delta t = 1/N`, time index i of t,
    :math:`\sigma_{-1} = 0`) map onto it as:

    ==========================  ======================  ====================  ==============================
    predictor                   a (``x_scale``)         b (``score_scale``)   c (``noise_scale``)
    ==========================  ======================  ====================  ==============================
    Euler-Maruyama, VE          1                       g(t)^2 dt             g(t) sqrt(dt)
    Euler-Maruyama, VP, sub-VP  1 + beta(t) dt / 2      g(t)^2 dt             g(t) sqrt(dt)
    reverse diffusion, VE       1                       s_i^2 - s_{i-1}^2     sqrt(s_i^2 - s_{i-1}^2)
    reverse diffusion, VP       2 - sqrt(1 - beta_i)    beta_i                sqrt(beta_i)
    reverse diffusion, other    1 - f_a dt              g(t)^2 dt             g(t) sqrt(dt)
    ancestral, VE               1                       s_i^2 - s_{i-1}^2     sqrt(s_{i-1}^2 (1 - r_i))
    ancestral, VP               1 / sqrt(1 - beta_i)    beta_i a              sqrt(beta_i)
    ==========================  ======================  ====================  ==============================

    where g(t) is the SDE's diffusion (VE: :math:`\sigma(t)\sqrt{2 \ln(\sigma_{max}/\sigma_{min})}`; VP:
    :math:`\sqrt{\beta(t)}`; sub-VP: :math:`\sqrt{\beta(t)(1 - e^{-2\beta_0 t - (\beta_1-\beta_0)t^2})}`),
    ``s_i`` the discrete sigmas (:math:`r_i = s_{i-1}^2 / s_i^2`), ``beta_i`` the discrete betas, and for
    the generic reverse diffusion a drift ``f(x, t) = f_a(t) x`` discretised as ``f dt`` (score_sde's base
    ``discretize``). The probability flow ODE's Euler step is b halved and c = 0. These are score_sde's
    updates up to the order of rounding (its ancestral VP predictor divides after the sum).
    """
    fmt = _validate.updatable(x)
    score = _validate.like(score, "score", x, fmt)
    _validate.no_grad_needed("sde_update_", x, score, noise)
    a = _per_sample(x_scale, "x_scale", x, nonneg=False)
    b = _per_sample(score_scale, "score_scale", x, nonneg=False)
    c = _per_sample(noise_scale, "noise_scale", x, nonneg=False)
    if noise is not None:
        noise = _validate.like(noise, "noise", x, fmt)
    x_mean = _validate.other_output(x_mean, x, "x_mean")
    N = x.shape[0]
    seed, counter, sample_offset = _kernel_key(seed, counter, sample_offset, x.shape, noise)
    if x.numel() == 0:
        return x
    coef = _sde_coef(a, b, c, N, acc_dtype(x.dtype), x.device)
    _update(x, score, coef, noise, seed, counter, sample_offset, None, None, x_mean)
    return x
