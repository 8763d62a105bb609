"""LoRA: low-rank adapters on linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen linear W gains a trainable update B·A scaled by alpha/rank: y = W x + (alpha/r) B A dropout(x).
B starts at zero, so an injected model computes exactly what the base computes until training moves B.
The token embedding can carry one too (target `embed_tokens`, not part of all-linear), as in PEFT: the table E
(vocab, dim) gains (alpha/r) (B A)^T with A (r, vocab) starting at zero and B (dim, r) random. It costs
r (vocab + dim) parameters and lets a specialist re-weigh what tokens mean, which classification needs most.

On disk an adapter uses the PEFT layout:

    adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules", ...,
                                "fmforge": {"base_fingerprint", "base_config", "task", ...}}
    adapter_model.safetensors  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...

Key names are those PEFT writes for the Hugging Face export of the same model (`model.` + our module path).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_key, check_adapter_base, read_adapter_config,
                          read_adapter_tensors, split_adapter_key)
from ..errors import ConfigError, SettingsMismatchError

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
EMBEDDING_MODULES = ("embed_tokens",)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names (last path component) to adapt; "all-linear" = attention + MLP (+ MoE experts). None: the
    # task's default, which fine-tuning chooses (train/finetune.py, default_lora_targets) before injecting.
    target_modules: list[str] | None = field(default_factory=lambda: list(ATTENTION_MODULES + MLP_MODULES))

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"lora rank must be a positive integer, got {self.rank!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is None:
            return
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        expanded = []
        for module in self.target_modules:
            expanded += ATTENTION_MODULES + MLP_MODULES if module == "all-linear" else (module,)
        self.target_modules = list(dict.fromkeys(expanded))
        unknown = sorted(set(self.target_modules) - set(ATTENTION_MODULES + MLP_MODULES + EMBEDDING_MODULES))
        if unknown:
            raise ConfigError(f"unknown LoRA target modules {unknown}; choose from "
                              f"{', '.join(ATTENTION_MODULES + MLP_MODULES + EMBEDDING_MODULES)} or all-linear")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT does
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense matrix (out_features, in_features)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.enabled:
            y = y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return y


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding plus a trainable low-rank update of its table (PEFT's layout and initialisation)."""

    def __init__(self, base: nn.Embedding, config: LoRAConfig):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_embedding_A = nn.Parameter(torch.zeros(config.rank, base.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, config.rank, device=device, dtype=dtype))
        self.scaling = config.scaling
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense table (num_embeddings, embedding_dim)."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        if self.enabled:
            y = y + (F.embedding(ids, self.lora_embedding_A.T) @ self.lora_embedding_B.T) * self.scaling
        return y


LORA_LAYERS = (LoRALinear, LoRAEmbedding)


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze every parameter of `model`, wrap the targeted linears in LoRALinear (and embeddings in
    LoRAEmbedding); return their names."""
    if config.target_modules is None:
        raise ConfigError("LoRA target modules are not chosen (None is the task's default: fine-tuning resolves it)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, nn.Embedding)) and name.rsplit(".", 1)[-1] in config.target_modules]
    if not targets:
        raise ConfigError(f"no layer matches the LoRA target modules {config.target_modules}")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, (LoRALinear if isinstance(module, nn.Linear) else LoRAEmbedding)(module, config))
    return [name for name, _ in targets]


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain layer back (in place).

    An embedding adapter on a model whose output head shares the embedding table (tie_embeddings) changes only
    the input side, so merging unties them: the head keeps the original table and the config says untied.
    """
    for name, module in lora_modules(model).items():
        lm_head = getattr(model, "lm_head", None)
        if isinstance(module, LoRAEmbedding) and lm_head is not None and lm_head.weight is module.base.weight:
            lm_head.weight = nn.Parameter(module.base.weight.detach().clone(),
                                          requires_grad=module.base.weight.requires_grad)
            model.config.tie_embeddings = False
        with torch.no_grad():
            module.base.weight += module.delta_weight().to(module.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for module in lora_modules(model).values():
        module.enabled = enabled


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights under PEFT key names."""
    state = {}
    for name, module in lora_modules(model).items():
        for part, weight in lora_pair(module).items():
            state[adapter_key(name, part, isinstance(module, LoRAEmbedding))] = weight.detach().contiguous()
    return state


def lora_pair(module: LoRALinear | LoRAEmbedding) -> dict[str, torch.Tensor]:
    """{"A": A, "B": B} of a LoRA layer, in PEFT's shapes."""
    if isinstance(module, LoRAEmbedding):
        return {"A": module.lora_embedding_A, "B": module.lora_embedding_B}
    return {"A": module.lora_A.weight, "B": module.lora_B.weight}


def write_adapter(directory: Path, model: nn.Module, config: LoRAConfig, base_checkpoint: Path,
                  base_fingerprint: str, extra: dict | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors (weights first, config last)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    base_config = json.loads((base_checkpoint / "config.json").read_text())["model"]
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(config.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": str(base_checkpoint),
        "fmforge": {"base_fingerprint": base_fingerprint, "base_config": base_config, **(extra or {})},
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")


def load_adapter(model: nn.Module, adapter_dir: Path, base_checkpoint: Path | None = None) -> LoRAConfig:
    """Inject LoRA into `model` as the adapter describes and load its weights; returns its LoRAConfig."""
    adapter_config = read_adapter_config(adapter_dir)
    if base_checkpoint is not None:
        check_adapter_base(adapter_config, base_checkpoint, adapter_dir)
    config = LoRAConfig(rank=adapter_config["r"], alpha=adapter_config["lora_alpha"],
                        dropout=0.0, target_modules=list(adapter_config["target_modules"]))
    inject_lora(model, config)
    load_adapter_weights(model, adapter_dir)
    return config


def load_adapter_weights(model: nn.Module, adapter_dir: Path) -> None:
    """Copy adapter_model.safetensors into a model that already carries matching LoRA modules."""
    state = read_adapter_tensors(adapter_dir)
    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SettingsMismatchError(f"adapter {adapter_dir} does not fit this model: missing {missing[:2]}, "
                                    f"unexpected {unexpected[:2]}")
    modules = lora_modules(model)
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise SettingsMismatchError(f"adapter {adapter_dir}: {key} has shape {tuple(tensor.shape)}, "
                                        f"expected {tuple(expected[key].shape)}")
        name, part = split_adapter_key(key)
        with torch.no_grad():
            lora_pair(modules[name])[part].copy_(tensor)
