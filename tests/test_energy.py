"""Energy-based score models (fastscore.models.energy): EnergyScore, EnergyHead, as_energy.

The score is minus the gradient of the energy (against closed forms and finite differences), differentiable for
training (DSM and sliced score matching give the losses and parameter gradients of the equivalent explicit
score function), detached under no_grad; conditional energies; the heads' formulas on ScoreMLP and NCSNv2
(a DSM step of an NCSNv2 energy); bad input. And the validation: an energy ScoreMLP trained by annealed DSM
on the moons samples as well as the score ScoreMLP trained the same way (MMD against held-out data), with
annealed Langevin and with annealed MALA.
"""

import math

import pytest
import torch
import torch.nn as nn

from fastscore import mcmc
from fastscore.data.toy import toy_sample
from fastscore.losses import anneal_dsm
from fastscore.losses import sliced_score_matching
from fastscore.models import EnergyHead
from fastscore.models import EnergyScore
from fastscore.models import ScoreMLP
from fastscore.models import as_energy
from fastscore.models import get_model
from fastscore.sampling import annealed_langevin

pytestmark = pytest.mark.one_thread


class Quadratic(nn.Module):
    """E(x) = 1/2 sum_i a_i x_i^2 (+ b_y . x with labels): score -a x (- b_y)."""

    def __init__(self, D, n_classes=None):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 2.0, D, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(n_classes, D, dtype=torch.float64)) if n_classes else None

    def forward(self, x, y=None):
        e = 0.5 * (self.a * x * x).sum(1)
        return e + (self.b[y] * x).sum(1) if y is not None else e


def test_the_score_is_minus_the_gradient_and_detached_without_grad_mode():
    net = Quadratic(4, n_classes=3)
    model = EnergyScore(net)
    assert list(model.parameters()) == list(net.parameters())
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    want = -(net.a * x + net.b[y])
    with torch.no_grad():
        s = model(x, y)
    torch.testing.assert_close(s, want.detach(), rtol=0, atol=1e-15)
    assert not s.requires_grad and s.dtype == x.dtype
    s = model(x, y)
    assert s.requires_grad, "in grad mode the score is differentiable"
    torch.testing.assert_close(s, want, rtol=0, atol=1e-15)
    e, s2 = model.energy_and_score(x, y, create_graph=False)
    assert not s2.requires_grad and not e.requires_grad
    torch.testing.assert_close(e, net(x, y).detach(), rtol=0, atol=0)
    assert all(p.grad is None for p in net.parameters()), "computing a score does not touch .grad"
    plain = EnergyScore(lambda x: 0.5 * x.square().sum(1))  # any callable
    torch.testing.assert_close(plain(x), -x, rtol=0, atol=0)
    assert not list(plain.parameters())


def test_dsm_through_the_score_gives_the_explicit_scores_loss_and_parameter_gradients():
    torch.manual_seed(0)
    net = Quadratic(3, n_classes=2)
    model = EnergyScore(net)
    x = torch.randn(16, 3, dtype=torch.float64)
    sigmas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    labels = torch.randint(0, 2, (16,))
    noise = torch.randn(16, 3, dtype=torch.float64)
    loss = anneal_dsm(model, x, sigmas, labels, noise=noise)
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    explicit = anneal_dsm(lambda x, y: -(net.a * x + net.b[y]), x, sigmas, labels, noise=noise)
    explicit.backward()
    torch.testing.assert_close(loss, explicit, rtol=1e-14, atol=0)
    for g, p in zip(got, net.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-12, atol=1e-14)


