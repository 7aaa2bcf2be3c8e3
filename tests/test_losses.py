"""fastscore.losses against the reference repositories' loss code, and their minimisers on Gaussian data."""

import pytest
import torch
import torch.nn as nn
from torch import autograd

from fastscore import losses
from fastscore.data.toy import ncsn_toy_mixture
from fastscore.models import ScoreMLP
from fastscore.sde import VESDE
from fastscore.sde import VPSDE
from fastscore.sde import subVPSDE

pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


# ---- oracles: the reference repositories' loss functions (docs/numerics.md#losses), in their own formulation ---


def ncsnv2_anneal_dsm_score_estimation(scorenet, samples, sigmas, labels=None, anneal_power=2.0, hook=None):
    """ermongroup/ncsnv2 losses/dsm.py."""
    if labels is None:
        labels = torch.randint(0, len(sigmas), (samples.shape[0],), device=samples.device)
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    noise = torch.randn_like(samples) * used_sigmas
    perturbed_samples = samples + noise
    target = -1 / (used_sigmas**2) * noise
    scores = scorenet(perturbed_samples, labels)
    target = target.view(target.shape[0], -1)
    scores = scores.view(scores.shape[0], -1)
    loss = 1 / 2.0 * ((scores - target) ** 2).sum(dim=-1) * used_sigmas.squeeze() ** anneal_power
    if hook is not None:
        hook(loss, labels)
    return loss.mean(dim=0)


def ncsn_anneal_dsm_score_estimation(scorenet, samples, labels, sigmas, anneal_power=2.0):
    """ermongroup/ncsn losses/dsm.py (labels before sigmas; target from the difference)."""
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    perturbed_samples = samples + torch.randn_like(samples) * used_sigmas
    target = -1 / (used_sigmas**2) * (perturbed_samples - samples)
    scores = scorenet(perturbed_samples, labels)
    target = target.view(target.shape[0], -1)
    scores = scores.view(scores.shape[0], -1)
    loss = 1 / 2.0 * ((scores - target) ** 2).sum(dim=-1) * used_sigmas.squeeze() ** anneal_power
    return loss.mean(dim=0)


def ncsn_sliced_score_estimation(score_net, samples, n_particles=1):
    """ermongroup/ncsn losses/sliced_sm.py (unit-norm Gaussian projections over the last dimension)."""
    dup_samples = samples.unsqueeze(0).expand(n_particles, *samples.shape).contiguous().view(-1, *samples.shape[1:])
    dup_samples.requires_grad_(True)
    vectors = torch.randn_like(dup_samples)
    vectors = vectors / torch.norm(vectors, dim=-1, keepdim=True)
    grad1 = score_net(dup_samples)
    gradv = torch.sum(grad1 * vectors)
    loss1 = torch.sum(grad1 * vectors, dim=-1) ** 2 * 0.5
    grad2 = autograd.grad(gradv, dup_samples, create_graph=True)[0]
    loss2 = torch.sum(vectors * grad2, dim=-1)
    loss1 = loss1.view(n_particles, -1).mean(dim=0)
    loss2 = loss2.view(n_particles, -1).mean(dim=0)
    loss = loss1 + loss2
    return loss.mean(), loss1.mean(), loss2.mean()


def ncsn_sliced_score_estimation_vr(score_net, samples, n_particles=1):
    """ermongroup/ncsn losses/sliced_sm.py (Gaussian projections, ||s||^2 / 2 in closed form)."""
    dup_samples = samples.unsqueeze(0).expand(n_particles, *samples.shape).contiguous().view(-1, *samples.shape[1:])
    dup_samples.requires_grad_(True)
    vectors = torch.randn_like(dup_samples)
    grad1 = score_net(dup_samples)
    gradv = torch.sum(grad1 * vectors)
    grad2 = autograd.grad(gradv, dup_samples, create_graph=True)[0]
    grad1 = grad1.view(dup_samples.shape[0], -1)
    loss1 = torch.sum(grad1 * grad1, dim=-1) / 2.0
    loss2 = torch.sum((vectors * grad2).view(dup_samples.shape[0], -1), dim=-1)
    loss1 = loss1.view(n_particles, -1).mean(dim=0)
    loss2 = loss2.view(n_particles, -1).mean(dim=0)
    loss = loss1 + loss2
    return loss.mean(), loss1.mean(), loss2.mean()


