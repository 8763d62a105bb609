"""The serving engine: continuous batching of many requests, each with its own sampling and its own adapter.

One thread owns the model. Each turn of its loop it admits waiting requests into free slots (prefill: the whole
prompt in one forward, then the first token), runs ONE decode forward for every running sequence together, and
samples each row with that sequence's own settings. Sequences leave the batch the moment they finish or their
client goes away; new ones join at the next turn (Yu et al. 2022, "Orca": iteration-level scheduling).
Requests beyond the slots wait in a bounded queue; beyond that `submit` refuses at once (EngineFull -> HTTP 429).

Results go back through a callback per sequence, called on the engine thread (the HTTP layer hands them to its
event loop). Embedding jobs run on the same thread between decode steps, so only one thread ever touches the
model.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ..infer.sampling import TextStream
from ..model import Transformer
from .cache import SlotKVCache
from .lora import AdapterSelection, LoadedAdapter, attach_adapters


PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward, at most (one longer prompt goes alone)


class EngineFull(Exception):
    """The queue is at capacity; the caller should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work (HTTP 503)."""


@dataclass
class SamplingOptions:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What a sequence produced in one step: new text (may be empty while bytes or a possible stop string are
    held back), the token's log-probabilities if asked for, and finish_reason on its last event."""
    text: str
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None  # "stop" | "length"
    completion_tokens: int = 0


