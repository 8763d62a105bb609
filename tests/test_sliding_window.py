"""Sliding-window attention (issue 16): each token sees the last `window` positions. The full-sequence forward uses a
banded causal mask; the KV caches keep a ring of `window` positions (plus the engine's lookahead), so their memory
stays constant however long generation runs, and they give the logits of the full forward — in one prefill, token
by token, in chunks, with padded rows at different lengths and with drafted tokens given back."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_tiny_checkpoint
from fmforge.config import ModelConfig
from fmforge.errors import ConfigError
from fmforge.infer.cache import SlotKVCache, kv_cache_bytes_per_token
from fmforge.infer.engine import Engine, GenerationRequest
from fmforge.infer.sampling import SamplingParams
from fmforge.model import Transformer

VOCAB = 97


def tiny(window: int | None, context: int = 96, n_layer: int = 2, init_std: float = 0.1, **extra) -> Transformer:
    """A random model; init_std 0.3 makes greedy decoding wander (at 0.1 it settles on one token)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, n_layer=n_layer, n_embd=32, n_head=4, n_kv_head=2, context_length=context,
                         sliding_window=window, init_std=init_std, **extra)
    return Transformer(config).eval()


def tokens(length: int, seed: int = 1, rows: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_sliding_window_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="model.sliding_window must be a positive integer or null"):
        ModelConfig(sliding_window=bad)


@torch.no_grad()
def test_a_token_sees_only_its_window():
    # One layer: changing token 0 changes the logits of positions 0 .. window-1 and none after.
    model = tiny(8, n_layer=1)
    ids = tokens(30)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % VOCAB
    difference = (model(ids).logits - model(changed).logits).abs().amax(-1)[0]
    assert (difference[:8] > 1e-4).all() and (difference[8:] == 0).all()
    # Within one window the model is exactly the full-attention one with the same weights.
    full = tiny(None)
    full.load_state_dict(tiny(8).state_dict())
    assert torch.equal(full(ids[:, :8]).logits, tiny(8)(ids[:, :8]).logits)
    assert not torch.allclose(full(ids).logits, tiny(8)(ids).logits, atol=1e-3)
    # A mask of the caller's (packed fine-tuning examples) is combined with the window, not put in its place.
    causal = torch.ones(30, 30, dtype=torch.bool).tril().view(1, 1, 30, 30)
    assert torch.equal(model(ids, attn_mask=causal).logits, model(ids).logits)


@torch.no_grad()
def lockstep_logits(model: Transformer, ids: torch.Tensor, chunks: list[int]):
    """Logits of `ids` fed to a LockstepKVCache chunk by chunk, and the cache."""
    cache = model.new_kv_cache(ids.shape[0])
    pieces, start = [], 0
    for size in chunks:
        pieces.append(model(ids[:, start:start + size], kv_cache=cache).logits)
        start += size
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("chunks", [[70], [1] * 70, [5, 3, 20, 1, 1, 40], [9, 1, 7, 53]])
def test_lockstep_ring_gives_the_full_forward_logits_in_constant_memory(chunks):
    model = tiny(8)
    ids = tokens(70, rows=2)
    expected = model(ids).logits
    got, cache = lockstep_logits(model, ids, chunks)
    assert (got - expected).abs().max().item() <= 1e-5
    assert cache.capacity == 8 and cache.keys[0].shape == (2, 2, 8, 8)  # 8 positions, not 96 or 70


@settings(max_examples=30, deadline=None)
@given(window=st.integers(1, 12), length=st.integers(1, 50), data=st.data())
def test_lockstep_ring_property(window, length, data):
    chunks = []
    while sum(chunks) < length:
        chunks.append(data.draw(st.integers(1, length - sum(chunks)), label="chunk"))
    model = tiny(window, context=64)
    ids = tokens(length, seed=window)
    got, _ = lockstep_logits(model, ids, chunks)
    with torch.no_grad():
        assert (got - model(ids).logits).abs().max().item() <= 1e-5


