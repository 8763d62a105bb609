"""Task heads on the foundation model's final hidden state."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import HEAD_FILE, LABELS_FILE
from ..errors import CheckpointError, ConfigError
from ..model import ModelOutput, Transformer

POOLINGS = ("mean", "last")  # how a classifier reads the final hidden states: their mean, or the last token's


class SequenceClassifier(nn.Module):
    """Classify a sequence from the final (normalised) hidden states of its real tokens.

    pooling "mean" averages them (every token of the text informs the head); "last" takes the last one, as Hugging
    Face's LlamaForSequenceClassification does. The head is named `score`, as there. The pooling is saved with the
    head (metadata of head.safetensors; heads saved without it were "last").
    """

    has_unused_parameters = True  # the LM head is not used for classification

    def __init__(self, base: Transformer, labels: list[str], pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use {' or '.join(POOLINGS)}")
        self.base, self.labels, self.pooling = base, list(labels), pooling
        self.config = base.config
        p = base.embed_tokens.weight
        self.score = nn.Linear(base.config.n_embd, len(labels), bias=False, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.score.weight, std=base.config.init_std)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_logits: bool = True, **_) -> ModelOutput:
        """input_ids (B, T) right-padded, lengths (B,) real tokens per row, targets (B,) label indices."""
        hidden = self.base(input_ids, return_logits=False, return_hidden=True).hidden  # (B, T, C)
        if self.pooling == "last":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, C)
        else:
            real = torch.arange(hidden.shape[1], device=hidden.device) < lengths.to(hidden.device)[:, None]  # (B, T)
            pooled = (hidden * real.unsqueeze(-1).to(hidden.dtype)).sum(1) / lengths.to(hidden.device)[:, None]
        logits = self.score(pooled.to(self.score.weight.dtype)).float()  # (B, n_labels)
        loss = F.cross_entropy(logits, targets, reduction=reduction) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    def save_head(self, directory: Path) -> None:
        save_file({"score.weight": self.score.weight.detach().contiguous()}, str(directory / HEAD_FILE),
                  metadata={"pooling": self.pooling})
        (directory / LABELS_FILE).write_text(json.dumps(self.labels, indent=1) + "\n")

    def load_head(self, directory: Path) -> None:
        try:
            weight = load_file(str(directory / HEAD_FILE))["score.weight"]
        except Exception as exc:
            raise CheckpointError(f"cannot read the classification head in {directory}: {exc}") from None
        if weight.shape != self.score.weight.shape:
            raise CheckpointError(f"{directory / HEAD_FILE} has shape {tuple(weight.shape)}, expected "
                                  f"{tuple(self.score.weight.shape)}")
        with torch.no_grad():
            self.score.weight.copy_(weight)


def head_pooling(directory: Path) -> str:
    """The pooling a saved head was trained with ("last" for heads saved before pooling was recorded)."""
    try:
        with safe_open(str(directory / HEAD_FILE), framework="pt") as f:
            pooling = (f.metadata() or {}).get("pooling", "last")
    except Exception as exc:
        raise CheckpointError(f"cannot read the classification head in {directory}: {exc}") from None
    if pooling not in POOLINGS:
        raise CheckpointError(f"{directory / HEAD_FILE} has unknown pooling {pooling!r}")
    return pooling


def load_classifier(base: Transformer, directory: Path) -> SequenceClassifier:
    """The classifier saved in `directory` (head, labels, pooling) on top of `base`."""
    labels = read_labels(directory)
    if labels is None:
        raise CheckpointError(f"{directory} has {HEAD_FILE} but no {LABELS_FILE}")
    classifier = SequenceClassifier(base, labels, head_pooling(directory))
    classifier.load_head(directory)
    return classifier


def read_labels(directory: Path) -> list[str] | None:
    file = directory / LABELS_FILE
    if not file.exists():
        return None
    return json.loads(file.read_text())
