"""fastscore.models.ScoreMLP: the toy score network and its three kinds of noise-level conditioning."""

import pytest
import torch
import torch.nn as nn

import fastscore.models
from fastscore import losses
from fastscore.data.toy import ncsn_toy_mixture
from fastscore.models import ScoreMLP
from fastscore.ops import hutchinson_divergence

pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


SIGMAS = torch.tensor([4.0, 1.0, 0.25])


def test_exported():
    assert fastscore.models.ScoreMLP is ScoreMLP and "ScoreMLP" in fastscore.models.__all__


def test_unconditional_default_is_ncsns_toy_network():
    """ncsn's toy runner: D -> 128 -> Softplus -> 128 -> Softplus -> D."""
    net = ScoreMLP(2)
    assert net.conditioning == "none"
    assert [(m.in_features, m.out_features) for m in [*net.layers, net.out]] == [(2, 128), (128, 128), (128, 2)]
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(2, 128), nn.Softplus(), nn.Linear(128, 128), nn.Softplus(), nn.Linear(128, 2))
    with torch.no_grad():
        for mine, theirs in zip([*net.layers, net.out], [ref[0], ref[2], ref[4]]):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    x = torch.randn(7, 2)
    torch.testing.assert_close(net(x), ref(x))
    torch.testing.assert_close(net(x, None), ref(x))


def test_label_embedding_conditions_on_the_level():
    torch.manual_seed(0)
    net = ScoreMLP(3, hidden=16, n_layers=3, n_classes=3)
    x = torch.randn(4, 3)
    y0, y2 = torch.zeros(4, dtype=torch.long), torch.full((4,), 2)
    # The embedding starts at zero (every level the same network) and separates the levels once trained.
    torch.testing.assert_close(net(x, y0), net(x, y2))
    with torch.no_grad():
        net.embed.weight.normal_()
    assert not torch.allclose(net(x, y0), net(x, y2))
    assert net(x, y0).shape == (4, 3)
    # Each sample uses its own label's row.
    mixed = torch.tensor([0, 2, 0, 2])
    torch.testing.assert_close(net(x, mixed)[1], net(x, y2)[1])
    torch.testing.assert_close(net(x, mixed)[2], net(x, y0)[2])


def test_sigma_division_is_ncsnv2s_trick():
    torch.manual_seed(0)
    body = ScoreMLP(2, hidden=8)
    scaled = ScoreMLP(2, hidden=8, sigmas=SIGMAS)
    scaled.load_state_dict({**body.state_dict(), "sigmas": scaled.sigmas})
    assert scaled.conditioning == "labels" and scaled.sigmas.dtype == torch.float32
    x = torch.randn(3, 2)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(scaled(x, y), body(x) / SIGMAS[y][:, None])
    both = ScoreMLP(2, hidden=8, n_classes=3, sigmas=SIGMAS)
    assert set(both.state_dict()) >= {"sigmas", "embed.weight"}


def test_time_embedding():
    torch.manual_seed(0)
    net = ScoreMLP(2, hidden=16, time_embedding=True)
    assert net.conditioning == "time"
    x = torch.randn(5, 2)
    t = torch.linspace(1e-3, 1.0, 5)
    out = net(x, t)
    assert out.shape == (5, 2)
    assert not torch.allclose(net(x, torch.full((5,), 0.1)), net(x, torch.full((5,), 0.9)))
    tg = t.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x, tg).sum(), tg)
    assert float(grad.abs().max()) > 0
    net64 = ScoreMLP(2, hidden=16, time_embedding=True).double()
    assert net64(x.double(), t.double()).dtype == torch.float64


def test_state_dict_round_trip_and_divergence():
    torch.manual_seed(0)
    a = ScoreMLP(2, hidden=16, n_classes=3, sigmas=SIGMAS)
    torch.manual_seed(1)
    b = ScoreMLP(2, hidden=16, n_classes=3, sigmas=SIGMAS)
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(a(x, y), b(x, y))
    # Works through the Hutchinson op, labels through a closure, in both modes.
    fwd = hutchinson_divergence(lambda h: a(h, y), x, seed=0, mode="forward")[1]
    rev = hutchinson_divergence(lambda h: a(h, y), x, seed=0, mode="reverse")[1]
    torch.testing.assert_close(fwd, rev)


def test_trains_with_anneal_dsm():
    """A few hundred annealed-DSM steps on the NCSN mixture lower the loss (the training loop's use)."""
    torch.manual_seed(0)
    gmm = ncsn_toy_mixture()
    sigmas = torch.exp(torch.linspace(torch.log(torch.tensor(10.0)), 0.0, 5))
    net = ScoreMLP(2, hidden=64, n_classes=5, sigmas=sigmas)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    eval_x = gmm.sample(2048, seed=1)

    def eval_loss():
        with torch.no_grad():
            return float(losses.anneal_dsm(net, eval_x, sigmas, generator=torch.Generator().manual_seed(2)))

    before = eval_loss()
    for step in range(200):
        loss = losses.anneal_dsm(net, gmm.sample(256, seed=100 + step), sigmas)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # The loss is 1/2 E||sigma s + z||^2 per sample: D / 2 = 1 for s = 0; a good model gets well below it.
    assert after < 0.8 < before, f"anneal_dsm {before} -> {after}"


@pytest.mark.parametrize(
    "make, exc, name",
    [
        (lambda: ScoreMLP(0), ValueError, "dim"),
        (lambda: ScoreMLP(2, hidden=2.5), TypeError, "hidden"),
        (lambda: ScoreMLP(2, n_layers=0), ValueError, "n_layers"),
        (lambda: ScoreMLP(2, act="gelu"), ValueError, "act"),
        (lambda: ScoreMLP(2, n_classes=0), ValueError, "n_classes"),
        (lambda: ScoreMLP(2, n_classes=2, sigmas=SIGMAS), ValueError, "n_classes"),
        (lambda: ScoreMLP(2, sigmas=[1.0, -1.0]), ValueError, "sigmas"),
        (lambda: ScoreMLP(2, sigmas=SIGMAS, time_embedding=True), ValueError, "time_embedding"),
        (lambda: ScoreMLP(2, time_embedding=True, n_frequencies=0), ValueError, "n_frequencies"),
    ],
)
def test_bad_construction(make, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        make()


@pytest.mark.parametrize(
    "net, x, cond, exc, name",
    [
        (ScoreMLP(2), torch.zeros(3, 3), None, ValueError, "x"),
        (ScoreMLP(2), torch.zeros(3, 2, dtype=torch.long), None, TypeError, "x"),
        (ScoreMLP(2), torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), ValueError, "labels_or_t"),
        (ScoreMLP(2, n_classes=3), torch.zeros(3, 2), None, TypeError, "labels_or_t"),
        (ScoreMLP(2, n_classes=3), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), ValueError, "labels_or_t"),
        (ScoreMLP(2, n_classes=3), torch.zeros(3, 2), torch.zeros(3), TypeError, "labels_or_t"),
        (
            ScoreMLP(2, time_embedding=True),
            torch.zeros(3, 2),
            torch.zeros(3, dtype=torch.long),
            TypeError,
            "labels_or_t",
        ),
    ],
)
def test_bad_forward(net, x, cond, exc, name):
    with pytest.raises(exc, match=rf"^{name}\b"):
        net(x, cond)
