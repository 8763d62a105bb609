"""GGUF export for llama.cpp: the `llama` architecture (dense or Mixtral-style MoE), with the tokenizer.

What llama.cpp expects, and what this file writes (the same as llama.cpp's convert_hf_to_gguf.py):
- metadata `llama.*` (block count, widths, heads, RoPE base and dimension, RMSNorm eps, experts) and
  `tokenizer.ggml.*` (model "gpt2" = byte-level BPE, the pre-tokenizer name, tokens, token types, merges,
  special ids, add_bos flag, chat template);
- tensors named `token_embd`, `blk.N.attn_q`, ..., `output`; MoE experts stacked per layer into
  `blk.N.ffn_{gate,up,down}_exps` of shape (n_expert, rows, cols);
- Q and K projections permuted: llama.cpp's `llama` architecture rotates *adjacent* pairs (GPT-J style),
  while fmforge (like Hugging Face) rotates the two halves of each head. Reordering the output rows of
  q_proj/k_proj per head, from [x0..x_{d/2-1}, x_{d/2}..x_{d-1}] to [x0, x_{d/2}, x1, x_{d/2+1}, ...], makes
  the two computations identical;
- for Llama 3.1's "llama3" RoPE scaling, no metadata but a tensor `rope_freqs.weight` (f32, (head_dim/2,)):
  the number llama.cpp divides each RoPE frequency by (1 = unchanged, `factor` = slowed down fully); linear and
  YaRN scaling as `llama.rope.scaling.*` metadata, static NTK as its larger `rope.freq_base`;
- matrices in f32, f16 or q8_0 (rows whose length is not a multiple of 32 fall back to f16); 1-D tensors
  (norms, biases) and the MoE router stay f32.

Tensors are written one at a time from the checkpoint's memory-mapped model.safetensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..model import ntk_base, rope_frequencies
from ..checkpoint import check_text_only, read_model_config, resolve_checkpoint
from .hf import checkpoint_weights, log

OUTTYPES = ("f32", "f16", "q8_0")

# Pre-tokenizer regexes of byte-level BPE tokenizers -> llama.cpp's name for them (tokenizer.ggml.pre).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {LLAMA3_REGEX: "llama-bpe", QWEN2_REGEX: "qwen2"}


def permute_for_gguf(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection (weight (n_head*hd, C) or bias (n_head*hd,)) from the
    rotate-half RoPE layout to llama.cpp's adjacent-pairs layout (convert_hf_to_gguf.py's `permute`)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_exportable(config: ModelConfig) -> None:
    """Raise CheckpointError when the model has something llama.cpp's `llama` architecture lacks."""
    if not config.causal:
        raise CheckpointError("GGUF export writes llama.cpp's llama architecture, a decoder; this is an encoder "
                              "(model.objective mlm): export it to Hugging Face instead (fmforge export hf)")
    if config.qk_norm:
        raise CheckpointError("GGUF export writes llama.cpp's llama architecture, which has no QK-norm "
                              "(Qwen3-style); export to Hugging Face instead (fmforge export hf)")
    if config.n_shared_experts:
        raise CheckpointError("GGUF export writes llama.cpp's llama architecture, whose MoE has no shared experts")
    if config.sliding_window is not None:
        raise CheckpointError("GGUF export writes llama.cpp's llama architecture, which has no sliding-window "
                              "attention; export to Hugging Face instead (fmforge export hf)")
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "yarn" and (not scaling.get("truncate", True) or "attention_factor" in scaling):
        raise CheckpointError("GGUF export of YaRN RoPE scaling supports the default ramp and attention factor only "
                              "(llama.cpp rounds the ramp ends and derives the factor from `factor`); this model sets "
                              "truncate or attention_factor: export to Hugging Face instead (fmforge export hf)")


def scaling_type(config: ModelConfig) -> str | None:
    return None if config.rope_scaling is None else config.rope_scaling["rope_type"]


