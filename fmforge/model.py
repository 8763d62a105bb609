"""THE transformer: a decoder-only, Llama-style language model.

RMSNorm (Zhang & Sennrich 2019) before each block, rotary position embeddings (RoPE, Su et al. 2021),
SwiGLU feed-forward (Shazeer 2020), grouped-query attention (GQA, Ainslie et al. 2023) through PyTorch's
scaled_dot_product_attention, optional Mixture-of-Experts feed-forward with top-k routing and the Switch
Transformer load-balancing loss (Fedus et al. 2021), a KV cache for decoding, and an input path for
precomputed embeddings (a whole sequence, or `MediaEmbeds` placed among token ids) so that other modalities can
enter the same token stream.

Parameter names follow Hugging Face's Llama (embed_tokens, layers.N.self_attn.q_proj, ...), so that
import/export and PEFT adapter key names map one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .ops import IGNORE_INDEX, linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16 autocast, as Llama does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def cast_for_products(x: torch.Tensor) -> torch.Tensor:
    """x in autocast's dtype where autocast is on: a block's normalised input, cast once instead of by each product
    that reads it (q, k and v; gate and up). The same values; two to three fewer casts a layer forward and as many
    fewer gradient casts backward (the `base` preset's bf16 step 1.02x, median of 14 alternating rounds in one
    process, 2 threads)."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def ntk_base(theta: float, factor: float, head_dim: int) -> float:
    """NTK-aware scaling's base (bloc97, 2023): theta * factor^(d/(d-2)) slows the slowest frequency by exactly
    `factor` and leaves the fastest unchanged."""
    return theta * factor ** (head_dim / (head_dim - 2))


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """RoPE angular frequencies (radians per position), (head_dim/2,) float64; `scaling` is
    ModelConfig.rope_scaling (None = plain RoPE; the methods are described at config.ROPE_SCALING_KEYS)."""
    kind = None if scaling is None else scaling["rope_type"]
    if kind == "ntk":
        theta = ntk_base(theta, scaling["factor"], head_dim)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if kind in (None, "ntk"):
        return inv_freq
    factor = scaling["factor"]
    if kind == "linear":  # position interpolation: position p is read as p / factor
        return inv_freq / factor
    if kind == "yarn":
        # NTK-by-parts (YaRN, Peng et al. 2023, sec. 3.2): dimensions that turn fewer than beta_slow times over the
        # original context are interpolated (divided by factor), those that turn more than beta_fast times are
        # kept, with a linear ramp between; the ramp ends are rounded outwards unless truncate is false.
        original = scaling["original_max_position_embeddings"]

        def dimension(rotations: float) -> float:  # the dimension index that turns `rotations` times
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dimension(scaling.get("beta_fast", 32.0)), dimension(scaling.get("beta_slow", 1.0))
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if low == high else high  # as transformers: no division by zero
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0.0, 1.0)
        keep = 1 - ramp  # 1 = unchanged (extrapolated), 0 = divided by factor (interpolated)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    # Llama 3.1's scaling (Meta's llama-models `apply_scaling`, transformers' "llama3" rope_type): waves shorter
    # than original/high_freq_factor positions are kept, waves longer than original/low_freq_factor are slowed
    # down by `factor`, and those in between are blended linearly in original/wavelength.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    keep = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 1 = unchanged, 0 = divided by factor
    return (1 - keep) * inv_freq / factor + keep * inv_freq


def rope_attention_factor(scaling: dict | None) -> float:
    """The factor on cos and sin (so on every attention logit, squared): YaRN's temperature, sqrt(1/t) =
    0.1 ln(factor) + 1 unless attention_factor is given; 1 for every other method."""
    if scaling is None or scaling["rope_type"] != "yarn":
        return 1.0
    if "attention_factor" in scaling:
        return scaling["attention_factor"]
    return 0.1 * math.log(scaling["factor"]) + 1.0 if scaling["factor"] > 1 else 1.0


