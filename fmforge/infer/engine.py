"""The generation engine: every token fmforge generates comes from here (the server, `fmforge generate` and
`chat`, completion scoring in `fmforge eval`, lm-eval's generate_until).

It batches many sequences continuously, each with its own `SamplingParams`, seed and adapter. Each step admits
waiting sequences into free slots, prefills prompts (in chunks of at most `prefill_chunk` tokens, one chunk per
step while others decode, so that a long prompt does not stall them: Agrawal et al. 2024, "Sarathi-Serve"; the
last chunk gives the first token), runs ONE decode forward for every sequence whose prompt is in, and samples
each row with its own settings. Sequences leave the batch the moment they finish or are cancelled; new ones join
at the next step (Yu et al. 2022, "Orca": iteration-level scheduling). A sequence running alone drafts tokens by
prompt lookup and verifies them in one forward (speculation), which gives the tokens plain decoding gives (a
sampled one only while its drafts are accepted often enough to pay: DraftControl). A request with an
unconditional prompt and a guidance scale is sampled with classifier-free guidance (`Guide`).

Two ways to drive it:
- a server starts the engine thread (`start`) and `submit`s sequences with a callback per sequence, called on the
  engine thread; embedding jobs run on the same thread between steps, so one thread owns the model;
- a script calls `generate(requests)` without starting the thread: the calling thread runs the steps itself and
  receives (request index, Event) pairs in order. `complete` is the one-shot form.

A failure while serving a sequence (its logits not finite, a forward that raises) ends that sequence, or the
sequences of that forward, with finish_reason "error"; the engine keeps serving the others. Only a failure of
the loop itself stops the engine: `error` is set and every waiter is told.
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..device import release_openmp_threads
from ..errors import GenerationError
from ..modalities.encoders import code_placements, placements
from ..model import LockstepKVCache, Transformer
from .cache import SlotKVCache
from .compiled import CompiledDecoder
from .lora import AdapterSelection, LoadedAdapter, attach_adapters
from .sampling import (SamplingParams, TextStream, TokenLogprob, dense_bias, draw_uniforms, guided_logits,
                       plain_greedy, plain_sampled, sample_rows)

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward, at most (one longer prompt goes alone)


class EngineFull(Exception):
    """The queue is at capacity; the caller should retry later (HTTP 429)."""


class EngineStopped(Exception):
    """The engine is shutting down, or its loop died, and takes no new work (HTTP 503)."""


@dataclass
class Event:
    """What a sequence produced in one step: new text (may be empty while bytes or a possible stop string are
    held back), the token's log-probabilities if asked for, and finish_reason on its last event ("stop",
    "length", or "error" with `error` saying what went wrong)."""
    text: str
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class GenerationRequest:
    """One sequence to generate: prompt ids, sampling, adapter (0 = the base) and the ids that end it (None: the
    tokenizer's eos). `seed_offset` j seeds the generator with seed + j, so n choices differ reproducibly.
    `unconditional_ids`: the prompt without its condition, for classifier-free guidance (params.guidance).
    `media`: the arrays the prompt's media spans encode, for an adapter with understanding encoders."""
    prompt_ids: list[int]
    params: SamplingParams
    adapter: int = 0
    stop_ids: frozenset[int] | None = None
    seed_offset: int = 0
    unconditional_ids: list[int] | None = None
    media: list | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class StepCosts:
    """Seconds of a lone sequence's plain step and of its speculative step (1 + k tokens verified), running means
    measured by the engine as it decodes (forward, sampling and events: the whole step). Their ratio sets what
    drafting must earn: a speculative step pays when it yields more tokens than the plain steps that fit in its
    time, i.e. when more than `break_even` = ratio - 1 drafted tokens are accepted per step. The ratio is ~1.3-1.5
    for the eager forward, where a step's cost is reading the weights whatever the width; the compiled step writes
    one token's products out as a loop that streams the weights and is ~2-3x cheaper than its 5-token step."""
    plain: float | None = None
    speculative: float | None = None

    WEIGHT = 0.2  # of the latest step in each running mean
    # Until both kinds of step have been timed, and the least it ever is: the threshold measured for the eager step
    # (see DraftControl), where a ratio near 1 would be within the noise of the timing.
    DEFAULT_BREAK_EVEN = 0.5

    def record(self, speculative: bool, seconds: float) -> None:
        mean = self.speculative if speculative else self.plain
        mean = seconds if mean is None else mean + self.WEIGHT * (seconds - mean)
        if speculative:
            self.speculative = mean
        else:
            self.plain = mean

    def break_even(self) -> float:
        if not self.plain or self.speculative is None:
            return self.DEFAULT_BREAK_EVEN
        return max(self.speculative / self.plain - 1, self.DEFAULT_BREAK_EVEN)


@dataclass
class DraftControl:
    """Whether a sampled sequence decoding alone drafts tokens. Prompt lookup pays when its drafts are accepted
    often enough to beat the plain steps a speculative step costs (StepCosts.break_even) and costs when they are
    not: sampling at temperature 0.8, say, where a sampled token seldom equals the draft (the quickstart's model,
    compiled: 76 drafted tokens accepted in 300 speculative steps for 200 tokens). A running mean of the tokens
    accepted per speculative step decides: below the break-even the sequence decodes plainly, and drafts again
    after `probe_every` plain steps, so that a stretch the model copies (a repeated name, a quoted line) is found
    again; a probe that finds nothing doubles the interval (up to MAX_PROBE: a probe costs a speculative step), one
    that pays resets it and the mean. The tokens are the same either way.
    Measured (compiled, 1 thread, 200 tokens; always drafting -> this control with a fixed threshold 0.5 and
    probe every 8): sampled at 0.8, 213 -> 248 and 224 -> 244 tokens/s on two prompts; greedy, 503 -> 481 and
    457 -> 372, since a greedy model repeats itself in long stretches that a probe every 8 steps finds late: greedy
    sequences always draft. Once the compiled one-token step became ~3x cheaper than the 5-token one, the fixed
    threshold left sampled speculation ~20% behind none (t=0.8, three prompts, speculation vs none: 289 vs 356,
    316 vs 382, 315 vs 380 tokens/s); with the measured break-even and backed-off probes, 261 vs 263, 251 vs 303,
    366 vs 354 (a noisy machine: level within its spread). Greedy still gains from always drafting there (503 vs 477,
    504 vs 351, 689 vs 298)."""
    accepted: float = 1.0  # running mean of drafted tokens accepted per speculative step (starts hopeful)
    plain_steps: int = 0  # plain steps since the last speculative one
    probe_every: int = 8

    PROBE = 8
    MAX_PROBE = 64
    WEIGHT = 0.3  # of the latest step in the running mean

    def wants_draft(self, break_even: float = StepCosts.DEFAULT_BREAK_EVEN) -> bool:
        return self.accepted >= break_even or self.plain_steps >= self.probe_every

    def speculated(self, accepted: int, break_even: float = StepCosts.DEFAULT_BREAK_EVEN) -> None:
        probing = self.plain_steps >= self.probe_every  # drafted as a probe, not because drafting paid
        self.accepted += self.WEIGHT * (accepted - self.accepted)
        if probing:
            if accepted >= break_even:  # a stretch the model copies: draft from here on
                self.accepted, self.probe_every = float(accepted), self.PROBE
            else:
                self.probe_every = min(2 * self.probe_every, self.MAX_PROBE)
        self.plain_steps = 0

    def plain(self) -> None:
        self.plain_steps += 1


@dataclass(eq=False)
class Guide:
    """The unconditional side of a sequence sampled with classifier-free guidance: its prompt without the
    condition (e.g. the draw task's chat turn with the text left out), run in a one-row cache of its own and fed
    every token the guided sequence samples, so that each of its steps has logits with and without the condition
    for the same position (sampling.guided_logits). It costs one more forward per token, batch 1."""
    prompt_ids: list[int]
    cache: LockstepKVCache | None = None  # made at the guided sequence's first token
    fed: int = 0  # the guided sequence's output tokens that the cache holds


@dataclass(eq=False)  # identity: the engine finds a sequence among the running ones by `is`, not by its fields
class Sequence:
    prompt_ids: list[int]
    adapter: int
    params: SamplingParams
    on_event: Callable[[Event], None]
    stop_ids: frozenset[int]
    stream: TextStream
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens in the KV cache; the sequence decodes once its whole prompt is there
    cancelled: bool = False
    finished: bool = False
    failed: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    drafts: DraftControl = field(default_factory=DraftControl)
    guide: Guide | None = None  # classifier-free guidance (params.guidance != 1)
    media: list = field(default_factory=list)  # MediaPlacement of the prompt's media its adapter's encoders read
    media_features: list | None = None  # (prompt position, (L, n_embd) features to add there), at first prefill

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the slot at its next step."""
        self.cancelled = True


@dataclass
class _EmbedJob:
    token_lists: list[list[int]]
    adapter: int
    future: Future


class Generation:
    """The events of a batch of requests, as (request index, Event) in the order they happen; `cancel(i)` stops
    request i. Driven by the engine thread when it runs, else by the thread that iterates."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]):
        self.engine = engine
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._remaining = len(requests)
        self.sequences: list[Sequence] = []
        try:
            for index, request in enumerate(requests):
                self.sequences.append(engine.submit(
                    request.prompt_ids, request.params, lambda event, i=index: self._events.put((i, event)),
                    request.adapter, request.stop_ids, request.seed_offset, bounded=engine.running_thread,
                    unconditional_ids=request.unconditional_ids, media=request.media))
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[tuple[int, Event]]:
        try:
            while self._remaining:
                if not self.engine.running_thread:
                    while self._events.empty():
                        if not self.engine.step():
                            raise GenerationError("the engine has no work left but requests are unfinished")
                index, event = self._events.get()
                if self.sequences[index].cancelled:
                    continue
                if event.finish_reason is not None:
                    self._remaining -= 1
                yield index, event
        finally:
            self.close()

    def cancel(self, index: int) -> None:
        """Stop request `index`; no further events of it are yielded."""
        if not self.sequences[index].finished and not self.sequences[index].cancelled:
            self.sequences[index].cancel()
            self._remaining -= 1

    def close(self) -> None:
        for index in range(len(self.sequences)):
            self.cancel(index)
        if not self.engine.running_thread:
            self.engine.step(admit=False)  # free the slots of what was cancelled


class Engine:
    def __init__(self, model: Transformer, tokenizer, adapters: list[LoadedAdapter] | None = None, *,
                 max_batch: int = 16, max_queue: int = 64, max_context: int | None = None, speculate: int = 4,
                 prefill_chunk: int | None = None, compile: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = list(adapters or [])
        self.selection: AdapterSelection = attach_adapters(model, self.adapters) if self.adapters else AdapterSelection()
        param = model.embed_tokens.weight
        self.device, self.dtype = param.device, param.dtype
        # Understanding encoders per adapter index (0: the model's own, a full fine-tune's; adapt/media.py).
        self.encoders = [{name: encoder.to(self.device).eval() for name, encoder in encoders.items()} for encoders in
                         [getattr(model, "media_encoders", {})] + [adapter.encoders for adapter in self.adapters]]
        self.max_context = min(max_context or model.config.context_length, model.config.context_length)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.speculate = speculate  # drafted tokens per step when one sequence runs alone (0 = off)
        # Prompt tokens per prefill forward (0 = whole prompts; None = default_prefill_chunk of the device).
        self.prefill_chunk = default_prefill_chunk(self.device) if prefill_chunk is None else prefill_chunk
        # A sliding-window model's cache keeps window + speculate positions per slot (see SlotKVCache).
        self.cache = SlotKVCache(model.config, max_batch, self.max_context, self.device, self.dtype, speculate)
        # compile: decode steps (not prefill) go through compiled static-shape steps (infer/compiled.py).
        self.compiled: CompiledDecoder | None = None
        if compile:
            reason = CompiledDecoder.unsupported(model, self.cache, self.adapters)
            if reason:
                print(f"fmforge: decoding eagerly, not compiled: {reason}", file=sys.stderr, flush=True)
            else:
                self.compiled = CompiledDecoder(model, self.cache, speculate)
                with torch.no_grad():
                    self.compiled.warm_up()
        self._waiting: list[Sequence] = []
        # Sequence i lives in cache slot i: first those that decode, then those whose prompt is still being
        # prefilled, in the order they came.
        self._running: list[Sequence] = []
        self._jobs: list[_EmbedJob] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Counters read by /metrics (written on the engine thread only).
        self.steps = 0
        self.step_costs = StepCosts()  # a lone sequence's plain and speculative steps, timed (drafting decides)
        self._bias_rows: list[Sequence] = []  # the sequences whose logit biases _bias holds, row by row
        self._bias: torch.Tensor | None = None
        self.speculative_steps = 0
        self.accepted_draft_tokens = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.failed_sequences = 0
        self.on_first_token: Callable[[float], None] | None = None  # seconds from submit to first token

    # ---- the synchronous API ------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest]) -> Generation:
        """The events of `requests`, batched together; see Generation."""
        return Generation(self, requests)

    def complete(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Generate every request to its end; the texts, tokens and finish reasons, in request order."""
        texts = [[] for _ in requests]
        ids = [[] for _ in requests]
        finish = [""] * len(requests)
        for index, event in self.generate(requests):
            texts[index].append(event.text)
            if event.token_id is not None:
                ids[index].append(event.token_id)
            if event.finish_reason == "error":
                raise GenerationError(event.error or "generation failed")
            finish[index] = event.finish_reason or finish[index]
        return [Completion("".join(t), i, f) for t, i, f in zip(texts, ids, finish)]

    def stream_text(self, request: GenerationRequest) -> Iterator[str]:
        """The text of one request, piece by piece as it becomes final."""
        for _, event in self.generate([request]):
            if event.finish_reason == "error":
                raise GenerationError(event.error or "generation failed")
            if event.text:
                yield event.text

    # ---- called from other threads ------------------------------------------------------------------------

    @property
    def running_thread(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Run the loop in a thread of its own. The calling thread hands its torch work over: its OpenMP workers
        go (device.release_openmp_threads), so that the engine's are the only ones on the CPUs."""
        release_openmp_threads()
        self._thread = threading.Thread(target=self._loop, name="fmforge-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish running and waiting sequences, then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        """False once the loop has died (or a started thread has ended)."""
        return self.error is None and (self._thread is None or self._thread.is_alive() or self._stopping)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[Event], None],
               adapter: int = 0, stop_ids: frozenset[int] | None = None, seed_offset: int = 0,
               bounded: bool = True, unconditional_ids: list[int] | None = None, media: list | None = None) -> Sequence:
        """Queue a sequence; raises EngineFull when `bounded` and max_queue sequences already wait. With
        params.guidance other than 1, `unconditional_ids` (the prompt without its condition) are required.
        `media`: the arrays of the prompt's spans; an adapter with understanding encoders adds their features to
        the spans' code embeddings (computed on the engine thread, at the sequence's first prefill: torch work on
        another thread would start a second OpenMP pool, device.release_openmp_threads)."""
        if not prompt_ids:
            raise GenerationError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= self.max_context:
            raise GenerationError(f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.max_context}; "
                                  "shorten the prompt")
        guide = None
        if params.guidance != 1.0:
            if not unconditional_ids:
                raise GenerationError("guidance needs the prompt without its condition (unconditional_ids); this "
                                      "request has none")
            if len(unconditional_ids) > len(prompt_ids):
                raise GenerationError(f"the unconditional prompt ({len(unconditional_ids)} tokens) is longer than "
                                      f"the prompt ({len(prompt_ids)}); it should be the prompt less its condition")
            guide = Guide(list(unconditional_ids))
        if stop_ids is None:
            stop_ids = frozenset() if self.tokenizer is None else frozenset({self.tokenizer.eos_id})
        stops = frozenset(stop_ids) | set(params.stop_token_ids)  # any iterable of ids (a list too)
        sequence = Sequence(list(prompt_ids), adapter, params, on_event, stops,
                            TextStream(self.tokenizer, params.stop), params.generator(self.device, seed_offset),
                            guide=guide, media=self._media_placements(prompt_ids, adapter, media))
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineStopped("the server is shutting down" if self.error is None else
                                    f"the engine stopped: {self.error!r}")
            if bounded and len(self._waiting) >= self.max_queue:
                raise EngineFull(f"the server is at capacity ({self.max_batch} running, {len(self._waiting)} "
                                 "waiting); retry later")
            self._waiting.append(sequence)
            self._cond.notify()
        return sequence

    def _media_placements(self, prompt_ids: list[int], adapter: int, media: list | None) -> list:
        """Where the prompt's media that the adapter's encoders read lie (modalities/encoders.placements)."""
        encoders = self.encoders[adapter] if 0 <= adapter < len(self.encoders) else {}
        if not encoders or self.tokenizer is None:
            return []
        found = []
        if any(getattr(encoder, "reads_codes", False) for encoder in encoders.values()):  # a base's reader
            found = code_placements(self.tokenizer, prompt_ids)[0]  # every image span of the prompt, from its ids
        if media:
            found += [item for item in placements(self.tokenizer, prompt_ids, media)
                      if item.modality in encoders and not getattr(encoders[item.modality], "reads_codes", False)]
        return found

    def _features(self, sequence: Sequence) -> list:
        """(position, (L, n_embd) features) of the sequence's media, encoded once (engine thread)."""
        if sequence.media_features is None:
            encoders = self.encoders[sequence.adapter]
            sequence.media_features = [(item.position, encoders[item.modality].encode_media([item.media])[0]
                                        .to(self.dtype)) for item in sequence.media]
        return sequence.media_features

    def _embeddings(self, sequences: list[Sequence], ids: torch.Tensor, rows: list[int], columns: list[int],
                    widths: list[int]) -> torch.Tensor | None:
        """Input embeddings of a forward's ids with the sequences' media features added (None when no sequence
        has any in its piece): sequence k's next piece of widths[k] prompt tokens (from s.prefilled) lies in row
        rows[k] from column columns[k]. The adapters must already be selected (an adapted embedding reads them)."""
        if not any(s.media for s in sequences):
            return None
        x = self.model.embed(ids)
        for sequence, row, column, width in zip(sequences, rows, columns, widths):
            start = sequence.prefilled
            for position, features in self._features(sequence) if sequence.media else ():
                lo, hi = max(position, start), min(position + len(features), start + width)
                if lo < hi:
                    x[row, column + lo - start:column + hi - start] += features[lo - position:hi - position]
        return x

    def embed(self, token_lists: list[list[int]], adapter: int = 0) -> Future:
        """Future of a (len(token_lists), n_embd) float32 tensor: mean-pooled final hidden states, unit length."""
        job = _EmbedJob(token_lists, adapter, Future())
        with self._cond:
            if self._stopping or self.error is not None:
                raise EngineStopped("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()
        if not self.running_thread:
            self.step()
        return job.future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the loop ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        self._serve()

    def _attention_backends(self):
        """On CUDA, attention without cuDNN: cuDNN builds a plan per shape, which costs more than a decode step;
        the other backends take the masks the slot cache makes without that. Nothing to choose on the CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _serve(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._waiting or self._running or self._jobs or self._stopping):
                        self._cond.wait()
                    if self._stopping and not (self._waiting or self._running or self._jobs):
                        return
                self.step()
        except BaseException as exc:  # noqa: BLE001 — report to every waiter rather than hang them
            self.error = exc
            with self._cond:
                pending, self._waiting = self._running + self._waiting, []
                self._running = []
                jobs, self._jobs = self._jobs, []
            for sequence in pending:
                self._emit(sequence, Event("", finish_reason="error", error=f"the engine stopped: {exc!r}"))
            for job in jobs:
                job.future.set_exception(exc)
            raise

    @torch.no_grad()
    def step(self, admit: bool = True) -> bool:
        """One turn: run embedding jobs, prefill admitted sequences, one decode step for the running ones
        (`admit=False`: only free the slots of finished and cancelled sequences). False when there was no work."""
        with self._cond:
            jobs, self._jobs = self._jobs, []
            self._waiting = [s for s in self._waiting if not s.cancelled]
            if not (jobs or self._waiting or self._running):
                return False
            admitted = []
            if admit:
                free = self.max_batch - len(self._running)
                admitted, self._waiting = self._waiting[:free], self._waiting[free:]
        with self._attention_backends():
            self._run(jobs, admitted, admit)
        return True

    def _run(self, jobs: list[_EmbedJob], admitted: list[Sequence], decode: bool) -> None:
        for job in jobs:
            self._run_embed(job)
        for sequence in admitted:
            self.cache.clear(len(self._running))
            self._running.append(sequence)
        if decode:
            self._forwards()
        self._retire()

    def _decoding(self) -> list[Sequence]:
        """The sequences whose prompt is in the cache: slots 0 .. n-1."""
        count = 0
        while count < len(self._running) and self._running[count].prefilled == len(self._running[count].prompt_ids):
            count += 1
        return self._running[:count]

    def _forwards(self) -> None:
        """This step's forwards. Nobody decoding, nobody waits: the prompts go in whole (forwards of at most
        PREFILL_TOKENS padded tokens), then the first decode step. While some sequence decodes, at most
        prefill_chunk prompt tokens per step, so that its next token waits for one chunk, not for a whole long
        prompt: the chunk rides in the decode forward (one row holding both, `_decode_with_chunk`), or runs just
        before it where they cannot share one (rows on different adapters, or a lone sequence speculating).
        Unchunked (prefill_chunk 0), whole prompts go before the decode step."""
        decoding = self._decoding()
        chunk = self.prefill_chunk if decoding else 0
        group = self._next_prefill(chunk)
        if chunk and group and not self._draft(decoding) and len({s.adapter for s in decoding + group}) == 1:
            self._guarded(lambda sequences: self._decode_with_chunk(decoding, group, chunk), decoding + group)
            return
        while group:
            self._guarded(lambda group: self._prefill(group, chunk), group)
            group = [] if chunk else self._next_prefill(chunk)
        self._retire()
        decoding = self._decoding()
        if decoding:
            self._guarded(self._decode, decoding)

    def _next_prefill(self, chunk: int) -> list[Sequence]:
        """The sequences (consecutive slots) whose prompts the next prefill forward continues; [] if none."""
        pending = [s for s in self._running if s.prefilled < len(s.prompt_ids) and not s.finished]
        if not pending:
            return []
        group = prefill_groups(pending, chunk or PREFILL_TOKENS, lambda s: self._piece(s, chunk))[0]
        # Rows are right-padded to the widest piece: a row already part-way through its prompt must still have room
        # for the padded width in the cache, so the group ends before a row that would not.
        width = 0
        for size, sequence in enumerate(group):
            width = max(width, self._piece(sequence, chunk))
            if max(s.prefilled for s in group[:size + 1]) + width > self.max_context:
                return group[:max(size, 1)]
        return group

    @staticmethod
    def _piece(sequence: Sequence, chunk: int) -> int:
        """Prompt tokens of `sequence` that its next prefill forward takes (chunk 0: the rest of the prompt)."""
        left = len(sequence.prompt_ids) - sequence.prefilled
        return min(left, chunk) if chunk else left

    def _guarded(self, work: Callable[[list[Sequence]], None], sequences: list[Sequence]) -> None:
        """Run one forward's work; if it raises, those sequences fail and the engine goes on."""
        try:
            work(sequences)
        except Exception as exc:  # noqa: BLE001 — one batch's failure must not stop the others
            for sequence in sequences:
                self._fail(sequence, exc)

    def _fail(self, sequence: Sequence, exc: BaseException) -> None:
        if sequence.finished:
            return
        sequence.finished = sequence.failed = True
        self.failed_sequences += 1
        self._emit(sequence, Event("", finish_reason="error", completion_tokens=len(sequence.output_ids),
                                   error=f"{type(exc).__name__}: {exc}"))

    def _emit(self, sequence: Sequence, event: Event) -> None:
        try:
            sequence.on_event(event)
        except Exception:  # noqa: BLE001 — a receiver that is gone cancels its sequence, nothing more
            sequence.cancel()

    def _select(self, adapters: list[int]) -> None:
        self.selection.ids = (torch.tensor(adapters, device=self.device) if any(adapters) else None)

    def _prefill(self, sequences: list[Sequence], chunk: int) -> None:
        """The next piece of each prompt (sequences in consecutive slots) in one forward, right-padded to the
        longest; a row whose prompt is now whole samples its first token. The cache advances each row by its real
        tokens only: keys that padding wrote lie past the row's length, where the mask (keys up to the query's
        position) hides them until decoding overwrites them."""
        first = self._running.index(sequences[0])
        pieces = [s.prompt_ids[s.prefilled:s.prefilled + self._piece(s, chunk)] for s in sequences]
        widths = [len(piece) for piece in pieces]
        ids = torch.zeros(len(sequences), max(widths), dtype=torch.long)
        for row, piece in enumerate(pieces):
            ids[row, :widths[row]] = torch.tensor(piece)
        self.cache.bind(first, len(sequences), widths)
        self._select([s.adapter for s in sequences])
        ids = ids.to(self.device)
        x = self._embeddings(sequences, ids, list(range(len(sequences))), [0] * len(sequences), widths)
        hidden = self.model(ids if x is None else None, inputs_embeds=x, kv_cache=self.cache, return_logits=False,
                            return_hidden=True).hidden
        for sequence, width in zip(sequences, widths):
            sequence.prefilled += width
        self.prompt_tokens += sum(widths)
        done = [row for row, s in enumerate(sequences) if s.prefilled == len(s.prompt_ids)]
        if done:
            last = torch.tensor([widths[row] - 1 for row in done], device=self.device)
            logits = self.model.lm_head(hidden[torch.tensor(done, device=self.device), last])
            self._accept(logits, [sequences[row] for row in done])

    def _decode_with_chunk(self, decoding: list[Sequence], group: list[Sequence], chunk: int) -> None:
        """One forward for a decode step of `decoding` and the next prompt chunk of `group` (all on one adapter):
        their tokens side by side in one row, each sequence attending over its own keys (SlotKVCache.bind_packed).
        A forward costs little more for a few more tokens, so the decoding sequences hardly wait (Agrawal et al.
        2024, Sarathi-Serve's hybrid batches); the tokens are those of separate forwards."""
        pieces = [s.prompt_ids[s.prefilled:s.prefilled + self._piece(s, chunk)] for s in group]
        widths = [len(piece) for piece in pieces]
        width = max(widths)
        ids = [s.output_ids[-1] for s in decoding]
        for piece in pieces:
            ids += piece + [0] * (width - len(piece))
        first = self._running.index(group[0])
        self.cache.bind_packed([(0, len(decoding), 1, None), (first, len(group), width, widths)])
        self._select([decoding[0].adapter])  # one row
        ids = torch.tensor([ids], device=self.device)
        x = self._embeddings(group, ids, [0] * len(group), [len(decoding) + row * width for row in range(len(group))],
                             widths)
        hidden = self.model(ids if x is None else None, inputs_embeds=x, kv_cache=self.cache, return_logits=False,
                            return_hidden=True).hidden[0]  # (N, n_embd)
        self.steps += 1
        for sequence, piece_width in zip(group, widths):
            sequence.prefilled += piece_width
        self.prompt_tokens += sum(widths)
        done = [row for row, s in enumerate(group) if s.prefilled == len(s.prompt_ids)]
        rows = list(range(len(decoding))) + [len(decoding) + row * width + widths[row] - 1 for row in done]
        logits = self.model.lm_head(hidden[torch.tensor(rows, device=self.device)])
        self._accept(logits[:len(decoding)], decoding)
        if done:
            self._accept(logits[len(decoding):], [group[row] for row in done])

    def _draft(self, running: list[Sequence]) -> list[int]:
        """Tokens to verify in the next decode forward: a prompt-lookup draft for a sequence decoding alone while
        nobody waits, while its drafts pay (DraftControl); [] otherwise."""
        if len(running) != 1 or not self.speculate or self._waiting or running[0].guide is not None:
            return []
        if not running[0].params.greedy and not running[0].drafts.wants_draft(self.step_costs.break_even()):
            return []
        return propose_draft(running[0].prompt_ids + running[0].output_ids, self.speculate, self._room(running[0]) - 1)

    def _decode(self, running: list[Sequence]) -> None:
        draft = self._draft(running)
        started = time.perf_counter()
        if draft:
            self._decode_speculative(running[0], draft)
            self.step_costs.record(True, time.perf_counter() - started)
            return
        self._decode_plain(running)
        if len(running) == 1:
            running[0].drafts.plain()
            if running[0].guide is None:  # a guided step runs a second forward: not the plain step drafting beats
                self.step_costs.record(False, time.perf_counter() - started)

    def _decode_plain(self, running: list[Sequence]) -> None:
        uniforms = self._uniforms(running)
        temperatures = [1.0 if u is None else s.params.temperature for s, u in zip(running, uniforms or [])]
        step = self._compiled_decode([s.output_ids[-1] for s in running], running, temperatures=temperatures or None,
                                     uniforms=None if uniforms is None else [u or 0.0 for u in uniforms])
        picks = draws = None
        if step is None:
            self.cache.bind(0, len(running))
            self._select([s.adapter for s in running])
            last = torch.tensor([[s.output_ids[-1]] for s in running], device=self.device)
            logits = self.model(last, kv_cache=self.cache).logits[:, -1]
        else:
            logits, picks, draws = step
            draws = None if uniforms is None else draws  # drawn at the defaults: not these rows' tokens
        self.steps += 1
        self._accept(logits, running, picks, uniforms, draws)

    def _uniforms(self, running: list[Sequence]) -> list[float | None] | None:
        """Where the compiled step can draw this step's tokens in its graph (every row plain: greedy, or sampled
        at a temperature, with or without a logit bias; nothing guided, no span grammar) and some row samples:
        their uniforms, drawn now (sampling.draw_uniforms: the numbers sample_rows would draw). None otherwise:
        sample_rows draws."""
        if self.compiled is None or getattr(self.tokenizer, "allowed", None) is not None:
            return None
        vocab = self.model.config.vocab_size
        if any(s.guide is not None or not (plain_greedy(s.params) or plain_sampled(s.params, vocab)) for s in running):
            return None
        if all(s.params.greedy for s in running):
            return None
        return draw_uniforms([s.params for s in running], [s.generator for s in running], self.device)

    def _compiled_decode(self, tokens: list[int], running: list[Sequence], speculative: bool = False,
                         temperatures: list[float] | None = None, uniforms: list[float] | None = None):
        """The compiled step (compiled.Step: logits (len(tokens), V), picks and draws at `temperatures` and
        `uniforms`, both with the `running` sequences' logit biases): one token for each of the sequences in slots
        0 .. n-1, or (`speculative`) all of them for the sequence alone in slot 0; the lengths of those slots
        advanced by one (a speculative step then sets slot 0's). None where the compiled step does not apply."""
        if self.compiled is None:
            return None
        bias = self._dense_bias(running)
        if speculative or len(tokens) == 1:
            step = self.compiled.decode(tokens, *([temperatures[0], uniforms[0]] if uniforms else [1.0, 0.0]), bias)
            rows = 1
        else:
            step = self.compiled.decode_batch(tokens, temperatures, uniforms, bias)
            rows = len(tokens)
        if step is not None:
            for slot in range(rows):
                self.cache.lengths[slot] += 1
        return step

    def _dense_bias(self, running: list[Sequence]) -> torch.Tensor | None:
        """sampling.dense_bias of the running sequences' settings, made again only when they change (a sequence
        joins or leaves): the same rows decode step after step."""
        same = len(running) == len(self._bias_rows) and all(a is b for a, b in zip(running, self._bias_rows))
        if not same:  # (the rows are held, so no other sequence can take one's identity)
            self._bias_rows = list(running)
            self._bias = dense_bias([s.params for s in running], self.model.config.vocab_size, self.device)
        return self._bias

    def _room(self, sequence: Sequence) -> int:
        """Tokens this sequence may still generate (its max_tokens and the context both bound it)."""
        used = len(sequence.prompt_ids) + len(sequence.output_ids)
        return min(sequence.params.max_tokens - len(sequence.output_ids), self.max_context - used)

    def _decode_speculative(self, sequence: Sequence, draft: list[int]) -> None:
        """Prompt-lookup speculative decoding for a lone sequence (Saxena 2023; Leviathan et al. 2023).

        One forward feeds the last token plus k drafted tokens, which costs about what one token costs when
        decoding is bound by reading the weights (batch 1). Position j's logits are sampled exactly as a plain
        step would sample them (same settings, same random draw); while the sampled token equals draft[j] the
        next position is valid too, so up to k + 1 tokens come out of one forward, and the output is the one
        plain decoding gives (greedy: identical; sampling: the same distribution and the same seeded draws).
        """
        start = self.cache.lengths[0]
        step = self._compiled_decode([sequence.output_ids[-1], *draft], [sequence], speculative=True)
        logits, picks = (None, None) if step is None else step[:2]
        if logits is None:
            self.cache.bind(0, 1)
            self._select([sequence.adapter])
            ids = torch.tensor([[sequence.output_ids[-1], *draft]], device=self.device)
            logits = self.model(ids, kv_cache=self.cache).logits[0]  # (1 + k, V)
        self.steps += 1
        self.speculative_steps += 1
        accepted = 0
        for j in range(len(draft) + 1):
            self._accept(logits[j:j + 1], [sequence], None if picks is None else picks[j:j + 1])
            if sequence.finished or sequence.cancelled or j == len(draft) or sequence.output_ids[-1] != draft[j]:
                break
            accepted += 1
        self.accepted_draft_tokens += accepted
        sequence.drafts.speculated(accepted, self.step_costs.break_even())
        # The cache now holds the last token and the accepted drafts; later positions are overwritten next step.
        self.cache.lengths[0] = start + 1 + accepted

    def _sample(self, logits: torch.Tensor, sequences: list[Sequence], picks: list[int] | None = None,
                uniforms: list[float | None] | None = None, draws: list[int] | None = None):
        """sample_rows over the batch (`picks`, `uniforms`, `draws`: what the compiled step and _uniforms made for
        these logits); if it fails, row by row, so that only the rows at fault fail."""
        guided = self._guided(logits, sequences)
        picks = picks if guided is logits else None  # not the picks of the guided logits
        logits = guided

        def rows(logits, sequences, *made):
            return sample_rows(logits, [s.params for s in sequences], [s.output_ids for s in sequences],
                               [s.generator for s in sequences], self.tokenizer, [s.prompt_ids for s in sequences],
                               *made)
        try:
            return rows(logits, sequences, picks, uniforms, draws)
        except Exception:  # noqa: BLE001 — find the rows at fault
            if len(sequences) == 1:
                raise
        tokens, logprobs = [], []
        for row, sequence in enumerate(sequences):
            try:
                made = [None if m is None else m[row:row + 1] for m in (picks, uniforms, draws)]
                token, logprob = rows(logits[row:row + 1], [sequence], *made)
            except Exception as exc:  # noqa: BLE001
                self._fail(sequence, exc)
                token, logprob = [None], [None]
            tokens += token
            logprobs += logprob
        return tokens, logprobs

    def _guided(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """`logits` with the rows of guided sequences replaced by their guided logits; each one's unconditional
        forward runs here (its whole prompt at the first token, then the token sampled last)."""
        rows = [row for row, s in enumerate(sequences) if s.guide is not None and not (s.finished or s.cancelled)]
        if not rows:
            return logits
        logits = logits.float().clone()
        selected = self.selection.ids
        for row in rows:
            sequence, guide = sequences[row], sequences[row].guide
            if guide.cache is None:
                guide.cache = self.model.new_kv_cache(1, self.max_context)
                ids = guide.prompt_ids + sequence.output_ids
            else:
                ids = sequence.output_ids[guide.fed:]
            self._select([sequence.adapter])
            try:
                unconditional = self.model(torch.tensor([ids], device=self.device), kv_cache=guide.cache).logits
            except Exception as exc:  # noqa: BLE001 — this sequence fails, the others of the forward go on
                self._fail(sequence, exc)
                continue
            guide.fed = len(sequence.output_ids)
            logits[row] = guided_logits(logits[row], unconditional[0, -1], sequence.params.guidance)
        self.selection.ids = selected
        return logits

    def _accept(self, logits: torch.Tensor, sequences: list[Sequence], picks: list[int] | None = None,
                uniforms: list[float | None] | None = None, draws: list[int] | None = None) -> None:
        """Sample one token per row (given, for a compiled step: its picks and draws, and the uniforms drawn for it)
        and hand each sequence its event."""
        tokens, logprobs = self._sample(logits, sequences, picks, uniforms, draws)
        now = time.perf_counter()
        for sequence, token, logprob in zip(sequences, tokens, logprobs):
            if sequence.cancelled or sequence.finished or token is None:
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
            self._emit(sequence, Event(text, token, logprob, finish, len(sequence.output_ids)))

    def _retire(self) -> None:
        """Drop finished and cancelled sequences: the last decoding one moves into each slot freed among the
        decoding ones, and those still prefilling close up behind them in their order."""
        for slot, sequence in enumerate(self._running):
            if sequence.failed:  # before any move copies its keys and values elsewhere
                self._scrub(slot)
        decoding = len(self._decoding())
        sequences, sources = self._running[:decoding], list(range(decoding))
        slot = 0
        while slot < len(sequences):
            if sequences[slot].finished or sequences[slot].cancelled:
                sequences[slot], sources[slot] = sequences[-1], sources[-1]
                sequences.pop()
                sources.pop()
            else:
                slot += 1
        for source in range(decoding, len(self._running)):
            if not (self._running[source].finished or self._running[source].cancelled):
                sequences.append(self._running[source])
                sources.append(source)
        # Ascending targets, each at or below its source and never the slot of a sequence still to move.
        for target, source in enumerate(sources):
            if source != target:
                self.cache.move(source, target)
        for slot in range(len(sequences), len(self._running)):
            self.cache.clear(slot)
        self._running = sequences

    def _scrub(self, slot: int) -> None:
        """Zero a failed sequence's keys and values: they may be non-finite, and a later sequence in this slot
        attends over positions past its own length too (masked to weight 0, but 0 x NaN is NaN)."""
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys[slot].zero_()
            values[slot].zero_()

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


def default_prefill_chunk(device: torch.device) -> int:
    """Prompt tokens per prefill chunk unless told: 32 on a CPU, where 8 streams' decode forward carrying a 32-token
    chunk keeps their step p99 within 1.2-1.6x of what it is without a long prompt (64: 1.4-1.8x; 128: 2.1-2.5x;
    unchunked, a 512-token prompt: 7-9.5x; benchmarks/prefill_stall.md, the quickstart's model); 512 on a GPU, where
    a forward stays bound by reading the weights up to hundreds of tokens (Sarathi-Serve's budget for strict
    latency)."""
    return 32 if device.type == "cpu" else 512


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


def prefill_groups(sequences: list[Sequence], budget: int,
                   size: Callable[[Sequence], int] = lambda s: len(s.prompt_ids)) -> list[list[Sequence]]:
    """Consecutive groups whose padded size (rows x the longest `size`, by default the prompt) stays within
    `budget` tokens."""
    groups: list[list[Sequence]] = []
    current: list[Sequence] = []
    longest = 0
    for sequence in sequences:
        width = max(longest, size(sequence))
        if current and width * (len(current) + 1) > budget:
            groups.append(current)
            current, width = [], size(sequence)
        current.append(sequence)
        longest = width
    if current:
        groups.append(current)
    return groups


def generate_once(model: Transformer, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                  stop_ids: frozenset[int] | None = None, speculate: int = 4) -> Completion:
    """One prompt, generated to its end on a one-slot engine: the one-shot form for scripts and tests. Without a
    tokenizer, only token ids come back (no stop strings, no eos unless `stop_ids` names it)."""
    engine = Engine(model, tokenizer, max_batch=1, speculate=speculate)
    return engine.complete([GenerationRequest(prompt_ids, params, stop_ids=stop_ids)])[0]
