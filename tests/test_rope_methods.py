"""RoPE scaling for fmforge's own models: linear position interpolation, static NTK-aware and YaRN, proven against
transformers' rope utilities and models (logits through export and import) and against the angles llama.cpp computes
from the GGUF metadata. (Llama 3.1's "llama3" scaling has its own file, test_rope_scaling.py.)"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from fmforge.checkpoint import load_model, write_checkpoint  # noqa: E402
from fmforge.cli import main  # noqa: E402
from fmforge.config import ModelConfig  # noqa: E402
from fmforge.errors import ConfigError  # noqa: E402
from fmforge.infer.engine import generate_once  # noqa: E402
from fmforge.infer.sampling import SamplingParams  # noqa: E402
from fmforge.model import Transformer, rope_attention_factor, rope_frequencies  # noqa: E402
from fmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

# An original context of 32 against a model context of 128: most frequencies are changed by every method.
LINEAR = {"rope_type": "linear", "factor": 4.0}
NTK = {"rope_type": "ntk", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
YARN_TUNED = {**YARN, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False, "attention_factor": 1.25}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return train_tokenizer([text], vocab_size=300)


def hf_config(scaling: dict | None, head_dim: int = 16, theta: float = 10000.0):
    return transformers.LlamaConfig(vocab_size=32, hidden_size=4 * head_dim, num_attention_heads=4,
                                    max_position_embeddings=128, rope_theta=theta,
                                    rope_scaling=None if scaling is None else dict(scaling))


@pytest.mark.parametrize("scaling", [LINEAR, YARN, YARN_TUNED])
def test_frequencies_and_attention_factor_match_transformers(scaling):
    expected, attention = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(scaling))
    torch.testing.assert_close(rope_frequencies(16, 10000.0, scaling).float(), expected, rtol=1e-6, atol=0)
    assert rope_attention_factor(scaling) == pytest.approx(attention, rel=1e-12)


def test_ntk_is_plain_rope_with_the_larger_base():
    """Static NTK-aware scaling = transformers' default RoPE at base theta * factor^(d/(d-2)); it slows the slowest
    frequency by exactly `factor` and leaves the fastest unchanged."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config(None, theta=10000.0 * 4.0 ** (16 / 14)))
    scaled = rope_frequencies(16, 10000.0, NTK)
    torch.testing.assert_close(scaled.float(), expected, rtol=1e-6, atol=0)
    plain = rope_frequencies(16, 10000.0)
    assert scaled[0] == plain[0] and float(scaled[-1]) == pytest.approx(float(plain[-1]) / 4.0, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(factor=st.floats(1.0, 64.0), original=st.integers(1, 100_000), head_dim=st.sampled_from([2, 4, 8, 64, 128]),
       theta=st.floats(2.0, 1e7), beta_fast=st.floats(1.0, 64.0), beta_slow=st.floats(0.01, 1.0),
       truncate=st.booleans())
def test_yarn_matches_transformers_over_its_parameter_space(factor, original, head_dim, theta, beta_fast, beta_slow,
                                                            truncate):
    scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
               "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate}
    ours = rope_frequencies(head_dim, theta, ModelConfig(n_embd=head_dim * 2, n_head=2, rope_theta=theta,
                                                         rope_scaling=scaling).rope_scaling)
    assert torch.isfinite(ours).all() and (ours > 0).all()
    plain = rope_frequencies(head_dim, theta)
    # Each frequency lies between the interpolated and the unchanged one.
    assert (ours <= plain * (1 + 1e-12)).all() and (ours >= plain / factor * (1 - 1e-12)).all()
    expected, attention = ROPE_INIT_FUNCTIONS["yarn"](transformers.LlamaConfig(
        vocab_size=8, hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=original,
        rope_theta=theta, rope_scaling=dict(scaling)))
    torch.testing.assert_close(ours.float(), expected, rtol=2e-5, atol=1e-30)
    assert rope_attention_factor(scaling) == pytest.approx(attention, rel=1e-9)


def tiny_model(tokenizer: Tokenizer, scaling: dict | None, seed: int = 0) -> Transformer:
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         context_length=128, rope_scaling=scaling)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # large enough weights that positions change the logits clearly
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0, 0.15)
    return model