def ncsn_anneal_sliced_score_estimation_vr(scorenet, samples, labels, sigmas, n_particles=1):
    """ermongroup/ncsn losses/sliced_sm.py."""
    used_sigmas = sigmas[labels].view(samples.shape[0], *([1] * len(samples.shape[1:])))
    perturbed_samples = samples + torch.randn_like(samples) * used_sigmas
    dup_samples = (
        perturbed_samples.unsqueeze(0).expand(n_particles, *samples.shape).contiguous().view(-1, *samples.shape[1:])
    )
    dup_labels = labels.unsqueeze(0).expand(n_particles, *labels.shape).contiguous().view(-1)
    dup_samples.requires_grad_(True)
    vectors = torch.randn_like(dup_samples)
    grad1 = scorenet(dup_samples, dup_labels)
    gradv = torch.sum(grad1 * vectors)
    grad2 = autograd.grad(gradv, dup_samples, create_graph=True)[0]
    grad1 = grad1.view(dup_samples.shape[0], -1)
    loss1 = torch.sum(grad1 * grad1, dim=-1) / 2.0
    loss2 = torch.sum((vectors * grad2).view(dup_samples.shape[0], -1), dim=-1)
    loss1 = loss1.view(n_particles, -1).mean(dim=0)
    loss2 = loss2.view(n_particles, -1).mean(dim=0)
    loss = (loss1 + loss2) * (used_sigmas.squeeze() ** 2)
    return loss.mean(dim=0)


def score_sde_sde_loss(sde, score_fn, batch, reduce_mean=True, likelihood_weighting=True, eps=1e-5):
    """yang-song/score_sde_pytorch losses.py get_sde_loss_fn's loss_fn (score_fn already wrapped)."""
    reduce_op = torch.mean if reduce_mean else lambda *args, **kwargs: 0.5 * torch.sum(*args, **kwargs)
    t = torch.rand(batch.shape[0], device=batch.device) * (sde.T - eps) + eps
    z = torch.randn_like(batch)
    mean, std = sde.marginal_prob(batch, t)
    perturbed_data = mean + std[:, None, None, None] * z
    score = score_fn(perturbed_data, t)
    if not likelihood_weighting:
        losses_ = torch.square(score * std[:, None, None, None] + z)
        losses_ = reduce_op(losses_.reshape(losses_.shape[0], -1), dim=-1)
    else:
        g2 = sde.sde(torch.zeros_like(batch), t)[1] ** 2
        losses_ = torch.square(score + z / std[:, None, None, None])
        losses_ = reduce_op(losses_.reshape(losses_.shape[0], -1), dim=-1) * g2
    return torch.mean(losses_)


# ---- small networks --------------------------------------------------------------------------------------


class CondConvNet(nn.Module):
    """A tiny label-conditioned image score net (N, 2, 4, 4): enough nonlinearity for a non-trivial Jacobian."""

    def __init__(self, levels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, padding=1)
        self.embed = nn.Embedding(levels, 4)

    def forward(self, x, y):
        return self.conv2(torch.nn.functional.softplus(self.conv1(x) * self.embed(y)[:, :, None, None]))


class TimeConvNet(CondConvNet):
    def forward(self, x, t):
        return self.conv2(torch.nn.functional.softplus(self.conv1(x) * (1 + t)[:, None, None, None]))


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(3)
    return torch.rand(5, 2, 4, 4, generator=g)


SIGMAS = torch.tensor([1.0, 0.3, 0.05])


def _param_grads(model, loss):
    return autograd.grad(loss, list(model.parameters()), allow_unused=True)


# ---- parity with the reference formulations ----------------------------------------------------------------


@pytest.mark.parametrize("with_labels", [False, True])
def test_anneal_dsm_matches_ncsnv2(images, with_labels):
    net = CondConvNet()
    labels = torch.tensor([0, 1, 2, 1, 0]) if with_labels else None
    seen = {}
    torch.manual_seed(7)
    want = ncsnv2_anneal_dsm_score_estimation(
        net, images, SIGMAS, labels, 2.0, hook=lambda loss, y: seen.update(ref=loss)
    )
    torch.manual_seed(7)
    got = losses.anneal_dsm(net, images, SIGMAS, labels, 2.0, hook=lambda loss, y: seen.update(got=loss))
    assert torch.equal(got, want)
    assert torch.equal(seen["got"], seen["ref"])
    for g, w in zip(_param_grads(net, got), _param_grads(net, want)):
        assert torch.equal(g, w)
    torch.manual_seed(7)
    per_sample = losses.anneal_dsm(net, images, SIGMAS, labels, 2.0, reduction="none")
    assert per_sample.shape == (5,) and torch.equal(per_sample, seen["ref"])


