"""Samplers: validation on distributions with exact scores, parity with the reference loops of ncsn / ncsnv2 /
score_sde (written out here, eager, with the same counter-based noise), no per-step allocation,
reproducibility and batch independence, argument checks."""

import math
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile

from fastscore import noise as noise_lib
from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore.data import ncsn_toy_mixture
from fastscore.ops import counter_randn

SEED = 1234


pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


# ---- the reference loops (ncsnv2's and ncsn's samplers, score_sde's PC sampler), noise from counter_randn ----


def noise(x, seed, counter):
    return counter_randn(x.shape, seed=seed, counter=counter, dtype=x.dtype)


def ncsnv2_annealed_langevin(score_fn, x, sigmas, n_steps_each, step_lr, seed, denoise=True):
    """ncsnv2's anneal_Langevin_dynamics: score first, then the noise; Tweedie denoising at the end."""
    counter = 0
    for c, sigma in enumerate(sigmas):
        labels = torch.full((x.shape[0],), c, dtype=torch.long)
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            grad = score_fn(x, labels)
            z = noise(x, seed, counter)
            counter += 1
            x = x + step_size * grad + z * math.sqrt(step_size * 2)
    if denoise:
        labels = torch.full((x.shape[0],), len(sigmas) - 1, dtype=torch.long)
        x = x + sigmas[-1] ** 2 * score_fn(x, labels)
    return x


def inpainting_reference(score_fn, x, known, mask, sigmas, n_steps_each, step_lr, seed, variant):
    """ncsn (draw the perturbed known part once per level, re-impose after each update) and ncsnv2 (re-draw
    it before every step, no re-imposition) with a general mask."""
    draws = 0
    counter = 0

    def perturbed(sigma):
        nonlocal draws
        z = counter_randn(x.shape, seed=SEED, counter=noise_lib.KNOWN_COUNTER + draws)
        draws += 1
        return known + sigma * z

    for c, sigma in enumerate(sigmas):
        labels = torch.full((x.shape[0],), c, dtype=torch.long)
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        if variant == "ncsn":
            k = perturbed(sigma)
            x = mask * k + (1 - mask) * x
        for _ in range(n_steps_each):
            if variant == "ncsnv2":
                x = mask * perturbed(sigma) + (1 - mask) * x
            grad = score_fn(x, labels)
            z = noise(x, seed, counter)
            counter += 1
            x = x + step_size * grad + z * math.sqrt(step_size * 2)
            if variant == "ncsn":
                x = mask * k + (1 - mask) * x
    return x


def score_sde_pc(score_fn, sde, x, predictor, corrector, snr, n_steps, denoise, eps, seed, batch_norm, draw=None):
    """score_sde's PC sampler: corrector(s), then the predictor, on linspace(T, eps, N). The Langevin corrector
    uses score_sde's batch means of the norms when batch_norm, else their expected values (the ALD step).
    ``draw(x)``, when given, makes the noise instead of counter_randn (score_sde: torch.randn_like)."""
    B, N = x.shape[0], sde.N
    ts = torch.linspace(sde.T, eps, N)
    rsde = sde.reverse(score_fn)
    dt = -1.0 / N
    counter = 0
    x_mean = x

    def normal(x, counter):
        return draw(x) if draw is not None else noise(x, seed, counter)

    for i in range(N):
        t = torch.ones(B) * ts[i]
        idx = (t * (N - 1) / sde.T).long()
        for _ in range(n_steps if corrector != "none" else 0):
            grad = score_fn(x, t)
            z = normal(x, counter)
            counter += 1
            a = torch.ones(B, dtype=torch.float64) if isinstance(sde, sde_lib.VESDE) else sde.alphas[idx].double()
            if corrector == "langevin" and batch_norm:
                g_norm = torch.norm(grad.reshape(B, -1), dim=-1).double().mean()
                z_norm = torch.norm(z.reshape(B, -1), dim=-1).double().mean()
                step = (snr * z_norm / g_norm) ** 2 * 2 * a
            else:
                std = sde.marginal_prob(x, t)[1].double()
                step = (snr * std) ** 2 * 2 * a
            x_mean = x + step[:, None].float() * grad
            x = x_mean + torch.sqrt(step * 2)[:, None].float() * z
        if predictor == "euler_maruyama":
            z = normal(x, counter)
            drift, diffusion = rsde.sde(x, t)
            x_mean = x + drift * dt
            x = x_mean + diffusion[:, None] * math.sqrt(-dt) * z
        elif predictor == "reverse_diffusion":
            f, G = rsde.discretize(x, t)
            z = normal(x, counter)
            x_mean = x - f
            x = x_mean + G[:, None] * z
        elif predictor == "ancestral" and isinstance(sde, sde_lib.VESDE):
            sigma = sde.discrete_sigmas[idx]
            adjacent = torch.where(idx == 0, torch.zeros_like(t), sde.discrete_sigmas[(idx - 1).clamp_min(0)])
            grad = score_fn(x, t)
            x_mean = x + grad * (sigma**2 - adjacent**2)[:, None]
            std = torch.sqrt((adjacent**2 * (sigma**2 - adjacent**2)) / (sigma**2))
            x = x_mean + std[:, None] * normal(x, counter)
        elif predictor == "ancestral":
            beta = sde.discrete_betas[idx]
            grad = score_fn(x, t)
            x_mean = (x + beta[:, None] * grad) / torch.sqrt(1.0 - beta)[:, None]
            x = x_mean + torch.sqrt(beta)[:, None] * normal(x, counter)
        else:
            x_mean = x
        counter += predictor != "none"
    return x_mean if denoise else x


