"""Batches for pretraining: fixed-length windows cut from the token shards.

Every window has a global sample index. Sample i of the run lives in epoch i // n_windows and is the
window at position i % n_windows of that epoch's seeded permutation. The batch for (step, micro-step,
rank) is a fixed range of sample indices, so:
  - the data cursor is just the step (resume reproduces the uninterrupted run exactly);
  - under torchrun each rank reads a disjoint slice, and N processes x batch B read exactly the samples
    one process reads with batch N*B.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError


class WindowDataset:
    """Non-overlapping windows of `length` + 1 tokens over a list of 1-D token arrays (the shards)."""

    def __init__(self, shards: list[np.ndarray], length: int):
        self.shards = shards
        self.length = length
        counts = [max(0, (len(s) - 1) // length) for s in shards]
        self.n_windows = int(sum(counts))
        if self.n_windows == 0:
            total = sum(len(s) for s in shards)
            raise DataError(
                f"only {total} tokens in the split, fewer than one window of context_length+1 = {length + 1}; "
                "add data or lower model.context_length")
        self._shard_of = np.repeat(np.arange(len(shards)), counts)  # window -> shard
        self._offset = np.concatenate([np.arange(c) * length for c in counts])  # window -> token offset

    def window(self, index: int) -> np.ndarray:
        """Tokens of window `index`: (length + 1,) int64."""
        shard = self.shards[self._shard_of[index]]
        start = self._offset[index]
        return np.asarray(shard[start:start + self.length + 1], dtype=np.int64)

    def __len__(self) -> int:
        return self.n_windows

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """{"input_ids", "targets"}: inputs and next-token targets, each (B, length) int64."""
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return {"input_ids": rows[:, :-1], "targets": rows[:, 1:]}


class MixtureDataset:
    """Windows of several datasets (of one window length) in fixed proportions: dataset k contributes
    round(total * weight_k / sum(weights)) samples per epoch (at least one), taken evenly spaced through its
    windows (or cycling through them when it has fewer), so an epoch is the same on every run."""

    def __init__(self, datasets: list, weights: list[float]):
        total = sum(len(d) for d in datasets)
        self.datasets = datasets
        self.counts = [max(1, round(total * w / sum(weights))) for w in weights]
        self.starts = np.cumsum([0] + self.counts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, index, side="right") - 1)
        j, n = index - int(self.starts[k]), len(self.datasets[k])
        return k, (j * n // self.counts[k]) if self.counts[k] <= n else j % n

    def batch(self, indices) -> dict[str, torch.Tensor]:
        parts = [self.datasets[k].batch([j]) for k, j in (self.locate(int(i)) for i in indices)]
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class PretrainBatches:
    """The training stream: a seeded permutation of a dataset's rows per epoch, addressed by step.

    `dataset` is anything with len() and batch(indices) -> dict (windows, packed SFT rows, ...).
    """

    def __init__(self, dataset, batch_size: int, grad_accum: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._epoch, self._perm = -1, None

    @property
    def samples_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _sample(self, i: int) -> int:
        epoch, position = divmod(i, len(self.dataset))
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            self._epoch = epoch
        return int(self._perm[position])

    def get(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        """This rank's micro-batch `micro_step` of optimizer step `step`."""
        first = ((step * self.grad_accum + micro_step) * self.world_size + self.rank) * self.batch_size
        return self.dataset.batch([self._sample(i) for i in range(first, first + self.batch_size)])

    def epoch_of(self, step: int) -> float:
        return step * self.samples_per_step / len(self.dataset)


def eval_windows(dataset: WindowDataset, max_tokens: int | None = None) -> list[int]:
    """Evenly spaced window indices covering at most max_tokens (all windows when None)."""
    n = len(dataset) if max_tokens is None else min(len(dataset), max(1, max_tokens // dataset.length))
    return np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