@settings(max_examples=20, deadline=None)
@given(window=st.none() | st.integers(1, 10), lookahead=st.integers(0, 3), data=st.data())
def test_slot_cache_property_rows_at_their_own_lengths(window, lookahead, data):
    """Rows of a SlotKVCache advance by their own (padded) chunks, like the engine's chunked prefill, or packed side
    by side in one row; a row may also feed tokens and give some back (speculation), within the lookahead. Every
    real position's logits are those of the full forward."""
    model = tiny(window, context=64)
    rows = data.draw(st.integers(1, 3), label="rows")
    lengths = data.draw(st.lists(st.integers(1, 30), min_size=rows, max_size=rows), label="lengths")
    ids = tokens(max(lengths), seed=window or 0, rows=rows)
    with torch.no_grad():
        expected = model(ids).logits
    cache = SlotKVCache(model.config, rows + 1, 64, lookahead=lookahead)
    assert cache.capacity == (64 if window is None else min(64, window + lookahead))  # None: full attention
    done = [0] * rows
    while done != lengths:
        sizes = [data.draw(st.integers(0, min(n - d, 12)), label="chunk") for d, n in zip(done, lengths)]
        if not any(sizes):
            sizes[[d < n for d, n in zip(done, lengths)].index(True)] = 1
        active = [r for r in range(rows) if sizes[r]]
        if data.draw(st.booleans(), label="packed"):
            # The engine's decode step with a prefill chunk: every row's tokens side by side in one row.
            cache.bind_packed([(r, 1, sizes[r], None) for r in active])
            packed = torch.cat([ids[r, done[r]:done[r] + sizes[r]] for r in active]).view(1, -1)
            with torch.no_grad():
                logits = model(packed, kv_cache=cache).logits[0].split([sizes[r] for r in active])
            rows_logits = dict(zip(active, logits))
        else:
            first, last = active[0], active[-1]  # bind a consecutive range; a row inside it may feed padding only
            span = list(range(first, last + 1))
            T = max(sizes[r] for r in span)
            batch = torch.zeros(len(span), T, dtype=torch.long)
            for i, r in enumerate(span):
                batch[i, :sizes[r]] = ids[r, done[r]:done[r] + sizes[r]]
            cache.bind(first, len(span), [sizes[r] for r in span])
            with torch.no_grad():
                logits = model(batch, kv_cache=cache).logits
            rows_logits = {r: logits[i, :sizes[r]] for i, r in enumerate(span) if sizes[r]}
        for r, got in rows_logits.items():
            assert (got - expected[r, done[r]:done[r] + sizes[r]]).abs().max().item() <= 1e-5
            done[r] += sizes[r]
        # Speculation: one row feeds its next real token and `extra` wrong ones, then gives the wrong ones back.
        r = data.draw(st.integers(0, rows - 1), label="speculating row")
        extra = data.draw(st.integers(0, lookahead), label="drafts")
        if done[r] < lengths[r] and extra and done[r] + 1 + extra <= 64:
            draft = torch.cat([ids[r:r + 1, done[r]:done[r] + 1], tokens(extra, seed=done[r])], dim=1)
            cache.bind(r, 1)
            with torch.no_grad():
                got = model(draft, kv_cache=cache).logits[0, 0]
            assert (got - expected[r, done[r]]).abs().max().item() <= 1e-5
            done[r] += 1
            cache.lengths[r] = done[r]


_NAIVE: dict = {}


