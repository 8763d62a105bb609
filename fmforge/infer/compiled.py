"""A compiled decode step for a sequence decoding alone: static shapes, compiled once with torch.compile.

At batch 1 a small model's eager decode step spends as much time dispatching its ~300 small operators (norms,
RoPE, residual adds, cache writes, each a few microseconds from Python) as multiplying matrices. Compiled with
static shapes (gpt-fast's recipe, on the CPU), the step is one call: inductor fuses the elementwise work into a
few C++ loops, a C++ wrapper makes the calls between them, and the matrix-vector products read weights held
transposed (`decode_twin`), the layout in which they run fastest here.

Static shapes: the step reads the whole cache row (its `capacity` keys, the mask hides those not yet written),
takes the start position as a tensor, and pads its tokens to a fixed width, so one graph serves every position:
one for a plain step (1 token) and one for a speculative step (1 + k tokens). Padding tokens write keys past the
real ones, which the next step overwrites before anything attends to them (as rejected drafts already are).

Used by the engine (`Engine(compile=True)`; `fmforge serve/generate/chat --compile`) for slot 0 when one
sequence decodes; batched steps and prefill stay eager. What it cannot compile it declines (`unsupported`), and a
failure to compile (no C++ compiler, say) turns it off with one line on stderr: decoding goes on eagerly.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn as nn

from ..model import Transformer
from .cache import SlotKVCache


class _SlotZero:
    """The KVCache protocol (model.py) over slot 0 of a SlotKVCache, for T tokens starting at a position that is
    a tensor (traced, not baked into the graph). Writes the new keys/values; attends over the whole capacity."""

    packed = False

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: torch.Tensor, T: int):
        self.keys, self.values = keys, values
        self.positions = start + torch.arange(T, device=start.device)  # (T,)

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        capacity = self.keys[0].shape[2]
        mask = torch.arange(capacity, device=rope_cos.device) <= self.positions.unsqueeze(-1)  # (T, capacity)
        return rope_cos[self.positions], rope_sin[self.positions], mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[layer], self.values[layer]
        # Indexed by tensors on dims 0 and 2 (not keys[0], a view), so that inductor writes the T new positions in
        # place instead of copying the slot's whole row around the write. (1, T, n_kv, hd) each side.
        slot, positions = torch.zeros(1, 1, dtype=torch.long, device=k.device), self.positions.unsqueeze(0)
        keys[slot, :, positions] = k.transpose(1, 2)
        values[slot, :, positions] = v.transpose(1, 2)
        return keys[:1], values[:1]

    def advance(self, T: int) -> None:
        pass  # the engine keeps the slot's length


class _DecodeLinear(nn.Module):
    """A Linear for batch-1 decoding: its weight held transposed, (in, out) contiguous. x @ W^T with W^T a plain
    matrix is a faster matrix-vector product on a CPU than F.linear's transposed view (2.3 vs 3.0 ms for the 43
    products of a 6 x 256 model's step here), at the price of a second copy of the weights."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = linear.weight.detach().t().contiguous()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


def decode_twin(model: Transformer) -> Transformer:
    """A copy of `model` for the compiled step that shares every tensor with it except the linear layers, which
    become _DecodeLinear (their weights transposed once here). Same forward code, so the same arithmetic."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, shared)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, _DecodeLinear(child))
    return twin.eval()


class CompiledDecoder:
    """Decode steps of slot 0 of `cache` for `model`, compiled for widths 1 and `1 + speculate`. The linear weights
    are copied (transposed) when it is made: a model whose weights change afterwards needs a new one."""

    def __init__(self, model: Transformer, cache: SlotKVCache, speculate: int):
        self.model, self.cache = decode_twin(model), cache
        self.widths = sorted({1, 1 + speculate} if speculate else {1})
        # cpp_wrapper: the compiled step's calls are made from C++, not from a generated Python function (-0.4 ms
        # a step here).
        self._step = torch.compile(self._forward, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        self.enabled = True

    @staticmethod
    def unsupported(model: Transformer, cache: SlotKVCache, adapters: list) -> str | None:
        """Why this model cannot decode through the compiled step, or None if it can."""
        c = model.config
        if adapters:
            return "adapters are served (each row picks its own)"
        if c.n_experts:
            return "a mixture-of-experts model routes tokens by value"
        if cache.window is not None:
            return "a sliding-window model's cache is a ring"
        if not c.causal:
            return "an encoder does not decode"
        return None

    def _forward(self, ids: torch.Tensor, start: torch.Tensor, keys: list[torch.Tensor],
                 values: list[torch.Tensor]) -> torch.Tensor:
        view = _SlotZero(keys, values, start, ids.shape[1])
        return self.model(ids, kv_cache=view).logits[0]  # (T, V)

    def warm_up(self) -> None:
        """Compile every width now (tens of seconds on a CPU) rather than on the first request. The keys it writes
        into slot 0 are overwritten by the next sequence's prefill."""
        started = time.perf_counter()
        for width in self.widths:
            if self.cache.lengths[0] or not self.enabled:
                return
            self.decode([0] * width)
        if self.enabled:
            print(f"fmforge: decode step compiled for {self.widths} tokens in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)

    def decode(self, tokens: list[int]) -> torch.Tensor | None:
        """Logits (len(tokens), V) for `tokens` fed at slot 0's current length (which the caller then advances),
        or None when the compiled step does not apply (no width fits, the cache row is too short, or compiling
        failed): the caller runs the eager forward instead."""
        width = next((w for w in self.widths if w >= len(tokens)), None)
        start = self.cache.lengths[0]
        if not self.enabled or width is None or start + width > self.cache.capacity:
            return None
        device = self.cache.keys[0].device
        ids = torch.tensor([tokens + [tokens[-1]] * (width - len(tokens))], device=device)
        try:
            logits = self._step(ids, torch.tensor(start, device=device), self.cache.keys, self.cache.values)
        except Exception as exc:  # noqa: BLE001 — compiling needs a C++ compiler and more; eager always works
            self.enabled = False
            print(f"fmforge: the compiled decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]});"
                  " decoding eagerly", file=sys.stderr, flush=True)
            return None
        return logits[:len(tokens)]
