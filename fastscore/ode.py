r"""Adaptive explicit Runge-Kutta on torch tensors, with per-sample error control, and the probability-flow
ODE sampler.

score_sde integrates the probability-flow ODE with ``scipy.integrate.solve_ivp(..., method="RK45")`` over the
whole batch flattened into one float64 NumPy vector: every evaluation copies the batch device -> host -> device,
and one error norm over the batch sets one step size for every sample, so the batch takes as many evaluations
as its hardest sample (and a sample's result depends on the batch it shares). :func:`solve_ivp` here keeps the
state on the tensors' device and gives every sample its own time, step size and error norm:

- the method is scipy's: the same Dormand-Prince 5(4) tableau (``RK45``; also Bogacki-Shampine 3(2),
  ``RK23``), first-same-as-last, the RMS error norm with ``scale = atol + rtol * max(|y|, |y_new|)``, the step
  controller (safety 0.9, factor bounds 0.2 and 10, no growth right after a rejection, the minimum step
  ``10 * ulp(t)``) and the initial-step heuristic of Hairer, Norsett & Wanner, applied to each sample alone.
  A sample's trajectory, and its number of evaluations, are those scipy computes for that sample alone (up
  to the rounding of the arithmetic's order);
- all samples still active run the same stage together, each with its own ``t`` and ``h`` (a vector of
  times is passed to ``fn``); a rejected sample retries while accepted ones move on;
- finished samples leave the batch: ``fn`` only sees the active samples (the state is compacted when a
  sample finishes, so a finished sample costs nothing afterwards);
- the controller's decisions are tensor operations; the only host synchronisation is one small read per
  step attempt of the batch (how many samples finished, whether a step became too small, whether ``fn``
  returned a NaN or Inf), not one per evaluation, plus a read of y0 and one after each of the two initial
  evaluations.

``per_sample=False`` reproduces score_sde's joint control instead: one error norm over the whole batch, one
step size (then the results equal ``scipy.integrate.solve_ivp`` on the flattened batch).

Non-finite values stop the solver with a :class:`NonFiniteError` at the end of the step attempt in which they
appear (before the first step when the initial evaluations hold them): a NaN or Inf returned by ``fn`` would
otherwise make the error norm, the step size and then ``t`` NaN, and a NaN step size never falls below the
minimum step, so the loop would never end. ``y0`` must be finite (a ValueError otherwise).

:func:`ode_sampler` integrates the probability-flow ODE of an SDE (fastscore.sde) from ``T`` to ``eps`` with it
(score_sde's ``get_ode_sampler``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastscore import _validate
from fastscore import noise as noise_lib
from fastscore import sde as sde_lib
from fastscore._progress import Progress
from fastscore._validate import check_score
from fastscore._validate import checked_score_fn

__all__ = ["solve_ivp", "ODEResult", "NonFiniteError", "ode_sampler", "ODESamplerInfo", "METHODS"]

# ---- Butcher tableaus (scipy.integrate._ivp.rk) --------------------------------------------------------------


@dataclass(frozen=True)
class _Tableau:
    C: tuple[float, ...]  # stage times, (S,)
    A: tuple[tuple[float, ...], ...]  # stage weights, (S, S), strictly lower triangular
    B: tuple[float, ...]  # solution weights, (S,)
    E: tuple[float, ...]  # error weights over the S stages and f(t + h, y_new), (S + 1,)
    error_order: int  # order of the embedded error estimator: the error scales as h^(error_order + 1)

    @property
    def n_stages(self) -> int:
        return len(self.C)


_RK45 = _Tableau(
    C=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0),
    A=(
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        (1 / 5, 0.0, 0.0, 0.0, 0.0, 0.0),
        (3 / 40, 9 / 40, 0.0, 0.0, 0.0, 0.0),
        (44 / 45, -56 / 15, 32 / 9, 0.0, 0.0, 0.0),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0.0, 0.0),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0.0),
    ),
    B=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    E=(-71 / 57600, 0.0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40),
    error_order=4,
)
_RK23 = _Tableau(
    C=(0.0, 1 / 2, 3 / 4),
    A=((0.0, 0.0, 0.0), (1 / 2, 0.0, 0.0), (0.0, 3 / 4, 0.0)),
    B=(2 / 9, 1 / 3, 4 / 9),
    E=(5 / 72, -1 / 12, -1 / 9, 1 / 8),
    error_order=2,
)
METHODS = {"RK45": _RK45, "RK23": _RK23}

SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0  # scipy's step controller


class NonFiniteError(RuntimeError):
    """The integration met a NaN or Inf. ``samples``: the positions in the batch of the samples concerned,
    ``t``: the time of each one's first non-finite value."""

    def __init__(self, message: str, samples: list[int], t: list[float]):
        super().__init__(message)
        self.samples, self.t = samples, t


