"""Interop benchmark: import + export time and peak memory for a ~500M-parameter random Llama-shaped model,
against transformers' own `from_pretrained` of the same directory.

    .venv/bin/python benchmarks/interop_benchmark.py [--work /tmp/fmforge-interop-bench] [--keep]
    .venv/bin/python benchmarks/interop_benchmark.py --tiny     # a 2-layer model: checks the script in seconds

The model is made here with transformers (random weights, bfloat16, saved in 500 MB shards, a byte-level BPE
tokenizer trained on a stdlib module), then every step runs in its own fresh Python process so that its
peak resident memory (VmHWM) is its own. "over baseline" subtracts the process's peak right after its
imports, i.e. what the step itself added. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, stdlib_texts

# Llama-like, 24 layers x 1280 wide with GQA and a 32k vocabulary: 495M parameters.
SHAPE = dict(vocab_size=32000, hidden_size=1280, intermediate_size=3456, num_hidden_layers=24,
             num_attention_heads=20, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
TINY_SHAPE = dict(SHAPE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)

# Peak resident set from /proc (VmHWM): unlike ru_maxrss it restarts at exec, so it is this process's own.
# Pages of memory-mapped safetensors files that were read count as resident too. The step's process finds
# _common through PYTHONPATH.
MEASURE = """
import sys, time, json
from _common import proc_status_kib
{imports}
baseline = proc_status_kib("VmHWM") / 1024
start = time.perf_counter()
{action}
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak_mb": proc_status_kib("VmHWM") / 1024, "baseline_mb": baseline}}))
"""

STEPS = {
    "transformers from_pretrained (reference)": (
        "import torch, transformers",
        "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')",
        ["{hf}"]),
    "transformers from_pretrained + read every weight": (
        "import torch, transformers",
        "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')\n"
        "total = sum(float(p.float().sum()) for p in model.parameters())",
        ["{hf}"]),
    "fmforge import hf": (
        "from fmforge.cli import main",
        "assert main(['import', 'hf', sys.argv[1], '--out', sys.argv[2]]) == 0",
        ["{hf}", "{ckpt}"]),
    "fmforge load_model (fp32, for scale)": (
        "from fmforge.checkpoint import load_model",
        "model, _ = load_model(sys.argv[1])",
        ["{ckpt}"]),
    "fmforge export hf": (
        "from fmforge.cli import main",
        "assert main(['export', 'hf', sys.argv[1], '--out', sys.argv[2], '--max-shard-size', '500MB']) == 0",
        ["{ckpt}", "{exported}"]),
    "transformers from_pretrained of the export": (
        "import torch, transformers",
        "model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')",
        ["{exported}"]),
    "fmforge export gguf --outtype f16": (
        "from fmforge.cli import main",
        "assert main(['export', 'gguf', sys.argv[1], '--out', sys.argv[2], '--outtype', 'f16']) == 0",
        ["{ckpt}", "{gguf_f16}"]),
    "fmforge export gguf --outtype q8_0": (
        "from fmforge.cli import main",
        "assert main(['export', 'gguf', sys.argv[1], '--out', sys.argv[2], '--outtype', 'q8_0']) == 0",
        ["{ckpt}", "{gguf_q8}"]),
}


def make_model(directory: Path, shape: dict) -> int:
    """Save a random Llama of `shape` in bfloat16 with a small trained tokenizer. Returns the parameter count."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # normal(0, 0.02) like transformers' init, without its slow per-module pass
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, max_shard_size="500MB")
    del model
    (text,) = stdlib_texts("textwrap.py")
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator([text], trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return count


def run_step(imports: str, action: str, args: list[str]) -> dict:
    code = MEASURE.format(imports=imports, action=action)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"step failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def directory_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/fmforge-interop-bench")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model: checks the script itself")
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    paths = {"hf": work / "hf", "ckpt": work / "ckpt", "exported": work / "exported",
             "gguf_f16": work / "model-f16.gguf", "gguf_q8": work / "model-q8_0.gguf"}
    started = time.perf_counter()
    count = make_model(paths["hf"], TINY_SHAPE if args.tiny else SHAPE)
    print(f"random model: {count / 1e6:.0f}M parameters, bfloat16, {directory_mb(paths['hf']):.0f} MB in "
          f"{len(list(paths['hf'].glob('*.safetensors')))} shards (made in {time.perf_counter() - started:.0f}s)",
          file=sys.stderr)
    rows = []
    for name, (imports, action, step_args) in STEPS.items():
        result = run_step(imports, action, [a.format(**{k: str(v) for k, v in paths.items()}) for a in step_args])
        rows.append((name, result))
        print(f"{name}: {result['seconds']:.1f}s, peak {result['peak_mb']:.0f} MB "
              f"({result['peak_mb'] - result['baseline_mb']:.0f} MB over baseline)", file=sys.stderr)
    print(f"\nModel: Llama-shaped, {count / 1e6:.0f}M parameters, bfloat16 safetensors "
          f"({directory_mb(paths['hf']):.0f} MB, 500 MB shards). Outputs: checkpoint "
          f"{directory_mb(paths['ckpt']):.0f} MB, HF export {directory_mb(paths['exported']):.0f} MB, GGUF f16 "
          f"{directory_mb(paths['gguf_f16']):.0f} MB, GGUF q8_0 {directory_mb(paths['gguf_q8']):.0f} MB.\n")
    print("| step | time (s) | peak RSS (MB) | over baseline (MB) |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows:
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
