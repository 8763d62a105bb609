"""GGUF export, proven with `gguf`'s own reader: every key and every tensor is read back and checked, and a
forward pass written the way llama.cpp's `llama` architecture computes (adjacent-pair RoPE on the permuted
Q/K weights, tied output through token_embd, MoE softmax -> top-k -> renormalise) reproduces fmforge's
logits from the file's tensors alone. Running llama.cpp itself is a benchmark-time check
(benchmarks/llama_cpp_check.py): it needs a 9-minute build."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")

from fmforge.cli import main  # noqa: E402
from fmforge.config import ModelConfig  # noqa: E402
from fmforge.interop.gguf import LLAMA3_REGEX, permute_for_gguf, pre_tokenizer_name  # noqa: E402
from fmforge.model import Transformer  # noqa: E402
from fmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from fmforge.checkpoint import write_checkpoint  # noqa: E402

SHAPES = {
    "dense": dict(tie_embeddings=True),
    "untied-bias": dict(tie_embeddings=False, attention_bias=True, rope_theta=50000.0),
    "moe": dict(tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_intermediate_size=64),
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return train_tokenizer([text], vocab_size=360)


def make_checkpoint(directory: Path, tokenizer: Tokenizer, **shape) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size + 4, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         context_length=64, init_std=0.1, **shape)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    tokenizer.save(directory / "tok")
    write_checkpoint(directory / "ckpt", model, directory / "tok")
    return model


def read(path: Path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> float32 torch tensor in PyTorch's (rows, cols) order) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (torch.from_numpy(data.astype("float32").copy()), t.tensor_type)
    return fields, tensors


def expected_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """What llama.cpp should find, computed independently from fmforge's parameters."""
    c, s = model.config, dict(model.named_parameters())
    out = {"token_embd.weight": s["embed_tokens.weight"], "output_norm.weight": s["norm.weight"]}
    if not c.tie_embeddings:
        out["output.weight"] = s["lm_head.weight"]
    for i in range(c.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = s[p + "input_layernorm.weight"]
        out[b + "ffn_norm.weight"] = s[p + "post_attention_layernorm.weight"]
        out[b + "attn_q.weight"] = permute_for_gguf(s[p + "self_attn.q_proj.weight"], c.n_head)
        out[b + "attn_k.weight"] = permute_for_gguf(s[p + "self_attn.k_proj.weight"], c.n_kv_head)
        out[b + "attn_v.weight"] = s[p + "self_attn.v_proj.weight"]
        out[b + "attn_output.weight"] = s[p + "self_attn.o_proj.weight"]
        if c.attention_bias:
            out[b + "attn_q.bias"] = permute_for_gguf(s[p + "self_attn.q_proj.bias"], c.n_head)
            out[b + "attn_k.bias"] = permute_for_gguf(s[p + "self_attn.k_proj.bias"], c.n_kv_head)
            out[b + "attn_v.bias"] = s[p + "self_attn.v_proj.bias"]
        if c.n_experts:
            out[b + "ffn_gate_inp.weight"] = s[p + "mlp.router.weight"]
            for proj, name in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")]:
                out[b + name + ".weight"] = torch.stack([s[p + f"mlp.experts.{e}.{proj}.weight"]
                                                         for e in range(c.n_experts)])
        else:
            for proj, name in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]:
                out[b + name + ".weight"] = s[p + f"mlp.{proj}.weight"]
    return {k: v.detach() for k, v in out.items()}


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gguf_keys_and_tensors(shape, outtype, tokenizer, tmp_path):
    model = make_checkpoint(tmp_path, tokenizer, **SHAPES[shape])
    c = model.config
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(out), "--outtype", outtype]) == 0
    fields, tensors = read(out)

    tokenizer_json = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())
    vocab = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    vocab.update({t["id"]: t["content"] for t in tokenizer_json["added_tokens"]})
    expected_fields = {
        "general.architecture": "llama", "general.type": "model", "general.name": "ckpt",
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7}[outtype], "general.quantization_version": 2,
        "llama.vocab_size": c.vocab_size, "llama.context_length": c.context_length,
        "llama.embedding_length": c.n_embd, "llama.block_count": c.n_layer,
        "llama.feed_forward_length": c.moe_intermediate_size if c.n_experts else c.intermediate_size,
        "llama.attention.head_count": c.n_head, "llama.attention.head_count_kv": c.n_kv_head,
        "llama.attention.key_length": c.head_dim, "llama.attention.value_length": c.head_dim,
        "llama.rope.dimension_count": c.head_dim, "llama.rope.freq_base": pytest.approx(c.rope_theta),
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(c.norm_eps),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": [vocab.get(i, f"[PAD{i}]") for i in range(c.vocab_size)],
        "tokenizer.ggml.token_type": [3 if i < 16 else (4 if i >= tokenizer.vocab_size else 1)
                                      for i in range(c.vocab_size)],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m
                                  for m in tokenizer_json["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": tokenizer.bos_id, "tokenizer.ggml.eos_token_id": tokenizer.eos_id,
        "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": tokenizer.chat_template,
    }
    if c.n_experts:
        expected_fields.update({"llama.expert_count": c.n_experts, "llama.expert_used_count": c.n_experts_per_token})
    assert fields == expected_fields

    expected = expected_tensors(model)
    assert set(tensors) == set(expected)
    Q = gguf.GGMLQuantizationType
    for name, (value, qtype) in tensors.items():
        reference = expected[name]
        assert value.shape == reference.shape, name
        if reference.ndim == 1 or name.endswith("ffn_gate_inp.weight") or outtype == "f32":
            assert qtype == Q.F32 and torch.equal(value, reference), name
        elif outtype == "f16":
            assert qtype == Q.F16 and torch.equal(value, reference.half().float()), name
        else:  # q8_0: blocks of 32 sharing one f16 scale; error at most half a step (+ the scale's f16 rounding)
            assert qtype == Q.Q8_0, name
            step = reference.reshape(-1, 32).abs().amax(-1, keepdim=True) / 127
            assert ((value.reshape(-1, 32) - reference.reshape(-1, 32)).abs() <= 0.6 * step).all(), name


