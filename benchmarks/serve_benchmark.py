"""Serving benchmark: fmforge's engine against `transformers` generate, and the server under concurrent load.

1. Single-stream decode (in process, greedy, same weights): fmforge's Engine (one request, driven by this thread
   through `Engine.complete`, with its default prompt-lookup speculation and with `speculate=0`, each eager and
   with the compiled decode step, `compile=True`) vs Hugging Face `LlamaForCausalLM.generate` (sdpa, KV cache,
   greedy) and, when `llama_cpp` is importable (a throwaway venv's site-packages on PYTHONPATH, see
   benchmarks/llama_cpp_check.py), llama.cpp on the checkpoint exported to GGUF f32. Every contender generates
   exactly the same number of tokens (no stop ids for the engine, `min_new_tokens` for transformers, no end-of-text
   stop in the llama.cpp loop). Rounds interleave the contenders; reported:
   median tokens/s of each and the median of the per-round ratios. The greedy outputs are compared token for token
   (a check that the models are the same).
2. The real server (`fmforge serve` in its own process, eager, with `--compile`, and with `--compile --dtype
   bfloat16`: bf16 weights and KV cache) with 1, 4 and 16
   concurrent streaming clients (httpx, one event loop in this process, /v1/completions with stream=true):
   aggregate generated tokens/s over the wall time of each wave (beside llama.cpp's single stream), time to first
   token (request sent -> first text chunk) p50 / p99 over all requests at that concurrency, and the CPU the
   clients themselves took (they share the machine with the server).

The model: the quickstart's trained model (runs/quickstart/model) when present — real weights matter here,
since speculation gains only where the model repeats itself — else random weights of the `base` preset with a
1024-token context. transformers' own prompt-lookup decoding runs as a fourth contender, so the comparison of
speculation against speculation is there too. The server and the in-process measurements never overlap.

    .venv/bin/python benchmarks/serve_benchmark.py --threads 2   # ~3 minutes; writes the "serve" section of RESULTS.md
    .venv/bin/python benchmarks/serve_benchmark.py --threads 1   # the "serve-threads1" section
    .venv/bin/python benchmarks/serve_benchmark.py --quick       # ~1 minute, prints only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import (REPO, RESULTS, describe_machine, git_state, hf_twin, random_model, save_checkpoint,
                     section_name, stdlib_tokenizer, write_section)

SECTION = "serve"


def random_checkpoint(work: Path, context: int) -> Path:
    """The `base` preset with random weights and the quickstart's tokenizer (a small stdlib one without it)."""
    from fmforge.config import model_config_from_preset
    from fmforge.tokenizer import Tokenizer

    quickstart = REPO / "runs" / "quickstart" / "tokenizer"
    tokenizer = (Tokenizer.load(quickstart) if (quickstart / "tokenizer.json").exists() else
                 stdlib_tokenizer(2048, ("difflib.py", "textwrap.py", "json/decoder.py", "string.py")))
    config = model_config_from_preset("base", vocab_size=tokenizer.vocab_size, context_length=context)
    return save_checkpoint(work, random_model(config), tokenizer)


