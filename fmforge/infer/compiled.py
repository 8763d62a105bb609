"""Compiled decode steps: torch.compile'd once, for the sequences decoding in slots 0 .. n-1 of the engine's cache.

At batch 1 a small model's eager decode step spends as much time dispatching its ~300 small operators (norms,
RoPE, residual adds, cache writes, each a few microseconds from Python) as multiplying matrices. Compiled (gpt-fast's
recipe, on the CPU), the step is one call: inductor fuses the elementwise work into a few C++ loops, a C++ wrapper
makes the calls between them. The matrix products (`decode_twin`): a lone sequence's are written out as loops that
stream each weight once, a batch's are library products on weights stacked and held transposed.

Two graphs. A sequence decoding alone: static shapes, the whole cache row attended over (the mask hides keys not
yet written), the start position a tensor, the tokens padded to a fixed width: one graph for a plain step
(1 token) and one for a speculative step (1 + k tokens). Padding tokens write keys past the real ones, which the
next step overwrites before anything attends to them (as rejected drafts already are). A batch of 2 or more
sequences, one token each: the batch size and the span of keys attended over (the longest row's length rounded
up by `key_span`, as the eager cache does) are dynamic sizes, so one graph serves them all (plus one for the span
that is the whole row, which the compiler specialises). Attention is written out in the graph (`_FirstSlots`).

Each step also makes, in its graph, what sampling needs of rows that need nothing else (`Step`): every row's greedy
pick and, for rows sampled at a temperature, the token drawn with the uniform number the engine drew for it, both
with the rows' logit biases added; the sampler then takes them without an operator of its own on the logits.

Used by the engine (`Engine(compile=True)`; `fmforge serve/generate/chat --compile`) for every decode step that
is not mixed with a prompt chunk; prefill stays eager. What it cannot compile it declines (`unsupported`), and a
failure to compile (no C++ compiler, say) turns it off with one line on stderr: decoding goes on eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Attention, SwiGLU, Transformer
from .cache import SlotKVCache, key_span
from .sampling import row_draws, row_picks


class Step(NamedTuple):
    """What a compiled step gives back: logits (n, V), each row's picks (sampling.row_picks: the greedy token, -1
    where not finite) and, for one token a row, the tokens drawn at the temperatures and uniforms it was handed
    (sampling.row_draws; None for a speculative window)."""
    logits: torch.Tensor
    picks: list[int]
    draws: list[int] | None


class _FirstSlots:
    """The KVCache protocol (model.py) over slots 0 .. B-1 of a SlotKVCache, T tokens per row starting at each
    row's own position, a tensor (traced, not baked into the graph). `attend` writes the new keys/values and
    attends over the first `span` positions of each row, the mask hiding keys past each query's position.

    Attention is written out (two batched products and a softmax) rather than F.scaled_dot_product_attention,
    whose CPU kernel costs ~0.35 ms a layer for 16 rows of one query over 64 keys here, several times the
    arithmetic."""

    packed = True  # attention calls `attend`

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], starts: torch.Tensor, T: int,
                 span: int):
        self.keys, self.values, self.span = keys, values, span
        self.positions = starts.view(-1, 1) + torch.arange(T, device=starts.device)  # (B, T)
        self.mask = torch.arange(span, device=starts.device) <= self.positions.unsqueeze(-1)  # (B, T, span)

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        return rope_cos[self.positions].unsqueeze(1), rope_sin[self.positions].unsqueeze(1), None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd) -> (B, n_head, T, hd)."""
        keys, values = self.keys[layer], self.values[layer]
        (B, H, T, hd), kv_heads = q.shape, k.shape[1]
        # Indexed by tensors on dims 0 and 2 (not keys[:B], a view), so that inductor writes the new positions in
        # place instead of copying the rows around the write. (B, T, n_kv, hd) each side.
        slots = torch.arange(B, device=k.device).view(-1, 1)
        keys[slots, :, self.positions] = k.transpose(1, 2)
        values[slots, :, self.positions] = v.transpose(1, 2)
        keys, values = keys[:B, :, :self.span], values[:B, :, :self.span]
        group = H // kv_heads  # query heads per key/value head (grouped-query attention)
        q = q.reshape(B, kv_heads, group * T, hd)
        scores = (q @ keys.transpose(-1, -2)) * hd ** -0.5  # (B, n_kv, group * T, span)
        mask = self.mask.unsqueeze(1).expand(B, group, T, self.span).reshape(B, 1, group * T, self.span)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return (weights @ values).reshape(B, H, T, hd)

    def advance(self, T: int) -> None:
        pass  # the engine keeps the slots' lengths


