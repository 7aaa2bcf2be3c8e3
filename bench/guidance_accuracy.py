"""Class-conditional sampling of the shipped digits model with a noise-conditional classifier.

1. Train a :class:`fastscore.models.NoiseConditionalClassifier` on scikit-learn's digits under the shipped
   model's noise (demo_digits: sigma from 0.01 to 5), or read one (``--classifier``, e.g. the output of
   ``fastscore train --classifier``).
2. Sample ``--per-class`` digits of each class from fastscore/checkpoints/demo_digits.pth with classifier
   guidance (``--sampler`` ald by default, the config's 16 levels x 10 steps; ``--scale``).
3. Check them with a plain classifier of clean digits: scikit-learn's LogisticRegression on the 8x8 originals,
   the 16x16 samples average-pooled to 8x8. Prints the accuracy of the requested class (target >= 80%), the
   same for unguided samples (the chance level of the model's own class mix), and the times.

A script, not a `fastscore bench` entry (those are bench/bench_<op>.py with the harness's run(); this one
trains a classifier and samples for minutes, and measures accuracy, not speed):

    python bench/guidance_accuracy.py [--classifier PATH] [--per-class 10] [--scale 10] [--sampler ald]
        [--grid docs/class_conditional.png] [--inpaint docs/inpainting.png]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastscore.cli import CLASSIFIER_LR
from fastscore.cli import CLASSIFIER_STEPS
from fastscore.data.images import load_digits
from fastscore.data.images import save_image_grid
from fastscore.model_sampling import Guidance
from fastscore.model_sampling import sample
from fastscore.models.classifier import digits_labels
from fastscore.models.classifier import load_classifier
from fastscore.models.classifier import train_classifier
from fastscore.train import model_from_checkpoint

CHECKPOINT = os.path.join(os.path.dirname(__file__), "..", "fastscore", "checkpoints", "demo_digits.pth")


def plain_classifier():
    """LogisticRegression on the clean 8x8 digits (values / 16, as load_digits scales them)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.linear_model import LogisticRegression

    d = sk_digits()
    return LogisticRegression(max_iter=5000).fit(d.images.reshape(len(d.images), -1) / 16.0, d.target)


def judge(lr, images: torch.Tensor) -> np.ndarray:
    """The plain classifier's classes of (N, 1, 16, 16) samples in [0, 1], pooled to 8x8."""
    small = F.avg_pool2d(images.float().clamp(0, 1), 2).reshape(len(images), -1).numpy()
    return lr.predict(small)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", help="a trained classifier checkpoint (default: train one, --steps)")
    parser.add_argument("--steps", type=int, default=CLASSIFIER_STEPS, help="as fastscore train --classifier")
    parser.add_argument("--width", type=int, default=None, help="default: the classifier's (train --classifier's)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--scale", type=float, default=10.0)
    parser.add_argument("--sampler", default="ald", choices=("ald", "pc"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unguided", action="store_true", help="also sample without guidance (the baseline)")
    parser.add_argument("--grid", help="write the guided samples as a PNG grid (one row per class)")
    parser.add_argument("--inpaint", help="also write a PC inpainting figure (top halves known) here")
    args = parser.parse_args()

    model, config, meta = model_from_checkpoint(CHECKPOINT)
    lr = plain_classifier()
    if args.classifier:
        clf, _ = load_classifier(args.classifier)
        print(f"classifier: {args.classifier}")
    else:
        start = time.perf_counter()
        arch = {} if args.width is None else {"width": args.width}
        clf, result = train_classifier(config, load_digits(16, 1), digits_labels(), steps=args.steps,
                                       lr=CLASSIFIER_LR, progress=True, **arch)  # fmt: skip
        print(f"classifier: trained {args.steps} steps in {time.perf_counter() - start:.0f} s, loss {result.loss:.3f}")
    y = torch.arange(10).repeat_interleave(args.per_class)
    start = time.perf_counter()
    out = sample(model, config, len(y), sampler=args.sampler, meta=meta, seed=args.seed,
                 guide=Guidance(clf, y, args.scale), progress=True)  # fmt: skip
    seconds = time.perf_counter() - start
    pred = judge(lr, out)
    per = [(pred[y.numpy() == k] == k).mean() for k in range(10)]
    print(
        f"guided {args.sampler}, scale {args.scale:g}: accuracy of the requested class {(pred == y.numpy()).mean():.1%}"
        f" over {len(y)} samples ({seconds:.0f} s); per class " + " ".join(f"{k}:{a:.0%}" for k, a in enumerate(per))
    )
    if args.grid:
        save_image_grid(args.grid, out, nrow=args.per_class)  # the README's docs/class_conditional.png
        print(f"wrote {args.grid}")
    if args.unguided:
        free = sample(model, config, len(y), sampler=args.sampler, meta=meta, seed=args.seed, progress=True)
        print(f"unguided: the same labels match {(judge(lr, free) == y.numpy()).mean():.1%} (chance)")
    if args.inpaint:
        from fastscore.data.images import data_transform
        from fastscore.data.images import inverse_data_transform

        images = load_digits(16, 1)[torch.arange(10) * 37]
        known = data_transform(config, images)
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :8, :] = 1
        filled = sample(model, config, 10, sampler="pc", meta=meta, seed=args.seed, known=known, mask=mask)
        shown = inverse_data_transform(config, known) * mask + 0.5 * (1 - mask)
        save_image_grid(args.inpaint, torch.cat([shown, filled, images]), nrow=10)
        print(f"wrote {args.inpaint} (rows: known top halves, PC inpainting, originals)")


if __name__ == "__main__":
    main()
