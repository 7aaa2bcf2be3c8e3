"""Noise-conditional classifiers for class-conditional sampling (score_sde's controllable generation).

A classifier ``c(x, sigma) -> logits`` of the data perturbed as the score model's is (VE: ``x + sigma z``),
conditioned on the noise level: :func:`fastscore.sampling.classifier_guidance` adds ``scale * grad_x log
softmax(c(x, sigma))_y`` to the model's score, which samples ``p_t(x | y)``.

* :class:`NoiseConditionalClassifier`: a small wide-ResNet-style CNN for images (score_sde's classifier for
  its CIFAR-10 guidance is a Wide-ResNet with a time embedding): the noise level enters as an embedding of
  ``log sigma`` (random Fourier features, then a linear map) added to every residual block, and the input is
  scaled by ``1 / sqrt(1 + sigma^2)`` so its magnitude stays near the data's at every level.
* :class:`ClassifierMLP`: the same for vectors (the 2-D toys): an MLP with the noise embedding added per layer.
* :func:`train_classifier`: cross-entropy on the labels, the data transformed as the score model's config says
  (``data_transform``) and perturbed with ``sigma`` drawn log-uniformly between the config's smallest and
  largest noise level (the VE SDE's ``sigma_t`` at a uniform time, which covers the discrete levels as well);
  Adam, seeded as :func:`fastscore.train.train`, checkpoint written atomically (:func:`fastscore.train.atomic_save`),
  progress by :class:`fastscore._progress.Progress`.
* :func:`save_classifier` / :func:`load_classifier`: a checkpoint ``{"classifier": state_dict,
  "fastscore_classifier": meta}``, meta holding the architecture's arguments, the noise range, the score
  model's config, the data's name and the run's settings.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from dataclasses import field as dc_field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

META_KEY = "fastscore_classifier"
CHECKPOINT_NAME = "classifier.pth"
_FORMAT = 1


class _NoiseEmbedding(nn.Module):
    """``log sigma`` -> ``dim`` features: fixed random Fourier features (score_sde's GaussianFourierProjection,
    scale 16 on log sigma) then a linear map and SiLU."""

    def __init__(self, dim: int, fourier: int = 16, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(fourier, generator=torch.Generator().manual_seed(0)) * scale)
        self.linear = nn.Linear(2 * fourier, dim)

    def forward(self, sigma: Tensor) -> Tensor:
        arg = torch.log(sigma)[:, None] * self.freqs[None, :] * (2 * math.pi)
        return F.silu(self.linear(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)))


def _sigma_rows(sigma, x: Tensor) -> Tensor:
    """``sigma`` (a number, a 0-d or (N,) tensor) as an (N,) tensor of x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.dim() == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma: expected a number or an ({x.shape[0]},) tensor, got shape {tuple(sigma.shape)}")
    return sigma


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class _Block(nn.Module):
    """A pre-activation wide-ResNet block (GroupNorm, SiLU, conv) with the noise embedding added after the first
    convolution; ``stride`` 2 halves the resolution."""

    def __init__(self, cin: int, cout: int, emb: int, stride: int = 1):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(e)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class NoiseConditionalClassifier(nn.Module):
    """Logits ``(N, num_classes)`` of images ``x`` (N, C, H, W) perturbed with noise of std ``sigma`` (a number
    or (N,)). Widths ``width, 2 width, 4 width`` over three stages (the last two halve the resolution), two
    blocks per stage, global average pooling, a linear head."""

    kind = "image"

    def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, emb: int = 64):
        super().__init__()
        self.args = {"channels": channels, "num_classes": num_classes, "width": width, "emb": emb}
        self.embed = _NoiseEmbedding(emb)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        widths = [width, 2 * width, 4 * width]
        blocks, cin = [], width
        for i, w in enumerate(widths):
            blocks.append(_Block(cin, w, emb, stride=1 if i == 0 else 2))
            blocks.append(_Block(w, w, emb))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.GroupNorm(_groups(cin), cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor, sigma) -> Tensor:
        sigma = _sigma_rows(sigma, x)
        e = self.embed(sigma)
        h = self.stem(x / torch.sqrt(1 + sigma**2)[:, None, None, None])
        for block in self.blocks:
            h = block(h, e)
        return self.head(F.silu(self.norm(h)).mean(dim=(2, 3)))


