"""fastscore under torch.compile: every model traces whole, the fused ops stay in the graph, and the samplers
do not recompile from one step to the next.

Graphs are counted with ``torch._dynamo.explain`` (graph breaks) and ``torch._dynamo.testing.CompileCounter``
(compilations). Most checks use Dynamo with the eager or aot_eager backend (the same tracing, no code
generation: seconds per model); one test runs Inductor end to end on the smallest NCSNv2.
"""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torch._dynamo.testing

import fastscore
from fastscore.losses import anneal_dsm
from fastscore.models import ScoreMLP
from fastscore.models import get_config
from fastscore.models import get_model
from fastscore.models import get_sigmas
from fastscore.sampling import annealed_langevin
from fastscore.sampling import pc_sampler
from fastscore.sde import VPSDE

# (bundled config, image size): one of each architecture the runners build, at the smallest width
ARCHS = {
    "NCSNv2": ("cifar10", 32),
    "NCSN": ("ncsn_cifar10", 32),
    "NCSNv2Deeper": ("church", 64),
    "NCSNv2Deepest": ("ffhq", 64),
}
FUSED_OPS = ("fastscore.cond_instance_norm_fwd", "fastscore.elu_fwd", "fastscore.crp_pool_fwd")


def _model(arch: str, layers: str, *, patched: bool = False):
    name, size = ARCHS[arch]
    config = get_config(name)
    config.model.ngf = 4
    config.data.image_size = size
    torch.manual_seed(0)
    model = get_model(config, layers=layers)
    assert type(model).__name__ == arch
    return (fastscore.patch(model) if patched else model), config


def _inputs(config, n: int = 2):
    g = torch.Generator().manual_seed(1)
    size = config.data.image_size
    x = torch.rand(n, config.data.channels, size, size, generator=g)
    labels = torch.randint(0, len(get_sigmas(config)), (n,), generator=g)
    return x, labels


def _assert_agrees(got, expected, rel: float = 1e-4):
    """Compiled against eager: the same ops, in another order and with Inductor's (or torch's) elementwise code
    where eager runs fastscore's in-place ones, so equal to float32 rounding amplified by the network; a
    tolerance relative to the result's magnitude (a wrong op is off by the magnitude itself)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * scale)


def _explain(fn, *args):
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = torch._dynamo.explain(fn)(*args)
    return result, [str(w.message) for w in caught]


def _graph_ops(fn, *args) -> collections.Counter:
    """The call targets of the one graph Dynamo captures from fn(*args)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return collections.Counter(str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function")


CASES = [(arch, patched) for arch in ARCHS for patched in (False, True)]


def _case_id(case) -> str:
    arch, patched = case
    return f"{arch}-{'patched' if patched else 'fused'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_is_one_graph_with_the_fused_ops_in_it(case):
    arch, patched = case
    model, config = _model(arch, "reference" if patched else "fused", patched=patched)
    model.eval()
    x, labels = _inputs(config)
    with torch.no_grad():
        explained, caught = _explain(model, x, labels)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        assert caught == []
        ops = _graph_ops(model, x, labels)
        # the fused kernels run inside the compiled model, not a re-derivation of their reference
        assert ops["fastscore.cond_instance_norm_fwd"] > 0 or ops["fastscore.elu_fwd"] > 0
        assert ops["fastscore.crp_pool_fwd"] > 0
        counter = torch._dynamo.testing.CompileCounter()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        expected = model(x, labels)
        _assert_agrees(compiled(x, labels), expected)
        x2, labels2 = _inputs(config)
        compiled(x2.flip(0), labels2.flip(0))  # new values, same shapes: no recompilation
        assert counter.frame_count == 1


def _dsm_loss(model, sigmas):
    """ncsnv2's training loss (anneal_dsm) on given labels and noise."""

    def loss_fn(x, labels, noise):
        return anneal_dsm(model, x, sigmas, labels=labels, noise=noise)

    return loss_fn


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_training_step_is_one_graph_and_matches_eager(case):
    arch, patched = case
    model, config = _model(arch, "reference" if patched else "fused", patched=patched)
    model.train()
    sigmas = get_sigmas(config)
    x, labels = _inputs(config)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    eager = copy.deepcopy(model)
    loss_eager = _dsm_loss(eager, sigmas)
    loss_fn = _dsm_loss(model, sigmas)

    explained, caught = _explain(loss_fn, x, labels, noise)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert caught == []
    # forward and backward compiled (aot_eager: AOT autograd's joint graph, no code generation)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    loss = compiled(x, labels, noise)
    expected = loss_eager(x, labels, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        _assert_agrees(p.grad, q.grad, rel=1e-3)
    assert counter.frame_count == 1
    # the optimizer step traces whole too
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    explained, caught = _explain(optimizer.step)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_score_mlp_forward_and_training_step_trace_whole():
    model = ScoreMLP(2, 16, n_classes=5)
    sigmas = torch.tensor([1.0, 0.5, 0.25, 0.1, 0.05])
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 5
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    explained, caught = _explain(model, x, labels)
    assert (explained.graph_count, explained.graph_break_count, caught) == (1, 0, [])
    explained, caught = _explain(lambda x, y, z: anneal_dsm(model, x, sigmas, labels=y, noise=z), x, labels, noise)
    assert (explained.graph_count, explained.graph_break_count, caught) == (1, 0, [])


def test_annealed_langevin_runs_one_compiled_graph_for_every_step():
    model, config = _model("NCSNv2", "fused")
    model.eval()
    x, _ = _inputs(config)
    sigmas = get_sigmas(config)[:3]
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        got = annealed_langevin(compiled, x, sigmas, n_steps_each=2, step_lr=1e-5, seed=0)
        expected = annealed_langevin(model, x, sigmas, n_steps_each=2, step_lr=1e-5, seed=0)
    _assert_agrees(got, expected)
    assert counter.frame_count == 1


def test_pc_sampler_runs_one_compiled_graph_for_every_time():
    model = ScoreMLP(2, 16, time_embedding=True)
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    sde = VPSDE(beta_max=4.0, N=8)  # beta_max / N below 1: the discrete betas are probabilities
    with torch.no_grad():
        got = pc_sampler(compiled, sde, (16, 2), seed=0)
        expected = pc_sampler(model, sde, (16, 2), seed=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_inductor_compiles_a_patched_ncsnv2_forward_and_training_step():
    """The whole path a user takes: Inductor's generated code around the fused custom ops."""
    model, config = _model("NCSNv2", "reference", patched=True)
    x, labels = _inputs(config)
    sigmas = get_sigmas(config)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    model.eval()
    eager.eval()
    with torch.no_grad():
        _assert_agrees(torch.compile(model, fullgraph=True)(x, labels), eager(x, labels))
    model.train()
    eager.train()
    loss = torch.compile(_dsm_loss(model, sigmas), fullgraph=True)(x, labels, noise)
    expected = _dsm_loss(eager, sigmas)(x, labels, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    expected.backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        if q.grad is not None:
            _assert_agrees(p.grad, q.grad, rel=1e-3)