# ---- scores -------------------------------------------------------------------------------------------------


class GaussianScore:
    """Exact score of N(mu, diag(var)) pushed through an SDE: N(m mu, m^2 var + s^2) at time t."""

    def __init__(self, sde, mu, var):
        self.sde, self.mu, self.var = sde, mu, var

    def __call__(self, x, t):
        m, s = self.sde.marginal_prob(torch.ones(x.shape[0], 1, dtype=x.dtype), t)
        return -(x - m * self.mu) / (m**2 * self.var + s[:, None] ** 2)


def level_score(sigmas):
    """score_fn(x, labels) of N(0, I) data perturbed with N(0, sigma^2 I): elementwise, batch independent."""
    sig = torch.as_tensor(sigmas, dtype=torch.float32)

    def score_fn(x, labels):
        return -x / (1.0 + sig[labels] ** 2).reshape((-1,) + (1,) * (x.dim() - 1))

    return score_fn


def sde_combinations():
    out = []
    for sde_name in ("ve", "vp", "subvp"):
        for predictor in sampling.PREDICTORS:
            for corrector in sampling.CORRECTORS:
                if predictor == "none" and corrector == "none":
                    continue
                if predictor == "ancestral" and sde_name == "subvp":
                    continue  # not defined (score_sde neither)
                if predictor == "none" and corrector != "none" and sde_name == "subvp":
                    # The Langevin correctors' step 2 (snr std(t))^2 with sub-VP's std (~ beta_0 t at small t,
                    # far below VP's) is too small to mix without a predictor in a test-sized budget.
                    continue
                out.append((sde_name, predictor, corrector))
    return out


def make_sde(name, N):
    if name == "ve":
        return sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=N)
    if name == "vp":
        return sde_lib.VPSDE(N=max(N, 25))  # beta_max / N must stay below 1
    return sde_lib.subVPSDE(N=max(N, 25))


# ---- validation against known results ---------------------------------------------------------------------


def test_ncsn_toy_langevin_keeps_initial_split_annealed_recovers_weights():
    """NCSN's toy experiment: 1,280 points from U[-8, 8]^2, exact scores. Plain Langevin (step 0.05 = the
    paper's lr 0.1, 1,000 steps) leaves each point in its starting basin; annealed Langevin (10 geometric
    sigmas 20 -> 1, 100 steps each, step_lr 0.05) restores the 0.8 / 0.2 weights. The tolerances are about 4
    binomial standard errors sqrt(p (1 - p) / 1280) ~ 0.011, plus the Langevin bias (exact-score runs over 3
    seeds gave 0.52-0.54 and 0.79-0.80)."""
    gmm = ncsn_toy_mixture()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(1280, 2, generator=g) * 16 - 8
    initial_split = (x0.sum(1) > 0).float().mean().item()

    plain = sampling.langevin(lambda x: gmm.score(x), x0, step_size=0.05, n_steps=1000, seed=SEED)
    frac_plain = (plain.sum(1) > 0).float().mean().item()
    assert abs(frac_plain - initial_split) < 0.05, (frac_plain, initial_split)
    assert frac_plain < 0.65, f"plain Langevin should not recover the 0.8 weight, got {frac_plain}"

    sigmas = torch.exp(torch.linspace(math.log(20.0), 0.0, 10))
    annealed = sampling.annealed_langevin(
        lambda x, labels: gmm.score(x, sigmas[labels]),
        x0,
        sigmas,
        n_steps_each=100,
        step_lr=0.05,
        denoise=False,
        seed=SEED,
    )
    frac = (annealed.sum(1) > 0).float().mean().item()
    assert abs(frac - 0.8) < 0.05, f"annealed Langevin: fraction near (5, 5) = {frac}, expected 0.8"
    # The chain samples the sigma_L = 1 perturbed mixture, N(mode, 2 I) near each mode: the mean distance
    # to the nearest mode is sqrt(2) sqrt(pi / 2).
    dist = torch.minimum((annealed - 5).norm(dim=1), (annealed + 5).norm(dim=1))
    assert abs(dist.mean().item() - math.sqrt(math.pi)) < 0.15


@pytest.mark.parametrize("sde_name,predictor,corrector", sde_combinations())
def test_sde_samplers_recover_gaussian_moments(sde_name, predictor, corrector):
    """Gaussian data N(mu, diag(var)), D = 8, with the exact perturbed score: the sample mean and covariance
    match within sampling error. For n samples, the standard error of a mean is sqrt(var / n), of a
    variance var sqrt(2 / n), of a covariance sqrt(var_i var_j / n); the bounds are 5 standard errors plus
    a discretisation allowance (N = 100 steps). Default settings otherwise (the Langevin corrector's step
    from the expected norms). Corrector-only sampling (predictor none) needs many corrector steps per
    level, as ncsn's samplers."""
    n, D = 2000, 8
    mu = torch.linspace(-1.5, 1.5, D)
    var = torch.linspace(0.25, 2.0, D)
    sde = make_sde(sde_name, 100)
    corrector_only = predictor == "none"
    snr = 0.3 if corrector_only else 0.16
    x = sampling.pc_sampler(
        GaussianScore(sde, mu, var),
        sde,
        (n, D),
        predictor=predictor,
        corrector=corrector,
        snr=snr,
        n_corrector_steps=20 if corrector_only else 1,
        seed=SEED,
    )
    assert torch.isfinite(x).all()
    x = x.double()
    mean = x.mean(0)
    cov = torch.cov(x.T)
    sd = var.double().sqrt()
    mean_err = ((mean - mu.double()).abs() / (sd / math.sqrt(n))).max().item()
    var_err = ((cov.diag() - var.double()).abs() / (var.double() * math.sqrt(2 / n))).max().item()
    off = cov - torch.diag(cov.diag())
    cov_err = (off.abs() / (sd[:, None] * sd[None, :] / math.sqrt(n))).max().item()
    # 5 standard errors of sampling, plus 3 % of the sd (mean) or variance for the time discretisation.
    var_allow = 5 + 0.03 * math.sqrt(n / 2)
    assert mean_err < 5 + 0.03 * math.sqrt(n), f"mean off by {mean_err:.2f} standard errors: {mean.tolist()}"
    assert var_err < var_allow, f"variances off by {var_err:.2f} standard errors: {cov.diag().tolist()}"
    assert cov_err < 5.5, f"covariances off by {cov_err:.2f} standard errors"


