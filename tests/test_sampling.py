"""The one sampler, independent of any trained model: what each setting keeps, and that every value the validator
accepts samples (property-based, over the whole parameter space), with extreme values acting as their limits."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import report
from fmforge.errors import GenerationError
from fmforge.infer.sampling import (SamplingParams, TextStream, dense_bias, draw_uniforms, inverse_cdf,
                                    row_draws, row_picks, sample_rows, truncate)


def kept(logits, **settings_) -> list[bool]:
    return truncate(logits, [SamplingParams(**settings_)]).isfinite()[0].tolist()


def test_top_k_top_p_and_min_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.10]]))
    assert kept(logits, top_k=2) == [True, True, False, False]
    assert kept(logits, top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.75 >= 0.7
    assert kept(logits, top_p=0.75) == [True, True, False, False]  # the smallest set whose mass reaches p
    assert kept(logits, top_p=0.4) == [True, False, False, False]  # the top token always stays
    assert kept(logits, min_p=0.4) == [True, True, False, False]  # 0.15 < 0.4 x 0.5
    assert kept(logits, top_k=10, top_p=1.0) == [True] * 4  # limits that are off


def test_top_k_keeps_ties_with_the_kth_token():
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0]])
    assert kept(logits, top_k=2) == [True, True, True, False]


def test_repetition_penalty_lowers_seen_tokens_both_signs_prompt_included():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=4.0)
    # token 0 in the prompt, token 1 generated: 2/4 = 0.5 and -2*4 = -8 leave token 2 (1.0) on top
    tokens, _ = sample_rows(logits, [params], [[1]], [None], prompts=[[0]])
    assert tokens == [2]
    tokens, _ = sample_rows(logits, [SamplingParams(temperature=0)], [[1]], [None], prompts=[[0]])
    assert tokens == [0]


def test_tiny_temperature_is_greedy_and_does_not_overflow():
    logits = torch.tensor([[30.0, 29.0, -5.0]])
    for temperature in (1e-9, 1e-6, 9.9e-6):
        tokens, _ = sample_rows(logits, [SamplingParams(temperature=temperature)], [[]], [None])
        assert tokens == [0]
    tokens, _ = sample_rows(logits, [SamplingParams(temperature=1e-5, seed=1)], [[]],
                            [SamplingParams(seed=1).generator("cpu")])
    assert tokens == [0]  # just above the greedy threshold: a huge scaled gap, still finite


def test_validation_names_the_field():
    bad = [dict(temperature=-1), dict(temperature=math.inf), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
           dict(min_p=2), dict(repetition_penalty=0), dict(max_tokens=0), dict(logit_bias={3: math.nan}),
           dict(logit_bias={3: 101}), dict(seed=2**64), dict(logprobs=21), dict(max_tokens=True)]
    for fields in bad:
        name = next(iter(fields))
        with pytest.raises(GenerationError, match=name.split("_")[0]):
            SamplingParams(**fields).validate(vocab_size=10)
    with pytest.raises(GenerationError, match="token id"):
        SamplingParams(logit_bias={10: 1.0}).validate(vocab_size=10)


VOCAB = 37
finite = dict(allow_nan=False, allow_infinity=False)
params_strategy = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 10**9),
    temperature=st.one_of(st.just(0.0), st.floats(0, 1e30, **finite), st.floats(1e-12, 1e-4, **finite)),
    top_k=st.integers(0, 10**9),
    top_p=st.floats(1e-12, 1.0, **finite),
    min_p=st.floats(0.0, 1.0, **finite),
    repetition_penalty=st.floats(1e-30, 1e30, **finite),
    presence_penalty=st.floats(-1e30, 1e30, **finite),
    frequency_penalty=st.floats(-1e30, 1e30, **finite),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100, **finite), max_size=VOCAB),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
    logprobs=st.one_of(st.none(), st.integers(0, 20)),
)
logits_strategy = st.lists(st.floats(-1e4, 1e4, **finite), min_size=VOCAB, max_size=VOCAB)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(params_strategy, logits_strategy,
                                st.lists(st.integers(0, VOCAB - 1), max_size=50),
                                st.lists(st.integers(0, VOCAB - 1), max_size=50)), min_size=1, max_size=4))
def test_every_valid_setting_samples_a_token(rows):
    """Whatever validation accepts, sampling returns one valid token per row (no exception, no nan), with
    finite log-probabilities where asked for, and a greedy row returns its argmax after the processors."""
    report("property example", rows=len(rows))
    params = [p.validate(VOCAB) for p, _, _, _ in rows]
    logits = torch.tensor([row for _, row, _, _ in rows])
    outputs = [out for _, _, out, _ in rows]
    prompts = [prompt for _, _, _, prompt in rows]
    generators = [p.generator("cpu", offset=3) for p in params]
    torch.manual_seed(0)  # unseeded rows draw from the global generator
    tokens, logprobs = sample_rows(logits, params, outputs, generators, ByteTokenizer(), prompts)
    assert len(tokens) == len(rows) and all(0 <= t < VOCAB for t in tokens)
    for p, logprob in zip(params, logprobs):
        assert (logprob is None) == (p.logprobs is None)
        if logprob is not None:
            assert math.isfinite(logprob.logprob) and len(logprob.top) == p.logprobs
    for i, p in enumerate(params):
        plain = not (p.logit_bias or p.presence_penalty or p.frequency_penalty) and p.repetition_penalty == 1
        if p.greedy and plain:
            assert tokens[i] == int(logits[i].argmax())
    # Given the rows' picks, and uniforms drawn beforehand with the draws they give (all as the compiled decode
    # step makes them, here eagerly): the same tokens and log-probabilities.
    bias = dense_bias(params, VOCAB)
    picks = row_picks(logits, bias).tolist()
    generators = [p.generator("cpu", offset=3) for p in params]
    torch.manual_seed(0)
    uniforms = draw_uniforms(params, generators)
    draws = row_draws(logits, torch.tensor([1.0 if p.greedy else p.temperature for p in params]),
                      torch.tensor([u or 0.0 for u in uniforms], dtype=torch.float64), bias).tolist()
    again, again_logprobs = sample_rows(logits, params, outputs, generators, ByteTokenizer(), prompts, picks,
                                        uniforms, draws)
    assert again == tokens and again_logprobs == logprobs


plain_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(1e-12, 1e-4, **finite), st.floats(1e-5, 1e30, **finite)),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), st.one_of(st.integers(-100, 100),
                                                                    st.floats(-100, 100, **finite)), max_size=5),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**64 - 1)),
)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.tuples(plain_params, logits_strategy), min_size=1, max_size=4))
def test_picks_and_draws_made_beforehand_give_the_sampled_tokens(rows):
    """Plain rows (greedy or a temperature, with or without a logit bias): the tokens the compiled decode step makes
    from its picks and draws (here made eagerly: row_picks, draw_uniforms, row_draws) are those sample_rows picks
    alone, and the fast path takes them (no operator on the logits)."""
    params = [p.validate(VOCAB) for p, _ in rows]
    logits = torch.tensor([row for _, row in rows])
    outputs, prompts = [[] for _ in rows], [[] for _ in rows]

    torch.manual_seed(0)
    alone, _ = sample_rows(logits, params, outputs, [p.generator("cpu") for p in params], ByteTokenizer(), prompts)
    torch.manual_seed(0)
    uniforms = draw_uniforms(params, [p.generator("cpu") for p in params])
    bias = dense_bias(params, VOCAB)
    picks = row_picks(logits, bias).tolist()
    draws = row_draws(logits, torch.tensor([1.0 if p.greedy else p.temperature for p in params]),
                      torch.tensor([u or 0.0 for u in uniforms], dtype=torch.float64), bias).tolist()
    fast, _ = sample_rows(logits.fill_(float("nan")), params, outputs, [None] * len(params), ByteTokenizer(), prompts,
                          picks, uniforms, draws)  # nan logits: the fast path must not look at them
    assert fast == alone


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.one_of(st.just(0.0), st.floats(1e-30, 1.0, **finite)), min_size=1, max_size=64)
       .filter(lambda w: sum(w) > 0),
       u=st.one_of(st.just(0.0), st.just(math.nextafter(1.0, 0.0)), st.floats(0.0, 1.0, exclude_max=True)))
def test_inverse_cdf_never_draws_a_token_of_probability_zero(weights, u):
    """Every uniform in [0, 1), the ends included, lands on a token whose probability is positive."""
    probs = torch.tensor([weights], dtype=torch.float32)
    probs = probs / probs.sum()
    token = int(inverse_cdf(probs, torch.tensor([u], dtype=torch.float64))[0])
    assert 0 <= token < len(weights) and probs[0, token] > 0


def test_seeded_draws_follow_the_distribution_and_repeat():
    """20,000 draws through sample_rows (seeded rows and unseeded ones in one batch) match the softmax of the
    logits within sampling error, and a seed gives the same tokens again."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -50.0]] * 4)
    expected = logits[0].softmax(-1)
    params = [SamplingParams(seed=7), SamplingParams(), SamplingParams(seed=8), SamplingParams()]
    generators = [p.generator("cpu") for p in params]
    counts = torch.zeros(5)
    first = []
    for _ in range(5000):
        tokens, _ = sample_rows(logits, params, [[]] * 4, generators)
        counts += torch.bincount(torch.tensor(tokens), minlength=5)
        first.append(tokens[0])
    observed = counts / counts.sum()
    assert torch.allclose(observed, expected, atol=0.015), (observed, expected)
    assert counts[4] == 0
    again = SamplingParams(seed=7).generator("cpu")
    assert [sample_rows(logits[:1], [params[0]], [[]], [again])[0][0] for _ in range(5000)] == first


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for streaming multi-byte characters."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop=()) -> list[str]:
    s = TextStream(ByteTokenizer(), stop)
    pieces = []
    for b in text.encode("utf-8"):
        pieces.append(s.push(b))
        if s.stopped:
            return pieces
    return pieces + [s.flush()]


