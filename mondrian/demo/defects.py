"""The demo's defects: production-style answers, and the broken answers and files a real
production store accumulates (cut-off JSON, contract violations, unreadable or huge images).

Each maker checks that its output really is what it claims (invalid, violating, different),
so the linker's expected counts stay exact.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import struct
import zlib
from typing import Any

from PIL import Image

from mondrian.core.contracts import Advisor
from mondrian.demo.images import png_bytes
from mondrian.demo.job_plan import PHOTO, ImageSample


def production_json(answer: dict[str, Any], rng: random.Random, in_file: bool = False) -> str:
    """What production wrote: plain json.dumps, keys sometimes reordered, whole kW as floats."""
    obj = dict(answer)
    if rng.random() < 0.3:
        keys = list(obj)
        rng.shuffle(keys)
        obj = {k: obj[k] for k in keys}
    if rng.random() < 0.25:
        obj = {k: float(v) if k.startswith("capacity_") and isinstance(v, int) else v
               for k, v in obj.items()}
    return json.dumps(obj, indent=2 if in_file and rng.random() < 0.3 else None)


def broken_json(answer: dict[str, Any], variant: int) -> str:
    text = json.dumps(answer)
    broken = (text[: len(text) * 2 // 3],  # cut off mid-write
              str(answer),  # a Python repr: single quotes
              text + "\n--- end of output ---")[variant % 3]  # trailing garbage
    try:
        json.loads(broken)
    except json.JSONDecodeError:
        return broken
    raise AssertionError(f"meant to be invalid JSON: {broken!r}")


def violation(advisor: Advisor, answer: dict[str, Any], variant: int) -> dict[str, Any]:
    """Valid JSON that breaks the contract in one of a few realistic ways."""
    obj = dict(answer)
    if advisor.name == PHOTO:
        edits = (("composition_score", 11.5), ("dominant_color", "green"), ("comment", None),
                 ("confidence", 0.93), ("block_count", 0), ("primary_colors", ["purple"]))
    else:
        cap = obj.get("capacity_min_kw", 50)
        edits = (("technology", "wind"), ("capacity_min_kw", -abs(cap) or -50),
                 ("query_type", None), ("region", "south east"), ("query_type", "lookup"),
                 ("postcode_patterns", ["rg"]))
    key, value = edits[variant % len(edits)]
    if value is None:
        del obj[key]  # a missing required field
    else:
        obj[key] = value
    if not advisor.violations(obj):
        raise AssertionError(f"meant to violate {advisor.name}: {obj}")
    return obj


def conflicting(advisor: Advisor, answer: dict[str, Any]) -> dict[str, Any]:
    """A different answer that still meets the contract (the model changed its mind)."""
    obj = dict(answer)
    if advisor.name == PHOTO:
        score = obj["composition_score"]
        obj["composition_score"] = round(score - 2.5 if score >= 2.5 else score + 2.5, 1)
    elif obj.pop("include_revenue", None) is None:
        obj["include_revenue"] = True
    if advisor.violations(obj) or advisor.render(obj) == advisor.render(answer):
        raise AssertionError(f"meant to be a valid, different answer: {obj}")
    return obj


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height: a few kB on disk, tens of Mpx once decoded."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits, all zero
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row * height, 9)) + _png_chunk(b"IEND", b""))


def unreadable(sample: ImageSample, variant: int, rng: random.Random) -> bytes:
    if variant == 0:
        return b""  # one zero-byte upload; the others differ from each other
    if variant % 2:
        return sample.png[: len(sample.png) // 2]  # upload cut off half way
    return f"upload failed: storage quota exceeded (request {rng.getrandbits(64):016x})\n".encode()


def edited_sha(sample: ImageSample) -> str:
    """sha256 of the image production saw: one pixel differs from the file now on disk."""
    img = Image.open(io.BytesIO(sample.png)).convert("RGB")
    r, g, b = img.getpixel((0, 0))
    img.putpixel((0, 0), (255 - r, g, b))
    return hashlib.sha256(png_bytes(img)).hexdigest()
