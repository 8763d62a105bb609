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


@torch.no_grad()
def guided_greedy_reference(model, prompt_ids: list[int], unconditional_ids: list[int], scale: float,
                            max_new: int) -> list[int]:
    """Greedy tokens under classifier-free guidance, written out plainly: two caches, one per prompt, each fed the
    chosen token; the choice is argmax of log p_u + scale (log p_c - log p_u)."""
    device = model.embed_tokens.weight.device
    caches = [model.new_kv_cache(1, len(ids) + max_new) for ids in (prompt_ids, unconditional_ids)]
    logits = [model(torch.tensor([ids], device=device), kv_cache=cache).logits[0, -1]
              for ids, cache in zip((prompt_ids, unconditional_ids), caches)]
    tokens = []
    for _ in range(max_new):
        conditional, unconditional = (torch.log_softmax(row.float(), -1) for row in logits)
        token = int((unconditional + scale * (conditional - unconditional)).argmax())
        tokens.append(token)
        logits = [model(torch.tensor([[token]], device=device), kv_cache=cache).logits[0, -1] for cache in caches]
    return tokens
