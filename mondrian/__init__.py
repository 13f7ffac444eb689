"""mondrian: production job records -> LoRA-tuned, versioned, A/B-tested advisors (MLX)."""

import os as _os

# Order matters: OpenBLAS must be loaded before anything imports mlx.core.
from mondrian.core import blas as _blas

_blas.preload()

# Datasets never come from a hub: a missing local data folder must be an error.
_os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
