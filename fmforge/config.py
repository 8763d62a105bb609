"""Configuration: the model shape (ModelConfig), the training run (TrainConfig), named presets,
and loading a YAML recipe with `--key value` overrides from the command line.

A recipe is YAML with two sections, and optionally a third:

    model:               # a preset name plus any field of ModelConfig
      preset: small
      n_layer: 4
    train:               # any field of TrainConfig
      data_dir: runs/quickstart/data
      max_steps: 2000
    sizes:               # named alternatives (model or train fields) for train.size NAME or auto
      3x128: {n_layer: 3, n_embd: 128}

Overrides are `--model.n_layer 4`, `--train.lr 1e-3`, or the bare `--lr 1e-3` when the name belongs to
exactly one section. Unknown keys and presets raise ConfigError with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer (Llama-style; optional Mixture-of-Experts FFN)."""

    vocab_size: int | None = None  # None = the tokenizer's size (set when training starts)
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (plain multi-head)
    intermediate_size: int | None = None  # SwiGLU hidden size; None = ~8/3 n_embd rounded up to 64
    context_length: int = 256
    rope_theta: float = 10000.0
    # None = plain RoPE; else a scaling method of ROPE_SCALING_KEYS, e.g. {"rope_type": "yarn", "factor": 4.0,
    # "original_max_position_embeddings": 256} or Llama 3.1's {"rope_type": "llama3", "factor": 32.0, ...}
    rope_scaling: dict[str, Any] | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int | None = None  # None = n_embd // n_head (Qwen3 sets it independently)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 style)
    qk_norm: bool = False  # RMSNorm on each query/key head before RoPE (Qwen3 style)
    sliding_window: int | None = None  # each token attends to the last N positions (Mistral style); None = all
    init_std: float = 0.02
    # Mixture-of-Experts (0 experts = dense FFN in every layer)
    n_experts: int = 0
    n_experts_per_token: int = 2
    n_shared_experts: int = 0
    moe_intermediate_size: int | None = None  # per-expert hidden size; None = intermediate_size
    moe_aux_loss_coef: float = 0.01  # load-balancing loss weight (Switch Transformer, Fedus et al. 2021)
    # "causal": a decoder (each token sees those before it; next-token loss). "mlm": a bidirectional encoder
    # (every token sees the whole sequence; masked-language-modelling loss, BERT, Devlin et al. 2019); exported
    # as transformers' EuroBERT, which is this same Llama block without the causal mask.
    objective: str = "causal"

    def __post_init__(self) -> None:
        if self.head_dim is None and isinstance(self.n_head, int) and self.n_head > 0:
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        self.rope_scaling = checked_rope_scaling(self.rope_scaling, self.head_dim)
        self.validate()

    def validate(self) -> None:
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size <= 0):
            raise ConfigError(f"model.vocab_size must be a positive integer, got {self.vocab_size!r}")
        positive = ["n_layer", "n_embd", "n_head", "n_kv_head", "context_length"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window <= 0):
            raise ConfigError(f"model.sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.head_dim == self.n_embd // self.n_head and self.n_embd % self.n_head:
            raise ConfigError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"model.head_dim ({self.head_dim}) must be a positive even number for RoPE")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.n_experts_per_token <= self.n_experts):
            raise ConfigError(
                f"model.n_experts_per_token ({self.n_experts_per_token}) must be between 1 and "
                f"model.n_experts ({self.n_experts})"
            )
        checked_rope_scaling(self.rope_scaling, self.head_dim)
        if self.objective not in ("causal", "mlm"):
            raise ConfigError(f"model.objective must be causal or mlm, got {self.objective!r}")
        if self.objective == "mlm" and (self.sliding_window is not None or self.n_experts):
            raise ConfigError("model.objective mlm (the encoder) supports neither sliding_window nor n_experts")

    @property
    def causal(self) -> bool:
        return self.objective == "causal"

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shape (matches the built model)."""
        C, hd = self.n_embd, self.head_dim
        attn = C * hd * (self.n_head + 2 * self.n_kv_head) + self.n_head * hd * C
        if self.attention_bias:
            attn += hd * (self.n_head + 2 * self.n_kv_head)
        if self.qk_norm:
            attn += 2 * hd
        if self.n_experts:
            ffn = C * self.n_experts + self.n_experts * 3 * C * self.moe_intermediate_size
            ffn += self.n_shared_experts * 3 * C * self.intermediate_size
        else:
            ffn = 3 * C * self.intermediate_size
        per_layer = attn + ffn + 2 * C
        total = self.n_layer * per_layer + C
        if include_embeddings:
            total += self.vocab_size * C * (1 if self.tie_embeddings else 2)
        return total

    def active_parameters(self) -> int:
        """Parameters that touch each token (differs from the total for MoE), without embeddings."""
        if not self.n_experts:
            return self.num_parameters(include_embeddings=False)
        inactive = (self.n_experts - self.n_experts_per_token) * 3 * self.n_embd * self.moe_intermediate_size
        return self.num_parameters(include_embeddings=False) - self.n_layer * inactive

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# RoPE scaling methods (ModelConfig.rope_scaling["rope_type"]): required and optional keys with their types.
# Spelled as transformers spells them, so that a Hugging Face config's rope_scaling is ours unchanged.
#   linear: position interpolation (Chen et al. 2023): every frequency divided by `factor`.
#   ntk:    "NTK-aware" scaling (bloc97, 2023): the base theta raised to theta * factor^(d/(d-2)), which
#           slows the low frequencies by ~factor and keeps the high ones; static (transformers' "dynamic"
#           recomputes it per sequence length, which a KV cache cannot follow).
#   yarn:   YaRN (Peng et al. 2023): NTK-by-parts interpolation between beta_fast and beta_slow rotations over
#           original_max_position_embeddings, plus an attention temperature (0.1 ln(factor) + 1 on cos/sin).
#   llama3: Llama 3.1's frequency-band scaling (Meta's llama-models `apply_scaling`).
ROPE_SCALING_KEYS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "linear": ({"factor": float}, {}),
    "ntk": ({"factor": float}, {}),
    "yarn": ({"factor": float, "original_max_position_embeddings": int},
             {"beta_fast": float, "beta_slow": float, "attention_factor": float, "truncate": bool}),
    "llama3": ({"factor": float, "low_freq_factor": float, "high_freq_factor": float,
                "original_max_position_embeddings": int}, {}),
}


def checked_rope_scaling(value: Any, head_dim: int | None = None) -> dict[str, Any] | None:
    """`value` as ModelConfig.rope_scaling stores it (None, or a rope_type of ROPE_SCALING_KEYS with its keys,
    floats as floats), or ConfigError naming what is wrong."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"model.rope_scaling must be null or a mapping, got {value!r}")
    kind = value.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"model.rope_scaling.rope_type {kind!r} is not supported; fmforge implements "
                          + ", ".join(repr(k) for k in ROPE_SCALING_KEYS))
    required, optional = ROPE_SCALING_KEYS[kind]
    missing = [key for key in required if key not in value]
    unknown = sorted(set(value) - set(required) - set(optional) - {"rope_type"})
    if missing or unknown:
        raise ConfigError(f"model.rope_scaling for {kind} needs rope_type, " + ", ".join(required)
                          + (f" (optional: {', '.join(optional)})" if optional else "")
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    checked: dict[str, Any] = {"rope_type": kind}
    for key, number_type in {**required, **optional}.items():
        if key not in value:
            continue
        number = value[key]
        allowed = {int: (int,), float: (int, float), bool: (bool,)}[number_type]
        if (isinstance(number, bool) and number_type is not bool) or not isinstance(number, allowed) \
                or (number_type is float and not math.isfinite(number)):
            noun = {int: "an integer", float: "a finite number", bool: "true or false"}[number_type]
            raise ConfigError(f"model.rope_scaling.{key} must be {noun}, got {number!r}")
        checked[key] = number_type(number)  # floats stored as floats: the config JSON round-trips exactly
    if not checked["factor"] >= 1:
        raise ConfigError(f"model.rope_scaling.factor must be at least 1, got {checked['factor']!r}")
    if kind == "llama3" and not 0 < checked["low_freq_factor"] < checked["high_freq_factor"]:
        raise ConfigError("model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                          f"{checked['low_freq_factor']!r} and {checked['high_freq_factor']!r}")
    if checked.get("original_max_position_embeddings", 1) <= 0:
        raise ConfigError("model.rope_scaling.original_max_position_embeddings must be positive, got "
                          f"{checked['original_max_position_embeddings']!r}")
    if kind == "yarn" and not 0 < checked.get("beta_slow", 1.0) <= checked.get("beta_fast", 32.0):
        raise ConfigError("model.rope_scaling needs 0 < beta_slow <= beta_fast, got "
                          f"{checked.get('beta_slow', 1.0)!r} and {checked.get('beta_fast', 32.0)!r}")
    if kind == "ntk" and isinstance(head_dim, int) and head_dim <= 2:
        raise ConfigError(f"model.rope_scaling ntk needs head_dim > 2 (its base is theta * factor^(d/(d-2))), got "
                          f"{head_dim}")
    if checked.get("attention_factor", 1.0) <= 0:
        raise ConfigError(f"model.rope_scaling.attention_factor must be positive, got {checked['attention_factor']!r}")
    return checked


# Named shapes. Tiny ones run on a laptop CPU; the real ones exist so that the code is exercised at the
# shapes people actually train (their numbers are copied from the public config.json of each model).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, context_length=128),
    "tiny-moe": dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, context_length=128,
                     n_experts=4, n_experts_per_token=2, n_shared_experts=1, moe_intermediate_size=64),
    "small": dict(n_layer=6, n_embd=256, n_head=4, n_kv_head=4, context_length=256),
    "base": dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=6, context_length=256),
    "medium": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, context_length=1024),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": dict(vocab_size=128256, n_layer=16, n_embd=2048, n_head=32, n_kv_head=8,
                         intermediate_size=8192, context_length=8192, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_embeddings=True, norm_eps=1e-5),
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": dict(vocab_size=151936, n_layer=24, n_embd=896, n_head=14, n_kv_head=2,
                         intermediate_size=4864, context_length=32768, rope_theta=1000000.0,
                         tie_embeddings=True, attention_bias=True, norm_eps=1e-6),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(vocab_size=128256, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                         intermediate_size=14336, context_length=131072, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=8192),
                         tie_embeddings=False, norm_eps=1e-5),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral-8x7b": dict(vocab_size=32000, n_layer=32, n_embd=4096, n_head=32, n_kv_head=8,
                         intermediate_size=14336, context_length=32768, rope_theta=1000000.0,
                         tie_embeddings=False, n_experts=8, n_experts_per_token=2, moe_aux_loss_coef=0.02),
}


