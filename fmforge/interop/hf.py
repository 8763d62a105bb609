"""Hugging Face checkpoints in and out: the Llama, Mistral, Qwen2, Qwen3 and Mixtral families.

fmforge's parameter names are Hugging Face Llama's without the `model.` prefix, and its RoPE is the same
"rotate half" layout, so conversion is a renaming, not a re-arrangement of numbers:

    HF                                                    fmforge
    model.embed_tokens.weight                             embed_tokens.weight
    model.layers.N.self_attn.{q,k,v,o}_proj.*             layers.N.self_attn.{q,k,v,o}_proj.*
    model.layers.N.self_attn.{q,k}_norm.weight  (Qwen3)   layers.N.self_attn.{q,k}_norm.weight
    model.layers.N.mlp.{gate,up,down}_proj.weight         layers.N.mlp.{gate,up,down}_proj.weight
    model.layers.N.block_sparse_moe.gate.weight (Mixtral) layers.N.mlp.router.weight
    model.layers.N.block_sparse_moe.experts.E.w1/w3/w2    layers.N.mlp.experts.E.gate_proj/up_proj/down_proj
    model.norm.weight, lm_head.weight                     norm.weight, lm_head.weight

Import streams: the model is built on the meta device, memory is allocated once (`to_empty`), and every
tensor is copied from its safetensors shard (memory-mapped by `safe_open`) one at a time, so the peak is
one copy of the model plus one tensor. Export streams the other way, shard by shard, straight from the
checkpoint's memory-mapped model.safetensors, without building the model.

An imported checkpoint keeps the source's config.json as `hf_config.json` (and its generation_config.json),
so that exporting it again gives back the same family and the same token ids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..checkpoint import (check_text_only, model_state_for_saving, read_model_config, resolve_checkpoint,
                          write_checkpoint, write_model_files)
from ..config import ROPE_SCALING_KEYS, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..model import Transformer, ntk_base
from .adapters import resolve_adapters, write_peft_adapter

HF_CONFIG_FILE = "hf_config.json"  # the source's config.json, kept inside an imported checkpoint
GENERATION_CONFIG_FILE = "generation_config.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Family:
    """What one Hugging Face model family can express, and its config defaults (from transformers)."""

    architecture: str
    norm_eps: float
    rope_theta: float
    attention_bias: str  # "none" | "always" (q/k/v bias, Qwen2) | "config" (attention_bias field, o_proj too)
    qk_norm: bool = False
    moe: bool = False
    sliding_window: str = "none"  # "none" | "mistral" (every layer) | "qwen" (use_sliding_window + layers)
    default_head_dim: int | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", 1e-6, 10000.0, attention_bias="config"),
    "mistral": Family("MistralForCausalLM", 1e-6, 10000.0, attention_bias="none", sliding_window="mistral"),
    "qwen2": Family("Qwen2ForCausalLM", 1e-6, 10000.0, attention_bias="always", sliding_window="qwen"),
    "qwen3": Family("Qwen3ForCausalLM", 1e-6, 10000.0, attention_bias="config", qk_norm=True,
                    sliding_window="qwen", default_head_dim=128),
    "mixtral": Family("MixtralForCausalLM", 1e-5, 1e6, attention_bias="none", moe=True, sliding_window="mistral"),
    # An encoder (model.objective mlm): EuroBERT (Boizard et al. 2025) is the Llama block without the causal mask
    # (RMSNorm, RoPE, SwiGLU, GQA) and a tied masked-LM head straight on the final norm, which is fmforge's encoder.
    "eurobert": Family("EuroBertForMaskedLM", 1e-5, 10000.0, attention_bias="config"),
}

# config.json fields that do not change what the network computes at inference (or that are read below).
HANDLED_FIELDS = {
    "model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "max_position_embeddings", "rope_theta", "rope_scaling",
    "rope_parameters", "rms_norm_eps", "tie_word_embeddings", "head_dim", "attention_bias", "hidden_act",
    "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
    "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
}
IGNORED_FIELDS = {
    "transformers_version", "torch_dtype", "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "_name_or_path", "initializer_range", "attention_dropout", "pretraining_tp", "output_router_logits",
    "router_jitter_noise", "tokenizer_class", "return_dict", "output_attentions", "output_hidden_states",
    "torchscript", "use_bfloat16", "is_decoder", "model_name", "name_or_path",
    "mask_token_id", "classifier_pooling",  # EuroBERT: the masked-LM head and classifiers read these
}
# Fields that change the computation in ways fmforge's model does not implement, when set to these values.
_UNSUPPORTED_CHECKS: list[tuple[str, Callable[[object], bool], str]] = [
    ("quantization_config", lambda v: bool(v), "quantized checkpoints cannot be imported; use unquantized weights"),
    ("auto_map", lambda v: bool(v), "custom modelling code (trust_remote_code) is not supported"),
    ("hidden_act", lambda v: v not in (None, "silu"), "fmforge's feed-forward is SwiGLU with silu"),
    ("mlp_bias", lambda v: bool(v), "fmforge's feed-forward has no biases"),
    ("use_mrope", lambda v: bool(v), "multimodal RoPE is not implemented"),
    ("partial_rotary_factor", lambda v: v not in (None, 1, 1.0), "fmforge rotates the whole head"),
    ("attn_logit_softcapping", lambda v: v is not None, "logit soft-capping is not implemented"),
    ("final_logit_softcapping", lambda v: v is not None, "logit soft-capping is not implemented"),
]

_MOE_TO_FMFORGE = [
    (re.compile(r"\.block_sparse_moe\.gate\.weight$"), ".mlp.router.weight"),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w1\.weight$"), r".mlp.experts.\1.gate_proj.weight"),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w3\.weight$"), r".mlp.experts.\1.up_proj.weight"),
    (re.compile(r"\.block_sparse_moe\.experts\.(\d+)\.w2\.weight$"), r".mlp.experts.\1.down_proj.weight"),
]
_MOE_TO_HF = [
    (re.compile(r"\.mlp\.router\.weight$"), ".block_sparse_moe.gate.weight"),
    (re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\.weight$"), r".block_sparse_moe.experts.\1.w1.weight"),
    (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\.weight$"), r".block_sparse_moe.experts.\1.w3.weight"),
    (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\.weight$"), r".block_sparse_moe.experts.\1.w2.weight"),
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- names -------------------------------------------------------------------------------------------------

def fmforge_name(hf_name: str) -> str:
    """fmforge parameter name of a Hugging Face tensor name (any supported family)."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    for pattern, replacement in _MOE_TO_FMFORGE:
        name = pattern.sub(replacement, name)
    return name


