"""Reference decoding for tests: the plainest greedy loop over the model's own KV cache, one token per forward.
The engine (batching, slots, speculation, the sampler) must give exactly these tokens."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_reference(model, prompt_ids: list[int], max_new: int, stop_ids=()) -> list[int]:
    """Up to max_new greedy tokens after prompt_ids (fewer at the context's end or after a stop id)."""
    device = model.embed_tokens.weight.device
    max_new = min(max_new, model.config.context_length - len(prompt_ids))
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new)
    logits = model(torch.tensor([prompt_ids], device=device), kv_cache=cache).logits[:, -1]
    tokens = []
    for _ in range(max_new):
        token = int(logits.float().argmax(-1))
        tokens.append(token)
        if token in stop_ids or cache.length >= cache.max_length:
            break
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache).logits[:, -1]
    return tokens
