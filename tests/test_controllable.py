"""Controllable generation on the PC sampler: inpainting, colorization, classifier guidance.

Exact answers: Gaussian data (the perturbed score is analytic; the conditional of independent coordinates is
their marginal), the NCSN toy mixture with its exact noise-conditional classifier, and score_sde's
pc_inpainter / pc_colorizer loops transcribed, run on the same torch.Generator draws."""

import math

import pytest
import torch

from fastscore import sampling
from fastscore import sde as sde_lib
from fastscore.data import ncsn_toy_mixture

SEED = 7


class GaussianScore:
    """Exact score of N(mu, cov) data pushed through an SDE: N(m mu, m^2 cov + s^2 I) at time t."""

    def __init__(self, sde, mu, cov):
        self.sde, self.mu, self.cov = sde, mu.double(), cov.double()

    def __call__(self, x, t):
        m, s = self.sde.marginal_prob(torch.ones(x.shape[0], 1, dtype=torch.float64), t.double())
        eye = torch.eye(self.mu.numel(), dtype=torch.float64)
        prec = torch.linalg.inv(m[:, :, None] ** 2 * self.cov + s[:, None, None] ** 2 * eye)
        d = x.double().reshape(x.shape[0], -1) - m * self.mu
        return (-(prec @ d[:, :, None])[:, :, 0]).to(x.dtype).reshape(x.shape)


def test_inpainting_independent_coordinates_samples_their_marginal():
    """x ~ N(mu, diag(var)) in 6-D, the first three coordinates known: the other three are independent of
    them, so the inpainted ones must follow N(mu_u, var_u) (5 standard errors + 3 % discretisation)."""
    n, D = 2000, 6
    mu = torch.linspace(-1.0, 1.5, D)
    var = torch.linspace(0.3, 1.5, D)
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=200)
    known = (mu + var.sqrt() * torch.randn(n, D, generator=torch.Generator().manual_seed(1))).float()
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    x = sampling.pc_inpaint(GaussianScore(sde, mu, torch.diag(var)), sde, known, mask[None], seed=SEED)
    assert torch.equal(x[:, :3], known[:, :3] * 1.0) or torch.allclose(x[:, :3], known[:, :3], atol=1e-4)
    u = x[:, 3:].double()
    mu_u, var_u = mu[3:].double(), var[3:].double()
    mean_err = ((u.mean(0) - mu_u).abs() / (var_u.sqrt() / math.sqrt(n))).max().item()
    var_err = ((u.var(0) - var_u).abs() / (var_u * math.sqrt(2 / n))).max().item()
    assert mean_err < 5 + 0.03 * math.sqrt(n), f"conditional mean off by {mean_err:.2f} standard errors"
    assert var_err < 5 + 0.03 * math.sqrt(n / 2), f"conditional variance off by {var_err:.2f} standard errors"


def mixture_classifier(mix, sigma_of_t):
    """log p_t(y | x) logits of the mixture's components under VE noise sigma(t): exact."""
    means = mix.means.double()
    logw = torch.log(mix.weights.double())

    def logits(x, t):
        s2 = sigma_of_t(t).double() ** 2
        var = 1.0 + s2  # unit-variance components
        d2 = ((x.double()[:, None, :] - means[None]) ** 2).sum(-1)
        return (logw[None] - d2 / (2 * var[:, None])).to(x.dtype)

    return logits


@pytest.mark.parametrize("sampler", ["ald", "pc", "ode"])
@pytest.mark.parametrize("label", [0, 1])
def test_classifier_guidance_with_the_exact_classifier_samples_the_class(label, sampler):
    """NCSN's toy mixture 0.8 N((5,5), I) + 0.2 N((-5,-5), I); the exact noise-conditional classifier: guided
    samples of class y at scale 1 fall in mode y (>= 99 %), with every sampler: annealed Langevin (the
    classifier given the level's label, as the score), predictor-corrector and the probability-flow ODE."""
    mix = ncsn_toy_mixture()
    n = 1000
    if sampler == "ald":  # ncsn's toy setting: 10 geometric levels from 20 to 1, 100 steps each
        sigmas = torch.logspace(math.log10(20.0), 0.0, 10, dtype=torch.float64)

        def sigma(labels):
            return sigmas[labels].float()

        def score_fn(x, labels):
            return mix.score(x, sigma(labels))

        guided = sampling.classifier_guidance(score_fn, mixture_classifier(mix, sigma), label)
        start = torch.rand(n, 2, generator=torch.Generator().manual_seed(SEED)) * 16 - 8
        x = sampling.annealed_langevin(guided, start, sigmas, n_steps_each=100, step_lr=0.1, seed=SEED)
    else:
        sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=300)

        def sigma(t):
            return sde.marginal_prob(torch.zeros(t.shape[0], 1), t)[1]

        def score_fn(x, t):
            return mix.score(x, sigma(t))

        guided = sampling.classifier_guidance(score_fn, mixture_classifier(mix, sigma), label)
        if sampler == "pc":
            x = sampling.pc_sampler(guided, sde, (n, 2), seed=SEED)
        else:
            x = sampling.ode_sampler(guided, sde, (n, 2), seed=SEED)
    in_mode = ((x.sum(1) > 0) == (mix.means[label].sum() > 0)).double().mean().item()
    assert in_mode >= 0.99, f"{in_mode:.3f} of the samples of class {label} in its mode ({sampler})"