class CorrelatedGaussianScore:
    """Exact score of N(mu, cov) (any covariance) pushed through an SDE: N(m mu, m^2 cov + s^2 I) at time t."""

    def __init__(self, sde, mu, cov):
        self.sde, self.mu, self.cov = sde, mu, cov

    def __call__(self, x, t):
        m, s = self.sde.marginal_prob(torch.ones(x.shape[0], 1, dtype=x.dtype), t)
        eye = torch.eye(x.shape[1], dtype=x.dtype)
        cov_t = m[:, :, None] ** 2 * self.cov.to(x.dtype) + s[:, None, None] ** 2 * eye
        return -torch.linalg.solve(cov_t, (x - m * self.mu.to(x.dtype)).unsqueeze(-1)).squeeze(-1)


def moment_errors(x, mu, cov):
    """(max |mean error| / its standard error, max |covariance entry error| / its standard error): for n
    samples the standard error of mean i is sqrt(cov_ii / n), of entry (i, j) of the sample covariance
    sqrt((cov_ii cov_jj + cov_ij^2) / n)."""
    x, mu, cov = x.double(), mu.double(), cov.double()
    n = x.shape[0]
    d = cov.diag()
    mean_se = (d / n).sqrt()
    cov_se = ((d[:, None] * d[None, :] + cov**2) / n).sqrt()
    mean_err = ((x.mean(0) - mu).abs() / mean_se).max().item()
    cov_err = ((torch.cov(x.T) - cov).abs() / cov_se).max().item()
    return mean_err, cov_err


MU_2D = torch.tensor([1.0, -0.5])
COV_2D = torch.tensor([[1.0, 0.6], [0.6, 0.5]])


@pytest.mark.parametrize("sde_name", ["ve", "vp"])
@pytest.mark.parametrize("corrector_only", [False, True], ids=["pc", "corrector_only"])
def test_default_corrector_samples_a_correlated_2d_gaussian(sde_name, corrector_only):
    """The default PC sampler (reverse diffusion + Langevin corrector) on N((1, -0.5), [[1, .6], [.6, .5]])
    with its exact score: mean and covariance within 5 standard errors, plus 3 % of the covariance for the
    time discretisation (N = 200 steps). A step size computed from each sample's own score norm gave
    covariance entries of 27, 14 and 41 here (corrector only: hundreds); the default's step does not depend
    on the state. Corrector only: 10 corrector steps per time, snr 0.3."""
    n = 4000
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=200) if sde_name == "ve" else sde_lib.VPSDE(N=200)
    kwargs = dict(predictor="none", n_corrector_steps=10, snr=0.3) if corrector_only else {}
    x = sampling.pc_sampler(CorrelatedGaussianScore(sde, MU_2D, COV_2D), sde, (n, 2), seed=SEED, **kwargs)
    assert torch.isfinite(x).all()
    mean_err, cov_err = moment_errors(x, MU_2D, COV_2D)
    allowance = 0.03 * math.sqrt(n / 2)  # 3 % of a variance, in standard errors
    assert mean_err < 5 + allowance, f"mean off by {mean_err:.1f} standard errors: {x.mean(0).tolist()}"
    assert cov_err < 5 + allowance, f"covariance off by {cov_err:.1f} standard errors: {torch.cov(x.double().T)}"


def test_default_corrector_keeps_the_variance_in_higher_dimensions():
    """Corrector only, D = 16, N(0, I) data under VP (the score is -x at every t), 3 corrector steps per
    time: the variance stays 1 with the default step (the per-sample-norm step inflated it by (D + 2) / D
    and more) and with score_sde's batch-averaged one. The default is score_sde's step with the norms
    replaced by their expected values: bitwise the ALD corrector's."""
    D, n = 16, 2000
    sde = make_sde("vp", 100)
    kwargs = dict(predictor="none", snr=0.05, n_corrector_steps=3, seed=SEED)
    default = sampling.pc_sampler(lambda x, t: -x, sde, (n, D), **kwargs).double()
    batch = sampling.pc_sampler(lambda x, t: -x, sde, (n, D), batch_norm_step=True, **kwargs).double()
    se = math.sqrt(2 / (n * D))  # standard error of the variance averaged over the D dims
    for x in (default, batch):
        assert abs(x.var(0).mean().item() - 1.0) < 5 * se + 0.03, x.var(0).mean().item()
    ald = sampling.pc_sampler(lambda x, t: -x, sde, (n, D), corrector="ald", **kwargs).double()
    assert torch.equal(default, ald)


