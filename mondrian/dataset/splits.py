"""Which split a row goes to: a stable hash of `salt + group`, so rows never move.

Adding jobs never moves an existing row, and every row of a leakage group (same normalized
question / same image bytes) lands in the same split.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

SPLITS = ("train", "valid", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
DEFAULT_SALT = "mondrian-split-v1"
_RATIO_TOLERANCE = 1e-6


def validate_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(train, valid, test) as floats, or a ValueError naming what is wrong."""
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or len(ratios) != 3:
        raise ValueError(f"ratios must be three numbers (train, valid, test), got {ratios!r}")
    out = []
    for name, r in zip(SPLITS, ratios, strict=True):
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
            raise ValueError(f"ratio for '{name}' must be a finite number, got {r!r}")
        if r < 0:
            raise ValueError(f"ratio for '{name}' must not be negative, got {r}")
        out.append(float(r))
    total = sum(out)
    if abs(total - 1.0) > _RATIO_TOLERANCE:
        raise ValueError(f"ratios must sum to 1, got {total:g} ({', '.join(map(str, out))})")
    if out[0] <= 0:
        raise ValueError("ratio for 'train' must be > 0: there is nothing to train on")
    if out[1] <= 0:
        # mlx-lm trains without validation only with a warning; we want a validation loss.
        raise ValueError("ratio for 'valid' must be > 0: training needs a validation split")
    return out[0], out[1], out[2]


def _unit_interval(group: str, salt: str) -> float:
    """A stable value in [0, 1) from sha256(salt + group): first 8 bytes / 2**64."""
    digest = hashlib.sha256((salt + group).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(group: str, ratios: Sequence[float] = DEFAULT_RATIOS, salt: str = DEFAULT_SALT) -> str:
    """The split of a leakage group: a pure function of (group, ratios, salt), so rows never
    move when data is added and all rows of a group land together."""
    r = validate_ratios(ratios)
    x = _unit_interval(group, salt)
    upper = 0.0
    for name, ratio in zip(SPLITS, r, strict=True):
        upper += ratio
        if ratio > 0 and x < upper:
            return name
    # Float rounding can leave x just above the last bound: give it to the last non-empty split.
    return next(n for n, ratio in zip(reversed(SPLITS), reversed(r), strict=True) if ratio > 0)