def write_rope_metadata(writer, config: ModelConfig) -> None:
    """RoPE base and scaling the way llama.cpp reads them: linear and YaRN as `rope.scaling.*` metadata (llama.cpp
    computes YaRN's ramp and attention factor itself, as transformers does), static NTK as the larger base it
    amounts to, Llama 3.1's scaling as the rope_freqs tensor (see rope_frequency_divisors)."""
    import gguf

    scaling, theta = config.rope_scaling, config.rope_theta
    kind = scaling_type(config)
    if kind == "ntk":
        theta = ntk_base(theta, scaling["factor"], config.head_dim)
    writer.add_rope_freq_base(theta)
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(scaling.get("beta_fast", 32.0))
        writer.add_rope_scaling_yarn_beta_slow(scaling.get("beta_slow", 1.0))


def rope_frequency_divisors(config: ModelConfig) -> torch.Tensor:
    """(head_dim/2,) float32: plain RoPE frequency / scaled frequency, what llama.cpp's rope_freqs holds."""
    plain = rope_frequencies(config.head_dim, config.rope_theta)
    return (plain / rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)).float()


@dataclass
class _Tensor:
    name: str  # GGUF name
    load: Callable[[], torch.Tensor]  # float32, already permuted/stacked
    shape: tuple[int, ...]
    qtype: "object"  # gguf.GGMLQuantizationType


