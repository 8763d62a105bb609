"""Beam search: the likeliest continuation of a prompt under the model, searched `beams` hypotheses wide.

Greedy decoding commits to the likeliest token at every step; a translation that opens with the second-likeliest
word can still be the likelier sentence. Beam search keeps the `beams` best partial hypotheses at each step (by the
sum of their tokens' log-probabilities), extends each by every token, and keeps the best `beams` of those; a
hypothesis that emits a stop id is finished. Finished hypotheses are ranked by sum / length ** length_penalty (the
normalisation of Hugging Face's `generate(num_beams=...)`: 0 ranks by the sum, which favours short outputs; 1 by the
mean log-probability a token). Machine translation has decoded this way since Sutskever et al. (2014); the
published Multi30K baselines decode with beams of 4-12.

The beams are the rows of one batch: one forward a step for all of them, on a lockstep KV cache whose rows are
reordered (`LockstepKVCache.select_rows`) to follow the hypotheses that survive. `beams=1` is greedy decoding.
It decodes one prompt at a time (the engine batches sequences, not searches) and text only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Hypothesis:
    token_ids: list[int]  # the generated tokens (a stop id, if it ended on one, included)
    logprob: float  # the sum of their log-probabilities under the model
    score: float  # logprob / len(token_ids) ** length_penalty: what ranks hypotheses
    finish_reason: str  # "stop" (a stop id) or "length" (max_tokens, or the context, reached)


def check_beams(beams: int) -> int:
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"beams must be a whole number >= 1, got {beams!r}")
    return beams


def length_normalised(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (length ** length_penalty)


@torch.no_grad()
def beam_search(model, prompt_ids: list[int], *, beams: int, max_tokens: int, stop_ids=frozenset(),
                length_penalty: float = 1.0) -> list[Hypothesis]:
    """The finished hypotheses of a beam search from `prompt_ids`, best first (at most `beams` of them).

    Generation stops at a stop id or after `max_tokens` tokens (fewer where the context ends first). The search ends
    once `beams` hypotheses are finished and no running one can still rank above the worst of them, judged as
    Hugging Face's default does (`early_stopping=False`): a running hypothesis's sum, normalised by its current
    length, against the finished scores; or when max_tokens is reached, where the running ones finish as "length".
    """
    check_beams(beams)
    if not prompt_ids:
        raise ValueError("beam search needs a prompt of at least one token")
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    room = model.config.context_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"the prompt's {len(prompt_ids)} tokens leave no room in the model's context of "
                         f"{model.config.context_length}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    max_tokens = min(max_tokens, room)
    stop_ids = frozenset(int(i) for i in stop_ids)
    device = model.embed_tokens.weight.device
    cache = model.new_kv_cache(1, len(prompt_ids) + max_tokens)
    logits = model(torch.tensor([prompt_ids], device=device), kv_cache=cache).logits[:, -1]
    running: list[list[int]] = [[]]
    sums = torch.zeros(1, dtype=torch.float64, device=device)
    finished: list[Hypothesis] = []
    for length in range(1, max_tokens + 1):
        logprobs = F.log_softmax(logits.double(), dim=-1)  # (rows, V)
        candidates = (sums[:, None] + logprobs).flatten()
        vocab = logprobs.shape[-1]
        # 2 x beams candidates hold `beams` that do not stop, however many of the best ones stop.
        values, indices = candidates.topk(min(2 * beams, candidates.numel()))
        rows, tokens, kept = [], [], []
        for value, index in zip(values.tolist(), indices.tolist()):
            if not math.isfinite(value):
                break  # a -inf token (masked, or probability 0) is no hypothesis
            row, token = divmod(index, vocab)
            if token in stop_ids:
                finished.append(Hypothesis(running[row] + [token], value,
                                           length_normalised(value, length, length_penalty), "stop"))
                continue
            rows.append(row)
            tokens.append(token)
            kept.append(value)
            if len(rows) == beams:
                break
        running = [running[row] + [token] for row, token in zip(rows, tokens)]
        if length == max_tokens or not running:
            finished += [Hypothesis(ids, value, length_normalised(value, length, length_penalty), "length")
                         for ids, value in zip(running, kept)]
            break
        finished.sort(key=lambda h: h.score, reverse=True)
        del finished[beams:]
        if len(finished) == beams and length_normalised(kept[0], length, length_penalty) <= finished[-1].score:
            break
        sums = torch.tensor(kept, dtype=torch.float64, device=device)
        cache.select_rows(torch.tensor(rows, device=device))
        logits = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache).logits[:, -1]
    finished.sort(key=lambda h: h.score, reverse=True)
    return finished[:beams]
