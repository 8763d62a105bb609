"""The compiled decode step (infer/compiled.py): the same tokens as the eager engine, eager where it does not
apply, and eager with one line on stderr when compiling fails."""

import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from fmforge.config import ModelConfig
from fmforge.infer import compiled as compiled_module
from fmforge.infer.engine import Engine, GenerationRequest
from fmforge.infer.sampling import SamplingParams, dense_bias, row_draws
from fmforge.model import Transformer

needs_compiler = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")),
                                    reason="torch.compile on a CPU needs a C++ compiler")


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """Random weights large enough (init_std 0.5) that greedy decoding wanders instead of repeating one token."""
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, vocab_size=97, context_length=48,
                            init_std=0.5), **overrides})
    return Transformer(config).eval()


def tokens(engine: Engine, prompt: list[int], **params) -> list[list[int]]:
    """Two requests one after the other (so each decodes alone, in slot 0 after the other left it)."""
    return [engine.complete([GenerationRequest(prompt, SamplingParams(**params))])[0].token_ids for _ in range(2)]


@pytest.fixture(scope="module")
def engines():
    """(compiled, eager) engines of one tiny model: 4 slots, speculation on (so both widths are compiled)."""
    model = tiny_model()
    return (Engine(model, None, max_batch=4, speculate=4, compile=True),
            Engine(model, None, max_batch=4, speculate=4))


@needs_compiler
def test_compiled_steps_give_the_eager_tokens_up_to_the_end_of_the_context(engines):
    compiled, eager = engines
    assert compiled.compiled is not None and compiled.compiled.widths == [1, 5]
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # repeats: prompt lookup drafts, and some drafts are accepted
    # 38 new tokens fill the 48 positions: the last steps no longer fit a 5-wide window and go eager
    greedy = dict(max_tokens=38, temperature=0.0)
    assert tokens(compiled, prompt, **greedy) == tokens(eager, prompt, **greedy)
    assert len(tokens(compiled, prompt, **greedy)[0]) == 38
    sampled = dict(max_tokens=20, temperature=1.0, top_k=20, seed=3)
    assert tokens(compiled, prompt, **sampled) == tokens(eager, prompt, **sampled)
    unrepeated = [40, 41, 42]  # nothing to look up: width-1 steps until the output repeats itself
    assert tokens(compiled, unrepeated, **greedy) == tokens(eager, unrepeated, **greedy)
    assert compiled.compiled.enabled and compiled.accepted_draft_tokens > 0


@needs_compiler
def test_batched_steps_are_compiled_and_agree(engines, monkeypatch):
    compiled, eager = engines
    batched = []
    decode_batch = compiled.compiled.decode_batch
    monkeypatch.setattr(compiled.compiled, "decode_batch", lambda tokens, *args: batched.append(len(tokens)) or
                        decode_batch(tokens, *args))
    prompts = [[3, 4, 5], [9, 10, 11, 12], [20]]
    requests = [GenerationRequest(p, SamplingParams(max_tokens=12 + 4 * i, temperature=0.0))
                for i, p in enumerate(prompts)]  # lengths differ: the last one ends decoding alone
    assert [c.token_ids for c in compiled.complete(requests)] == [c.token_ids for c in eager.complete(requests)]
    assert compiled.compiled.enabled and 3 in batched and 2 in batched


@needs_compiler
def test_batches_joining_and_leaving_agree_as_the_span_of_keys_grows(monkeypatch):
    """Context 160: the batched graph attends over 64, 128 and then all 160 positions (dynamic span) while
    sequences of different lengths join (a waiting one takes a freed slot) and leave, sampled with seeds."""
    model = tiny_model(seed=2, context_length=160)
    compiled = Engine(model, None, max_batch=3, speculate=0, compile=True)
    eager = Engine(model, None, max_batch=3, speculate=0)
    spans = []
    run = compiled.compiled._run
    monkeypatch.setattr(compiled.compiled, "_run", lambda step, ids, starts, span, *args, dynamic=False:
                        spans.append((len(ids), span)) or run(step, ids, starts, span, *args, dynamic=dynamic))
    requests = [GenerationRequest(list(range(1, 2 + 7 * i)), SamplingParams(
        max_tokens=150 - 20 * i, temperature=0.9, top_p=0.95, seed=i), seed_offset=i) for i in range(5)]
    assert [c.token_ids for c in compiled.complete(requests)] == [c.token_ids for c in eager.complete(requests)]
    assert {span for batch, span in spans if batch > 1} >= {64, 128, 160}


