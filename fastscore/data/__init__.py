"""Data for score models: 2-D toy distributions with exact scores (fastscore.data.toy)."""

from fastscore.data.toy import TOY_DATASETS
from fastscore.data.toy import GaussianMixture
from fastscore.data.toy import ncsn_toy_mixture
from fastscore.data.toy import toy_sample

__all__ = ["GaussianMixture", "ncsn_toy_mixture", "toy_sample", "TOY_DATASETS"]
from fastscore.data.images import load_dataset  # noqa: E402,F401  (image data: digits, folders, .npz)
