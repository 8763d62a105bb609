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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import attention_mask, ring_positions

SPAN_STEP = 64


def key_span(keys: int, limit: int) -> int:
    """How many cache positions a forward attends over when it needs the first `keys`: rounded up to SPAN_STEP (the
    mask hides the extra ones), so that attention sees a handful of distinct shapes rather than a new one every
    step (backends that plan per shape, cuDNN, and a compiled step need that), and at most `limit`."""
    return min(-(-keys // SPAN_STEP) * SPAN_STEP, limit)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in the cache: 2 (K and V) x n_layer x n_kv_head x head_dim x the
    dtype's size."""
    return 2 * config.n_layer * config.n_kv_head * config.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class _Rows:
    """What the next forward does to a run of consecutive slots, one row each: T tokens per row (the first
    new_tokens[i] of row i real, the rest padding), at `positions` (rows, T); the keys to attend over are the first
    `span` of each slot (a ring: as it was, followed by the chunk's own keys, unless `write_first`), as `mask`
    (rows, 1, T, keys) says; `writes` says where the new keys go."""
    slots: slice
    T: int
    new_tokens: list[int] | None
    positions: torch.Tensor
    mask: torch.Tensor
    span: int
    write_first: bool
    writes: tuple[torch.Tensor, ...]


class SlotKVCache:
    """Keys and values of `slots` sequences of up to `max_length` positions each.

    Shapes per layer: (slots, n_kv_head, capacity, head_dim). capacity = max_length, or for a model whose sliding
    window is shorter, window + `lookahead`: the positions a forward may write beyond the window and then give back
    (drafted tokens that verification rejects) without overwriting keys still in a window. Implements the protocol
    the model's attention calls (the `KVCache` protocol of model.py: `prepare`, `update`, `advance`) for the rows
    bound with `bind`, and `attend` for several runs of rows packed into one row with `bind_packed`.
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
        self.packed = False
        self._bound: list[tuple[int, int, int | None, list[int] | None]] = []  # (first, count, T, new_tokens)
        self._runs: list[_Rows] = []

    def bind(self, first: int, count: int, new_tokens: list[int] | None = None) -> None:
        """The next forward feeds slots first .. first+count-1 (one row each, in that order); `new_tokens`: how many
        of each row's T tokens are real, the rest right padding (None: all of them)."""
        self._bound, self.packed = [(first, count, None, new_tokens)], False

    def bind_packed(self, runs: list[tuple[int, int, int, list[int] | None]]) -> None:
        """The next forward is one row holding, run after run, the tokens of slots first .. first+count-1, T each
        (row after row; new_tokens as in `bind`). Its attention calls `attend`."""
        self._bound, self.packed = list(runs), True

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        if not self.packed:
            first, count, _, new_tokens = self._bound[0]
            self._runs = [self._plan(slice(first, first + count), T, new_tokens, rope_cos)]
            positions = self._runs[0].positions
            return rope_cos[positions].unsqueeze(1), rope_sin[positions].unsqueeze(1), self._runs[0].mask
        self._runs = [self._plan(slice(first, first + count), width, new_tokens, rope_cos)
                      for first, count, width, new_tokens in self._bound]
        positions = torch.cat([run.positions.reshape(-1) for run in self._runs])
        if len(positions) != T:
            raise ValueError(f"the packed runs hold {len(positions)} tokens but the forward has {T}")
        return rope_cos[positions], rope_sin[positions], None

    def _plan(self, slots: slice, T: int, new_tokens: list[int] | None, rope_cos: torch.Tensor) -> _Rows:
        lengths = self.lengths[slots]
        longest = max(lengths) + T
        if longest > min(self.max_length, len(rope_cos)):
            raise ValueError(f"sequence of {longest} tokens exceeds the cache's {self.max_length} positions")
        device = rope_cos.device
        starts = torch.tensor(lengths, device=device)
        positions = starts.view(-1, 1) + torch.arange(T, device=device)  # (B, T)
        if self.window is not None:
            return self._plan_ring(slots, T, new_tokens, starts, positions)
        span = key_span(longest, self.max_length)
        keys = torch.arange(span, device=device).view(1, 1, -1)
        mask = keys <= positions.unsqueeze(-1)  # (B, T, span): query t of row b sees keys [0, start_b + t]
        row_index = torch.arange(slots.start, slots.stop, device=device).view(-1, 1)
        return _Rows(slots, T, new_tokens, positions, mask.unsqueeze(1), span, True, (row_index, positions))

    def _plan_ring(self, slots: slice, T: int, new_tokens: list[int] | None, starts: torch.Tensor,
                   positions: torch.Tensor) -> _Rows:
        """_plan for a sliding-window ring. Writing the new keys first and attending over the ring is exact when
        they overwrite no key still inside a query's window (T <= capacity - window + 1, or the ring has not
        wrapped) and no row is padded; otherwise the chunk attends over the ring as it was plus its own keys."""
        counts = new_tokens or [T] * len(starts)
        ends = starts + torch.tensor(counts, device=starts.device)
        write_first = (all(n == T for n in counts)
                       and (T <= self.capacity - self.window + 1 or int(starts.max()) + T <= self.capacity))
        held = ends if write_first else starts
        span = key_span(int(held.max()), self.capacity)
        keys = ring_positions(held, self.capacity)[:, :span]  # (B, span); negative = an empty slot
        if not write_first:
            keys = torch.cat([keys, positions], dim=1)
        # The real tokens that the ring keeps: padding is never written, nor a position the same chunk overwrites.
        offsets = torch.arange(T, device=starts.device)
        keep = (offsets < (ends - starts).view(-1, 1)) & (positions >= (ends - self.capacity).view(-1, 1))
        rows, steps = keep.nonzero(as_tuple=True)
        writes = (rows + slots.start, positions[rows, steps] % self.capacity, rows, steps)
        mask = attention_mask(positions, keys, self.window).unsqueeze(1)  # (B, 1, T, keys)
        return _Rows(slots, T, new_tokens, positions, mask, span, write_first, writes)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._store(self._runs[0], layer, k, v)

    def _store(self, run: _Rows, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the run's new keys/values (B, n_kv, T, hd); return the keys/values its queries attend over."""
        keys, values = self.keys[layer], self.values[layer]
        if self.window is None:
            row_index, positions = run.writes
            # Advanced indices on dims 0 and 2 put (B, T) first: write k as (B, T, n_kv, hd).
            keys[row_index, :, positions] = k.transpose(1, 2)
            values[row_index, :, positions] = v.transpose(1, 2)
            return keys[run.slots, :, :run.span], values[run.slots, :, :run.span]
        slots, cells, rows, steps = run.writes
        if not run.write_first:  # copies of the ring as it was, taken before it is overwritten
            attend = (torch.cat([keys[run.slots, :, :run.span], k], dim=2),
                      torch.cat([values[run.slots, :, :run.span], v], dim=2))
        keys[slots, :, cells] = k.transpose(1, 2)[rows, steps]  # (N, n_kv, hd) each side
        values[slots, :, cells] = v.transpose(1, 2)[rows, steps]
        if not run.write_first:
            return attend
        return keys[run.slots, :, :run.span], values[run.slots, :, :run.span]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Packed attention: q (1, n_head, N, hd) and k, v (1, n_kv_head, N, hd) hold the runs bound with
        bind_packed, one after another; each run's rows are stored and attend over their own keys.
        Returns (1, n_head, N, hd)."""
        outputs, start = [], 0
        for run in self._runs:
            count = run.slots.stop - run.slots.start
            end = start + count * run.T

            def rows_of(x: torch.Tensor) -> torch.Tensor:  # (1, heads, count*T, hd) -> (count, heads, T, hd)
                return x[0, :, start:end].unflatten(1, (count, run.T)).transpose(0, 1)

            keys, values = self._store(run, layer, rows_of(k), rows_of(v))
            y = F.scaled_dot_product_attention(rows_of(q), keys, values, attn_mask=run.mask,
                                               enable_gqa=q.shape[1] != keys.shape[1])
            outputs.append(y.transpose(0, 1).flatten(1, 2))  # (n_head, count*T, hd)
            start = end
        return torch.cat(outputs, dim=1).unsqueeze(0)

    def advance(self, T: int) -> None:
        for run in self._runs:
            for row, slot in enumerate(range(run.slots.start, run.slots.stop)):
                self.lengths[slot] += run.T if run.new_tokens is None else run.new_tokens[row]

    def move(self, source: int, target: int) -> None:
        """Copy slot `source` (its filled positions) into slot `target`."""
        n = min(self.lengths[source], self.capacity)  # a ring's slots keep their places: position % capacity
        for layer in range(len(self.keys)):
            self.keys[layer][target, :, :n] = self.keys[layer][source, :, :n]
            self.values[layer][target, :, :n] = self.values[layer][source, :, :n]
        self.lengths[target] = self.lengths[source]

    def clear(self, slot: int) -> None:
        self.lengths[slot] = 0

    def select_rows(self, rows: list[int]) -> None:
        """Keep the slots `rows` (repeats allowed), in that order, as the cache's slots 0 .. len(rows)-1: beam
        search's gather, where each surviving hypothesis continues the keys and values of the one it extends."""
        index = torch.tensor(rows, device=self.keys[0].device)
        self.keys = [keys.index_select(0, index) for keys in self.keys]
        self.values = [values.index_select(0, index) for values in self.values]
        self.lengths = [self.lengths[row] for row in rows]
        self.slots = len(rows)
