"""Exact likelihood under the VPSDE's probability-flow ODE: score_sde's implementation vs fastscore.likelihood.

Cases (float32 networks, random weights, VPSDE(0.1, 20), ``eps = 1e-5``, one Rademacher probe):
(a) "MLP": fastscore's ScoreMLP (2-D toy data, 128-wide, time-conditioned, score = net / std(t) as score_sde's
    scale_by_sigma), a batch of 256 points, score_sde's tolerances (rtol = atol = 1e-5);
(b) "NCSNv2": ncsnv2's NCSNv2 (CIFAR-10 config, ngf 32, 32x32 RGB) as an epsilon-predictor at a fixed noise
    level (score = net(x, y) sigma_y / std(t): the time enters through the SDE only, so the ODE is smooth in t),
    a batch of 2 images, loose tolerances (rtol = atol = 1e-3) so that one likelihood takes seconds.

Providers:
- "eager": score_sde's ``likelihood.get_likelihood_fn`` re-expressed (docs/numerics.md#likelihood): the state
  flattened into a float64 NumPy vector for ``scipy.integrate.solve_ivp(method="RK45")``, every evaluation
  copying it to torch float32 and back, the drift computed twice (once without grad for the state
  derivative, once with grad inside the divergence) plus one backward pass; one error norm over the whole
  batch. Reference layers (ncsnv2's formulation) for the NCSNv2.
- "fastscore": :func:`fastscore.likelihood.log_likelihood`: RK45 on tensors with per-sample error control,
  finished samples leave the batch, one network pass per evaluation for drift and divergence (``mode="auto"``,
  forward-mode products, for the NCSNv2; ``mode="reverse"`` for the MLP, where forward-mode AD's per-op
  overhead outweighs the tiny network); fused layers and channels_last for the NCSNv2.
- "fastscore_joint" (MLP only): the same with ``per_sample=False`` (score_sde's joint error control), to show
  how much of the gain is the per-sample control.
Every provider uses the same probes. Agreement: the log-likelihoods agree within 2e-3 nats per dimension plus
10 tol relative (the solvers differ in error control, so they agree to their tolerance, not bitwise). Below
the table: the evaluations (nfe) and single-sample evaluations each provider spent.

    pytest bench/bench_likelihood.py --benchmark-only     # pytest-benchmark, grouped by case
    fastscore bench likelihood [--quick]                   # the ratio table
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from fastscore.likelihood import log_likelihood
from fastscore.models import NCSNv2
from fastscore.models import ScoreMLP
from fastscore.models import get_config
from fastscore.models import get_sigmas
from fastscore.ops.hutchinson import make_probes
from fastscore.sde import VPSDE

try:  # run as part of the installed package (fastscore bench) or by pytest from the source tree
    from fastscore._bench import _harness
except ImportError:  # pragma: no cover
    import _harness

OP = "likelihood"
SEED = 2024
EPS = 1e-5
CASES = {
    # mode: how fastscore takes the divergence products. Forward-mode AD (the default "auto", measured
    # faster through the fused NCSNv2) costs a fixed per-op overhead that dominates a tiny MLP: reverse there.
    "MLP": dict(batch=256, tol=1e-5, mode="reverse"),
    "NCSNv2": dict(batch=2, tol=1e-3, mode="auto"),
}
QUICK_CASES = ["MLP", "NCSNv2"]


# ---- score_sde's likelihood (likelihood.py), re-expressed ------------------------------------------------------


def score_sde_likelihood(score_fn, sde, data, epsilon, *, rtol, atol, eps=EPS, method="RK45"):
    """score_sde_pytorch ``likelihood.get_likelihood_fn(...)(model, data)`` with the probe ``epsilon`` given
    (score_sde draws it inside); returns (log-likelihood in nats (N,), nfe). Its bpd is ``-logp / ln 2 / D +
    offset``."""
    from scipy import integrate

    def drift_fn(x, t):
        rsde = sde.reverse(score_fn, probability_flow=True)
        return rsde.sde(x, t)[0]

    def div_fn(x, t, eps_probe):
        with torch.enable_grad():
            x.requires_grad_(True)
            fn_eps = torch.sum(drift_fn(x, t) * eps_probe)
            grad_fn_eps = torch.autograd.grad(fn_eps, x)[0]
        x.requires_grad_(False)
        return torch.sum(grad_fn_eps * eps_probe, dim=tuple(range(1, len(x.shape))))

    def to_flattened_numpy(x):
        return x.detach().cpu().numpy().reshape((-1,))

    def from_flattened_numpy(x, shape):
        return torch.from_numpy(x.reshape(shape))

    with torch.no_grad():
        shape = data.shape

        def ode_func(t, x):
            sample = from_flattened_numpy(x[: -shape[0]], shape).to(data.device).type(torch.float32)
            vec_t = torch.ones(sample.shape[0], device=sample.device) * t
            drift = to_flattened_numpy(drift_fn(sample, vec_t))
            logp_grad = to_flattened_numpy(div_fn(sample, vec_t, epsilon))
            return np.concatenate([drift, logp_grad], axis=0)

        init = np.concatenate([to_flattened_numpy(data), np.zeros((shape[0],))], axis=0)
        solution = integrate.solve_ivp(ode_func, (eps, sde.T), init, rtol=rtol, atol=atol, method=method)
        zp = solution.y[:, -1]
        z = from_flattened_numpy(zp[: -shape[0]], shape).to(data.device).type(torch.float32)
        delta_logp = from_flattened_numpy(zp[-shape[0] :], (shape[0],)).to(data.device).type(torch.float32)
        prior_logp = sde.prior_logp(z)
        return (prior_logp + delta_logp).double(), solution.nfev


# ---- the workloads ----------------------------------------------------------------------------------------------


def mlp_case(device="cpu"):
    sde = VPSDE()
    torch.manual_seed(0)
    net = ScoreMLP(2, 128, time_embedding=True).to(device).eval()

    def score_fn(x, t):
        return net(x, t) / sde.marginal_prob(x, t)[1][:, None]

    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([[5.0, 5.0], [-5.0, -5.0]]) / 5.0  # the NCSN toy mixture, scaled to unit range
    pick = (torch.rand(CASES["MLP"]["batch"], generator=gen) < 0.8).long()
    x = (centers[1 - pick] + 0.2 * torch.randn(CASES["MLP"]["batch"], 2, generator=gen)).to(device)
    return sde, {"eager": score_fn, "fastscore": score_fn, "fastscore_joint": score_fn}, x


def ncsnv2_case(device="cpu"):
    sde = VPSDE()
    config = get_config("cifar10")
    config.model.ngf = 32
    torch.manual_seed(0)
    ref = NCSNv2(config, layers="reference").to(device).eval()
    fused = NCSNv2(config, layers="fused").to(device)
    fused.load_state_dict(ref.state_dict())
    fused = fused.to(memory_format=torch.channels_last).eval()
    sigmas = get_sigmas(config).to(device)
    level = len(sigmas) // 2
    sigma = sigmas[level].item()

    def make(model, channels_last):
        def score_fn(x, t):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            labels = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
            std = sde.marginal_prob(x, t)[1]
            return model(x, labels) * (sigma / std)[:, None, None, None]

        return score_fn

    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(CASES["NCSNv2"]["batch"], 3, 32, 32, generator=gen) * 2 - 1).to(device)
    return sde, {"eager": make(ref, False), "fastscore": make(fused, True)}, x


BUILD = {"MLP": mlp_case, "NCSNv2": ncsnv2_case}


def providers(name, device="cpu"):
    """name -> zero-argument callables returning (logp (N,) float64, nfe, single-sample evaluations)."""
    sde, score_fns, x = BUILD[name](device)
    tol, mode = CASES[name]["tol"], CASES[name]["mode"]
    probes = make_probes(x, 1, "rademacher", seed=SEED)  # (1, N, ...): every provider integrates the same probe
    out = {}
    if "eager" in score_fns:

        def eager(fn=score_fns["eager"]):
            logp, nfe = score_sde_likelihood(fn, sde, x, probes[0], rtol=tol, atol=tol)
            return logp, nfe, nfe * x.shape[0]

        out["eager"] = eager
    for pname, per_sample in (("fastscore", True), ("fastscore_joint", False)):
        if pname not in score_fns:
            continue

        def run(fn=score_fns[pname], per_sample=per_sample):
            logp, info = log_likelihood(
                fn, sde, x, rtol=tol, atol=tol, eps=EPS, seed=SEED, per_sample=per_sample, mode=mode, return_info=True
            )
            return logp, info.nfe, info.sample_evals

        out[pname] = run
    return out, x[0].numel()


def check_agree(D, tol):
    """The providers' log-likelihoods agree to their solvers' accuracy: 2e-3 nats per dimension plus 10 tol
    relative (the two error controls stop at different points within the tolerance; at rtol = 1e-3 the
    integrated divergence of a random NCSNv2, thousands of nats, may differ by tens of nats)."""

    def check(results):
        want = results["eager"][0]
        for name, (logp, _, _) in results.items():
            bound = 2e-3 * D + 10 * tol * want.abs()
            worst = ((logp - want).abs() / bound).max().item()
            assert worst < 1, f"likelihood: {name} differs from eager by {worst:.2f} x the bound {bound.max():.3g} nats"

    return check


def measure(name, *, rounds, device="cpu"):
    """Check agreement (that call is the warm-up), then time the providers interleaved; each provider's nfe."""
    fns, D = providers(name, device)
    first = {pname: fn() for pname, fn in fns.items()}
    check_agree(D, CASES[name]["tol"])(first)
    times = _harness.time_interleaved(fns, rounds=rounds, warmup=0, device=device)
    med = {p: statistics.median(ts) for p, ts in times.items()}
    rows = []
    label = f"{name} b{CASES[name]['batch']} tol{CASES[name]['tol']:g}"
    for p, ts in times.items():
        ratios = {"eager": med["eager"] / med[p]} if p != "eager" else {}
        q20, q80 = _harness._quantile(ts, 0.2) * 1e3, _harness._quantile(ts, 0.8) * 1e3
        rows.append(_harness.Row(label, p, med[p] * 1e3, q20, q80, ratios))
    nfe = {p: (r[1], r[2]) for p, r in first.items()}
    return rows, nfe


