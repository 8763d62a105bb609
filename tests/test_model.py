"""The transformer's invariants: causality, RoPE, GQA, MoE routing and the KV cache."""

import math

import pytest
import torch

from fmforge.config import PRESETS, ModelConfig, model_config_from_preset
from fmforge.model import Transformer, apply_rope, rope_tables


def tiny(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(vocab_size=97, n_layer=2, n_embd=32, n_head=4, n_kv_head=2,
                                   context_length=48), **overrides})
    return Transformer(config).eval()


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_token": 2, "n_shared_experts": 1}])
def test_future_tokens_never_change_earlier_logits(overrides):
    model = tiny(**overrides)
    x = torch.randint(0, 97, (2, 24))
    base = model(x).logits
    for t in (5, 17, 23):
        changed = x.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(24 - t)) % 97
        logits = model(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-5)
        assert not torch.allclose(logits[:, t], base[:, t])


def test_rope_matches_complex_rotation_and_is_relative():
    head_dim, T = 16, 10
    cos, sin = rope_tables(head_dim, T, theta=10000.0)
    q = torch.randn(1, 1, T, head_dim)
    rotated = apply_rope(q, cos, sin)
    # Reference: pair dimension i with i + head_dim/2 as a complex number, rotate by position * freq_i.
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).double() / head_dim)
    z = torch.complex(q[..., : head_dim // 2].double(), q[..., head_dim // 2:].double())
    z = z * torch.polar(torch.ones(T, head_dim // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))
    expected = torch.cat([z.real, z.imag], dim=-1).float()
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-5)
    # q_m . k_n depends only on m - n.
    k = torch.randn(1, 1, 1, head_dim)
    qv, kv = torch.randn(1, 1, 1, head_dim), k
    score = lambda m, n: (apply_rope(qv, cos[m:m + 1], sin[m:m + 1]) * apply_rope(kv, cos[n:n + 1], sin[n:n + 1])).sum()
    assert math.isclose(score(7, 3).item(), score(5, 1).item(), rel_tol=1e-5, abs_tol=1e-5)
    assert not math.isclose(score(7, 3).item(), score(7, 1).item(), rel_tol=1e-3)


def test_rope_in_training_has_the_rotations_value_and_exact_gradient():
    """With a gradient wanted, apply_rope runs its own autograd function (the inverse rotation as backward); it
    must give the plain expression's values and pass gradcheck in fp64."""
    head_dim, T = 8, 5
    cos, sin = (t.double() for t in rope_tables(head_dim, T, theta=100.0))
    x = torch.randn(2, 3, T, head_dim, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        plain = apply_rope(x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin), (x,))
    q = torch.randn(2, 3, T, head_dim, dtype=torch.bfloat16, requires_grad=True)
    rotated = apply_rope(q, cos.float().bfloat16(), sin.float().bfloat16())
    assert rotated.dtype == torch.bfloat16
    rotated.float().square().sum().backward()  # a rotation keeps lengths: d|Rq|^2/dq = 2q
    torch.testing.assert_close(q.grad.float(), 2 * q.detach().float(), rtol=3e-2, atol=3e-2)


def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads():
    gqa = tiny(n_kv_head=2)
    mha = tiny(n_kv_head=4)
    state = gqa.state_dict()
    head_dim = gqa.config.head_dim
    for name, tensor in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (n_kv_head * hd, C) -> each kv head serves 2 query heads: repeat head blocks.
            state[name] = tensor.view(2, head_dim, -1).repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, rtol=1e-5, atol=1e-5)
    assert gqa.num_parameters() < mha.num_parameters()


def test_moe_routes_each_token_to_top_k_experts_and_mixes_their_outputs():
    model = tiny(n_experts=4, n_experts_per_token=2)
    moe = model.layers[0].mlp
    x = torch.randn(1, 6, 32)
    out = moe(x)
    tokens = x.view(-1, 32)
    logits = moe.router(tokens)
    weights, chosen = logits.topk(2, dim=-1)
    weights = weights.softmax(-1)
    expected = torch.stack([
        sum(weights[n, j] * moe.experts[int(chosen[n, j])](tokens[n:n + 1])[0] for j in range(2))
        for n in range(tokens.shape[0])])
    torch.testing.assert_close(out.view(-1, 32), expected, rtol=1e-5, atol=1e-6)


def test_moe_load_balancing_loss_penalises_imbalance_and_trains_the_router():
    model = tiny(n_experts=4, n_experts_per_token=1, moe_aux_loss_coef=0.1)
    moe = model.layers[0].mlp
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 5.0 * x.mean((0, 1)) / x.mean((0, 1)).norm()  # push every token to expert 0
    moe(x)
    assert moe.aux_loss.item() > 2.0  # perfectly balanced routing gives 1.0; all on one expert gives ~4
    ids = torch.randint(0, 97, (2, 16))
    out = model.train()(ids, targets=ids)
    ce = torch.nn.functional.cross_entropy(out.logits.view(-1, 97), ids.view(-1))
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss)
    out.aux_loss.backward()
    assert model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_kv_cache_chunks_match_full_forward():
    model = tiny()
    x = torch.randint(0, 97, (2, 30))
    full = model(x).logits
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(x[:, :11], kv_cache=cache).logits, model(x[:, 11:20], kv_cache=cache).logits]
    pieces += [model(x[:, t:t + 1], kv_cache=cache).logits for t in range(20, 30)]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_on_the_engine_equals_recomputing_the_sequence():
    from fmforge.infer.engine import generate_once
    from fmforge.infer.sampling import SamplingParams

    model = tiny(n_experts=4, n_experts_per_token=2)
    prompt = [3, 14, 15, 92, 65]
    cached = generate_once(model, None, prompt, SamplingParams(max_tokens=25, temperature=0)).token_ids
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert cached == sequence[len(prompt):]