def hf_name(name: str, model_type: str) -> str:
    """Hugging Face tensor name of an fmforge parameter name, in the layout of `model_type`.

    Also the base of PEFT adapter keys: `base_model.model.` + hf_name(...) with `.weight` -> `.lora_A.weight`.
    """
    if FAMILIES[model_type].moe:
        for pattern, replacement in _MOE_TO_HF:
            name = pattern.sub(replacement, name)
    return name if name.startswith("lm_head.") else "model." + name


# ---- config ------------------------------------------------------------------------------------------------

def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; give a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return config


def _rope(hf: dict, family: Family) -> tuple[float, dict | None]:
    """(rope_theta, ModelConfig.rope_scaling) from a transformers 4 (`rope_theta`, `rope_scaling`) or
    5 (`rope_parameters`) config. Plain RoPE and the "linear", "yarn" and "llama3" scalings are understood (the
    keys fmforge implements, config.ROPE_SCALING_KEYS); older configs spell `rope_type` as `type`."""
    scaling = None
    for field in ("rope_scaling", "rope_parameters"):
        value = hf.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"config.json field {field} = {value!r} is not understood")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default" and (kind == "ntk" or kind not in ROPE_SCALING_KEYS):
            raise ConfigError(f"config.json field {field} has rope_type {kind!r}: fmforge implements plain RoPE "
                              "and the 'linear', 'yarn' and 'llama3' scalings ('dynamic' NTK changes the "
                              "frequencies with the sequence length, which a KV cache cannot follow)")
        required, optional = ROPE_SCALING_KEYS.get(kind, ({}, {}))
        known = {"rope_type", "type", "rope_theta"} | set(required) | set(optional)
        extra = sorted(key for key in set(value) - known if value[key] is not None)
        if extra:
            raise ConfigError(f"config.json field {field} sets {', '.join(extra)}, which fmforge does not implement")
        if kind != "default":
            missing = [key for key in required if key not in value]
            if missing:
                raise ConfigError(f"config.json field {field} (rope_type {kind!r}) lacks {', '.join(missing)}")
            found = {"rope_type": kind, **{key: value[key] for key in {**required, **optional}
                                           if value.get(key) is not None}}
            if scaling is not None and found != scaling:
                raise ConfigError("config.json fields rope_scaling and rope_parameters disagree")
            scaling = found
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or family.rope_theta
    return float(theta), scaling


