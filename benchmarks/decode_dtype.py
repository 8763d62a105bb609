"""The engine's batched decode by weight dtype: 16 concurrent sampled streams through fmforge's Engine in process
(compiled decode steps, no speculation, no server), fp32 against bf16 weights and KV cache, at 1 and 2 threads.
A probe for issue 17's 16-stream target, not a peer comparison (serve_benchmark.py has llama.cpp side by side).

    .venv/bin/python benchmarks/decode_dtype.py          # ~4 minutes (each run compiles for ~40 s); prints only

The model is the quickstart's shape (preset `small`: 6 x 256, context 256) with random weights and a 4,096-token
BPE tokenizer trained on four stdlib modules; end-of-turn tokens get a logit bias of -100 so every stream runs its
200 tokens. Each (threads, dtype) runs in its own process, one after the other.
"""

from __future__ import annotations

import subprocess
import sys
import time

STREAMS, TOKENS = 16, 200


def run(threads: int, dtype_name: str) -> None:
    import torch

    from _common import random_model, stdlib_tokenizer
    from fmforge.config import model_config_from_preset
    from fmforge.infer.engine import Engine, GenerationRequest
    from fmforge.infer.sampling import SamplingParams

    torch.set_num_threads(threads)
    tokenizer = stdlib_tokenizer(4096, ("textwrap.py", "difflib.py", "argparse.py", "typing.py"))
    model = random_model(model_config_from_preset("small", vocab_size=tokenizer.vocab_size))
    engine = Engine(model.to(getattr(torch, dtype_name)), tokenizer, max_batch=STREAMS, speculate=0, compile=True)
    no_end = {i: -100.0 for i in tokenizer.chat_stop_ids()}
    prompts = [tokenizer.encode(f"def f{i}(x):\n    return", add_bos=True) for i in range(STREAMS)]

    def requests(n: int) -> list:
        return [GenerationRequest(p, SamplingParams(max_tokens=n, temperature=0.8, seed=i, logit_bias=no_end))
                for i, p in enumerate(prompts)]

    engine.complete(requests(20))  # warm: the compiled graphs are built at start, this runs them once
    start = time.perf_counter()
    tokens = sum(len(o.token_ids) for o in engine.complete(requests(TOKENS)))
    print(f"| {threads} | {dtype_name} | {tokens} | {tokens / (time.perf_counter() - start):,.0f} |", flush=True)


def main() -> None:
    print(f"{STREAMS} streams x {TOKENS} tokens, compiled decode, in process\n")
    print("| threads | weights and KV cache | tokens | tokens/s |\n|---:|---|---:|---:|", flush=True)
    for threads in (1, 2):
        for dtype_name in ("float32", "bfloat16"):
            subprocess.run([sys.executable, __file__, str(threads), dtype_name], check=True)


if __name__ == "__main__":
    if len(sys.argv) == 3:
        run(int(sys.argv[1]), sys.argv[2])
    else:
        main()
