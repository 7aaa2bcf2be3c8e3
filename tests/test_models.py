"""fastscore.models: the NCSN / NCSNv2 networks, their configs and checkpoints.

Sizes are checked against the spec's numbers for every bundled config (built on the meta device, so
the 94M-parameter FFHQ model costs nothing); the fused networks against the reference-layer networks
(the originals' numerics) on small configs, under every backend that runs here; and the originals'
conventions: NCSNv2* divide by sigmas[y], input rescaling, checkpoint layouts (ncsn, ncsnv2 with EMA,
``module.`` prefixes, plain state_dicts) and the errors for bad configs and foreign checkpoints.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from _backends import kernel_backends
from _backends import use
from _tolerance import RESULT_SCALE
from _tolerance import assert_float32_within_network_rounding
from _tolerance import assert_float64_matches
from _tolerance import default_dtype
from _tolerance import nearby
from _tolerance import rel_err

from fastscore import models
from fastscore.models import NCSN
from fastscore.models import CheckpointError
from fastscore.models import ConfigError
from fastscore.models import NCSNdeeper
from fastscore.models import NCSNv2
from fastscore.models import NCSNv2Deeper
from fastscore.models import NCSNv2Deepest
from fastscore.models import get_config
from fastscore.models import get_sigmas
from fastscore.models import load_checkpoint

# config -> (class, trainable parameters, state_dict keys) of the originals (docs/numerics.md#model-skeletons)
SIZES = {
    "mnist": (NCSN, 7_638_657, 173),
    "ncsn_cifar10": (NCSN, 30_117_635, 173),
    "ncsn_celeba": (NCSN, 30_117_635, 173),
    "cifar10": (NCSNv2, 29_694_083, 154),
    "celeba": (NCSNv2, 29_694_083, 154),
    "ncsn_original": (NCSNv2, 29_694_083, 154),
    "church": (NCSNv2Deeper, 83_445_379, 192),
    "bedroom": (NCSNv2Deeper, 83_445_379, 192),
    "tower": (NCSNv2Deeper, 83_445_379, 192),
    "ffhq": (NCSNv2Deepest, 94_132_611, 230),
}
NCSN_V1_KEYS = [
    "begin_conv.weight",
    "normalizer.embed.weight",
    "res2.0.conv1.weight",
    "res2.0.normalize2.embed.weight",
    "res2.0.conv2.conv.weight",
    "res2.0.shortcut.conv.weight",
    "res4.0.shortcut.weight",
    "refine2.adapt_convs.0.1_2_norm.embed.weight",
    "refine2.adapt_convs.1.2_1_conv.weight",
    "refine2.output_convs.1_1_conv.weight",
    "refine2.msf.convs.0.bias",
    "refine2.msf.norms.1.embed.weight",
    "refine2.crp.norms.0.embed.weight",
]


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad), len(model.state_dict())


def on_meta(name, layers="fused"):
    with torch.device("meta"):
        return models.get_model(name, layers=layers)


def tiny(name="demo_tiny", **model_fields):
    config = get_config(name)
    for key, value in model_fields.items():
        section, field = key.split("__")
        setattr(getattr(config, section), field, value)
    return config


# Small configs exercising every model class (and MNIST's 28 -> 14 with adjust_padding on res4).
SMALL = {
    "NCSNv2": (NCSNv2, tiny()),
    "NCSNv2Deeper": (NCSNv2Deeper, tiny(data__image_size=16, model__ngf=4)),
    "NCSNv2Deepest": (NCSNv2Deepest, tiny(data__image_size=16, model__ngf=4)),
    "NCSN-mnist28": (NCSN, tiny("mnist", model__ngf=4)),
    "NCSNdeeper": (NCSNdeeper, tiny(data__image_size=12, model__ngf=4)),
}


def pair(name, seed=0):
    """(fused, reference) models of a SMALL config with identical, perturbed weights."""
    cls, config = SMALL[name]
    torch.manual_seed(seed)
    ref = cls(config, layers="reference")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    fused = cls(config, layers="fused")
    fused.load_state_dict(ref.state_dict())
    return fused, ref


def inputs(model, batch=2, dtype=torch.float32):
    config = model.config
    gen = torch.Generator().manual_seed(2)
    size = config.data.image_size
    x = torch.rand(batch, config.data.channels, size, size, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, config.model.num_classes, (batch,), generator=gen)
    return x, y


pytestmark = pytest.mark.one_thread  # tiny tensors (see conftest.py)


# ---- sizes, keys, configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SIZES))
def test_parameter_and_state_dict_key_counts_match_the_originals(name):
    cls, params, keys = SIZES[name]
    model = on_meta(name)
    assert type(model) is cls
    assert count(model) == (params, keys)
    assert count(on_meta(name, "reference")) == (params, keys)


def test_bundled_configs_and_demo_configs_build_and_run():
    names = models.config_names()
    for name in [*SIZES, "demo_digits", "demo_tiny"]:
        assert name in names
    for name in ("demo_digits", "demo_tiny"):
        model = models.get_model(name)
        assert type(model) is NCSNv2
        x, y = inputs(model)
        out = model(x, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
    digits = get_config("demo_digits")
    assert (digits.data.channels, digits.data.image_size) == (1, 16) and 16 <= digits.model.ngf <= 32


def test_example_keys_and_registration_order():
    ncsn = on_meta("mnist")
    keys = list(ncsn.state_dict())
    for key in NCSN_V1_KEYS:
        assert key in keys, key
    # normalize1 is registered last in a residual block; adapt_convs, output_convs, msf, crp in a refine block.
    block = [k for k in keys if k.startswith("res2.0.")]
    order = [
        next(i for i, k in enumerate(block) if k.startswith(f"res2.0.{p}"))
        for p in ("conv1", "normalize2", "conv2", "shortcut", "normalize1")
    ]
    assert order == sorted(order)
    refine = [k.split(".")[1] for k in keys if k.startswith("refine2.")]
    assert list(dict.fromkeys(refine)) == ["adapt_convs", "output_convs", "msf", "crp"]
    v2 = on_meta("cifar10")
    keys = list(v2.state_dict())
    assert keys[:3] == ["sigmas", "begin_conv.weight", "begin_conv.bias"]
    for key in ("normalizer.alpha", "normalizer.gamma", "normalizer.beta", "res2.0.normalize1.alpha"):
        assert key in keys
    assert not any("_norm." in k for k in keys)  # no norms in NCSNv2's RCU blocks
    assert [k for k in keys if k.startswith("refine")][0].startswith("refine1.")
    deepest = list(on_meta("ffhq").state_dict())
    firsts = list(dict.fromkeys(k.split(".")[0] for k in deepest if k.startswith("refine")))
    assert firsts == ["refine1", "refine2", "refine3", "refine31", "refine4", "refine5"]


def test_fused_and_reference_models_have_identical_init_and_keys():
    for name in SMALL:
        cls, config = SMALL[name]
        torch.manual_seed(3)
        fused = cls(config)
        torch.manual_seed(3)
        ref = cls(config, layers="reference")
        assert list(fused.state_dict()) == list(ref.state_dict())
        for (k, a), (_, b) in zip(fused.state_dict().items(), ref.state_dict().items(), strict=True):
            assert torch.equal(a, b), f"{name}: {k}"
        assert [k for k, _ in fused.named_modules()] == [k for k, _ in ref.named_modules()]


def test_get_model_picks_the_class_as_the_originals():
    assert type(on_meta("cifar10")) is NCSNv2 and type(on_meta("church")) is NCSNv2Deeper
    assert type(on_meta("ffhq")) is NCSNv2Deepest and type(on_meta("mnist")) is NCSN
    config = get_config("cifar10")
    config.data.dataset = "SVHN"
    with pytest.raises(ConfigError, match=r"config\.data\.dataset.*SVHN"):
        models.get_model(config)
    config.model.arch = "NCSNdeeper"
    with torch.device("meta"):
        assert type(models.get_model(config)) is NCSNdeeper
    config.model.arch = "UNet"
    with pytest.raises(ConfigError, match=r"config\.model\.arch"):
        models.get_model(config)


def test_get_sigmas_geometric_and_uniform_as_ncsnv2():
    sigmas = get_sigmas(get_config("mnist"))
    assert sigmas.dtype == torch.float32 and sigmas.shape == (10,)
    spec = [1.0, 0.599484, 0.359381, 0.215443, 0.129155, 0.0774264, 0.0464159, 0.0278256, 0.016681, 0.01]
    assert np.allclose(sigmas.numpy(), spec, rtol=1e-5)
    config = get_config("cifar10")
    want = torch.tensor(np.exp(np.linspace(np.log(50), np.log(0.01), 232))).float()
    assert torch.equal(get_sigmas(config), want)
    config.model.sigma_dist = "uniform"
    assert torch.equal(get_sigmas(config), torch.tensor(np.linspace(50, 0.01, 232)).float())
    config.model.sigma_dist = "cosine"
    with pytest.raises(ConfigError, match=r"config\.model\.sigma_dist"):
        get_sigmas(config)


def test_get_config_names_paths_and_errors(tmp_path):
    config = get_config("cifar10")
    assert config.model.ngf == 128 and config.model.num_classes == 232 and config.optim.eps == 1e-8
    assert get_config("ffhq").optim.eps == 1e-3
    with pytest.raises(ValueError, match=r"unknown config 'cifar100'.*cifar10.*mnist"):
        get_config("cifar100")
    path = tmp_path / "mine.yml"
    path.write_text("data:\n  channels: 1\nmodel:\n  ngf: 4\n")
    assert get_config(str(path)).model.ngf == 4 and get_config(path).data.channels == 1
    with pytest.raises(ValueError, match="does not exist"):
        get_config(str(tmp_path / "missing.yml"))
    bad = tmp_path / "bad.yml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yml.*not valid YAML"):
        get_config(str(bad))
    assert get_config({"model": {"ngf": 2}}).model.ngf == 2


@pytest.mark.parametrize(
    ("section", "field", "value", "cls"),
    [
        ("model", "ngf", "wide", NCSNv2),
        ("model", "ngf", None, NCSN),
        ("model", "num_classes", 0, NCSNv2),
        ("data", "channels", -1, NCSN),
        ("data", "image_size", 8.5, NCSNv2),
        ("data", "logit_transform", "no", NCSNv2),
        ("model", "normalization", "GroupNorm", NCSNv2),
        ("model", "nonlinearity", "tanh", NCSNv2),
        ("model", "sigma_begin", -1, NCSNv2),
    ],
)
def test_bad_config_errors_name_the_field(section, field, value, cls):
    config = get_config("demo_tiny")
    if value is None:
        delattr(getattr(config, section), field)
    else:
        setattr(getattr(config, section), field, value)
    with pytest.raises(ValueError, match=rf"config\.{section}\.{field}"):
        cls(config)


def test_bad_layers_argument():
    with pytest.raises(ValueError, match="layers"):
        NCSNv2(get_config("demo_tiny"), layers="fast")


# ---- numerics: fused vs reference ----------------------------------------------------------------------------

BACKENDS = kernel_backends("cpu")


def results(model, point, grad=None):
    """[output, grad x, grad of every parameter] of ``model`` at ``point`` = (x, y) in x's dtype, with
    ``grad`` as the output's gradient; without ``grad``, [output] only."""
    x, y = point
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad is not None)
    with default_dtype(x.dtype):
        out = model(x, y)
    if grad is None:
        return [out.detach()]
    out.backward(grad.to(x.dtype))
    return [out.detach(), x.grad, *(p.grad for p in model.parameters())]