def _hf_rope(config: ModelConfig) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) for transformers: the same, except that static NTK scaling, which transformers
    has no rope_type for, is written as what it is, plain RoPE with a larger base."""
    scaling = config.rope_scaling
    if scaling is not None and scaling["rope_type"] == "ntk":
        return ntk_base(config.rope_theta, scaling["factor"], config.head_dim), None
    return config.rope_theta, scaling


def _sliding_window(hf: dict, family: Family, n_layer: int) -> int | None:
    """The attention window if any layer uses sliding-window attention, else None."""
    window = hf.get("sliding_window")
    if not window or family.sliding_window == "none":
        return None
    if family.sliding_window == "qwen":
        if hf.get("layer_types") is not None:
            return window if "sliding_attention" in hf["layer_types"] else None
        if not hf.get("use_sliding_window") or hf.get("max_window_layers", n_layer) >= n_layer:
            return None
    return int(window)


def model_config_from_hf(hf: dict, context_length: int | None = None) -> tuple[ModelConfig, list[str]]:
    """fmforge ModelConfig of a Hugging Face config.json (as a dict), plus notes for the user.

    Raises CheckpointError for an unsupported architecture and ConfigError for a field fmforge cannot honour.
    """
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        architectures = ", ".join(hf.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(f"unsupported architecture: model_type {model_type!r} ({architectures}); "
                              f"fmforge imports {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    for field, is_unsupported, why in _UNSUPPORTED_CHECKS:
        if field in hf and is_unsupported(hf[field]):
            raise ConfigError(f"config.json field {field} = {hf[field]!r} is not supported: {why}")
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings"):
        if not isinstance(hf.get(field), int):
            raise ConfigError(f"config.json lacks the integer field {field}")
    notes = []
    n_layer, n_head = hf["num_hidden_layers"], hf["num_attention_heads"]
    limit = hf["max_position_embeddings"]
    window = _sliding_window(hf, family, n_layer)
    sliding_window, cut_to_window = None, False
    if window is not None and window < limit:
        if family.sliding_window == "mistral":  # every layer slides: fmforge's model.sliding_window is the same
            sliding_window = window
        else:  # Qwen's window on some layers only; within one window it is exactly full causal attention
            notes.append(f"context limited to the sliding window of {window} tokens (max_position_embeddings "
                         f"{limit}): fmforge slides on every layer or none")
            limit, cut_to_window = window, True
    rope_theta, rope_scaling = _rope(hf, family)
    supported = limit
    if rope_scaling is not None and rope_scaling["rope_type"] == "yarn" and not cut_to_window:
        # YaRN configs often keep max_position_embeddings at the original length (Qwen2.5: 32768, factor 4): the
        # scaling is what makes factor x original positions usable, on request (--context-length).
        supported = max(limit, int(rope_scaling["factor"] * rope_scaling["original_max_position_embeddings"]))
    if context_length is not None:
        if context_length > supported:
            raise ConfigError(f"--context-length {context_length} exceeds what the model supports ({supported})")
        limit = context_length
    attention_bias = {"none": False, "always": True, "config": bool(hf.get("attention_bias", False))}
    values = dict(
        vocab_size=hf["vocab_size"], n_layer=n_layer, n_embd=hf["hidden_size"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, intermediate_size=hf["intermediate_size"],
        context_length=limit, rope_theta=rope_theta, rope_scaling=rope_scaling, sliding_window=sliding_window,
        norm_eps=float(hf.get("rms_norm_eps", family.norm_eps)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=hf.get("head_dim") or family.default_head_dim or hf["hidden_size"] // n_head,
        attention_bias=attention_bias[family.attention_bias], qk_norm=family.qk_norm,
        objective="mlm" if model_type == "eurobert" else "causal",
    )
    if family.moe:
        values.update(n_experts=hf.get("num_local_experts", 8), n_experts_per_token=hf.get("num_experts_per_tok", 2),
                      moe_intermediate_size=hf["intermediate_size"],
                      moe_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    try:
        config = ModelConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"config.json describes a model fmforge cannot build: {exc}") from None
    ignored = sorted(k for k, v in hf.items() if k not in HANDLED_FIELDS | IGNORED_FIELDS and v not in (None, False))
    if ignored:
        notes.append(f"config fields ignored (no effect on fmforge's computation): {', '.join(ignored)}")
    return config, notes


def family_for(config: ModelConfig, preferred: str | None = None) -> str:
    """The Hugging Face model_type that expresses `config` exactly: `preferred` if it can, else a default."""

    def fits(model_type: str) -> bool:
        family = FAMILIES[model_type]
        if (model_type == "eurobert") == config.causal:  # encoders go to EuroBERT, decoders never do
            return False
        if bool(config.n_experts) != family.moe or config.qk_norm != family.qk_norm:
            return False
        if config.n_experts and config.n_shared_experts:
            return False
        if config.sliding_window is not None and family.sliding_window != "mistral":  # every layer, one window
            return False
        return {"none": not config.attention_bias, "always": config.attention_bias, "config": True}[
            family.attention_bias]

    if preferred in FAMILIES and fits(preferred):
        return preferred
    for model_type in ("qwen2", "llama", "qwen3", "mixtral", "mistral", "eurobert"):  # qwen2 first: biases, no o_proj bias
        if fits(model_type):
            return model_type
    features = [name for name, on in [("mixture-of-experts", config.n_experts),
                                       ("shared experts", config.n_shared_experts),
                                       ("attention biases", config.attention_bias),
                                       ("QK-norm", config.qk_norm),
                                       ("sliding-window attention", config.sliding_window)] if on]
    raise CheckpointError(f"no Hugging Face family has this combination: {', '.join(features)}; "
                          "transformers cannot load such a model")


def hf_config_from_model_config(config: ModelConfig, model_type: str, dtype: torch.dtype,
                                token_ids: dict[str, int | None], original: dict | None = None) -> dict:
    """config.json for transformers (v4 and v5 read it), for `config` expressed as `model_type`."""
    family = FAMILIES[model_type]
    rope_theta, rope_scaling = _hf_rope(config)
    hf = {
        "architectures": [family.architecture], "model_type": model_type,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim,
        "intermediate_size": config.moe_intermediate_size if config.n_experts else config.intermediate_size,
        "hidden_act": "silu", "max_position_embeddings": config.context_length, "rms_norm_eps": config.norm_eps,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0, "use_cache": True, "torch_dtype": str(dtype).removeprefix("torch."),
        **{f"{kind}_token_id": token_ids.get(kind) for kind in ("bos", "eos", "pad")},
    }
    if family.attention_bias == "config":
        hf["attention_bias"] = config.attention_bias
    if model_type in ("llama", "eurobert"):
        hf["mlp_bias"] = False
    if family.sliding_window != "none":
        hf["sliding_window"] = None
    if family.sliding_window == "qwen":
        hf.update(use_sliding_window=False, max_window_layers=config.n_layer)
    if family.moe:
        hf.update(num_local_experts=config.n_experts, num_experts_per_tok=config.n_experts_per_token,
                  router_aux_loss_coef=config.moe_aux_loss_coef, output_router_logits=False)
    if original is not None and original.get("model_type") == model_type:
        # Keep what the source said about things fmforge does not model (a longer context served with a
        # sliding window, special token ids, ...), so that a round trip gives back the source's config.
        for key in ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
            if key in original:
                hf[key] = original[key]
        if original.get("max_position_embeddings", 0) >= config.context_length:
            hf["max_position_embeddings"] = original["max_position_embeddings"]
    if config.sliding_window is not None:
        hf["sliding_window"] = config.sliding_window
    return hf


# ---- import ------------------------------------------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory (sharded with an index, or single)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read {index}: {exc}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists shards that are missing: {', '.join(missing[:3])}")
        return files
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if list(directory.glob("*.bin")):
        raise CheckpointError(f"{directory} holds PyTorch .bin weights only; convert them to safetensors first "
                              "(transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise CheckpointError(f"{directory} has no model.safetensors or model.safetensors.index.json")


def _stored_dtype(files: list[Path]) -> torch.dtype:
    """dtype of the first floating-point tensor (what `--dtype auto` keeps)."""
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    return value if isinstance(value, dict) else {}


def _prepare_tokenizer_dir(source: Path, scratch: Path, hf: dict) -> Path:
    """tokenizer.json + tokenizer_config.json as fmforge reads them. Older layouts are completed: special
    tokens named only in special_tokens_map.json, or only by id in config.json (bos_token_id, eos_token_id),
    and a chat template kept in chat_template.jinja (transformers 5) are folded into tokenizer_config.json,
    and add_bos_token records whether the source's tokenizer starts a prompt with bos."""
    from tokenizers import Tokenizer as RustTokenizer

    from ..tokenizer import Tokenizer, post_processor_prefix

    if not (source / "tokenizer.json").is_file():
        raise CheckpointError(f"{source} has no tokenizer.json (fmforge needs the fast-tokenizer file); create it "
                              "with transformers: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)")
    config = _read_json(source / "tokenizer_config.json")
    special_map = _read_json(source / "special_tokens_map.json")
    tokenizer_json = _read_json(source / "tokenizer.json")
    id_to_token = {i: t for t, i in ((tokenizer_json.get("model") or {}).get("vocab") or {}).items()}
    id_to_token.update({t["id"]: t["content"] for t in tokenizer_json.get("added_tokens", [])})
    for kind in ("bos", "eos", "pad"):
        key = f"{kind}_token"
        if config.get(key) is None and special_map.get(key) is not None:
            config[key] = special_map[key]
        token_id = hf.get(f"{kind}_token_id")
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
        if config.get(key) is None and isinstance(token_id, int) and token_id in id_to_token:
            config[key] = id_to_token[token_id]
        if kind == "bos" and key not in config:
            config[key] = None  # no bos named anywhere: prepend none (rather than fmforge's own "<|bos|>")
    if not config.get("chat_template") and (source / "chat_template.jinja").is_file():
        config["chat_template"] = (source / "chat_template.jinja").read_text(encoding="utf-8")
    shutil.copyfile(source / "tokenizer.json", scratch / "tokenizer.json")
    # A prompt starts with bos only when the source's tokenizer.json adds one, as transformers' tokenizer(text)
    # does (transformers 5 ignores add_bos_token when there is a tokenizer.json): say which, explicitly.
    try:
        prefix = post_processor_prefix(RustTokenizer.from_file(str(source / "tokenizer.json")))
    except Exception:  # tokenizers raises a plain Exception on a corrupt file: Tokenizer.load below says what
        prefix = None
    if prefix is not None and config.get("bos_token") is None:
        config["bos_token"] = prefix
    bos = config.get("bos_token")
    config["add_bos_token"] = prefix is not None and prefix == (bos.get("content") if isinstance(bos, dict) else bos)
    (scratch / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    Tokenizer.load(scratch)  # fail now, with the tokenizer's own message, rather than at the first `generate`
    return scratch


def import_hf(source: str | Path, out: str | Path, *, dtype: str = "auto",
              context_length: int | None = None) -> Path:
    """Convert a local Hugging Face model directory into an fmforge checkpoint at `out`. Returns `out`.

    `dtype` is "auto" (keep the stored precision), "float32", "bfloat16" or "float16".
    """
    from ..tokenizer import Tokenizer

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise CheckpointError(f"Hugging Face model directory not found: {source}")
    _check_output_dir(out, protect=source, kind="an fmforge checkpoint")
    hf = read_hf_config(source)
    config, notes = model_config_from_hf(hf, context_length)
    files = weight_files(source)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    target_dtype = _stored_dtype(files) if dtype == "auto" else DTYPES[dtype]

    with tempfile.TemporaryDirectory(prefix="fmforge-import-") as scratch:
        tokenizer_dir = _prepare_tokenizer_dir(source, Path(scratch), hf)
        tokenizer = Tokenizer.load(tokenizer_dir)
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(f"{source}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json's "
                                  f"vocab_size is {config.vocab_size}")
        with torch.device("meta"):
            model = Transformer(config)
        model = model.to(target_dtype).to_empty(device="cpu")  # one allocation, filled below
        if config.tie_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        _copy_weights(model, files, source)

        def write_files(directory: Path) -> None:  # inside write_checkpoint's temporary directory: atomic
            write_model_files(directory, model, tokenizer_dir)
            (directory / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2) + "\n")
            if (source / GENERATION_CONFIG_FILE).is_file():
                shutil.copyfile(source / GENERATION_CONFIG_FILE, directory / GENERATION_CONFIG_FILE)

        write_checkpoint(out, write_files=write_files)
    del model
    log(f"imported {hf['model_type']} from {source}: {config.num_parameters() / 1e6:.1f}M parameters, "
        f"{config.n_layer} layers, context {config.context_length}, {str(target_dtype).removeprefix('torch.')} "
        f"-> {out}")
    for note in notes:
        log(f"note: {note}")
    return out


