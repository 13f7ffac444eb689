"""A/B routing: which arm (base model or adapter version) answers a request.

The routing file (YAML, read by `mondrian.core.config`; unknown keys are an error) names, per
advisor, its arms with weights, an optional shadow version, how assignment sticks and what
answers when an arm fails:

    advisors:
      fit-query:
        model: smollm2-135m          # base model (default: the production version's base)
        arms:
          - {name: control, version: production, weight: 50}   # an alias, vN, or base
          - {name: candidate, version: v3, weight: 50}
        shadow: null                 # a version run on every request; its answer is recorded, not returned
        sticky: user                 # user (the client's user id) | image (the image's sha256) | none
        fallback: production         # production | base | none: answers when an arm errors or breaks the contract
        max_tokens: 256
        rollout:                     # optional canary: the service moves the weights itself (serve/rollout.py)
          steps: [5, 25, 50]         # candidate share (%) per step; after the last, promote to production
          min_samples: 200           # judged requests an arm per step
          guardrails: {error_rate: 0.01, p95_latency_ms: 500}

Assignment is a pure function of (advisor, sticky key, weights): sha256 of the advisor and the
key mapped to [0, 1) and cut by the cumulative weights, so a user keeps their arm across
requests, restarts and replicas. A request without a key gets a random arm.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mondrian.core.config import ConfigError, from_dict, load_yaml

STICKY = ("user", "image", "none")
FALLBACK = ("production", "base", "none")
BASE = "base"


@dataclass
class Arm:
    name: str
    version: str | None = None  # alias, vN, "base" or None (the base model)
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name == "pinned":
            raise ValueError(f"arm name {self.name!r} must be a non-empty string other than 'pinned'")
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or self.weight < 0:
            raise ValueError(f"arm {self.name}: weight {self.weight!r} must be a number >= 0")
        if self.version == BASE:
            self.version = None


PROMOTE_WHEN = ("better", "no_harm")
ROLLOUT_METRICS = ("acceptance_rate", "compliance_rate")
GUARDRAIL_KEYS = ("error_rate", "fallback_rate", "contract_failure_rate", "p95_latency_ms")


@dataclass
class Rollout:
    """A canary policy: the candidate arm's share moves through `steps` (percent), each step
    judged on its own evidence (mondrian.ab.rollout); the last step promotes the candidate's
    version to production. Margins in `guardrails` are how much worse than control (absolute
    rates) the candidate may be; `p95_latency_ms` is a limit."""

    control: str = "control"
    candidate: str = "candidate"
    steps: list[float] = field(default_factory=lambda: [5.0, 25.0, 50.0])
    min_samples: int = 200  # judged requests an arm, per step, before it may advance
    alpha: float = 0.05
    promote_when: str = "better"  # better | no_harm
    metric: str = "acceptance_rate"  # the decision metric: acceptance_rate (feedback) | compliance_rate
    guardrails: dict = field(default_factory=dict)
    check_every_s: float = 30.0

    def __post_init__(self):
        steps = self.steps
        if (not isinstance(steps, list) or not steps or any(isinstance(x, bool) or not isinstance(x, int | float)
                                                             or not 0 < x <= 100 for x in steps)
                or steps != sorted(set(steps))):
            raise ValueError(f"rollout.steps {steps!r} must be increasing percentages in (0, 100]")
        if not isinstance(self.min_samples, int) or self.min_samples < 1:
            raise ValueError(f"rollout.min_samples {self.min_samples!r} must be an integer >= 1")
        if not isinstance(self.alpha, float) or not 0 < self.alpha < 0.5:
            raise ValueError(f"rollout.alpha {self.alpha!r} must be a number in (0, 0.5)")
        if self.metric not in ROLLOUT_METRICS:
            raise ValueError(f"rollout.metric {self.metric!r} must be one of {', '.join(ROLLOUT_METRICS)}")
        if self.promote_when not in PROMOTE_WHEN:
            raise ValueError(f"rollout.promote_when {self.promote_when!r} must be one of {', '.join(PROMOTE_WHEN)}")
        bad = sorted(set(self.guardrails) - set(GUARDRAIL_KEYS)) if isinstance(self.guardrails, dict) else ["?"]
        if bad:
            raise ValueError(f"rollout.guardrails: unknown {bad} (known: {', '.join(GUARDRAIL_KEYS)})")
        if not isinstance(self.check_every_s, int | float) or self.check_every_s <= 0:
            raise ValueError(f"rollout.check_every_s {self.check_every_s!r} must be > 0")

    def policy(self) -> dict:
        return {"min_samples": self.min_samples, "alpha": self.alpha, "promote_when": self.promote_when,
                "metric": self.metric, "guardrails": dict(self.guardrails)}


@dataclass
class AdvisorRoute:
    model: str | None = None
    arms: list[Arm] = field(default_factory=list)
    shadow: str | None = None
    sticky: str = "user"
    fallback: str = "production"
    max_tokens: int = 256
    rollout: Rollout | None = None

    def __post_init__(self):
        self.arms = [from_dict(Arm, a, "arms[]") if isinstance(a, dict) else a for a in self.arms]
        if isinstance(self.rollout, dict):
            self.rollout = from_dict(Rollout, self.rollout, "rollout")
        if self.rollout is not None and sorted(a.name for a in self.arms) != sorted(
                (self.rollout.control, self.rollout.candidate)):
            raise ValueError(f"a rollout routes between exactly two arms, {self.rollout.control!r} and "
                             f"{self.rollout.candidate!r}; the arms are {[a.name for a in self.arms]}")
        if self.sticky not in STICKY:
            raise ValueError(f"sticky {self.sticky!r} must be one of {', '.join(STICKY)}")
        if self.fallback not in FALLBACK:
            raise ValueError(f"fallback {self.fallback!r} must be one of {', '.join(FALLBACK)}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names repeat: {names}")
        if self.arms and sum(a.weight for a in self.arms) <= 0:
            raise ValueError("the arms' weights sum to 0")
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= 4096:
            raise ValueError(f"max_tokens {self.max_tokens!r} must be an integer in 1..4096")


@dataclass
class RoutingConfig:
    advisors: dict[str, AdvisorRoute] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.advisors, dict):
            raise ValueError("advisors must be a mapping of advisor name -> route")
        self.advisors = {name: from_dict(AdvisorRoute, r or {}, f"advisors.{name}") if not isinstance(r, AdvisorRoute)
                         else r for name, r in self.advisors.items()}


def load_routing(path: str | Path) -> RoutingConfig:
    data = load_yaml(path)
    try:
        return from_dict(RoutingConfig, data, str(path))
    except ValueError as exc:
        raise ConfigError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


@dataclass(frozen=True)
class ResolvedArm:
    name: str
    ref: str | None  # what the config said (alias or version); None = base
    version: str | None  # the concrete version (vN); None = base
    weight: float


@dataclass(frozen=True)
class Plan:
    """One advisor's routing with every alias resolved to a concrete version."""

    advisor: str
    arms: tuple[ResolvedArm, ...]
    shadow: str | None
    sticky: str
    fallback: str
    fallback_version: str | None  # the version the fallback answers with (None = base)
    max_tokens: int

    @property
    def routing_id(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict:
        return {"advisor": self.advisor, "arms": [asdict(a) for a in self.arms], "shadow": self.shadow,
                "sticky": self.sticky, "fallback": self.fallback, "fallback_version": self.fallback_version,
                "max_tokens": self.max_tokens}

    def versions(self) -> set[str]:
        out = {a.version for a in self.arms if a.version} | ({self.shadow} if self.shadow else set())
        return out | ({self.fallback_version} if self.fallback_version else set())

    def assign(self, key: str | None, rng: random.Random | None = None) -> ResolvedArm:
        """The arm for a sticky key (same key -> same arm), or a random arm without one."""
        if key is None:
            u = (rng or random).random()
        else:
            digest = hashlib.sha256(f"{self.advisor}\0{key}".encode()).digest()
            u = int.from_bytes(digest[:8], "big") / 2**64
        total = sum(a.weight for a in self.arms)
        acc = 0.0
        for arm in self.arms:
            acc += arm.weight / total
            if u < acc and arm.weight > 0:
                return arm
        return next(a for a in reversed(self.arms) if a.weight > 0)