# ---- parity with the reference formulations ----------------------------------------------------------------


@pytest.mark.parametrize("denoise", [True, False])
def test_annealed_langevin_matches_ncsnv2_loop(denoise):
    sigmas = [5.0, 2.0, 0.7, 0.3]
    x0 = torch.rand(6, 2, 3, 3)
    score_fn = level_score(sigmas)
    ref = ncsnv2_annealed_langevin(score_fn, x0.clone(), sigmas, 7, 2e-3, SEED, denoise)
    got = sampling.annealed_langevin(score_fn, x0, sigmas, n_steps_each=7, step_lr=2e-3, denoise=denoise, seed=SEED)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ncsn_variant_records_before_each_update_and_does_not_denoise():
    sigmas = [3.0, 1.0]
    x0 = torch.rand(4, 5)
    score_fn = level_score(sigmas)
    final, states = sampling.annealed_langevin(
        score_fn, x0, sigmas, n_steps_each=3, step_lr=1e-2, seed=SEED, variant="ncsn", return_intermediates=True
    )
    assert len(states) == 6
    torch.testing.assert_close(states[0], x0)  # the state before the first update
    ref = ncsnv2_annealed_langevin(score_fn, x0.clone(), sigmas, 3, 1e-2, SEED, denoise=False)
    torch.testing.assert_close(final, ref, rtol=1e-5, atol=1e-5)
    _, v2_states = sampling.annealed_langevin(
        score_fn, x0, sigmas, n_steps_each=3, step_lr=1e-2, seed=SEED, return_intermediates=True
    )
    assert len(v2_states) == 7  # after every update, plus the denoised state
    torch.testing.assert_close(v2_states[0], states[1])


def test_langevin_matches_eager_loop_with_per_sample_steps():
    x0 = torch.randn(5, 4)
    steps = torch.tensor([0.0, 0.01, 0.05, 0.1, 0.2])
    got = sampling.langevin(lambda x: -x, x0, step_size=steps, n_steps=9, seed=SEED)
    x = x0.clone()
    for k in range(9):
        x = x + steps[:, None] * (-x) + torch.sqrt(2 * steps)[:, None] * noise(x, SEED, k)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], x0[0])  # a zero step leaves the sample alone


@pytest.mark.parametrize("variant", ["ncsnv2", "ncsn"])
def test_inpainting_matches_reference_loops(variant):
    sigmas = [2.0, 1.0, 0.5]
    x0 = torch.rand(3, 2, 4, 4)
    known = torch.rand(1, 2, 4, 4)
    mask = torch.zeros(1, 2, 4, 4)
    mask[..., :2] = 1  # ncsn's left half of the columns
    score_fn = level_score(sigmas)
    ref = inpainting_reference(score_fn, x0.clone(), known, mask, sigmas, 4, 1e-2, SEED, variant)
    got = sampling.annealed_langevin_inpainting(
        score_fn, x0, known, mask, sigmas, n_steps_each=4, step_lr=1e-2, seed=SEED, variant=variant
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    if variant == "ncsn":  # the known part is exactly its last perturbed version; the rest moved
        assert not torch.allclose(got[..., 2:], x0[..., 2:])
    denoised = sampling.annealed_langevin_inpainting(
        score_fn, x0, known, mask, sigmas, n_steps_each=4, step_lr=1e-2, seed=SEED, denoise=True
    )
    torch.testing.assert_close(denoised[..., :2], known.expand(3, -1, -1, -1)[..., :2])


PARITY = [
    ("ve", "reverse_diffusion", "langevin", False),
    ("ve", "reverse_diffusion", "langevin", True),
    ("ve", "euler_maruyama", "ald", False),
    ("ve", "ancestral", "none", False),
    ("ve", "none", "ald", False),
    ("vp", "reverse_diffusion", "langevin", False),
    ("vp", "euler_maruyama", "langevin", True),
    ("vp", "ancestral", "ald", False),
    ("subvp", "euler_maruyama", "langevin", False),
    ("subvp", "reverse_diffusion", "none", False),
    ("subvp", "none", "langevin", True),
]


@pytest.mark.parametrize("sde_name,predictor,corrector,batch_norm", PARITY)
def test_pc_sampler_matches_score_sde_loop(sde_name, predictor, corrector, batch_norm):
    sde = make_sde(sde_name, 20)
    mu, var = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.5, 1.0, 2.0])
    score_fn = GaussianScore(sde, mu, var)
    eps = 1e-3
    x0 = torch.randn(16, 3) * sde.prior_std
    ref = score_sde_pc(score_fn, sde, x0.clone(), predictor, corrector, 0.16, 2, True, eps, SEED, batch_norm)
    got = sampling.pc_sampler(
        score_fn,
        sde,
        x0.shape,
        predictor=predictor,
        corrector=corrector,
        snr=0.16,
        n_corrector_steps=2,
        eps=eps,
        seed=SEED,
        x_init=x0,
        batch_norm_step=batch_norm,
    )
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