def llama_cpp_contender(checkpoint: Path, prompt: list[int], new_tokens: int, threads: int, work: Path):
    """llama.cpp (llama-cpp-python, kept out of the project: a throwaway venv's site-packages on PYTHONPATH, as
    benchmarks/llama_cpp_check.py says) decoding the checkpoint exported to GGUF f32, greedy, `threads` threads,
    its default KV cache; None (with a line saying so) when llama_cpp is not importable."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        print("  llama.cpp: skipped (llama_cpp is not importable; see benchmarks/llama_cpp_check.py)", flush=True)
        return None
    import numpy as np
    from llama_cpp import Llama
    from fmforge.cli import main as fmforge_main
    from fmforge.checkpoint import read_model_config

    gguf = work / "model-f32.gguf"  # removed with the run's temporary directory
    if fmforge_main(["export", "gguf", str(checkpoint), "--out", str(gguf), "--outtype", "f32"]) != 0:
        raise SystemExit("fmforge export gguf failed")
    llm = Llama(model_path=str(gguf), n_ctx=read_model_config(checkpoint).context_length, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)

    vocab = llm.n_vocab()

    def run() -> tuple[float, list[int]]:
        started = time.perf_counter()
        llm.reset()
        llm.eval(prompt)
        generated = []
        for _ in range(new_tokens):
            # The last token's logits, straight from the context (llama-cpp-python 0.3 fills `scores` only with
            # logits_all, which computes the logits of every prompt token); greedy, no end-of-text stop.
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
            token = int(np.argmax(last))
            generated.append(token)
            llm.eval([token])
        return time.perf_counter() - started, generated
    run.close = llm.close  # freed before the interpreter exits (llama_cpp's finaliser fails at shutdown)
    return run


def single_stream(checkpoint: Path, rounds: int, prompt_text: str, new_tokens: int, threads: int,
                  work: Path) -> dict:
    """Greedy decoding of one prompt by fmforge's engine (with and without speculation, driven synchronously by
    this thread) and by transformers' generate (plain and with its own prompt lookup), in rotating order."""
    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.infer.engine import Engine, GenerationRequest
    from fmforge.infer.sampling import SamplingParams

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    model.eval()
    hf = hf_twin(model)
    prompt = tokenizer.encode(prompt_text, add_bos=True)
    new_tokens = min(new_tokens, model.config.context_length - len(prompt))
    engines = {"fmforge": Engine(model, tokenizer, max_batch=1, speculate=4),
               "fmforge-nospec": Engine(model, tokenizer, max_batch=1, speculate=0),
               "fmforge-compiled": Engine(model, tokenizer, max_batch=1, speculate=4, compile=True),
               "fmforge-compiled-nospec": Engine(model, tokenizer, max_batch=1, speculate=0, compile=True)}
    # No stop ids: every contender generates exactly new_tokens (transformers gets min_new_tokens for the same).
    request = GenerationRequest(prompt, SamplingParams(max_tokens=new_tokens, temperature=0), stop_ids=frozenset())

    def ours(engine) -> tuple[float, list[int]]:
        started = time.perf_counter()
        (completion,) = engine.complete([request])
        return time.perf_counter() - started, completion.token_ids

    def theirs(lookup: int | None) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt])
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        started = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True, **extra)
        return time.perf_counter() - started, out[0, len(prompt):].tolist()

    contenders = {name: (lambda engine=engine: ours(engine)) for name, engine in engines.items()}
    contenders |= {"hf": lambda: theirs(None), "hf-lookup": lambda: theirs(4)}
    llama = llama_cpp_contender(checkpoint, prompt, new_tokens, threads, work)
    if llama is not None:
        contenders["llama.cpp"] = llama
    for run in contenders.values():
        run()  # warm-up
    rows = []
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        rows.append({name: contenders[name]() for name in order})
        print(f"  round {r + 1}: " + ", ".join(f"{n} {new_tokens / rows[-1][n][0]:.0f}" for n in names) + " tok/s",
              flush=True)
    if llama is not None:
        llama.close()
    reference = rows[0]["hf"][1]
    result = {"new_tokens": new_tokens, "prompt_tokens": len(prompt)}
    for n in names:
        result[n] = {"tok_s": statistics.median(new_tokens / row[n][0] for row in rows),
                     "vs_hf": statistics.median(row["hf"][0] / row[n][0] for row in rows),
                     "same_tokens": sum(a == b for a, b in zip(rows[0][n][1], reference))}
        if "llama.cpp" in names:
            result[n]["vs_llama"] = statistics.median(row["llama.cpp"][0] / row[n][0] for row in rows)
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


