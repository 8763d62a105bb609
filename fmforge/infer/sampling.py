"""The one sampler: `SamplingParams` (validated once, built from CLI flags or an OpenAI request) and `sample_rows`,
which picks the next token of every row of a batch with that row's own settings.

Order of the logit processors (vLLM's and OpenAI's): logit_bias, repetition penalty (CTRL, Keskar et al. 2019: on
the prompt and the output), presence/frequency penalties (OpenAI: on the output so far), then temperature, top-k,
top-p (nucleus, Holtzman et al. 2019), min-p (Nguyen et al. 2024). Log-probabilities reported back are those of the
model's own distribution, before any processing, as OpenAI reports them.

Every value `validate` accepts samples; extreme ones act as their limits: a temperature below 1e-5 is greedy (as
vLLM treats it), top-k at or above the vocabulary and top-p 1 are off, and logits pushed past float32's range by a
penalty are clamped to it, so softmax never sees inf - inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import GenerationError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy decoding (vLLM's _SAMPLING_EPS)
MAX_LOGPROBS = 20
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
FINITE = torch.finfo(torch.float32).max
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. Defaults are OpenAI's (temperature 1, no truncation)."""

    max_tokens: int = 16
    temperature: float = 1.0  # < GREEDY_BELOW: greedy
    top_k: int = 0  # 0 = off; keeps every token tied with the k-th (as transformers' TopKLogitsWarper)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output so far
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]
    stop: tuple[str, ...] = ()  # generation ends before any of these strings
    stop_token_ids: tuple[int, ...] = ()  # ... or after any of these tokens (besides the model's own end tokens)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the top k
    guidance: float = 1.0  # classifier-free guidance scale (1 = off); the request gives the unconditional prompt

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise GenerationError naming the first bad field; return self, so that `params.validate()` chains."""
        def number(name: str, value, low: float | None = None, high: float | None = None,
                   low_open: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GenerationError(f"{name} must be a finite number, got {value!r}")
            below = low is not None and (value < low or (low_open and value == low))
            if below or (high is not None and value > high):
                if high is None:
                    bound = f"{'>' if low_open else '>='} {low:g}"
                else:
                    bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
                raise GenerationError(f"{name} must be {bound}, got {value!r}")

        def integer(name: str, value, low: int, high: int | None = None) -> None:
            if isinstance(value, bool) or not isinstance(value, int):
                raise GenerationError(f"{name} must be an integer, got {value!r}")
            if value < low or (high is not None and value > high):
                bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
                raise GenerationError(f"{name} must be {bound}, got {value}")

        integer("max_tokens", self.max_tokens, 1)
        number("temperature", self.temperature, 0.0)
        integer("top_k", self.top_k, 0)
        number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        number("min_p", self.min_p, 0.0, 1.0)
        number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        number("presence_penalty", self.presence_penalty)
        number("frequency_penalty", self.frequency_penalty)
        for token, bias in self.logit_bias.items():
            integer("a logit_bias token id", token, 0, None if vocab_size is None else vocab_size - 1)
            number(f"logit_bias[{token}]", bias, -100.0, 100.0)
        for token in self.stop_token_ids:
            integer("a stop token id", token, 0, None if vocab_size is None else vocab_size - 1)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise GenerationError(f"stop must be a tuple of strings, got {self.stop!r}")
        if self.seed is not None:
            integer("seed", self.seed, *SEED_RANGE)
        if self.logprobs is not None:
            integer("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        number("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        return self

    def generator(self, device, offset: int = 0) -> torch.Generator | None:
        """A generator seeded with seed + offset (n choices of one request differ, reproducibly); None unseeded."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed((self.seed + offset) % 2**64)


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


def plain_greedy(params: SamplingParams) -> bool:
    """Whether this row's token is the argmax of the model's logits plus its logit_bias: greedy, nothing penalised,
    no log-probabilities asked for."""
    return (params.greedy and params.repetition_penalty == 1.0 and not params.presence_penalty
            and not params.frequency_penalty and params.logprobs is None)