def test_pc_sampler_prior_probability_flow_and_denoise():
    sde = make_sde("vp", 10)
    score_fn = GaussianScore(sde, torch.zeros(4), torch.ones(4))
    x, states = sampling.pc_sampler(
        score_fn, sde, (3, 4), corrector="none", seed=SEED, denoise=False, return_intermediates=True
    )
    assert len(states) == sde.N
    # The prior is the counter-based normal at the reserved prior counter, times the prior std.
    prior = counter_randn((3, 4), seed=SEED, counter=noise_lib.PRIOR_COUNTER)
    again = sampling.pc_sampler(score_fn, sde, (3, 4), corrector="none", seed=SEED, x_init=prior, denoise=False)
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    # The probability-flow predictor adds no noise: two seeds give the same samples from one start.
    flows = [
        sampling.pc_sampler(score_fn, sde, (3, 4), corrector="none", seed=s, x_init=prior, probability_flow=True)
        for s in (1, 2)
    ]
    torch.testing.assert_close(flows[0], flows[1], rtol=0, atol=0)


# ---- outside noise (noise=): the originals' torch.randn draws --------------------------------------------------


def ncsnv2_loop_with_torch_randn(scorenet, x_mod, sigmas, n_steps_each, step_lr, denoise=True):
    """ncsnv2's anneal_Langevin_dynamics as written there (its arithmetic and draw order: the score, then
    torch.randn_like on torch's global generator), without the diagnostics it prints."""
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x_mod.shape[0]) * c
        labels = labels.long()
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            grad = scorenet(x_mod, labels)
            noise = torch.randn_like(x_mod)
            x_mod = x_mod + step_size * grad + noise * math.sqrt(step_size * 2)
    if denoise:
        last_noise = (len(sigmas) - 1) * torch.ones(x_mod.shape[0])
        last_noise = last_noise.long()
        x_mod = x_mod + sigmas[-1] ** 2 * scorenet(x_mod, last_noise)
    return x_mod


def ncsn_loop_with_torch_randn(scorenet, x_mod, sigmas, n_steps_each, step_lr):
    """ncsn's AnnealRunner.anneal_Langevin_dynamics: the noise is drawn before the score."""
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x_mod.shape[0]) * c
        labels = labels.long()
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            noise = torch.randn_like(x_mod) * math.sqrt(step_size * 2)
            grad = scorenet(x_mod, labels)
            x_mod = x_mod + step_size * grad + noise
    return x_mod


def ncsnv2_inpainting_loop_with_torch_randn(scorenet, x_mod, refer_image, sigmas, n_steps_each, step_lr):
    """ncsnv2's anneal_Langevin_dynamics_inpainting on (N, C, H, W) batches (the known part is the left half
    of the columns): per step, the perturbed known half, then the noise, then the score."""
    cols = x_mod.shape[-1] // 2
    half_refer_image = refer_image[..., :cols]
    for c, sigma in enumerate(sigmas):
        labels = torch.ones(x_mod.shape[0]) * c
        labels = labels.long()
        step_size = step_lr * (sigma / sigmas[-1]) ** 2
        for _ in range(n_steps_each):
            corrupted_half_image = half_refer_image + torch.randn_like(half_refer_image) * sigma
            x_mod[:, :, :, :cols] = corrupted_half_image
            noise = torch.randn_like(x_mod) * math.sqrt(step_size * 2)
            grad = scorenet(x_mod, labels)
            x_mod = x_mod + step_size * grad + noise
    return x_mod


def stochastic_level_score(sigmas):
    """level_score plus a small term drawn from torch's global generator (a network with dropout, say): the
    samplers must then draw their own noise in the originals' order to reproduce them."""
    exact = level_score(sigmas)
    return lambda x, labels: exact(x, labels) + 0.01 * torch.randn_like(x)


@pytest.mark.parametrize("source", ["generator", "default_generator"])
def test_generator_noise_reproduces_ncsnv2_loop(source):
    sigmas = [5.0, 2.0, 0.7, 0.3]
    x0 = torch.rand(6, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    ref = ncsnv2_loop_with_torch_randn(level_score(sigmas), x0.clone(), sigmas, 7, 2e-3)
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(5) if source == "generator" else torch.default_generator
    got = sampling.annealed_langevin(level_score(sigmas), x0, sigmas, n_steps_each=7, step_lr=2e-3, noise=gen)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    # with a score that draws from the global generator too, the draws interleave as in the original
    torch.manual_seed(6)
    ref = ncsnv2_loop_with_torch_randn(stochastic_level_score(sigmas), x0.clone(), sigmas, 3, 2e-3)
    torch.manual_seed(6)
    got = sampling.annealed_langevin(
        stochastic_level_score(sigmas), x0, sigmas, n_steps_each=3, step_lr=2e-3, noise=torch.default_generator
    )
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_generator_noise_reproduces_ncsn_loop_and_inpainting():
    sigmas = [3.0, 1.0, 0.5]
    score_fn = stochastic_level_score(sigmas)
    x0 = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    ref = ncsn_loop_with_torch_randn(score_fn, x0.clone(), sigmas, 4, 1e-2)
    torch.manual_seed(7)
    got = sampling.annealed_langevin(
        score_fn, x0, sigmas, n_steps_each=4, step_lr=1e-2, variant="ncsn", noise=torch.default_generator
    )
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)

    known = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 3, 4, 4)
    mask[..., :2] = 1  # the originals' known left half
    torch.manual_seed(8)
    ref = ncsnv2_inpainting_loop_with_torch_randn(score_fn, x0.clone(), known, sigmas, 4, 1e-2)
    torch.manual_seed(8)
    got = sampling.annealed_langevin_inpainting(
        score_fn, x0, known, mask, sigmas, n_steps_each=4, step_lr=1e-2, noise=torch.default_generator
    )
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "sde_name,predictor,corrector,batch_norm",
    [
        ("ve", "reverse_diffusion", "langevin", False),
        ("ve", "euler_maruyama", "langevin", True),
        ("vp", "ancestral", "ald", False),
        ("vp", "none", "langevin", True),
    ],
)
def test_generator_noise_reproduces_score_sde_pc_loop(sde_name, predictor, corrector, batch_norm):
    """score_sde's prior (torch.randn of the shape, times the prior std) and its steps' torch.randn_like."""
    sde = make_sde(sde_name, 20)
    score_fn = GaussianScore(sde, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.5, 1.0, 2.0]))
    shape, eps = (16, 3), 1e-3
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(shape, generator=g) * sde.prior_std
    ref = score_sde_pc(
        score_fn, sde, x0, predictor, corrector, 0.16, 2, True, eps, None, batch_norm,
        draw=lambda x: torch.randn_like(x, generator=g),
    )  # fmt: skip
    got = sampling.pc_sampler(
        score_fn, sde, shape, predictor=predictor, corrector=corrector, n_corrector_steps=2, eps=eps,
        batch_norm_step=batch_norm, noise=torch.Generator().manual_seed(9),
    )  # fmt: skip
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


