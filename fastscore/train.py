"""Training score networks as ncsnv2's runner does, resumable bitwise: :func:`train`.

One loop for the image models (NCSN / NCSNv2 family, from a config) and the toy :class:`ScoreMLP` on 2-D
data. Per step, as ermongroup/ncsnv2's ``NCSNRunner.train``: ``data_transform``, the loss, ``zero_grad``,
``backward``, the optimizer step (Adam / RMSProp / SGD from ``config.optim``), then the EMA update
(ncsnv2's ``EMAHelper``: ``s <- (1 - mu) p + mu s``, no warm-up). Losses (fastscore.losses):

* ``"dsm"`` (default): annealed denoising score matching, ``anneal_power`` from ``config.training``;
* ``"ssm"``: annealed sliced score matching (ncsn's ``anneal_sliced_score_estimation_vr``);
* ``"sde"``: continuous-time DSM on the VE SDE with ``sigma_min/max = sigma_end/begin`` (score_sde); an
  NCSNv2 network gets the time as score_sde feeds a discrete-label model, ``round((T - t)(L - 1))``.

Checkpoints are ncsnv2's list ``[model_state, optimizer_state, epoch, step, ema_shadow]`` (so
:func:`fastscore.models.load_checkpoint` and ncsnv2 itself read them) plus a sixth entry, a dict of what
resuming needs: the random generators' states, the data order of the current epoch and the position in it,
the config and the data set's name. Every file is written to a temporary name and renamed into place, so
an interrupted run never leaves a torn checkpoint. Resuming from step k and stopping at n gives bitwise the
weights of one uninterrupted run to n (same machine, thread count and backend).

Randomness: the data order comes from one ``torch.Generator`` (seeded ``seed``), the loss's noise levels
and noise from another (seeded ``seed + 1``); the model's initial weights from ``torch.manual_seed(seed)``.
Snapshot sample grids use the samplers' own counter-based noise, so they change nothing in training.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
import torch.nn as nn
from torch import Tensor

from fastscore.data.images import data_transform
from fastscore.data.images import inverse_data_transform
from fastscore.data.images import save_image_grid
from fastscore.models import ConfigError
from fastscore.models import get_config
from fastscore.models import get_model
from fastscore.models import get_sigmas
from fastscore.models import namespace2dict
from fastscore.models.configs import dict2namespace
from fastscore.models.configs import field

__all__ = [
    "EMAHelper",
    "TrainError",
    "TrainResult",
    "LOSSES",
    "train",
    "build_model",
    "toy_config",
    "get_optimizer",
    "save_checkpoint",
    "read_checkpoint",
    "export_checkpoint",
    "model_from_checkpoint",
    "sample",
]

LOSSES = ("dsm", "ssm", "sde")
CHECKPOINT_NAME = "checkpoint.pth"
_FORMAT = "fastscore-train-1"


class TrainError(ValueError):
    """Training cannot start or resume: bad settings, data that does not fit the model, an unusable checkpoint."""


# ---- EMA (ncsnv2 models/ema.py) -------------------------------------------------------------------------------


class EMAHelper:
    """ncsnv2's ``EMAHelper(mu)``: a shadow copy of every trainable parameter, keyed by its (un-prefixed) name.

    ``update``: ``shadow <- (1 - mu) * param + mu * shadow`` (ncsnv2's arithmetic order; no warm-up), so
    after ``n`` updates the initial weights still carry ``mu**n`` of the average: with ``mu = 0.999`` train
    for many thousand steps or lower ``model.ema_rate``. ``state_dict()`` is the shadow dict itself, which is
    what ncsnv2 writes as the fifth checkpoint entry.
    """

    def __init__(self, mu: float = 0.999):
        self.mu = float(mu)
        self.shadow: dict[str, Tensor] = {}

    @staticmethod
    def _named(module: nn.Module):
        module = module.module if isinstance(module, nn.DataParallel) else module
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def register(self, module: nn.Module) -> None:
        for name, param in self._named(module):
            self.shadow[name] = param.data.clone()

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in self._named(module):
            self.shadow[name] = (1.0 - self.mu) * param.data + self.mu * self.shadow[name]

    @torch.no_grad()
    def ema(self, module: nn.Module) -> None:
        """Copy the averaged weights into ``module``."""
        for name, param in self._named(module):
            param.data.copy_(self.shadow[name])

    def ema_copy(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` holding the averaged weights (``module`` is unchanged)."""
        twin = copy.deepcopy(module)
        self.ema(twin)
        return twin

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


# ---- models, optimizers, configs ----------------------------------------------------------------------------


def toy_config(data: Tensor, *, name: str = "toy") -> object:
    """A config for the toy ScoreMLP on (N, D) data: 10 geometric noise levels from the data's largest
    pairwise distance (ncsnv2's technique 1: sigma_1 about the largest distance between two training points)
    down to 1% of its per-coordinate standard deviation."""
    sub = data[:2000].double()
    sigma_begin = float(torch.cdist(sub, sub).max())
    sigma_end = 0.01 * float(data.double().std(dim=0).mean())
    return dict2namespace(
        {
            "training": {"batch_size": 128, "n_iters": 5001, "snapshot_freq": 1000, "anneal_power": 2},
            "sampling": {"batch_size": 1280, "n_steps_each": 100, "step_lr": 0.00002, "denoise": True},
            "data": {"dataset": name, "dim": int(data.shape[1])},
            "model": {
                "arch": "ScoreMLP",
                "hidden": 128,
                "n_layers": 2,
                "sigma_begin": round(sigma_begin, 4),
                "sigma_end": round(sigma_end, 6),
                "num_classes": 10,
                "sigma_dist": "geometric",
                "ema": True,
                "ema_rate": 0.999,
            },
            "optim": {
                "optimizer": "Adam",
                "lr": 0.001,
                "weight_decay": 0.0,
                "beta1": 0.9,
                "amsgrad": False,
                "eps": 1e-8,
            },
        }
    )


def build_model(config, *, loss: str = "dsm", layers: str = "fused") -> nn.Module:
    """The network ``config`` describes: an image model by :func:`fastscore.models.get_model`, or, for
    ``model.arch: ScoreMLP``, a :class:`fastscore.models.mlp.ScoreMLP` conditioned on the noise level
    (labels and division by sigma; time for ``loss="sde"``)."""
    if field(config, "model.arch", "any", None) == "ScoreMLP":
        from fastscore.models.mlp import ScoreMLP

        dim = field(config, "data.dim", "int+", who="ScoreMLP")
        hidden = field(config, "model.hidden", "int+", 128, who="ScoreMLP")
        n_layers = field(config, "model.n_layers", "int+", 2, who="ScoreMLP")
        if loss == "sde":
            return ScoreMLP(dim, hidden, n_layers, time_embedding=True)
        sigmas = get_sigmas(config).cpu()
        return ScoreMLP(dim, hidden, n_layers, n_classes=len(sigmas), sigmas=sigmas)
    return get_model(config, layers=layers)


def get_optimizer(config, parameters) -> torch.optim.Optimizer:
    """ncsnv2's ``get_optimizer``: Adam (betas (beta1, 0.999), amsgrad, eps), RMSProp or SGD (momentum 0.9)."""
    name = field(config, "optim.optimizer", "str", "Adam", who="the optimizer")
    lr = field(config, "optim.lr", "number+", who="the optimizer")
    wd = field(config, "optim.weight_decay", "any", 0.0)
    if name == "Adam":
        beta1 = field(config, "optim.beta1", "any", 0.9)
        amsgrad = field(config, "optim.amsgrad", "bool", False)
        eps = field(config, "optim.eps", "number+", 1e-8)
        return torch.optim.Adam(parameters, lr=lr, weight_decay=wd, betas=(beta1, 0.999), amsgrad=amsgrad, eps=eps)
    if name == "RMSProp":
        return torch.optim.RMSprop(parameters, lr=lr, weight_decay=wd)
    if name == "SGD":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    raise ConfigError(f"config.optim.optimizer: expected Adam, RMSProp or SGD, got {name!r}")


def _is_toy(config) -> bool:
    return field(config, "model.arch", "any", None) == "ScoreMLP"


def _check_data(config, data: Tensor) -> None:
    if not isinstance(data, Tensor) or not data.is_floating_point():
        raise TrainError(f"data: expected a float tensor, got {type(data).__name__}")
    if data.shape[0] < 1:
        raise TrainError("data: holds no examples")
    if _is_toy(config):
        dim = field(config, "data.dim", "int+", who="ScoreMLP")
        if data.dim() != 2 or data.shape[1] != dim:
            raise TrainError(f"data: the ScoreMLP config expects (N, {dim}) vectors, got shape {tuple(data.shape)}")
        return
    size = field(config, "data.image_size", "int+", who="training")
    channels = field(config, "data.channels", "int+", who="training")
    if data.dim() != 4 or tuple(data.shape[1:]) != (channels, size, size):
        raise TrainError(
            f"data: the config's model takes ({channels}, {size}, {size}) images, got examples of shape "
            f"{tuple(data.shape[1:])}"
        )


# ---- checkpoints ---------------------------------------------------------------------------------------------


def atomic_save(obj, path) -> None:
    """``torch.save`` to a temporary file in the destination's folder, then ``os.replace`` onto ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plain_state(state: dict) -> dict:
    # channels_last weights are saved contiguous: the file then loads into either memory format unchanged.
    return {k: v.contiguous() if isinstance(v, Tensor) else v for k, v in state.items()}


def save_checkpoint(path, model, optimizer, ema, epoch: int, step: int, extra: dict) -> None:
    """ncsnv2's list layout plus fastscore's resume state, written atomically."""
    states = [
        _plain_state(model.state_dict()),
        optimizer.state_dict(),
        epoch,
        step,
        _plain_state(ema.state_dict()) if ema is not None else None,
        extra,
    ]
    atomic_save(states, path)


def read_checkpoint(path) -> list:
    """The raw checkpoint list (ncsnv2 layout) with tensors on the CPU; :class:`TrainError` if unreadable."""
    if not os.path.isfile(path):
        raise TrainError(f"checkpoint {os.fspath(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not a checkpoint we can read"
        raise TrainError(f"checkpoint {os.fspath(path)!r} is not a readable torch checkpoint ({exc})") from None
    return ckpt


def checkpoint_meta(ckpt) -> dict | None:
    """fastscore's sixth entry of a checkpoint list (config, data, loss, ...), or None for a foreign file."""
    if isinstance(ckpt, (list, tuple)) and len(ckpt) >= 6 and isinstance(ckpt[5], dict):
        if ckpt[5].get("format") == _FORMAT:
            return ckpt[5]
    return None


def export_checkpoint(src, dst, *, half: bool = True) -> int:
    """A small sampling checkpoint from a training one: the EMA weights (when there are any) as the model
    state, float16 parameters (``half``; buffers such as ``sigmas`` stay float32), no optimizer state.
    Still ncsnv2's list layout, so :func:`fastscore.models.load_checkpoint` reads it. Returns its size in bytes."""
    ckpt = read_checkpoint(src)
    meta = checkpoint_meta(ckpt)
    if meta is None:
        raise TrainError(f"checkpoint {os.fspath(src)!r} was not written by fastscore train")
    state = dict(ckpt[0])
    if isinstance(ckpt[4], dict):
        state.update(ckpt[4])
    params = set(ckpt[4]) if isinstance(ckpt[4], dict) else set()
    if half:
        state = {k: v.half() if k in params and v.is_floating_point() else v for k, v in state.items()}
    keep = {k: meta[k] for k in ("format", "config", "arch", "data", "loss", "seed", "step") if k in meta}
    keep["exported"] = {"ema": bool(params), "half": half}
    atomic_save([state, {}, ckpt[2], ckpt[3], None, keep], dst)
    return os.path.getsize(dst)


def model_from_checkpoint(path, *, config=None, ema: bool = True, layers: str = "fused"):
    """``(model, config, meta)`` from a checkpoint: the config saved in it by ``fastscore train`` (or
    ``config`` for the original repos' files), weights by :func:`fastscore.models.load_checkpoint` (EMA by
    default). Raises :class:`TrainError` for a missing config and ``CheckpointError`` for a misfit."""
    from fastscore.models import load_checkpoint

    ckpt = read_checkpoint(path)
    meta = checkpoint_meta(ckpt) or {}
    if config is None:
        if "config" not in meta:
            raise TrainError(
                f"checkpoint {os.fspath(path)!r} carries no config (not written by fastscore train): pass its config"
            )
        config = dict2namespace(meta["config"])
    else:
        config = get_config(config)
    model = build_model(config, loss=meta.get("loss", "dsm"), layers=layers)
    load_checkpoint(path, model, ema=ema)
    model.eval()
    return model, config, meta


# ---- sampling a model ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample(
    model: nn.Module,
    config,
    n: int,
    *,
    seed: int = 0,
    n_steps_each: int | None = None,
    step_lr: float | None = None,
    denoise: bool | None = None,
    progress: bool = False,
    init: Tensor | None = None,
) -> Tensor:
    """``n`` samples by ncsnv2's annealed Langevin dynamics (``config.sampling`` unless overridden), images
    mapped back to [0, 1] (``inverse_data_transform``). Start: ``U[0, 1)`` images through ``data_transform``
    (ncsnv2), or ``sigma_1 z`` for vectors; both from ``seed``."""
    from fastscore.sampling import annealed_langevin

    sigmas = get_sigmas(config).cpu()
    n_steps_each = n_steps_each or field(config, "sampling.n_steps_each", "int+", 100)
    step_lr = step_lr or field(config, "sampling.step_lr", "number+", 2e-5)
    if denoise is None:
        denoise = field(config, "sampling.denoise", "bool", True)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        x = init
    elif _is_toy(config):
        x = torch.randn(n, field(config, "data.dim", "int+"), generator=gen) * float(sigmas[0])
    else:
        c, s = config.data.channels, config.data.image_size
        x = data_transform(config, torch.rand(n, c, s, s, generator=gen))
    out = annealed_langevin(
        model, x.to(device), sigmas.to(device), n_steps_each=n_steps_each, step_lr=step_lr, denoise=denoise,
        seed=seed, progress=progress,
    )  # fmt: skip
    return out if _is_toy(config) else inverse_data_transform(config, out)


