"""fastscore: fast layers, samplers and likelihoods for score-based generative models.

Public names: ``__all__`` below and the subpackages. torch is imported before the compiled extension (fastscore._C),
which registers its kernels with the PyTorch dispatcher when first needed (fastscore._backend).
"""

import torch  # noqa: F401  (must precede fastscore._C)

__version__ = "0.1.0"

from fastscore import models  # noqa: E402
from fastscore import nn  # noqa: E402
from fastscore import ops  # noqa: E402
from fastscore._backend import BackendUnavailableError  # noqa: E402
from fastscore._backend import backends  # noqa: E402
from fastscore._backend import cpu_capability  # noqa: E402
from fastscore._backend import empty_cache  # noqa: E402
from fastscore._backend import use_backend  # noqa: E402
from fastscore.models import CheckpointError  # noqa: E402
from fastscore.patch import patch  # noqa: E402

__all__ = [
    "__version__",
    "backends",
    "cpu_capability",
    "empty_cache",
    "use_backend",
    "BackendUnavailableError",
    "CheckpointError",
    "nn",
    "ops",
    "patch",
    "models",
]
