"""Where a serving-engine decode step spends its time: cProfile of the engine generating through its public API
(`Engine.complete`, driven by this thread, no engine thread), for batches of 16 (seeded sampling with a logit bias,
unseeded sampling, greedy) and 1 (greedy). Plain decoding throughout (speculate=0), so every step is one forward.

    .venv/bin/python benchmarks/engine_profile.py               # CPU here; `python3 benchmarks/engine_profile.py` on a GPU
    .venv/bin/python benchmarks/engine_profile.py --tokens 4    # a smoke test

A random `small` model (6 x 256, context 512; bf16 on a GPU) and a 2,048-token tokenizer trained on two stdlib
modules; each batch generates --tokens tokens per sequence after a --warmup-token pass, and the time per step
counts the prefill too (one forward of the prompts). On the H200 this found cuDNN attention planning a new kernel
for every new key span (RESULTS.md, section gpu_check). Prints only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from _common import random_model, stdlib_tokenizer

CASES = [("B16 seeded t0.8 bias", 16, dict(temperature=0.8, seed=1, logit_bias={1: -100.0})),
         ("B16 unseeded t0.8", 16, dict(temperature=0.8)),
         ("B16 greedy", 16, dict(temperature=0)),
         ("B1 greedy", 1, dict(temperature=0))]


def main() -> None:
    from fmforge.config import model_config_from_preset
    from fmforge.infer.engine import Engine, GenerationRequest
    from fmforge.infer.sampling import SamplingParams

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=60, help="tokens per sequence in the profiled pass")
    parser.add_argument("--warmup-tokens", type=int, default=10, help="tokens per sequence in the warm-up pass")
    parser.add_argument("--rows", type=int, default=14, help="functions shown per case, by own time")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(False)
    tokenizer = stdlib_tokenizer(2048)
    config = model_config_from_preset("small", vocab_size=tokenizer.vocab_size, context_length=512)
    model = random_model(config).to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    prompt = tokenizer.encode("def parse_args(argv):\n", add_bos=True)

    def generate(engine: Engine, batch: int, tokens: int, sampling: dict) -> None:
        # No stop ids: every sequence generates exactly `tokens`, so a step always holds the whole batch.
        requests = [GenerationRequest(prompt, SamplingParams(max_tokens=tokens, **sampling), stop_ids=frozenset())
                    for _ in range(batch)]
        engine.complete(requests)
        if device == "cuda":
            torch.cuda.synchronize()

    for label, batch, sampling in CASES:
        engine = Engine(model, tokenizer, max_batch=16, speculate=0)
        generate(engine, batch, args.warmup_tokens, sampling)
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        generate(engine, batch, args.tokens, sampling)
        profile.disable()
        seconds = time.perf_counter() - started
        print(f"\n### {label}: {batch * args.tokens / seconds:.0f} tok/s, {seconds / args.tokens * 1000:.1f} ms/step",
              flush=True)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.rows)
        print(text.getvalue()[-3500:], flush=True)


if __name__ == "__main__":
    main()