def llama_cpp_forward(fields: dict, tensors: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, vocab) of llama.cpp's `llama` graph, from GGUF tensors alone (llama.cpp's conventions)."""
    w = {name: value for name, (value, _) in tensors.items()}
    n_head, n_kv = fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]
    d, eps, base = fields["llama.rope.dimension_count"], fields["llama.attention.layer_norm_rms_epsilon"], fields["llama.rope.freq_base"]
    T = ids.shape[0]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def rope_adjacent_pairs(x):  # (T, heads, d): rotate (x[2i], x[2i+1]) by pos * base^(-2i/d)  (ROPE_TYPE_NORM)
        angles = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).reshape(x.shape)

    def linear(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    x = w["token_embd.weight"][ids]
    for i in range(fields["llama.block_count"]):
        b = f"blk.{i}."
        h = rms(x, w[b + "attn_norm.weight"])
        q = rope_adjacent_pairs(linear(h, b + "attn_q").view(T, n_head, d)).transpose(0, 1)
        k = rope_adjacent_pairs(linear(h, b + "attn_k").view(T, n_kv, d)).transpose(0, 1)
        v = linear(h, b + "attn_v").view(T, n_kv, d).transpose(0, 1)
        k, v = k.repeat_interleave(n_head // n_kv, 0), v.repeat_interleave(n_head // n_kv, 0)
        scores = (q @ k.transpose(1, 2)) / d ** 0.5 + torch.full((T, T), float("-inf")).triu(1)
        x = x + linear((scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1), b + "attn_output")
        h = rms(x, w[b + "ffn_norm.weight"])
        if b + "ffn_gate_inp.weight" in w:
            probs = (h @ w[b + "ffn_gate_inp.weight"].T).softmax(-1)
            top, index = probs.topk(fields["llama.expert_used_count"], dim=-1)
            top = top / top.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for t in range(T):
                for weight, e in zip(top[t], index[t]):
                    gate, up, down = (w[b + f"ffn_{n}_exps.weight"][e] for n in ("gate", "up", "down"))
                    out[t] += weight * (down @ (F.silu(gate @ h[t]) * (up @ h[t])))
            x = x + out
        else:
            x = x + linear(F.silu(linear(h, b + "ffn_gate")) * linear(h, b + "ffn_up"), b + "ffn_down")
    x = rms(x, w["output_norm.weight"])
    return x @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("shape", list(SHAPES))
def test_gguf_tensors_compute_fmforge_logits_the_llama_cpp_way(shape, tokenizer, tmp_path):
    model = make_checkpoint(tmp_path, tokenizer, **SHAPES[shape])
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(out), "--outtype", "f32"]) == 0
    fields, tensors = read(out)
    ids = torch.tensor(tokenizer.encode("def wrap(text, width=70):\n    return text"))
    with torch.no_grad():
        expected = model(ids[None]).logits[0]
    assert (llama_cpp_forward(fields, tensors, ids) - expected).abs().max().item() <= 1e-4


def test_gguf_refuses_what_llama_cpp_cannot_run(tokenizer, tmp_path, capsys):
    make_checkpoint(tmp_path, tokenizer, qk_norm=True)
    capsys.readouterr()
    assert main(["export", "gguf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m.gguf")]) == 1
    err = capsys.readouterr().err
    assert "QK-norm" in err and err.count("\n") == 1
    assert not (tmp_path / "m.gguf").exists()


def test_pre_tokenizer_names():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": byte_level}) == "gpt-2"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": llama3}) == "llama-bpe"
    from fmforge.errors import TokenizerError
    with pytest.raises(TokenizerError, match="SentencePiece"):
        pre_tokenizer_name({"model": {"type": "BPE", "byte_fallback": True}, "pre_tokenizer": None})