@torch.no_grad()
def _copy_weights(model: Transformer, files: list[Path], source: Path) -> None:
    """Fill `model` from the safetensors `files`, one tensor at a time, checking names and shapes."""
    targets = model_state_for_saving(model)  # name -> parameter tensor (the tied lm_head is left out)
    filled, unexpected = set(), []
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    name = fmforge_name(key)
                    if name.endswith("rotary_emb.inv_freq"):  # recomputed, stored by old checkpoints
                        continue
                    if name == "lm_head.weight" and model.config.tie_embeddings:
                        continue  # tied: the same numbers as embed_tokens
                    if name.endswith("self_attn.o_proj.bias"):
                        # Llama/Qwen3 attention_bias also biases o_proj; fmforge can take it only when it is zero.
                        if f.get_tensor(key).abs().max().item() != 0:
                            raise CheckpointError(f"{file.name}: {key} is not zero; fmforge's attention output "
                                                  "projection has no bias")
                        continue
                    if name not in targets:
                        unexpected.append(key)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(targets[name].shape):
                        raise CheckpointError(f"{file.name}: tensor {key} has shape {shape}, config.json implies "
                                              f"{tuple(targets[name].shape)}")
                    targets[name].copy_(f.get_tensor(key))
                    filled.add(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} tensors have no place in the model config.json describes, "
                              f"e.g. {', '.join(unexpected[:3])}")
    missing = sorted(set(targets) - filled)
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} tensors are missing, e.g. "
                              f"{', '.join(hf_name(m, 'llama') for m in missing[:3])}")