def test_anneal_dsm_anneal_power_and_generator(images):
    net = CondConvNet()
    torch.manual_seed(1)
    want = ncsnv2_anneal_dsm_score_estimation(net, images, SIGMAS, None, 1.0)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (5,), generator=gen)
    noise = torch.randn(images.shape, generator=gen)
    got_gen = losses.anneal_dsm(net, images, SIGMAS, None, 1.0, generator=torch.Generator().manual_seed(1))
    got_noise = losses.anneal_dsm(net, images, SIGMAS, labels, 1.0, noise=noise)
    torch.testing.assert_close(got_gen, got_noise, rtol=0, atol=0)
    assert got_gen.shape == want.shape == ()


def test_anneal_dsm_ncsn_target(images):
    net = CondConvNet()
    labels = torch.tensor([2, 2, 1, 0, 1])
    torch.manual_seed(2)
    want = ncsn_anneal_dsm_score_estimation(net, images, labels, SIGMAS)
    torch.manual_seed(2)
    got = losses.anneal_dsm(net, images, SIGMAS, labels, target="ncsn")
    assert torch.equal(got, want)
    torch.manual_seed(2)
    v2 = losses.anneal_dsm(net, images, SIGMAS, labels)
    # equal in exact arithmetic only (docs/numerics.md#denoising-score-matching)
    torch.testing.assert_close(got, v2, rtol=1e-3, atol=0)


def test_anneal_dsm_channels_last(images):
    net = CondConvNet()
    labels = torch.tensor([0, 1, 2, 1, 0])
    noise = torch.randn_like(images)
    a = losses.anneal_dsm(net, images, SIGMAS, labels, noise=noise)
    b = losses.anneal_dsm(
        net, images.contiguous(memory_format=torch.channels_last), SIGMAS, labels, noise=noise.contiguous()
    )
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n_particles", [1, 3])
@pytest.mark.parametrize("vr", [False, True])
def test_sliced_score_matching_matches_ncsn(n_particles, vr):
    torch.manual_seed(0)
    net = ScoreMLP(3, hidden=16).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    oracle = ncsn_sliced_score_estimation_vr if vr else ncsn_sliced_score_estimation
    torch.manual_seed(5)
    want = oracle(net, x, n_particles)
    torch.manual_seed(5)
    got = losses.sliced_score_matching(net, x, n_particles=n_particles, variance_reduction=vr, return_terms=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for g, w in zip(_param_grads(net, got[0]), _param_grads(net, want[0])):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_particles", [1, 2])
def test_anneal_sliced_score_matching_matches_ncsn(images, n_particles):
    net = CondConvNet().double()
    x = images.double()
    labels = torch.tensor([0, 1, 2, 1, 0])
    sigmas = SIGMAS.double()
    torch.manual_seed(4)
    want = ncsn_anneal_sliced_score_estimation_vr(net, x, labels, sigmas, n_particles)
    torch.manual_seed(4)
    got = losses.anneal_sliced_score_matching(net, x, sigmas, labels, n_particles)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_param_grads(net, got), _param_grads(net, want)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.manual_seed(4)
    drawn = losses.anneal_sliced_score_matching(net, x, sigmas, None, n_particles, reduction="none")
    assert drawn.shape == (5,)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(), subVPSDE()], ids=["vp", "ve", "subvp"])
@pytest.mark.parametrize("weighting", [False, True])
@pytest.mark.parametrize("reduce_mean", [True, False])
def test_sde_dsm_matches_score_sde(images, sde, weighting, reduce_mean):
    net = TimeConvNet()
    torch.manual_seed(9)
    want = score_sde_sde_loss(sde, net, images, reduce_mean=reduce_mean, likelihood_weighting=weighting)
    torch.manual_seed(9)
    got = losses.sde_dsm(net, sde, images, likelihood_weighting=weighting, reduce_mean=reduce_mean)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ---- minimisers on a 2-D Gaussian with a linear score model ----------------------------------------------

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[2.0, 0.6], [0.6, 0.5]], dtype=torch.float64)


def _gaussian(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV).t()


class Linear(nn.Module):
    """s(x) = A x + b (labels / times ignored)."""

    def __init__(self, A, b):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(b.clone())

    def forward(self, x, *_):
        return x @ self.A.t() + self.b


def _true_linear(cov, mean):
    A = -torch.linalg.inv(cov)
    return A, -A @ mean


def _grad_norm(model, loss):
    return torch.cat([g.reshape(-1) for g in autograd.grad(loss, list(model.parameters()))]).norm()


