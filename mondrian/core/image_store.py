"""A folder of images kept once each, named by their sha256 (`<sha256>.<format>`).

The service keeps request images here (`log_payloads: full`), and `mondrian harvest` keeps the
judged ones in the data root the same way, so a job's image is a file linking can read. Files
are written whole (temp file, then rename) and never rewritten.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from PIL import Image


class ImageStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, sha256: str) -> Path | None:
        """The kept image with this hash, or None."""
        return next(iter(sorted(self.folder.glob(f"{sha256}.*"))), None) if self.folder.is_dir() else None

    def keep(self, data: bytes, sha256: str) -> Path:
        """The kept file for these bytes (whose sha256 the caller computed), written if new."""
        found = self.path(sha256)
        if found is not None:
            return found
        with Image.open(io.BytesIO(data)) as im:  # the bytes were checked to be an image already
            ext = (im.format or "bin").lower().replace("jpeg", "jpg")
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{sha256}.{ext}"
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return final
