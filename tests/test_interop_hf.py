"""Hugging Face interop, proven against transformers itself: tiny random models of each family are saved with
`save_pretrained`, imported with `fmforge import hf`, compared (logits, greedy text, tokenizer), exported
with `fmforge export hf` and loaded back with `AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import json
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import write_tiny_checkpoint  # noqa: E402
from fmforge.cli import main  # noqa: E402
from fmforge.infer.engine import generate_once  # noqa: E402
from fmforge.infer.sampling import SamplingParams  # noqa: E402
from fmforge.tokenizer import Tokenizer, train_tokenizer  # noqa: E402
from fmforge.checkpoint import load_model  # noqa: E402

VOCAB = 320
MULTILINGUAL = "Hello wörld — 你好, мир! 🙂 ¿Qué tal? नमस्ते <s> def f(x):\n\treturn x ** 2"
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
FAMILIES = {
    "llama": ("LlamaConfig", dict(rope_theta=50000.0)),
    "llama-tied-bias": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, num_key_value_heads=4)),
    "mistral": ("MistralConfig", dict(sliding_window=4096)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, rope_theta=1e6)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=1)),
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer trained here on a stdlib module, saved by transformers."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<s>", "</s>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator([text], trainer)
    out = tmp_path_factory.mktemp("hf-tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>").save_pretrained(out)
    return out


def make_hf_model(family: str, directory: Path, tokenizer_dir: Path, seed: int = 0, **overrides):
    """A random tiny model of `family`, saved with its tokenizer as a Hugging Face model directory."""
    config_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**SHAPE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make every tensor count
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias") and "o_proj" not in name:
                p.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if family.startswith("qwen"):  # Qwen tokenizers have no bos token
        tokenizer.bos_token = None
        tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(directory)
    return model


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def fmforge_greedy(model, prompt: list[int], n: int) -> list[int]:
    return generate_once(model, None, prompt, SamplingParams(max_tokens=n, temperature=0.0)).token_ids


def batch(seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_then_export_matches_transformers(family, hf_tokenizer, tmp_path):
    source, checkpoint, exported = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "exported"
    reference = make_hf_model(family, source, hf_tokenizer)
    assert main(["import", "hf", str(source), "--out", str(checkpoint)]) == 0

    model, _ = load_model(checkpoint)
    ids = batch()
    with torch.no_grad():
        expected = reference(ids).logits
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4
    prompt = ids[0, :6].tolist()
    assert fmforge_greedy(model, prompt, 20) == hf_greedy(reference, prompt, 20)

    hf_tokenizer_loaded = transformers.AutoTokenizer.from_pretrained(source)
    fm_tokenizer = Tokenizer.load(checkpoint)
    expected_ids = hf_tokenizer_loaded(MULTILINGUAL, add_special_tokens=False)["input_ids"]
    assert fm_tokenizer.encode(MULTILINGUAL, allow_special=True) == expected_ids
    assert fm_tokenizer.decode(expected_ids) == MULTILINGUAL

    assert main(["export", "hf", str(checkpoint), "--out", str(exported)]) == 0
    round_trip = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(round_trip) is type(reference)
    assert json.loads((exported / "config.json").read_text())["model_type"] == reference.config.model_type
    with torch.no_grad():
        assert (round_trip(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    assert hf_greedy(round_trip, prompt, 20) == fmforge_greedy(model, prompt, 20)
    exported_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert exported_tokenizer(MULTILINGUAL, add_special_tokens=False)["input_ids"] == expected_ids


def test_import_sharded_checkpoint(hf_tokenizer, tmp_path):
    source = tmp_path / "hf"
    config_class, extra = FAMILIES["llama"]
    reference = make_hf_model("llama", tmp_path / "unused", hf_tokenizer)
    reference.save_pretrained(source, max_shard_size="40KB")
    transformers.AutoTokenizer.from_pretrained(hf_tokenizer).save_pretrained(source)
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) > 2 and (source / "model.safetensors.index.json").exists()

    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    model, _ = load_model(tmp_path / "ckpt")
    ids = batch()
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-4

    # And the other way: a sharded export that transformers reads back.
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--max-shard-size", "50KB"]) == 0
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    round_trip = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert (round_trip(ids).logits - reference(ids).logits).abs().max().item() <= 1e-4


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    (dict(intermediate_size=128), "has shape"),
    (dict(num_hidden_layers=3), "missing"),
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture: model_type 'gpt2'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_import_refuses_what_it_cannot_represent(change, message, hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    make_hf_model("llama", source, hf_tokenizer)
    _edit_config(source, **change)
    capsys.readouterr()
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "ckpt").exists()


def test_import_refuses_a_nonzero_output_bias(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    model = make_hf_model("llama-tied-bias", source, hf_tokenizer)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.bias.fill_(0.5)
    model.save_pretrained(source)
    capsys.readouterr()
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 1
    assert "o_proj.bias is not zero" in capsys.readouterr().err


def test_a_mistral_sliding_window_imports_as_model_sliding_window(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    reference = make_hf_model("mistral", source, hf_tokenizer, sliding_window=32)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    model, _ = load_model(tmp_path / "ckpt")
    assert (model.config.context_length, model.config.sliding_window) == (128, 32)
    ids = batch(shape=(2, 96))  # three windows long: the window is really applied
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-4
    # Exporting gives back the source's context and window, so transformers behaves as before.
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["max_position_embeddings"], config["sliding_window"]) == (128, 32)


def test_a_qwen_window_on_some_layers_limits_the_context(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    reference = make_hf_model("qwen2", source, hf_tokenizer, sliding_window=32, use_sliding_window=True,
                              max_window_layers=1)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    assert "sliding window of 32" in capsys.readouterr().err
    model, _ = load_model(tmp_path / "ckpt")
    assert (model.config.context_length, model.config.sliding_window) == (32, None)
    ids = batch(shape=(2, 32))
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-4


def test_import_keeps_bfloat16_and_fmforge_commands_run(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    make_hf_model("qwen2", source, hf_tokenizer).to(torch.bfloat16).save_pretrained(source)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt"), "--context-length", "64"]) == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert f.get_slice("embed_tokens.weight").get_dtype() == "BF16"
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "def wrap(",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def wrap(")


@pytest.fixture(scope="module")
def fmforge_tokenizer() -> Tokenizer:
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    return train_tokenizer([text], vocab_size=360)


@pytest.mark.parametrize("shape, family", [
    (dict(), "llama"),
    (dict(tie_embeddings=False, attention_bias=True), "qwen2"),
    (dict(qk_norm=True, attention_bias=True, head_dim=32), "qwen3"),
    (dict(n_experts=4, n_experts_per_token=2, moe_intermediate_size=64, tie_embeddings=False), "mixtral"),
])
def test_export_fmforge_model(shape, family, fmforge_tokenizer, tmp_path):
    model = write_tiny_checkpoint(tmp_path, fmforge_tokenizer, **shape)
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.model_type == family
    ids = batch(shape=(2, 20)) % fmforge_tokenizer.vocab_size
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max().item() <= 1e-4
    assert hf_greedy(hf, ids[0, :5].tolist(), 20) == fmforge_greedy(model, ids[0, :5].tolist(), 20)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tokenizer(MULTILINGUAL, add_special_tokens=False)["input_ids"] == fmforge_tokenizer.encode(MULTILINGUAL)
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False) == fmforge_tokenizer.apply_chat_template(messages)


def test_export_bfloat16_and_refuse_shared_experts(fmforge_tokenizer, tmp_path, capsys):
    write_tiny_checkpoint(tmp_path, fmforge_tokenizer)
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16

    moe = tmp_path / "moe"
    moe.mkdir()
    write_tiny_checkpoint(moe, fmforge_tokenizer, n_experts=4, n_shared_experts=1, moe_intermediate_size=64)
    assert main(["export", "hf", str(moe / "ckpt"), "--out", str(tmp_path / "out2")]) == 1
    assert "shared experts" in capsys.readouterr().err


def test_output_directories_are_never_clobbered(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    make_hf_model("llama", source, hf_tokenizer)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["import", "hf", str(source), "--out", str(source)]) == 1
    assert "overlaps the input" in capsys.readouterr().err
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "notes")]) == 1
    assert "other than an fmforge checkpoint" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0  # re-import replaces it
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "notes")]) == 1
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ckpt")]) == 1
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


def test_import_completes_older_tokenizer_files(hf_tokenizer, tmp_path):
    """Special tokens named only in special_tokens_map.json or by id in config.json; chat template in a file."""
    source = tmp_path / "hf"
    make_hf_model("llama", source, hf_tokenizer)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("bos_token", None)
    config.pop("eos_token", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    (source / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    _edit_config(source, bos_token_id=0)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    tokenizer = Tokenizer.load(tmp_path / "ckpt")
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_id, tokenizer.eos_id) == ("<s>", "</s>", 0, 1)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi</s>"


@pytest.mark.parametrize("shape, targets", [
    (dict(), "all-linear"),
    (dict(qk_norm=True, attention_bias=True, head_dim=32), "all-linear"),
    (dict(n_experts=4, n_experts_per_token=2, moe_intermediate_size=64, tie_embeddings=False), "q_proj,v_proj"),
    (dict(tie_embeddings=False), "all-linear,embed_tokens"),
    (dict(), "embed_tokens,q_proj"),  # tied: the embedding adapter changes the input side only
])
def test_lora_adapter_exports_for_peft(shape, targets, fmforge_tokenizer, tmp_path):
    """A LoRA adapter written by fmforge loads with peft onto the exported model, unmerged, with the same logits."""
    peft = pytest.importorskip("peft")
    from fmforge.checkpoint import fingerprint_checkpoint
    from fmforge.adapt.lora import (LoRAConfig, LoRAEmbedding, inject_lora, lora_modules,
                                    write_adapter)

    model = write_tiny_checkpoint(tmp_path, fmforge_tokenizer, **shape)
    lora = LoRAConfig(rank=4, alpha=8.0, target_modules=targets)
    inject_lora(model, lora)
    with torch.no_grad():  # as if trained: the zero-initialised factor moves away from zero
        for module in lora_modules(model).values():
            if isinstance(module, LoRAEmbedding):
                module.lora_embedding_A.normal_(0.0, 0.1)
            else:
                module.lora_B.weight.normal_(0.0, 0.1)
    write_adapter(tmp_path / "code-adapter", model, lora, tmp_path / "ckpt", fingerprint_checkpoint(tmp_path / "ckpt"))

    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--adapter", str(tmp_path / "code-adapter")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = batch(shape=(2, 20)) % fmforge_tokenizer.vocab_size
    with torch.no_grad():
        plain = base(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapters" / "code-adapter").eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # a clean PEFT config
    assert isinstance(adapted.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.Linear)  # unmerged
    with torch.no_grad():
        expected = model(ids).logits
        assert (adapted(ids).logits - expected).abs().max().item() <= 1e-4
        assert (plain - expected).abs().max().item() > 1e-2  # the adapter matters
        if "embed_tokens" in targets:
            embed = adapted.base_model.model.model.embed_tokens
            assert isinstance(embed, peft.tuners.lora.Embedding)
            assert (embed.lora_embedding_A["default"] - model.embed_tokens.lora_embedding_A).abs().max() == 0
        if "embed_tokens" in targets and shape.get("tie_embeddings", True):
            return  # PEFT merges into the table the head shares (fmforge's merge unties them: test_finetune)
        merged = adapted.merge_and_unload()
        assert (merged(ids).logits - expected).abs().max().item() <= 1e-4


def test_adapter_of_another_base_is_refused(fmforge_tokenizer, tmp_path, capsys):
    from fmforge.adapt.lora import LoRAConfig, inject_lora, write_adapter

    model = write_tiny_checkpoint(tmp_path, fmforge_tokenizer)
    inject_lora(model, LoRAConfig(rank=2))
    write_adapter(tmp_path / "adapter", model, LoRAConfig(rank=2), tmp_path / "ckpt", "0" * 64)
    capsys.readouterr()
    assert main(["export", "hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"),
                 "--adapter", str(tmp_path / "adapter")]) == 1
    assert "different base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_imported_model_can_be_specialised_and_evaluated(hf_tokenizer, tmp_path, capsys):
    source = tmp_path / "hf"
    make_hf_model("llama", source, hf_tokenizer)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt"), "--context-length", "64"]) == 0
    records = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i}"} for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["finetune", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--task", "completion",
                 "--out", str(tmp_path / "lora"), "--max_steps", "3", "--batch_size", "4",
                 "--eval_interval", "3", "--checkpoint_interval", "3", "--precision", "fp32"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--adapter", str(tmp_path / "lora"),
                 "--tasks", f"completion:{data}", "--limit", "4"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out


def test_imported_model_is_served_with_a_specialist(hf_tokenizer, tmp_path):
    """`fmforge serve` on an imported Qwen2 (attention biases) and a LoRA adapter for it: the served greedy
    completion is what transformers generates from the original Hugging Face model."""
    import httpx

    from conftest import ServerProcess, make_adapter

    source = tmp_path / "hf"
    hf_model = make_hf_model("qwen2", source, hf_tokenizer)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt"), "--context-length", "64"]) == 0
    adapter = make_adapter(tmp_path / "ckpt", tmp_path / "lora", 3, ["q_proj", "v_proj", "up_proj"], 4)
    prompt = batch(seed=5, shape=(1, 10))[0].tolist()
    expected = hf_greedy(hf_model, prompt, 12)
    tokenizer = Tokenizer.load(tmp_path / "ckpt")
    if tokenizer.eos_id in expected:
        expected = expected[:expected.index(tokenizer.eos_id)]
    server = ServerProcess("--checkpoint", str(tmp_path / "ckpt"), "--adapter", f"spec={adapter}")
    try:
        texts = {}
        for model in ("base", "spec"):
            r = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
            assert r.status_code == 200, r.text
            texts[model] = r.json()["choices"][0]["text"]
        assert texts["base"].startswith(tokenizer.decode(expected)) and len(expected) > 0
        assert texts["spec"] != texts["base"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "spec", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop() == 0, server.output()


def test_imported_model_chats_in_the_terminal(hf_tokenizer, tmp_path):
    """`fmforge chat` on an imported Qwen2 whose template ends turns with <|im_end|> (no <|end|> token)."""
    from conftest import run_cli

    source = tmp_path / "hf"
    make_hf_model("qwen2", source, hf_tokenizer)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt"), "--context-length", "64"]) == 0
    result = run_cli("chat", "--checkpoint", str(tmp_path / "ckpt"), "--max-new-tokens", "6", "--temperature", "0",
                     input_text="hello\nagain\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2