def test_exact_score_matching_minimiser_is_the_score():
    x = _gaussian(20000, 0)
    # The sample objective is quadratic in (A, b); its stationary point is the score of the Gaussian with
    # the sample's moments, which approaches the true score.
    m = x.mean(0)
    S = (x - m).t() @ (x - m) / x.shape[0]
    A, b = _true_linear(S, m)
    model = Linear(A, b)
    assert _grad_norm(model, losses.exact_score_matching(model, x)) < 1e-10
    A_true, b_true = _true_linear(COV, MU)
    torch.testing.assert_close(A, A_true, rtol=0, atol=0.05)
    torch.testing.assert_close(b, b_true, rtol=0, atol=0.1)
    off = Linear(A + 0.3 * torch.eye(2, dtype=torch.float64), b)
    assert _grad_norm(off, losses.exact_score_matching(off, x)) > 0.1


@pytest.mark.parametrize("vr", [False, True])
def test_sliced_score_matching_minimiser_is_the_score(vr):
    x = _gaussian(20000, 1)
    model = Linear(*_true_linear(COV, MU))
    off = Linear(model.A.detach() + 0.3 * torch.eye(2, dtype=torch.float64), model.b.detach())
    gen = lambda: torch.Generator().manual_seed(2)
    at = _grad_norm(model, losses.sliced_score_matching(model, x, variance_reduction=vr, generator=gen()))
    away = _grad_norm(off, losses.sliced_score_matching(off, x, variance_reduction=vr, generator=gen()))
    assert at < 0.1 * away, f"gradient at the true score {at} vs 0.3 away {away}"


def test_anneal_dsm_minimiser_is_the_perturbed_score():
    sigma = 0.5
    x = _gaussian(100000, 2)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    sigmas = torch.tensor([sigma], dtype=torch.float64)
    # At fixed draws DSM is least squares of the target -(x~ - x) / sigma^2 on (x~, 1): solve it in closed form,
    # check the loss is stationary there, and that it approaches the score of N(mu, cov + sigma^2 I).
    xt = x + sigma * z
    sol = torch.linalg.lstsq(torch.cat([xt, torch.ones(len(x), 1, dtype=x.dtype)], 1), -z / sigma).solution
    model = Linear(sol[:2].t(), sol[2])
    assert _grad_norm(model, losses.anneal_dsm(model, x, sigmas, labels, noise=z)) < 1e-8
    A_true, b_true = _true_linear(COV + sigma**2 * torch.eye(2, dtype=torch.float64), MU)
    torch.testing.assert_close(model.A.detach(), A_true, rtol=0, atol=0.05)
    torch.testing.assert_close(model.b.detach(), b_true, rtol=0, atol=0.1)