class ClassifierMLP(nn.Module):
    """Logits of vectors ``x`` (N, dim) perturbed with noise of std ``sigma``: ``depth`` SiLU layers of
    ``hidden`` units, the noise embedding added to each."""

    kind = "mlp"

    def __init__(self, dim: int = 2, num_classes: int = 2, hidden: int = 128, depth: int = 3, emb: int = 64):
        super().__init__()
        self.args = {"dim": dim, "num_classes": num_classes, "hidden": hidden, "depth": depth, "emb": emb}
        self.embed = _NoiseEmbedding(emb)
        self.layers = nn.ModuleList([nn.Linear(dim if i == 0 else hidden, hidden) for i in range(depth)])
        self.embs = nn.ModuleList([nn.Linear(emb, hidden) for _ in range(depth)])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, sigma) -> Tensor:
        sigma = _sigma_rows(sigma, x)
        e = self.embed(sigma)
        h = x / torch.sqrt(1 + sigma**2)[:, None]
        for layer, emb in zip(self.layers, self.embs):
            h = F.silu(layer(h) + emb(e))
        return self.head(h)


_KINDS = {"image": NoiseConditionalClassifier, "mlp": ClassifierMLP}


def classifier_for(config, num_classes: int, **kwargs) -> nn.Module:
    """The classifier for a score model's config: :class:`ClassifierMLP` for a ScoreMLP config (``data.dim``),
    :class:`NoiseConditionalClassifier` for images (``data.channels``)."""
    from fastscore.model_sampling import is_toy
    from fastscore.models.configs import field

    if is_toy(config):
        return ClassifierMLP(field(config, "data.dim", "int+"), num_classes, **kwargs)
    return NoiseConditionalClassifier(field(config, "data.channels", "int+"), num_classes, **kwargs)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def save_classifier(path, model: nn.Module, meta: dict) -> None:
    """``{"classifier": state_dict, "fastscore_classifier": meta + the architecture}``, written atomically."""
    from fastscore.train import atomic_save

    full = {**meta, "format": _FORMAT, "kind": model.kind, "args": dict(model.args)}
    atomic_save({"classifier": {k: v.contiguous() for k, v in model.state_dict().items()}, META_KEY: full}, path)


