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
    groups, muon_groups = [], []
    for scale in sorted({1.0} | {lr_scale.get(p, 1.0) for p in params}):
        scaled = [p for p in params if lr_scale.get(p, 1.0) == scale]
        extra = {} if scale == 1.0 else {"lr_scale": scale}
        pair = [{"params": [p for p in scaled if p.dim() >= 2 and id(p) not in muon], "weight_decay": cfg.weight_decay,
                 **extra},
                {"params": [p for p in scaled if p.dim() < 2], "weight_decay": 0.0, **extra}]
        # The unscaled pair stays even when empty, so optimizer states saved before lr_scale existed still load.
        groups += pair if scale == 1.0 else [g for g in pair if g["params"]]
        if any(id(p) in muon for p in scaled):
            muon_groups.append({"params": [p for p in scaled if id(p) in muon], "weight_decay": cfg.weight_decay,
                                **extra})
    device_type = params[0].device.type
    # The fused kernel is the fastest path on both CPU and CUDA in torch >= 2.4.
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type in ("cpu", "cuda"))
    if not muon:
        return torch.optim.AdamW(groups, **adamw)
    return MuonAdamW(muon_groups, groups, lr=cfg.lr, momentum=cfg.muon_momentum, adamw=adamw)


def is_hidden_matrix(name: str, param: torch.nn.Parameter) -> bool:
    """A 2-D weight inside the transformer blocks (attention and MLP projections): what Muon orthogonalises. The
    embedding and output head are lookups/classifiers, not hidden linear maps, and stay with AdamW (as in the
    nanoGPT speedrun and Moonlight)."""
    return param.dim() == 2 and name.split(".")[0] == "layers" and "embed" not in name


class MuonAdamW(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024; the update of torch.optim.Muon) on the hidden matrices and AdamW on the other
    parameters, as one optimizer: one list of param groups (Muon's first, marked "muon") and one state, so the
    trainer, checkpoints and resume treat it like AdamW. Muon's step is scaled to AdamW's update size
    ("match_rms_adamw", Liu et al. 2025, Moonlight), so the recipe's lr and weight decay mean the same for both.

    Why not torch.optim.Muon itself: it orthogonalises in bf16, and bf16 matmuls of these shapes run ~20x slower
    than fp32 on this CPU (22 ms vs 1.1 ms for one 128 x 128 Newton-Schulz; the whole step of a 4 x 128 model took
    2.3x AdamW's). Here the iteration runs in fp32 on a CPU and in bf16 (as torch's) on a GPU; with bf16 it is
    torch's update exactly (tested)."""

    def __init__(self, muon_groups: list[dict], adamw_groups: list[dict], *, lr: float, momentum: float,
                 adamw: dict, ns_dtype: torch.dtype | None = None):
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        muon_groups = [{**group, "muon": True, "momentum": momentum, "lr": lr} for group in muon_groups]
        super().__init__(muon_groups + self.adamw.param_groups, {})
        self.ns_dtype = ns_dtype
        self._share()

    def _share(self) -> None:
        """Point the inner AdamW at this optimizer's groups and state (after construction and every load)."""
        self.adamw.param_groups = [g for g in self.param_groups if not g.get("muon")]
        self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum)  # Nesterov
                dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                update = orthogonalise(update, dtype)
                p.mul_(1 - lr * decay)
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        self.adamw.step()


def orthogonalise(matrix: torch.Tensor, dtype: torch.dtype, steps: int = 5,
                  coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315)) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix (U V^T of the SVD), in
    `dtype`; the operations of torch.optim.Muon's _zeropower_via_newtonschulz."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


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