def in_float64(point):
    x, y = point
    return x.double(), y


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fused_matches_reference_forward_and_backward(name):
    """Output, grad x and every parameter gradient. float32: within the rounding error the float32
    reference network makes (no per-tensor ratio, and max pooling judged on the side of each near-tie the
    float32 run took: tests/_tolerance.py says why); float64: the same formulas, to float64 rounding."""
    fused, ref = pair(name)
    ref64 = copy.deepcopy(ref).double()
    x, y = inputs(ref, batch=3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    labels = ["output", "grad x", *(f"grad {k}" for k, _ in fused.named_parameters())]
    own = assert_float32_within_network_rounding(
        lambda point: results(fused, point, grad),
        lambda point: results(ref, point, grad),
        lambda point: results(ref64, in_float64(point), grad),
        nearby((x, y)),
        labels,
    )
    got64 = results(copy.deepcopy(fused).double(), in_float64((x, y)), grad)
    assert_float64_matches(got64, results(ref64, in_float64((x, y)), grad), labels, network_error=own)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_reference_under_each_backend(backend):
    fused, ref = pair("NCSNv2")
    ref64 = copy.deepcopy(ref).double()

    def loss_results(model, point):
        x, y = point
        x = x.detach().clone().requires_grad_()
        with default_dtype(x.dtype):
            out = model(x, y)
        out.square().sum().backward()
        return [out.detach(), x.grad]

    def fused_results(point):
        with use(backend):
            return loss_results(fused, point)

    # The fused network on one input per backend (the Triton interpreter takes seconds per pass), judged
    # against the reference's float32 rounding at all the nearby inputs.
    assert_float32_within_network_rounding(
        fused_results,
        lambda point: loss_results(ref, point),
        lambda point: loss_results(ref64, in_float64(point)),
        nearby(inputs(ref, batch=2)),
        ["output", "grad x"],
        fused_points=1,
    )


def test_channels_last_end_to_end_float64_and_bfloat16_autocast():
    fused, ref = pair("NCSNv2")
    ref64 = copy.deepcopy(ref).double()
    x, y = inputs(ref)
    seen = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] > 1:
            seen.append(output.is_contiguous(memory_format=torch.channels_last))

    handles = [m.register_forward_hook(hook) for m in fused.modules()]
    out = fused(x.contiguous(memory_format=torch.channels_last), y)
    for h in handles:
        h.remove()
    assert seen and all(seen), "an intermediate activation left channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last)
    # channels_last weights too (no per-call weight reorder); a contiguous checkpoint still loads into it.
    cl = copy.deepcopy(fused).to(memory_format=torch.channels_last)
    assert cl.begin_conv.weight.is_contiguous(memory_format=torch.channels_last)
    cl.load_state_dict(ref.state_dict())

    def channels_last(model):
        return lambda point: results(model, (point[0].contiguous(memory_format=torch.channels_last), point[1]))

    own = 0.0
    for model in (fused, cl):
        own = max(
            own,
            assert_float32_within_network_rounding(
                channels_last(model),
                lambda point: results(ref, point),
                lambda point: results(ref64, in_float64(point)),
                nearby((x, y)),
                ["channels_last output"],
            ),
        )
    # float64 works without changing the default dtype (the originals' MSF buffer would not:
    # docs/numerics.md#the-msf-sum-dtype)
    out64 = copy.deepcopy(fused).double()(x.double(), y)
    assert out64.dtype == torch.float64
    assert_float64_matches([out64], results(ref64, in_float64((x, y))), ["float64 output"], network_error=own)
    # bfloat16 autocast: the network amplifies bfloat16's rounding as it amplifies float32's (own: the
    # float32 reference's largest error), scaled by the ratio of their unit roundoffs, 2^-8 / 2^-24.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = fused(x.contiguous(memory_format=torch.channels_last), y)
    tol = RESULT_SCALE * own * 2.0**16
    err = rel_err(out_bf16.float(), results(ref64, in_float64((x, y)))[0])
    assert err <= tol, f"bfloat16 autocast output: error {err:.2e} > {tol:.2e}"
    assert tol < 0.5, "the network amplifies rounding too much for a bfloat16 comparison to mean anything"