@dataclass
class ODEResult:
    """What :func:`solve_ivp` returns.

    ``y``: the solution at ``t_span[1]``, y0's shape and dtype. ``nfe``: calls of ``fn`` (each on the samples
    still active; the counterpart of scipy's ``nfev`` for the batch). ``nfe_per_sample`` (N,): evaluations
    each sample took part in -- scipy's ``nfev`` for that sample solved alone. ``sample_evals``: the sum over
    calls of the batch size passed to ``fn`` (the work done, in single-sample evaluations; ``nfe * N`` with
    joint control). ``n_steps`` / ``n_rejected`` (N,): accepted and rejected steps per sample."""

    y: Tensor
    nfe: int
    nfe_per_sample: Tensor
    sample_evals: int
    n_steps: Tensor
    n_rejected: Tensor


def _power(base: Tensor, exponent: float) -> Tensor:
    """``base ** exponent`` per element (base >= 0; 0 gives 0 or inf, NaN stays NaN) as ``exp(exponent *
    log(base))``: on the CPU, ATen's ``pow`` gives the elements past a tensor's last full vector to a scalar
    routine that rounds differently, so a sample's step size would depend on its position in the batch (and a
    shard of a run would not reproduce the run: docs/distributed.md#what-is-bitwise); ``exp`` and ``log`` are
    computed alike at every position. Within a few float64 ulps of ``pow``: step-size factors."""
    return torch.exp(torch.log(base) * exponent)


def _rms(v: Tensor) -> Tensor:
    """scipy's norm (RMS over all elements) per row of a (B, M) tensor."""
    return v.square().mean(dim=1).sqrt()


def _combine(weights: Tensor, K: Tensor, n: int) -> Tensor:
    """sum_j weights[j] K[j] over the first n stages: (B, M) from K (>= n, B, M)."""
    B, M = K.shape[1], K.shape[2]
    return (weights[:n] @ K[:n].reshape(n, B * M)).reshape(B, M)


def _check_solver_args(fn, t_span, y0, rtol, atol, method, first_step, max_step):
    _validate.function(fn, "fn")
    try:
        t0, t1 = t_span
    except (TypeError, ValueError):
        raise TypeError(f"t_span: expected a pair (t0, t1) of numbers, got {t_span!r}") from None
    t0, t1 = _validate.number(t0, "t_span[0]"), _validate.number(t1, "t_span[1]")
    _validate.batch(y0, "y0")
    rtol = _validate.number(rtol, "rtol", low=0.0, strict=True)
    atol = _validate.number(atol, "atol", low=0.0)
    _validate.choice(method, "method", tuple(METHODS))
    if first_step is not None:
        first_step = _validate.number(first_step, "first_step", low=0.0, strict=True)
        if first_step > abs(t1 - t0):
            raise ValueError(f"first_step: expected at most |t1 - t0| = {abs(t1 - t0)}, got {first_step}")
    max_step = _validate.number(max_step, "max_step", low=0.0, strict=True, allow_inf=True)
    # scipy raises rtol below 100 machine epsilons of float64 to that value (with a warning); so do we.
    rtol = max(rtol, 100 * torch.finfo(torch.float64).eps)
    return t0, t1, rtol, atol, first_step, max_step


