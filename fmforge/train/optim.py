"""The optimizers (AdamW with weight decay on matrices only; or Muon on the blocks' matrices with AdamW on the rest)
and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                    lr_scale: dict[torch.nn.Parameter, float] | None = None) -> torch.optim.Optimizer:
    """train.optimizer adamw: AdamW; weight decay applies to 2-D+ tensors (matmul weights, embeddings), not to norms
    and biases. muon: Muon on the transformer blocks' 2-D matrices, AdamW as above on everything else (see
    MuonAdamW). `lr_scale` gives parameters a learning rate of scale x the schedule's (kept in their group as
    "lr_scale")."""
    lr_scale = lr_scale or {}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = {id(p) for name, p in named if cfg.optimizer == "muon" and is_hidden_matrix(name, p)}
    params = [p for _, p in named]
    groups = []
    for scale in sorted({1.0} | {lr_scale.get(p, 1.0) for p in params}):
        scaled = [p for p in params if lr_scale.get(p, 1.0) == scale]
        extra = {} if scale == 1.0 else {"lr_scale": scale}
        pair = [{"params": [p for p in scaled if p.dim() >= 2 and id(p) not in muon], "weight_decay": cfg.weight_decay,
                 **extra},
                {"params": [p for p in scaled if p.dim() < 2], "weight_decay": 0.0, **extra}]
        # The unscaled pair stays even when empty, so optimizer states saved before lr_scale existed still load.
        groups += pair if scale == 1.0 else [g for g in pair if g["params"]]
    device_type = params[0].device.type
    # The fused kernel is the fastest path on both CPU and CUDA in torch >= 2.4.
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cpu", "cuda"))
    if not muon:
        return torch.optim.AdamW(groups, **adamw)
    muon_groups = []
    for scale in sorted({lr_scale.get(p, 1.0) for p in params if id(p) in muon}):
        extra = {} if scale == 1.0 else {"lr_scale": scale}
        muon_groups.append({"params": [p for p in params if id(p) in muon and lr_scale.get(p, 1.0) == scale],
                            "weight_decay": cfg.weight_decay, **extra})
    return MuonAdamW(muon_groups, groups, lr=cfg.lr, momentum=cfg.muon_momentum, adamw=adamw)


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the transformer blocks (attention and MLP projections): what Muon orthogonalises. The
    embedding and output head are lookups/classifiers, not hidden linear maps, and stay with AdamW (as in the
    nanoGPT speedrun and Moonlight)."""
    return param.dim() == 2 and name.split(".")[0] == "layers" and "embed" not in name


class MuonAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon, Jordan et al. 2024) on the hidden matrices and AdamW on the other parameters, as one
    optimizer: one list of param groups (Muon's first) and one state, so the trainer, checkpoints and resume treat
    it like AdamW. Muon's step is scaled to AdamW's update size ("match_rms_adamw", Liu et al. 2025, Moonlight), so
    the recipe's lr and weight decay mean the same for both halves."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, lr: float, momentum: float,
                 adamw: dict):
        self.muon = torch.optim.Muon(muon_groups, lr=lr, momentum=momentum, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point the two inner optimizers at this one's groups and state (after construction and every load)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()


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
