"""Sentence embeddings from a transformer: the final (normalised) hidden states, mean-pooled over a text's tokens
and scaled to unit length, as sentence-transformers' Pooling(mean) + Normalize computes them. An encoder
(model.objective mlm) is the natural base; a decoder's states pool the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DataError
from ..model import ModelOutput


def padded(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T) bool, True = a real token) of right-padded token lists."""
    if any(not ids for ids in token_lists):
        raise DataError("cannot embed an empty text")
    width = max(len(ids) for ids in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        mask[row, :len(tokens)] = True
    return ids, mask


def pooled_embeddings(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n_embd) unit vectors: mean of the final hidden states over the real tokens of each row. Padding is
    on the right; an encoder is told to ignore padded keys, a decoder never sees them (causal)."""
    attn_mask = None if model.config.causal else mask[:, None, None, :]  # (B, 1, 1, T)
    hidden = model(ids, attn_mask=attn_mask, return_logits=False, return_hidden=True).hidden.float()
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return F.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(len(texts), n_embd) float32 unit vectors; each text is encoded as transformers' tokenizer(text) does
    (bos first when the tokenizer adds one), truncated to the model's context."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    limit = model.config.context_length
    vectors = []
    for start in range(0, len(texts), batch_size):
        token_lists = [tokenizer.encode(text, add_bos=True)[:limit] for text in texts[start:start + batch_size]]
        ids, mask = padded(token_lists, tokenizer.pad_id if tokenizer.pad_id is not None else 0)
        vectors.append(pooled_embeddings(model, ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(vectors) if vectors else torch.zeros(0, model.config.n_embd)


def retrieval_scores(queries: torch.Tensor, documents: torch.Tensor) -> dict[str, float]:
    """Query i's right document is document i: recall@1, recall@10 and mean reciprocal rank over the whole pool,
    ranked by cosine similarity of unit vectors (N, d) each."""
    similarity = queries @ documents.T  # (N, N)
    right = similarity.diagonal().unsqueeze(1)
    rank = (similarity > right).sum(1) + 1  # 1 = the right document first (ties count in its favour)
    return {"recall@1": float((rank <= 1).float().mean()), "recall@10": float((rank <= 10).float().mean()),
            "mrr": float((1.0 / rank.float()).mean())}


class PairDataset:
    """Tokenized (query, positive) pairs; `batch(indices)` gives what ContrastiveEmbedder's forward takes."""

    def __init__(self, records: list[tuple[str, dict]], tokenizer, length: int):
        self.queries = [tokenizer.encode(r["query"], add_bos=True)[:length] for _, r in records]
        self.positives = [tokenizer.encode(r["positive"], add_bos=True)[:length] for _, r in records]
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.length = length  # the widest row (the finetune evaluator sizes its share of rows by it)
        for (where, record), query, positive in zip(records, self.queries, self.positives):
            if not record["query"].strip() or not record["positive"].strip():
                raise DataError(f"{where}: query and positive must be non-empty text")

    def __len__(self) -> int:
        return len(self.queries)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        input_ids, query_mask = padded([self.queries[i] for i in indices], self.pad_id)
        positive_ids, positive_mask = padded([self.positives[i] for i in indices], self.pad_id)
        # targets: row i's positive is column i (the Trainer counts them: B per batch)
        return {"input_ids": input_ids, "query_mask": query_mask, "positive_ids": positive_ids,
                "positive_mask": positive_mask, "targets": torch.arange(len(indices))}


class ContrastiveEmbedder(torch.nn.Module):
    """The base model trained so that a query's embedding is nearest its positive among the batch's positives:
    InfoNCE (van den Oord et al. 2018) over in-batch negatives, cosine similarity / temperature (0.05 as SimCSE,
    Gao et al. 2021). `logits` is the (B, B) similarity matrix."""

    def __init__(self, base: torch.nn.Module, temperature: float = 0.05):
        super().__init__()
        self.base, self.temperature = base, temperature
        self.config = base.config

    def forward(self, input_ids, query_mask, positive_ids, positive_mask, targets, reduction: str = "mean",
                return_logits: bool = True, **_):
        queries = pooled_embeddings(self.base, input_ids, query_mask)  # (B, C)
        positives = pooled_embeddings(self.base, positive_ids, positive_mask)  # (B, C)
        logits = queries @ positives.T / self.temperature  # (B, B)
        loss = F.cross_entropy(logits, targets, reduction=reduction)
        return ModelOutput(logits=logits if return_logits else None, loss=loss)
