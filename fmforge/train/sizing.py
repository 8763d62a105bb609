"""train.size auto: pick the model size for a time budget.

A budget of seconds buys a number of tokens that depends on the model: a larger one steps slower and must learn
more parameters from them. Hoffmann et al. (2022) found the loss-optimal split of a compute budget at roughly a
fixed ratio of training tokens to parameters (~20 at their scale); the ratio that is best at ours is measured
(RESULTS.md, "Time to quality") and written in the recipe as train.tokens_per_param. At start each of the recipe's
`sizes` is timed on this machine (a few real optimizer steps on random tokens, smallest first), its tokens within
the budget are predicted from that, and the largest size that still gets tokens_per_param tokens per parameter is
chosen (the smallest when none does). Sizes larger than the first one that falls short are not timed: a larger
model is slower and has more parameters, so it falls short too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import RunConfig


@dataclass
class SizeRow:
    name: str
    parameters: int
    tokens_per_step: int
    step_seconds: float | None = None  # None: not timed (a smaller size already fell short)
    tokens: float | None = None  # predicted training tokens within the budget

    @property
    def tokens_per_param(self) -> float | None:
        return None if self.tokens is None else self.tokens / self.parameters

    def to_dict(self) -> dict:
        return {"name": self.name, "parameters": self.parameters, "tokens_per_step": self.tokens_per_step,
                "ms_per_step": None if self.step_seconds is None else round(self.step_seconds * 1000, 1),
                "tokens": None if self.tokens is None else int(self.tokens),
                "tokens_per_param": None if self.tokens is None else round(self.tokens_per_param, 3)}


def choose_size(rows: list[SizeRow], step_seconds: Callable[[str], float], budget_seconds: float,
                tokens_per_param: float) -> str:
    """Time the sizes smallest first (filling in each row) until one would train on fewer than tokens_per_param
    tokens per parameter in budget_seconds; the largest that reaches it wins, else the smallest."""
    rows.sort(key=lambda row: row.parameters)
    chosen = rows[0].name
    for row in rows:
        row.step_seconds = step_seconds(row.name)
        row.tokens = budget_seconds / row.step_seconds * row.tokens_per_step
        if row.tokens_per_param < tokens_per_param:
            break
        chosen = row.name
    return chosen


def eval_overhead(cfg, context_length: int) -> float:
    """The factor periodic evaluation adds to a training step: it reads eval_tokens every eval_interval steps at about
    a third of a training step's cost per token (forward only)."""
    train_tokens_per_step = cfg.batch_size * cfg.grad_accum * context_length
    return 1 + cfg.eval_tokens / cfg.eval_interval / train_tokens_per_step / 3


def measure_step_seconds(run: RunConfig, device: torch.device, autocast, steps: int = 3) -> float:
    """Seconds per optimizer step of `run`'s model and batch on `device` (median of `steps` after one warm-up step,
    forward, backward and the optimizer; random tokens), times the periodic-eval overhead. The model is thrown
    away afterwards."""
    from ..model import Transformer
    from .optim import build_optimizer

    cfg, config = run.train, run.model
    model = Transformer(config).to(device)
    optimizer = build_optimizer(model, cfg)
    tokens = torch.randint(config.vocab_size, (cfg.batch_size, config.context_length + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        for _ in range(cfg.grad_accum):
            with autocast:
                loss = model(**batch, return_logits=False).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2] * eval_overhead(cfg, config.context_length)


def pick_size(run: RunConfig, budget_seconds: float, step_seconds: Callable[[RunConfig], float],
              say: Callable[[str], None]) -> tuple[RunConfig, dict]:
    """train.size auto: `run` with the chosen size applied, and the record of the choice (for run.yaml)."""
    cfg = run.train
    sized = {name: run.with_size(name) for name in run.sizes}
    rows = [SizeRow(name, r.model.num_parameters(), r.train.batch_size * r.train.grad_accum * r.model.context_length)
            for name, r in sized.items()]
    chosen = choose_size(rows, lambda name: step_seconds(sized[name]), budget_seconds, cfg.tokens_per_param)
    say(f"size auto: {budget_seconds:.0f} s of training, target {cfg.tokens_per_param:g} tokens per parameter")
    say(f"  {'size':<12} {'parameters':>11} {'ms/step':>8} {'tokens':>11} {'tokens/param':>13}")
    for row in rows:
        timed = row.step_seconds is not None
        say(f"  {row.name:<12} {row.parameters:>11,} "
            + (f"{row.step_seconds * 1000:>8.0f} {row.tokens:>11,.0f} {row.tokens_per_param:>13.2f}" if timed
               else f"{'-':>8} {'-':>11} {'-':>13}")
            + ("  <- chosen" if row.name == chosen else ""))
    say("  (another size: --size NAME; the recipe's model section: --size null)")
    record = {"chosen": chosen, "budget_seconds": round(budget_seconds, 1), "tokens_per_param": cfg.tokens_per_param,
              "sizes": [row.to_dict() for row in rows]}
    return sized[chosen], record