def naive_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each token (no cache at all); remembered per model
    shape and prompt, since the tests build the same seeded models again."""
    key = (tuple(sorted(model.config.to_dict().items(), key=str)).__repr__(), tuple(prompt), n)
    if key not in _NAIVE:
        _NAIVE[key] = _naive_greedy(model, prompt, n)
    return _NAIVE[key]


def _naive_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


@pytest.mark.parametrize("prefill_chunk, speculate", [(0, 0), (5, 0), (0, 4), (3, 4)])
def test_engine_generates_past_the_window_with_a_window_sized_cache(prefill_chunk, speculate):
    model = tiny(8, context=64, init_std=0.3)
    prompts = [tokens(n, seed=n)[0].tolist() for n in (3, 14, 20)]
    new = [50, 24, 36]  # past the 8-token window, up to the 64-token context; the third arrives while others decode
    engine = Engine(model, None, max_batch=2, speculate=speculate, prefill_chunk=prefill_chunk)
    requests = [GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0), stop_ids=frozenset())
                for p, n in zip(prompts, new)]
    results = engine.complete(requests)
    for prompt, n, result in zip(prompts, new, results):
        assert result.token_ids == naive_greedy(model, prompt, n)
        assert len(set(result.token_ids[-12:])) > 4  # a test that a wrong cache would fail: the output wanders
    assert engine.cache.capacity == 8 + speculate
    assert engine.cache.keys[0].shape == (2, 2, 8 + speculate, 8)
    # Alone with a repetitive prompt: with speculation, drafts are verified (and some accepted) past the window.
    repetitive = ([5, 6, 7, 8] * 5)[:18]
    (alone,) = engine.complete([GenerationRequest(repetitive, SamplingParams(max_tokens=40, temperature=0),
                                                  stop_ids=frozenset())])
    assert alone.token_ids == naive_greedy(model, repetitive, 40)
    assert (engine.speculative_steps > 0) == bool(speculate)


def test_seeded_sampling_past_the_window_is_the_same_chunked_or_not():
    model = tiny(8, context=64, init_std=0.3)
    prompts = [tokens(n, seed=n)[0].tolist() for n in (5, 30, 20)]
    outputs = []
    for prefill_chunk in (0, 4):  # the third prompt goes in while the second decodes, 4 tokens a step
        engine = Engine(model, None, max_batch=2, prefill_chunk=prefill_chunk)
        requests = [GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0.9, seed=7), stop_ids=frozenset())
                    for p, n in zip(prompts, (10, 30, 30))]
        outputs.append([c.token_ids for c in engine.complete(requests)])
    assert outputs[0] == outputs[1]


def test_window_memory_in_bytes():
    model = tiny(12)
    per_token = kv_cache_bytes_per_token(model.config, torch.float32)
    assert per_token == 2 * 2 * 2 * 8 * 4  # K and V x layers x kv heads x head_dim x 4 bytes
    assert kv_cache_bytes_per_token(model.config, torch.bfloat16) == per_token // 2
    assert Engine(model, None, max_batch=3, speculate=4).cache.capacity == 16  # window + lookahead
    assert Engine(tiny(None), None, max_batch=3).cache.capacity == 96  # the whole context


# ---- export --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported_tokenizer():
    from fmforge.tokenizer import train_tokenizer

    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return train_tokenizer([text], vocab_size=360)


@pytest.mark.parametrize("shape, family", [
    (dict(), "mistral"),
    (dict(n_experts=4, n_experts_per_token=2, moe_intermediate_size=64, tie_embeddings=False), "mixtral"),
])
def test_export_as_mistral_matches_transformers(shape, family, exported_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fmforge.cli import main

    model = write_tiny_checkpoint(tmp_path, exported_tokenizer, sliding_window=8, **shape)
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.model_type == family
    ids = tokens(40, rows=2) % exported_tokenizer.vocab_size  # five windows long
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
        hf_tokens = hf.generate(ids[:1, :5], max_new_tokens=30, do_sample=False)[0, 5:].tolist()
    assert hf_tokens == naive_greedy(model, ids[0, :5].tolist(), 30)


def test_what_cannot_express_a_window_refuses_in_one_line(exported_tokenizer, tmp_path, capsys):
    from fmforge.cli import main

    write_tiny_checkpoint(tmp_path, exported_tokenizer, sliding_window=8, attention_bias=True)
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "attention biases, sliding-window attention" in err and len(err.splitlines()) == 1
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tiny_checkpoint(plain, exported_tokenizer, sliding_window=8)
    assert main(["export", "gguf", str(plain / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "no sliding-window attention" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.gguf").exists()