def run(quick=False, device="cpu", rounds=None, record=True, csv_path=None):
    """`fastscore bench likelihood`: the ratio table, then each provider's evaluation counts."""
    rows, counts = [], []
    rounds = rounds or (2 if quick else 3)
    for name in QUICK_CASES if quick else list(CASES):
        r, nfe = measure(name, rounds=rounds, device=device)
        rows.extend(r)
        counts.append((name, nfe))
    where = f"{_harness.device_name(device)} (torch {torch.__version__}; medians of {rounds} rounds)"
    title = f"fastscore bench {OP} on {where}"
    print(_harness.format_table(title, rows), flush=True)
    for name, nfe in counts:
        print(
            f"{name}: network evaluations (nfe) / single-sample evaluations: "
            + ", ".join(f"{p} {a} / {b}" for p, (a, b) in nfe.items())
            + " (eager evaluates the network twice per nfe)"
        )
    if record:
        print(f"results appended to {_harness.append_results(OP, rows, device=device, quick=quick, path=csv_path)}")
    return rows


# ---- pytest-benchmark: `pytest bench/bench_likelihood.py --benchmark-only` -------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("provider", ["eager", "fastscore"])
def test_likelihood(benchmark, name, provider):
    benchmark.group = f"{OP} {name}"
    fn = providers(name)[0][provider]
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


if __name__ == "__main__":  # pragma: no cover
    start = time.perf_counter()
    run(quick=False)
    print(f"({time.perf_counter() - start:.0f} s)")
