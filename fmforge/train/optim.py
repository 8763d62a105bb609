"""AdamW with weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    lr_scale: dict[torch.nn.Parameter, float] | None = None) -> torch.optim.AdamW:
    """AdamW; weight decay applies to 2-D+ tensors (matmul weights, embeddings), not to norms and biases.
    `lr_scale` gives parameters a learning rate of scale x the schedule's (kept in their group as "lr_scale")."""
    lr_scale = lr_scale or {}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = []
    for scale in sorted({1.0} | {lr_scale.get(p, 1.0) for p in params}):
        scaled = [p for p in params if lr_scale.get(p, 1.0) == scale]
        extra = {} if scale == 1.0 else {"lr_scale": scale}
        pair = [{"params": [p for p in scaled if p.dim() >= 2], "weight_decay": cfg.weight_decay, **extra},
                {"params": [p for p in scaled if p.dim() < 2], "weight_decay": 0.0, **extra}]
        # The unscaled pair stays even when empty, so optimizer states saved before lr_scale existed still load.
        groups += pair if scale == 1.0 else [g for g in pair if g["params"]]
    device_type = params[0].device.type
    # The fused kernel is the fastest path on both CPU and CUDA in torch >= 2.4.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type in ("cpu", "cuda"))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup, then cosine decay to lr * min_lr_ratio at max_steps.
    wsd: linear warmup, constant, then linear decay over the last decay_fraction of steps
         (warmup-stable-decay, Hu et al. 2024 "MiniCPM").
    constant: linear warmup, then constant.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    warmup = min(cfg.warmup_steps, max(cfg.max_steps - 1, 0))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, cfg.max_steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_steps = max(1, round(cfg.max_steps * cfg.decay_fraction))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start:
        return peak
    progress = (step - decay_start) / decay_steps
    return peak + (floor - peak) * min(progress, 1.0)