def _tensor_plan(f, config: ModelConfig, outtype: str) -> list[_Tensor]:
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR

    def read(name: str, permute_heads: int | None = None) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            tensor = f.get_tensor(name).float()
            return permute_for_gguf(tensor, permute_heads) if permute_heads else tensor
        return load

    def stack(names_: list[str]) -> Callable[[], torch.Tensor]:
        return lambda: torch.stack([f.get_tensor(n).float() for n in names_])

    def qtype(shape: tuple[int, ...], keep_f32: bool = False):
        Q = gguf.GGMLQuantizationType
        if len(shape) == 1 or keep_f32 or outtype == "f32":
            return Q.F32
        if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            return Q.Q8_0
        return Q.F16

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(f.get_slice(name).get_shape())

    plan: list[_Tensor] = []

    def add(kind, bid: int | None, suffix: str, source: str, permute_heads: int | None = None, keep_f32=False):
        shape = shape_of(source)
        gguf_name = names[kind].format(bid=bid) + suffix
        plan.append(_Tensor(gguf_name, read(source, permute_heads), shape, qtype(shape, keep_f32)))

    if scaling_type(config) == "llama3":
        shape = (config.head_dim // 2,)
        plan.append(_Tensor(names[T.ROPE_FREQS] + ".weight", lambda: rope_frequency_divisors(config), shape,
                            qtype(shape)))
    add(T.TOKEN_EMBD, None, ".weight", "embed_tokens.weight")
    for i in range(config.n_layer):
        p = f"layers.{i}."
        add(T.ATTN_NORM, i, ".weight", p + "input_layernorm.weight")
        for kind, proj, heads in [(T.ATTN_Q, "q_proj", config.n_head), (T.ATTN_K, "k_proj", config.n_kv_head),
                                  (T.ATTN_V, "v_proj", None)]:
            add(kind, i, ".weight", p + f"self_attn.{proj}.weight", heads)
            if config.attention_bias:
                add(kind, i, ".bias", p + f"self_attn.{proj}.bias", heads)
        add(T.ATTN_OUT, i, ".weight", p + "self_attn.o_proj.weight")
        add(T.FFN_NORM, i, ".weight", p + "post_attention_layernorm.weight")
        if config.n_experts:
            add(T.FFN_GATE_INP, i, ".weight", p + "mlp.router.weight", keep_f32=True)
            for kind, proj in [(T.FFN_GATE_EXP, "gate_proj"), (T.FFN_DOWN_EXP, "down_proj"), (T.FFN_UP_EXP, "up_proj")]:
                sources = [p + f"mlp.experts.{e}.{proj}.weight" for e in range(config.n_experts)]
                shape = (config.n_experts, *shape_of(sources[0]))
                plan.append(_Tensor(names[kind].format(bid=i) + ".weight", stack(sources), shape, qtype(shape)))
        else:
            add(T.FFN_GATE, i, ".weight", p + "mlp.gate_proj.weight")
            add(T.FFN_DOWN, i, ".weight", p + "mlp.down_proj.weight")
            add(T.FFN_UP, i, ".weight", p + "mlp.up_proj.weight")
    add(T.OUTPUT_NORM, None, ".weight", "norm.weight")
    if not config.tie_embeddings:  # llama.cpp uses token_embd for the output when `output` is absent
        add(T.OUTPUT, None, ".weight", "lm_head.weight")
    return plan


def _encode(tensor: torch.Tensor, qtype) -> np.ndarray:
    import gguf

    array = tensor.numpy()
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError("GGUF export handles byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2 style); this "
                             f"one is a {model.get('type')} model{' with byte fallback' if model.get('byte_fallback') else ''} "
                             "(SentencePiece style), which is not supported yet")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
            and not steps[1].get("use_regex", True)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
    raise TokenizerError("the tokenizer's pre-tokenizer is not one llama.cpp knows by name (GPT-2, Llama 3, Qwen2); "
                         "GGUF export cannot name it")


def _vocabulary(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (padding ids the tokenizer lacks)."""
    import gguf

    TT = gguf.TokenType
    tokens: dict[int, tuple[str, int]] = {i: (t, TT.NORMAL) for t, i in tokenizer_json["model"]["vocab"].items()}
    for added in tokenizer_json.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], TT.CONTROL if added.get("special") else TT.USER_DEFINED)
    if max(tokens) >= vocab_size:
        raise TokenizerError(f"the tokenizer has ids up to {max(tokens)} but the model's vocabulary is {vocab_size}")
    names, types = [], []
    for i in range(vocab_size):
        token, kind = tokens.get(i, (f"[PAD{i}]", TT.USER_DEFINED))
        names.append(token)
        types.append(int(kind))
    return names, types


def export_gguf(checkpoint: str | Path, out: str | Path, *, outtype: str = "f16") -> Path:
    """Write a checkpoint as one GGUF file that llama.cpp loads (`llama` architecture). Returns `out`."""
    import gguf

    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    check_text_only(checkpoint, "GGUF (llama.cpp's llama architecture)")
    config = read_model_config(checkpoint)
    check_exportable(config)
    weights = checkpoint_weights(checkpoint, config)
    try:
        tokenizer_json = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {checkpoint / 'tokenizer.json'}: {exc}") from None
    pre = pre_tokenizer_name(tokenizer_json)
    tokens, token_types = _vocabulary(tokenizer_json, config.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        writer.add_type("model")
        writer.add_name(checkpoint.name)
        writer.add_vocab_size(config.vocab_size)
        writer.add_context_length(config.context_length)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.moe_intermediate_size if config.n_experts else config.intermediate_size)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_kv_head)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        write_rope_metadata(writer, config)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        if config.n_experts:
            writer.add_expert_count(config.n_experts)
            writer.add_expert_used_count(config.n_experts_per_token)
        file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        special = gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=config.vocab_size)
        special.add_to_gguf(writer, quiet=True)

        with safe_open(str(weights), "pt") as f:
            plan = _tensor_plan(f, config, outtype)
            for t in plan:  # header first: names, shapes, types and sizes of every tensor
                if t.qtype == gguf.GGMLQuantizationType.Q8_0:
                    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                    writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), t.qtype)
                else:
                    dtype = np.dtype(np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16)
                    writer.add_tensor_info(t.name, t.shape, dtype, int(np.prod(t.shape)) * dtype.itemsize)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in plan:  # then the data, one tensor in memory at a time
                writer.write_tensor_data(_encode(t.load(), t.qtype))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    log(f"exported {checkpoint} -> {out} (GGUF llama, {outtype}, {out.stat().st_size / 1e6:.1f} MB)")
    return out
