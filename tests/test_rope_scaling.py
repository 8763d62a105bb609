"""Llama 3.1 / 3.2 RoPE scaling (`rope_type: llama3`), proven against transformers and gguf: a tiny random
Llama with a short original_max_position_embeddings (so that most frequencies are rescaled) is imported,
compared on sequences much longer than that original length, exported back to Hugging Face and to GGUF."""

from __future__ import annotations

import dataclasses
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from fmforge.cli import main  # noqa: E402
from fmforge.config import ModelConfig, load_recipe, model_config_from_preset  # noqa: E402
from fmforge.errors import ConfigError  # noqa: E402
from fmforge.infer.engine import generate_once  # noqa: E402
from fmforge.infer.sampling import SamplingParams  # noqa: E402
from fmforge.model import Transformer, rope_frequencies  # noqa: E402
from fmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from fmforge.checkpoint import load_model, read_model_config, write_checkpoint  # noqa: E402

# With head_dim 16 and theta 10000 the wavelengths are 6.3, 19.9, 62.8, ... positions: against an original
# context of 16 (high-frequency cut 16/4 = 4, low-frequency cut 16/1 = 16) the first is blended and the
# other seven are slowed down by `factor`.
SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 16}
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.1)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return train_tokenizer([text], vocab_size=300)


def make_hf_llama(directory: Path, tokenizer: Tokenizer, **overrides):
    """A random tiny LlamaForCausalLM with llama3 RoPE scaling, saved with `tokenizer` as a model directory."""
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, rope_scaling=dict(SCALING),
                                      **{**SHAPE, **overrides})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make them count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return model


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def token_batch(tokenizer: Tokenizer, T: int = 96) -> torch.Tensor:
    return torch.randint(0, tokenizer.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


def test_frequencies_match_transformers_and_plain_rope_is_unchanged():
    config = transformers.LlamaConfig(vocab_size=32, rope_scaling=dict(SCALING), **SHAPE)
    expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    scaled = rope_frequencies(16, 10000.0, SCALING)
    torch.testing.assert_close(scaled.float(), expected, rtol=1e-6, atol=0)
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert torch.equal(rope_frequencies(16, 10000.0), plain)  # bit for bit what fmforge computed before
    assert scaled[0] < plain[0] and torch.allclose(scaled[1:], plain[1:] / 4, rtol=1e-12)


def test_llama3_checkpoint_imports_and_exports_with_transformers_logits(tokenizer, tmp_path):
    source, checkpoint, exported = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "exported"
    reference = make_hf_llama(source, tokenizer)
    assert main(["import", "hf", str(source), "--out", str(checkpoint)]) == 0
    model, _ = load_model(checkpoint)
    assert model.config.rope_scaling == SCALING

    ids = token_batch(tokenizer)  # 96 positions, six times the original context of 16
    with torch.no_grad():
        expected = reference(ids).logits
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4
        # The same weights with plain RoPE compute something else: the scaling is really applied.
        plain = Transformer(dataclasses.replace(model.config, rope_scaling=None)).eval()
        plain.load_state_dict(model.state_dict())
        assert (plain(ids).logits - expected).abs().max().item() > 1e-2
    prompt = ids[0, :40].tolist()
    hf_tokens = reference.generate(torch.tensor([prompt]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, 40:].tolist()
    assert generate_once(model, None, prompt, SamplingParams(max_tokens=30, temperature=0.0)).token_ids == hf_tokens

    assert main(["export", "hf", str(checkpoint), "--out", str(exported)]) == 0
    round_trip = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert round_trip.config.rope_parameters["rope_type"] == "llama3"
    with torch.no_grad():
        assert (round_trip(ids).logits - expected).abs().max().item() <= 1e-4


def test_transformers_4_config_spelling_type_is_read(tokenizer, tmp_path):
    source = tmp_path / "hf"
    reference = make_hf_llama(source, tokenizer)
    old = {"type": "llama3", **{k: v for k, v in SCALING.items() if k != "rope_type"}}
    edit_config(source, rope_parameters=None, rope_theta=10000.0, rope_scaling=old)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    model, _ = load_model(tmp_path / "ckpt")
    ids = token_batch(tokenizer, T=64)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": 16}, "rope_type 'longrope'"),
    ({"type": "dynamic", "factor": 2.0}, "rope_type 'dynamic'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.7}, "mscale"),
    ({"rope_type": "llama3", "factor": 8.0}, "lacks low_freq_factor, high_freq_factor"),
    ({**SCALING, "beta_fast": 32}, "beta_fast"),
])
def test_import_refuses_other_rope_scaling(scaling, message, tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    make_hf_llama(source, tokenizer)
    edit_config(source, rope_parameters=None, rope_theta=10000.0, rope_scaling=scaling)
    capsys.readouterr()
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "ckpt").exists()


def test_config_round_trip_and_preset(tokenizer, tmp_path):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=32, n_head=2, context_length=32,
                         rope_scaling={**SCALING, "factor": 4})
    assert config.rope_scaling == SCALING and isinstance(config.rope_scaling["factor"], float)
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", Transformer(config), tmp_path / "tok")
    assert read_model_config(tmp_path / "ckpt") == config

    recipe = load_recipe(None, ["--model.rope_scaling", json.dumps(SCALING)])
    assert recipe.model.rope_scaling == SCALING

    llama = model_config_from_preset("llama-3.2-1b")  # meta-llama/Llama-3.2-1B's config.json
    assert llama.rope_theta == 500000.0
    assert llama.rope_scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("scaling, message", [
    ("llama3", "must be null or a mapping"),
    ({**SCALING, "rope_type": "longrope"}, "rope_type 'longrope' is not supported"),
    ({"type": "llama3", **{k: v for k, v in SCALING.items() if k != "rope_type"}}, "rope_type None"),
    ({k: v for k, v in SCALING.items() if k != "factor"}, "missing factor"),
    ({**SCALING, "attention_factor": 1.0}, "unknown attention_factor"),
    ({**SCALING, "factor": "big"}, "factor must be a finite number"),
    ({**SCALING, "factor": 0.5}, "factor must be at least 1"),
    ({**SCALING, "low_freq_factor": 4.0}, "low_freq_factor < high_freq_factor"),
    ({**SCALING, "original_max_position_embeddings": 16.0}, "original_max_position_embeddings must be an integer"),
    ({**SCALING, "original_max_position_embeddings": 0}, "must be positive"),
])
def test_bad_rope_scaling_is_a_config_error(scaling, message):
    with pytest.raises(ConfigError, match="model.rope_scaling") as error:
        ModelConfig(rope_scaling=scaling)
    assert message in str(error.value)


