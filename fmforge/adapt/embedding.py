"""Sentence embeddings from a transformer: the final (normalised) hidden states, mean-pooled over a text's tokens
and scaled to unit length, as sentence-transformers' Pooling(mean) + Normalize computes them. An encoder
(model.objective mlm) is the natural base; a decoder's states pool the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import DataError


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
