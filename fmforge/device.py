"""Where tensors live and in what precision: one set of rules for training, generation and serving."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """auto (cuda when a GPU is there, else cpu), cpu, cuda or cuda:N; `option` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {name} but no CUDA GPU is available; use {option} cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"{option} {name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, option: str = "--dtype") -> torch.dtype:
    """Inference weights' dtype. auto: bf16 on a GPU that supports it; fp32 on the CPU (batch-1 decoding there is
    bound by overheads and memory, where bf16 gains nothing and costs accuracy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{option} must be auto, float32, bfloat16 or float16, got {name!r}")
    return DTYPES[name]
