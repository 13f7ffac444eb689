"""Reading JSONL files with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[int, object]]:
    """Yield (line number, value) for every non-blank line; a line that is not JSON raises
    `error("<path>:<line>: not JSON (...)")`."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{i}: not JSON ({exc.msg} at column {exc.colno})") from None