async def client_wave(url: str, level: int, new_tokens: int) -> list[tuple[float | None, int]]:
    """`level` concurrent streaming requests from one event loop (one connection each): (TTFT, completion tokens)
    per request. One loop, not a thread per client, so that the clients take little of the CPUs the server uses."""
    import httpx

    async def one(http: httpx.AsyncClient, i: int) -> tuple[float | None, int]:
        body = {"model": "base", "prompt": f"def function_{i}(", "max_tokens": new_tokens, "stream": True,
                "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True},
                "logit_bias": {"1": -100, "2": -100}}
        sent, first, usage = time.perf_counter(), None, 0
        async with http.stream("POST", url + "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - sent
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        return first, usage

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=level)) as http:
        return await asyncio.gather(*(one(http, i) for i in range(level)))


def concurrent_load(checkpoint: Path, levels: list[int], waves: int, new_tokens: int, max_batch: int,
                    compile: bool = False, dtype: str | None = None) -> list[dict]:
    import httpx

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    flags = [*(["--compile"] if compile else []), *(["--dtype", dtype] if dtype else [])]
    server = subprocess.Popen([sys.executable, "-m", "fmforge.cli", "serve", "--checkpoint", str(checkpoint),
                               "--port", str(port), "--max-batch", str(max_batch), "--log-level", "warning",
                               *flags],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(1500):  # compiling takes up to a minute
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            log.seek(0)
            raise RuntimeError("server did not start:\n" + log.read())
        results = []
        asyncio.run(client_wave(url, 1, 8))  # warm-up
        for level in levels:
            ttft, tokens, seconds, cpu = [], 0, 0.0, 0.0
            for _ in range(waves):
                started, cpu_started = time.perf_counter(), time.process_time()
                out = asyncio.run(client_wave(url, level, new_tokens))
                seconds += time.perf_counter() - started
                cpu += time.process_time() - cpu_started
                tokens += sum(u for _, u in out)
                ttft += [f for f, _ in out]
            server_name = ("compiled" if compile else "eager") + (f"-{dtype}" if dtype else "")
            row = {"server": server_name, "flags": " ".join(flags), "streams": level, "tok_s": tokens / seconds,
                   "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "requests": len(ttft),
                   "client_cores": cpu / seconds}
            print(f"  {row['server']:8s} {level:2d} streams: {row['tok_s']:.0f} tok/s aggregate, "
                  f"TTFT p50 {row['ttft_p50'] * 1000:.0f} ms p99 {row['ttft_p99'] * 1000:.0f} ms, "
                  f"clients used {row['client_cores']:.2f} of a core", flush=True)
            results.append(row)
        return results
    finally:
        server.terminate()
        server.wait(60)


PROMPT = 'def parse_args(argv):\n    """Parse the command line."""\n'
LABELS = {"fmforge": "fmforge Engine (default: prompt-lookup speculation, 4 drafted tokens)",
          "fmforge-nospec": "fmforge Engine, `--speculate 0`",
          "fmforge-compiled": "fmforge Engine, `--compile` (speculation on)",
          "fmforge-compiled-nospec": "fmforge Engine, `--compile --speculate 0`",
          "hf": "transformers `generate` (greedy, KV cache)",
          "hf-lookup": "transformers `generate(prompt_lookup_num_tokens=4)`",
          "llama.cpp": "llama.cpp (llama-cpp-python 0.3.36, GGUF f32, greedy)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(REPO / "runs" / "quickstart" / "model"),
                        help="model to serve (default: the quickstart's; random weights if it is missing)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens; print only")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (every contender)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rounds, new_tokens, waves = (2, 64, 1) if args.quick else (6, 200, 2)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = Path(args.checkpoint)
        trained = checkpoint.exists()
        if not trained:
            checkpoint = random_checkpoint(Path(work), 1024)
        from fmforge.checkpoint import read_model_config, resolve_checkpoint
        checkpoint = resolve_checkpoint(checkpoint)
        config = read_model_config(checkpoint)
        shape = (f"{config.n_layer}x{config.n_embd}, vocab {config.vocab_size}, context {config.context_length}, "
                 f"{'trained: ' + str(args.checkpoint) if trained else 'random weights'}")
        print(f"model: {shape}", flush=True)
        print(f"single stream: greedy, {rounds} rounds", flush=True)
        single = single_stream(checkpoint, rounds, PROMPT, new_tokens, args.threads, Path(work))
        for name in LABELS:
            if name not in single:
                continue
            row = single[name]
            print(f"  {name:24s} {row['tok_s']:6.0f} tok/s  {row['vs_hf']:.2f}x hf  "
                  + (f"{row['vs_llama']:.2f}x llama.cpp  " if "vs_llama" in row else "")
                  + f"same tokens {row['same_tokens']}/{single['new_tokens']}", flush=True)
        n = min(new_tokens, config.context_length - 16)
        print(f"server: {n} tokens per request, concurrency 1/4/16, {waves} wave(s) each", flush=True)
        load = (concurrent_load(checkpoint, [1, 4, 16], waves, n, max_batch=16)
                + concurrent_load(checkpoint, [1, 4, 16], waves, n, max_batch=16, compile=True)
                + concurrent_load(checkpoint, [1, 4, 16], waves, n, max_batch=16, compile=True, dtype="bfloat16"))
    if args.quick or args.no_write:
        return
    lines = [
        f"## Serving: fmforge engine vs transformers generate; the server under concurrent streams "
        f"({args.threads} thread{'s' if args.threads > 1 else ''})",
        "",
        f"Command: `.venv/bin/python benchmarks/serve_benchmark.py {' '.join(sys.argv[1:])}` "
        f"({time.strftime('%Y-%m-%d')}, {git_state()}). Machine: {describe_machine(args.threads)}. "
        f"Model: {shape}; fp32 unless the row says bfloat16.",
        "",
        f"**Single stream** (in process; prompt {single['prompt_tokens']} tokens, {single['new_tokens']} new tokens, "
        f"greedy; {rounds} rounds, contenders in rotating order; medians; ratio = median of per-round ratios):",
        "",
        "| engine | tokens/s | vs transformers generate | vs llama.cpp | same greedy tokens as generate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        if name not in single:
            continue
        row = single[name]
        vs_llama = f"{row['vs_llama']:.2f}x" if "vs_llama" in row else "–"
        lines.append(f"| {label} | {row['tok_s']:.0f} | {row['vs_hf']:.2f}x | {vs_llama} | "
                     f"{row['same_tokens']}/{single['new_tokens']} |")
    lines += [
        "",
        f"**Server** (`fmforge serve`, 16 slots, a separate process; each request streams {n} tokens from "
        f"/v1/completions at temperature 0.8; {waves} wave(s) per level; TTFT = request sent -> first text chunk):",
        "",
        "| server | concurrent streams | aggregate tokens/s | vs llama.cpp single stream | TTFT p50 | TTFT p99 "
        "| clients' CPU (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    llama = single.get("llama.cpp", {}).get("tok_s")
    for row in load:
        vs_llama = f"{row['tok_s'] / llama:.2f}x" if llama else "–"
        lines.append(f"| `fmforge serve` {row['flags']} | {row['streams']} | "
                     f"{row['tok_s']:.0f} | {vs_llama} | {row['ttft_p50'] * 1000:.0f} ms | "
                     f"{row['ttft_p99'] * 1000:.0f} ms | {row['client_cores']:.2f} |")
    for server in ("eager", "compiled", "compiled-bfloat16"):
        rows = [row for row in load if row["server"] == server]
        lines += ["", f"Batching gain over one stream ({server}): " + ", ".join(
            f"{row['streams']} streams {row['tok_s'] / rows[0]['tok_s']:.1f}x" for row in rows[1:]) + "."]
    section = section_name(SECTION, args.threads)
    write_section(section, "\n".join(lines))
    print(f"written: {RESULTS.name} (section {section})")


if __name__ == "__main__":
    main()