# ---- progress -------------------------------------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else a line on stderr every ~5% of the steps."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total, self.n, self.initial = total, initial, initial
        self.every = max(1, (total - initial) // 20)
        self.start = time.perf_counter()
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.n % self.every == 0 or self.n == self.total):
            rate = (time.perf_counter() - self.start) / max(1, self.n - self.initial)
            print(f"train: step {self.n}/{self.total}  loss {loss:.4g}  ({rate:.2f} s/step)", file=sys.stderr)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the loop --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    checkpoint: str
    step: int
    loss: float
    seconds: float
    samples: list[str] = dc_field(default_factory=list)
    losses: list[float] = dc_field(default_factory=list)


def _loss_fn(loss: str, model: nn.Module, config, sigmas: Tensor, gen: torch.Generator):
    from fastscore import losses

    anneal_power = float(field(config, "training.anneal_power", "any", 2.0))
    if loss == "dsm":
        return lambda x: losses.anneal_dsm(model, x, sigmas, None, anneal_power, generator=gen)
    if loss == "ssm":
        return lambda x: losses.anneal_sliced_score_matching(model, x, sigmas, generator=gen)
    from fastscore.sde import VESDE

    sde = VESDE(sigma_min=float(sigmas[-1]), sigma_max=float(sigmas[0]), N=len(sigmas))
    if _is_toy(config):
        # The time-conditioned MLP learns sigma_t * score; dividing by sigma_t is the caller's (score_sde's
        # scale_by_sigma).
        def score_fn(x, t):
            return model(x, t) / sde.marginal_prob(x, t)[1][:, None]
    else:

        def score_fn(x, t):
            return model(x, torch.round((sde.T - t) * (sde.N - 1)).long())

    return lambda x: losses.sde_dsm(score_fn, sde, x, generator=gen)