def solve_ivp(
    fn: Callable[..., Tensor],
    t_span,
    y0: Tensor,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    method: str = "RK45",
    per_sample: bool = True,
    first_step: float | None = None,
    max_step: float = math.inf,
    indexed: bool = False,
    callback: Callable[[Tensor], None] | None = None,
) -> ODEResult:
    r"""Solve :math:`dy/dt = fn(t, y)` from ``t_span[0]`` to ``t_span[1]`` for a batch of initial values y0
    (N, ...), each sample with its own adaptive step (see the module docstring); returns an :class:`ODEResult`.

    ``fn(t, y)`` gets ``t`` (B,) float64 and ``y`` (B, ...) in y0's dtype for the B samples still active and
    returns dy/dt of y's shape (cast to y0's dtype). With ``indexed=True`` it is called ``fn(t, y, index)``,
    ``index`` (B,) int64 giving each row's position in y0 (for per-sample constants such as fixed probes).
    ``rtol``, ``atol``, ``method`` (``"RK45"`` or ``"RK23"``), ``first_step`` and ``max_step`` mean what
    they mean to ``scipy.integrate.solve_ivp``; ``per_sample=False`` controls the batch as one vector (one
    step size for all, score_sde's behaviour). ``callback(t)``, when given, is called after each step attempt
    with the times (N,) reached so far (a progress report). Integrate in float64 for scipy's precision: the
    state's dtype is y0's. Raises RuntimeError when a sample's step falls below ``10 * ulp(t)`` (scipy's
    "required step size is less than spacing between numbers"), :class:`NonFiniteError` (a RuntimeError)
    naming the samples and times when ``fn`` returns a NaN or Inf, within the step attempt it happens in,
    and ValueError when y0 holds one.
    """
    t0, t1, rtol, atol, first_step, max_step = _check_solver_args(
        fn, t_span, y0, rtol, atol, method, first_step, max_step
    )
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample: expected a bool, got {type(per_sample).__name__}")
    tab = METHODS[method]
    N, shape = y0.shape[0], tuple(y0.shape[1:])
    device, dtype = y0.device, y0.dtype
    M = math.prod(shape)
    if N == 0 or M == 0 or t0 == t1:
        zeros = torch.zeros(N, dtype=torch.int64, device=device)
        return ODEResult(y0.clone(), 0, zeros, 0, zeros.clone(), zeros.clone())

    _validate.finite(y0, "y0")

    counts = {"nfe": 0, "sample_evals": 0}
    # Samples whose fn output held a NaN or Inf, and the time of the first such output: set without a host
    # read, checked with the read each step attempt makes (and after each of the initial evaluations). Over the
    # active samples (per-sample control) or the whole batch (joint control).
    watch = {
        "bad": torch.zeros(N, dtype=torch.bool, device=device),
        "t": torch.zeros(N, dtype=torch.float64, device=device),
    }

    def note(t: Tensor, out: Tensor) -> None:
        bad = _validate.nonfinite_rows(out)
        watch["t"] = torch.where(bad & ~watch["bad"], t, watch["t"])
        watch["bad"] = watch["bad"] | bad

    if per_sample:
        G, width = N, M  # G groups (controlled units) of `width` state elements

        def call(t: Tensor, y: Tensor, index: Tensor) -> Tensor:
            B = y.shape[0]
            args = (t, y.view((B,) + shape)) + ((index,) if indexed else ())
            out = fn(*args)
            _check_output(out, (B,) + shape)
            counts["nfe"] += 1
            counts["sample_evals"] += B
            note(t, out)
            return out.reshape(B, M)
    else:
        G, width = 1, N * M
        all_index = torch.arange(N, device=device)

        def call(t: Tensor, y: Tensor, index: Tensor) -> Tensor:
            args = (t.expand(N), y.view((N,) + shape)) + ((all_index,) if indexed else ())
            out = fn(*args)
            _check_output(out, (N,) + shape)
            counts["nfe"] += 1
            counts["sample_evals"] += N
            note(t.expand(N), out)
            return out.reshape(1, N * M)

    def stop_if_nonfinite(index: Tensor) -> None:
        """Raise NonFiniteError for the samples watch["bad"] marks (positions in y0: index maps the active
        groups back under per-sample control). Called only once a host read has found some."""
        bad = watch["bad"].nonzero()[:, 0]
        where = (index[bad] if per_sample else bad).tolist()
        times = watch["t"][bad].tolist()
        raise NonFiniteError(
            f"solve_ivp: fn returned NaN or Inf for sample(s) {_validate.some(where)} at t = {_validate.some(times)}",
            where,
            times,
        )

    f64 = torch.float64
    direction = 1.0 if t1 > t0 else -1.0
    A = torch.tensor(tab.A, dtype=f64, device=device).to(dtype)
    Bw = torch.tensor(tab.B, dtype=f64, device=device).to(dtype)
    Ew = torch.tensor(tab.E, dtype=f64, device=device).to(dtype)
    S = tab.n_stages
    expo = -1.0 / (tab.error_order + 1)
    init_evals = 1 if first_step is not None else 2

    # The active set, compacted as samples finish: index (positions in the full batch), y, f = fn(t, y), t,
    # h_abs, rejected (inside a retry loop: scipy's step_rejected), steps, rejections.
    out = y0.detach().reshape(G, width).clone()
    index = torch.arange(G, device=device)
    y = out.clone()
    t = torch.full((G,), t0, dtype=f64, device=device)
    f = call(t, y, index).to(dtype)
    if bool(watch["bad"].any()):  # before a step size (and then a time) is computed from it
        stop_if_nonfinite(index)
    h_abs = (
        torch.full((G,), first_step, dtype=f64, device=device)
        if first_step is not None
        else _initial_step(call, t, y, f, index, abs(t1 - t0), direction, tab.error_order, rtol, atol, max_step)
    )
    if bool(watch["bad"].any()):  # the initial-step heuristic's evaluation
        stop_if_nonfinite(index)
    rejected = torch.zeros(G, dtype=torch.bool, device=device)
    steps = torch.zeros(G, dtype=torch.int64, device=device)
    rejections = torch.zeros(G, dtype=torch.int64, device=device)
    K = torch.empty((S + 1, G, width), dtype=dtype, device=device)
    n_attempts = torch.zeros(G, dtype=torch.int64, device=device)  # full batch: attempts made by each group
    n_steps = torch.zeros(G, dtype=torch.int64, device=device)
    n_rej = torch.zeros(G, dtype=torch.int64, device=device)
    t_all = torch.full((G,), t0, dtype=f64, device=device)
    attempts = 0
    inf = torch.tensor(direction * math.inf, dtype=f64, device=device)

    while y.shape[0]:
        attempts += 1
        # scipy's _step_impl: at the start of a step (not on a retry) clamp h to [min_step, max_step].
        min_step = 10 * (torch.nextafter(t, inf) - t).abs()
        fresh = ~rejected
        h_abs = torch.where(fresh & (h_abs > max_step), torch.full_like(h_abs, max_step), h_abs)
        h_abs = torch.where(fresh & (h_abs < min_step), min_step, h_abs)
        t_new = t + h_abs * direction
        t_new = torch.where(direction * (t_new - t1) > 0, torch.full_like(t_new, t1), t_new)
        h = t_new - t
        h_abs = h.abs()
        h_col = h.to(dtype)[:, None]

        K[0].copy_(f)
        for s in range(1, S):
            stage = torch.addcmul(y, _combine(A[s], K, s), h_col)
            K[s].copy_(call(t + tab.C[s] * h, stage, index))
        y_new = torch.addcmul(y, _combine(Bw, K, S), h_col)
        K[S].copy_(call(t_new, y_new, index))

        scale = atol + torch.maximum(y.abs(), y_new.abs()) * rtol
        err = _rms(_combine(Ew, K, S + 1) * h_col / scale).to(f64)
        accept = err < 1
        factor = SAFETY * _power(err, expo)
        grow = torch.where(err == 0, MAX_FACTOR, factor.clamp(max=MAX_FACTOR))
        grow = torch.where(rejected, grow.clamp(max=1.0), grow)
        # A NaN error norm (fn returned NaN) shrinks the step by the smallest factor, as scipy's max() does.
        shrink = factor.nan_to_num(MIN_FACTOR).clamp(min=MIN_FACTOR)
        h_abs = h_abs * torch.where(accept, grow, shrink)
        rejected = ~accept
        y = torch.where(accept[:, None], y_new, y)
        f = torch.where(accept[:, None], K[S], f)
        t = torch.where(accept, t_new, t)
        steps += accept
        rejections += rejected

        finished = accept & (direction * (t - t1) >= 0)
        # the retry loop's test, for the next attempt: scipy fails when a retried step falls below min_step
        # (a NaN step counts as too small: it could never pass the test otherwise)
        failed = rejected & ~(h_abs >= min_step)
        n_finished, n_failed, n_bad = torch.stack([finished.sum(), failed.sum(), watch["bad"].sum()]).tolist()
        if n_bad:  # the one sync per attempt (above) also reports non-finite fn outputs
            stop_if_nonfinite(index)
        if n_failed:
            bad = index[failed].tolist()
            raise RuntimeError(
                f"solve_ivp: the step size fell below 10 ulp of t for sample(s) {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''} at t = {t[failed][:10].tolist()} (fn stiff or not finite?)"
            )
        if callback is not None:
            t_all[index] = t
            callback(t_all if per_sample else t_all.expand(N))
        if n_finished:
            done = index[finished]
            out[done] = y[finished]
            n_attempts[done] = attempts
            n_steps[done] = steps[finished]
            n_rej[done] = rejections[finished]
            keep = ~finished
            index, y, f, t, h_abs = index[keep], y[keep], f[keep], t[keep], h_abs[keep]
            rejected, steps, rejections = rejected[keep], steps[keep], rejections[keep]
            if per_sample:
                watch["bad"], watch["t"] = watch["bad"][keep], watch["t"][keep]
            K = torch.empty((S + 1, y.shape[0], width), dtype=dtype, device=device)

    nfe_per = init_evals + S * n_attempts
    if not per_sample:
        nfe_per, n_steps, n_rej = nfe_per.expand(N).clone(), n_steps.expand(N).clone(), n_rej.expand(N).clone()
    return ODEResult(out.view(y0.shape), counts["nfe"], nfe_per, counts["sample_evals"], n_steps, n_rej)