def llama_cpp_rope_freqs(head_dim: int, theta: float, scaling: dict) -> list[float]:
    """The factors llama.cpp's convert_hf_to_gguf.py writes, computed its way (float32 frequencies)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)):
        wavelength = 2 * math.pi / freq.item()
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


@pytest.mark.parametrize("scaling", [SCALING, {**SCALING, "factor": 32.0, "original_max_position_embeddings": 8192}])
def test_gguf_export_writes_rope_freqs(scaling, tokenizer, tmp_path):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=64, n_head=4, n_kv_head=2,
                         context_length=64, rope_theta=10000.0, rope_scaling=scaling)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", model, tmp_path / "tok")
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 0

    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    rope_freqs = tensors["rope_freqs.weight"]
    assert rope_freqs.tensor_type == gguf.GGMLQuantizationType.F32 and rope_freqs.data.shape == (8,)
    divisors = torch.from_numpy(rope_freqs.data.copy())
    expected = torch.tensor(llama_cpp_rope_freqs(16, 10000.0, scaling), dtype=torch.float32)
    torch.testing.assert_close(divisors, expected, rtol=1e-5, atol=0)
    # llama.cpp turns position p into the angle p * theta^(-2i/d) / rope_freqs[i]: fmforge's own tables.
    plain = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    angles = torch.outer(torch.arange(64, dtype=torch.float64), plain / divisors.double())
    torch.testing.assert_close(angles.cos().float(), model.rope_cos[:, :8], rtol=0, atol=1e-5)


def test_gguf_export_without_scaling_has_no_rope_freqs(tokenizer, tmp_path):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_embd=64, n_head=4, context_length=32)
    tokenizer.save(tmp_path / "tok")
    write_checkpoint(tmp_path / "ckpt", Transformer(config), tmp_path / "tok")
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 0
    assert "rope_freqs.weight" not in {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
