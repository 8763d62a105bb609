"""The generation engine in-process: continuous batching and per-row adapters give exactly what one-at-a-time
decoding gives; per-request sampling settings do what they say."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from fmforge.adapt.lora import load_adapter
from fmforge.errors import CheckpointError, GenerationError
from fmforge.infer.engine import DraftControl, Engine, EngineFull, GenerationRequest
from fmforge.infer.lora import read_adapter
from fmforge.infer.sampling import SamplingParams, sample_rows
from fmforge.checkpoint import load_model_and_tokenizer, resolve_checkpoint

from conftest import make_adapter
from reference import greedy_reference, guided_greedy_reference


@pytest.fixture(scope="module")
def base(checkpoint) -> Path:
    return resolve_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(base, root / "a", 1, ["q_proj", "v_proj", "down_proj", "embed_tokens"], 4),
            make_adapter(base, root / "b", 2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], 8)]


class Collector:
    """Gathers a sequence's events (called on the engine thread)."""

    def __init__(self):
        self.tokens, self.text, self.finish = [], [], None
        self.done = threading.Event()

    def __call__(self, event):
        if event.token_id is not None:
            self.tokens.append(event.token_id)
        self.text.append(event.text)
        if event.finish_reason:
            self.finish = event.finish_reason
            self.done.set()


def reference(base: Path, prompt: list[int], max_new: int, adapter: Path | None = None) -> list[int]:
    model, _, _ = load_model_and_tokenizer(base)
    if adapter is not None:
        load_adapter(model, adapter, base)
    model.eval()
    return greedy_reference(model, prompt, max_new)


def run_engine(engine: Engine, requests: list[tuple[list[int], int, SamplingParams]]) -> list[Collector]:
    collectors = []
    engine.start()
    try:
        for prompt, adapter, options in requests:
            collector = Collector()
            engine.submit(prompt, options, collector, adapter)
            collectors.append(collector)
        for collector in collectors:
            assert collector.done.wait(60), "a sequence never finished"
    finally:
        engine.stop(timeout=30)
    return collectors


def prompts_of(tokenizer) -> list[list[int]]:
    texts = ["def f(x):", "import os\nimport sys\n", "class A:\n    def __init__(self", "#", "return self._"]
    return [tokenizer.encode(t, add_bos=True) for t in texts]