def test_precomputed_embeddings_take_the_same_path_as_token_ids():
    model = tiny()
    x = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(model(inputs_embeds=model.embed_tokens(x)).logits, model(x).logits)
    with pytest.raises(ValueError):
        model(x, inputs_embeds=model.embed_tokens(x))


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = tiny(tie_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.embed_tokens.weight.data_ptr()
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    assert untied.num_parameters() == tied.num_parameters() + 97 * 32


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_build_with_the_parameter_count_their_config_predicts(name):
    config = model_config_from_preset(name, **({} if "vocab_size" in PRESETS[name] else {"vocab_size": 4096}))
    with torch.device("meta"):  # real shapes (up to Mixtral's 47B) without allocating memory
        model = Transformer(config)
    assert model.num_parameters() == config.num_parameters()


def test_real_shapes_have_their_published_sizes():
    assert round(model_config_from_preset("llama-3.2-1b").num_parameters() / 1e9, 2) == 1.24
    assert round(model_config_from_preset("qwen2.5-0.5b").num_parameters() / 1e6) == 494
    mixtral = model_config_from_preset("mixtral-8x7b")
    assert round(mixtral.num_parameters() / 1e9, 1) == 46.7
    assert 12.5e9 < mixtral.active_parameters() < 13e9


def test_both_caches_implement_the_kv_cache_protocol():
    from fmforge.infer.cache import SlotKVCache
    from fmforge.model import KVCache

    model = tiny()
    assert isinstance(model.new_kv_cache(2), KVCache)
    assert isinstance(SlotKVCache(model.config, 2, 16), KVCache)


def test_media_embeddings_mixed_with_token_ids():
    """Embeddings scattered into placeholder positions: equal to the ids-only path when they are the token
    embeddings; other embeddings change the output from their first position on, not before."""
    from fmforge.model import MediaEmbeds

    model = tiny()
    ids = torch.randint(0, 97, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 7] = True
    placeholders = ids.masked_fill(mask, 0)  # what a media span looks like in the id stream
    with torch.no_grad():
        same = MediaEmbeds(mask, model.embed_tokens(ids)[mask])
        torch.testing.assert_close(model(placeholders, media=same).logits, model(ids).logits)
        other = MediaEmbeds(mask, torch.randn(4, model.config.n_embd))
        logits, plain = model(placeholders, media=other).logits, model(ids).logits
    torch.testing.assert_close(logits[0, :3], plain[0, :3])
    torch.testing.assert_close(logits[1, :7], plain[1, :7])
    assert (logits[0, 3:] - plain[0, 3:]).abs().max() > 1e-3 and (logits[1, 7:] - plain[1, 7:]).abs().max() > 1e-3
    with torch.no_grad():  # the KV-cache path takes the same input
        cache = model.new_kv_cache(2)
        cached = model(placeholders, media=other, kv_cache=cache).logits
    torch.testing.assert_close(cached, logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fill"):
        model(placeholders, media=MediaEmbeds(mask, torch.randn(3, model.config.n_embd)))


def test_explicit_causal_attention_matches_sdpa_and_is_used_only_where_it_pays():
    from fmforge.model import explicit_attention_pays, explicit_causal_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    reference = [t.detach().float().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*reference, is_causal=True)
    got = explicit_causal_attention(q, k, v)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)
    weights = torch.randn(expected.shape)
    (got.float() * weights).sum().backward()
    (expected * weights).sum().backward()
    for t, r in zip((q, k, v), reference):  # the mask and the scale reach the gradients too
        torch.testing.assert_close(t.grad.float(), r.grad, rtol=5e-2, atol=5e-2)
    assert explicit_attention_pays(q) and not explicit_attention_pays(q.float())
    with torch.no_grad():
        assert not explicit_attention_pays(q)
    assert not explicit_attention_pays(torch.zeros(1, 1, 513, 8, dtype=torch.bfloat16))


def test_a_bf16_training_step_is_close_to_the_fp32_one():
    model = tiny()
    x = torch.randint(0, 97, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x, targets=x, return_logits=False).loss
    low.backward()
    low_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    high = model(x, targets=x, return_logits=False).loss
    high.backward()
    assert abs(low.item() - high.item()) < 0.02 * high.item()
    for name, p in model.named_parameters():
        cos = torch.nn.functional.cosine_similarity(low_grads[name].flatten(), p.grad.flatten(), dim=0)
        assert cos > 0.98, (name, cos.item())