# ---- export ------------------------------------------------------------------------------------------------

def checkpoint_weights(checkpoint: Path, config: ModelConfig) -> Path:
    """The checkpoint's model.safetensors, after checking its names and shapes against `config`."""
    file = checkpoint / "model.safetensors"
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in model_state_for_saving(Transformer(config)).items()}
    try:
        with safe_open(str(file), "pt") as f:
            found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if set(found) != set(expected):
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise CheckpointError(f"{file} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, shape in found.items():
        if shape != expected[name]:
            raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json implies {expected[name]}")
    return file


def parse_size(text: str) -> int:
    """'500MB', '2GB', '4096' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*", str(text).upper())
    if not match:
        raise ConfigError(f"cannot read the size {text!r}; write e.g. 500MB or 2GB")
    scale = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _is_fmforge_checkpoint(directory: Path) -> bool:
    try:
        return json.loads((directory / "config.json").read_text()).get("architecture") == "fmforge.Transformer"
    except (OSError, ValueError, AttributeError):
        return False


def _check_output_dir(out: Path, protect: Path, kind: str) -> None:
    """Refuse an --out that would replace the input, or a directory holding something other than a `kind`
    (writing replaces the whole directory)."""
    resolved, protected = out.resolve(), protect.resolve()
    if resolved == protected or protected in resolved.parents or resolved in protected.parents:
        raise CheckpointError(f"--out {out} overlaps the input {protect}; choose another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose another --out")
    wanted = _is_fmforge_checkpoint(out) if kind == "an fmforge checkpoint" else (
        (out / "config.json").exists() and not _is_fmforge_checkpoint(out))
    if any(out.iterdir()) and not wanted:
        raise CheckpointError(f"{out} exists and holds something other than {kind}, which writing would replace; "
                              "choose another --out")


def _prepare_output_dir(out: Path) -> Path:
    """A fresh temporary directory beside `out`, to be renamed into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _finish_output_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def export_hf(checkpoint: str | Path, out: str | Path, *, dtype: str | None = None,
              max_shard_size: str = "5GB", adapters: list[str | Path] = ()) -> Path:
    """Write a checkpoint (or the latest of a run) as a Hugging Face model directory that
    `transformers.AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load.

    `dtype` None keeps the stored precision. Weights are written shard by shard (`max_shard_size`).
    Each LoRA adapter (an adapter directory or a fine-tuning run) trained on this checkpoint is written to
    out/adapters/NAME, which `peft.PeftModel.from_pretrained(model, out/adapters/NAME)` loads unmerged.
    """
    from ..tokenizer import Tokenizer

    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    check_text_only(checkpoint, "a Hugging Face causal-LM directory")
    config = read_model_config(checkpoint)
    weights = checkpoint_weights(checkpoint, config)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    target_dtype = DTYPES[dtype] if dtype else _stored_dtype([weights])
    original = json.loads((checkpoint / HF_CONFIG_FILE).read_text()) if (checkpoint / HF_CONFIG_FILE).exists() else None
    model_type = family_for(config, (original or {}).get("model_type"))
    tokenizer = Tokenizer.load(checkpoint)
    token_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    hf_config = hf_config_from_model_config(config, model_type, target_dtype, token_ids, original)
    if model_type == "eurobert":
        hf_config["mask_token_id"] = tokenizer.token_id("<|mask|>") if "<|mask|>" in tokenizer.special_tokens() else None
    adapter_dirs = resolve_adapters(adapters, checkpoint)

    _check_output_dir(out, protect=checkpoint, kind="a Hugging Face model directory")
    tmp = _prepare_output_dir(out)
    try:
        _write_hf_weights(weights, config, model_type, target_dtype, tmp, parse_size(max_shard_size))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if (checkpoint / GENERATION_CONFIG_FILE).exists():
            shutil.copyfile(checkpoint / GENERATION_CONFIG_FILE, tmp / GENERATION_CONFIG_FILE)
        else:
            generation = {"_from_model_config": True, "bos_token_id": hf_config["bos_token_id"],
                          "eos_token_id": hf_config["eos_token_id"], "pad_token_id": hf_config["pad_token_id"]}
            (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(checkpoint / name, tmp / name)
        _add_bos_post_processor(tmp / "tokenizer.json", tokenizer)
        if not config.causal:
            _write_sentence_transformers_files(tmp, config, tokenizer)
        for name, adapter_dir in adapter_dirs.items():
            write_peft_adapter(adapter_dir, tmp / "adapters" / name, out, lambda n: hf_name(n, model_type))
        _finish_output_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported {checkpoint} as {model_type} ({str(target_dtype).removeprefix('torch.')}) -> {out}")
    return out


def _write_sentence_transformers_files(out: Path, config: ModelConfig, tokenizer) -> None:
    """An encoder's export is also a sentence-transformers model: the transformer, mean pooling over the real
    tokens, unit length (fmforge's embeddings, adapt/embedding.py), so `SentenceTransformer(out)` gives fmforge's
    vectors. The tokenizer names its mask token for transformers' fill-mask."""
    from ..tokenizer import MASK_TOKEN

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": config.context_length, "do_lower_case": False}, indent=2) + "\n")
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": config.n_embd, "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
               "pooling_mode_lasttoken": False, "include_prompt": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
    (out / "2_Normalize").mkdir()
    if MASK_TOKEN in tokenizer.special_tokens():
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        tokenizer_config["mask_token"] = MASK_TOKEN
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _add_bos_post_processor(tokenizer_json: Path, tokenizer) -> None:
    """transformers' tokenizer(text) prepends what tokenizer.json's post-processor adds and nothing else (version 5
    ignores add_bos_token); fmforge's own tokenizers have no post-processor and say add_bos_token: true. Give
    the exported tokenizer.json a post-processor that prepends bos, so both encode a prompt alike."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    from ..tokenizer import post_processor_prefix

    rust = RustTokenizer.from_file(str(tokenizer_json))
    if not tokenizer.add_bos_token or post_processor_prefix(rust) == tokenizer.bos_token:
        return
    bos = tokenizer.bos_token
    # The template transformers itself builds for add_bos_token (PreTrainedTokenizerFast.update_post_processor).
    template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, tokenizer.bos_id)])
    rust.post_processor = template if rust.post_processor is None else processors.Sequence([rust.post_processor,
                                                                                             template])
    tokenizer_json.write_text(rust.to_str(pretty=True), encoding="utf-8")


def _write_hf_weights(weights: Path, config: ModelConfig, model_type: str, dtype: torch.dtype, out: Path,
                      max_shard_bytes: int) -> None:
    """Copy the weights into model.safetensors (or model-0000i-of-0000n.safetensors + index), renaming to
    Hugging Face names and converting to `dtype`, holding one shard in memory at a time."""
    family = FAMILIES[model_type]
    itemsize = torch.empty((), dtype=dtype).element_size()
    with safe_open(str(weights), "pt") as f:
        plan: list[tuple[str, Callable[[], torch.Tensor], int]] = []  # (HF name, load, bytes)
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            numel = int(torch.tensor(shape).prod().item()) if shape else 1
            plan.append((hf_name(name, model_type), lambda name=name: f.get_tensor(name), numel * itemsize))
            if name.endswith("self_attn.o_proj.weight") and config.attention_bias and family.attention_bias == "config":
                # These families bias o_proj whenever attention_bias is set; fmforge's is zero.
                bias_name = hf_name(name.removesuffix("weight") + "bias", model_type)
                plan.append((bias_name, lambda: torch.zeros(config.n_embd), config.n_embd * itemsize))
        shards: list[list[tuple[str, Callable[[], torch.Tensor], int]]] = [[]]
        size = 0
        for item in plan:
            if shards[-1] and size + item[2] > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += item[2]
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        weight_map = {}
        for file_name, shard in zip(names, shards):
            tensors = {key: load().to(dtype).contiguous() for key, load, _ in shard}
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            weight_map.update({key: file_name for key in tensors})
            del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(item[2] for item in plan)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