def test_continuous_batching_matches_one_at_a_time_greedy_decoding(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompts = prompts_of(tokenizer)
    lengths = [12, 30, 5, 40, 21]  # sequences finish at different steps, so slots are vacated and refilled
    # 2 slots for 5 requests: later ones wait in the queue and join a running batch.
    engine = Engine(model, tokenizer, max_batch=2, max_queue=8)
    results = run_engine(engine, [(p, 0, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, lengths)])
    for prompt, n, result in zip(prompts, lengths, results):
        assert result.tokens == reference(base, prompt, n)
        assert result.finish == "length"
    assert engine.steps > 0


def test_adapters_apply_per_row_unmerged(base, adapters):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    before = model.layers[0].self_attn.q_proj.weight.clone()
    loaded = [read_adapter(name, path, base) for name, path in zip("ab", adapters)]
    engine = Engine(model, tokenizer, loaded, max_batch=4)
    prompts = prompts_of(tokenizer)
    plan = [(prompts[0], 0), (prompts[1], 1), (prompts[2], 2), (prompts[3], 1), (prompts[4], 2), (prompts[0], 2)]
    results = run_engine(engine, [(p, a, SamplingParams(max_tokens=16, temperature=0)) for p, a in plan])
    for (prompt, adapter), result in zip(plan, results):
        expected = reference(base, prompt, 16, adapters[adapter - 1] if adapter else None)
        assert result.tokens == expected, f"adapter {adapter}"
    # The adapters do change the output, and the base weights stay as they were (nothing is merged).
    assert results[0].tokens != results[5].tokens
    assert torch.equal(model.layers[0].self_attn.q_proj.base.weight, before)
    assert type(model.embed_tokens).__name__ == "MultiLoRAEmbedding"  # adapter a adapts the token embedding too


def test_adapter_for_another_base_is_refused(base, adapters, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(base, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # another fingerprint
    with pytest.raises(CheckpointError, match="different base"):
        read_adapter("a", adapters[0], other)


def test_sampling_options():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    plain = SamplingParams(max_tokens=1)
    # top_k = 1 is greedy whatever the temperature.
    tokens, _ = sample_rows(logits.clone(), [SamplingParams(max_tokens=1, top_k=1, temperature=1.5)] * 4,
                            [[]] * 4, [None] * 4)
    assert tokens == logits.argmax(-1).tolist()
    # A tiny top_p keeps only the most likely token.
    tokens, _ = sample_rows(logits.clone(), [SamplingParams(max_tokens=1, top_p=1e-6)] * 4, [[]] * 4, [None] * 4)
    assert tokens == logits.argmax(-1).tolist()
    # logit_bias forces a token; a frequency penalty keeps a greedy row off the tokens it already produced.
    tokens, _ = sample_rows(logits[:1].clone(), [SamplingParams(max_tokens=1, temperature=0, logit_bias={7: 100.0})],
                            [[]], [None])
    assert tokens == [7]
    best = int(logits[0].argmax())
    tokens, _ = sample_rows(logits[:1].clone(), [SamplingParams(max_tokens=1, temperature=0, frequency_penalty=2.0)],
                            [[best] * 10], [None])
    assert tokens != [best]
    # The same seed gives the same draws; rows keep their own generators.
    draws = []
    for _ in range(2):
        generators = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        rows = [sample_rows(logits[:2].clone(), [plain, plain], [[], []], generators)[0] for _ in range(10)]
        draws.append(rows)
    assert draws[0] == draws[1]
    assert len({tuple(r) for r in draws[0]}) > 1  # and they are draws, not a constant


def test_logprobs_are_the_models_own(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    logits = torch.randn(1, model.config.vocab_size)
    options = SamplingParams(max_tokens=1, temperature=0, logprobs=3, logit_bias={5: 50.0})
    tokens, logprobs = sample_rows(logits.clone(), [options], [[]], [None], tokenizer)
    expected = torch.log_softmax(logits[0], -1)
    assert tokens == [5]
    assert logprobs[0].logprob == pytest.approx(float(expected[5]), abs=1e-5)
    assert [lp for _, lp in logprobs[0].top] == pytest.approx(expected.topk(3).values.tolist(), abs=1e-5)


def test_stop_strings_and_queue_limit(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompt = prompts_of(tokenizer)[1]
    full = tokenizer.decode(reference(base, prompt, 30))
    stop = full[8:11]
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    (result,) = run_engine(engine, [(prompt, 0, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))])
    assert result.finish == "stop"
    assert "".join(result.text) == full[:full.find(stop)]
    # Not started: the queue holds one sequence, the next is refused at once.
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    engine.submit(prompt, SamplingParams(max_tokens=2), lambda e: None)
    with pytest.raises(EngineFull):
        engine.submit(prompt, SamplingParams(max_tokens=2), lambda e: None)


def test_stop_ids_may_be_any_collection_of_ids(base):
    from fmforge.infer.engine import generate_once

    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompt = prompts_of(tokenizer)[1]
    full = reference(base, prompt, 12)
    params = SamplingParams(max_tokens=12, temperature=0)
    for stops in ([full[3]], (full[3],), {full[3]}):  # a list used to raise TypeError inside the engine
        result = generate_once(model, tokenizer, prompt, params, stop_ids=stops)
        assert result.token_ids == full[:full.index(full[3]) + 1] and result.finish_reason == "stop"


def test_an_adapter_or_adapter_run_is_not_taken_for_a_model(adapters, tmp_path):
    with pytest.raises(CheckpointError, match="is a LoRA adapter, not a model"):
        resolve_checkpoint(adapters[0])
    run = tmp_path / "lora-run"  # what `fmforge finetune --method lora` leaves: checkpoints/step-N + latest
    shutil.copytree(adapters[0], run / "checkpoints" / "step-00000002")
    (run / "latest").write_text("step-00000002")
    with pytest.raises(CheckpointError, match="is an adapter run"):
        resolve_checkpoint(run)


def test_embeddings_are_unit_vectors_that_depend_on_text_and_adapter(base, adapters):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    engine = Engine(model, tokenizer, [read_adapter("a", adapters[0], base)])
    engine.start()
    try:
        texts = [tokenizer.encode(t, add_bos=True) for t in ["def f(x): return x", "import os", "def f(x): return x"]]
        vectors = engine.embed(texts).result(30)
        adapted = engine.embed(texts[:1], adapter=1).result(30)
    finally:
        engine.stop(timeout=30)
    assert vectors.shape == (3, model.config.n_embd)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(vectors[0], vectors[2]) and not torch.allclose(vectors[0], vectors[1])
    assert not torch.allclose(vectors[0], adapted[0])
    plain, _, _ = load_model_and_tokenizer(base)
    hidden = plain(torch.tensor([texts[1]]), return_hidden=True).hidden[0].mean(0)
    assert torch.allclose(vectors[1], torch.nn.functional.normalize(hidden, dim=0), atol=1e-5)


def test_prompt_lookup_drafts():
    from fmforge.infer.engine import propose_draft

    context = [1, 2, 3, 4, 5, 9, 2, 3]
    assert propose_draft(context, 3, 10) == [4, 5, 9]  # the last 2-gram (2, 3) was followed by 4, 5, 9
    assert propose_draft(context, 3, 2) == [4, 5]  # bounded by what may still be generated
    assert propose_draft([7, 8, 9], 4, 10) == []  # nothing repeats


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_speculative_decoding_changes_speed_not_output(base, temperature):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompt = tokenizer.encode("def f(x):\n    return x\n\ndef f(x):\n    return", add_bos=True)
    outputs, engines = [], []
    for speculate in (0, 4):
        engine = Engine(model, tokenizer, max_batch=1, speculate=speculate)
        options = SamplingParams(max_tokens=40, temperature=temperature, seed=3, top_p=0.95)
        (result,) = run_engine(engine, [(prompt, 0, options)])
        outputs.append(result.tokens)
        engines.append(engine)
    assert outputs[0] == outputs[1]  # the same tokens, greedy or sampled with the same seed
    if temperature == 0:
        assert outputs[0] == reference(base, prompt, 40)
    plain, speculative = engines
    assert plain.speculative_steps == 0 and speculative.speculative_steps > 0
    if temperature == 0:  # this model repeats itself greedily, so drafts are accepted: fewer forwards
        assert speculative.accepted_draft_tokens > 0 and speculative.steps < plain.steps


def test_classifier_free_guidance_gives_the_plain_guided_loops_tokens(base, adapters):
    """Guided rows (with and without an adapter) batched beside plain ones give what two caches and the guided
    argmax give written out (reference.guided_greedy_reference); scale 0 is the unconditional prompt's own greedy
    continuation; guidance changes the tokens; a guided sequence does not draft."""
    model, tokenizer, _ = load_model_and_tokenizer(base)
    loaded = [read_adapter(name, path, base) for name, path in zip("ab", adapters)]
    engine = Engine(model, tokenizer, loaded, max_batch=4, speculate=4)
    prompt = tokenizer.encode("def add(a, b):\n    return", add_bos=True)
    unconditional = tokenizer.encode("#", add_bos=True)
    n = 24

    def request(scale, adapter=0, ids=prompt):
        return GenerationRequest(ids, SamplingParams(max_tokens=n, temperature=0, guidance=scale), adapter,
                                 stop_ids=frozenset(), unconditional_ids=unconditional)

    plan = [request(8.0), request(1.0), request(0.0), request(8.0, adapter=1), request(2.0, ids=prompts_of(tokenizer)[1])]
    results = [c.token_ids for c in engine.complete(plan)]
    plain = reference(base, prompt, n)
    assert results[1] == plain
    assert results[2] == reference(base, unconditional, n)
    fresh, _, _ = load_model_and_tokenizer(base)
    assert results[0] == guided_greedy_reference(fresh.eval(), prompt, unconditional, 8.0, n)
    assert results[4] == guided_greedy_reference(fresh, prompts_of(tokenizer)[1], unconditional, 2.0, n)
    assert results[0] != plain  # the guidance does something
    with_adapter, _, _ = load_model_and_tokenizer(base)
    load_adapter(with_adapter, adapters[0], base)
    assert results[3] == guided_greedy_reference(with_adapter.eval(), prompt, unconditional, 8.0, n)
    alone = Engine(fresh, tokenizer, max_batch=1, speculate=4)
    assert alone.complete([request(8.0)])[0].token_ids == results[0]
    assert alone.speculative_steps == 0
    assert alone.step_costs.plain is None  # its steps (two forwards each) set no price for drafting
    alone.complete([request(1.0)])  # unguided: its plain steps are timed
    assert alone.step_costs.plain is not None


def test_guided_sampling_is_seeded_per_sequence_batched_or_alone(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompt = tokenizer.encode("class A:\n    def", add_bos=True)
    unconditional = tokenizer.encode("\n", add_bos=True)
    guided = GenerationRequest(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=5, guidance=2.5),
                               unconditional_ids=unconditional)
    other = GenerationRequest(prompts_of(tokenizer)[0], SamplingParams(max_tokens=30, temperature=0.8, seed=1))
    together = Engine(model, tokenizer, max_batch=2).complete([other, guided])
    alone = Engine(model, tokenizer, max_batch=1).complete([guided])
    assert together[1].token_ids == alone[0].token_ids


def test_guidance_needs_a_shorter_unconditional_prompt(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    engine = Engine(model, tokenizer, max_batch=1)
    prompt = tokenizer.encode("def f(x):", add_bos=True)
    params = SamplingParams(max_tokens=4, guidance=2.0)
    with pytest.raises(GenerationError, match="without its condition"):
        engine.complete([GenerationRequest(prompt, params)])
    with pytest.raises(GenerationError, match="longer than the prompt"):
        engine.complete([GenerationRequest(prompt, params, unconditional_ids=prompt + prompt)])
    with pytest.raises(GenerationError, match="guidance must be in"):
        SamplingParams(guidance=-1.0).validate()
    # guidance 1 is plain sampling: an unconditional prompt is not needed and not used
    assert engine.complete([GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0))])[0].token_ids == \
        engine.complete([GenerationRequest(prompt, SamplingParams(max_tokens=4, temperature=0),
                                           unconditional_ids=prompt + prompt)])[0].token_ids


def test_drafting_stops_while_drafts_are_rejected_and_probes_again():
    control = DraftControl()
    assert control.wants_draft()
    for _ in range(3):
        control.speculated(0)  # nothing accepted: the running mean falls below the threshold
    assert not control.wants_draft()
    for _ in range(DraftControl.PROBE - 1):
        control.plain()
    assert not control.wants_draft()
    control.plain()
    assert control.wants_draft()  # a probe after PROBE plain steps
    for _ in range(5):
        control.speculated(4)  # a stretch the model copies: drafting pays again
    assert control.wants_draft() and control.plain_steps == 0


def test_a_dearer_speculative_step_needs_more_accepted_drafts_and_failed_probes_back_off():
    from fmforge.infer.engine import StepCosts
    costs = StepCosts()
    assert costs.break_even() == StepCosts.DEFAULT_BREAK_EVEN  # nothing timed yet
    costs.record(False, 1.0)
    costs.record(True, 2.5)
    assert costs.break_even() == pytest.approx(1.5)  # a 5-token step costing 2.5 plain ones must yield 2.5 tokens
    costs.record(True, 0.5)
    assert costs.break_even() == pytest.approx(1.1)  # a running mean: 2.5 + 0.2 x (0.5 - 2.5) = 2.1 plain steps
    for _ in range(30):
        costs.record(True, 0.9)  # as cheap as a plain step (eager, within noise): the eager threshold still holds
    assert costs.break_even() == StepCosts.DEFAULT_BREAK_EVEN
    control = DraftControl(accepted=1.0)
    assert control.wants_draft(0.5) and not control.wants_draft(1.5)
    intervals = []
    for _ in range(5):  # probes that find nothing: each waits twice as long as the last, up to MAX_PROBE
        while not control.wants_draft(1.5):
            control.plain()
        intervals.append(control.plain_steps)
        control.speculated(0, 1.5)
    assert intervals == [8, 16, 32, 64, 64] and control.probe_every == DraftControl.MAX_PROBE
    while not control.wants_draft(1.5):
        control.plain()
    control.speculated(3, 1.5)  # a probe that pays: draft from here on, probes back to every PROBE steps
    assert control.wants_draft(1.5) and control.probe_every == DraftControl.PROBE


def test_a_sequence_whose_drafts_fail_decodes_plainly_with_the_same_tokens(base, monkeypatch):
    """Drafts that are always wrong (a token the model never samples here): after a few speculative steps the
    engine stops drafting, probing once per PROBE plain steps, and the tokens are those of plain decoding."""
    from fmforge.infer import engine as engine_module
    model, tokenizer, _ = load_model_and_tokenizer(base)
    prompt = tokenizer.encode("def f(x):\n    return x\n\ndef f(x):\n    return", add_bos=True)
    options = SamplingParams(max_tokens=60, temperature=0.9, seed=11, logit_bias={7: -100})
    monkeypatch.setattr(engine_module, "propose_draft", lambda context, k, limit: [7] * min(k, limit))
    outputs, engines = [], []
    for speculate in (0, 4):
        engine = Engine(model, tokenizer, max_batch=1, speculate=speculate)
        (result,) = run_engine(engine, [(prompt, 0, options)])
        outputs.append(result.tokens)
        engines.append(engine)
    assert outputs[0] == outputs[1] and len(outputs[0]) >= 30
    speculative = engines[1]
    assert speculative.accepted_draft_tokens == 0
    assert 0 < speculative.speculative_steps <= len(outputs[0]) // DraftControl.PROBE + 4


def test_prefill_groups_respect_the_token_budget():
    from fmforge.infer.engine import prefill_groups

    class S:
        def __init__(self, n):
            self.prompt_ids = [0] * n

    sizes = [10, 30, 5, 40, 100, 3]
    groups = prefill_groups([S(n) for n in sizes], budget=100)
    assert [[len(s.prompt_ids) for s in g] for g in groups] == [[10, 30, 5], [40], [100], [3]]
    assert all(len(g) * max(len(s.prompt_ids) for s in g) <= 100 for g in groups)


def test_chunked_prefill_gives_the_tokens_of_one_shot_prefill(base, adapters):
    """Prompts that arrive while others decode go in by chunks of 5 tokens, in the decode forward when the rows
    share an adapter, else in a forward of their own: on adapters, greedy and seeded sampling, and with a lone
    sequence speculating meanwhile, the tokens are those of one-shot prefill."""
    from fmforge.infer.engine import GenerationRequest

    tokenizer = load_model_and_tokenizer(base)[1]
    loaded = [read_adapter(name, path, base) for name, path in zip("ab", adapters)]
    short, long, longer = [tokenizer.encode(text, add_bos=True) for text in [
        "#", "class Stack:\n    def __init__(self):\n        self.items = []\n",
        "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser()\n"]]
    assert len(long) > 15 and len(longer) > 20
    # Two slots: the first two start together (nobody decodes yet: whole prompts); each later one is admitted
    # when a slot frees, while the other slot decodes, so its prompt goes in 5 tokens a step.
    batched = [GenerationRequest(short, SamplingParams(max_tokens=3, temperature=0.9, seed=4), adapter=1),
               GenerationRequest(longer, SamplingParams(max_tokens=24, temperature=0)),
               GenerationRequest(long, SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=5)),
               GenerationRequest(longer, SamplingParams(max_tokens=12, temperature=0), adapter=1)]
    # The first ends at once; the second then decodes alone and speculates while the third's prompt goes in.
    repetitive = tokenizer.encode("def f(x):\n    return x\n\ndef f(x):\n    return", add_bos=True)
    speculating = [GenerationRequest(short, SamplingParams(max_tokens=1, temperature=0)),
                   GenerationRequest(repetitive, SamplingParams(max_tokens=30, temperature=0), adapter=2),
                   GenerationRequest(long, SamplingParams(max_tokens=10, temperature=0.7, seed=9), adapter=2)]
    outputs, forwards, shared = [], [], []
    for prefill_chunk in (0, 5):
        output = []
        for requests, speculate in ((batched, 0), (speculating, 4)):
            model = load_model_and_tokenizer(base)[0]  # an engine attaches its adapters to the model it gets
            engine = Engine(model, tokenizer, loaded, max_batch=2, prefill_chunk=prefill_chunk, speculate=speculate)
            prefill, together = engine._prefill, engine._decode_with_chunk
            engine._prefill = lambda *args: (forwards.append(prefill_chunk), prefill(*args))
            engine._decode_with_chunk = lambda *args: (shared.append(args[1][0].adapter), together(*args))
            output += [c.token_ids for c in engine.complete(requests)]
            assert (engine.speculative_steps > 0) == bool(speculate)
        outputs.append(output)
    assert outputs[0] == outputs[1]
    assert outputs[0][1] == reference(base, longer, 24)
    assert forwards.count(5) >= 4  # chunks in forwards of their own (another adapter decoding) ...
    assert {0, 2} <= set(shared)  # ... and in decode forwards, on the base and on an adapter


def test_a_long_prompt_is_prefilled_between_the_decode_steps_of_the_others(base):
    model, tokenizer, _ = load_model_and_tokenizer(base)
    short = prompts_of(tokenizer)[:2]
    long = tokenizer.encode("def f(x):\n    return x\n" * 8, add_bos=True)[:60]
    assert len(long) == 60
    # Unchunked: the whole prompt, then a decode step that includes it (2 tokens). Chunked: 60 tokens in 8 chunks,
    # each in the forward of the others' decode step; the last gives the long prompt's first token.
    for prefill_chunk, steps_to_first_token, tokens_then in ((0, 1, 2), (8, 8, 1)):
        engine = Engine(model, tokenizer, max_batch=4, prefill_chunk=prefill_chunk, speculate=0)
        events = {name: [] for name in ("a", "b", "long")}
        for name, prompt in zip("ab", short):
            engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0), events[name].append)
        engine.step()  # their prefill gives a first token, and the decode step of that step a second
        engine.submit(long, SamplingParams(max_tokens=5, temperature=0), events["long"].append)
        prefill_forwards = []
        prefill = engine._prefill
        engine._prefill = lambda *args: (prefill_forwards.append(args), prefill(*args))
        for step in range(1, steps_to_first_token + 1):
            engine.step()
            # Every step the running streams get their next token, while the long prompt goes in chunk by chunk.
            assert len(events["a"]) == len(events["b"]) == 2 + step
            assert len(events["long"]) == (tokens_then if step == steps_to_first_token else 0)
        # Chunked, no forward of its own: every chunk rode in a decode forward.
        assert len(prefill_forwards) == (0 if prefill_chunk else 1)
        while engine.step():
            pass
        assert [e.token_id for e in events["long"]] == reference(base, long, 5)
        assert [e.token_id for e in events["a"]] == reference(base, short[0], 40)