def score_sde_pc_inpainter(score_fn, sde, data, mask, snr, eps, g, colorize=False):
    """score_sde's get_pc_inpainter (reverse diffusion + Langevin corrector, one step each, its batch-norm
    step rule) with torch.randn_like(generator=g) draws; the denoise=False output. With ``colorize``, its
    pc_colorizer (the mask in decoupled coordinates; data the gray image)."""
    M = sampling._COLOR_BASIS.to(data.dtype)
    dec = (lambda v: torch.einsum("bihw,ij->bjhw", v, M)) if colorize else (lambda v: v)
    cou = (lambda v: torch.einsum("bjhw,ij->bihw", v, M)) if colorize else (lambda v: v)
    rsde = sde.reverse(score_fn)
    B = data.shape[0]
    view = (-1,) + (1,) * (data.dim() - 1)

    def replace(x, t):
        mean, std = sde.marginal_prob(dec(data), t)
        masked = mean + torch.randn_like(x, generator=g) * std.reshape(view)
        return cou(dec(x) * (1 - mask) + masked * mask)

    x = cou(dec(data) * mask + dec(torch.randn(data.shape, generator=g) * sde.prior_std) * (1 - mask))
    for tt in torch.linspace(sde.T, eps, sde.N):
        t = torch.ones(B) * tt
        grad = score_fn(x, t)
        z = torch.randn_like(x, generator=g)
        g_norm = torch.norm(grad.reshape(B, -1), dim=-1).mean()
        z_norm = torch.norm(z.reshape(B, -1), dim=-1).mean()
        step = (snr * z_norm / g_norm) ** 2 * 2
        x = x + step * grad + torch.sqrt(step * 2) * z
        x = replace(x, t)
        f, G = rsde.discretize(x, t)
        x = x - f + G.reshape(view) * torch.randn_like(x, generator=g)
        x = replace(x, t)
    return x


def test_pc_inpaint_reproduces_score_sde_given_the_same_draws():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=20)
    mu, var = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([0.5, 1.0, 2.0, 1.5])
    score_fn = GaussianScore(sde, mu, torch.diag(var))
    data = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    eps = sde_lib.sampling_eps(sde)
    ref = score_sde_pc_inpainter(score_fn, sde, data, mask, 0.16, eps, torch.Generator().manual_seed(9))
    got = sampling.pc_inpaint(
        score_fn, sde, data, mask, denoise=False, batch_norm_step=True, noise=torch.Generator().manual_seed(9)
    )
    torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4)


def test_pc_colorize_keeps_the_gray_level_and_matches_score_sde():
    """The gray level (r + g + b) / 3 of the result is the input's (the known channel, at the last time's
    mean); with the same draws the chain is score_sde's pc_colorizer's (compared before denoising)."""
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=10.0, N=20)
    D = 3 * 2 * 2
    score_fn_flat = GaussianScore(sde, torch.zeros(D), torch.eye(D) * 0.5)

    def score_fn(x, t):
        return score_fn_flat(x.reshape(x.shape[0], -1), t).reshape(x.shape)

    gray = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(5)).expand(-1, 3, -1, -1).contiguous()
    out = sampling.pc_colorize(score_fn, sde, gray, seed=SEED)
    assert out.shape == gray.shape
    torch.testing.assert_close(out.mean(1), gray[:, 0], atol=1e-3, rtol=0)

    # The same chain as score_sde's, on the same draws: run the decoupled inpainting directly.
    eps = sde_lib.sampling_eps(sde)
    mask = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1)
    ref = score_sde_pc_inpainter(score_fn, sde, gray, mask, 0.16, eps, torch.Generator().manual_seed(9), True)
    data = sampling._decouple(gray)

    def decoupled(y, t):
        return sampling._decouple(score_fn(sampling._couple(y), t))

    y = sampling.pc_inpaint(
        decoupled, sde, data, mask, denoise=False, batch_norm_step=True, noise=torch.Generator().manual_seed(9)
    )
    # score_sde draws the noise in x's coordinates and we in y's: the same normals, rotated. Compare the gray
    # channel (fixed) exactly, and the whole result's distribution-free invariants loosely.
    torch.testing.assert_close(sampling._couple(y).mean(1), ref.mean(1), atol=1e-3, rtol=0)


def test_bad_arguments_name_the_argument():
    sde = sde_lib.VESDE(N=5)
    known = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask: shape"):
        sampling.pc_inpaint(lambda x, t: -x, sde, known, torch.ones(4))
    with pytest.raises(ValueError, match="mask: expected a bool tensor or values in"):
        sampling.pc_inpaint(lambda x, t: -x, sde, known, torch.full((1, 3), 2.0))
    with pytest.raises(TypeError, match="known"):
        sampling.pc_inpaint(lambda x, t: -x, sde, [0.0], torch.ones(1, 3))
    with pytest.raises(ValueError, match="gray: expected an"):
        sampling.pc_colorize(lambda x, t: -x, sde, torch.zeros(2, 2, 4, 4))
    with pytest.raises(TypeError, match="classifier_fn"):
        sampling.classifier_guidance(lambda x, t: -x, None, 0)
    with pytest.raises(TypeError, match="y: expected an int64"):
        sampling.classifier_guidance(lambda x, t: -x, lambda x, t: x, torch.zeros(2))
    guided = sampling.classifier_guidance(lambda x, t: -x, lambda x, t: x[:, :1], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="y: expected 2 classes"):
        guided(torch.zeros(2, 2), torch.ones(2))