def test_sliced_score_matching_differentiates_the_score_with_respect_to_x():
    net = Quadratic(3)
    model = EnergyScore(net)
    x = torch.randn(32, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    loss = sliced_score_matching(model, x, n_particles=2, generator=g)
    loss.backward()
    grad_a = net.a.grad.clone()
    net.a.grad = None
    g = torch.Generator().manual_seed(1)
    explicit = sliced_score_matching(lambda x: -net.a * x, x, n_particles=2, generator=g)
    explicit.backward()
    torch.testing.assert_close(loss, explicit, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad_a, net.a.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", ["residual", "inner"])
def test_energy_heads_of_a_score_mlp(form):
    torch.manual_seed(2)
    net = ScoreMLP(3, hidden=16, n_classes=4, sigmas=[2.0, 1.0, 0.5, 0.25]).double()
    head = EnergyHead(net, form=form)
    model = as_energy(net, form=form)
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    f = net(x, y)
    want = 0.5 * (x - f).square().sum(1) if form == "residual" else -0.5 * (x * f).sum(1)
    torch.testing.assert_close(head(x, y), want, rtol=0, atol=0)
    torch.testing.assert_close(model.energy(x, y), want, rtol=0, atol=0)
    # the score against central finite differences of the energy
    with torch.no_grad():
        s = model(x, y)
        fd = torch.empty_like(x)
        for i in range(3):
            d = torch.zeros_like(x)
            d[:, i] = 1e-6
            fd[:, i] = -(head(x + d, y) - head(x - d, y)) / 2e-6
    torch.testing.assert_close(s, fd, rtol=1e-6, atol=1e-7)
    zero = as_energy(lambda x: torch.zeros_like(x))  # f = 0: the standard normal
    torch.testing.assert_close(zero(x), -x, rtol=0, atol=0)
    assert repr(form) in repr(head)


def test_an_ncsnv2_energy_trains_by_dsm_and_its_energies_are_per_sample():
    torch.manual_seed(3)
    net = get_model("demo_tiny").double()
    model = as_energy(net)
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    e = model.energy(x, labels)
    assert e.shape == (4,) and torch.isfinite(e).all()
    loss = anneal_dsm(model, x, net.sigmas, labels)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    with torch.no_grad():
        s = model(x, labels)
        alone = model(x[2:3], labels[2:3])
    assert s.shape == x.shape
    torch.testing.assert_close(alone[0], s[2], rtol=1e-10, atol=1e-10)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="energy_net: expected a callable"):
        EnergyScore(3)
    with pytest.raises(TypeError, match="net: expected a callable"):
        EnergyHead("net")
    with pytest.raises(ValueError, match="form: expected one of 'residual', 'inner'"):
        EnergyHead(lambda x: x, form="norm")
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"energy_net: returned shape \(3, 1\), expected \(3,\)"):
        EnergyScore(lambda x: x[:, :1])(x)
    with pytest.raises(TypeError, match="energy_net: expected it to return a tensor"):
        EnergyScore(lambda x: 1.0)(x)
    with pytest.raises(ValueError, match="net: returned .* expected x's shape"):
        as_energy(lambda x: x[:, :1])(x)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        EnergyScore(lambda x: x.sum(1))([1.0])
    with pytest.raises(ValueError, match="create_graph: True needs grad mode"), torch.no_grad():
        EnergyScore(lambda x: x.sum(1)).energy_and_score(x, create_graph=True)
    with pytest.raises(TypeError, match="create_graph: expected a bool"):
        EnergyScore(lambda x: x.sum(1)).energy_and_score(x, create_graph=1)


def test_mala_samples_an_energy_score_model():
    """EnergyScore.energy is what fastscore.mcmc samples: a conditional Gaussian energy, exact answers."""
    net = Quadratic(2, n_classes=1)
    with torch.no_grad():
        net.a.copy_(torch.tensor([1.0, 4.0], dtype=torch.float64))
        net.b.copy_(torch.tensor([[-1.0, 2.0]], dtype=torch.float64))
    model = EnergyScore(net)
    N = 4000
    y = torch.zeros(N, dtype=torch.long)
    r = mcmc.mala(
        lambda x: model.energy(x, y), torch.zeros(N, 2, dtype=torch.float64), 0.3, 150, seed=1, n_warmup=30, adapt=False
    )
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)  # minimiser of a x^2 / 2 + b x: -b / a
    var = torch.tensor([1.0, 0.25], dtype=torch.float64)
    torch.testing.assert_close(r.x.mean(0), mean, rtol=0, atol=5 * (var / N).sqrt().max().item())
    torch.testing.assert_close(r.x.var(0), var, rtol=5 * math.sqrt(2 / N), atol=0)


# ---- the moons: an energy ScoreMLP samples as well as the score ScoreMLP -------------------------------------