def plain_sampled(params: SamplingParams, vocab_size: int) -> bool:
    """Whether this row's token is drawn from softmax((logits + logit_bias) / temperature), untruncated: not
    greedy, nothing penalised, no top-k, top-p or min-p, no log-probabilities asked for."""
    return (not params.greedy and params.repetition_penalty == 1.0 and not params.presence_penalty
            and not params.frequency_penalty and params.logprobs is None
            and not 0 < params.top_k < vocab_size and params.top_p >= 1 and not params.min_p)


def add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits (B, V) with each row's logit_bias added (a new tensor), or logits itself when no row has one."""
    entries = [(i, t, v) for i, p in enumerate(params) for t, v in p.logit_bias.items()]
    if not entries:
        return logits
    rows, cols, values = zip(*entries)
    device = logits.device
    return logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                            torch.tensor(values, device=device, dtype=logits.dtype), accumulate=True)  # (ints too)


def dense_bias(params: list[SamplingParams], vocab_size: int,
               device: torch.device | str = "cpu") -> torch.Tensor | None:
    """The rows' logit_bias as one (B, V) tensor, for row_picks and row_draws; None when no row has any."""
    if not any(p.logit_bias for p in params):
        return None
    return add_logit_bias(torch.zeros(len(params), vocab_size, device=device), params)


def _biased(scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 logits (..., V) plus a bias broadcast over them, clamped as sample_rows clamps (no-op without one)."""
    return scores if bias is None else (scores + bias).clamp(-FINITE, FINITE)


def draw_uniforms(params: list[SamplingParams], generators: list[torch.Generator | None],
                  device: torch.device | str = "cpu") -> list[float | None]:
    """The one uniform number in [0, 1) that each sampled row's draw inverts (None for greedy rows): from the row's
    own generator where it is seeded, else from one draw for all the others, in that order. sample_rows draws these
    itself unless it is handed them (the compiled decode step draws in its graph with them)."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    unseeded = iter(torch.rand(sum(generators[i] is None for i in sampled), device=device,
                               dtype=torch.float64).tolist())
    uniforms: list[float | None] = [None] * len(params)
    for i in sampled:
        uniforms[i] = next(unseeded) if generators[i] is None else \
            torch.rand(1, generator=generators[i], device=device, dtype=torch.float64).item()
    return uniforms


