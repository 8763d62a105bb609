"""Beam search: the likeliest continuation of a prompt under the model, searched `beams` hypotheses wide.

Greedy decoding commits to the likeliest token at every step; a translation that opens with the second-likeliest
word can still be the likelier sentence. Beam search keeps the `beams` best partial hypotheses at each step (by the
sum of their tokens' log-probabilities), extends each by every token, and keeps the best `beams` of those; a
hypothesis that emits a stop id is finished. Finished hypotheses are ranked by sum / length ** length_penalty (the
normalisation of Hugging Face's `generate(num_beams=...)`: 0 ranks by the sum, which favours short outputs; 1 by the
mean log-probability a token). Machine translation has decoded this way since Sutskever et al. (2014).

The beams are rows of one batch: one forward a step for all of them, and for the beams of other prompts searched
beside them (`beam_search_batch`), on a KV cache whose rows are gathered (`SlotKVCache.select_rows`) to follow the
hypotheses that survive. `beams=1` is greedy decoding. Text only; the engine's continuous batching does not run
searches (the server samples).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .cache import SlotKVCache, kv_cache_bytes_per_token

# Rows (hypotheses) a forward of side-by-side searches aims at: beams x the searches run together (searches_at_once).
ROWS = 32


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


def searches_at_once(beams: int, most: int = 8) -> int:
    """How many prompts' searches to run side by side at `beams` (at most `most`): ROWS hypotheses a forward, or
    one search however wide."""
    return max(1, min(most, ROWS // beams))


def memory_for_cache(device: torch.device) -> int | None:
    """Bytes a beam search's cache may take: half the machine's memory (CPU) or the device's free memory (CUDA);
    None where neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return None


