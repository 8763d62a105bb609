"""llama.cpp runs fmforge's GGUF exports: logits, greedy text and tokenization compared with fmforge's own.

Needs llama-cpp-python, which compiles llama.cpp from source (about 9 minutes on 2 cores), so it is a
benchmark-time check rather than a test:

    python -m venv /tmp/llcpp && /tmp/llcpp/bin/pip install numpy llama-cpp-python==0.3.36
    PYTHONPATH=/tmp/llcpp/lib/python3.11/site-packages .venv/bin/python benchmarks/llama_cpp_check.py

For each model variant (dense with GQA and tied embeddings; untied with q/k/v biases; Mixtral-style MoE;
Llama 3.1 RoPE scaling; and the dense model with Llama-3- and Qwen2-style pre-tokenizers), a random fmforge model and a byte-level
BPE tokenizer are made here, exported with `fmforge export gguf`
in f32, f16 and q8_0, and run by llama.cpp on the same prompt ids. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import random_model, save_checkpoint, stdlib_texts
from fmforge.cli import main as fmforge_main
from fmforge.config import ModelConfig
from fmforge.infer.engine import generate_once
from fmforge.infer.sampling import SamplingParams
from fmforge.model import Transformer
from fmforge.tokenizer import train_tokenizer

VARIANTS = {
    "dense, GQA, tied": dict(),
    "untied, q/k/v bias": dict(tie_embeddings=False, attention_bias=True, rope_theta=50000.0),
    "MoE 4 experts top-2": dict(tie_embeddings=False, n_experts=4, n_experts_per_token=2, moe_intermediate_size=128),
    # Llama 3.1's RoPE scaling with a short original context, so most frequencies are rescaled (rope_freqs).
    "Llama 3 RoPE scaling": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
}
PROMPT = "def wrap(text, width=70, **kwargs):\n    \"\"\"Wrap a single paragraph of text"
TOKENIZER_TEXT = "Hello wörld, ¿qué tal? 你好 — def f(x):\n\treturn x ** 2  # done 1234567 times\n\n  it's"


def pre_tokenized_tokenizer(text: str, regex: str):
    """A byte-level BPE tokenizer whose pre-tokenizer is Split(regex) + ByteLevel, as Llama 3 and Qwen2 have."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from fmforge.tokenizer import SPECIAL_TOKENS, Tokenizer

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(rust)


def make_checkpoint(directory: Path, tokenizer, **shape) -> tuple[Transformer, Path]:
    """A random 2-layer model whose norm gains and biases are not their initial 1 and 0 (so that an exporter
    that drops them is caught), written as a checkpoint with `tokenizer`."""
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=128, n_head=4, n_kv_head=2,
                         context_length=128, init_std=0.05, **shape)
    model = random_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model, save_checkpoint(directory, model, tokenizer)


def llama_cpp_run(path: Path, prompt: list[int], n_new: int):
    """(logits of the prompt (T, V), greedy continuation ids, llama.cpp's tokenization of TOKENIZER_TEXT)."""
    from llama_cpp import Llama

    # f32 KV cache (llama.cpp defaults to f16, which alone moves logits by ~1e-3).
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0,
                type_k=0, type_v=0)  # GGML_TYPE_F32
    llm.eval(prompt)
    logits = np.array(llm.scores[:len(prompt)], dtype=np.float32)
    generated = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    tokens = llm.tokenize(TOKENIZER_TEXT.encode("utf-8"), add_bos=False, special=False)
    return logits, generated, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=20)
    args = parser.parse_args()
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit("llama_cpp is not importable: install llama-cpp-python into a separate venv and put its "
                         "site-packages on PYTHONPATH (see this script's docstring)")
    (text,) = stdlib_texts("textwrap.py")
    from fmforge.interop.gguf import LLAMA3_REGEX, QWEN2_REGEX

    tokenizers = {"gpt-2": train_tokenizer([text], vocab_size=512),
                  "llama-bpe": pre_tokenized_tokenizer(text, LLAMA3_REGEX),
                  "qwen2": pre_tokenized_tokenizer(text, QWEN2_REGEX)}
    variants = [(name, shape, "gpt-2") for name, shape in VARIANTS.items()]
    variants += [("dense, GQA, tied", {}, pre) for pre in ("llama-bpe", "qwen2")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, shape, pre) in enumerate(variants):
            tokenizer = tokenizers[pre]
            prompt = tokenizer.encode(PROMPT)
            directory = Path(tmp) / f"variant-{index}"
            model, checkpoint = make_checkpoint(directory, tokenizer, **shape)
            with torch.no_grad():
                expected = model(torch.tensor([prompt])).logits[0].numpy()
            # fmforge's greedy continuation: the engine without speculation, and no stop ids (as the loop below).
            greedy = generate_once(model, tokenizer, prompt, SamplingParams(max_tokens=args.new_tokens, temperature=0),
                                   stop_ids=frozenset(), speculate=0).token_ids
            for outtype in ("f32", "f16", "q8_0"):
                gguf_path = directory / f"model-{outtype}.gguf"
                assert fmforge_main(["export", "gguf", str(checkpoint), "--out", str(gguf_path),
                                     "--outtype", outtype]) == 0
                logits, generated, tokens = llama_cpp_run(gguf_path, prompt, args.new_tokens)
                same_prefix = next((i for i, (a, b) in enumerate(zip(generated, greedy)) if a != b), len(greedy))
                rows.append((name, pre, outtype, float(np.abs(logits - expected).max()), float(np.abs(expected).max()),
                             f"{same_prefix}/{len(greedy)}", tokens == tokenizer.encode(TOKENIZER_TEXT)))
                print(f"{rows[-1]}", file=sys.stderr, flush=True)
    print(f"\nPrompt: {len(prompt)} tokens; greedy continuation of {args.new_tokens} tokens.\n")
    print("| model | tokenizer.ggml.pre | GGUF type | max abs logit diff | max abs logit | greedy tokens identical "
          "| tokenization identical |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for name, pre, outtype, diff, scale, same, tok in rows:
        print(f"| {name} | {pre} | {outtype} | {diff:.2e} | {scale:.2f} | {same} | {'yes' if tok else 'NO'} |")


if __name__ == "__main__":
    main()