def test_stream_never_splits_a_character():
    pieces = stream("naïve 日本語 🙂!")
    assert "".join(pieces) == "naïve 日本語 🙂!"
    assert all("\ufffd" not in p for p in pieces)


def test_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    assert "".join(stream("hello\n\nworld", stop=("\n\n",))) == "hello"
    assert "".join(stream("a<b<c<end>tail", stop=("<end>",))) == "a<b<c"
    assert "".join(stream("partial <en", stop=("<end>",))) == "partial <en"  # released at the end


class DecodeAllStream(TextStream):
    """The reference for TextStream's incremental decoding: every token decodes all the ids so far (what TextStream
    did before)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        super().__init__(tokenizer, stop)
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        matches = [at for at in (text.find(stop, self.emitted) for stop in self.stop) if at != -1]
        if matches:
            self.stopped = True
            piece, self.emitted = text[self.emitted:min(matches)], min(matches)
            return piece
        safe = len(text)
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text) - self.emitted), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


class SpaceMarkTokenizer:
    """SentencePiece-style pieces: '▁' is a space, and the first token decoded loses its leading space (as
    transformers' Metaspace decoder does), so a window decoded alone differs from the same ids in context."""
    PIECES = ["▁the", "▁cat", "s", "▁", "a", "b", "▁é", "日", "\n", "<e", "nd>", "!"]

    def decode(self, ids):
        return "".join(self.PIECES[i] for i in ids).replace("▁", " ").removeprefix(" ")


def pieces_of(stream_class, tokenizer, ids: list[int], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    s = stream_class(tokenizer, stop)
    pieces = []
    for token in ids:
        pieces.append(s.push(token))
        if s.stopped:
            return pieces, True
    return pieces + [s.flush()], False


STOPS = st.lists(st.sampled_from(["\n", "<end>", "the c", "é", "ab", "\ufffd"]), max_size=2).map(tuple)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 255), max_size=60), stop=STOPS)
def test_incremental_decoding_gives_the_text_of_decoding_everything_bytes(ids, stop):
    """One id per byte, invalid UTF-8 included: the same pieces, step by step, as decoding every id each time."""
    assert pieces_of(TextStream, ByteTokenizer(), ids, stop) == pieces_of(DecodeAllStream, ByteTokenizer(), ids, stop)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(SpaceMarkTokenizer.PIECES) - 1), max_size=40), stop=STOPS)
