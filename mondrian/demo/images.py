"""Synthetic Mondrian-style compositions and their pixel-derived critiques (photo-critic).

``generate_image`` renders a composition from a seed; ``analyze_image`` reads the critique back
from the pixels alone, so labels are exactly what a model can see and accuracy is measurable.

Analysis definitions (all from pixels):

- every pixel takes the nearest ``PALETTE`` colour (RGB distance);
- grid lines: black pixels that do not fill a ``k x k`` all-black square (morphological opening,
  ``k = max(3, round(min(h, w) / 16))``, wider than any grid line we draw). Black *blocks* survive
  the opening, together with the strip of border line along them;
- ``dominant_color``: largest area among red, yellow, blue, white and black blocks (grid lines
  excluded); ties go to the earlier colour of ``COLORS``;
- ``primary_colors``: red / yellow / blue covering at least ``PRIMARY_MIN_SHARE`` of the image,
  sorted alphabetically;
- ``block_count``: 4-connected regions of one non-black colour, ignoring specks under
  ``MIN_BLOCK_SHARE`` of the image; at least 1 (an all-black image is one black block);
- ``balance``: centre of mass of the red/yellow/blue area, offset from the image centre as a
  fraction of width / height. Under ``BALANCE_THRESHOLD`` on both axes it is "balanced";
  otherwise the larger offset names the heavy side (x wins ties). No colour -> balanced;
- scores: deterministic formulas in ``_scores``, clipped to 0..10 and rounded to one decimal.
"""

from __future__ import annotations

import io
import random
from typing import Any

import numpy as np
from PIL import Image

COLORS = ("red", "yellow", "blue", "white", "black")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (212, 32, 39),
    "yellow": (247, 208, 32),
    "blue": (24, 72, 160),
    "white": (246, 244, 236),
    "black": (22, 22, 22),
}
PRIMARIES = ("blue", "red", "yellow")  # alphabetical: the order primary_colors is written in
PRIMARY_MIN_SHARE = 0.005
MIN_BLOCK_SHARE = 0.001
BALANCE_THRESHOLD = 0.05
# Leaf fill odds: mostly white canvas with primary accents, as in Mondrian's grid paintings.
FILL_WEIGHTS = {"white": 0.46, "red": 0.15, "yellow": 0.14, "blue": 0.15, "black": 0.10}

_PALETTE_ARR = np.array([PALETTE[c] for c in COLORS], dtype=np.int32)
_BLACK = COLORS.index("black")
_PRIMARY_IDS = [COLORS.index(c) for c in ("red", "yellow", "blue")]


# --- rendering -------------------------------------------------------------------------------


def _split(
    rng: random.Random,
    rect: tuple[int, int, int, int],
    depth: int,
    min_side: int,
    leaves: list[tuple[int, int, int, int]],
    lines: list[tuple[int, int, int, int]],
) -> None:
    """Recursively cut rect (x0, y0, x1, y1); a cut is a line spanning the whole rect."""
    x0, y0, x1, y1 = rect
    w, h = x1 - x0, y1 - y0
    can_v, can_h = w >= 2 * min_side, h >= 2 * min_side
    # The root always splits: a bare canvas is no composition.
    if not (can_v or can_h) or (depth > 0 and rng.random() > 0.95 - 0.17 * depth):
        leaves.append(rect)
        return
    # Prefer cutting across the longer side so blocks stay roughly rectangular, not slivers.
    vertical = can_v and (not can_h or rng.random() < (0.75 if w >= h else 0.25))
    if vertical:
        p = rng.randint(x0 + min_side, x1 - min_side)
        lines.append((p, y0, p, y1))
        _split(rng, (x0, y0, p, y1), depth + 1, min_side, leaves, lines)
        _split(rng, (p, y0, x1, y1), depth + 1, min_side, leaves, lines)
    else:
        p = rng.randint(y0 + min_side, y1 - min_side)
        lines.append((x0, p, x1, p))
        _split(rng, (x0, y0, x1, p), depth + 1, min_side, leaves, lines)
        _split(rng, (x0, p, x1, y1), depth + 1, min_side, leaves, lines)