# ---- the originals' conventions -----------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["fused", "reference"])
def test_ncsnv2_divides_by_sigmas_of_the_labels(layers):
    torch.manual_seed(0)
    model = NCSNv2(tiny(), layers=layers)
    x, _ = inputs(model, batch=4)
    y = torch.tensor([0, 3, 1, 3])
    out = model(x, y)
    sigmas = model.sigmas.clone()
    model.sigmas.fill_(1.0)
    raw = model(x, y)
    assert torch.equal(out, raw / sigmas[y].view(4, 1, 1, 1))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("cls", [NCSNv2, NCSN])
def test_input_rescaling_rules(cls):
    config = tiny() if cls is NCSNv2 else tiny("mnist", model__ngf=4)
    torch.manual_seed(0)
    model = cls(config)
    x, y = inputs(model)
    out = model(x, y)
    for flag in ("logit_transform", "rescaled"):
        other = copy.deepcopy(config)
        setattr(other.data, flag, True)
        raw = cls(other)
        raw.load_state_dict(model.state_dict())
        assert torch.equal(raw(2 * x - 1.0, y), out), f"{flag}=true must skip the 2x - 1 rescaling"


def test_ncsn_raw_score_is_conditional_and_not_divided():
    torch.manual_seed(0)
    model = NCSN(tiny("mnist", model__ngf=4))
    assert not hasattr(model, "sigmas")
    x, _ = inputs(model, batch=2)
    a = model(x, torch.tensor([0, 0]))
    b = model(x, torch.tensor([5, 5]))
    assert not torch.allclose(a, b)