def test_incremental_decoding_keeps_the_spaces_a_window_alone_would_lose(ids, stop):
    tokenizer = SpaceMarkTokenizer()
    assert pieces_of(TextStream, tokenizer, ids, stop) == pieces_of(DecodeAllStream, tokenizer, ids, stop)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_decoding_with_the_real_bpe_tokenizer(prepared, data):
    """fmforge's byte-level BPE (vocabulary 512, where many ids are pieces of multi-byte characters)."""
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(prepared)
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=80))
    stop = data.draw(STOPS)
    assert pieces_of(TextStream, tokenizer, ids, stop) == pieces_of(DecodeAllStream, tokenizer, ids, stop)


@settings(max_examples=100, deadline=None)
@given(faults=st.dictionaries(st.integers(0, 7), st.tuples(st.integers(0, 63),
                                                         st.sampled_from([math.nan, math.inf, -math.inf])),
                              max_size=4))
def test_rows_with_non_finite_logits_are_named_and_only_they(faults):
    logits = torch.randn(8, 64) * 30
    for row, (column, value) in faults.items():
        logits[row, column] = value
    params, outputs, generators = [SamplingParams()] * 8, [[]] * 8, [None] * 8
    if not faults:
        assert len(sample_rows(logits, params, outputs, generators)[0]) == 8
        return
    for picks in (None, row_picks(logits).tolist()):  # checked here, or by the picks the compiled step made
        with pytest.raises(GenerationError) as error:
            sample_rows(logits, params, outputs, generators, picks=picks)
        assert str(error.value).endswith(f"row(s) {sorted(faults)}")
