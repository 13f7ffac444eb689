"""The service's settings (what `mondrian serve`'s options set), free of the web stack and
the engine so the CLI and the routes' tests can build one cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mondrian.core.db import PAYLOAD_MODES


@dataclass
class ServiceConfig:
    registry_root: str | Path | None = None
    db_path: str | Path | None = None  # requests log; None = not recorded
    routing_path: str | Path | None = None
    advisors: list[str] = field(default_factory=list)  # served with the default route if not in the file
    model: str | None = None  # default base model spec
    admin_token: str | None = None
    max_body_bytes: int = 8 << 20
    body_timeout_s: float = 30.0  # a body must arrive whole within this (slow clients get a 408)
    max_input_chars: int = 4000
    max_prompt_tokens: int = 1024
    max_batch: int = 8
    max_versions: int = 8  # LoRA versions loaded per base model; what a plan serves is never evicted
    prefix_cache_mb: float = 256  # KV state of prompt prefixes kept per base model (0: none)
    poll_s: float = 0.5
    rollout_db: str | Path | None = None  # rollout timelines (shared by replicas); None = db_path
    rollout_evidence: list = field(default_factory=list)  # other replicas' requests logs the judge reads
    constrained: bool = True  # text advisors decode under their contract's grammar
    log_payloads: str = "full"  # what a requests row keeps of input and answer: full | hash | off
    image_store: str | Path | None = None  # request images (full); None = request-images/ beside the db

    def __post_init__(self):
        if self.log_payloads not in PAYLOAD_MODES:
            raise ValueError(f"log_payloads must be one of {', '.join(PAYLOAD_MODES)}, got {self.log_payloads!r}")

    def images_folder(self) -> Path | None:
        """Where `log_payloads: full` keeps request images (None: nothing is recorded)."""
        if self.db_path is None or self.log_payloads != "full":
            return None
        return Path(self.image_store) if self.image_store else Path(self.db_path).resolve().parent / "request-images"