def model_config_from_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a preset name plus field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}{_suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return _build(ModelConfig, {**PRESETS[name], **overrides}, "model")


@dataclass
class TrainConfig:
    """One training run. Paths are strings so that the resolved config is plain YAML."""

    data_dir: str = ""  # output of `fmforge prepare` (shards + manifest + tokenizer)
    # {prepared dir: weight}: pretrain on several directories (text, image:...) at once, each drawn in proportion
    # to its weight; replaces data_dir. The first directory's val split is the held-out eval.
    mixture: dict | None = None
    out_dir: str = "runs/pretrain"
    # A checkpoint to start from (a new run: fresh optimizer and schedule), e.g. to extend its context: the model
    # shape comes from the checkpoint, and the recipe's model fields that are set (context_length, rope_scaling,
    # ...) are applied over it.
    init_from: str | None = None
    seed: int = 1337
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_minutes: float | None = None  # if set, max_steps is derived from a short timing run at start
    # A name of the recipe's `sizes` section: that entry's fields over the recipe's; "auto" with max_minutes: the
    # largest entry that the budget trains on at least tokens_per_param tokens per parameter, on step times measured
    # at start (fmforge/train/sizing.py), recorded in run.yaml; auto without a budget, or None: the model section.
    size: str | None = None
    tokens_per_param: float = 20.0  # size auto's target (Hoffmann et al. 2022 found ~20 compute-optimal at scale)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    weight_decay: float = 0.1
    # adamw | muon: Muon (orthogonalised momentum) on the blocks' matrices, AdamW on embeddings, norms and biases
    optimizer: str = "adamw"
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; auto = bf16 where the hardware has it)
    compile: bool = False
    # ddp: every process holds the whole model (one process: no wrapper); fsdp: FSDP2 shards parameters, gradients
    # and optimizer state over the processes, and train_state/ is written through torch.distributed.checkpoint
    parallel: str = "ddp"
    activation_checkpointing: bool = False  # keep only each block's input; recompute the block in backward
    eval_interval: int = 100
    eval_tokens: int = 65536  # val tokens per periodic eval; the final eval reads the whole split
    log_interval: int = 10
    checkpoint_interval: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # model.objective mlm: the share of tokens chosen for prediction; of those 80% become <|mask|>, 10% a random
    # token, 10% stay (BERT's recipe); 0.3 as ModernBERT (Warner et al. 2024) rather than BERT's 0.15
    mask_rate: float = 0.3
    # Image -> caption documents' images are also read by a fixed reader of their codes' decoded patches, whose
    # features are added to those codes' embeddings; those codes are then not predicted (Janus's split: understanding
    # reads, generation predicts). Saved with the checkpoint (media_encoders.safetensors); specialists inherit it.
    image_reader: bool = False

    def validate(self) -> None:
        if self.mixture is not None:
            if not isinstance(self.mixture, dict) or not self.mixture:
                raise ConfigError(f"train.mixture must map prepared directories to weights, got {self.mixture!r}")
            for path, weight in self.mixture.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 \
                        or weight == float("inf"):
                    raise ConfigError(f"train.mixture weight of {path} must be a positive number, got {weight!r}")
        for name in ["batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval",
                     "checkpoint_interval", "keep_checkpoints"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        if isinstance(self.mask_rate, bool) or not isinstance(self.mask_rate, (int, float)) \
                or not 0 < self.mask_rate < 1:
            raise ConfigError(f"train.mask_rate must be a number between 0 and 1, got {self.mask_rate!r}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"train.schedule must be cosine, wsd or constant, got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"train.parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"train.optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.parallel == "fsdp":
            raise ConfigError("train.optimizer muon orthogonalises whole matrices, which FSDP2 shards: use "
                              "train.parallel ddp with muon, or adamw with fsdp")
        if isinstance(self.muon_momentum, bool) or not isinstance(self.muon_momentum, (int, float)) \
                or not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"train.max_minutes must be positive, got {self.max_minutes!r}")
        if not 0 < self.tokens_per_param < float("inf"):
            raise ConfigError(f"train.tokens_per_param must be a positive number, got {self.tokens_per_param!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """A resolved recipe: the model preset it started from, the model shape and the training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str | None = None
    model_fields: tuple[str, ...] = ()  # the model fields the recipe or the command line set (train.init_from)
    # The recipe's `sizes` section, {name: {"model": {...}, "train": {...}}}, and what train.size auto needs to apply
    # one of them later: the model section as written (preset included) and the keys the command line set, which
    # win over a size's.
    sizes: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    model_section: dict[str, Any] = field(default_factory=dict)
    command_line: frozenset[tuple[str, str]] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return {"model": {"preset": self.preset, **self.model.to_dict()}, "train": self.train.to_dict()}

    def with_size(self, name: str) -> RunConfig:
        """This run with the `sizes` entry `name` applied: its model fields over the recipe's model section (derived
        fields such as head_dim follow the new shape), its train fields over this run's; keys given on the
        command line keep their values. train.size becomes `name`."""
        if name not in self.sizes:
            raise ConfigError(f"unknown size {name!r}{_suggest(name, self.sizes)}; the recipe's sizes: "
                              f"{', '.join(self.sizes) or 'none'}")
        picked = {section: {key: value for key, value in values.items() if (section, key) not in self.command_line}
                  for section, values in self.sizes[name].items()}
        section = {**self.model_section, **picked["model"]}
        if self.model.vocab_size is not None:
            section.setdefault("vocab_size", self.model.vocab_size)
        model = _model_from_section(section)
        train = dataclasses.replace(self.train, **picked["train"], size=name)
        train.validate()
        return dataclasses.replace(self, model=model, train=train,
                                   model_fields=tuple(dict.fromkeys(self.model_fields + tuple(picked["model"]))))


def _model_from_section(section: dict[str, Any]) -> ModelConfig:
    values = dict(section)
    preset = values.pop("preset", None)
    return model_config_from_preset(preset, **values) if preset else _build(ModelConfig, values, "model")


# Fields a size may not set: which size, and where the run reads, writes and starts from (a size picked by the budget
# must not move the run's checkpoints, which --resume looks for), and the budget that picks it.
NOT_BY_SIZE = ("preset", "size", "data_dir", "mixture", "out_dir", "init_from", "max_minutes", "tokens_per_param")


def _read_sizes(raw: Any, where: str) -> dict[str, dict[str, dict[str, Any]]]:
    """The recipe's `sizes` section: {name: {field: value}} with model and train fields (bare names, or model.NAME /
    train.NAME where a name is in both). load_recipe then checks each by applying it to the recipe."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"recipe section 'sizes' in {where} must map size names to fields, e.g. "
                          "{small: {n_layer: 4, n_embd: 128}}")
    sizes = {}
    for name, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"size {name!r} in {where} must be a mapping of model or train fields")
        entry: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
        for key, value in values.items():
            section, field_name = _locate(str(key))
            if field_name in NOT_BY_SIZE:
                raise ConfigError(f"size {name!r} in {where}: {field_name} cannot be set by a size (a size sets "
                                  "the model's shape and how it trains, not the run's data, budget or place)")
            entry[section][field_name] = value
        sizes[str(name)] = entry
    if "auto" in sizes:
        raise ConfigError(f"a size in {where} cannot be named 'auto' (that name picks one by the time budget)")
    return sizes


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from defaults when path is None) and apply `--key value` overrides."""
    raw: dict[str, Any] = {"model": {}, "train": {}}
    sizes: dict[str, dict[str, dict[str, Any]]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {path} must be a mapping with 'model' and 'train' sections")
        for section, values in loaded.items():
            if section == "sizes":
                sizes = _read_sizes(values, str(path))
                continue
            if section not in raw:
                raise ConfigError(f"unknown recipe section {section!r} in {path}; sections: model, train, sizes")
            if not isinstance(values, dict):
                raise ConfigError(f"recipe section {section!r} in {path} must be a mapping")
            raw[section].update(values)
    command_line = set()
    for key, value in parse_overrides(overrides or []):
        section, name = _locate(key)
        raw[section][name] = value
        command_line.add((section, name))
    run = RunConfig(model=_model_from_section(raw["model"]), train=_build(TrainConfig, raw["train"], "train"),
                    preset=raw["model"].get("preset"), model_fields=tuple(k for k in raw["model"] if k != "preset"),
                    sizes=sizes, model_section=raw["model"], command_line=frozenset(command_line))
    run.train.validate()
    if run.preset and run.train.init_from:
        raise ConfigError("train.init_from takes the model's shape from its checkpoint; remove model.preset")
    if run.train.size is not None and run.train.init_from:
        raise ConfigError("train.init_from takes the model's shape from its checkpoint; remove train.size")
    for name in sizes:  # each size must make a valid run with this recipe
        run.with_size(name)
    if run.train.size not in (None, "auto"):
        run = run.with_size(run.train.size)
    elif run.train.size == "auto" and not sizes:
        raise ConfigError("train.size auto picks one of the recipe's sizes, and this recipe has no 'sizes' section")
    return run


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Turn ['--train.lr', '1e-3', '--compile', 'true'] into [('train.lr', 0.001), ('compile', True)].

    Values are parsed as YAML scalars, so numbers, booleans and null come out typed.
    """
    pairs = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"expected an option like --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option --{key} needs a value")
            text = args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-3 as a string; everyone means the number
        pairs.append((key.replace("-", "_"), value))
    return pairs


def _locate(key: str) -> tuple[str, str]:
    """Map an override key to (section, field)."""
    model_names = {f.name for f in fields(ModelConfig)} | {"preset"}
    train_names = {f.name for f in fields(TrainConfig)}
    if "." in key:
        section, name = key.split(".", 1)
        names = {"model": model_names, "train": train_names}.get(section)
        if names is None:
            raise ConfigError(f"unknown config section in --{key}; use model.NAME or train.NAME")
        if name not in names:
            raise ConfigError(f"unknown config key --{key}{_suggest(name, names)}")
        return section, name
    in_model, in_train = key in model_names, key in train_names
    if in_model and in_train:
        raise ConfigError(f"--{key} is ambiguous; write --model.{key} or --train.{key}")
    if in_model:
        return "model", key
    if in_train:
        return "train", key
    raise ConfigError(f"unknown config key --{key}{_suggest(key, model_names | train_names)}")


def _build(cls, values: dict[str, Any], section: str):
    known = {f.name: f for f in fields(cls)}
    for name in values:
        if name not in known:
            raise ConfigError(f"unknown config key {section}.{name}{_suggest(name, known)}")
    coerced = {name: _coerce(value, known[name], section) for name, value in values.items()}
    try:
        return cls(**coerced)
    except TypeError as exc:
        raise ConfigError(f"bad {section} config: {exc}") from None


def _coerce(value: Any, f: dataclasses.Field, section: str) -> Any:
    """Check a value against the field's annotated type, converting int -> float where harmless."""
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{section}.{f.name} cannot be null")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind.startswith("float"):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            return float(value)
    elif kind.startswith("str"):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{section}.{f.name} must be {kind.split(' ')[0]}, got {value!r}")


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def save_json(obj: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
