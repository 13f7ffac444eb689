"""Content fingerprints (sha256) of files and model / adapter folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: str | Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every regular file under `folder` (relative posix path -> hex), hidden files
    and names in `skip` excluded, in sorted order."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(p.startswith(".") for p in rel.split("/")) or rel in skip:
            continue
        out[rel] = file_sha256(path)
    return out


def folder_fingerprint(files: dict[str, str]) -> str:
    """One sha256 over the (name, sha256) listing: equal iff every file is equal."""
    listing = json.dumps(sorted(files.items()), separators=(",", ":"))
    return hashlib.sha256(listing.encode()).hexdigest()