def rope_tables(head_dim: int, length: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (length, head_dim), in the 'rotate half' layout used by HF Llama."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (length, head_dim)
    scale = rope_attention_factor(scaling)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_head, T, head_dim) by position; cos/sin are (T, head_dim)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _Rotation.apply(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x * cos + R(x) * sin for sign 1, with R(x) = [-x2, x1] (x's halves); x * cos + R^T(x) * sin for sign -1,
    R^T(z) = [z2, -z1], which is the gradient of the rotation. Three passes over x (one product, two in-place
    halves) where the autograd graph of apply_rope's expression makes five forward and as many backward."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out.to(x.dtype)


class _Rotation(torch.autograd.Function):
    """RoPE for training: the gradient is the inverse rotation of the output's gradient, so nothing of x is kept
    (forward + backward of q and k at (8, 6, 256, 64), bf16, 2 threads: 2.5-2.7 vs 4.1-4.6 ms a layer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None


def attention_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """(..., T, S) bool, True = may attend: query positions (..., T) against key positions (..., S). A query at q
    sees the keys at 0 <= k <= q, and with a sliding window only the last `window` of them (q - window < k), as
    Mistral's sliding-window attention (Jiang et al. 2023) does. A negative key position marks an empty slot."""
    q, k = query_positions.unsqueeze(-1), key_positions.unsqueeze(-2)
    mask = (k >= 0) & (k <= q)
    return mask if window is None else mask & (k > q - window)


def ring_positions(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """(..., capacity): the position each slot of a ring buffer holds once positions [0, length) of a row were
    written at slot `position % capacity`; negative where nothing was written yet. `lengths` is (...)."""
    last = lengths.unsqueeze(-1) - 1
    return last - (last - torch.arange(capacity, device=lengths.device)).remainder(capacity)


@runtime_checkable
class KVCache(Protocol):
    """What attention needs from a key/value cache; the model calls these three around each forward.

    `LockstepKVCache` (below: a batch whose rows advance together) and the engine's `SlotKVCache` (infer/cache.py:
    rows at their own lengths) implement it; a sliding-window or paged cache would too. A cache whose `packed` is
    True attends itself: attention calls its `attend(layer, q, k, v)` instead of `update` (the engine's cache when
    it holds the tokens of several sequences side by side in one row, each attending over its own keys; the
    compiled decode step's view, which writes the attention out).
    """

    packed: bool

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Before a forward of T new tokens: their RoPE cos/sin and the attention mask (None = plain causal)."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values (B, n_kv_head, T, head_dim) of `layer`; return those to attend over."""
        ...

    def advance(self, T: int) -> None:
        """After the last layer: the T new positions are filled."""
        ...


class LockstepKVCache:
    """Keys and values of every layer for positions [0, length), preallocated to max_length; every row of the
    batch is at the same length.

    Shapes per layer: (B, n_kv_head, capacity, head_dim). capacity = max_length, except for a sliding-window model
    whose window is shorter: then it keeps only the last `window` positions, in a ring buffer (position p at slot
    p % window; keys are stored after RoPE, so they keep their absolute positions), and its memory stays constant
    however long the sequence grows.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device=None, dtype=torch.float32):
        window = config.sliding_window
        self.window = window if window is not None and window < max_length else None  # None: nothing rolls
        self.capacity = self.window or max_length
        shape = (batch_size, config.n_kv_head, self.capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_length = max_length
        self.length = 0  # positions filled so far (advanced by the model after the last layer)
        self.packed = False

    def prepare(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor, T: int):
        """Before a forward of T new tokens: their RoPE tables and the attention mask (None = the usual causal
        mask, or no mask for a single token, which may see the whole cache)."""
        start = self.length
        if start + T > len(rope_cos):
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length {len(rope_cos)}")
        if start + T > self.max_length:
            raise ValueError(f"sequence of {start + T} tokens exceeds the cache's {self.max_length} positions")
        mask = None
        if self.window is not None and T > 1:
            # A chunk attends over the ring as it was plus its own keys (update); one token needs no mask: it
            # overwrites the position that just left its window, and the ring then holds exactly its window.
            positions = torch.arange(start, start + T, device=rope_cos.device)
            held = ring_positions(torch.tensor(start, device=rope_cos.device), self.capacity)
            mask = attention_mask(positions, torch.cat([held[:min(start, self.capacity)], positions]), self.window)
        elif start and T > 1:  # a chunk after a cached prefix: query i sees keys [0, start + i]
            mask = torch.ones(T, start + T, dtype=torch.bool, device=rope_cos.device).tril(diagonal=start)
        return rope_cos[start:start + T], rope_sin[start:start + T], mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_head, T, head_dim) at the current position; return the keys/values to attend over."""
        if self.window is not None:
            return self._update_ring(layer, k, v)
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def _update_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sliding-window form of update; the keys come in the order prepare's mask describes."""
        start, T, keys, values = self.length, k.shape[2], self.keys[layer], self.values[layer]
        if T > 1:  # the ring before this chunk, then the chunk (copies, taken before the ring is overwritten)
            held = min(start, self.capacity)
            attend = torch.cat([keys[:, :, :held], k], dim=2), torch.cat([values[:, :, :held], v], dim=2)
        kept = range(max(start, start + T - self.capacity), start + T)  # the new positions the ring keeps
        slots = torch.tensor([p % self.capacity for p in kept], device=k.device)
        keys[:, :, slots] = k[:, :, kept.start - start:]
        values[:, :, slots] = v[:, :, kept.start - start:]
        if T > 1:
            return attend
        held = min(start + 1, self.capacity)
        return keys[:, :, :held], values[:, :, :held]

    def advance(self, T: int) -> None:
        """After the last layer: the T new positions are filled."""
        self.length += T


EXPLICIT_ATTENTION_MAX_T = 512


def explicit_attention_pays(q: torch.Tensor) -> bool:
    """Whether a training step's causal attention is faster as two matrix products and a softmax than through
    scaled_dot_product_attention: on a CPU, in bf16, for short sequences. PyTorch's CPU flash-attention backward is
    slow at these sizes: at (8, 6, 256, 64), bf16, forward + backward took 28-30 ms against 17-18 ms explicitly
    (2 threads). The explicit form keeps a (T, T) matrix per head for backward, so it stops at 512 positions."""
    return (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] <= EXPLICIT_ATTENTION_MAX_T
            and torch.is_grad_enabled())


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v for (B, H, T, d) inputs. The scores come from one baddbmm that adds
    the mask (0 on and below the diagonal, -inf above) and applies the scale in the product itself: no pass of a
    masked_fill and a multiply over the (B, H, T, T) scores, forward or backward (the `base` preset's bf16 step,
    2 threads, the two forms alternating in one process: 1.05x faster; the same values bit for bit at
    (8, 6, 256, 64)). The softmax stays in q's dtype: the CPU kernel accumulates in fp32 and rounds once (the same
    probabilities as an fp32 softmax rounded to bf16, at (8, 6, 256, 64) bit for bit, 4-6 ms less a layer)."""
    B, H, T, d = q.shape
    mask = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    scores = torch.baddbmm(mask, q.reshape(B * H, T, d), k.reshape(B * H, T, d).transpose(1, 2), alpha=d ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1).view(B, H, T, T), v)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        C, bias = config.n_embd, config.attention_bias
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.causal = config.causal  # False: an encoder, every position sees every other (model.objective mlm)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x (B, T, C), unsplit into heads. (The compiled decode step makes them in one
        product: infer/compiled.py.)"""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, attn_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, hd)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # rotate in the activations' dtype (bf16 under autocast)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None and kv_cache.packed:  # several sequences' tokens in one row (see KVCache)
            y = kv_cache.attend(self.layer_index, q, k, v)  # (B, n_head, T, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, n_kv, past + T, hd)
        if self.n_kv_head != self.n_head and kv_cache is None:
            # Share each key/value head across n_head / n_kv_head query heads (training: materialised, which
            # is faster than enable_gqa in backward; decoding: enable_gqa avoids copying the cache each step).
            repeat = self.n_head // self.n_kv_head
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        if kv_cache is None and attn_mask is None and self.causal and explicit_attention_pays(q):
            y = explicit_causal_attention(q, k, v)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))
        gqa = self.n_kv_head != self.n_head and kv_cache is not None
        # No mask: causal for a fresh chunk; a single token after a cached prefix sees the whole cache.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           is_causal=self.causal and attn_mask is None and T > 1,
                                           enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Top-k routed experts (Mixtral style: softmax over the chosen k logits), plus optional shared experts
    that see every token (DeepSeekMoE style). Keeps the last load-balancing loss in `aux_loss`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_experts, config.n_experts_per_token
        self.router = nn.Linear(config.n_embd, config.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config.n_embd, config.moe_intermediate_size) for _ in range(config.n_experts))
        self.shared_experts = nn.ModuleList(
            SwiGLU(config.n_embd, config.intermediate_size) for _ in range(config.n_shared_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        B, T, C = x.shape
        tokens = x.reshape(-1, C)  # (N, C)
        logits = self.router(tokens).float()  # (N, n_experts)
        top_logits, top_index = logits.topk(self.top_k, dim=-1)  # (N, k)
        top_weights = top_logits.softmax(dim=-1)  # (N, k)
        out = torch.zeros(tokens.shape, dtype=torch.promote_types(tokens.dtype, torch.float32), device=x.device)
        for expert_index, expert in enumerate(self.experts):
            token_ids, slot = (top_index == expert_index).nonzero(as_tuple=True)
            if token_ids.numel() == 0:
                continue
            weight = top_weights[token_ids, slot].unsqueeze(-1).to(tokens.dtype)
            out.index_add_(0, token_ids, (expert(tokens[token_ids]) * weight).to(out.dtype))
        for shared in self.shared_experts:
            out = out + shared(tokens)
        # Switch loss: n_experts * sum_i f_i * P_i, f_i = share of routed slots, P_i = mean router probability.
        # Equals 1 when routing is perfectly balanced.
        probs = logits.softmax(dim=-1)
        counts = torch.zeros(self.n_experts, device=x.device).scatter_add_(
            0, top_index.reshape(-1), torch.ones(top_index.numel(), device=x.device))
        fraction = counts / top_index.numel()
        self.aux_loss = self.n_experts * (fraction * probs.mean(0)).sum()
        return out.view(B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.n_experts else SwiGLU(config.n_embd, config.intermediate_size)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(cast_for_products(self.input_layernorm(x)), cos, sin, kv_cache, attn_mask)
        return x + self.mlp(cast_for_products(self.post_attention_layernorm(x)))


@dataclass
class MediaEmbeds:
    """Precomputed embeddings placed into a token sequence (LLaVA-style early fusion of an encoder's output):
    `values` (N, n_embd) replace, in row-major order, the token embeddings at the N positions where `mask` (B, T)
    is True. The ids at those positions are placeholders (e.g. an image-patch token); they are not looked up."""
    mask: torch.Tensor  # (B, T) bool
    values: torch.Tensor  # (N, n_embd), N = mask.sum()


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, vocab_size); None when only the loss was asked for
    loss: torch.Tensor | None = None  # cross-entropy (next token, or masked token for an encoder) + MoE aux
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss, mean over layers
    hidden: torch.Tensor | None = None  # (B, T, n_embd) final normalised hidden state


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.build_rope()
        self.apply(self._init_weights)
        # Scale residual output projections by 1/sqrt(2 n_layer) (GPT-2, Radford et al. 2019).
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def build_rope(self, device=None) -> None:
        """(Re)compute the RoPE tables from the config. They are buffers that checkpoints do not store, so a model
        materialised from the meta device (load_model) calls this on its real device."""
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.context_length, c.rope_theta, c.rope_scaling)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T) token ids
        targets: torch.Tensor | None = None,  # (B, T) next-token ids; -100 = ignored
        inputs_embeds: torch.Tensor | None = None,  # (B, T, n_embd) instead of input_ids
        media: MediaEmbeds | None = None,  # embeddings that replace some positions of input_ids
        added_embeds: torch.Tensor | None = None,  # (B, T, n_embd) added to the input embeddings (a reader's)
        kv_cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,  # (B or 1, 1, T, T_total) bool, True = may attend
        #   (an encoder: (B, 1, 1, T) to hide padding keys; without it every position sees all T)
        return_logits: bool = True,
        return_hidden: bool = False,
        reduction: str = "mean",  # "sum": loss = summed cross-entropy only (the Trainer normalises, adds aux)
    ) -> ModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids, media) if inputs_embeds is None else inputs_embeds
        if added_embeds is not None:
            x = x + added_embeds.to(x.dtype)
        T = x.shape[1]
        if kv_cache is not None and not self.config.causal:
            raise ValueError("an encoder (model.objective mlm) has no KV cache: it does not generate")
        if kv_cache is not None:
            cos, sin, cache_mask = kv_cache.prepare(self.rope_cos, self.rope_sin, T)
            attn_mask = cache_mask if attn_mask is None else attn_mask
        elif T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
        else:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            window = self.config.sliding_window
            if window is not None and T > window:  # a banded causal mask; within one window it is plain causal
                positions = torch.arange(T, device=x.device)
                band = attention_mask(positions, positions, window)  # (T, T)
                attn_mask = band if attn_mask is None else attn_mask & band
        for block in self.layers:
            x = block(x, cos, sin, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.norm(x)
        fused = targets is not None and not return_logits and self.fuses_loss(x)
        logits = self.lm_head(x) if (return_logits or (targets is not None and not fused)) else None
        out = ModelOutput(logits=logits if return_logits else None, hidden=x if return_hidden else None)
        if self.config.n_experts:
            out.aux_loss = torch.stack([b.mlp.aux_loss for b in self.layers]).mean()
        if targets is not None:
            if fused:
                loss = linear_cross_entropy(x, self.lm_head.weight, targets, reduction)
            else:
                loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction=reduction)
            if out.aux_loss is not None and reduction == "mean":
                loss = loss + self.config.moe_aux_loss_coef * out.aux_loss
            out.loss = loss
        return out

    def fuses_loss(self, x: torch.Tensor) -> bool:
        """Whether the loss skips the logits (fmforge.ops.linear_cross_entropy): on a CPU, with a plain output
        layer (not LoRA-wrapped), outside torch.compile (whose graph fuses the plain path itself). Measured there
        only; on GPUs the plain path stays until measured."""
        return (x.device.type == "cpu" and type(self.lm_head) is nn.Linear and self.lm_head.bias is None
                and not torch.compiler.is_compiling())

    def embed(self, input_ids: torch.Tensor, media: MediaEmbeds | None = None) -> torch.Tensor:
        """Token embeddings (B, T, n_embd) of input_ids, with `media` scattered into its positions."""
        x = self.embed_tokens(input_ids)
        if media is None:
            return x
        if media.mask.shape != input_ids.shape:
            raise ValueError(f"media mask {tuple(media.mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
        count = int(media.mask.sum())
        if media.values.shape != (count, x.shape[-1]):
            raise ValueError(f"media values {tuple(media.values.shape)} do not fill the {count} masked positions "
                             f"of width {x.shape[-1]}")
        return x.masked_scatter(media.mask.unsqueeze(-1), media.values.to(x.dtype))

    def new_kv_cache(self, batch_size: int, max_length: int | None = None) -> LockstepKVCache:
        p = self.embed_tokens.weight
        return LockstepKVCache(self.config, batch_size, max_length or self.config.context_length, p.device, p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x active matmul params + attention (Chinchilla appendix / PaLM MFU)."""
        c = self.config
        n = c.active_parameters() + c.n_embd * c.vocab_size  # lm_head matmul counts; embedding lookup doesn't
        return 6 * n + 12 * c.n_layer * c.n_embd * c.context_length