def load_classifier(path, *, map_location="cpu"):
    """``(classifier, meta)`` from a :func:`save_classifier` checkpoint, in eval mode. ``FileNotFoundError`` for a
    missing file; :class:`fastscore.models.CheckpointError` for one that is not a classifier checkpoint."""
    from fastscore.models.checkpoints import CheckpointError
    from fastscore.models.checkpoints import read_torch_file

    where = f"classifier checkpoint {os.fspath(path)!r}"
    ckpt = read_torch_file(path, map_location=map_location, what="classifier checkpoint")
    if not isinstance(ckpt, dict) or META_KEY not in ckpt or "classifier" not in ckpt:
        raise CheckpointError(f"{where} is not a classifier checkpoint (written by `fastscore train --classifier`)")
    meta = ckpt[META_KEY]
    if meta.get("kind") not in _KINDS:
        raise CheckpointError(f"{where}: unknown classifier kind {meta.get('kind')!r}")
    model = _KINDS[meta["kind"]](**meta["args"])
    try:
        model.load_state_dict(ckpt["classifier"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where} does not fit its own architecture: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, meta


# ---- training --------------------------------------------------------------------------------------------------


@dataclass
class ClassifierResult:
    checkpoint: str | None
    step: int
    loss: float
    seconds: float
    losses: list[float] = dc_field(default_factory=list)


def noise_range(config) -> tuple[float, float]:
    """``(sigma_min, sigma_max)`` of a score model's config: its smallest and largest noise level."""
    from fastscore.models import get_sigmas

    sigmas = get_sigmas(config).double()
    return float(sigmas.min()), float(sigmas.max())


def perturb(x: Tensor, sigma_min: float, sigma_max: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(x + sigma z, sigma)`` with ``sigma = sigma_min (sigma_max / sigma_min)^u``, u ~ U[0, 1) per row (the VE
    SDE's marginal std at a uniform time) and z standard normal, both from ``gen``."""
    u = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype)
    sigma = sigma_min * (sigma_max / sigma_min) ** u
    z = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + sigma.reshape((-1,) + (1,) * (x.dim() - 1)) * z, sigma


def train_classifier(
    config,
    data: Tensor,
    labels: Tensor,
    path=None,
    *,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    num_classes: int | None = None,
    model: nn.Module | None = None,
    data_name: str = "tensor",
    progress: bool = True,
    **arch,
) -> tuple[nn.Module, ClassifierResult]:
    """Train a noise-conditional classifier of ``data`` (N, C, H, W) images in [0, 1], or (N, D) vectors for a
    ScoreMLP config) with integer ``labels`` (N,), under the noise of the score model ``config`` describes
    (module docstring); write it to ``path`` (a .pth file; None: not written). Returns ``(classifier,
    ClassifierResult)``; the classifier in eval mode.

    Seeds as :func:`fastscore.train.train`: the initial weights from ``torch.manual_seed(seed)``, the data order
    from a generator seeded ``seed``, the noise levels and the noise from one seeded ``seed + 1``. ``model``:
    a classifier to train instead of a new one (:func:`classifier_for` with ``arch``)."""
    from fastscore._progress import Progress
    from fastscore.data.images import data_transform
    from fastscore.model_sampling import is_toy
    from fastscore.models import get_config
    from fastscore.models.configs import namespace2dict
    from fastscore.train import TrainError
    from fastscore.train import check_seed

    config = get_config(config)
    seed = check_seed(seed)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != data.shape[0]:
        raise TrainError(f"labels: expected an ({data.shape[0]},) tensor of classes, one per example")
    labels = labels.long()
    if len(labels) == 0 or int(labels.min()) < 0:
        raise TrainError("labels: expected non-negative class indices and at least one example")
    num_classes = num_classes or int(labels.max()) + 1
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise TrainError(f"{name}: expected a positive integer, got {value!r}")
    sigma_min, sigma_max = noise_range(config)
    torch.manual_seed(seed)
    if model is None:
        model = classifier_for(config, num_classes, **arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    toy = is_toy(config)
    result = ClassifierResult(checkpoint=None if path is None else os.fspath(path), step=0, loss=math.nan, seconds=0.0)
    bar = Progress(steps, "train classifier", unit="step", enabled=progress)
    start = time.perf_counter()
    order, position = None, 0
    model.train()
    try:
        for step in range(1, steps + 1):
            if order is None or position >= len(data):
                order, position = torch.randperm(len(data), generator=data_gen), 0
            index = order[position : position + batch_size]
            position += len(index)
            x = data[index].float()
            if not toy:
                x = data_transform(config, x, generator=noise_gen)
            xt, sigma = perturb(x, sigma_min, sigma_max, noise_gen)
            loss = F.cross_entropy(model(xt, sigma), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result.loss = float(loss.detach())
            if not math.isfinite(result.loss):
                raise TrainError(f"the classifier's loss is {result.loss} at step {step}: lower the learning rate")
            result.losses.append(result.loss)
            result.step = step
            bar.update(1, postfix=f"loss {result.loss:.4g}")
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    if path is not None:
        meta = {
            "config": namespace2dict(config),
            "sigma_min": sigma_min,
            "sigma_max": sigma_max,
            "num_classes": num_classes,
            "data": data_name,
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "loss": result.loss,
        }
        save_classifier(path, model, meta)
    return model, result


def digits_labels() -> Tensor:
    """The classes (0-9) of scikit-learn's digits, in the order :func:`fastscore.data.images.load_digits` gives
    the images."""
    from sklearn.datasets import load_digits

    return torch.as_tensor(load_digits().target, dtype=torch.int64)