def test_a_part_prefilled_prompt_and_a_new_one_are_not_padded_past_the_context(base):
    """A prompt half in the cache (chunks while another sequence decoded) and a new prompt admitted once nobody
    decodes: padding both rows to the new prompt's width would run the first past the context (64), so they go in
    separate forwards, and both generate what they would alone."""
    model, tokenizer, _ = load_model_and_tokenizer(base)
    text = "def f(x):\n    return x\n" * 8
    a, b = tokenizer.encode(text, add_bos=True)[:40], tokenizer.encode("# " + text, add_bos=True)[:40]
    engine = Engine(model, tokenizer, max_batch=2, prefill_chunk=5, speculate=0)
    events = {name: [] for name in ("s", "a", "b")}
    s = engine.submit(prompts_of(tokenizer)[0], SamplingParams(max_tokens=40, temperature=0), events["s"].append)
    engine.step()
    first = engine.submit(a, SamplingParams(max_tokens=8, temperature=0), events["a"].append)
    while first.prefilled < 30:
        engine.step()
    s.cancel()
    engine.step()  # s leaves; a's next chunk may go in meanwhile
    assert 30 < first.prefilled < len(a)  # 35: padded to b's 40 it would end at 75
    engine.submit(b, SamplingParams(max_tokens=8, temperature=0), events["b"].append)
    while engine.step():
        pass
    assert [e.finish_reason for e in events["a"] + events["b"]].count("error") == 0
    assert [e.token_id for e in events["a"] if e.token_id is not None] == reference(base, a, 8)
    assert [e.token_id for e in events["b"] if e.token_id is not None] == reference(base, b, 8)


