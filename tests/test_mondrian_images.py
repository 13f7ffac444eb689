"""Mondrian compositions: pixel analysis on hand-built images, round trips, contract validity."""

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mondrian.core.contracts import Advisor, load_advisors
from mondrian.demo.images import (
    COLORS,
    PALETTE,
    analyze_image,
    classify,
    count_blocks,
    generate_image,
)


@pytest.fixture(scope="module")
def contract() -> Advisor:
    """Through the project's one contract loader (which also checks the schema itself)."""
    return load_advisors()["photo-critic"]


@pytest.fixture(scope="module")
def critiques() -> list[dict]:
    return [generate_image(seed)[1] for seed in range(200)]


def canvas(h: int, w: int, fill: str = "white") -> np.ndarray:
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[:] = PALETTE[fill]
    return arr


def test_contract_shape(contract: Advisor) -> None:
    assert contract.name == "photo-critic"
    assert contract.input_kind == "image"
    schema = contract.schema
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == set(schema["properties"])
    for field in schema["properties"]:
        assert field in contract.system_prompt


def test_red_half_blue_quarter() -> None:
    # Pure colours, no grid: red left half, blue top-right quarter, white bottom-right quarter.
    arr = np.full((100, 100, 3), 255, dtype=np.uint8)
    arr[:, :50] = (255, 0, 0)
    arr[:50, 50:] = (0, 0, 255)
    d = analyze_image(Image.fromarray(arr))
    assert d["dominant_color"] == "red"
    assert d["primary_colors"] == ["blue", "red"]
    assert d["block_count"] == 3
    assert d["balance"] != "balanced"  # colour mass sits left and up


def test_grid_image_by_hand() -> None:
    # Red column x<40 | black line x 40..43 | right: blue y<30, black line y 30..33, white below.
    arr = canvas(100, 100)
    arr[:, :40] = PALETTE["red"]
    arr[:, 40:44] = PALETTE["black"]
    arr[:30, 44:] = PALETTE["blue"]
    arr[30:34, 44:] = PALETTE["black"]
    d = analyze_image(arr)
    # red 4000 px beats white 56*66 = 3696 px; grid lines (624 px) are not a black block.
    assert d["dominant_color"] == "red"
    assert d["primary_colors"] == ["blue", "red"]
    assert d["block_count"] == 3
    # Colour mass: x = (4000*20 + 1680*72) / 5680 -> -0.146 of width; y -> -0.104 of height.
    assert d["balance"] == "left-heavy"
    assert d["balance_score"] == 4.2  # 10 * (1 - 0.146 / 0.25)
    assert d["color_score"] == 5.0  # 2 primaries; coloured share 0.568 is too far from 0.25
    assert d["composition_score"] == 5.2  # 10 - 0.6 * |3 - 8| - 8 * |0.3696 - 0.6|
    assert d["comment"].startswith("Solid, left-heavy composition of 3 blocks dominated by red")


def test_black_block_dominates_but_lines_do_not() -> None:
    arr = canvas(100, 100)
    arr[:, :70] = PALETTE["black"]
    d = analyze_image(arr)
    assert d["dominant_color"] == "black"
    assert d["primary_colors"] == []
    assert d["block_count"] == 1
    assert d["balance"] == "balanced"  # no colour at all
    lines = canvas(100, 100)
    lines[:, 20:24] = lines[:, 60:64] = lines[48:52, :] = PALETTE["black"]  # 4px grid only
    d = analyze_image(lines)
    assert d["dominant_color"] == "white"
    assert d["block_count"] == 6


def test_dense_grid_is_not_a_black_block() -> None:
    # 4px lines every 10px cover more area (6156 px) than the white cells (3844 px).
    arr = canvas(100, 100)
    for p in range(8, 100, 10):
        arr[:, p : p + 4] = PALETTE["black"]
        arr[p : p + 4, :] = PALETTE["black"]
    d = analyze_image(arr)
    assert (classify(arr) == COLORS.index("black")).sum() > (
        classify(arr) == COLORS.index("white")
    ).sum()
    assert d["dominant_color"] == "white"
    assert d["block_count"] == 100


def test_count_blocks_connectivity() -> None:
    black, red, blue = (COLORS.index(c) for c in ("black", "red", "blue"))
    labels = np.full((4, 10), black)
    labels[0, 0:6] = red  # staircase: rows share only column 5
    labels[1, 5:10] = red
    labels[3, 0] = labels[2, 1] = blue  # diagonal neighbours are not 4-connected
    labels[3, 5:10] = red  # separated from the staircase by a black row
    assert count_blocks(labels) == 4
    assert count_blocks(labels, min_px=2) == 2  # single blue pixels drop out


def test_balance_directions() -> None:
    for region, label in [
        ((slice(None), slice(70, 100)), "right-heavy"),
        ((slice(None), slice(0, 30)), "left-heavy"),
        ((slice(0, 30), slice(None)), "top-heavy"),
        ((slice(70, 100), slice(None)), "bottom-heavy"),
        ((slice(40, 60), slice(40, 60)), "balanced"),
    ]:
        arr = canvas(100, 100)
        arr[region] = PALETTE["yellow"]
        assert analyze_image(arr)["balance"] == label


def test_tiny_specks_are_not_blocks() -> None:
    arr = canvas(100, 100)
    arr[10, 10] = PALETTE["red"]  # one stray pixel: below both area thresholds
    d = analyze_image(arr)
    assert d["block_count"] == 1
    assert d["primary_colors"] == []


def test_png_round_trip() -> None:
    for seed in (0, 1, 17):
        img, d = generate_image(seed)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        buf.seek(0)
        assert analyze_image(Image.open(buf)) == d


def test_deterministic_and_seed_sensitive() -> None:
    a, da = generate_image(42)
    b, db = generate_image(42)
    assert da == db and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(generate_image(43)[0]))


def test_sizes() -> None:
    for size in (64, 128, 256):
        img, d = generate_image(5, size=size)
        assert img.size == (size, size) and img.mode == "RGB"
        assert d["block_count"] >= 2  # the root always splits


def test_contract_across_seeds(
    contract: Advisor, critiques: list[dict]
) -> None:
    for d in critiques:
        errors = contract.violations(d)
        assert not errors, (d, errors[0].message)
        assert d["primary_colors"] == sorted(d["primary_colors"])
        for key in ("composition_score", "color_score", "balance_score"):
            assert round(d[key], 1) == d[key]


def test_labels_vary(critiques: list[dict]) -> None:
    # A learnable task needs every answer to be reachable, not one constant label.
    assert set(Counter(d["dominant_color"] for d in critiques)) == set(COLORS)
    assert len(Counter(d["balance"] for d in critiques)) == 5
    assert len({d["block_count"] for d in critiques}) >= 8


def test_block_count_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    for seed in range(30):
        labels = classify(generate_image(seed)[0])
        ref = sum(ndimage.label(labels == c)[1] for c in range(len(COLORS) - 1))  # not black
        assert count_blocks(labels) == ref
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    labels = classify(noise)  # thousands of ragged regions
    assert count_blocks(labels) == sum(
        ndimage.label(labels == c)[1] for c in range(len(COLORS) - 1)
    )