def _check_output(out, shape: tuple[int, ...]) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"fn: expected fn(t, y) to return a tensor, got {type(out).__name__}")
    if tuple(out.shape) != shape:
        raise ValueError(f"fn: expected fn(t, y) to return y's shape {shape}, got {tuple(out.shape)}")


def _initial_step(call, t, y, f, index, interval, direction, order, rtol, atol, max_step) -> Tensor:
    """scipy's select_initial_step (Hairer, Norsett & Wanner, II.4) per row: one more evaluation."""
    f64 = torch.float64
    scale = atol + y.abs() * rtol
    d0 = _rms(y / scale).to(f64)
    d1 = _rms(f / scale).to(f64)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = h0.clamp(max=interval)
    y1 = torch.addcmul(y, f, (h0 * direction).to(y.dtype)[:, None])
    f1 = call(t + h0 * direction, y1, index).to(y.dtype)
    d2 = _rms((f1 - f) / scale).to(f64) / h0
    both_tiny = (d1 <= 1e-15) & (d2 <= 1e-15)
    h1 = torch.where(both_tiny, (h0 * 1e-3).clamp(min=1e-6), _power(0.01 / torch.maximum(d1, d2), 1.0 / (order + 1)))
    return torch.minimum(100 * h0, h1).clamp(max=min(interval, max_step))


