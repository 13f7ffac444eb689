"""Data-parallel training under `mlx.launch` (MLX's own distributed layer: ring over TCP,
MPI, JACCL over Thunderbolt).

`mondrian train` needs no flag: launched by `mlx.launch`, each process is one rank of a
world (`world()`); alone, it is a world of one and nothing here changes anything.

- The global batch stays the config's `batch_size` (it must divide by the world size); the
  batch plan is the same pure function of (seed, step) on every rank, and rank r takes rows
  r, r + size, ... of each global batch (`World.shard`).
- Gradients are combined exactly: each rank's mean-loss gradient is weighted by its loss
  tokens, summed across ranks and divided by the world's loss tokens (`World.token_mean`):
  the gradient of the global batch's token-weighted mean loss, what one process computes on
  the whole batch (mlx-lm's `average_gradients` averages per-rank means instead, which
  differs when ranks hold different token counts). The loss reported is the world's too.
- Rank 0 alone writes: checkpoints, the best adapter, the final files, the loss curve and
  the `runs` / `run_metrics` rows. Every rank takes the same decisions (best, early stop),
  because every number they are taken on has been reduced across the world.
- A peer that dies (kill -9, a lost Mac) makes the next collective fail on the others
  ("[ring] connection to a peer was lost", after the backend's retries); that is
  `PeerLost`, and the run stops as `interrupted`, resumable from its last checkpoint.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map


class PeerLost(RuntimeError):
    """Another rank is gone: the run stops as interrupted (resume continues it)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    group: Any
    rank: int = 0
    size: int = 1

    @property
    def writer(self) -> bool:
        """Whether this rank writes files and run records (rank 0)."""
        return self.rank == 0

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's rows of a global batch."""
        return rows[self.rank::self.size]

    def sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def token_mean(self, loss: mx.array, tokens: mx.array, grads: Any) -> tuple[mx.array, mx.array, Any]:
        """(the world's token-weighted mean loss, its loss tokens, the gradient of that mean)
        from this rank's mean loss, loss tokens and gradient of its mean."""
        if self.size == 1:
            return loss, tokens, grads
        total = self.sum(tokens)
        weight = tokens.astype(mx.float32) * self.size / total.astype(mx.float32)
        grads = nn.average_gradients(tree_map(lambda g: g * weight.astype(g.dtype), grads), group=self.group)
        return self.sum(loss * tokens) / total, total, grads

    def check(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` (which evaluates collectives); a lost peer is `PeerLost`."""
        try:
            return fn()
        except RuntimeError as exc:
            message = str(exc)
            if self.size > 1 and ("[ring]" in message or "peer" in message.lower()):
                raise PeerLost(f"rank {self.rank}: {exc}") from None
            raise


ALONE = World(None)  # a process not launched by mlx.launch


def world() -> World:
    """The world this process trains in: `mlx.launch`'s ranks, or a world of one."""
    if not mx.distributed.is_available():
        return ALONE
    group = mx.distributed.init()
    return World(group, group.rank(), group.size())


def check_batch(batch_size: int, w: World) -> str | None:
    """Why `batch_size` cannot be split over the world, or None."""
    if batch_size % w.size:
        return (f"batch_size {batch_size} does not divide by the world size {w.size} "
                f"(mlx.launch ranks): make batch_size a multiple of {w.size}")
    return None


def fault_injection(w: World, step: int) -> None:
    """Test hook: MONDRIAN_KILL_RANK_AT="rank:step" kills that rank with SIGKILL (kill -9)
    when it reaches that step, so tests can show how the others stop and how resume goes on."""
    spec = os.environ.get("MONDRIAN_KILL_RANK_AT")
    if spec and spec == f"{w.rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