# On the CPU, a lone sequence's products of up to this many rows are written out as multiply-and-sum (see
# _WrittenOutLinear). Measured against x @ W^T in the compiled step of a 6 x 256 model (quiet machine, the two
# alternating in one process): 1 row fp32 2.28 -> 1.27 ms a step at 1 thread, 2.20 -> 0.72 at 2; bf16 2.55 -> 1.06
# at 1 thread; 5 rows (a speculative step) fp32 4.18 -> 3.77 at 1 thread. In bf16 the library's kernels (AVX512-BF16
# dot products) win from ~5 rows. Batches take the library's product: written out with the row count dynamic, a
# 16-row fp32 step measured level with it or slower (5.8-6.5 or 9.5-10.3 ms by the layout of the result, against
# 6.7-7.4 at 2 threads), and in bf16 the library is faster from ~5 rows.
WRITTEN_OUT_ROWS = {torch.float32: 5, torch.bfloat16: 1}


class _WrittenOutLinear(nn.Module):
    """One or more Linears on the same input, for the step of a sequence decoding alone (static shapes: 1 token,
    or 1 + k speculated). On the CPU, up to WRITTEN_OUT_ROWS rows, each product is written out as multiply-and-sum
    over the Linear's own weight, (out, in) as it lies: inductor makes that a vectorised C++ loop streaming the
    weight once, where the library's matrix-vector product ran at about half the speed (the 25 products of a
    6 x 256 model: 0.62 vs 1.39 ms in fp32 at 1 thread, measured alone). Otherwise F.linear. No copy of any weight.
    Returns the single output, or a tuple of one per Linear."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        for i, linear in enumerate(linears):  # the model's own tensors, shared
            self.register_buffer(f"weight{i}", linear.weight.detach(), persistent=False)
            self.register_buffer(f"bias{i}", None if linear.bias is None else linear.bias.detach(), persistent=False)
        self.count = len(linears)

    def forward(self, x: torch.Tensor):
        rows = math.prod(x.shape[:-1])  # an int: the graphs that use this are compiled with static shapes
        written_out = x.device.type == "cpu" and rows <= WRITTEN_OUT_ROWS.get(x.dtype, 0)
        outputs = []
        for i in range(self.count):
            weight, bias = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
            if written_out:
                y = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
                outputs.append((y if bias is None else y + bias.float()).to(x.dtype))
            else:
                outputs.append(F.linear(x, weight, bias))
        return outputs[0] if self.count == 1 else tuple(outputs)


class _StackedLinear(nn.Module):
    """One or more Linears on the same input as one library product, for a batch of sequences (a dynamic number of
    rows): x times the weights stacked and held transposed, (in, out) contiguous, the layout in which the library's
    small products ran fastest here. One product for q, k and v and one for gate and up: 25 products instead of 43
    (16 rows in bf16: 1.7 -> 1.15 ms), at the price of one transposed copy of the weights. Returns the single
    output, or a tuple of one per Linear."""

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        weight = linears[0].weight
        self.weight_t = torch.cat([linear.weight.detach() for linear in linears]).t().contiguous()
        biases = [linear.bias for linear in linears]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device) if b is None else b.detach()
             for lin, b in zip(linears, biases)])
        self.sizes = [linear.out_features for linear in linears]

    def forward(self, x: torch.Tensor):
        y = x @ self.weight_t
        y = y if self.bias is None else y + self.bias
        return y if len(self.sizes) == 1 else y.split(self.sizes, dim=-1)


class _DecodeAttention(Attention):
    """Attention with q, k and v from one module (`qkv`, returning the three)."""

    def project(self, x: torch.Tensor):
        return self.qkv(x)


class _DecodeSwiGLU(SwiGLU):
    """SwiGLU with gate and up from one module (`gate_and_up`, returning the two)."""

    def gate_up(self, x: torch.Tensor):
        return self.gate_and_up(x)


def _group(module: nn.Module, names: tuple[str, ...], cls: type, grouped: str, linear_cls: type) -> None:
    """Turn `module`'s Linears `names` into one `linear_cls` module `grouped`, and the module into `cls` (whose
    forward calls it), where they are all plain Linears (a LoRA-wrapped one, say, is left as it is)."""
    linears = [getattr(module, name) for name in names]
    if not all(type(linear) is nn.Linear for linear in linears):
        return
    for name in names:
        delattr(module, name)
    setattr(module, grouped, linear_cls(*linears))
    module.__class__ = cls


def decode_twin(model: Transformer, written_out: bool) -> Transformer:
    """A copy of `model` for a compiled step, sharing every parameter and buffer with it, whose Linears become
    _WrittenOutLinear (`written_out`: a lone sequence's step) or _StackedLinear (a batch's step), q/k/v and gate/up
    grouped into one module each. Same forward code, so the same arithmetic up to the order of sums."""
    linear_cls = _WrittenOutLinear if written_out else _StackedLinear
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, shared)
    for module in list(twin.modules()):
        if type(module) is Attention:
            _group(module, ("q_proj", "k_proj", "v_proj"), _DecodeAttention, "qkv", linear_cls)
        elif type(module) is SwiGLU:
            _group(module, ("gate_proj", "up_proj"), _DecodeSwiGLU, "gate_and_up", linear_cls)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, linear_cls(child))
    return twin.eval()


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon from Sapphire Rapids on): bf16 matrix products several times
    AVX512's."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def compile_options(batch: bool, device: torch.device) -> dict:
    """Inductor's options (torch._inductor.config) for compiling a decode step.
    - cpp_wrapper: the step's calls are made from C++, not from a generated Python function (-0.4 ms a step).
    - freezing: the weights become constants of the graph (the twins' are copies nobody updates), so inductor
      folds what depends on them alone and hands the library products weights packed once for its kernels, not
      on every call. Measured on an Intel Xeon with AMX, 2 threads, the quickstart's 6 x 256 model: a lone
      sequence's fp32 step 0.93 -> 0.86 ms; 16 bf16 rows over 200 keys 3.03 -> 2.71 ms.
    - max_autotune, a batch's step on a CPU with AMX: inductor times its own C++ GEMM templates (AMX micro-kernels)
      against the library for each product and keeps the faster: the same 16 rows 2.71 -> 2.08 ms, and 2 rows
      1.66 -> 0.76 ms (the library's fixed cost per product was most of a small batch's step). Compiling the
      batch graphs takes about twice as long. On an AMD EPYC (AVX512, no AMX) the templates measured no faster
      than the library (2026-12-06), so they stay off there. Without freezing they gain nothing (3.29 ms).
    The cost is memory: each frozen graph keeps the weights as its kernels want them (packed), beside the model's.
    The `medium` preset in bf16 (156 MiB of weights), an engine of 16 slots compiled: +1,484 MiB of RSS, against
    +636 MiB unfrozen; the two batch graphs account for ~600 MiB of the difference, the lone sequence's ~240."""
    options = {"cpp_wrapper": True, "freezing": True}
    if batch and device.type == "cpu" and has_amx():
        # Quiet: no timing tables or choice statistics on stderr.
        options.update(max_autotune=True, autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)
    return options


class CompiledDecoder:
    """Decode steps of the first slots of `cache` for `model`: one graph for a sequence decoding alone, at widths 1
    and `1 + speculate` (static shapes, the whole cache row), and one for a batch of 2 or more, one token each
    (the batch size and the span of keys attended over, rounded up by `key_span`, are dynamic: one compiled graph
    for all of them, plus one for the span that is the whole row). A batch's linear weights are copied (stacked) when
    it is made, and every weight is frozen into the graphs when they compile (compile_options): a model whose
    weights change afterwards needs a new one."""

    def __init__(self, model: Transformer, cache: SlotKVCache, speculate: int):
        self.cache = cache
        self.alone_model = decode_twin(model, written_out=True)
        # Batches (and their stacked copy of the weights) only where the cache has slots for more than one sequence.
        self.batch_model = decode_twin(model, written_out=False) if cache.slots > 1 else None
        self.widths = sorted({1, 1 + speculate} if speculate else {1})
        self.vocab_size = model.config.vocab_size
        self._alone = torch.compile(self._forward, fullgraph=True, dynamic=False)
        self._batched = torch.compile(self._forward_batch, fullgraph=True, dynamic=None)
        device = cache.keys[0].device
        self._options = {self._alone: compile_options(False, device), self._batched: compile_options(True, device)}
        self.enabled = True
        self.warm = False  # every graph compiled (warm_up): guards then only tell the graphs apart (_run)

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

    @staticmethod
    def _logits(model: Transformer, ids: torch.Tensor, starts: torch.Tensor, span: torch.Tensor,
                temperature: torch.Tensor, uniforms: torch.Tensor, bias: torch.Tensor, keys: list[torch.Tensor],
                values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, T, V) of ids (B, T) fed to slots 0 .. B-1 at `starts` (B,), attending over the first
        len(span) positions of each row (`span`: an empty tensor whose length is the span, so that it can be a
        dynamic size); their row_picks (B, T) with each row's logit bias (B, V): the greedy token, or -1 for a row
        that is not all finite; and, for one token a row (T = 1), row_draws (B,) at each row's temperature and
        uniform (B,) (T > 1: empty). In the graph those are a few loops over the logits; after it, a dozen small
        operators, whose dispatch cost a lone greedy sequence ~0.2 ms a token here (the weights streamed by the
        step have just evicted their code)."""
        view = _FirstSlots(keys, values, starts, ids.shape[1], span.shape[0])
        logits = model(ids, kv_cache=view).logits
        draws = row_draws(logits[:, 0], temperature, uniforms, bias) if ids.shape[1] == 1 else uniforms[:0]
        return logits, row_picks(logits, bias.unsqueeze(1)), draws

    def _forward(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._logits(self.alone_model, *args)

    def _forward_batch(self, *args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._logits(self.batch_model, *args)  # a code object of its own: dynamo keeps its graphs apart

    def warm_up(self) -> None:
        """Compile every graph now (seconds to tens of seconds each on a CPU) rather than on the first requests.
        Runs on an empty cache only; the keys it writes lie where nothing attends to them before they are
        overwritten (at position 0, and at the last position of the row, which no query ever sees: a sequence
        stops when it fills its context, so the last position is never fed)."""
        started = time.perf_counter()
        for width in self.widths:
            if any(self.cache.lengths) or not self.enabled:
                return
            self.decode([0] * width)
        if self.cache.slots > 1:
            self.decode_batch([0, 0])
            last = self.cache.capacity - 1
            self.cache.lengths[:2] = [last, last]  # the graph for the whole row
            try:
                self.decode_batch([0, 0])
            finally:
                self.cache.lengths[:2] = [0, 0]
        if self.enabled:
            self.warm = True
            batches = f"; batches of 2 to {self.cache.slots}" if self.cache.slots > 1 else ""
            print(f"fmforge: decode step compiled (one sequence: {self.widths} tokens{batches}) in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def decode(self, tokens: list[int], temperature: float = 1.0, uniform: float = 0.0,
               bias: torch.Tensor | None = None) -> Step | None:
        """The Step of `tokens` fed at slot 0's current length (which the caller then advances): logits
        (len(tokens), V), their picks, and for one token the draw at `temperature` and `uniform`, both with `bias`
        (1, V) added (sampling.dense_bias; None: none). None when the compiled step does not apply (no width fits,
        the cache row is too short, or compiling failed): the caller runs the eager forward instead."""
        width = next((w for w in self.widths if w >= len(tokens)), None)
        start = self.cache.lengths[0]
        if not self.enabled or width is None or start + width > self.cache.capacity:
            return None
        ids = [tokens + [tokens[-1]] * (width - len(tokens))]
        out = self._run(self._alone, ids, [start], self.cache.capacity, [temperature], [uniform],
                        self._bias(bias, 1))
        if out is None:
            return None
        logits, picks, draws = out
        return Step(logits[0, :len(tokens)], picks[0, :len(tokens)].tolist(), draws.tolist() if width == 1 else None)

    def decode_batch(self, tokens: list[int], temperatures: list[float] | None = None,
                     uniforms: list[float] | None = None, bias: torch.Tensor | None = None) -> Step | None:
        """The Step of one token per slot 0 .. n-1 (n >= 2), each fed at its slot's current length (which the caller
        then advances), drawn at `temperatures` and `uniforms` (default 1 and 0), with `bias` (n, V) added (None:
        none), or None when the compiled step does not apply."""
        starts = self.cache.lengths[:len(tokens)]
        if not self.enabled or self.batch_model is None or max(starts) >= self.cache.capacity:
            return None
        span = key_span(max(starts) + 1, self.cache.capacity)
        n = len(tokens)
        out = self._run(self._batched, [[t] for t in tokens], starts, span, temperatures or [1.0] * n,
                        uniforms or [0.0] * n, self._bias(bias, n), dynamic=True)
        if out is None:
            return None
        logits, picks, draws = out
        return Step(logits[:, 0], picks[:, 0].tolist(), draws.tolist())

    def _bias(self, bias: torch.Tensor | None, rows: int) -> torch.Tensor:
        """`bias`, or zeros in its place: a new tensor either way (a view of a kept one has guards of its own, and
        the graph would compile again for a bias that is not one)."""
        return torch.zeros(rows, self.vocab_size, device=self.cache.keys[0].device) if bias is None else bias

    def _run(self, step, ids: list[list[int]], starts: list[int], span: int, temperatures: list[float],
             uniforms: list[float], bias: torch.Tensor, dynamic: bool = False):
        device = self.cache.keys[0].device
        inputs = (torch.tensor(ids, device=device), torch.tensor(starts, device=device),
                  torch.empty(span, device=device), torch.tensor(temperatures, device=device),
                  torch.tensor(uniforms, device=device, dtype=torch.float64), bias)
        if dynamic:
            for tensor in inputs:  # "maybe": the span that is the whole row gets a graph of its own
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
        # Once every graph is compiled, dynamo evaluates only the guards that tell its graphs apart (width, the
        # whole-row span, which decoder), not all of them on every call: a test runs every batch size, width, bias
        # and temperature after warm_up with recompiling made an error, so no other guard fails here. Engines with
        # and without, alternating 10 rounds in one process, 2 threads: a lone greedy stream 1.08x tokens/s, 16
        # sampled bf16 streams 1.04x.
        stance = torch.compiler.set_stance(skip_guard_eval_unsafe=True) if self.warm else contextlib.nullcontext()
        # Until warm, a call may compile: inductor's options are set for it globally, because dynamo reads one of
        # them (freezing) itself while tracing, where torch.compile's `options` do not reach.
        compiling = contextlib.ExitStack()
        if not self.warm:
            import torch._inductor.config as inductor_config
            compiling.enter_context(inductor_config.patch(self._options[step]))
            compiling.enter_context(warnings.catch_warnings())  # autotuning's own deprecation warning, not ours
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        try:
            with stance, compiling:
                return step(*inputs, self.cache.keys, self.cache.values)
        except Exception as exc:  # noqa: BLE001 — compiling needs a C++ compiler and more; eager always works
            self.enabled = False
            print(f"fmforge: the compiled decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]});"
                  " decoding eagerly", file=sys.stderr, flush=True)
            return None