def test_forward_argument_errors():
    model = NCSNv2(tiny())
    x, y = inputs(model)
    with pytest.raises(ValueError, match="x: expected 3 channels"):
        model(x[:, :1], y)
    with pytest.raises(ValueError, match="y: expected an int64"):
        model(x, y.float())
    with pytest.raises(ValueError, match=r"y: .*shape \(2,\)"):
        model(x, y[:1])


# ---- checkpoints ------------------------------------------------------------------------------------------------


def trained_pair():
    """A source model with non-default weights, a fresh target, and an EMA shadow unlike both."""
    torch.manual_seed(0)
    source = NCSNv2(tiny())
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1)
    target = NCSNv2(tiny())
    shadow = {k: p.detach() + 1.0 for k, p in source.named_parameters()}
    return source, target, shadow


def prefixed(state):
    return {f"module.{k}": v for k, v in state.items()}


def assert_state(model, state):
    own = model.state_dict()
    assert list(own) == list(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_checkpoint_ncsn_layout_with_module_prefix(tmp_path):
    source, target, _ = trained_pair()
    optimizer = torch.optim.Adam(source.parameters())
    path = tmp_path / "checkpoint.pth"
    torch.save([prefixed(source.state_dict()), optimizer.state_dict()], path)
    params = [id(p) for p in target.parameters()]
    assert load_checkpoint(path, target) is target
    assert_state(target, source.state_dict())
    assert [id(p) for p in target.parameters()] == params  # loaded in place


@pytest.mark.parametrize("ema", [True, False])
def test_checkpoint_ncsnv2_layout_selects_ema(tmp_path, ema):
    source, target, shadow = trained_pair()
    optimizer = torch.optim.Adam(source.parameters())
    path = tmp_path / "checkpoint_5000.pth"
    torch.save([prefixed(source.state_dict()), optimizer.state_dict(), 3, 5000, shadow], path)
    load_checkpoint(path, target, ema=ema)
    want = dict(source.state_dict())
    if ema:
        want.update(shadow)  # parameters from the EMA, the sigmas buffer from the model state
    assert_state(target, want)
    assert torch.equal(target.sigmas, source.sigmas)


def test_checkpoint_plain_state_dict_and_data_parallel_target(tmp_path):
    source, target, _ = trained_pair()
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    load_checkpoint(path, target)
    assert_state(target, source.state_dict())
    wrapped = nn.DataParallel(NCSNv2(tiny()))
    load_checkpoint(path, wrapped)
    assert_state(wrapped.module, source.state_dict())


def test_checkpoint_of_another_architecture_is_refused_and_nothing_changes(tmp_path):
    source, _, _ = trained_pair()
    path = tmp_path / "ncsnv2.pth"
    torch.save([prefixed(source.state_dict()), {}], path)
    other = NCSN(tiny("mnist", model__ngf=4))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, other)
    message = str(info.value)
    assert "ncsnv2.pth" in message and "missing" in message and "unexpected" in message
    assert "normalizer.embed.weight" in message and "sigmas" in message
    assert_state(other, before)
    wider = NCSNv2(tiny(model__ngf=16))
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatches \(begin_conv.weight: checkpoint \(8, 3, 3, 3\)"):
        load_checkpoint(path, wider)
    assert_state(wider, before)


def test_checkpoint_bad_ema_and_bad_files(tmp_path):
    source, target, shadow = trained_pair()
    before = copy.deepcopy(target.state_dict())
    shadow["not.a.parameter"] = torch.zeros(1)
    path = tmp_path / "ema.pth"
    torch.save([source.state_dict(), {}, 0, 0, shadow], path)
    with pytest.raises(CheckpointError, match="unexpected EMA keys.*not.a.parameter"):
        load_checkpoint(path, target)
    assert_state(target, before)
    load_checkpoint(path, target, ema=False)  # the EMA is not read at all
    assert_state(target, source.state_dict())
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(CheckpointError, match="junk.pth.*not a checkpoint layout"):
        load_checkpoint(junk, target)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth", target)


# ---- unreadable and corrupt checkpoint files ---------------------------------------------------------------


def fastscore_checkpoint(path):
    """A checkpoint as fastscore train writes it (model, Adam state after one step, EMA unlike the model)."""
    from fastscore.train import EMAHelper
    from fastscore.train import save_checkpoint

    torch.manual_seed(0)
    source = NCSNv2(tiny())
    optimizer = torch.optim.Adam(source.parameters())
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    source(x, y).square().mean().backward()
    optimizer.step()
    ema = EMAHelper(mu=0.9)
    ema.register(source)
    ema.shadow = {k: v + 1.0 for k, v in ema.shadow.items()}
    save_checkpoint(path, source, optimizer, ema, 0, 1, {"format": "fastscore-train-2"})
    return source, optimizer, ema


def test_unreadable_files_are_checkpoint_errors_naming_the_file(tmp_path):
    import fastscore

    assert fastscore.CheckpointError is CheckpointError
    fastscore_checkpoint(tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    target = NCSNv2(tiny())
    before = copy.deepcopy(target.state_dict())
    bad = tmp_path / "cut.pth"
    # truncated anywhere (torch fails with OSError, RuntimeError, EOFError, ... depending on where)
    for cut in sorted(set(range(0, 6000, 37)) | set(range(0, len(data), len(data) // 30))):
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"'.*cut\.pth' is not a readable torch checkpoint"):
            load_checkpoint(bad, target)
    text = tmp_path / "notes.pth"
    text.write_text("epoch 3, loss 0.1\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth' is not a readable torch checkpoint"):
        load_checkpoint(text, target)
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(CheckpointError, match=r"folder\.pth' is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path / "folder.pth", target)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth", target)
    assert_state(target, before)


def flip_bit(path, tensor, out):
    """Copy ``path`` to ``out`` with one bit flipped in the stored bytes of ``tensor``."""
    data = bytearray(path.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0, "the tensor's bytes must occur once in the file"
    data[at + len(raw) // 2] ^= 0x04
    out.write_bytes(bytes(data))
    return out


def test_a_flipped_bit_in_any_tensor_of_a_fastscore_checkpoint_is_detected(tmp_path):
    from fastscore.train import read_checkpoint

    path = tmp_path / "checkpoint.pth"
    source, optimizer, ema = fastscore_checkpoint(path)
    target = NCSNv2(tiny())
    load_checkpoint(path, target)  # intact: loads, EMA weights
    assert torch.equal(target.begin_conv.weight, ema.shadow["begin_conv.weight"])
    read_checkpoint(path)  # every checksum matches

    fresh = NCSNv2(tiny())
    before = copy.deepcopy(fresh.state_dict())
    model_bit = flip_bit(path, source.state_dict()["res1.0.conv1.weight"], tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match=r"model\.pth' is corrupt: the model tensors do not match"):
        load_checkpoint(model_bit, fresh)
    ema_bit = flip_bit(path, ema.shadow["end_conv.weight"], tmp_path / "ema.pth")
    with pytest.raises(CheckpointError, match="corrupt: the ema tensors"):
        load_checkpoint(ema_bit, fresh)
    assert_state(fresh, before)  # nothing was loaded
    load_checkpoint(ema_bit, fresh, ema=False)  # the EMA shadow is neither read nor checked
    moment = optimizer.state_dict()["state"][0]["exp_avg"]
    optim_bit = flip_bit(path, moment, tmp_path / "optim.pth")
    load_checkpoint(optim_bit, fresh)  # the weights are intact ...
    with pytest.raises(CheckpointError, match="corrupt: the optimizer tensors"):
        read_checkpoint(optim_bit)  # ... resuming reads the optimizer state too