class _MarginalScore(nn.Module):
    """The exact score of the SDE's marginal for Gaussian data, plus theta * (x - alpha mu)."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, t):
        alpha = self.sde.marginal_prob(torch.ones_like(x), t)[0][:, :1]
        std = self.sde.marginal_prob(x, t)[1]
        cov = alpha[:, :, None] ** 2 * COV + std[:, None, None] ** 2 * torch.eye(2, dtype=x.dtype)
        centred = x - alpha * MU
        return -torch.linalg.solve(cov, centred) + self.theta * centred


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_max=5.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("weighting", [False, True])
def test_sde_dsm_minimiser_is_the_marginal_score(sde, weighting):
    x = _gaussian(20000, 4)
    model = _MarginalScore(sde)

    def loss(theta):
        with torch.no_grad():
            model.theta.fill_(theta)
        return losses.sde_dsm(
            model, sde, x, likelihood_weighting=weighting, eps=1e-3, generator=torch.Generator().manual_seed(5)
        )

    # Quadratic in theta: fit it from three points and find its minimiser.
    d = 0.2
    lm, l0, lp = (float(loss(t).detach()) for t in (-d, 0.0, d))
    curvature = (lp - 2 * l0 + lm) / d**2
    assert curvature > 0
    theta_star = -(lp - lm) / (2 * d) / curvature
    assert abs(theta_star) < 0.03, f"the loss is minimised at theta = {theta_star}, not at the true score"


def test_exact_and_sliced_agree_in_expectation():
    torch.manual_seed(0)
    net = ScoreMLP(2, hidden=32).double()
    x = torch.randn(4, 2, dtype=torch.float64) * 2
    exact = losses.exact_score_matching(net, x, reduction="none").detach()
    copies = x.repeat(4000, 1)  # 4000 one-projection estimates per sample, in one batch
    gen = torch.Generator().manual_seed(1)
    for vr, scale in ((True, 1.0), (False, 2.0)):  # plain SSM (unit projections) estimates Hyvarinen / D
        est = losses.sliced_score_matching(net, copies, variance_reduction=vr, reduction="none", generator=gen)
        est = scale * est.detach().reshape(4000, 4)
        mean, sem = est.mean(0), est.std(0) / 4000**0.5
        assert bool(((mean - exact).abs() < 5 * sem + 1e-9).all()), f"vr={vr}: {mean} vs exact {exact} (sem {sem})"


def test_ssm_vr_trains_a_toy_mlp_on_the_ncsn_mixture():
    """ncsn's toy experiment, shortened: the learned score approaches the mixture's exact score."""
    torch.manual_seed(0)
    gmm = ncsn_toy_mixture()
    net = ScoreMLP(2)
    steps = 500
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    test = gmm.sample(4000, seed=2)
    true = gmm.score(test).float()

    def fisher():
        with torch.no_grad():
            return float(((net(test) - true) ** 2).sum(1).mean())

    before = fisher()
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = losses.sliced_score_matching(net, gmm.sample(256, seed=step), variance_reduction=True, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    scale = float((true**2).sum(1).mean())  # E ||grad log p||^2 = 2 for unit-variance components
    after = fisher()
    assert after < 0.05 * scale < before, f"Fisher divergence {before} -> {after} (E||score||^2 = {scale})"


# ---- bad input -----------------------------------------------------------------------------------------------


def test_score_fn_output_shape_is_checked(images):
    with pytest.raises(ValueError, match=r"^score_fn\b"):
        losses.anneal_dsm(lambda x, y: x.sum(1), images, SIGMAS)
    with pytest.raises(ValueError, match=r"^score_fn\b"):
        losses.sliced_score_matching(lambda x: x[:, :1], torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"^score_fn\b"):
        losses.sde_dsm(lambda x, t: None, VPSDE(), images)


@pytest.mark.parametrize(
    "call, exc, name",
    [
        (lambda x: losses.anneal_dsm(None, x, SIGMAS), TypeError, "score_fn"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x.long(), SIGMAS), TypeError, "x"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x[0, 0, 0], SIGMAS), ValueError, "x"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS[None]), ValueError, "sigmas"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, "big"), TypeError, "sigmas"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, torch.zeros(5)), TypeError, "labels"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, torch.zeros(4).long()), ValueError, "labels"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, torch.full((5,), 3)), ValueError, "labels"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, anneal_power="2"), TypeError, "anneal_power"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, target="ddpm"), ValueError, "target"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, reduction="sum"), ValueError, "reduction"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, noise=x[:2]), ValueError, "noise"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, generator=0), TypeError, "generator"),
        (lambda x: losses.anneal_dsm(CondConvNet(), x, SIGMAS, hook=1), TypeError, "hook"),
        (lambda x: losses.sliced_score_matching(torch.tanh, x, n_particles=0), ValueError, "n_particles"),
        (lambda x: losses.anneal_sliced_score_matching(CondConvNet(), x, SIGMAS, n_particles=-1), ValueError, "n_"),
        (lambda x: losses.exact_score_matching(torch.tanh, x, reduction=None), TypeError, "reduction"),
        (lambda x: losses.sde_dsm(TimeConvNet(), object(), x), TypeError, "sde"),
        (lambda x: losses.sde_dsm(TimeConvNet(), VPSDE(), x, eps=1.5), ValueError, "eps"),
    ],
)
def test_bad_input(images, call, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        call(images)


def test_sde_dsm_with_a_scalar_coefficient_sde():
    """An SDE object with only marginal_prob, sde and T (and scalar coefficients) is enough."""

    class ConstantNoise:
        T = 1.0

        def marginal_prob(self, x, t):
            return x, 0.5

        def sde(self, x, t):
            return torch.zeros_like(x), 2.0

    x = torch.randn(6, 3, dtype=torch.float64)
    exact = lambda h, t: -(h - x) / 0.25  # the score of N(x, 0.25 I)
    for weighting in (False, True):
        loss = losses.sde_dsm(
            exact, ConstantNoise(), x, likelihood_weighting=weighting, generator=torch.Generator().manual_seed(0)
        )
        torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    # A zero score leaves 1/2 ||z||^2 per sample (reduce_mean=False); draws: t, then z (score_sde's order).
    g = torch.Generator().manual_seed(1)
    torch.rand(6, generator=g)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    zero = losses.sde_dsm(
        lambda h, t: torch.zeros_like(h),
        ConstantNoise(),
        x,
        reduce_mean=False,
        reduction="none",
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(zero, 0.5 * (z**2).sum(1))
