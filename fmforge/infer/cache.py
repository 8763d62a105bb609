"""The serving engine's KV cache: one slot per running sequence, each at its own length.

`LockstepKVCache` (model.py) holds a batch that advances in lockstep. A server's batch does not: requests join and leave
at every step (continuous batching), so each row has its own length, its own RoPE positions and its own mask.
The running sequences always occupy slots 0 .. n-1 (a finished one is replaced by the last, see `move`), so a
decode step attends over a view of the cache, never a gathered copy.

A sliding-window model keeps only the last `window` positions of each row (plus a few for drafted tokens), in a ring
buffer: position p at slot p % capacity, keys stored after RoPE so that they keep their absolute positions. Its memory
per sequence is then constant however long the sequence grows (up to the model's context, the RoPE tables' length).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model import attention_mask, ring_positions

SPAN_STEP = 64


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in the cache: 2 (K and V) x n_layer x n_kv_head x head_dim x the
    dtype's size."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.empty((), dtype=dtype).element_size()


class SlotKVCache:
    """Keys and values of `slots` sequences of up to `max_length` positions each.

    Shapes per layer: (slots, n_kv_head, capacity, head_dim). capacity = max_length, or for a model whose sliding
    window is shorter, window + `lookahead`: the positions a forward may write beyond the window and then give back
    (drafted tokens that verification rejects) without overwriting keys still in a window. Implements the protocol
    the model's attention calls (the `KVCache` protocol of model.py: `prepare`, `update`, `advance`) for the rows
    bound with `bind`.
    """

    def __init__(self, config: ModelConfig, slots: int, max_length: int, device=None, dtype=torch.float32,
                 lookahead: int = 0):
        window = config.sliding_window
        self.window = window if window is not None and window < max_length else None  # None: nothing rolls
        self.capacity = max_length if self.window is None else min(max_length, self.window + lookahead)
        shape = (slots, config.n_kv_head, self.capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.slots, self.max_length = slots, max_length
        self.bytes_per_token = kv_cache_bytes_per_token(config, dtype)
        self.lengths = [0] * slots  # positions filled, per slot
        self._rows = slice(0, 0)
        self._new_tokens: list[int] | None = None
        self._positions: torch.Tensor | None = None
        self._row_index: torch.Tensor | None = None
        self._span = 0
        self._write_first = True
        self._writes: tuple[torch.Tensor, ...] = ()

    def bind(self, first: int, count: int, new_tokens: list[int] | None = None) -> None:
        """The next forward feeds slots first .. first+count-1 (one row each, in that order); `new_tokens`: how many
        of each row's T tokens are real, the rest right padding (None: all of them)."""
        self._rows = slice(first, first + count)
        self._new_tokens = new_tokens

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        lengths = self.lengths[self._rows]
        longest = max(lengths) + T
        if longest > min(self.max_length, len(rope_cos)):
            raise ValueError(f"sequence of {longest} tokens exceeds the cache's {self.max_length} positions")
        if self.window is not None:
            return self._prepare_ring(rope_cos, rope_sin, T, lengths)
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

    def _prepare_ring(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int, lengths: list[int]):
        """prepare for a sliding-window ring. Writing the new keys first and attending over the ring is exact when
        they overwrite no key still inside a query's window (T <= capacity - window + 1, or the ring has not
        wrapped) and no row is padded; otherwise the chunk attends over the ring as it was plus its own keys."""
        device = rope_cos.device
        counts = self._new_tokens or [T] * len(lengths)
        starts = torch.tensor(lengths, device=device)
        ends = starts + torch.tensor(counts, device=device)
        positions = starts.view(-1, 1) + torch.arange(T, device=device)  # (B, T)
        self._write_first = (all(n == T for n in counts)
                             and (T <= self.capacity - self.window + 1 or max(lengths) + T <= self.capacity))
        held = ends if self._write_first else starts
        self._span = min(-(-int(held.max()) // SPAN_STEP) * SPAN_STEP, self.capacity)
        keys = ring_positions(held, self.capacity)[:, :self._span]  # (B, span); negative = an empty slot
        if not self._write_first:
            keys = torch.cat([keys, positions], dim=1)
        # The real tokens that the ring keeps: padding is never written, nor a position the same chunk overwrites.
        offsets = torch.arange(T, device=device)
        keep = (offsets < (ends - starts).view(-1, 1)) & (positions >= (ends - self.capacity).view(-1, 1))
        rows, steps = keep.nonzero(as_tuple=True)
        self._writes = (rows + self._rows.start, positions[rows, steps] % self.capacity, rows, steps)
        mask = attention_mask(positions, keys, self.window)  # (B, T, keys)
        return rope_cos[positions].unsqueeze(1), rope_sin[positions].unsqueeze(1), mask.unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.window is not None:
            return self._update_ring(layer, k, v)
        # Advanced indices on dims 0 and 2 put (B, T) first: write k as (B, T, n_kv, hd).
        self.keys[layer][self._row_index, :, self._positions] = k.transpose(1, 2)
        self.values[layer][self._row_index, :, self._positions] = v.transpose(1, 2)
        return self.keys[layer][self._rows, :, :self._span], self.values[layer][self._rows, :, :self._span]

    def _update_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sliding-window form of update; the keys come in the order _prepare_ring's mask describes."""
        keys, values = self.keys[layer], self.values[layer]
        slots, cells, rows, steps = self._writes
        if not self._write_first:  # copies of the ring as it was, taken before it is overwritten
            attend = (torch.cat([keys[self._rows, :, :self._span], k], dim=2),
                      torch.cat([values[self._rows, :, :self._span], v], dim=2))
        keys[slots, :, cells] = k.transpose(1, 2)[rows, steps]  # (N, n_kv, hd) each side
        values[slots, :, cells] = v.transpose(1, 2)[rows, steps]
        if not self._write_first:
            return attend
        return keys[self._rows, :, :self._span], values[self._rows, :, :self._span]

    def advance(self, T: int) -> None:
        for row, slot in enumerate(range(self._rows.start, self._rows.stop)):
            self.lengths[slot] += T if self._new_tokens is None else self._new_tokens[row]

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` (its filled positions) into slot `target`."""
        n = min(self.lengths[source], self.capacity)  # a ring's slots keep their places: position % capacity
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :n] = self.keys[layer][source, :, :n]
            self.values[layer][target, :, :n] = self.values[layer][source, :, :n]
        self.lengths[target] = self.lengths[source]

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0