@dataclass
class Sequence:
    prompt_ids: list[int]
    adapter: int  # 0 = base, i = the i-th served adapter
    options: SamplingOptions
    on_event: Callable[[Event], None]
    stop_ids: frozenset[int]
    stream: TextStream
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the slot at its next step."""
        self.cancelled = True


@dataclass
class _EmbedJob:
    token_lists: list[list[int]]
    adapter: int
    future: Future


class Engine:
    def __init__(self, model: Transformer, tokenizer, adapters: list[LoadedAdapter] | None = None, *,
                 max_batch: int = 16, max_queue: int = 64, max_context: int | None = None, speculate: int = 4):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = list(adapters or [])
        self.selection: AdapterSelection = attach_adapters(model, self.adapters) if self.adapters else AdapterSelection()
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        self.max_context = min(max_context or model.config.context_length, model.config.context_length)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.speculate = speculate  # drafted tokens per step when one sequence runs alone (0 = off)
        self.cache = SlotKVCache(model.config, max_batch, self.max_context, self.device, self.dtype)
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []  # sequence i lives in cache slot i
        self._jobs: list[_EmbedJob] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Counters read by /metrics (written on the engine thread only).
        self.steps = 0
        self.speculative_steps = 0
        self.accepted_draft_tokens = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.on_first_token: Callable[[float], None] | None = None  # seconds from submit to first token

    # ---- called from other threads ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fmforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish running and waiting sequences, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], options: SamplingOptions, on_event: Callable[[Event], None],
               adapter: int = 0, stop_ids: frozenset[int] = frozenset()) -> Sequence:
        """Queue a sequence; raises EngineFull when max_queue sequences already wait."""
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(options.seed)
        sequence = Sequence(list(prompt_ids), adapter, options, on_event, stop_ids,
                            TextStream(self.tokenizer, options.stop), generator)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineFull(f"the server is at capacity ({self.max_batch} running, {len(self._waiting)} "
                                 "waiting); retry later")
            self._waiting.append(sequence)
            self._cond.notify()
        return sequence

    def embed(self, token_lists: list[list[int]], adapter: int = 0) -> Future:
        """Future of a (len(token_lists), n_embd) float32 tensor: mean-pooled final hidden states, unit length."""
        job = _EmbedJob(token_lists, adapter, Future())
        with self._cond:
            if self._stopping:
                raise EngineStopped("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the engine thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cuda":
            # cuDNN attention builds a plan per shape, which costs more than a decode step; the other backends
            # take the masks the slot cache makes without that.
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
            with sdpa_kernel(backends):
                return self._serve()
        return self._serve()

    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._jobs or self._stopping):
                        self._cond.wait()
                    if self._stopping and not (self._waiting or self._running or self._jobs):
                        return
                    jobs, self._jobs = self._jobs, []
                    free = self.max_batch - len(self._running)
                    admitted, self._waiting = self._waiting[:free], self._waiting[free:]
                for job in jobs:
                    self._run_embed(job)
                for group in prefill_groups([s for s in admitted if not s.cancelled], PREFILL_TOKENS):
                    self._prefill(group)
                self._retire()
                if self._running:
                    self._decode()
                    self._retire()
        except BaseException as exc:  # noqa: BLE001 — report to every waiter rather than hang them
            self.error = exc
            with self._cond:
                pending, self._waiting = self._running + self._waiting, []
                self._running = []
                jobs, self._jobs = self._jobs, []
                self._stopping = True
            for sequence in pending:
                sequence.on_event(Event("", finish_reason="error"))
            for job in jobs:
                job.future.set_exception(exc)
            raise

    def _select(self, adapters: list[int]) -> None:
        self.selection.ids = (torch.tensor(adapters, device=self.device) if any(adapters) else None)

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Prompts of newly admitted sequences in one forward, right-padded to the longest. Padding writes keys
        past a row's prompt; its length is set back to the prompt, so decoding overwrites them, and until then
        the mask (keys up to the query's position) hides them."""
        first = len(self._running)
        lengths = [len(s.prompt_ids) for s in sequences]
        ids = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, :lengths[row]] = torch.tensor(sequence.prompt_ids)
            self._running.append(sequence)
            self.cache.clear(first + row)
        self.cache.bind(first, len(sequences))
        self._select([s.adapter for s in sequences])
        hidden = self.model(ids.to(self.device), kv_cache=self.cache, return_logits=False, return_hidden=True).hidden
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(hidden[torch.arange(len(sequences), device=self.device), last])
        for row, length in enumerate(lengths):
            self.cache.lengths[first + row] = length
        self.prompt_tokens += sum(lengths)
        self._accept(logits, sequences)

    def _decode(self) -> None:
        running = self._running
        if len(running) == 1 and self.speculate and not self._waiting:
            draft = propose_draft(running[0].prompt_ids + running[0].output_ids, self.speculate,
                                  self._room(running[0]) - 1)
            if draft:
                return self._decode_speculative(running[0], draft)
        self.cache.bind(0, len(running))
        self._select([s.adapter for s in running])
        last = torch.tensor([[s.output_ids[-1]] for s in running], device=self.device)
        logits = self.model(last, kv_cache=self.cache).logits[:, -1]
        self.steps += 1
        self._accept(logits, running)

    def _room(self, sequence: Sequence) -> int:
        """Tokens this sequence may still generate (its max_tokens and the context both bound it)."""
        used = len(sequence.prompt_ids) + len(sequence.output_ids)
        return min(sequence.options.max_tokens - len(sequence.output_ids), self.max_context - used)

    def _decode_speculative(self, sequence: Sequence, draft: list[int]) -> None:
        """Prompt-lookup speculative decoding for a lone sequence (Saxena 2023; Leviathan et al. 2023).

        One forward feeds the last token plus k drafted tokens, which costs about what one token costs when
        decoding is bound by reading the weights (batch 1). Position j's logits are sampled exactly as a plain
        step would sample them (same settings, same random draw); while the sampled token equals draft[j] the
        next position is valid too, so up to k + 1 tokens come out of one forward, and the output is the one
        plain decoding gives (greedy: identical; sampling: the same distribution and the same seeded draws).
        """
        start = self.cache.lengths[0]
        self.cache.bind(0, 1)
        self._select([sequence.adapter])
        ids = torch.tensor([[sequence.output_ids[-1], *draft]], device=self.device)
        logits = self.model(ids, kv_cache=self.cache).logits[0]  # (1 + k, V)
        self.steps += 1
        self.speculative_steps += 1
        accepted = 0
        for j in range(len(draft) + 1):
            self._accept(logits[j:j + 1], [sequence])
            if sequence.finished or sequence.cancelled or j == len(draft) or sequence.output_ids[-1] != draft[j]:
                break
            accepted += 1
        self.accepted_draft_tokens += accepted
        # The cache now holds the last token and the accepted drafts; later positions are overwritten next step.
        self.cache.lengths[0] = start + 1 + accepted

    def _accept(self, logits: torch.Tensor, sequences: list[Sequence]) -> None:
        """Sample one token per row and hand each sequence its event."""
        tokens, logprobs = sample_rows(logits, [s.options for s in sequences], [s.output_ids for s in sequences],
                                       [s.generator for s in sequences], self.tokenizer)
        now = time.perf_counter()
        for sequence, token, logprob in zip(sequences, tokens, logprobs):
            if sequence.cancelled:
                continue
            if not sequence.output_ids and self.on_first_token is not None:
                self.on_first_token(now - sequence.submitted_at)
            sequence.output_ids.append(token)
            self.generated_tokens += 1
            text, finish = "", None
            if token in sequence.stop_ids:
                finish = "stop"
            else:
                text = sequence.stream.push(token)
                if sequence.stream.stopped:
                    finish = "stop"
            if finish is None and self._room(sequence) <= 0:
                finish = "length"
                text += sequence.stream.flush()
            sequence.finished = finish is not None
            sequence.on_event(Event(text, token, logprob, finish, len(sequence.output_ids)))

    def _retire(self) -> None:
        """Drop finished and cancelled sequences; the last running one moves into each freed slot."""
        slot = 0
        while slot < len(self._running):
            sequence = self._running[slot]
            if sequence.finished or sequence.cancelled:
                last = len(self._running) - 1
                if slot != last:
                    self.cache.move(last, slot)
                    self._running[slot] = self._running[last]
                self._running.pop()
                self.cache.clear(last)
            else:
                slot += 1

    def _run_embed(self, job: _EmbedJob) -> None:
        try:
            vectors = []
            self._select([job.adapter])
            for ids in job.token_lists:
                hidden = self.model(torch.tensor([ids], device=self.device), return_logits=False,
                                    return_hidden=True).hidden[0]
                vectors.append(F.normalize(hidden.float().mean(dim=0), dim=0))
            job.future.set_result(torch.stack(vectors).cpu())
        except Exception as exc:  # noqa: BLE001 — the waiter gets the error
            job.future.set_exception(exc)


