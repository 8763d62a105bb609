"""The serving engine's KV cache: one slot per running sequence, each at its own length.

`LockstepKVCache` (model.py) holds a batch that advances in lockstep. A server's batch does not: requests join and leave
at every step (continuous batching), so each row has its own length, its own RoPE positions and its own mask.
The running sequences always occupy slots 0 .. n-1 (a finished one is replaced by the last, see `move`), so a
decode step attends over a view of the cache, never a gathered copy.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

SPAN_STEP = 64


class SlotKVCache:
    """Keys and values of `slots` sequences of up to `max_length` positions each.

    Shapes per layer: (slots, n_kv_head, max_length, head_dim). Implements the protocol the model's attention
    calls (the `KVCache` protocol of model.py: `prepare`, `update`, `advance`) for the rows bound with `bind`.
    """

    def __init__(self, config: ModelConfig, slots: int, max_length: int, device=None, dtype=torch.float32):
        shape = (slots, config.n_kv_head, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots, self.max_length = slots, max_length
        self.lengths = [0] * slots  # positions filled, per slot
        self._rows = slice(0, 0)
        self._positions: torch.Tensor | None = None
        self._row_index: torch.Tensor | None = None
        self._span = 0

    def bind(self, first: int, count: int) -> None:
        """The next forward feeds slots first .. first+count-1 (one row each, in that order)."""
        self._rows = slice(first, first + count)

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        lengths = self.lengths[self._rows]
        longest = max(lengths) + T
        if longest > min(self.max_length, len(rope_cos)):
            raise ValueError(f"sequence of {longest} tokens exceeds the cache's {self.max_length} positions")
        device = rope_cos.device
        start = torch.tensor(lengths, device=device).view(-1, 1)
        positions = start + torch.arange(T, device=device)  # (B, T)
        # Attend over a span rounded up to SPAN_STEP keys (the mask hides the extra ones): a handful of distinct
        # shapes instead of a new one every step, which attention backends that plan per shape (cuDNN) need.
        span = min(-(-longest // SPAN_STEP) * SPAN_STEP, self.max_length)
        self._positions, self._span = positions, span
        self._row_index = torch.arange(self._rows.start, self._rows.stop, device=device).view(-1, 1)
        keys = torch.arange(span, device=device).view(1, 1, -1)
        mask = keys <= positions.unsqueeze(-1)  # (B, T, span): query t of row b sees keys [0, start_b + t]
        return rope_cos[positions].unsqueeze(1), rope_sin[positions].unsqueeze(1), mask.unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Advanced indices on dims 0 and 2 put (B, T) first: write k as (B, T, n_kv, hd).
        self.keys[layer][self._row_index, :, self._positions] = k.transpose(1, 2)
        self.values[layer][self._row_index, :, self._positions] = v.transpose(1, 2)
        return self.keys[layer][self._rows, :, :self._span], self.values[layer][self._rows, :, :self._span]

    def advance(self, T: int) -> None:
        for slot in range(self._rows.start, self._rows.stop):
            self.lengths[slot] += T

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` (its filled positions) into slot `target`."""
        n = self.lengths[source]
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :n] = self.keys[layer][source, :, :n]
            self.values[layer][target, :, :n] = self.values[layer][source, :, :n]
        self.lengths[target] = n

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0