def row_draws(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's token drawn from softmax((logits + bias) / temperature) (B, V) at its uniform (B,): sample_rows'
    arithmetic for a plain_sampled row, for the compiled step to do in its graph (`bias`: dense_bias's)."""
    rows = (_biased(logits.float(), bias) / temperature.view(-1, 1)).clamp(-FINITE, FINITE)
    return inverse_cdf(rows.softmax(dim=-1), uniforms)


def row_picks(logits: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's argmax of logits + bias over the last dimension (`bias`: dense_bias's, broadcast), or -1 where
    the row's logits are not all finite: what sample_rows needs of rows decoded greedily, worked out where the
    logits are made (the compiled step does it in its graph, one pass over the logits, instead of the eight small
    operators after it)."""
    scores = logits.float()
    return torch.where(finite_rows(scores), _biased(scores, bias).argmax(dim=-1), -1)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Whether each row (over the last dimension) is all finite: its max and min are (NaN carries through both),
    two reductions, 5x cheaper than isfinite over every logit at 16 x 4,096."""
    return torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]],
                generators: list[torch.Generator | None], tokenizer=None, prompts: list[list[int]] | None = None,
                picks: list[int] | None = None, uniforms: list[float | None] | None = None,
                draws: list[int] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row of logits (B, V), each row with its own settings.

    `outputs[i]` are row i's generated tokens so far (presence/frequency penalties), `prompts[i]` its prompt (the
    repetition penalty sees both). Everything is batched across rows (a row with its own seeded generator draws its
    one uniform number from it); the results cross to the host once. Raises GenerationError for rows whose logits
    are not finite (a broken model), naming nothing else: the caller fails those sequences alone. `picks`, where
    the caller has them, are row_picks(logits, dense_bias(params)): then the finiteness check is theirs, and a
    batch of plain greedy rows (no span grammar) takes them as its tokens without another operator on the logits.
    `uniforms`, where the caller drew them already (draw_uniforms), are used instead of drawing; `draws`, row_draws
    made with them (and the bias), are the tokens of plain_sampled rows in such a batch.
    """
    B, V = logits.shape
    if picks is None:
        logits = logits.float()
        bad = (~finite_rows(logits)).nonzero().view(-1).tolist()
    else:
        bad = [row for row, pick in enumerate(picks) if pick < 0]
    if bad:
        raise GenerationError(f"the model produced non-finite logits for row(s) {bad}")
    allowed = getattr(tokenizer, "allowed", None)  # a media tokenizer's span grammar (modalities/stream.py)
    if picks is not None and allowed is None:
        if all(plain_greedy(p) or (draws is not None and plain_sampled(p, V)) for p in params):
            return [pick if p.greedy else draw for p, pick, draw in zip(params, picks, draws or picks)], [None] * B
    logits = logits.float()  # (as it is where the check above made it so)
    device = logits.device
    logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw = F.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None

    logits = add_logit_bias(logits, params)
    repeated = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeated:
        seen = torch.zeros(B, V, dtype=torch.bool, device=device)
        for i in repeated:
            tokens = (prompts[i] if prompts else []) + outputs[i]
            if tokens:
                seen[i, torch.tensor(tokens, device=device)] = True
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).view(-1, 1)
        # CTRL: divide positive logits, multiply negative ones, for tokens already present.
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    counted = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and outputs[i]]
    if counted:
        rows = torch.tensor([i for i in counted for _ in outputs[i]], device=device)
        cols = torch.tensor([t for i in counted for t in outputs[i]], device=device)
        counts = torch.zeros(B, V, device=device).index_put_((rows, cols), torch.ones(len(rows), device=device),
                                                              accumulate=True)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device).view(-1, 1)
        presence = torch.tensor([p.presence_penalty for p in params], device=device).view(-1, 1)
        logits = logits - frequency * counts - presence * (counts > 0).float()
    logits = logits.clamp(-FINITE, FINITE)  # a huge penalty must not turn into inf (and softmax into nan)
    if allowed is not None:
        forbidden = torch.ones(B, V, dtype=torch.bool)
        for i in range(B):
            low, high = allowed(prompts[i] if prompts else [], outputs[i])
            forbidden[i, low:high] = False
        logits = logits.masked_fill(forbidden.to(device), -FINITE)

    tokens = logits.argmax(dim=-1)  # greedy rows keep these
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        temperature = torch.tensor([params[i].temperature for i in sampled], device=device).view(-1, 1)
        rows = (logits[sampled] / temperature).clamp(-FINITE, FINITE)
        rows = truncate(rows, [params[i] for i in sampled])
        probs = rows.softmax(dim=-1)
        uniforms = draw_uniforms(params, generators, device) if uniforms is None else uniforms
        drawn = inverse_cdf(probs, torch.tensor([uniforms[i] for i in sampled], device=device, dtype=torch.float64))
        tokens = tokens.index_copy(0, torch.tensor(sampled, device=device), drawn)
    chosen = tokens.tolist()

    logprobs: list[TokenLogprob | None] = [None] * B
    if logprob_rows:
        width = max(params[i].logprobs for i in logprob_rows)
        picked = raw.gather(1, tokens[logprob_rows].view(-1, 1)).view(-1).tolist()
        top_values, top_ids = (raw.topk(width, dim=-1) if width else (raw[:, :0], raw[:, :0].long()))
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for r, i in enumerate(logprob_rows):
            k = params[i].logprobs
            top = [(tokenizer.decode([t]), v) for t, v in zip(top_ids[r][:k], top_values[r][:k])]
            logprobs[i] = TokenLogprob(tokenizer.decode([chosen[i]]), picked[r], top)
    return chosen, logprobs


def guided_logits(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022), as autoregressive image models apply it per token (Chameleon,
    LlamaGen): log p_u + scale x (log p_c - log p_u) over the vocabulary, from the logits of the same position with
    and without the condition. Scale 1 is the conditional distribution itself, 0 the unconditional one, and above
    1 tokens that the condition makes likelier are favoured further."""
    conditional = F.log_softmax(conditional.float(), dim=-1)
    unconditional = F.log_softmax(unconditional.float(), dim=-1)
    return unconditional + scale * (conditional - unconditional)


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (B, V), drawn by inverting the row's cumulative distribution at uniforms (B,)
    in [0, 1): the token whose interval of the cumulative sum holds u x the row's total. A token of probability 0
    has an empty interval, so it is never drawn. One uniform per row instead of torch.multinomial's one exponential
    per token (16 rows of 4,096: 0.18 vs 2.2 ms here); float64 sums, so rounding moves no mass that matters."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    # u x total < total, so that the search lands on a token of positive probability even when u rounds up.
    targets = torch.minimum(uniforms.view(-1, 1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, targets, right=True).view(-1)


def truncate(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """top-k, top-p and min-p on temperature-scaled logits (B, V): dropped tokens get -inf. The most likely token
    always survives, so every row keeps something to sample."""
    V = logits.shape[-1]
    top_k = [p.top_k if 0 < p.top_k < V else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    if not any(top_k) and all(p >= 1 for p in top_p) and not any(min_p):
        return logits
    device = logits.device
    ordered, order = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(ordered, dtype=torch.bool)
    if any(top_k):
        # The k-th largest value of each row; ties with it stay (an order among equals would be arbitrary).
        kth = ordered.gather(1, (torch.tensor([k or V for k in top_k], device=device) - 1).view(-1, 1))
        remove |= ordered < kth
    probs = ordered.softmax(dim=-1)
    if any(p < 1 for p in top_p):
        p = torch.tensor(top_p, device=device).view(-1, 1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        remove |= (before >= p) & (p < 1)  # a token goes once the tokens before it already reach top_p
    if any(min_p):
        remove |= probs < torch.tensor(min_p, device=device).view(-1, 1) * probs[:, :1]
    remove[:, 0] = False
    ordered = ordered.masked_fill(remove, -math.inf)
    return torch.empty_like(logits).scatter_(1, order, ordered)


class TextStream:
    """Turns a stream of token ids into text pieces, holding back bytes that do not yet form a character
    and text that might be the start of a stop string.

    Decoding is incremental (as vLLM's detokenizer does it): each token decodes a short window, the ids since the
    last character boundary plus the span before it as context (a tokenizer may strip a leading space from the first
    token it decodes; the context takes that), so a token costs the same at the 10th position as at the 10,000th.
    The text is the same as decoding every id at once (tests/test_sampling.py checks that on random streams)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[:read] are decoded (ending on a character boundary); ids[prefix:read] are
        # decoded again as the context of the newer ids
        self.held = ""  # decoded text not handed out yet: a tail that could grow into a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show (possibly empty; always without a tokenizer)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return ""
        new = self._pending()
        if new.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        text = self.held + new
        # Text handed out never ends with the start of a stop string, so a match lies wholly in `text`.
        matches = [at for at in (text.find(stop) for stop in self.stop) if at != -1]
        if matches:
            self.stopped, self.held = True, ""
            return text[:min(matches)]
        safe = len(text)
        for stop in self.stop:  # hold back a tail that could still grow into a stop string
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece, self.held = text[:safe], text[safe:]
        return piece

    def _pending(self) -> str:
        """The text of ids[read:], decoded behind the context ids[prefix:read] (may end in an incomplete character)."""
        context = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return self.tokenizer.decode(self.ids[self.prefix:])[len(context):]

    def flush(self) -> str:
        """The rest of the text at the end of generation (nothing after a stop string)."""
        if self.stopped or self.tokenizer is None:
            return ""
        piece, self.held = self.held + self._pending(), ""
        self.prefix, self.read = self.read, len(self.ids)
        return piece