SIGMAS = torch.exp(torch.linspace(math.log(2.0), math.log(0.1), 6))


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths=(0.05, 0.1, 0.2, 0.5)) -> float:
    """The unbiased squared maximum mean discrepancy between samples a and b, with a sum of Gaussian kernels."""
    a, b = a.double(), b.double()

    def k(u, v):
        d2 = torch.cdist(u, v).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = a.shape[0], b.shape[0]
    kaa, kbb = k(a, a), k(b, b)
    return (
        (kaa.sum() - kaa.diag().sum()) / (n * (n - 1))
        + (kbb.sum() - kbb.diag().sum()) / (m * (m - 1))
        - 2 * k(a, b).mean()
    ).item()


def train(model, data, iters=2000, batch=256):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / iters)
    g = torch.Generator().manual_seed(0)
    for _ in range(iters):
        x = data[torch.randint(0, data.shape[0], (batch,), generator=g)]
        loss = anneal_dsm(model, x, SIGMAS, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def annealed_mala(model, x, n_steps_each=100, step_lr=0.2):
    """MALA at each noise level on the model's energy, then ncsnv2's final denoising step."""
    counter = 0
    for i, sigma in enumerate(SIGMAS.tolist()):
        y = torch.full((x.shape[0],), i, dtype=torch.long)
        x = mcmc.mala(lambda x, y=y: model.energy(x, y), x, step_lr * sigma**2, n_steps_each, seed=7, counter=counter).x
        counter += n_steps_each
    with torch.no_grad():
        y = torch.full((x.shape[0],), len(SIGMAS) - 1, dtype=torch.long)
        return x + SIGMAS[-1] ** 2 * model(x, y)


@pytest.mark.slow
def test_an_energy_score_mlp_trained_by_dsm_on_moons_samples_as_well_as_the_score_score_mlp():
    """Both networks: ScoreMLP(2, 3 x 128, silu), conditional on 6 levels 2 -> 0.1 (output divided by sigma),
    the same initial weights and batches, 2000 Adam steps of annealed DSM; the energy one through the residual
    head, E = |x - f(x, y)|^2 / 2. 2000 samples each by annealed Langevin (100 steps per level, step
    0.2 sigma_i^2, the same start and noise), the energy model also by annealed MALA, against 2000 held-out
    points: the squared MMD (four Gaussian kernels, bandwidths 0.05 - 0.5) of each. For scale: two independent
    draws of the data give about 0.002, a Gaussian with the data's mean and covariance about 0.1."""
    data = toy_sample("moons", 20000, seed=1)
    held = toy_sample("moons", 2000, seed=2)

    def net():
        torch.manual_seed(0)
        return ScoreMLP(2, n_layers=3, act="silu", n_classes=len(SIGMAS), sigmas=SIGMAS)

    score_model, energy_model = net(), as_energy(net())
    train(score_model, data)
    train(energy_model, data)
    start = torch.rand(2000, 2, generator=torch.Generator().manual_seed(5)) * 4 - 2
    step_lr = 0.2 * SIGMAS[-1].item() ** 2
    with torch.no_grad():
        got = {
            name: annealed_langevin(m, start, SIGMAS, n_steps_each=100, step_lr=step_lr, seed=3)
            for name, m in (("score", score_model), ("energy", energy_model))
        }
    got["energy, MALA"] = annealed_mala(energy_model, start)
    mmd = {name: mmd2(x, held) for name, x in got.items()}
    g = torch.Generator().manual_seed(6)
    cov = torch.cov(held.T.double())
    gauss = (
        held.double().mean(0) + torch.randn(2000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    )
    baseline = mmd2(gauss, held)
    report = ", ".join(f"{k} {v:.4f}" for k, v in mmd.items()) + f"; Gaussian fit {baseline:.4f}"
    assert all(torch.isfinite(x).all() for x in got.values()), report
    assert mmd["score"] < 0.25 * baseline, f"the score model did not learn the moons: {report}"
    assert mmd["energy"] < 1.5 * mmd["score"] + 0.005, f"the energy model samples worse: {report}"
    assert mmd["energy, MALA"] < 1.5 * mmd["score"] + 0.005, f"annealed MALA on the energy samples worse: {report}"