def render(seed: int, size: int = 128) -> Image.Image:
    """The composition for seed: white canvas, recursive black grid, coloured blocks."""
    rng = random.Random(seed)
    line = max(2, round(size / 40))
    min_side = max(4 * line, size // 8)
    leaves: list[tuple[int, int, int, int]] = []
    lines: list[tuple[int, int, int, int]] = []
    _split(rng, (0, 0, size, size), 0, min_side, leaves, lines)
    names, weights = list(FILL_WEIGHTS), list(FILL_WEIGHTS.values())
    fills = [rng.choices(names, weights)[0] for _ in leaves]
    if all(f == "black" for f in fills):  # keep at least one visible block
        fills[0] = "white"
    arr = np.empty((size, size, 3), dtype=np.uint8)
    arr[:] = PALETTE["white"]
    for (x0, y0, x1, y1), fill in zip(leaves, fills, strict=True):
        arr[y0:y1, x0:x1] = PALETTE[fill]
    lo = line // 2
    for x0, y0, x1, y1 in lines:
        if x0 == x1:
            arr[y0:y1, max(0, x0 - lo) : x0 - lo + line] = PALETTE["black"]
        else:
            arr[max(0, y0 - lo) : y0 - lo + line, x0:x1] = PALETTE["black"]
    return Image.fromarray(arr, "RGB")


def generate_image(seed: int, size: int = 128) -> tuple[Image.Image, dict[str, Any]]:
    """(image, critique) for seed; the critique is read from the rendered pixels."""
    img = render(seed, size)
    return img, analyze_image(img)


def png_bytes(img: Image.Image) -> bytes:
    """The image as a PNG file's bytes (what an upload would store)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- analysis --------------------------------------------------------------------------------


def classify(img: Image.Image | np.ndarray) -> np.ndarray:
    """(h, w) array of indices into COLORS: the nearest palette colour per pixel."""
    rgb = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.int32)
    dist = ((rgb[:, :, None, :] - _PALETTE_ARR[None, None]) ** 2).sum(axis=-1)
    return dist.argmin(axis=-1)


def _box_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sums over every k x k window (valid positions only), via an integral image."""
    ii = np.pad(a.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]


def black_blocks(black: np.ndarray, k: int) -> np.ndarray:
    """Morphological opening with a k x k square: drops lines thinner than k, keeps blocks."""
    if min(black.shape) < k:
        return np.zeros_like(black)
    eroded = (_box_sum(black.astype(np.int32), k) == k * k).astype(np.int32)
    return _box_sum(np.pad(eroded, k - 1), k) > 0


def count_blocks(labels: np.ndarray, min_px: int = 1) -> int:
    """4-connected regions of one non-black colour with >= min_px pixels.

    Union-find over horizontal runs: a run joins same-colour runs it overlaps in the row above.
    Numpy finds the runs; the Python loop only visits runs (a few per row for these images).
    """
    h, w = labels.shape
    starts = np.ones((h, w), dtype=bool)
    starts[:, 1:] = labels[:, 1:] != labels[:, :-1]
    ends = np.ones((h, w), dtype=bool)
    ends[:, :-1] = starts[:, 1:]
    ys, xs = np.nonzero(starts)
    xe = np.nonzero(ends)[1]
    colours = labels[ys, xs]
    keep = colours != _BLACK
    ys, xs, xe, colours = (
        ys[keep].tolist(),
        xs[keep].tolist(),
        xe[keep].tolist(),
        colours[keep].tolist(),
    )

    parent = list(range(len(ys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev: list[int] = []  # run ids of the previous row
    cur: list[int] = []
    row = -1
    j = 0
    for r in range(len(ys)):
        if ys[r] != row:
            prev, cur = (cur if ys[r] == row + 1 else []), []
            row, j = ys[r], 0
        while j < len(prev) and xe[prev[j]] < xs[r]:  # runs ending before this one starts
            j += 1
        k = j
        while k < len(prev) and xs[prev[k]] <= xe[r]:
            if colours[prev[k]] == colours[r]:
                parent[find(prev[k])] = find(r)
            k += 1
        cur.append(r)

    area: dict[int, int] = {}
    for r in range(len(ys)):
        root = find(r)
        area[root] = area.get(root, 0) + xe[r] - xs[r] + 1
    return sum(1 for a in area.values() if a >= min_px)


def _balance(labels: np.ndarray) -> tuple[str, float]:
    """(label, offset): offset = max |centre-of-mass offset| of coloured area, in fractions."""
    h, w = labels.shape
    ys, xs = np.nonzero(np.isin(labels, _PRIMARY_IDS))
    if len(xs) == 0:
        return "balanced", 0.0
    dx = float((xs + 0.5).mean() / w - 0.5)
    dy = float((ys + 0.5).mean() / h - 0.5)
    off = max(abs(dx), abs(dy))
    if off < BALANCE_THRESHOLD:
        return "balanced", off
    if abs(dx) >= abs(dy):
        return ("right-heavy" if dx > 0 else "left-heavy"), off
    return ("bottom-heavy" if dy > 0 else "top-heavy"), off


def _clip1(x: float) -> float:
    return round(min(10.0, max(0.0, x)), 1)


def _scores(
    blocks: int, white_share: float, n_primaries: int, colour_share: float, offset: float
) -> tuple[float, float, float]:
    """(composition, color, balance) scores.

    composition: best near 8 blocks with ~60% white space (Mondrian's airy grids);
    color: 2.5 per primary present + up to 2.5 for coloured area near 25% of the image;
    balance: 10 at a centred colour mass, 0 at an offset of a quarter of the image.
    """
    composition = 10 - 0.6 * abs(blocks - 8) - 8 * abs(white_share - 0.6)
    color = 2.5 * n_primaries + 2.5 * (1 - min(1.0, abs(colour_share - 0.25) / 0.25))
    balance = 10 * (1 - min(1.0, offset / 0.25))
    return _clip1(composition), _clip1(color), _clip1(balance)


def _comment(d: dict[str, Any]) -> str:
    mean = (d["composition_score"] + d["color_score"] + d["balance_score"]) / 3
    verdict = "Strong" if mean >= 7 else "Solid" if mean >= 4 else "Weak"
    n = d["block_count"]
    accents = d["primary_colors"]
    if not accents:
        accent = "no primary colours"
    elif len(accents) == 1:
        accent = f"{accents[0]} accents"
    else:
        accent = f"{', '.join(accents[:-1])} and {accents[-1]} accents"
    return (
        f"{verdict}, {d['balance']} composition of {n} block{'s' if n != 1 else ''} "
        f"dominated by {d['dominant_color']}, with {accent}."
    )


def analyze_image(img: Image.Image | np.ndarray) -> dict[str, Any]:
    """The photo-critic critique of an image, from its pixels only (see module docstring)."""
    labels = classify(img)
    h, w = labels.shape
    total = h * w
    counts = np.bincount(labels.ravel(), minlength=len(COLORS))
    k = max(3, round(min(h, w) / 16))
    areas = counts.copy()
    areas[_BLACK] = int(black_blocks(labels == _BLACK, k).sum())
    dominant = COLORS[int(np.argmax(areas))]  # argmax takes the first on ties
    primaries = [c for c in PRIMARIES if counts[COLORS.index(c)] >= PRIMARY_MIN_SHARE * total]
    blocks = max(1, count_blocks(labels, max(1, round(MIN_BLOCK_SHARE * total))))
    balance, offset = _balance(labels)
    colour_share = float(counts[_PRIMARY_IDS].sum()) / total
    white_share = float(counts[COLORS.index("white")]) / total
    comp, color, bal = _scores(blocks, white_share, len(primaries), colour_share, offset)
    out: dict[str, Any] = {
        "dominant_color": dominant,
        "primary_colors": primaries,
        "block_count": blocks,
        "balance": balance,
        "composition_score": comp,
        "color_score": color,
        "balance_score": bal,
    }
    out["comment"] = _comment(out)
    return out