def train(
    config,
    data: Tensor,
    out_dir,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    resume: bool = False,
    loss: str | None = None,
    snapshot_freq: int | None = None,
    snapshot_samples: int = 36,
    snapshot_steps_each: int = 5,
    data_name: str = "tensor",
    progress: bool = True,
    channels_last: bool | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train the network ``config`` describes on ``data`` (N, C, H, W) images in [0, 1] (or (N, D) vectors
    for a ScoreMLP config) until step ``steps`` (default ``config.training.n_iters``), writing
    ``out_dir/checkpoint.pth`` at every snapshot (``snapshot_freq``, default ``config.training.snapshot_freq``)
    and at the end, plus ``out_dir/samples_<step>.png`` (a grid of ``snapshot_samples`` EMA samples with
    ``snapshot_steps_each`` Langevin steps per level; 0 for none) for image models.

    ``resume=True`` continues from ``out_dir/checkpoint.pth``: weights, optimizer, EMA, step, data order
    and generators as they were, so the result is bitwise that of one run; the checkpoint's config, loss,
    batch size and seed are used and must not contradict the ones given. ``channels_last`` (default: on
    for image models on the CPU, where it is the fastest layout) changes no result beyond rounding.
    """
    if loss is not None and loss not in LOSSES:
        raise TrainError(f"loss: expected one of {', '.join(LOSSES)}, got {loss!r}")
    out_dir = os.fspath(out_dir)
    path = os.path.join(out_dir, CHECKPOINT_NAME)
    device = torch.device(device)
    ckpt = None
    if resume:
        ckpt = read_checkpoint(path)
        meta = checkpoint_meta(ckpt)
        if meta is None or "resume" not in meta:
            raise TrainError(f"{path!r} has no resume state (not a training checkpoint of fastscore train)")
        config = dict2namespace(meta["config"])
        for name, given, saved in (("loss", loss, meta["loss"]), ("batch size", batch_size, meta["batch_size"])):
            if given is not None and given != saved:
                raise TrainError(f"--resume: the run in {out_dir!r} was started with {name} {saved}, not {given}")
        loss, batch_size, seed = meta["loss"], meta["batch_size"], meta["seed"]
    else:
        config = get_config(config)
        loss = loss or "dsm"
    _check_data(config, data)
    steps = steps or field(config, "training.n_iters", "int+", who="training")
    batch_size = batch_size or field(config, "training.batch_size", "int+", who="training")
    snapshot_freq = snapshot_freq or field(config, "training.snapshot_freq", "int+", 1000)
    if channels_last is None:
        channels_last = device.type == "cpu" and not _is_toy(config)

    torch.manual_seed(seed)
    model = build_model(config, loss=loss).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = get_optimizer(config, model.parameters())
    use_ema = field(config, "model.ema", "bool", False)
    ema = EMAHelper(mu=field(config, "model.ema_rate", "any", 0.999)) if use_ema else None
    if ema is not None:
        ema.register(model)
    sigmas = get_sigmas(config).to(device)
    data_gen = torch.Generator().manual_seed(seed)
    loss_gen = torch.Generator(device=device).manual_seed(seed + 1)
    epoch, step, position = 0, 0, 0
    order = None
    if ckpt is not None:
        model.load_state_dict(ckpt[0])
        optimizer.load_state_dict(ckpt[1])
        epoch, step = int(ckpt[2]), int(ckpt[3])
        if ema is not None:
            ema.load_state_dict(ckpt[4])
        state = ckpt[5]["resume"]
        order, position = state["order"], int(state["position"])
        data_gen.set_state(state["data_rng"])
        loss_gen.set_state(state["loss_rng"])
        torch.set_rng_state(state["torch_rng"])
        if step >= steps:
            raise TrainError(f"--resume: the run in {out_dir!r} is already at step {step} (asked for {steps})")
    os.makedirs(out_dir, exist_ok=True)

    objective = _loss_fn(loss, model, config, sigmas, loss_gen)
    n = data.shape[0]
    meta_common = {
        "format": _FORMAT,
        "config": namespace2dict(config),
        "arch": type(model).__name__,
        "data": data_name,
        "loss": loss,
        "seed": seed,
        "batch_size": batch_size,
    }

    def extra():
        return {
            **meta_common,
            "step": step,
            "resume": {
                "order": order,
                "position": position,
                "data_rng": data_gen.get_state(),
                "loss_rng": loss_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            },
        }

    result = TrainResult(checkpoint=path, step=step, loss=math.nan, seconds=0.0)
    bar = _Progress(steps, step, progress)
    start = time.perf_counter()
    model.train()
    try:
        while step < steps:
            if order is None or position >= n:
                if order is not None:
                    epoch += 1
                order, position = torch.randperm(n, generator=data_gen), 0
            index = order[position : position + batch_size]
            position += len(index)
            x = data_transform(config, data[index], generator=loss_gen).to(device)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            step += 1
            value = objective(x)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            result.loss = float(value.detach())
            if not math.isfinite(result.loss):
                raise TrainError(f"the loss is {result.loss} at step {step}: lower optim.lr or check the data")
            result.losses.append(result.loss)
            bar.update(result.loss)
            if step % snapshot_freq == 0 or step == steps:
                save_checkpoint(path, model, optimizer, ema, epoch, step, extra())
                if snapshot_samples and not _is_toy(config):
                    grid = os.path.join(out_dir, f"samples_{step}.png")
                    twin = ema.ema_copy(model) if ema is not None else model
                    twin.eval()
                    images = sample(twin, config, snapshot_samples, seed=seed, n_steps_each=snapshot_steps_each)
                    model.train()
                    save_image_grid(grid, images, scale=2)
                    result.samples.append(grid)
                bar.write(f"step {step}: loss {result.loss:.4g}, checkpoint {path}")
    finally:
        bar.close()
    result.step = step
    result.seconds = time.perf_counter() - start
    return result