def _threads_of_this_process() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
@pytest.mark.parametrize("other_runtime", [False, True], ids=["torch's runtime only", "a second runtime loaded"])
def test_a_thread_that_hands_its_torch_work_over_frees_its_openmp_workers(other_runtime):
    """The engine's thread must hold the only OpenMP pool (a second one makes libgomp put idle workers to sleep at
    once: 30% off 16-stream decode on 2 cores). A thread that ran a parallel op owns workers until it frees them.
    scikit-learn loads a libgomp of its own; the release once paused only the first runtime it found (sklearn's, by
    path order) and freed nothing of torch's: CI failed on it whenever a vision test had run in the same worker."""
    from fmforge.device import openmp_runtimes, release_openmp_threads

    if other_runtime:
        pytest.importorskip("sklearn.svm")
        if len(openmp_runtimes()) < 2:
            pytest.skip("this scikit-learn build shares torch's OpenMP runtime")
    counts = {}

    def worker():
        torch.set_num_threads(3)
        counts["before"] = _threads_of_this_process()
        torch.randn(256, 256) @ torch.randn(256, 256)  # a parallel region: this thread's pool starts 2 workers
        counts["with pool"] = _threads_of_this_process()
        counts["released"] = release_openmp_threads()
        # the freed workers exit on their own once released (libgomp does not join them): give them a moment
        deadline = time.monotonic() + 5
        while _threads_of_this_process() > counts["before"] and time.monotonic() < deadline:
            time.sleep(0.01)
        counts["after"] = _threads_of_this_process()

    previous = torch.get_num_threads()  # set_num_threads is the whole process's setting
    thread = threading.Thread(target=worker)
    try:
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(previous)
    assert counts["released"] is True
    assert counts["with pool"] == counts["before"] + 2
    assert counts["after"] == counts["before"]
