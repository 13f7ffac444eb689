"""mondrian's training pipeline: base models, data, training, evaluation."""

import mondrian as _mondrian  # noqa: F401 - preloads OpenBLAS before mlx is imported