@pytest.mark.parametrize("scaling", [LINEAR, NTK, YARN, YARN_TUNED], ids=["linear", "ntk", "yarn", "yarn-tuned"])
def test_export_to_transformers_and_import_back_keep_the_logits(scaling, tokenizer, tmp_path):
    model = tiny_model(tokenizer, scaling)
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tok")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 120), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        plain = Transformer(ModelConfig(**{**model.config.to_dict(), "rope_scaling": None})).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(ids).logits - expected).abs().max().item() > 1e-2  # the scaling is really applied

    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (reference(ids).logits - expected).abs().max().item() <= 1e-4
    prompt = ids[0, :70].tolist()  # generation past the original context, through the KV cache
    hf_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, 70:].tolist()
    assert generate_once(model, None, prompt, SamplingParams(max_tokens=40, temperature=0.0)).token_ids == hf_tokens

    assert main(["import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(tmp_path / "back")
    with torch.no_grad():
        assert (back(ids).logits - expected).abs().max().item() <= 1e-4
    if scaling["rope_type"] != "ntk":  # NTK comes back as what transformers calls it: plain RoPE, larger base
        assert back.config.rope_scaling == scaling


def llama_cpp_rope(fields: dict, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin per (position, pair) as llama.cpp computes them from the GGUF metadata (ggml's rope_yarn and
    ggml_rope_yarn_corr_dims, float64 here): linear = freq_scale 1/factor; YaRN blends interpolated and
    extrapolated angles over the rounded correction range and scales by 1 + 0.1 ln(factor)."""
    base = fields["llama.rope.freq_base"]
    kind = fields.get("llama.rope.scaling.type", "none")
    freq_scale = 1.0 / fields["llama.rope.scaling.factor"] if kind in ("linear", "yarn") else 1.0
    i = torch.arange(head_dim // 2, dtype=torch.float64)
    extrapolated = torch.arange(length, dtype=torch.float64)[:, None] * base ** (-2 * i / head_dim)
    theta, mscale = freq_scale * extrapolated, 1.0
    if kind == "yarn":
        original = fields["llama.rope.scaling.original_context_length"]

        def corr_dim(rotations):
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(0, math.floor(corr_dim(fields["llama.rope.scaling.yarn_beta_fast"])))
        high = min(head_dim - 1, math.ceil(corr_dim(fields["llama.rope.scaling.yarn_beta_slow"])))
        ramp_mix = 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)
        theta = theta * (1 - ramp_mix) + extrapolated * ramp_mix
        mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)
    return theta.cos() * mscale, theta.sin() * mscale


@pytest.mark.parametrize("scaling", [None, LINEAR, NTK, YARN, {**YARN, "beta_fast": 8.0, "beta_slow": 0.5}],
                         ids=["plain", "linear", "ntk", "yarn", "yarn-betas"])
def test_gguf_metadata_gives_llama_cpp_our_rope_tables(scaling, tokenizer, tmp_path):
    model = tiny_model(tokenizer, scaling)
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tok")
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("llama.rope")}
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}
    cos, sin = llama_cpp_rope(fields, 16, 128)
    torch.testing.assert_close(cos.float(), model.rope_cos[:, :8], rtol=0, atol=2e-5)
    torch.testing.assert_close(sin.float(), model.rope_sin[:, :8], rtol=0, atol=2e-5)


def test_gguf_refuses_yarn_settings_llama_cpp_cannot_express(tokenizer, tmp_path, capsys):
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", tiny_model(tokenizer, YARN_TUNED), tmp_path / "tok")
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "YaRN" in err and "\n" not in err
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
    ({"rope_type": "linear"}, "missing factor"),
    ({**LINEAR, "original_max_position_embeddings": 32}, "unknown original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0}, "missing original_max_position_embeddings"),
    ({**YARN, "beta_fast": 1.0, "beta_slow": 2.0}, "beta_slow <= beta_fast"),
    ({**YARN, "truncate": 1}, "truncate must be true or false"),
    ({**YARN, "attention_factor": 0.0}, "attention_factor must be positive"),
    ({**NTK, "factor": float("inf")}, "factor must be a finite number"),
    ({**NTK, "factor": 0.5}, "factor must be at least 1"),
])
def test_bad_scaling_is_one_config_error(scaling, message):
    with pytest.raises(ConfigError, match="model.rope_scaling") as error:
        ModelConfig(rope_scaling=scaling)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_recipe_field_trains_with_the_scaling(tmp_path):
    from fmforge.config import load_recipe

    run = load_recipe(None, ["--model.rope_scaling", '{"rope_type": "yarn", "factor": 4, '
                             '"original_max_position_embeddings": 64}', "--model.context_length", "256"])
    assert run.model.rope_scaling == {**YARN, "original_max_position_embeddings": 64}
    assert isinstance(run.model.rope_scaling["factor"], float)


def test_ntk_on_two_dimensional_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="ntk needs head_dim > 2"):
        ModelConfig(n_embd=8, n_head=4, rope_scaling=NTK)


def test_yarn_import_may_use_the_scaled_context_on_request(tokenizer, tmp_path):
    """Qwen2.5-style: max_position_embeddings is the original length; YaRN makes factor x that usable."""
    from fmforge.interop.hf import model_config_from_hf

    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 300, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96, "max_position_embeddings": 32,
          "rope_scaling": dict(YARN)}
    assert model_config_from_hf(hf)[0].context_length == 32
    assert model_config_from_hf(hf, context_length=128)[0].context_length == 128
    with pytest.raises(ConfigError, match="exceeds what the model supports \\(128\\)"):
        model_config_from_hf(hf, context_length=129)