def length_normalised(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / (length ** length_penalty)


def beam_search(model, prompt_ids: list[int], *, beams: int, max_tokens: int, stop_ids=frozenset(),
                length_penalty: float = 1.0) -> list[Hypothesis]:
    """The finished hypotheses of a beam search from `prompt_ids`, best first (at most `beams` of them).

    Generation stops at a stop id or after `max_tokens` tokens (fewer where the context ends first). The search ends
    once `beams` hypotheses are finished and no running one can still rank above the worst of them, judged as
    Hugging Face's default does (`early_stopping=False`): a running hypothesis's sum, normalised by its current
    length, against the finished scores; or when max_tokens is reached, where the running ones finish as "length".
    """
    return beam_search_batch(model, [prompt_ids], beams=beams, max_tokens=max_tokens, stop_ids=stop_ids,
                             length_penalty=length_penalty)[0]


class _Search:
    """One prompt's search: its running hypotheses (token lists and summed log-probabilities) and finished ones."""

    def __init__(self, limit: int):
        self.limit = limit  # tokens it may generate
        self.running: list[list[int]] = [[]]
        self.sums: list[float] = [0.0]
        self.finished: list[Hypothesis] = []

    def extend(self, logprobs: torch.Tensor, length: int, beams: int, stop_ids: frozenset[int],
               length_penalty: float) -> list[tuple[int, int]]:
        """Step `length` (1-based) from logprobs (len(running), V): the (row among running, token) pairs that
        continue, best first; finishes what stops, and everything at the limit or when nothing can rank higher."""
        vocab = logprobs.shape[-1]
        candidates = (torch.tensor(self.sums, dtype=logprobs.dtype, device=logprobs.device)[:, None]
                      + logprobs).flatten()
        # 2 x beams candidates hold `beams` that do not stop, however many of the best ones stop.
        values, indices = candidates.topk(min(2 * beams, candidates.numel()))
        kept, running, sums = [], [], []
        for value, index in zip(values.tolist(), indices.tolist()):
            if not math.isfinite(value):
                break  # a -inf token (masked, or probability 0) is no hypothesis
            row, token = divmod(index, vocab)
            if token in stop_ids:
                self.finished.append(Hypothesis(self.running[row] + [token], value,
                                                length_normalised(value, length, length_penalty), "stop"))
                continue
            kept.append((row, token))
            running.append(self.running[row] + [token])
            sums.append(value)
            if len(kept) == beams:
                break
        self.running, self.sums = running, sums
        ended = length == self.limit or not running
        if ended:
            self.finished += [Hypothesis(ids, value, length_normalised(value, length, length_penalty), "length")
                              for ids, value in zip(running, sums)]
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[beams:]
        if not ended and len(self.finished) == beams:
            ended = length_normalised(sums[0], length, length_penalty) <= self.finished[-1].score
        return [] if ended else kept


@torch.no_grad()
def beam_search_batch(model, prompts: list[list[int]], *, beams: int, max_tokens: int | list[int],
                      stop_ids=frozenset(), length_penalty: float = 1.0) -> list[list[Hypothesis]]:
    """beam_search of each prompt (`max_tokens`: one for all, or one each), the searches side by side: every
    running hypothesis of every prompt is a row of one forward a step, on a cache whose rows are each at their own
    length (infer/cache.SlotKVCache), gathered after each step to follow the hypotheses that survive. The same
    hypotheses as one search at a time (by test), in a fraction of the forwards' overhead."""
    check_beams(beams)
    if not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_tokens for {len(prompts)} prompts")
    if any(limit < 1 for limit in limits):
        raise ValueError(f"max_tokens must be >= 1, got {min(limits)}")
    context = model.config.context_length
    for prompt_ids in prompts:
        if not prompt_ids:
            raise ValueError("beam search needs a prompt of at least one token")
        if len(prompt_ids) >= context:
            raise ValueError(f"the prompt's {len(prompt_ids)} tokens leave no room in the model's context of "
                             f"{context}")
    if not prompts:
        return []
    stop_ids = frozenset(int(i) for i in stop_ids)
    param = model.embed_tokens.weight
    device = param.device
    searches = [_Search(min(limit, context - len(prompt_ids))) for prompt_ids, limit in zip(prompts, limits)]
    positions = max(len(p) + s.limit for p, s in zip(prompts, searches))
    # The cache grows to beams rows a search (select_rows): refuse what could not fit rather than die trying.
    needed = len(prompts) * beams * positions * kv_cache_bytes_per_token(model.config, param.dtype)
    available = memory_for_cache(device)
    if available is not None and needed > available:
        raise ConfigError(f"a beam search {beams} wide over {len(prompts)} prompt(s) of up to {positions} tokens "
                          f"would hold {needed / 2 ** 30:,.1f} GiB of keys and values; this machine has room for "
                          f"{available / 2 ** 30:,.1f} GiB: use fewer beams")
    cache = SlotKVCache(model.config, len(prompts), positions, device, param.dtype)
    # Prefill: the prompts right-padded in one forward (keys written past a row's length are masked until a later
    # token overwrites them), then each prompt's logits at its last token.
    widths = [len(prompt_ids) for prompt_ids in prompts]
    ids = torch.zeros(len(prompts), max(widths), dtype=torch.long)
    for row, prompt_ids in enumerate(prompts):
        ids[row, :widths[row]] = torch.tensor(prompt_ids)
    cache.bind(0, len(prompts), widths)
    hidden = model(ids.to(device), kv_cache=cache, return_logits=False, return_hidden=True).hidden
    logits = model.lm_head(hidden[torch.arange(len(prompts), device=device),
                                  torch.tensor(widths, device=device) - 1])
    owners = list(range(len(prompts)))  # the search each row of `logits` belongs to, rows of a search together
    for length in range(1, max(s.limit for s in searches) + 1):
        logprobs = F.log_softmax(logits.double(), dim=-1)
        sources, tokens, next_owners = [], [], []
        first = 0
        for owner in dict.fromkeys(owners):  # each search still running, in row order
            count = len(searches[owner].running)
            kept = searches[owner].extend(logprobs[first:first + count], length, beams, stop_ids, length_penalty)
            sources += [first + row for row, _ in kept]
            tokens += [token for _, token in kept]
            next_owners += [owner] * len(kept)
            first += count
        if not sources:
            break
        owners = next_owners
        cache.select_rows(sources)
        cache.bind(0, len(sources))
        logits = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache).logits[:, -1]
    return [search.finished[:beams] for search in searches]
