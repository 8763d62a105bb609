"""Decoding with the KV cache: temperature, top-k, top-p, repetition penalty, stop strings, seed, streaming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import GenerationError
from ..model import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (Keskar et al. 2019)
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise GenerationError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def process_logits(logits: torch.Tensor, params: SamplingParams, context: torch.Tensor | None = None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to next-token logits (B, V) (float32)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and context is not None and context.numel():
        # CTRL-style: divide positive logits, multiply negative ones, for tokens already present.
        seen = logits.gather(1, context)
        seen = torch.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        logits = logits.scatter(1, context, seen)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked before it already cover top_p; the top token always stays.
        remove = cumulative - sorted_logits.softmax(-1) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Pick the next token (B,) from processed logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(model: Transformer, prompt_ids: list[int], params: SamplingParams,
                    eos_id: int | set[int] | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, decoding with a KV cache (prefill once, then one token per step).

    Generation ends after yielding a token in `eos_id` (an id or a set of ids)."""
    params.validate()
    stop_ids = eos_id if isinstance(eos_id, (set, frozenset)) else {eos_id}
    limit = model.config.context_length
    if not prompt_ids:
        raise GenerationError("the prompt is empty; give at least one token")
    if len(prompt_ids) >= limit:
        raise GenerationError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {limit}; "
                              "shorten the prompt")
    device = model.embed_tokens.weight.device
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    max_new = min(params.max_new_tokens, limit - len(prompt_ids))
    cache = model.new_kv_cache(1, len(prompt_ids) + max_new)
    context = torch.tensor([prompt_ids], device=device)
    logits = model(context, kv_cache=cache).logits[:, -1]
    for _ in range(max_new):
        next_id = sample_next(process_logits(logits, params, context), params, generator)
        token = int(next_id)
        yield token
        if token in stop_ids or cache.length >= cache.max_length:
            return
        context = torch.cat([context, next_id.view(1, 1)], dim=1)
        logits = model(next_id.view(1, 1), kv_cache=cache).logits[:, -1]


class TextStream:
    """Turns a stream of token ids into text pieces, holding back bytes that do not yet form a character
    and text that might be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (possibly empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        # Held-back text never contains a whole stop string, so a match starts at or after `emitted`.
        matches = [at for at in (text.find(stop, self.emitted) for stop in self.stop) if at != -1]
        if matches:
            self.stopped = True
            piece, self.emitted = text[self.emitted:min(matches)], min(matches)
            return piece
        safe = len(text)
        for stop in self.stop:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(stop) - 1, len(text) - self.emitted), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece = text[self.emitted:]
        self.emitted = len(text)
        return piece


def generate_text(model: Transformer, tokenizer, prompt: str, params: SamplingParams, add_bos: bool = True) -> Iterator[str]:
    """Stream generated text for a prompt: pieces as they become final; stops at eos or a stop string."""
    yield from generate_text_from_ids(model, tokenizer, tokenizer.encode(prompt, add_bos=add_bos), params,
                                      {tokenizer.eos_id})


def generate_text_from_ids(model: Transformer, tokenizer, prompt_ids: list[int], params: SamplingParams,
                           stop_ids: set[int]) -> Iterator[str]:
    """Stream text after already-encoded prompt ids; ends at any id in stop_ids or a stop string."""
    stream = TextStream(tokenizer, params.stop)
    for token in generate_tokens(model, prompt_ids, params, eos_id=stop_ids):
        if token in stop_ids:
            break
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    rest = stream.flush()
    if rest:
        yield rest