def sample_rows(logits: torch.Tensor, options: list[SamplingOptions], outputs: list[list[int]],
                generators: list[torch.Generator | None], tokenizer=None) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of logits (B, V), each row with its own settings.

    Order: logit_bias, presence/frequency penalties on the tokens generated so far (as OpenAI defines them),
    then temperature, top-k, top-p. Log-probabilities are those of the model's own distribution (before any of
    these), as OpenAI reports them. Everything is batched across rows except the draws of rows with their own
    seeded generator; the results cross to the host once."""
    logits = logits.float()
    B, V = logits.shape
    device = logits.device
    logprob_rows = [i for i, o in enumerate(options) if o.logprobs is not None]
    raw = F.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
    bias = [(i, t, v) for i, o in enumerate(options) for t, v in o.logit_bias.items()]
    if bias:
        rows, cols, values = zip(*bias)
        logits = logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                                  torch.tensor(values, device=device), accumulate=True)
    penalised = [i for i, o in enumerate(options) if (o.presence_penalty or o.frequency_penalty) and outputs[i]]
    if penalised:
        rows = torch.tensor([i for i in penalised for _ in outputs[i]], device=device)
        cols = torch.tensor([t for i in penalised for t in outputs[i]], device=device)
        counts = torch.zeros(B, V, device=device).index_put_((rows, cols), torch.ones(len(rows), device=device),
                                                              accumulate=True)
        frequency = torch.tensor([o.frequency_penalty for o in options], device=device).view(-1, 1)
        presence = torch.tensor([o.presence_penalty for o in options], device=device).view(-1, 1)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    tokens = logits.argmax(dim=-1)  # greedy rows keep these
    sampled = [i for i, o in enumerate(options) if o.temperature > 0]
    if sampled:
        rows = logits[sampled] / torch.tensor([options[i].temperature for i in sampled], device=device).view(-1, 1)
        top_k = [options[i].top_k for i in sampled]
        top_p = [options[i].top_p for i in sampled]
        if any(0 < k < V for k in top_k) or any(p < 1 for p in top_p):
            ordered, order = rows.sort(dim=-1, descending=True)
            ranks = torch.arange(V, device=device)
            remove = ranks >= torch.tensor([k if k > 0 else V for k in top_k], device=device).view(-1, 1)
            probs = ordered.softmax(dim=-1)
            p = torch.tensor(top_p, device=device).view(-1, 1)
            remove |= (probs.cumsum(dim=-1) - probs) > p  # keep the smallest prefix whose mass reaches p
            ordered = ordered.masked_fill(remove, -math.inf)
            rows = torch.empty_like(rows).scatter_(1, order, ordered)
        probs = rows.softmax(dim=-1)
        picks = torch.empty(len(sampled), dtype=torch.long, device=device)
        unseeded = [j for j, i in enumerate(sampled) if generators[i] is None]
        if unseeded:
            index = torch.tensor(unseeded, device=device)
            picks[index] = torch.multinomial(probs[index], 1).view(-1)
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                picks[j] = torch.multinomial(probs[j], 1, generator=generators[i])[0]
        tokens = tokens.index_copy(0, torch.tensor(sampled, device=device), picks)
    chosen = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * B
    if logprob_rows:
        width = max(options[i].logprobs for i in logprob_rows)
        picked = raw.gather(1, tokens[logprob_rows].view(-1, 1)).view(-1).tolist()
        top_values, top_ids = (raw.topk(width, dim=-1) if width else (raw[:, :0], raw[:, :0].long()))
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for r, i in enumerate(logprob_rows):
            k = options[i].logprobs
            top = [(tokenizer.decode([t]), v) for t, v in zip(top_ids[r][:k], top_values[r][:k])]
            logprobs[i] = TokenLogprob(tokenizer.decode([chosen[i]]), picked[r], top)
    return chosen, logprobs


def propose_draft(context: list[int], k: int, limit: int, max_ngram: int = 3) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's last n tokens
    (n = max_ngram .. 1): prompt lookup, a draft that costs no model."""
    k = min(k, limit)
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + k]
    return []


def prefill_groups(sequences: list[Sequence], budget: int) -> list[list[Sequence]]:
    """Consecutive groups whose padded size (rows x longest prompt) stays within `budget` tokens."""
    groups: list[list[Sequence]] = []
    current: list[Sequence] = []
    longest = 0
    for sequence in sequences:
        width = max(longest, len(sequence.prompt_ids))
        if current and width * (len(current) + 1) > budget:
            groups.append(current)
            current, width = [], len(sequence.prompt_ids)
        current.append(sequence)
        longest = width
    if current:
        groups.append(current)
    return groups
