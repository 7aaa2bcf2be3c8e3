"""fastscore.ode.solve_ivp: the adaptive Runge-Kutta on tensors, against scipy.integrate.solve_ivp.

Per-sample control must give each sample scipy's solution and scipy's evaluation count for that sample
alone; joint control (per_sample=False) must give scipy's result on the flattened batch.
"""

import math

import numpy as np
import pytest
import torch

from fastscore.ode import METHODS
from fastscore.ode import NonFiniteError
from fastscore.ode import solve_ivp

scipy_integrate = pytest.importorskip("scipy.integrate")

F64 = torch.float64


def _oscillators(n: int = 6):
    """A batch of forced nonlinear oscillators with frequencies spread 10x: very different step needs."""
    k = torch.linspace(0.5, 5.0, n, dtype=F64)

    def fn(t, y, index):
        kk = k[index]
        return torch.stack([y[:, 1], -(kk**2) * torch.sin(y[:, 0]) * (1 + 0.1 * torch.cos(t))], dim=1)

    def fn_np(i):
        kk = k[i].item()
        return lambda t, y: np.array([y[1], -(kk**2) * math.sin(y[0]) * (1 + 0.1 * math.cos(t))])

    y0 = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    return fn, fn_np, y0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("t_span", [(0.0, 3.0), (2.0, -1.0)], ids=["forward", "backward"])
def test_per_sample_matches_scipy_alone(method, t_span):
    fn, fn_np, y0 = _oscillators()
    res = solve_ivp(fn, t_span, y0, rtol=1e-6, atol=1e-8, method=method, indexed=True)
    S = len(METHODS[method].C)
    for i in range(y0.shape[0]):
        ref = scipy_integrate.solve_ivp(fn_np(i), t_span, y0[i].numpy(), method=method, rtol=1e-6, atol=1e-8)
        assert ref.success
        np.testing.assert_allclose(res.y[i].numpy(), ref.y[:, -1], rtol=1e-9, atol=1e-11, err_msg=f"sample {i}")
        # the same step sequence: the same count, up to one attempt should rounding flip a decision
        assert abs(int(res.nfe_per_sample[i]) - ref.nfev) <= S, (i, int(res.nfe_per_sample[i]), ref.nfev)
    assert res.nfe == int(res.nfe_per_sample.max())  # the batch runs as long as its slowest sample
    assert res.sample_evals == int(res.nfe_per_sample.sum())
    assert res.sample_evals < res.nfe * y0.shape[0]  # finished samples stopped costing
    assert torch.all(res.n_steps > 0) and torch.all(res.n_rejected >= 0)


@pytest.mark.parametrize("method", list(METHODS))
def test_joint_matches_scipy_on_flattened_batch(method):
    fn, _, y0 = _oscillators()
    N = y0.shape[0]
    index = torch.arange(N)

    def flat(t, y):
        return fn(torch.full((N,), t, dtype=F64), torch.from_numpy(y).view(N, 2), index).reshape(-1).numpy()

    ref = scipy_integrate.solve_ivp(flat, (0.0, 3.0), y0.reshape(-1).numpy(), method=method, rtol=1e-6, atol=1e-8)
    res = solve_ivp(fn, (0.0, 3.0), y0, rtol=1e-6, atol=1e-8, method=method, per_sample=False, indexed=True)
    np.testing.assert_allclose(res.y.reshape(-1).numpy(), ref.y[:, -1], rtol=1e-9, atol=1e-11)
    assert abs(res.nfe - ref.nfev) <= len(METHODS[method].C)
    assert torch.all(res.nfe_per_sample == res.nfe) and res.sample_evals == res.nfe * N


def test_first_step_max_step_and_images_shape():
    # (N, C, H, W) state, exponential decay with per-element rates; first_step and max_step as scipy's
    rates = torch.linspace(0.1, 3.0, 12, dtype=F64).view(1, 3, 2, 2)
    y0 = torch.ones(2, 3, 2, 2, dtype=F64)
    y0[1] *= 2.0

    def fn(t, y):
        return -rates * y

    res = solve_ivp(fn, (0.0, 2.0), y0, rtol=1e-7, atol=1e-9, first_step=1e-3, max_step=0.1)
    ref = scipy_integrate.solve_ivp(
        lambda t, y: -rates.reshape(-1).numpy() * y, (0.0, 2.0), y0[0].reshape(-1).numpy(),
        rtol=1e-7, atol=1e-9, first_step=1e-3, max_step=0.1,
    )  # fmt: skip
    assert res.y.shape == y0.shape
    np.testing.assert_allclose(res.y[0].reshape(-1).numpy(), ref.y[:, -1], rtol=1e-10, atol=1e-12)
    assert int(res.nfe_per_sample[0]) == ref.nfev
    torch.testing.assert_close(res.y, y0 * torch.exp(-rates * 2.0), rtol=1e-6, atol=1e-8)


def test_float32_state():
    y0 = torch.tensor([[1.0], [0.5], [-2.0]])
    res = solve_ivp(lambda t, y: -y * t[:, None].to(y.dtype), (0.0, 1.5), y0, rtol=1e-5, atol=1e-7)
    assert res.y.dtype == torch.float32
    torch.testing.assert_close(res.y, y0 * math.exp(-(1.5**2) / 2), rtol=2e-5, atol=1e-6)


