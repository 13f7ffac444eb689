"""What the registry stores: version cards, version records, verify reports, and the names
and formats they use (see mondrian/registry/store.py for the folder layout)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CARD = "card.json"
ALIASES = "aliases.json"
CARD_FORMAT = 1
TEMP_PREFIX = ".publish-"

VERSION_RE = re.compile(r"v([1-9][0-9]*)")
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
ADVISOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
# mlx_lm lora saves intermediate checkpoints beside the final file (0000100_adapters.safetensors):
# not part of the adapter, and they would multiply a version's size.
MLX_LM_CHECKPOINT_RE = re.compile(r"[0-9]+_adapters\.safetensors")

_CHUNK = 1 << 20


class RegistryError(ValueError):
    """A registry operation is refused; the message names the advisor, version and the problem."""


# --------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Card:
    """card.json: everything needed to trust and reproduce a version."""

    advisor: str
    version: str
    created_at: str
    base_model: str
    base_model_fingerprint: str
    dataset_fingerprint: str | None
    run_id: str | None
    config: dict
    metrics: dict
    files: dict[str, str]  # every file but card.json -> sha256
    parent: str | None
    source: str
    # "publish" (a mondrian training run), "import" (plain mlx_lm lora) or "reindex" (the
    # parent's weights with a newer retrieval index)
    origin: str = "publish"
    retrieval_index: str | None = None  # sha256 of the version's retrieval_index.json; None: no retrieval
    card_format: int = CARD_FORMAT
    card_sha256: str = ""  # over the rest of the card: catches a damaged card.json

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Version:
    advisor: str
    version: str
    path: Path
    card: Card | None  # None when card.json cannot be read (see `error`; `verify` says more)
    aliases: tuple[str, ...] = ()
    error: str | None = None

    @property
    def number(self) -> int:
        return int(self.version[1:])

    def to_dict(self) -> dict:
        return {"advisor": self.advisor, "version": self.version, "path": str(self.path),
                "aliases": list(self.aliases), "error": self.error,
                "card": self.card.to_dict() if self.card else None}


@dataclass
class VerifyReport:
    """Every file of a version checked against its card; any problem is a failure."""

    advisor: str
    version: str
    path: Path
    ok_files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (name, expected, found)
    extra: list[str] = field(default_factory=list)
    card_errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.changed or self.extra or self.card_errors)

    def problems(self) -> list[str]:
        out = list(self.card_errors)
        out += [f"{n} fails its checksum (card sha256 {e[:12]}, file {f[:12]})"
                if len(f) == 64 else f"{n}: {f}" for n, e, f in self.changed]
        out += [f"{n} is missing" for n in self.missing]
        out += [f"{n} is not in the card (extra file)" for n in self.extra]
        return out

    def describe(self) -> str:
        if self.ok:
            return f"{self.advisor} {self.version}: ok ({len(self.ok_files)} files match the card)"
        return f"{self.advisor} {self.version}: " + "; ".join(self.problems())

    def to_dict(self) -> dict:
        return {"advisor": self.advisor, "version": self.version, "path": str(self.path),
                "ok": self.ok, "ok_files": self.ok_files, "missing": self.missing,
                "changed": [{"file": n, "expected": e, "found": f} for n, e, f in self.changed],
                "extra": self.extra, "card_errors": self.card_errors}


# --------------------------------------------------------------------------------------------
# helpers


def default_root() -> Path:
    return Path(os.environ.get("MONDRIAN_ADAPTERS", "adapters"))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def card_digest(data: dict) -> str:
    body = {k: v for k, v in data.items() if k != "card_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_fields(run: dict) -> dict:
    """`publish` keyword arguments from a `runs` row (mondrian.train.runs.RunStore.get)."""
    if run.get("status") not in ("completed", "interrupted"):
        raise RegistryError(f"run {run.get('run_id')} is {run.get('status')}: only a finished run "
                            "can be published")
    return {"base_model": run["base_model"], "base_model_fingerprint": run["base_model_fingerprint"],
            "dataset_fingerprint": run.get("dataset_fingerprint"), "run_id": run["run_id"],
            "config": run.get("config") or None}
