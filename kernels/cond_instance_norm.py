"""InstanceNorm++ (fastscore.ops.cond_instance_norm) in Triton: forward, backward and forward-mode (jvp).

The contract (argument shapes, dtypes, return conventions) is section 2 of fastscore/ops/cond_instance_norm.py;
the per-channel formulas are csrc/include/cond_instance_norm_math.h, which the C++ CPU and CUDA kernels share.
Every direction is the same three-step pipeline as the C++ kernels:

    reduce   per-plane sums over H*W            program per (sample, block of channels), loop over H*W
    coef     per-sample coefficients            program per sample, loop over C (the "++" term needs
                                                all channels of a sample)
    apply    one elementwise pass               program per (sample, block of channels, block of H*W)

Backward and jvp first rerun the forward coefficient step (a, b, muhat, m, s) from the saved mean and rstd.

Activations x, out, grad_out, grad_x, x_t, out_t are (N, C, H, W), NCHW or NHWC (channels_last), addressed as
``base + n * stride_n + c * stride_c + hw * stride_hw`` with (stride_c, stride_hw) = (HW, 1) or (1, C); tiles are
[BLOCK_C, BLOCK_HW], so loads coalesce along whichever of the two is contiguous. Per-channel tensors are (N, C)
in the accumulation dtype (float32, float64 for float64 x): mean, rstd and the scratch contiguous; gamma, alpha,
beta and their tangents read through their own strides (a (C,) parameter arrives as a stride-0 expand).
eps is a constexpr: a float kernel argument would be float32 on the GPU, too coarse for float64 statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_ACTS = {"none": 0, "elu": 1}

# ---- element helpers --------------------------------------------------------------------------------------------


@triton.jit
def _float(v, acc_ty: tl.constexpr):
    # An integer (tensor, or constexpr: Triton specialises int arguments equal to 1) as an acc_ty scalar.
    return tl.zeros([], dtype=acc_ty) + v


@triton.jit
def _div(x, y, IS_F64: tl.constexpr):
    # IEEE-rounded division: plain `/` on float32 is a 2-ulp approximation on NVIDIA GPUs.
    if IS_F64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


@triton.jit
def _inv_sqrt(v, IS_F64: tl.constexpr):
    # 1 / sqrt(v) with both steps IEEE-rounded (tl.rsqrt and float32 tl.sqrt are approximations on GPUs).
    if IS_F64:
        r = 1.0 / tl.sqrt(v)
    else:
        r = tl.div_rn(1.0, tl.sqrt_rn(v))
    return r


@triton.jit
def _expm1_nonpos(t, IS_F64: tl.constexpr):
    """expm1(t) for t <= 0, accurate near 0 (where exp(t) - 1 would cancel) without a libdevice call.

    On [-0.5, 0] the Taylor series (Horner; truncation below 1e-9 relative in float32, 1e-18 in float64);
    below -0.5, exp(t) - 1, where |expm1(t)| > 0.39 so the subtraction costs at most about one ulp.
    """
    small = t > -0.5
    t_s = tl.where(small, t, 0.0)  # keep the unused series finite for large |t|
    if IS_F64:
        q = 1.0 / 355687428096000.0  # 1/17!
        q = q * t_s + 1.0 / 20922789888000.0
        q = q * t_s + 1.0 / 1307674368000.0
        q = q * t_s + 1.0 / 87178291200.0
        q = q * t_s + 1.0 / 6227020800.0
        q = q * t_s + 1.0 / 479001600.0
        q = q * t_s + 1.0 / 39916800.0
        q = q * t_s + 1.0 / 3628800.0
        q = q * t_s + 1.0 / 362880.0
        q = q * t_s + 1.0 / 40320.0
        q = q * t_s + 1.0 / 5040.0
        q = q * t_s + 1.0 / 720.0
        q = q * t_s + 1.0 / 120.0
        q = q * t_s + 1.0 / 24.0
        q = q * t_s + 1.0 / 6.0
        q = q * t_s + 0.5
    else:
        q = 1.0 / 3628800.0  # 1/10!
        q = q * t_s + 1.0 / 362880.0
        q = q * t_s + 1.0 / 40320.0
        q = q * t_s + 1.0 / 5040.0
        q = q * t_s + 1.0 / 720.0
        q = q * t_s + 1.0 / 120.0
        q = q * t_s + 1.0 / 24.0
        q = q * t_s + 1.0 / 6.0
        q = q * t_s + 0.5
    series = t_s + t_s * (t_s * q)
    return tl.where(small, series, tl.exp(t) - 1.0)


@triton.jit
def _act(pre, ACT: tl.constexpr, IS_F64: tl.constexpr):
    # ELU (alpha = 1): pre if pre > 0 else expm1(pre). The select keeps NaN (tl.minimum might drop it).
    if ACT == 1:
        out = tl.where(pre > 0, pre, _expm1_nonpos(tl.where(pre > 0, 0.0, pre), IS_F64))
    else:
        out = pre
    return out


@triton.jit
def _act_grad(pre, ACT: tl.constexpr):
    # d act / d pre from pre: 1 if pre > 0 else exp(pre) (exp at 0 too, as torch's elu_backward).
    if ACT == 1:
        d = tl.where(pre > 0, 1.0, tl.exp(tl.where(pre > 0, 0.0, pre)))
    else:
        d = tl.full(pre.shape, 1.0, pre.dtype)
    return d


# ---- forward ----------------------------------------------------------------------------------------------------


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    """This program's sample and channel block on a grid of N * cdiv(C, BLOCK_C) rows: (n, offs_c, mask_c)."""
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BLOCK_C)
    offs_c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    return (pid // num_cb).to(tl.int64), offs_c, offs_c < C


@triton.jit
def _tile(C, HW, stride_n, stride_c, stride_hw, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's [BLOCK_C, BLOCK_HW] tile of an elementwise pass on a grid of
    (N * cdiv(C, BLOCK_C), cdiv(HW, BLOCK_HW)): (pc, mask_c, offs, mask), with pc the (N, C) indices of its
    channels and offs the tile's element offsets."""
    n, offs_c, mask_c = _channel_block(C, BLOCK_C)
    offs_hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = mask_c[:, None] & (offs_hw < HW)[None, :]
    offs = n * stride_n + offs_c[:, None] * stride_c + offs_hw[None, :] * stride_hw
    return n * C + offs_c, mask_c, offs, mask


@triton.jit
def _column(ptr, pc, mask_c):
    """A per-plane (N, C) value of the tile's channels, as a [BLOCK_C, 1] column."""
    return tl.load(ptr + pc, mask=mask_c, other=0.0)[:, None]


@triton.jit
def _cond_instance_norm_stats_kernel(
    x_ptr,  # (N, C, H, W) NCHW or NHWC, any float dtype
    mean_ptr,  # (N, C) out, contiguous, accumulation dtype
    rstd_ptr,  # (N, C) out, contiguous, accumulation dtype
    C,
    HW,
    stride_n,  # C * HW
    stride_c,  # HW (NCHW) or 1 (NHWC)
    stride_hw,  # 1 (NCHW) or C (NHWC)
    EPS: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    r"""Per-plane moments: mean = mean_hw x, rstd = 1 / sqrt(var^b_hw x + eps) (biased variance).

    The moments are taken of y = x - K, K the plane's first element, so every sum is of values of the
    size of the spread, not of |mean| (mean = K + mean_hw y keeps the mean's rounding to about half an ulp
    when |mean| >> std, as the C++ kernel's shifted sums). Each BLOCK_HW chunk gives its own mean and
    centred sum of squares (two passes over registers), merged into the running ones by Chan's update
    :math:`M_2 = M_{2,a} + M_{2,b} + \delta^2 n_a n_b / (n_a + n_b)`, :math:`\delta = \bar y_b - \bar y_a`,
    so the variance has no cancellation either. Grid: (N * cdiv(C, BLOCK_C),).

    References: csrc/include/cond_instance_norm_math.h; Chan, Golub & LeVeque, "Updating formulae and a
    pairwise algorithm for computing sample variances" (1979).
    """
    acc_ty = mean_ptr.dtype.element_ty
    n, offs_c, mask_c = _channel_block(C, BLOCK_C)
    rows = x_ptr + n * stride_n + offs_c[:, None] * stride_c
    shift = tl.load(rows, mask=mask_c[:, None], other=0.0).to(acc_ty)  # [BLOCK_C, 1]: K = x[n, c, 0]

    mean = tl.zeros([BLOCK_C], dtype=acc_ty)  # of y = x - K
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    for hw0 in range(0, HW, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        x = tl.load(rows + offs_hw[None, :] * stride_hw, mask=mask, other=0.0).to(acc_ty)
        y = tl.where(mask, x - shift, 0.0)
        n_a = _float(hw0, acc_ty)  # every earlier chunk was full
        n_b = _float(tl.minimum(HW - hw0, BLOCK_HW), acc_ty)
        mean_b = _div(tl.sum(y, axis=1), n_b, IS_F64)
        d = tl.where(mask, y - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        n_ab = n_a + n_b
        delta = mean_b - mean
        mean = mean + delta * _div(n_b, n_ab, IS_F64)
        m2 = m2 + m2_b + delta * delta * _div(n_a * n_b, n_ab, IS_F64)

    var = tl.maximum(_div(m2, _float(HW, acc_ty), IS_F64), 0.0)
    rstd = _inv_sqrt(var + EPS, IS_F64)
    out = n * C + offs_c
    tl.store(mean_ptr + out, tl.sum(shift, axis=1) + mean, mask=mask_c)
    tl.store(rstd_ptr + out, rstd, mask=mask_c)


@triton.jit
def _cond_instance_norm_fwd_coef_kernel(
    mean_ptr,  # (N, C) contiguous
    rstd_ptr,  # (N, C) contiguous
    gamma_ptr,  # (N, C) strided (stride_gn, stride_gc)
    alpha_ptr,  # (N, C) strided, or a placeholder when not HAS_ALPHA
    beta_ptr,  # (N, C) strided, or a placeholder when not HAS_BETA
    a_ptr,  # (N, C) out: pre = a * (x - mean) + b
    b_ptr,  # (N, C) out
    muhat_ptr,  # (N, C) out: standardised channel means (0 without alpha)
    ms_ptr,  # (2, N) out: m = mean_c mean, s = 1 / sqrt(var^u_c mean + eps) (0, 0 without alpha)
    N,
    C,
    stride_gn,
    stride_gc,
    stride_an,
    stride_ac,
    stride_bn,
    stride_bc,
    EPS: tl.constexpr,
    HAS_ALPHA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r"""Forward coefficients of one sample: a = gamma * rstd, b = gamma * muhat * alpha + beta, with
    :math:`\hat\mu = (\mu - m) s`, :math:`m = \operatorname{mean}_c \mu`,
    :math:`s = 1/\sqrt{\operatorname{var}^u_c \mu + \epsilon}` (unbiased over the C channel means).
    Grid: (N,); loops over C in BLOCK_C blocks (two-pass variance).

    References: csrc/include/cond_instance_norm_math.h (channel_mean_moments, fwd_coef); Song & Ermon,
    "Improved Techniques for Training Score-Based Generative Models" (2020), InstanceNorm++.
    """
    acc_ty = mean_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    row = n * C
    m = tl.zeros([1], dtype=acc_ty)
    s = tl.zeros([1], dtype=acc_ty)
    if HAS_ALPHA:
        acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            acc += tl.load(mean_ptr + row + offs, mask=offs < C, other=0.0)
        m = _div(tl.sum(acc, axis=0), _float(C, acc_ty), IS_F64) + m
        acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            mask = offs < C
            d = tl.where(mask, tl.load(mean_ptr + row + offs, mask=mask, other=0.0) - m, 0.0)
            acc += d * d
        s = _inv_sqrt(_div(tl.sum(acc, axis=0), _float(C - 1, acc_ty), IS_F64) + EPS, IS_F64) + s
    one = tl.arange(0, 1)
    tl.store(ms_ptr + n + one, m)
    tl.store(ms_ptr + N + n + one, s)

    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        rstd = tl.load(rstd_ptr + row + offs, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + n * stride_gn + offs * stride_gc, mask=mask, other=0.0)
        b = tl.zeros([BLOCK_C], dtype=acc_ty)
        muhat = tl.zeros([BLOCK_C], dtype=acc_ty)
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + n * stride_an + offs * stride_ac, mask=mask, other=0.0)
            muhat = (tl.load(mean_ptr + row + offs, mask=mask, other=0.0) - m) * s
            b = gamma * (muhat * alpha)
        if HAS_BETA:
            b = b + tl.load(beta_ptr + n * stride_bn + offs * stride_bc, mask=mask, other=0.0)
        tl.store(a_ptr + row + offs, gamma * rstd, mask=mask)
        tl.store(b_ptr + row + offs, b, mask=mask)
        tl.store(muhat_ptr + row + offs, muhat, mask=mask)


@triton.jit
def _cond_instance_norm_fwd_apply_kernel(
    x_ptr,  # (N, C, H, W) NCHW or NHWC
    out_ptr,  # (N, C, H, W) out, x's dtype and layout; may be x_ptr (in place)
    mean_ptr,  # (N, C) contiguous
    a_ptr,  # (N, C) contiguous
    b_ptr,  # (N, C) contiguous
    C,
    HW,
    stride_n,
    stride_c,
    stride_hw,
    ACT: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """out = act(a * (x - mean) + b) (centred first: no cancellation when |mean| >> std).

    Grid: (N * cdiv(C, BLOCK_C), cdiv(HW, BLOCK_HW)). In place is safe: each element is read and written
    by the same program.

    References: csrc/include/cond_instance_norm_math.h (fwd_element).
    """
    acc_ty = mean_ptr.dtype.element_ty
    pc, mask_c, offs, mask = _tile(C, HW, stride_n, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    mean = _column(mean_ptr, pc, mask_c)
    a = _column(a_ptr, pc, mask_c)
    b = _column(b_ptr, pc, mask_c)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    out = _act(a * (x - mean) + b, ACT, IS_F64)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---- backward ---------------------------------------------------------------------------------------------------


@triton.jit
def _cond_instance_norm_bwd_reduce_kernel(
    grad_out_ptr,  # (N, C, H, W) x's layout
    x_ptr,  # (N, C, H, W) NCHW or NHWC
    mean_ptr,  # (N, C) contiguous
    a_ptr,  # (N, C) contiguous (read only for ELU)
    b_ptr,  # (N, C) contiguous (read only for ELU)
    g1_ptr,  # (N, C) out: G1 = sum_hw g
    g2_ptr,  # (N, C) out: G2 = sum_hw g * (x - mean)
    C,
    HW,
    stride_n,
    stride_c,
    stride_hw,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per-plane sums of g = dL/dpre = grad_out * act'(pre): G1 = sum_hw g, G2 = sum_hw g * (x - mean).

    Grid: (N * cdiv(C, BLOCK_C),); loops over H*W with [BLOCK_C, BLOCK_HW] accumulators.

    References: csrc/include/cond_instance_norm_math.h (bwd_pre_grad).
    """
    acc_ty = mean_ptr.dtype.element_ty
    n, offs_c, mask_c = _channel_block(C, BLOCK_C)
    pc = n * C + offs_c
    mean = _column(mean_ptr, pc, mask_c)
    if ACT != 0:
        a = _column(a_ptr, pc, mask_c)
        b = _column(b_ptr, pc, mask_c)
    rows = n * stride_n + offs_c[:, None] * stride_c
    acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    acc2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    for hw0 in range(0, HW, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        offs = rows + offs_hw[None, :] * stride_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        xc = tl.where(mask, x - mean, 0.0)
        if ACT != 0:
            g = g * _act_grad(a * xc + b, ACT)
        acc1 += g
        acc2 += g * xc
    tl.store(g1_ptr + pc, tl.sum(acc1, axis=1), mask=mask_c)
    tl.store(g2_ptr + pc, tl.sum(acc2, axis=1), mask=mask_c)


@triton.jit
def _cond_instance_norm_bwd_coef_kernel(
    g1_ptr,  # (N, C) contiguous: G1
    g2_ptr,  # (N, C) contiguous: G2
    rstd_ptr,  # (N, C) contiguous
    muhat_ptr,  # (N, C) contiguous
    ms_ptr,  # (2, N): m, s
    gamma_ptr,  # (N, C) strided
    alpha_ptr,  # (N, C) strided, or a placeholder when not HAS_ALPHA
    dgamma_ptr,  # (N, C) out, contiguous
    dalpha_ptr,  # (N, C) out, contiguous (unused when not HAS_ALPHA)
    dbeta_ptr,  # (N, C) out, contiguous (unused when not HAS_BETA)
    k_a_ptr,  # (N, C) out: A
    k_b_ptr,  # (N, C) out: B
    k_d_ptr,  # (N, C) out: D
    N,
    C,
    HW,
    stride_gn,
    stride_gc,
    stride_an,
    stride_ac,
    HAS_ALPHA: tl.constexpr,
    HAS_BETA: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r"""Parameter gradients and the dx coefficients of one sample:
    dbeta = G1, dgamma = rstd G2 + muhat alpha G1, dalpha = gamma muhat G1, dmuhat = alpha gamma G1,
    :math:`d\mu = s\,(d\hat\mu - \operatorname{mean}_c d\hat\mu - \hat\mu \sum_c d\hat\mu\,\hat\mu / (C-1))`,
    A = gamma rstd, B = -gamma rstd^3 G2 / HW, D = (dmean - gamma rstd G1) / HW, so that
    dx = A g + B (x - mean) + D. Grid: (N,); loops over C in BLOCK_C blocks.

    References: csrc/include/cond_instance_norm_math.h (bwd_param_grads, bwd_dmean, bwd_dx_coef).
    """
    acc_ty = rstd_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    row = n * C
    hw = _float(HW, acc_ty)
    sum_d = tl.zeros([BLOCK_C], dtype=acc_ty)
    sum_dm = tl.zeros([BLOCK_C], dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        g1 = tl.load(g1_ptr + row + offs, mask=mask, other=0.0)
        g2 = tl.load(g2_ptr + row + offs, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row + offs, mask=mask, other=0.0)
        dgamma = rstd * g2
        if HAS_ALPHA:
            gamma = tl.load(gamma_ptr + n * stride_gn + offs * stride_gc, mask=mask, other=0.0)
            alpha = tl.load(alpha_ptr + n * stride_an + offs * stride_ac, mask=mask, other=0.0)
            muhat = tl.load(muhat_ptr + row + offs, mask=mask, other=0.0)
            dgamma = dgamma + muhat * alpha * g1
            tl.store(dalpha_ptr + row + offs, gamma * muhat * g1, mask=mask)
            dmuhat = alpha * gamma * g1
            sum_d += dmuhat
            sum_dm += dmuhat * muhat
        tl.store(dgamma_ptr + row + offs, dgamma, mask=mask)
        if HAS_BETA:
            tl.store(dbeta_ptr + row + offs, g1, mask=mask)
    if HAS_ALPHA:
        s = tl.load(ms_ptr + N + n)
        mean_d = _div(tl.sum(sum_d, axis=0), _float(C, acc_ty), IS_F64)
        proj = _div(tl.sum(sum_dm, axis=0), _float(C - 1, acc_ty), IS_F64)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        g1 = tl.load(g1_ptr + row + offs, mask=mask, other=0.0)
        g2 = tl.load(g2_ptr + row + offs, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row + offs, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + n * stride_gn + offs * stride_gc, mask=mask, other=0.0)
        dmean = tl.zeros([BLOCK_C], dtype=acc_ty)
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + n * stride_an + offs * stride_ac, mask=mask, other=0.0)
            muhat = tl.load(muhat_ptr + row + offs, mask=mask, other=0.0)
            dmean = s * (alpha * gamma * g1 - mean_d - muhat * proj)
        tl.store(k_a_ptr + row + offs, gamma * rstd, mask=mask)
        tl.store(k_b_ptr + row + offs, -_div(gamma * rstd * rstd * rstd * g2, hw, IS_F64), mask=mask)
        tl.store(k_d_ptr + row + offs, _div(dmean - gamma * rstd * g1, hw, IS_F64), mask=mask)


@triton.jit
def _cond_instance_norm_bwd_apply_kernel(
    grad_out_ptr,  # (N, C, H, W) x's layout
    x_ptr,  # (N, C, H, W) NCHW or NHWC
    grad_x_ptr,  # (N, C, H, W) out, x's dtype and layout
    mean_ptr,  # (N, C) contiguous
    a_ptr,  # (N, C) contiguous (read only for ELU)
    b_ptr,  # (N, C) contiguous (read only for ELU)
    k_a_ptr,  # (N, C) contiguous: A
    k_b_ptr,  # (N, C) contiguous: B
    k_d_ptr,  # (N, C) contiguous: D
    C,
    HW,
    stride_n,
    stride_c,
    stride_hw,
    ACT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """grad_x = A * g + B * (x - mean) + D with g = grad_out * act'(a * (x - mean) + b).

    Grid: (N * cdiv(C, BLOCK_C), cdiv(HW, BLOCK_HW)).

    References: csrc/include/cond_instance_norm_math.h (bwd_element).
    """
    acc_ty = mean_ptr.dtype.element_ty
    pc, mask_c, offs, mask = _tile(C, HW, stride_n, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    mean = _column(mean_ptr, pc, mask_c)
    k_a = _column(k_a_ptr, pc, mask_c)
    k_b = _column(k_b_ptr, pc, mask_c)
    k_d = _column(k_d_ptr, pc, mask_c)
    xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty) - mean
    g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    if ACT != 0:
        a = _column(a_ptr, pc, mask_c)
        b = _column(b_ptr, pc, mask_c)
        g = g * _act_grad(a * xc + b, ACT)
    grad_x = k_a * g + k_b * xc + k_d
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


# ---- forward-mode (jvp) -----------------------------------------------------------------------------------------


@triton.jit
def _cond_instance_norm_jvp_reduce_kernel(
    x_t_ptr,  # (N, C, H, W) x's layout: the tangent of x
    x_ptr,  # (N, C, H, W) NCHW or NHWC
    mean_ptr,  # (N, C) contiguous
    t1_ptr,  # (N, C) out: T1 = sum_hw x_t
    t2_ptr,  # (N, C) out: T2 = sum_hw (x - mean) * x_t
    C,
    HW,
    stride_n,
    stride_c,
    stride_hw,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per-plane sums of the input tangent: T1 = sum_hw x_t, T2 = sum_hw (x - mean) * x_t.

    Grid: (N * cdiv(C, BLOCK_C),); loops over H*W with [BLOCK_C, BLOCK_HW] accumulators.

    References: csrc/include/cond_instance_norm_math.h (jvp_plane_tangents).
    """
    acc_ty = mean_ptr.dtype.element_ty
    n, offs_c, mask_c = _channel_block(C, BLOCK_C)
    pc = n * C + offs_c
    mean = _column(mean_ptr, pc, mask_c)
    rows = n * stride_n + offs_c[:, None] * stride_c
    acc1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    acc2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=acc_ty)
    for hw0 in range(0, HW, BLOCK_HW):
        offs_hw = hw0 + tl.arange(0, BLOCK_HW)
        mask = mask_c[:, None] & (offs_hw < HW)[None, :]
        offs = rows + offs_hw[None, :] * stride_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        v = tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(acc_ty)
        acc1 += v
        acc2 += tl.where(mask, x - mean, 0.0) * v
    tl.store(t1_ptr + pc, tl.sum(acc1, axis=1), mask=mask_c)
    tl.store(t2_ptr + pc, tl.sum(acc2, axis=1), mask=mask_c)


@triton.jit
def _cond_instance_norm_jvp_coef_kernel(
    t1_ptr,  # (N, C) contiguous: T1 (unused when not HAS_XT)
    t2_ptr,  # (N, C) contiguous: T2 (unused when not HAS_XT)
    mean_ptr,  # (N, C) contiguous
    rstd_ptr,  # (N, C) contiguous
    muhat_ptr,  # (N, C) contiguous
    ms_ptr,  # (2, N): m, s
    gamma_ptr,  # (N, C) strided
    alpha_ptr,  # (N, C) strided, or a placeholder when not HAS_ALPHA
    gamma_t_ptr,  # (N, C) strided, or a placeholder when not HAS_GT
    alpha_t_ptr,  # (N, C) strided, or a placeholder when not HAS_AT
    beta_t_ptr,  # (N, C) strided, or a placeholder when not HAS_BT
    k_p_ptr,  # (N, C) out: P
    k_q_ptr,  # (N, C) out: Q
    k_r_ptr,  # (N, C) out: R
    N,
    C,
    HW,
    stride_gn,
    stride_gc,
    stride_an,
    stride_ac,
    stride_gtn,
    stride_gtc,
    stride_atn,
    stride_atc,
    stride_btn,
    stride_btc,
    HAS_ALPHA: tl.constexpr,
    HAS_XT: tl.constexpr,
    HAS_GT: tl.constexpr,
    HAS_AT: tl.constexpr,
    HAS_BT: tl.constexpr,
    IS_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r"""Tangent coefficients of one sample, so that dpre = P x_t + Q (x - mean) + R:
    dmean = T1 / HW, drstd = -rstd^3 T2 / HW, dm = mean_c dmean,
    :math:`ds = -\tfrac{s^3}{2} \cdot \tfrac{2}{C-1} \sum_c (\mu - m)(d\mu - dm)`,
    dmuhat = (dmean - dm) s + (mean - m) ds, P = gamma rstd, Q = gamma_t rstd + gamma drstd,
    R = gamma_t muhat alpha + gamma (dmuhat alpha + muhat alpha_t - dmean rstd) + beta_t.
    Grid: (N,); loops over C in BLOCK_C blocks.

    References: csrc/include/cond_instance_norm_math.h (jvp_channel_mean_tangents, jvp_coef).
    """
    acc_ty = rstd_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64)
    row = n * C
    hw = _float(HW, acc_ty)
    MIX: tl.constexpr = HAS_ALPHA and HAS_XT  # the channel-mean tangents dm, ds are nonzero
    if MIX:
        m = tl.load(ms_ptr + n)
        s = tl.load(ms_ptr + N + n)
        acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            acc += _div(tl.load(t1_ptr + row + offs, mask=offs < C, other=0.0), hw, IS_F64)
        dm = _div(tl.sum(acc, axis=0), _float(C, acc_ty), IS_F64)
        acc = tl.zeros([BLOCK_C], dtype=acc_ty)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            mask = offs < C
            dmean = _div(tl.load(t1_ptr + row + offs, mask=mask, other=0.0), hw, IS_F64)
            mean = tl.load(mean_ptr + row + offs, mask=mask, other=0.0)
            acc += tl.where(mask, (mean - m) * (dmean - dm), 0.0)
        dv = _div(2.0 * tl.sum(acc, axis=0), _float(C - 1, acc_ty), IS_F64)
        ds = -0.5 * s * s * s * dv
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        rstd = tl.load(rstd_ptr + row + offs, mask=mask, other=0.0)
        gamma = tl.load(gamma_ptr + n * stride_gn + offs * stride_gc, mask=mask, other=0.0)
        q = tl.zeros([BLOCK_C], dtype=acc_ty)
        r = tl.zeros([BLOCK_C], dtype=acc_ty)  # R / gamma, before the gamma_t and beta_t terms
        if HAS_XT:
            dmean = _div(tl.load(t1_ptr + row + offs, mask=mask, other=0.0), hw, IS_F64)
            t2 = tl.load(t2_ptr + row + offs, mask=mask, other=0.0)
            q = gamma * -_div(rstd * rstd * rstd * t2, hw, IS_F64)
            r = -(dmean * rstd)
        if HAS_ALPHA:
            alpha = tl.load(alpha_ptr + n * stride_an + offs * stride_ac, mask=mask, other=0.0)
            muhat = tl.load(muhat_ptr + row + offs, mask=mask, other=0.0)
            if MIX:
                mean = tl.load(mean_ptr + row + offs, mask=mask, other=0.0)
                dmuhat = (dmean - dm) * s + (mean - m) * ds
                r = dmuhat * alpha + r
            if HAS_AT:
                alpha_t = tl.load(alpha_t_ptr + n * stride_atn + offs * stride_atc, mask=mask, other=0.0)
                r = r + muhat * alpha_t
        r = gamma * r
        if HAS_GT:
            gamma_t = tl.load(gamma_t_ptr + n * stride_gtn + offs * stride_gtc, mask=mask, other=0.0)
            q = gamma_t * rstd + q
            if HAS_ALPHA:
                r = gamma_t * (muhat * alpha) + r
        if HAS_BT:
            r = r + tl.load(beta_t_ptr + n * stride_btn + offs * stride_btc, mask=mask, other=0.0)
        tl.store(k_p_ptr + row + offs, gamma * rstd, mask=mask)
        tl.store(k_q_ptr + row + offs, q, mask=mask)
        tl.store(k_r_ptr + row + offs, r, mask=mask)


@triton.jit
def _cond_instance_norm_jvp_apply_kernel(
    x_t_ptr,  # (N, C, H, W) x's layout, or a placeholder when not HAS_XT
    x_ptr,  # (N, C, H, W) NCHW or NHWC
    out_t_ptr,  # (N, C, H, W) out, x's dtype and layout
    mean_ptr,  # (N, C) contiguous
    a_ptr,  # (N, C) contiguous (read only for ELU)
    b_ptr,  # (N, C) contiguous (read only for ELU)
    k_p_ptr,  # (N, C) contiguous: P
    k_q_ptr,  # (N, C) contiguous: Q
    k_r_ptr,  # (N, C) contiguous: R
    C,
    HW,
    stride_n,
    stride_c,
    stride_hw,
    ACT: tl.constexpr,
    HAS_XT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """out_t = act'(a * (x - mean) + b) * (P * x_t + Q * (x - mean) + R).

    Grid: (N * cdiv(C, BLOCK_C), cdiv(HW, BLOCK_HW)).

    References: csrc/include/cond_instance_norm_math.h (jvp_element).
    """
    acc_ty = mean_ptr.dtype.element_ty
    pc, mask_c, offs, mask = _tile(C, HW, stride_n, stride_c, stride_hw, BLOCK_C, BLOCK_HW)
    mean = _column(mean_ptr, pc, mask_c)
    k_q = _column(k_q_ptr, pc, mask_c)
    k_r = _column(k_r_ptr, pc, mask_c)
    xc = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_ty) - mean
    dpre = k_q * xc + k_r
    if HAS_XT:
        k_p = _column(k_p_ptr, pc, mask_c)
        dpre = k_p * tl.load(x_t_ptr + offs, mask=mask, other=0.0).to(acc_ty) + dpre
    if ACT != 0:
        a = _column(a_ptr, pc, mask_c)
        b = _column(b_ptr, pc, mask_c)
        dpre = _act_grad(a * xc + b, ACT) * dpre
    tl.store(out_t_ptr + offs, dpre.to(out_t_ptr.dtype.element_ty), mask=mask)


# ---- launchers --------------------------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    N: int
    C: int
    HW: int
    channels_last: bool
    stride_n: int
    stride_c: int
    stride_hw: int
    BLOCK_C: int  # elementwise / reduction tiles: [BLOCK_C, BLOCK_HW]
    BLOCK_HW: int
    num_warps: int
    BLOCK_C_COEF: int  # per-sample coefficient kernels: C in blocks of this many


_TILE = 2048  # elements per [BLOCK_C, BLOCK_HW] tile: 16 per thread at 4 warps


def _geometry(x: torch.Tensor) -> _Geometry:
    N, C, H, W = x.shape
    HW = H * W
    if x.is_contiguous():
        channels_last = False
    elif x.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        raise ValueError("x: expected a contiguous or channels_last tensor")
    c2, hw2 = triton.next_power_of_2(C), triton.next_power_of_2(HW)
    if channels_last:  # contiguous along C: a warp reads rows of up to 32 channels
        block_c = min(c2, 32)
        block_hw = min(hw2, max(_TILE // block_c, 1), 1024)
        strides = (1, C)
    else:  # contiguous along H*W: long rows, and several planes per tile when the planes are small
        block_hw = min(hw2, 1024)
        block_c = min(c2, max(_TILE // block_hw, 1), 32)
        strides = (HW, 1)
    num_warps = 4 if block_c * block_hw >= 512 else (2 if block_c * block_hw >= 128 else 1)
    return _Geometry(N, C, HW, channels_last, C * HW, *strides, block_c, block_hw, num_warps, min(c2, 1024))


def _in_layout(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """t itself if the kernels can address it with x's strides, else a copy in x's layout."""
    fmt = torch.channels_last if geo.channels_last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _act_code(act: str) -> int:
    if act not in _ACTS:
        raise ValueError(f"act: expected 'none' or 'elu', got {act!r}")
    return _ACTS[act]


def _rows(p: torch.Tensor | None, acc: torch.dtype, placeholder: torch.Tensor):
    """(pointer tensor, stride 0, stride 1) of an (N, C) parameter; a placeholder (never read) when None."""
    if p is None:
        return placeholder, 0, 0
    p = p.to(acc)
    return p, p.stride(0), p.stride(1)


def _check_alpha(alpha, C: int) -> None:
    if alpha is not None and C < 2:
        raise ValueError(
            f"alpha: mean reinjection needs at least 2 channels (the variance across channel "
            f"means divides by C - 1), got C = {C}"
        )


def _stats(x: torch.Tensor, geo: _Geometry, eps: float, mean: torch.Tensor, rstd: torch.Tensor) -> None:
    _cond_instance_norm_stats_kernel[(geo.N * triton.cdiv(geo.C, geo.BLOCK_C),)](
        x,
        mean,
        rstd,
        geo.C,
        geo.HW,
        geo.stride_n,
        geo.stride_c,
        geo.stride_hw,
        EPS=float(eps),
        IS_F64=mean.dtype == torch.float64,
        BLOCK_C=geo.BLOCK_C,
        BLOCK_HW=geo.BLOCK_HW,
        num_warps=geo.num_warps,
    )


class _FwdCoef(NamedTuple):
    a: torch.Tensor  # (N, C)
    b: torch.Tensor  # (N, C)
    muhat: torch.Tensor  # (N, C)
    ms: torch.Tensor  # (2, N): m, s


def _fwd_coef(geo: _Geometry, gamma, alpha, beta, mean, rstd, eps: float) -> _FwdCoef:
    acc = mean.dtype
    coef = torch.empty((3, geo.N, geo.C), dtype=acc, device=mean.device)
    ms = torch.empty((2, geo.N), dtype=acc, device=mean.device)
    g, sgn, sgc = _rows(gamma, acc, mean)
    a_, san, sac = _rows(alpha, acc, mean)
    b_, sbn, sbc = _rows(beta, acc, mean)
    _cond_instance_norm_fwd_coef_kernel[(geo.N,)](
        mean,
        rstd,
        g,
        a_,
        b_,
        coef[0],
        coef[1],
        coef[2],
        ms,
        geo.N,
        geo.C,
        sgn,
        sgc,
        san,
        sac,
        sbn,
        sbc,
        EPS=float(eps),
        HAS_ALPHA=alpha is not None,
        HAS_BETA=beta is not None,
        IS_F64=acc == torch.float64,
        BLOCK_C=geo.BLOCK_C_COEF,
        num_warps=4,
    )
    return _FwdCoef(coef[0], coef[1], coef[2], ms)


def _apply_grid(geo: _Geometry):
    return (geo.N * triton.cdiv(geo.C, geo.BLOCK_C), triton.cdiv(geo.HW, geo.BLOCK_HW))


def _reduce_grid(geo: _Geometry):
    return (geo.N * triton.cdiv(geo.C, geo.BLOCK_C),)


def _fwd_into(x, gamma, alpha, beta, eps, act, out, mean, rstd) -> None:
    geo = _geometry(x)
    code = _act_code(act)
    _check_alpha(alpha, geo.C)
    _stats(x, geo, eps, mean, rstd)
    k = _fwd_coef(geo, gamma, alpha, beta, mean, rstd, eps)
    _cond_instance_norm_fwd_apply_kernel[_apply_grid(geo)](
        x,
        out,
        mean,
        k.a,
        k.b,
        geo.C,
        geo.HW,
        geo.stride_n,
        geo.stride_c,
        geo.stride_hw,
        ACT=code,
        IS_F64=mean.dtype == torch.float64,
        BLOCK_C=geo.BLOCK_C,
        BLOCK_HW=geo.BLOCK_HW,
        num_warps=geo.num_warps,
    )


def fwd(x, gamma, alpha, beta, eps: float, act: str):
    """(out, mean, rstd): out = act(gamma * (xhat + alpha * muhat) + beta) in x's dtype and layout;
    mean, rstd (N, C) per-plane statistics in the accumulation dtype."""
    acc = _acc_dtype(x)
    out = torch.empty_like(x)
    mean = torch.empty(x.shape[:2], dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    if x.numel():
        _fwd_into(x, gamma, alpha, beta, eps, act, out, mean, rstd)
    return out, mean, rstd


def fwd_out(x, gamma, alpha, beta, eps: float, act: str, out) -> None:
    """fwd into the preallocated ``out`` (x's shape, dtype and layout; may be x itself)."""
    if not x.numel():
        return
    acc = _acc_dtype(x)
    mean = torch.empty(x.shape[:2], dtype=acc, device=x.device)
    rstd = torch.empty_like(mean)
    geo = _geometry(x)
    target = out if out is x or _in_layout(out, geo) is out else torch.empty_like(x)
    _fwd_into(x, gamma, alpha, beta, eps, act, target, mean, rstd)
    if target is not out:
        out.copy_(target)


def bwd(grad_out, x, gamma, alpha, beta, mean, rstd, eps: float, act: str):
    """(grad_x, grad_gamma, grad_alpha, grad_beta); grad_alpha / grad_beta are empty when alpha / beta is None."""
    acc = _acc_dtype(x)
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    grad_x = torch.empty_like(x)
    grad_gamma = torch.empty_like(mean)
    grad_alpha = torch.empty_like(mean) if alpha is not None else mean.new_empty(0)
    grad_beta = torch.empty_like(mean) if beta is not None else mean.new_empty(0)
    if not x.numel():
        return grad_x, grad_gamma.zero_(), grad_alpha.zero_(), grad_beta.zero_()
    geo = _geometry(x)
    code = _act_code(act)
    _check_alpha(alpha, geo.C)
    grad_out = _in_layout(grad_out, geo)
    is_f64 = acc == torch.float64
    k = _fwd_coef(geo, gamma, alpha, beta, mean, rstd, eps)
    sums = torch.empty((2, geo.N, geo.C), dtype=acc, device=x.device)
    _cond_instance_norm_bwd_reduce_kernel[_reduce_grid(geo)](
        grad_out,
        x,
        mean,
        k.a,
        k.b,
        sums[0],
        sums[1],
        geo.C,
        geo.HW,
        geo.stride_n,
        geo.stride_c,
        geo.stride_hw,
        ACT=code,
        BLOCK_C=geo.BLOCK_C,
        BLOCK_HW=geo.BLOCK_HW,
        num_warps=geo.num_warps,
    )
    coef = torch.empty((3, geo.N, geo.C), dtype=acc, device=x.device)
    g, sgn, sgc = _rows(gamma, acc, mean)
    a_, san, sac = _rows(alpha, acc, mean)
    _cond_instance_norm_bwd_coef_kernel[(geo.N,)](
        sums[0],
        sums[1],
        rstd,
        k.muhat,
        k.ms,
        g,
        a_,
        grad_gamma,
        grad_alpha if alpha is not None else mean,
        grad_beta if beta is not None else mean,
        coef[0],
        coef[1],
        coef[2],
        geo.N,
        geo.C,
        geo.HW,
        sgn,
        sgc,
        san,
        sac,
        HAS_ALPHA=alpha is not None,
        HAS_BETA=beta is not None,
        IS_F64=is_f64,
        BLOCK_C=geo.BLOCK_C_COEF,
        num_warps=4,
    )
    _cond_instance_norm_bwd_apply_kernel[_apply_grid(geo)](
        grad_out,
        x,
        grad_x,
        mean,
        k.a,
        k.b,
        coef[0],
        coef[1],
        coef[2],
        geo.C,
        geo.HW,
        geo.stride_n,
        geo.stride_c,
        geo.stride_hw,
        ACT=code,
        BLOCK_C=geo.BLOCK_C,
        BLOCK_HW=geo.BLOCK_HW,
        num_warps=geo.num_warps,
    )
    return grad_x, grad_gamma, grad_alpha, grad_beta


def jvp(x, gamma, alpha, beta, mean, rstd, x_t, gamma_t, alpha_t, beta_t, eps: float, act: str):
    """The output tangent for tangents x_t (x's shape), gamma_t, alpha_t, beta_t ((N, C)); None means zero."""
    acc = _acc_dtype(x)
    mean, rstd = mean.to(acc).contiguous(), rstd.to(acc).contiguous()
    out_t = torch.empty_like(x)
    if not x.numel():
        return out_t
    geo = _geometry(x)
    code = _act_code(act)
    _check_alpha(alpha, geo.C)
    alpha_t = alpha_t if alpha is not None else None  # no alpha, no alpha term
    is_f64 = acc == torch.float64
    k = _fwd_coef(geo, gamma, alpha, beta, mean, rstd, eps)
    sums = torch.empty((2, geo.N, geo.C), dtype=acc, device=x.device)
    if x_t is not None:
        x_t = _in_layout(x_t, geo)
        _cond_instance_norm_jvp_reduce_kernel[_reduce_grid(geo)](
            x_t,
            x,
            mean,
            sums[0],
            sums[1],
            geo.C,
            geo.HW,
            geo.stride_n,
            geo.stride_c,
            geo.stride_hw,
            BLOCK_C=geo.BLOCK_C,
            BLOCK_HW=geo.BLOCK_HW,
            num_warps=geo.num_warps,
        )
    coef = torch.empty((3, geo.N, geo.C), dtype=acc, device=x.device)
    g, sgn, sgc = _rows(gamma, acc, mean)
    a_, san, sac = _rows(alpha, acc, mean)
    gt, sgtn, sgtc = _rows(gamma_t, acc, mean)
    at, satn, satc = _rows(alpha_t, acc, mean)
    bt, sbtn, sbtc = _rows(beta_t, acc, mean)
    _cond_instance_norm_jvp_coef_kernel[(geo.N,)](
        sums[0],
        sums[1],
        mean,
        rstd,
        k.muhat,
        k.ms,
        g,
        a_,
        gt,
        at,
        bt,
        coef[0],
        coef[1],
        coef[2],
        geo.N,
        geo.C,
        geo.HW,
        sgn,
        sgc,
        san,
        sac,
        sgtn,
        sgtc,
        satn,
        satc,
        sbtn,
        sbtc,
        HAS_ALPHA=alpha is not None,
        HAS_XT=x_t is not None,
        HAS_GT=gamma_t is not None,
        HAS_AT=alpha_t is not None,
        HAS_BT=beta_t is not None,
        IS_F64=is_f64,
        BLOCK_C=geo.BLOCK_C_COEF,
        num_warps=4,
    )
    _cond_instance_norm_jvp_apply_kernel[_apply_grid(geo)](
        x_t if x_t is not None else x,
        x,
        out_t,
        mean,
        k.a,
        k.b,
        coef[0],
        coef[1],
        coef[2],
        geo.C,
        geo.HW,
        geo.stride_n,
        geo.stride_c,
        geo.stride_hw,
        ACT=code,
        HAS_XT=x_t is not None,
        BLOCK_C=geo.BLOCK_C,
        BLOCK_HW=geo.BLOCK_HW,
        num_warps=geo.num_warps,
    )
    return out_t