def test_finished_samples_leave_the_batch_and_results_do_not_depend_on_it():
    """An easy sample finishes early and is no longer evaluated; a sample's result alone equals its result
    in the batch (up to rounding of the batched arithmetic)."""
    k = torch.tensor([0.1, 8.0], dtype=F64)
    sizes = []

    def fn(t, y, index):
        sizes.append(y.shape[0])
        kk = k[index]
        return torch.stack([y[:, 1], -(kk**2) * y[:, 0]], dim=1)

    y0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64)
    res = solve_ivp(fn, (0.0, 4.0), y0, rtol=1e-8, atol=1e-10, indexed=True)
    assert res.nfe_per_sample[0] < res.nfe_per_sample[1] // 4
    assert sizes[0] == 2 and sizes[-1] == 1 and sizes == sorted(sizes, reverse=True)
    assert res.sample_evals == sum(sizes)
    exact = torch.stack([torch.cos(4 * k), -k * torch.sin(4 * k)], dim=1)
    torch.testing.assert_close(res.y, exact, rtol=1e-6, atol=1e-6)
    for i in range(2):
        alone = solve_ivp(
            lambda t, y, index, i=i: fn(t, y, index + i), (0.0, 4.0), y0[i : i + 1], rtol=1e-8, atol=1e-10, indexed=True
        )
        torch.testing.assert_close(alone.y[0], res.y[i], rtol=1e-12, atol=1e-14)
        assert int(alone.nfe_per_sample[0]) == int(res.nfe_per_sample[i])


def test_callback_reports_progress():
    seen = []
    y0 = torch.ones(3, 1, dtype=F64)
    solve_ivp(lambda t, y: -y, (1.0, 0.0), y0, callback=lambda t: seen.append(t.clone()))
    assert seen and all(s.shape == (3,) for s in seen)
    assert torch.all(seen[-1] == 0.0) and torch.all(seen[0] <= 1.0)


def test_trivial_span_and_empty_batch():
    y0 = torch.randn(2, 3, dtype=F64)
    calls = []
    res = solve_ivp(lambda t, y: calls.append(1) or y, (0.5, 0.5), y0)
    assert torch.equal(res.y, y0) and res.y is not y0 and res.nfe == 0 and not calls
    res = solve_ivp(lambda t, y: y, (0.0, 1.0), torch.empty(0, 3, dtype=F64))
    assert res.y.shape == (0, 3) and res.nfe == 0


def test_blow_up_raises_step_too_small():
    # y' = y^2, y(0) = 1 has the solution 1 / (1 - t), singular at t = 1: scipy stops there too
    ref = scipy_integrate.solve_ivp(lambda t, y: y**2, (0.0, 2.0), [1.0])
    assert ref.status == -1
    with pytest.raises(RuntimeError, match="step size fell below"):
        solve_ivp(lambda t, y: y**2, (0.0, 2.0), torch.ones(1, 1, dtype=F64))


def test_non_finite_fn_or_y0_stops_within_one_step_attempt():
    """A NaN or Inf from fn used to make t NaN and loop forever; it must stop the step attempt it appears
    in. fn refuses to be called more than 60 times, so a solver that does not stop fails quickly."""
    calls = []

    def fn(t, y):
        calls.append(1)
        assert len(calls) <= 60, "the solver kept calling fn instead of stopping"
        return torch.where(t[:, None] > 0.3, math.inf, -y)

    y0 = torch.ones(3, 2, dtype=F64)
    with pytest.raises(NonFiniteError, match=r"fn returned NaN or Inf for sample\(s\) \[0, 1, 2\]") as info:
        solve_ivp(fn, (0.0, 1.0), y0)
    assert info.value.samples == [0, 1, 2] and all(0.3 < t <= 1.0 for t in info.value.t)
    n_before = len(calls)
    calls.clear()
    with pytest.raises(NonFiniteError):
        solve_ivp(fn, (0.0, 1.0), y0, per_sample=False)
    assert len(calls) <= n_before + len(METHODS["RK45"].C)
    calls.clear()
    with pytest.raises(NonFiniteError, match=r"at t = \[0.0, 0.0\]"):
        solve_ivp(lambda t, y: fn(t, y) * math.nan, (0.0, 1.0), y0[:2])
    assert len(calls) == 1  # the first evaluation: no step is tried
    y0[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"y0: expected finite values, got NaN or Inf in sample\(s\) \[1\]"):
        solve_ivp(fn, (0.0, 1.0), y0)


def _fn(t, y):
    return -y


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(fn=3), TypeError, "fn"),
        (dict(t_span=1.0), TypeError, "t_span"),
        (dict(t_span=(0.0, math.nan)), ValueError, r"t_span\[1\]"),
        (dict(y0=[1.0, 2.0]), TypeError, "y0"),
        (dict(y0=torch.ones(2, 2, dtype=torch.int64)), TypeError, "y0"),
        (dict(y0=torch.tensor(1.0)), ValueError, "y0"),
        (dict(rtol=0.0), ValueError, "rtol"),
        (dict(atol=-1.0), ValueError, "atol"),
        (dict(rtol="1e-3"), TypeError, "rtol"),
        (dict(method="Euler"), ValueError, "method"),
        (dict(first_step=5.0), ValueError, "first_step"),
        (dict(first_step=-1e-3), ValueError, "first_step"),
        (dict(max_step=0.0), ValueError, "max_step"),
        (dict(per_sample=1), TypeError, "per_sample"),
        (dict(fn=lambda t, y: y[:, :1]), ValueError, "fn"),
        (dict(fn=lambda t, y: 1.0), TypeError, "fn"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    y0 = torch.ones(2, 2, dtype=F64)
    args = dict(fn=_fn, t_span=(0.0, 1.0), y0=y0)
    args.update(kwargs)
    fn, t_span, y = args.pop("fn"), args.pop("t_span"), args.pop("y0")
    with pytest.raises(error, match=match):
        solve_ivp(fn, t_span, y, **args)
    assert torch.equal(y0, torch.ones(2, 2, dtype=F64))