def test_generator_noise_reproduces_ncsn_toy_langevin():
    """ncsn's toy langevin_dynamics(lr): x += lr / 2 * score, then x += sqrt(lr) * torch.randn_like(x)."""
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(10)
    x = x0.clone()
    for _ in range(20):
        x = x + 0.1 / 2 * (-x)
        x = x + math.sqrt(0.1) * torch.randn_like(x, generator=g)
    got = sampling.langevin(lambda x: -x, x0, step_size=0.05, n_steps=20, noise=torch.Generator().manual_seed(10))
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-6)


def test_callable_noise_and_bad_noise_sources():
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def zeros(shape, dtype, device):
        calls.append((shape, dtype, device))
        return torch.zeros(shape, dtype=dtype, device=device)

    got = sampling.langevin(lambda x: -x, x0, step_size=0.1, n_steps=4, noise=zeros)
    torch.testing.assert_close(got, x0 * 0.9**4)  # no noise: gradient steps only
    assert calls == [((5, 3), torch.float32, torch.device("cpu"))] * 4
    # a generator on the state's layout: channels_last state, drawn as randn_like draws (memory order)
    xc = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    out = sampling.langevin(lambda x: x * 0, xc, step_size=0.5, n_steps=1, noise=torch.Generator().manual_seed(1))
    want = xc + torch.randn_like(xc, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    free = lambda x, t: -x  # noqa: E731
    sde = make_sde("ve", 5)
    bad = [
        (TypeError, lambda: sampling.langevin(lambda x: -x, x0, step_size=0.1, n_steps=2, noise=3)),
        (TypeError, lambda: sampling.pc_sampler(free, sde, (4, 3), noise="randn")),
        (ValueError, lambda: sampling.pc_sampler(free, sde, (4, 3), noise=lambda s, d, v: torch.zeros(1))),
        (TypeError, lambda: sampling.langevin(lambda x: -x, x0, step_size=0.1, n_steps=2, noise=lambda s, d, v: 0)),
        (
            ValueError,
            lambda: sampling.annealed_langevin(
                free, x0, [1.0], n_steps_each=2, step_lr=0.1, noise=lambda s, d, v: torch.zeros(s, dtype=torch.float64)
            ),
        ),
    ]
    for error, call in bad:
        with pytest.raises(error, match="noise"):
            call()


# ---- steady state allocates nothing --------------------------------------------------------------------------


def allocations(fn):
    """The bytes of every tensor storage allocated while fn runs, as the profiler records them (also inside
    C++ ops and for wrapped Python scalars).

    Read from the profiler's raw memory records, not from the per-op totals of prof.events(): torch before
    2.11 assigns each record to the op whose interval, rounded to microseconds, holds it, so an allocation
    at an op's edge lands in its neighbour or in "[memory]" depending on timing, and the per-op lists (and
    their lengths) change from run to run."""
    fn()  # warm caches (backend choice, lazy imports)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = prof.profiler.kineto_results.events()
    return sorted(e.nbytes() for e in records if e.name() == "[memory]" and e.nbytes() > 0)


def per_step_allocations(run, n):
    """What running 2n steps allocates beyond running n: the allocations of n steps of the steady state."""
    few, many = allocations(lambda: run(n)), allocations(lambda: run(2 * n))
    extra = list(many)
    for item in few:
        extra.remove(item)
    return extra


def test_steady_state_allocates_nothing_per_step():
    N, D = 8, 16
    score = torch.randn(N, D)  # a free score: the network's own allocation is not the sampler's
    x0 = torch.randn(N, D)

    def run_langevin(n):
        sampling.langevin(lambda x: score, x0, step_size=0.01, n_steps=n, seed=SEED)

    def run_annealed(n):
        sampling.annealed_langevin(lambda x, y: score, x0, [3.0, 2.0, 1.0], n_steps_each=n, step_lr=0.01, seed=SEED)

    def run_inpainting(n):
        mask = (x0[:1] > 0).float()
        sampling.annealed_langevin_inpainting(
            lambda x, y: score, x0, x0[:1], mask, [3.0, 1.0], n_steps_each=n, step_lr=0.01, seed=SEED
        )

    for run in (run_langevin, run_annealed, run_inpainting):
        assert per_step_allocations(run, 4) == [], run.__name__
    for predictor in ("euler_maruyama", "reverse_diffusion", "ancestral"):

        def run_pc(n, predictor=predictor):
            sampling.pc_sampler(lambda x, t: score, sde_lib.VESDE(N=n), (N, D), predictor=predictor, corrector="ald")

        # The sampler's own set-up scales with the number of time steps only through its coefficient
        # tables, whose sizes differ: compare the counts of allocations, not their sizes.
        assert len(allocations(lambda: run_pc(8))) == len(allocations(lambda: run_pc(16))), predictor

    # score_sde's Langevin corrector: its fused norms go into the sampler's buffers, like every other step.
    for batch_norm in (False, True):

        def run_corrector(n, batch_norm=batch_norm):
            sampling.pc_sampler(
                lambda x, t: score, sde_lib.VPSDE(N=n), (N, D), predictor="none", batch_norm_step=batch_norm
            )

        assert len(allocations(lambda: run_corrector(30))) == len(allocations(lambda: run_corrector(60))), batch_norm


def test_buffers_are_reused_across_steps():
    """The state the score function sees is the same storage at every step (updated in place)."""
    seen = set()

    def score_fn(x, labels):
        seen.add(x.data_ptr())
        return -x

    sampling.annealed_langevin(score_fn, torch.randn(4, 3), [2.0, 1.0], n_steps_each=5, step_lr=0.01, seed=SEED)
    assert len(seen) == 1


# ---- reproducibility -----------------------------------------------------------------------------------------


def test_same_seed_gives_bitwise_identical_samples():
    sde = make_sde("ve", 15)
    score_fn = GaussianScore(sde, torch.zeros(3), torch.ones(3))
    a = sampling.pc_sampler(score_fn, sde, (5, 3), seed=7)
    b = sampling.pc_sampler(score_fn, sde, (5, 3), seed=7)
    c = sampling.pc_sampler(score_fn, sde, (5, 3), seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    x0 = torch.rand(4, 2)
    sigmas = [2.0, 1.0]
    runs = [sampling.annealed_langevin(level_score(sigmas), x0, sigmas, n_steps_each=5, step_lr=0.01) for _ in "ab"]
    assert not torch.equal(runs[0], runs[1])  # seed=None draws a fresh seed from torch's generator
    torch.manual_seed(3)
    r1 = sampling.annealed_langevin(level_score(sigmas), x0, sigmas, n_steps_each=5, step_lr=0.01)
    torch.manual_seed(3)
    r2 = sampling.annealed_langevin(level_score(sigmas), x0, sigmas, n_steps_each=5, step_lr=0.01)
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("corrector", ["langevin", "ald"])
def test_a_sample_does_not_depend_on_its_batch(corrector):
    """Samples 2..5 of a batch of 8 equal a batch of 4 run with sample_offset=2 (per-sample corrector steps)."""
    sde = make_sde("vp", 12)
    score_fn = GaussianScore(sde, torch.tensor([1.0, -1.0, 0.5, 0.0]), torch.tensor([0.5, 1.0, 1.5, 2.0]))
    big = sampling.pc_sampler(score_fn, sde, (8, 4), corrector=corrector, seed=SEED)
    shard = sampling.pc_sampler(score_fn, sde, (4, 4), corrector=corrector, seed=SEED, sample_offset=2)
    assert torch.equal(big[2:6], shard)
    sigmas = [2.0, 1.0]
    x0 = torch.rand(8, 3)
    big = sampling.annealed_langevin(level_score(sigmas), x0, sigmas, n_steps_each=4, step_lr=0.01, seed=SEED)
    shard = sampling.annealed_langevin(
        level_score(sigmas), x0[2:6], sigmas, n_steps_each=4, step_lr=0.01, seed=SEED, sample_offset=2
    )
    assert torch.equal(big[2:6], shard)
    # score_sde's batch-averaged step makes a sample depend on the others.
    big = sampling.pc_sampler(score_fn, sde, (8, 4), predictor="none", seed=SEED, batch_norm_step=True)
    shard = sampling.pc_sampler(
        score_fn, sde, (4, 4), predictor="none", seed=SEED, sample_offset=2, batch_norm_step=True
    )
    assert not torch.allclose(big[2:6], shard)


# ---- progress, outputs, arguments ---------------------------------------------------------------------------


def test_progress_bar_with_and_without_tqdm(capsys, monkeypatch):
    x0 = torch.rand(2, 2)
    sampling.langevin(lambda x: -x, x0, step_size=0.01, n_steps=5, seed=0, progress=True)
    assert "5/5" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    sampling.langevin(lambda x: -x, x0, step_size=0.01, n_steps=5, seed=0, progress=True)
    assert "langevin: 5/5" in capsys.readouterr().err
    sampling.langevin(lambda x: -x, x0, step_size=0.01, n_steps=5, seed=0)
    assert capsys.readouterr().err == ""


def test_inputs_are_not_modified_and_channels_last_is_kept():
    x0 = torch.rand(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    before = x0.clone()
    out = sampling.annealed_langevin(level_score([2.0, 1.0]), x0, [2.0, 1.0], n_steps_each=3, step_lr=0.01, seed=1)
    assert torch.equal(x0, before)
    assert out.is_contiguous(memory_format=torch.channels_last)
    ref = sampling.annealed_langevin(
        level_score([2.0, 1.0]), x0.contiguous(), [2.0, 1.0], n_steps_each=3, step_lr=0.01, seed=1
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_ode_sampler_is_importable_from_sampling():
    assert callable(sampling.ode_sampler)
    assert "ode" in sampling.ode_sampler.__doc__.lower()


def _bad_calls():
    x = torch.rand(4, 3)
    sde = make_sde("ve", 5)
    free = lambda x, t: -x  # noqa: E731
    return [
        ("predictor", lambda: sampling.pc_sampler(free, sde, (4, 3), predictor="heun")),
        ("corrector", lambda: sampling.pc_sampler(free, sde, (4, 3), corrector="hmc")),
        ("predictor", lambda: sampling.pc_sampler(free, make_sde("subvp", 5), (4, 3), predictor="ancestral")),
        ("n_corrector_steps", lambda: sampling.pc_sampler(free, sde, (4, 3), n_corrector_steps=-1)),
        ("snr", lambda: sampling.pc_sampler(free, sde, (4, 3), snr=-0.1)),
        ("sde", lambda: sampling.pc_sampler(free, "ve", (4, 3))),
        ("shape", lambda: sampling.pc_sampler(free, sde, (0, 3))),
        ("eps", lambda: sampling.pc_sampler(free, sde, (4, 3), eps=1.5)),
        ("score_fn", lambda: sampling.pc_sampler(lambda x, t: x[:2], sde, (4, 3))),
        ("score_fn", lambda: sampling.langevin(lambda x: x.double(), x, step_size=0.1, n_steps=2)),
        ("score_fn", lambda: sampling.langevin(3, x, step_size=0.1, n_steps=2)),
        ("n_steps", lambda: sampling.langevin(lambda x: -x, x, step_size=0.1, n_steps=-1)),
        ("step_size", lambda: sampling.langevin(lambda x: -x, x, step_size=-0.1, n_steps=2)),
        ("step_size", lambda: sampling.langevin(lambda x: -x, x, step_size=torch.ones(3), n_steps=2)),
        ("x", lambda: sampling.langevin(lambda x: -x, x.numpy(), step_size=0.1, n_steps=2)),
        ("x", lambda: sampling.langevin(lambda x: -x, x.long(), step_size=0.1, n_steps=2)),
        ("n_steps_each", lambda: sampling.annealed_langevin(free, x, [2.0, 1.0], n_steps_each=-3, step_lr=0.1)),
        ("step_lr", lambda: sampling.annealed_langevin(free, x, [2.0, 1.0], n_steps_each=3, step_lr=float("nan"))),
        ("sigmas", lambda: sampling.annealed_langevin(free, x, [2.0, -1.0], n_steps_each=3, step_lr=0.1)),
        ("sigmas", lambda: sampling.annealed_langevin(free, x, torch.ones(2, 2), n_steps_each=3, step_lr=0.1)),
        ("sigmas", lambda: sampling.annealed_langevin(free, x, [1.0, 2.0], n_steps_each=3, step_lr=0.1)),
        (
            "sigmas",
            lambda: sampling.annealed_langevin(free, x, torch.tensor([5.0, 1.0, 3.0]), n_steps_each=1, step_lr=0.1),
        ),
        ("sigmas", lambda: sampling.annealed_langevin_inpainting(free, x, x, x > 0, [0.1, 1.0])),
        ("variant", lambda: sampling.annealed_langevin(free, x, [2.0], n_steps_each=3, step_lr=0.1, variant="v3")),
        ("seed", lambda: sampling.annealed_langevin(free, x, [2.0], n_steps_each=3, step_lr=0.1, seed=-1)),
        ("known", lambda: sampling.annealed_langevin_inpainting(free, x, torch.ones(5), x > 0, [1.0])),
        ("mask", lambda: sampling.annealed_langevin_inpainting(free, x, x, x * 2, [1.0])),
        ("mask", lambda: sampling.annealed_langevin_inpainting(free, x, x, [1, 0, 1], [1.0])),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_name_the_argument(index):
    name, call = _bad_calls()[index]
    with pytest.raises((TypeError, ValueError), match=name):
        call()


def test_increasing_sigmas_are_refused_equal_ones_accepted():
    x = torch.rand(4, 3)
    with pytest.raises(
        ValueError, match=r"sigmas: expected noise levels that do not increase.*sigmas\[0\] = 0.5 < sigmas\[1\] = 1.0"
    ):
        sampling.annealed_langevin(level_score([0.5, 1.0]), x, [0.5, 1.0], n_steps_each=2, step_lr=0.1)
    # a constant level (plain Langevin at one noise level, repeated) is not an increase
    out = sampling.annealed_langevin(level_score([1.0, 1.0]), x, [1.0, 1.0], n_steps_each=2, step_lr=0.1, seed=1)
    assert out.shape == x.shape


def test_bad_score_leaves_inputs_alone():
    x = torch.rand(4, 3)
    before = x.clone()
    with pytest.raises(ValueError, match="score_fn"):
        sampling.annealed_langevin(lambda x, y: x[:1], x, [1.0], n_steps_each=2, step_lr=0.1)
    assert torch.equal(x, before)


@pytest.mark.parametrize("step", [1e300, torch.tensor([1e300, 0.1])], ids=["float", "tensor"])
def test_langevin_refuses_a_step_the_update_overflows(step):
    """A step that is finite in float64 but not in x's float32 (or whose 2 * step is not) is refused, as
    langevin_step_ refuses it, instead of returning inf / NaN samples."""
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="step_size"):
        sampling.langevin(lambda x: -x, x, step_size=step, n_steps=1, seed=0)
    assert not x.any()
