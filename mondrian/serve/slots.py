"""Many LoRA versions in one model, chosen per row: the layer behind mixed-version batches.

Each Linear that some loaded version adapts is wrapped once in a `SlotLoRALinear`, which
holds every loaded version's LoRA tensors in numbered slots (slot 0 is no adapter: the base
model). A forward pass reads which slot each batch row uses from the model's `RowSlots`, set
just before the call (see `decode.Decoder`), so one batch decodes rows of different
versions together (what vLLM and S-LoRA call multi-LoRA batching) and serving another version
never swaps weights under a running batch.

Exactness: when every row of a call uses one slot, the layer computes what mlx-lm's
`LoRALinear` computes, `y + scale * ((x @ a) @ b)`, on that version's own tensors, so the
logits are bit-identical to `mlx_lm.load(base, adapter_path=version)`; a layer the version
does not adapt (and the base slot) returns `linear(x)` as mlx-lm's unwrapped layer does. Rows
of a mixed call go through stacked tensors gathered per row (ranks zero-padded to the
largest), a batched matmul: the same products, summed in an order the BLAS may block
differently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


class RowSlots:
    """Which slot each row of the current model call uses; shared by every SlotLoRALinear."""

    def __init__(self) -> None:
        self.uniform: int | None = None  # the one slot of a call whose rows all use it
        self.index: mx.array | None = None  # (B,) slots of a mixed call
        self.max_slot = 0
        self.active = False
        self.calls = 0
        self.mixed_calls = 0

    @contextmanager
    def use(self, slots: list[int]) -> Iterator[None]:
        """Rows use `slots` for the model calls inside the block (the graph is built there)."""
        if not slots:
            raise ValueError("a model call with no rows")
        self.calls += 1
        if all(s == slots[0] for s in slots):
            self.uniform, self.index = slots[0], None
        else:
            self.uniform, self.index = None, mx.array(slots, dtype=mx.int32)
            self.max_slot = max(slots)
            self.mixed_calls += 1
        self.active = True
        try:
            yield
        finally:
            self.active, self.uniform, self.index = False, None, None


@dataclass
class _Slot:
    a: mx.array  # (in, r)
    b: mx.array  # (r, out)
    scale: float


class SlotLoRALinear(nn.Module):
    """A Linear plus one optional LoRA per slot, picked per row."""

    def __init__(self, linear: nn.Module, rows: RowSlots):
        super().__init__()
        self.linear = linear
        # plain Python attributes (not parameters): they never reach load_weights/trainable_parameters
        object.__setattr__(self, "_rows", rows)
        object.__setattr__(self, "_slots", {})
        object.__setattr__(self, "_stack", None)

    @property
    def dims(self) -> tuple[int, int]:
        """(input, output) dims of the wrapped Linear."""
        out_dims, in_dims = self.linear.weight.shape
        if isinstance(self.linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // self.linear.bits
        return in_dims, out_dims

    def set_slot(self, slot: int, a: mx.array | None, b: mx.array | None = None, scale: float = 0.0) -> None:
        if a is None:
            self._slots.pop(slot, None)
        else:
            self._slots[slot] = _Slot(a, b, scale)
        object.__setattr__(self, "_stack", None)

    def _stacked(self, n_slots: int) -> tuple[mx.array, mx.array, mx.array]:
        """All slots' tensors stacked, zero-padded to the largest rank (built once per change)."""
        stack = self._stack
        if stack is None or stack[0].shape[0] < n_slots:
            in_dims, out_dims = self.dims
            rank = max((s.a.shape[1] for s in self._slots.values()), default=1)
            size = max([n_slots, *(k + 1 for k in self._slots)])
            a = mx.zeros((size, in_dims, rank), dtype=mx.float32)
            b = mx.zeros((size, rank, out_dims), dtype=mx.float32)
            scale = [0.0] * size
            for k, s in self._slots.items():
                r = s.a.shape[1]
                a[k, :, :r] = s.a.astype(mx.float32)
                b[k, :r, :] = s.b.astype(mx.float32)
                scale[k] = s.scale
            stack = (a, b, mx.array(scale, dtype=mx.float32))
            mx.eval(stack)
            object.__setattr__(self, "_stack", stack)
        return stack

    def __call__(self, x: mx.array) -> mx.array:
        rows = self._rows
        if not rows.active:
            raise RuntimeError("SlotLoRALinear called outside RowSlots.use(): which adapter each row uses is unknown")
        y = self.linear(x)
        if rows.uniform is not None:
            s = self._slots.get(rows.uniform)
            if s is None:  # the base slot, or a version that does not adapt this layer
                return y
            z = (x @ s.a) @ s.b
            return y + (s.scale * z).astype(x.dtype)
        a, b, scale = self._stacked(rows.max_slot + 1)
        idx = rows.index
        z = (x @ a[idx].astype(x.dtype)) @ b[idx].astype(x.dtype)  # (B, L, in) @ (B, in, R) @ (B, R, out)
        return y + (scale[idx].reshape(-1, 1, 1) * z).astype(x.dtype)
