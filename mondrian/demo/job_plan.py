"""The demo workspace's job plan: how many jobs of each kind, per advisor, in which order.

A share of the jobs carries exactly one defect each, of the kinds in ``REASONS`` (the linker's
reason codes); a few kinds repeat an earlier good job (``DEPENDENT``), so the order puts every
such job after its original.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PHOTO = "photo-critic"
FIT = "fit-query"
LEGACY = "legacy-critic"  # an advisor with no contract: its jobs are `unknown_advisor`
LINKED = "linked"

# Reason codes, exactly as the linker emits them.
REASONS = (
    "not_completed",
    "duplicate_job_id",
    "image_missing",
    "image_unreadable",
    "image_too_large",
    "image_hash_mismatch",
    "analysis_missing",
    "invalid_json",
    "contract_violation",
    "duplicate",
    "duplicate_conflict",
    "input_missing",
    "unknown_advisor",
    "path_outside_root",
)
IMAGE_ONLY = ("image_missing", "image_unreadable", "image_too_large", "image_hash_mismatch",
              "path_outside_root")
SHARED = ("not_completed", "duplicate_job_id", "analysis_missing", "invalid_json",
          "contract_violation", "duplicate", "duplicate_conflict", "input_missing")
# Kinds that point back at an earlier good job (its job id or its input).
DEPENDENT = ("duplicate_job_id", "duplicate", "duplicate_conflict")
# Relative frequency of each defect within an advisor's defect budget (after one of each).
WEIGHTS = {
    "not_completed": 3.0, "duplicate_job_id": 1.0, "image_missing": 1.5,
    "image_unreadable": 1.0, "image_too_large": 0.5, "image_hash_mismatch": 1.0,
    "analysis_missing": 1.5, "invalid_json": 1.5, "contract_violation": 2.0, "duplicate": 2.0,
    "duplicate_conflict": 1.0, "input_missing": 1.0, "path_outside_root": 0.5,
}


@dataclass(frozen=True)
class ImageSample:
    """A rendered composition: its seed, PNG bytes, true analysis and sha256."""

    seed: int
    png: bytes
    analysis: dict[str, Any]
    sha256: str



@dataclass(eq=False)
class Job:
    advisor: str
    kind: str  # LINKED or a reason code
    variant: int = 0  # which flavour of the defect (the n-th job of its kind)
    original: Job | None = None  # DEPENDENT kinds: the earlier good job they repeat
    sample: Any = None  # ImageSample (photo / legacy) or questions.Example
    row: dict[str, Any] = field(default_factory=dict)



def _allocate(n: int, rate: float, mandatory: tuple[str, ...],
              optional: tuple[str, ...]) -> dict[str, int]:
    """Defect counts for one advisor: one of each mandatory kind, the rest by WEIGHTS."""
    if n == 0 or rate <= 0:
        return {}
    # At least half the jobs stay good, so every dependent defect has its own original.
    budget = min(max(round(rate * n), len(mandatory)), n // 2)
    counts = Counter({k: 1 for k in mandatory[:budget]})
    kinds = [*mandatory, *optional]
    left = budget - sum(counts.values())
    total_w = sum(WEIGHTS[k] for k in kinds)
    quotas = {k: left * WEIGHTS[k] / total_w for k in kinds}
    for k in kinds:
        counts[k] += math.floor(quotas[k])
    rest = left - sum(math.floor(q) for q in quotas.values())
    # Largest remainder, ties by REASONS order: deterministic.
    for k in sorted(kinds, key=lambda k: (-(quotas[k] % 1), REASONS.index(k)))[:rest]:
        counts[k] += 1
    return {k: counts[k] for k in REASONS if counts[k]}


def plan_jobs(n_fit: int, n_photo: int, rate: float) -> dict[str, dict[str, int]]:
    """{advisor: {kind: count}}, LINKED included; rows of each advisor sum to its n."""
    # Text jobs cannot carry image defects; shared kinds go mostly to fit-query, the bigger set,
    # but photo-critic always gets a byte-level duplicate and a violation in an analysis file.
    photo_mandatory = IMAGE_ONLY + (SHARED if n_fit == 0 else ("duplicate", "contract_violation"))
    photo = _allocate(n_photo, rate, photo_mandatory, SHARED if n_fit else ())
    fit = _allocate(n_fit, rate, SHARED, ())
    plan = {PHOTO: {LINKED: n_photo - sum(photo.values()), **photo},
            FIT: {LINKED: n_fit - sum(fit.values()), **fit}}
    n = n_fit + n_photo
    if rate > 0 and n:
        plan[LEGACY] = {"unknown_advisor": max(1, round(rate * n / len(REASONS)))}
    return plan


def order_jobs(plan: dict[str, dict[str, int]], rng: random.Random) -> list[Job]:
    """Interleave all jobs in production order; each dependent job after its original."""
    base: list[Job] = []
    dependent: list[Job] = []
    for advisor, counts in plan.items():
        for kind, count in counts.items():
            for v in range(count):
                (dependent if kind in DEPENDENT else base).append(Job(advisor, kind, v))
    rng.shuffle(base)
    pos = {id(j): i for i, j in enumerate(base)}
    keys: dict[int, tuple[float, int, int]] = {id(j): (float(i), 0, 0) for i, j in enumerate(base)}
    for advisor in plan:
        deps = [j for j in dependent if j.advisor == advisor]
        goods = [j for j in base if j.advisor == advisor and j.kind == LINKED]
        # Distinct originals: no good job is repeated twice, so "the earlier good job" is unique.
        for seq, (job, orig) in enumerate(zip(deps, rng.sample(goods, len(deps)), strict=True)):
            job.original = orig
            keys[id(job)] = (rng.uniform(pos[id(orig)], len(base)), 1, seq)
    return sorted(base + dependent, key=lambda j: keys[id(j)])