# ---- the probability-flow ODE sampler ---------------------------------------------------------------------------


@dataclass
class ODESamplerInfo:
    """What ``ode_sampler(..., return_info=True)`` returns next to the samples: ``nfe`` (network calls, as
    score_sde's ``solution.nfev``, plus one for ``denoise``), ``nfe_per_sample`` (N,) (evaluations each sample
    took, without the denoising call), ``sample_evals`` (single-sample evaluations done: the work), and the
    accepted / rejected steps per sample."""

    nfe: int
    nfe_per_sample: Tensor
    sample_evals: int
    n_steps: Tensor
    n_rejected: Tensor


class _Progress:
    """Progress over the integration interval in thousandths, advanced to the least advanced sample
    (fastscore._progress: a bar on a terminal, whole lines with an ETA when stderr is a file or a pipe)."""

    def __init__(self, enabled: bool, t0: float, t1: float, desc: str):
        self.t0, self.span = t0, t1 - t0
        self.bar = Progress(1000, desc, unit="\u2030", enabled=enabled, leave=False, rate=False) if enabled else None

    def __call__(self, t: Tensor) -> None:
        if self.bar is None:
            return
        done = ((t - self.t0) / self.span).min().clamp(0, 1).item()
        self.bar.update(int(done * 1000) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def probability_flow_drift(sde, score_fn, t: Tensor, x: Tensor):
    r"""The probability-flow drift at times t (B,) as a function of x (B, ...): :math:`f_a(t)\,x - \tfrac12
    g(t)^2 s(x, t)`, what ``sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]`` computes, with the
    per-sample coefficients computed once per evaluation (not once per probe, nor through the generic
    wrapper's checks). SDEs without the linear-drift schedules (``drift_coef``, ``diffusion_coef``) go through
    ``reverse``."""
    if hasattr(sde, "drift_coef") and hasattr(sde, "diffusion_coef"):
        view = (t.shape[0],) + (1,) * (x.dim() - 1)
        a = torch.as_tensor(sde.drift_coef(t), dtype=x.dtype, device=x.device).expand(t.shape).reshape(view)
        c = (0.5 * torch.as_tensor(sde.diffusion_coef(t), dtype=x.dtype, device=x.device) ** 2).reshape(view)
        return lambda h: torch.addcmul(a * h, c, check_score(score_fn(h, t), h), value=-1.0)
    rsde = sde.reverse(checked_score_fn(score_fn), probability_flow=True)
    return lambda h: rsde.sde(h, t)[0]


class NonFiniteWatch:
    """Where a NaN or Inf first appeared inside a right-hand side (``score_fn``'s output, the divergence
    estimate), per sample of the batch: flags set without a host read, read only once the solver has
    stopped on a non-finite value, to say which it was."""

    def __init__(self, n: int, device):
        self.flags = {what: torch.zeros(n, dtype=torch.bool, device=device) for what in ("score", "divergence")}

    def note(self, what: str, values: Tensor, index: Tensor) -> None:
        self.flags[what][index] |= _validate.nonfinite_rows(values)

    def score_fn(self, score_fn, index: Tensor):
        """score_fn, noting its non-finite outputs for the rows ``index`` of the batch."""

        def noted(x, t):
            out = check_score(score_fn(x, t), x)
            self.note("score", out, index)
            return out

        return noted

    def explain(self, err: NonFiniteError, who: str) -> NonFiniteError:
        """The solver's error restated: what held the first NaN or Inf, at which times, for which samples."""
        rows = torch.tensor(err.samples, dtype=torch.int64)
        messages = {
            "score": "score_fn: returned NaN or Inf",
            "divergence": f"{who}: the divergence estimate became NaN or Inf (score_fn's output was finite)",
        }
        samples, times = err.samples, err.t
        message = (
            f"{who}: the probability-flow ODE's right-hand side became NaN or Inf although score_fn's output "
            "was finite (an overflow: the state or the score is too large)"
        )
        for what, flags in self.flags.items():
            hit = [k for k, flag in enumerate(flags.cpu()[rows].tolist()) if flag]
            if hit:
                samples, times = [err.samples[k] for k in hit], [err.t[k] for k in hit]
                message = messages[what]
                break
        where = f" ({who})" if message.startswith("score_fn") else ""
        some = _validate.some
        return NonFiniteError(f"{message} at t = {some(times)} for sample(s) {some(samples)}{where}", samples, times)


def integrate_probability_flow(
    rhs, t_span, start: Tensor, watch: NonFiniteWatch, who: str, *, rtol, atol, method, per_sample, progress
) -> ODEResult:
    """:func:`solve_ivp` (indexed) of ``rhs`` without autograd, with a progress report named ``who`` and a
    non-finite value restated by ``watch``: what :func:`ode_sampler` and fastscore.likelihood share."""
    bar = _Progress(progress, t_span[0], t_span[1], who)
    try:
        with torch.no_grad():
            return solve_ivp(
                rhs,
                t_span,
                start,
                rtol=rtol,
                atol=atol,
                method=method,
                per_sample=per_sample,
                indexed=True,
                callback=bar if progress else None,
            )
    except NonFiniteError as err:
        raise watch.explain(err, who) from None
    finally:
        bar.close()


def ode_sampler(
    score_fn,
    sde,
    shape,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    denoise: bool = False,
    seed: int | None = None,
    eps: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    x_init: Tensor | None = None,
    sample_offset: int = 0,
    per_sample: bool = True,
    state_dtype: torch.dtype = torch.float64,
    progress: bool = False,
    return_info: bool = False,
    noise=None,
):
    r"""Samples by integrating the probability-flow ODE :math:`dx/dt = f(x, t) - \tfrac12 g(t)^2 s(x, t)` of
    ``sde`` from ``T`` to ``eps`` with adaptive Runge-Kutta (score_sde's ``get_ode_sampler``).

    ``score_fn(x, t)``: x (B, ...) in ``dtype``, t (B,) in ``dtype``, for the samples still being integrated.
    ``shape`` (N, ...): the batch. The start is ``x_init`` if given (not modified), else a prior draw made
    as :func:`fastscore.sampling.pc_sampler` makes it: ``sde.prior_std`` times the counter-based normals of
    ``(seed, counter=2^62)`` at global sample index ``sample_offset + n`` (:func:`fastscore.ops.counter_randn`)
    on ``device`` in ``dtype`` -- so one seed gives the same start as the PC sampler's, and a sample's start
    does not depend on the batch it is in (``seed=None`` draws a seed from torch's default generator).
    ``rtol``/``atol``/``method`` as scipy's solve_ivp (``"RK45"`` or ``"RK23"``); the state is integrated in
    ``state_dtype`` (float64, as scipy does) and cast to ``dtype`` for ``score_fn``. ``per_sample`` (default):
    each sample has its own error control and step size and leaves the batch when it reaches ``eps``
    (``False``: one error norm over the batch, score_sde's behaviour). ``denoise``: one reverse-diffusion
    predictor step at ``t = eps`` keeping its mean (one more network call; for VE: :math:`x + \sigma_0^2
    s(x, \epsilon)`). Runs without autograd. ``noise``: where the prior draw comes from, as the samplers'
    ``noise=`` (fastscore.sampling): ``None`` (the counter-based generator above), a ``torch.Generator``
    (the start is then ``torch.randn(shape, generator=noise)`` times the prior std, as score_sde's
    ``prior_sampling`` draws it) or a callable ``noise(shape, dtype, device) -> Tensor``; unused with
    ``x_init``.

    ``score_fn`` must return x's shape, dtype and device (else an error naming it, as every sampler). A NaN
    or Inf stops the integration within the step it appears in: ``x_init`` is checked up front (ValueError),
    and a non-finite score gives a :class:`NonFiniteError` (a RuntimeError) naming ``score_fn``, the times
    and the samples.

    Returns the final batch (N, ...) in ``dtype``; with ``return_info=True`` the pair ``(samples,
    ODESamplerInfo)`` with the number of function evaluations.

    Deviations from score_sde: per-sample error control by default (score_sde's joint control with
    ``per_sample=False``); the prior is drawn from the counter-based generator (score_sde: torch's global CPU
    generator, which ``noise=torch.default_generator`` reproduces); no ``inverse_scaler`` (scale the output
    yourself); ``nfe`` counts the denoising call.
    """
    _validate.function(score_fn, "score_fn")
    sde = sde_lib.check_sde(sde)
    eps = sde_lib.sampling_eps(sde, eps)
    for name, v in (("denoise", denoise), ("per_sample", per_sample), ("progress", progress)):
        _validate.flag(v, name)
    _validate.float_dtype(dtype, "dtype")
    _validate.float_dtype(state_dtype, "state_dtype")
    given = noise_lib.source(noise)
    if x_init is not None:
        _validate.batch(x_init, "x_init")
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init: expected the batch shape {tuple(shape)}, got {tuple(x_init.shape)}")
        _validate.finite(x_init, "x_init")
        start = x_init.detach().to(device=device or x_init.device, dtype=state_dtype)
    else:
        shape = _validate.shape(shape)
        start = noise_lib.prior(
            sde, shape, seed=seed, sample_offset=sample_offset, given=given, dtype=dtype, device=device
        )
        start = start.to(state_dtype)
    watch = NonFiniteWatch(start.shape[0], start.device)

    def drift(t: Tensor, y: Tensor, index: Tensor) -> Tensor:
        x = y.to(dtype)
        return probability_flow_drift(sde, watch.score_fn(score_fn, index), t.to(dtype), x)(x)

    res = integrate_probability_flow(
        drift,
        (sde.T, eps),
        start,
        watch,
        "ode_sampler",
        rtol=rtol,
        atol=atol,
        method=method,
        per_sample=per_sample,
        progress=progress,
    )
    out = res.y.to(dtype)
    nfe = res.nfe
    if denoise:
        with torch.no_grad():
            t_eps = torch.full((out.shape[0],), eps, dtype=dtype, device=out.device)
            f, _ = sde.reverse(checked_score_fn(score_fn), probability_flow=False).discretize(out, t_eps)
        out = out - f
        nfe += 1
    if return_info:
        return out, ODESamplerInfo(nfe, res.nfe_per_sample, res.sample_evals, res.n_steps, res.n_rejected)
    return out