@needs_compiler
def test_two_models_of_one_shape_each_decode_through_their_own_graph(engines):
    """The weights are frozen into the graph: a second model of the same shape must not reuse the first's."""
    compiled, eager = engines
    other = tiny_model(seed=1)
    greedy = dict(max_tokens=16, temperature=0.0)
    mine = tokens(Engine(other, None, max_batch=1, speculate=0, compile=True), [5, 6, 7], **greedy)
    assert mine == tokens(Engine(other, None, max_batch=1, speculate=0), [5, 6, 7], **greedy)
    assert mine != tokens(compiled, [5, 6, 7], **greedy)


@pytest.mark.parametrize("overrides, reason", [
    (dict(n_experts=4, n_experts_per_token=2), "mixture-of-experts"),
    (dict(sliding_window=8), "sliding-window"),
])
def test_what_it_cannot_compile_decodes_eagerly_and_says_why(overrides, reason, capfd):
    engine = Engine(tiny_model(**overrides), None, max_batch=1, speculate=0, compile=True)
    assert engine.compiled is None
    assert reason in capfd.readouterr().err
    assert len(tokens(engine, [1, 2, 3], max_tokens=5, temperature=0.0)[0]) == 5


def test_a_failure_to_compile_falls_back_to_eager_with_one_line(monkeypatch, capfd):
    def no_compiler(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(compiled_module.torch, "compile", no_compiler)
    model = tiny_model()
    engine = Engine(model, None, max_batch=1, speculate=4, compile=True)
    err = capfd.readouterr().err
    assert "compiled decode step failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found)" in err
    assert "more detail" not in err and "decoding eagerly" in err
    assert not engine.compiled.enabled
    prompt = [5, 6, 7, 5, 6, 7]
    greedy = dict(max_tokens=20, temperature=0.0)
    assert tokens(engine, prompt, **greedy) == tokens(Engine(model, None, max_batch=1, speculate=4), prompt, **greedy)


def test_adapters_are_declined():
    from fmforge.infer.cache import SlotKVCache
    model = tiny_model()
    cache = SlotKVCache(model.config, 1, 48)
    assert compiled_module.CompiledDecoder.unsupported(model, cache, []) is None
    assert "adapters" in compiled_module.CompiledDecoder.unsupported(model, cache, ["an adapter"])


@needs_compiler
@pytest.mark.parametrize("lengths", [[63, 64, 127], [128, 5, 159], [0, 64, 1]])
def test_batched_step_logits_equal_the_eager_forward_at_span_edges(lengths):
    """One batched step over slots whose lengths sit at the edges of the key span (63 -> 64 keys, 64 -> 128,
    159 -> the whole row) gives the eager forward's logits and writes the same keys."""
    from fmforge.infer.cache import SlotKVCache
    from fmforge.infer.compiled import CompiledDecoder
    model = tiny_model(seed=3, context_length=160, init_std=0.1)  # attention spread over many keys
    torch.manual_seed(0)
    caches = [SlotKVCache(model.config, 3, 160) for _ in range(2)]
    with torch.no_grad():
        for slot, length in enumerate(lengths):
            if length:
                prompt = torch.randint(0, 97, (1, length))
                for cache in caches:
                    cache.bind(slot, 1)
                    model(prompt, kv_cache=cache)
        tokens = [7, 8, 9]
        decoder = CompiledDecoder(model, caches[0], speculate=0)
        temperatures, uniforms = [0.7, 1.0, 1.3], [0.1, 0.5, 0.9]
        got, picks, draws = decoder.decode_batch(tokens, temperatures, uniforms)
        caches[1].bind(0, 3)
        want = model(torch.tensor([[t] for t in tokens]), kv_cache=caches[1]).logits[:, -1]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert picks == got.argmax(-1).tolist()
    assert draws == row_draws(got, torch.tensor(temperatures), torch.tensor(uniforms, dtype=torch.float64)).tolist()
    for slot, length in enumerate(lengths):
        for layer in range(model.config.n_layer):
            written = [cache.keys[layer][slot, :, :length + 1] for cache in caches]
            assert torch.allclose(*written, atol=1e-5)


def test_decode_twins_group_projections_share_weights_and_compute_the_same():
    """The twins behind the compiled steps: q/k/v and gate/up each one module (a LoRA-wrapped projection is left
    alone); the lone sequence's twin copies no weight, the batch's holds them stacked and transposed; run eagerly,
    both give the model's logits for one row (written out), a speculative window of 5 (fp32: written out) and a
    batch of 3."""
    from fmforge.adapt.lora import LoRAConfig, LoRALinear
    from fmforge.infer.compiled import _StackedLinear, _WrittenOutLinear, decode_twin
    model = tiny_model(seed=1, attention_bias=True)
    lora = model.layers[1].self_attn
    lora.q_proj = LoRALinear(lora.q_proj, LoRAConfig(rank=2))
    alone, batch = decode_twin(model, written_out=True), decode_twin(model, written_out=False)
    assert isinstance(alone.layers[0].self_attn.qkv, _WrittenOutLinear)
    assert alone.layers[0].self_attn.qkv.weight1.data_ptr() == model.layers[0].self_attn.k_proj.weight.data_ptr()
    assert isinstance(batch.layers[0].self_attn.qkv, _StackedLinear)
    assert batch.layers[0].self_attn.qkv.sizes == [64, 32, 32]
    assert isinstance(batch.layers[0].mlp.gate_and_up, _StackedLinear)
    for twin in (alone, batch):
        assert isinstance(twin.layers[1].self_attn.q_proj, LoRALinear) and not hasattr(twin.layers[1].self_attn, "qkv")
    assert not hasattr(model.layers[0].self_attn, "qkv")  # the model itself is untouched
    torch.manual_seed(0)
    with torch.no_grad():
        for shape in [(1, 1), (1, 5), (3, 1)]:
            ids = torch.randint(0, 97, shape)
            for twin in (alone, batch):
                assert torch.allclose(twin(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5), shape


@settings(max_examples=40, deadline=None)
@given(features=st.integers(1, 40), outs=st.lists(st.integers(1, 24), min_size=1, max_size=3),
       lead=st.sampled_from([(1,), (1, 1), (1, 5), (2, 3), (7,)]), bias=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), written_out=st.booleans())
def test_decode_linears_equal_the_linears_they_stand_for(features, outs, lead, bias, dtype, written_out):
    from fmforge.infer.compiled import _StackedLinear, _WrittenOutLinear
    torch.manual_seed(len(outs) * 100 + features)
    linears = [torch.nn.Linear(features, out, bias=bias).to(dtype) for out in outs]
    x = torch.randn(*lead, features, dtype=dtype)
    with torch.no_grad():
        got = (_WrittenOutLinear if written_out else _StackedLinear)(*linears)(x)
        got = [got] if len(outs) == 1 else list(got)
        want = [linear(x) for linear in linears]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(g.dtype == dtype for g in got)
    for g, w in zip(got, want):
        assert torch.allclose(g.float(), w.float(), atol=tolerance, rtol=tolerance)


@needs_compiler
def test_batches_of_every_size_run_without_compiling_again():
    """warm_up compiles every graph: batches of 2 .. slots and both widths of a lone sequence then run without
    compiling again (made an error here, which would turn the compiled step off), with and without logit biases,
    temperatures and uniforms."""
    from fmforge.infer.cache import SlotKVCache
    from fmforge.infer.compiled import CompiledDecoder
    model = tiny_model(seed=2)
    cache = SlotKVCache(model.config, 8, 48, lookahead=2)
    decoder = CompiledDecoder(model, cache, speculate=2)
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the setting from dynamo's config module, and
    # every later recompile in the process then fails looking it up.
    with torch.no_grad():
        decoder.warm_up()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(2, 9):
            cache.lengths[:n] = [5 * n] * n
            bias = dense_bias([SamplingParams(logit_bias={3: 2.0})] * n, 97)
            assert decoder.decode_batch(list(range(n))) is not None, n
            assert decoder.decode_batch(list(range(n)), [0.5] * n, [0.3] * n, bias) is not None, n
        cache.lengths[:8] = [0] * 8
        cache.lengths[0] = 10
        bias = dense_bias([SamplingParams(logit_bias={3: 2.0})], 97)
        for tokens in ([1], [1, 2, 3]):
            assert decoder.decode(tokens) is not None and decoder.decode(tokens, 0.5, 0.3, bias) is not None
    assert decoder.enabled


def test_a_one_slot_cache_makes_no_batch_twin():
    """`fmforge generate --compile` decodes one sequence: no stacked copy of the weights for batches it never runs."""
    from fmforge.infer.cache import SlotKVCache
    from fmforge.infer.compiled import CompiledDecoder
    model = tiny_model()
    assert CompiledDecoder(model, SlotKVCache(model.config, 1, 48), speculate=0).batch_model is None
    assert CompiledDecoder(model, SlotKVCache(model.config, 2, 48), speculate=0).batch_model is not None


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picks_made_in_the_graph_are_the_eager_argmax_ties_and_non_finite_rows_included(dtype):
    """row_picks compiled (as the decode step runs it) against row_picks eager and sample_rows' own greedy tokens:
    the first of tied maxima (bf16 logits tie often), -1 for rows holding nan, inf or -inf."""
    from fmforge.infer.sampling import row_picks, sample_rows
    torch.manual_seed(0)
    logits = torch.randn(8, 300).to(dtype)
    logits[1, [7, 90, 250]] = 9.0  # a three-way tie for the max
    logits[2] = 0.0  # every token tied
    logits[3, 5], logits[4, 6], logits[5, 7] = float("nan"), float("inf"), float("-inf")
    logits[6, -1] = 50.0  # the max at the last position
    compiled = torch.compile(row_picks, fullgraph=True, dynamic=False)
    picks = compiled(logits).tolist()
    assert picks == row_picks(logits).tolist()
    assert picks[1] == 7 and picks[2] == 0 and picks[3:6] == [-1, -1, -1] and picks[6] == 299
    finite = [0, 1, 2, 6, 7]
    greedy = [SamplingParams(temperature=0.0)] * len(finite)
    tokens, _ = sample_rows(logits[finite], greedy, [[]] * len(finite), [None] * len(finite))
    assert tokens == [picks[row] for row in finite]


@needs_compiler
def test_plain_sampling_drawn_in_the_graph_gives_the_eager_tokens(engines, monkeypatch):
    """Rows sampled at a temperature (and a logit bias; no truncation, no penalties) are drawn inside the compiled
    step, with the uniforms sample_rows would have drawn: the same tokens as the eager engine, seeded rows and
    unseeded ones (global generator) alike, in a batch and alone; a row with top-p in the batch sends it back to
    sample_rows."""
    import fmforge.infer.engine as engine_module
    compiled, eager = engines
    drawn_in_graph = []
    real = engine_module.sample_rows
    monkeypatch.setattr(engine_module, "sample_rows",
                        lambda *args: drawn_in_graph.append(args[-1] is not None) or real(*args))

    def run(engine, batch):
        torch.manual_seed(0)
        requests = [GenerationRequest([3 + i, 4, 5 + i], SamplingParams(max_tokens=16 + 3 * i, **s))
                    for i, s in enumerate(batch)]
        return [c.token_ids for c in engine.complete(requests)]

    plain = [dict(temperature=0.9, seed=1), dict(temperature=1.3), dict(temperature=0.0), dict(temperature=0.6, seed=2),
             dict(temperature=0.7, seed=4, logit_bias={5: 5.0, 9: -100}), dict(temperature=0.0, logit_bias={7: 3})]
    for batch in (plain, plain[:1], plain[1:2], [*plain[:2], dict(temperature=0.8, top_p=0.9, seed=5)]):
        drawn_in_graph.clear()
        assert run(compiled, batch) == run(eager, batch), batch
        assert any(drawn_in_graph) == ("top_p" not in batch[-1]), batch


@needs_compiler
def test_each_request_decodes_with_its_own_logit_bias(engines):
    """The engine keeps the running rows' dense bias while they stay the same: a request after another (which may
    take the freed one's memory) or beside it gets its own bias, never the previous one's."""
    compiled, _ = engines
    for token in (7, 8, 9):
        params = SamplingParams(max_tokens=6, temperature=0.0, logit_bias={token: 100})
        assert compiled.complete([GenerationRequest([3, 4], params)])[0].token_ids == [token] * 6
    pair = [GenerationRequest([3, 4], SamplingParams(max_tokens=6 + i, temperature=0.0, logit_bias={20 + i: 100}))
            for i in range(2)]
    assert [c.token_ids for c in compiled.complete(pair)] == [[20] * 6, [21] * 7]


def test_compile_options_freeze_weights_and_autotune_only_batches_on_a_cpu_with_amx(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for amx in (True, False):
        monkeypatch.setattr(compiled_module, "has_amx", lambda: amx)
        for batch in (True, False):
            for device in (cpu, cuda):
                options = compiled_module.compile_options(batch, device)
                assert options["freezing"] and options["cpp_wrapper"]
                assert options.get("max_autotune", False) == (amx and batch and device == cpu)
                if options.get("max_autotune"):  # quiet: no tables of timings on the server's stderr
                    assert options["autotune_num_choices_displayed"] == 0
                    assert not options["max_autotune_report_choices_stats"]
