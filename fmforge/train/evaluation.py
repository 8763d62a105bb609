"""Held-out loss, perplexity and bits-per-byte over token windows (the Trainer's validation, and the perplexity of
`fmforge eval`).

Bits-per-byte makes models with different tokenizers comparable (a character model and a BPE model of the
same text): bpb = (mean nats per token) x (tokens / bytes) / ln 2, with the split's token and UTF-8 byte
counts from the shard manifest.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..data.loader import WindowDataset


def bits_per_byte(loss_nats_per_token: float, tokens: int, num_bytes: int) -> float:
    return loss_nats_per_token * tokens / num_bytes / math.log(2)


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, dataset: WindowDataset, indices: list[int], batch_size: int,
                     autocast=None, device: str | torch.device = "cpu", min_batches: int = 0) -> tuple[float, int]:
    """Sum of next-token cross-entropy (nats) and the number of predicted tokens over the given windows.
    min_batches: run at least this many forward passes, the extra ones on window 0 and not counted (under FSDP2
    every process must run as many forwards as the others: each one all-gathers parameters with them)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(indices), batch_size))
    for _ in range(len(starts), min_batches):
        with autocast or nullcontext():
            model(dataset.batch([0])["input_ids"].to(device))
    for start in starts:
        batch = dataset.batch(indices[start:start + batch_size])
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        with autocast or nullcontext():
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    return total, count


def evaluate_masked_windows(model: torch.nn.Module, dataset: WindowDataset, indices: list[int], batch_size: int,
                            autocast=None, device: str | torch.device = "cpu", *, seed: int, mask_rate: float,
                            mask_id: int, n_special: int, vocab_size: int) -> tuple[float, int, int]:
    """An encoder's summed masked-token cross-entropy (nats), correct predictions and masked tokens over the given
    windows, each batch masked with a fixed seed so that evaluations are comparable across steps."""
    from ..data.masking import masked_batch

    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for number, start in enumerate(range(0, len(indices), batch_size)):
        batch = masked_batch(dataset.batch(indices[start:start + batch_size]), mask_rate, mask_id, n_special,
                             vocab_size, seed=seed + number)
        x, y = batch["input_ids"].to(device), batch["targets"].to(device)
        with torch.no_grad(), autocast or nullcontext():
            logits = model(x).logits.float()
        chosen = y != -100
        total += torch.nn.functional.cross_entropy(logits[chosen], y[chosen], reduction="sum").item()
        correct += int((logits[chosen].argmax(-1) == y[chosen]).sum())
        count += int(chosen.sum())
    model.train(was_training)
    return total, correct, count
