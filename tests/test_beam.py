"""Beam search (infer/beam.py): width 1 is greedy decoding; wide enough it is exhaustive (the best sequence of all);
every hypothesis's log-probability is the model's own, recomputed without a cache (the rows' reorder is right);
and the CLI and eval take --beams with a clear answer to bad values."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fmforge.config import ModelConfig
from fmforge.errors import ConfigError
from fmforge.infer.beam import beam_search, beam_search_batch
from fmforge.model import Transformer

from conftest import run_cli
from reference import greedy_reference


SHARPEN = 8


def tiny_model(vocab: int = 11, seed: int = 0, context: int = 24, **shape) -> Transformer:
    torch.manual_seed(seed)
    config = dict(vocab_size=vocab, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, context_length=context,
                  intermediate_size=64, tie_embeddings=False) | shape
    model = Transformer(ModelConfig(**config)).eval()
    with torch.no_grad():  # sharper distributions than the init's, so that greedy and beam search part ways
        model.lm_head.weight.mul_(SHARPEN)
    return model


@torch.no_grad()
def sequence_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """log p(tokens | prompt) from one forward without a cache."""
    logits = model(torch.tensor([prompt + tokens])).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(tokens))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 50), prompt=st.lists(st.integers(0, 10), min_size=1, max_size=8),
       max_tokens=st.integers(1, 20))
def test_one_beam_is_greedy_decoding(seed, prompt, max_tokens):
    model = tiny_model(seed=seed)
    (best,) = beam_search(model, prompt, beams=1, max_tokens=max_tokens, stop_ids={3})
    assert best.token_ids == greedy_reference(model, prompt, max_tokens, stop_ids={3})
    assert best.finish_reason == ("stop" if best.token_ids[-1] == 3 else "length")


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 50), prompt=st.lists(st.integers(0, 10), min_size=1, max_size=20),
       beams=st.integers(1, 6), max_tokens=st.integers(1, 12), penalty=st.sampled_from([0.0, 0.6, 1.0, 2.0]),
       window=st.sampled_from([None, 5]))
def test_scores_are_the_models_own_log_probabilities(seed, prompt, beams, max_tokens, penalty, window):
    """Each hypothesis's logprob equals the model's, recomputed from scratch: the cache rows followed the right
    beams at every reorder (a sliding-window model's ring too). At most `beams` come back, best first, distinct,
    none past the context."""
    model = tiny_model(seed=seed, sliding_window=window)
    found = beam_search(model, prompt, beams=beams, max_tokens=max_tokens, stop_ids={0, 5},
                        length_penalty=penalty)
    assert 1 <= len(found) <= beams
    assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
    assert len({tuple(h.token_ids) for h in found}) == len(found)
    room = min(max_tokens, model.config.context_length - len(prompt))
    for h in found:
        assert 1 <= len(h.token_ids) <= room
        assert h.logprob == pytest.approx(sequence_logprob(model, prompt, h.token_ids), abs=1e-4)
        assert h.score == pytest.approx(h.logprob / len(h.token_ids) ** penalty)
        stops = [t for t in h.token_ids if t in (0, 5)]
        assert stops == ([h.token_ids[-1]] if h.finish_reason == "stop" else [])
        assert h.finish_reason == "stop" or len(h.token_ids) == room


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 50), prompts=st.lists(st.lists(st.integers(0, 10), min_size=1, max_size=23), min_size=1,
                                                 max_size=5),
       beams=st.integers(1, 5), limits=st.lists(st.integers(1, 10), min_size=5, max_size=5),
       window=st.sampled_from([None, 6]))
def test_searches_side_by_side_are_searches_one_at_a_time(seed, prompts, beams, limits, window):
    """beam_search_batch (prompts of different lengths, each its own max_tokens, rows gathered across searches
    that end at different steps) gives each prompt what beam_search alone gives it; a sliding-window model's ring
    cache too."""
    model = tiny_model(seed=seed, sliding_window=window)
    limits = limits[:len(prompts)]
    together = beam_search_batch(model, prompts, beams=beams, max_tokens=limits, stop_ids={0, 5})
    assert len(together) == len(prompts)
    for prompt, limit, found in zip(prompts, limits, together):
        alone = beam_search(model, prompt, beams=beams, max_tokens=limit, stop_ids={0, 5})
        assert [h.token_ids for h in found] == [h.token_ids for h in alone]
        assert [h.finish_reason for h in found] == [h.finish_reason for h in alone]
        for a, b in zip(found, alone):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert a.logprob == pytest.approx(sequence_logprob(model, prompt, a.token_ids), abs=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_wide_enough_it_finds_the_best_sequence_of_all(seed):
    """With beams >= V^(T-1) nothing is ever pruned: the result is the most likely of all V^T sequences of T tokens
    (no stop ids, length_penalty 0: ranked by the sum), which greedy decoding sometimes misses."""
    vocab, length, prompt = 5, 3, [1, 2]
    model = tiny_model(vocab=vocab, seed=seed)
    (best, *_) = beam_search(model, prompt, beams=vocab ** (length - 1), max_tokens=length, length_penalty=0.0)
    every = {tokens: sequence_logprob(model, prompt, list(tokens))
             for tokens in itertools.product(range(vocab), repeat=length)}
    top = max(every, key=every.get)
    assert tuple(best.token_ids) == top
    assert best.logprob == pytest.approx(every[top], abs=1e-6)
    greedy = greedy_reference(model, prompt, length)
    assert every[top] >= every[tuple(greedy)] - 1e-9


def test_search_beats_greedy_somewhere():
    """Beam search is not greedy decoding in disguise: over some seeds it finds a likelier sequence."""
    gains = []
    for seed in range(12):
        model = tiny_model(seed=seed)
        (best, *_) = beam_search(model, [1, 2, 3], beams=4, max_tokens=8, length_penalty=0.0)
        greedy = greedy_reference(model, [1, 2, 3], 8)
        gains.append(best.logprob - sequence_logprob(model, [1, 2, 3], greedy))
    assert min(gains) >= -1e-6  # at these settings the greedy path never fell out of the beam
    assert sum(gain > 0.01 for gain in gains) >= 3


def test_length_penalty_trades_short_for_likely_per_token():
    """Ranked by the sum (penalty 0), a stop that comes early wins more often than ranked by the mean (1)."""
    short, mean = [], []
    for seed in range(10):
        model = tiny_model(seed=seed)
        for penalty, out in ((0.0, short), (1.0, mean)):
            (best, *_) = beam_search(model, [4], beams=5, max_tokens=16, stop_ids={2, 7}, length_penalty=penalty)
            out.append(len(best.token_ids))
    assert sum(short) <= sum(mean)


def test_bad_arguments_are_clear_errors():
    model = tiny_model()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="beams"):
            beam_search(model, [1], beams=bad, max_tokens=4)
    with pytest.raises(ValueError, match="at least one token"):
        beam_search(model, [], beams=2, max_tokens=4)
    with pytest.raises(ValueError, match="no room"):
        beam_search(model, [1] * 24, beams=2, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        beam_search(model, [1], beams=2, max_tokens=0)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, [1], beams=2, max_tokens=3, length_penalty=math.nan)
    with pytest.raises(ValueError, match="2 max_tokens for 1 prompts"):
        beam_search_batch(model, [[1]], beams=2, max_tokens=[3, 4])
    assert beam_search_batch(model, [], beams=2, max_tokens=3) == []
    with pytest.raises(ConfigError, match="would hold .* GiB of keys and values.*use fewer beams"):
        beam_search(model, [1], beams=10 ** 9, max_tokens=4)  # refused before any memory is taken
    (h,) = beam_search(model, [1] * 23, beams=3, max_tokens=10)[:1]  # one position left: one token
    assert len(h.token_ids) == 1 and h.finish_reason == "length"


def test_cli_generate_and_eval_take_beams(checkpoint, tmp_path):
    from fmforge.checkpoint import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    prompt = "def parse("
    out = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--beams", "3",
                  "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    expected = beam_search(model, tokenizer.encode(prompt, add_bos=True), beams=3, max_tokens=12,
                           stop_ids={tokenizer.eos_id})[0]
    assert out.stdout.rstrip("\n") == prompt + tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert "beam search, 3 wide" in out.stderr

    for args, message in ((["--beams", "0"], "--beams"), (["--beams", "2", "--top-k", "5"], "--top-k"),
                          (["--beams", "2", "--stop", "x"], "--stop"),
                          (["--beams", "2", "--length-penalty", "nan"], "--length-penalty"),
                          (["--beams", str(10 ** 9)], "use fewer beams")):
        bad = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "x", *args)
        assert bad.returncode != 0 and message in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr

    import sacrebleu

    from fmforge.data.translation import translation_messages
    pairs = [{"source": s, "target": t} for s, t in [("a dog runs", "ein Hund rennt"), ("a cat", "eine Katze"),
                                                     ("two men sit", "zwei Männer sitzen")]]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    report = tmp_path / "report"
    ok = run_cli("eval", "--checkpoint", str(checkpoint), "--tasks", f"translate:{path}", "--beams", "3",
                 "--length-penalty", "0.6", "--out", str(report))
    assert ok.returncode == 0, ok.stderr
    saved = json.loads((report / "report.json").read_text())
    assert saved["meta"]["decoding"] == {"beams": 3, "length_penalty": 0.6}
    (metrics,) = saved["results"].values()
    written = []  # what the evaluator should have decoded: each pair's best hypothesis, its first line
    for i, pair in enumerate(pairs):
        ids = tokenizer.encode_chat(translation_messages(pair, f"r{i}")[:1], add_generation_prompt=True)
        best = beam_search(model, ids, beams=3, max_tokens=min(96, model.config.context_length - len(ids)),
                           stop_ids=tokenizer.chat_stop_ids(), length_penalty=0.6)[0]
        written.append(tokenizer.decode(best.token_ids, skip_special_tokens=True).strip().split("\n")[0].strip())
    assert metrics["chrf"] == pytest.approx(sacrebleu.corpus_chrf(written, [[p["target"] for p in pairs]]).score)
    bad = run_cli("eval", "--checkpoint", str(checkpoint), "--tasks", "perplexity", "--beams", "3")
    assert bad.returncode != 0 and "--beams applies" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
