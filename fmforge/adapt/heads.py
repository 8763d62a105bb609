"""Task heads on the foundation model's final hidden state."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..model import ModelOutput, Transformer

HEAD_FILE, LABELS_FILE = "head.safetensors", "labels.json"


class SequenceClassifier(nn.Module):
    """Classify a sequence from the final (normalised) hidden state of its last real token.

    The head is named `score`, as in Hugging Face's LlamaForSequenceClassification.
    """

    has_unused_parameters = True  # the LM head is not used for classification

    def __init__(self, base: Transformer, labels: list[str]):
        super().__init__()
        self.base, self.labels = base, list(labels)
        self.config = base.config
        p = base.embed_tokens.weight
        self.score = nn.Linear(base.config.n_embd, len(labels), bias=False, device=p.device, dtype=p.dtype)
        nn.init.normal_(self.score.weight, std=base.config.init_std)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_logits: bool = True, **_) -> ModelOutput:
        """input_ids (B, T) right-padded, lengths (B,) real tokens per row, targets (B,) label indices."""
        hidden = self.base(input_ids, return_logits=False, return_hidden=True).hidden  # (B, T, C)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]  # (B, C)
        logits = self.score(last).float()  # (B, n_labels)
        loss = F.cross_entropy(logits, targets, reduction=reduction) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss)

    def save_head(self, directory: Path) -> None:
        save_file({"score.weight": self.score.weight.detach().contiguous()}, str(directory / HEAD_FILE))
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


def read_labels(directory: Path) -> list[str] | None:
    file = directory / LABELS_FILE
    if not file.exists():
        return None
    return json.loads(file.read_text())
