"""Serving benchmark: fmforge's engine against `transformers` generate, and the server under concurrent load.

1. Single-stream decode (in process, greedy, same weights): fmforge's Engine (continuous-batching engine, one
   request) vs Hugging Face `LlamaForCausalLM.generate` (sdpa, KV cache, greedy, `min_new_tokens` = the length so
   neither stops early). Rounds interleave the two; reported: median tokens/s of each and the median of the
   per-round ratios. Both greedy outputs are compared token for token (a check that the models are the same).
2. The real server (`fmforge serve` in its own process) with 1, 4 and 16 concurrent streaming clients (threads,
   httpx, /v1/completions with stream=true): aggregate generated tokens/s over the wall time of each wave, and
   time to first token (request sent -> first text chunk) p50 / p99 over all requests at that concurrency.

The model: random weights of fmforge's `base` preset (6 x 384, GQA off) with a 1024-token context and the
tokenizer of the quickstart run if present (else one trained here on a few stdlib modules); weights do not
change speed. The server process and the HF/engine measurements never run at the same time.

    .venv/bin/python benchmarks/serve_benchmark.py            # ~4 minutes; writes the "serve" section of RESULTS.md
    .venv/bin/python benchmarks/serve_benchmark.py --quick    # ~1 minute, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
SECTION = "serve"


def make_checkpoint(work: Path, context: int) -> Path:
    from fmforge.config import model_config_from_preset
    from fmforge.model import Transformer
    from fmforge.tokenizer import Tokenizer, train_tokenizer
    from fmforge.train.checkpoint import write_checkpoint

    tokenizer_dir = REPO / "runs" / "quickstart" / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").exists():
        import sysconfig
        tokenizer_dir = work / "tokenizer"
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [(stdlib / name).read_text() for name in ("difflib.py", "textwrap.py", "json/decoder.py", "string.py")]
        train_tokenizer(texts, 2048).save(tokenizer_dir)
    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    config = model_config_from_preset("base", vocab_size=tokenizer.vocab_size, context_length=context)
    return write_checkpoint(work / "model", Transformer(config), tokenizer_dir)


def hf_twin(model):
    """LlamaForCausalLM with the same weights as fmforge's `model` (same tensor names under `model.`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    hf = LlamaForCausalLM(LlamaConfig(
        hidden_size=c.n_embd, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=None)).float().eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in model.state_dict().items() if not k.startswith("rope_")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    return hf


def single_stream(checkpoint: Path, rounds: int, prompt_len: int, new_tokens: int) -> dict:
    from fmforge.serve.engine import Engine, SamplingOptions
    from fmforge.train.checkpoint import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    model.eval()
    hf = hf_twin(model)
    engine = Engine(model, tokenizer, max_batch=1)
    engine.start()
    prompt = list(range(16, 16 + prompt_len))

    def ours() -> tuple[float, list[int]]:
        tokens, done = [], threading.Event()

        def on_event(event):
            tokens.append(event.token_id)
            if event.finish_reason:
                done.set()

        started = time.perf_counter()
        engine.submit(prompt, SamplingOptions(max_tokens=new_tokens, temperature=0), on_event)
        done.wait()
        return time.perf_counter() - started, tokens

    def theirs() -> tuple[float, list[int]]:
        ids = torch.tensor([prompt])
        started = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        return time.perf_counter() - started, out[0, len(prompt):].tolist()

    ours(), theirs()  # warm-up
    rows = []
    for r in range(rounds):
        order = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        result = {f.__name__: f() for f in order}
        rows.append(result)
        print(f"  round {r + 1}: fmforge {new_tokens / result['ours'][0]:.0f} tok/s, "
              f"transformers {new_tokens / result['theirs'][0]:.0f} tok/s", flush=True)
    engine.stop()
    same = sum(a == b for a, b in zip(rows[0]["ours"][1], rows[0]["theirs"][1]))
    return {
        "fmforge_tok_s": statistics.median(new_tokens / r["ours"][0] for r in rows),
        "hf_tok_s": statistics.median(new_tokens / r["theirs"][0] for r in rows),
        "ratio": statistics.median(r["theirs"][0] / r["ours"][0] for r in rows),
        "same_tokens": f"{same}/{new_tokens}",
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def concurrent_load(checkpoint: Path, levels: list[int], waves: int, new_tokens: int, max_batch: int) -> list[dict]:
    import httpx

    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([sys.executable, "-m", "fmforge.cli", "serve", "--checkpoint", str(checkpoint),
                               "--port", str(port), "--max-batch", str(max_batch), "--log-level", "warning"],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            log.seek(0)
            raise RuntimeError("server did not start:\n" + log.read())
        results = []

        def one(i: int, out: list):
            body = {"model": "base", "prompt": f"def function_{i}(", "max_tokens": new_tokens, "stream": True,
                    "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True},
                    "logit_bias": {"1": -100, "2": -100}}
            sent = time.perf_counter()
            first, usage = None, None
            with httpx.Client(timeout=600) as http:
                with http.stream("POST", url + "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                            first = time.perf_counter() - sent
                        if chunk.get("usage"):
                            usage = chunk["usage"]["completion_tokens"]
            out.append((first, usage))

        one(0, [])  # warm-up
        for level in levels:
            ttft, tokens, seconds = [], 0, 0.0
            for _ in range(waves):
                out: list = []
                threads = [threading.Thread(target=one, args=(i, out)) for i in range(level)]
                started = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                seconds += time.perf_counter() - started
                tokens += sum(u for _, u in out)
                ttft += [f for f, _ in out]
            row = {"streams": level, "tok_s": tokens / seconds, "ttft_p50": percentile(ttft, 50),
                   "ttft_p99": percentile(ttft, 99), "requests": len(ttft)}
            print(f"  {level:2d} streams: {row['tok_s']:.0f} tok/s aggregate, TTFT p50 {row['ttft_p50'] * 1000:.0f} ms "
                  f"p99 {row['ttft_p99'] * 1000:.0f} ms", flush=True)
            results.append(row)
        return results
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens; print only")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (both contenders)")
    parser.add_argument("--no-write", action="store_true", help=f"do not update {RESULTS.name}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rounds, new_tokens, waves = (3, 64, 1) if args.quick else (7, 200, 2)
    with tempfile.TemporaryDirectory() as work:
        checkpoint = make_checkpoint(Path(work), 1024)
        print(f"single stream: prompt 32 tokens, {new_tokens} new tokens, greedy, {rounds} rounds", flush=True)
        single = single_stream(checkpoint, rounds, 32, new_tokens)
        print(f"  median: fmforge {single['fmforge_tok_s']:.0f} tok/s, transformers {single['hf_tok_s']:.0f} tok/s, "
              f"ratio {single['ratio']:.2f}x; same greedy tokens {single['same_tokens']}", flush=True)
        print(f"server: {new_tokens} tokens per request, concurrency 1/4/16, {waves} wave(s) each", flush=True)
        load = concurrent_load(checkpoint, [1, 4, 16], waves, new_tokens, max_batch=16)
    if args.quick or args.no_write:
        return
    sys.path.insert(0, str(HERE))
    from pretrain_throughput import git_state, write_section
    import transformers

    lines = [
        "## Serving: fmforge engine vs transformers generate; the server under concurrent streams",
        "",
        f"Command: `.venv/bin/python benchmarks/serve_benchmark.py` ({args.threads} torch threads, "
        f"{time.strftime('%Y-%m-%d')}, {git_state()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}). Model: `base` preset (6 x 384, 1024 context), random weights, fp32, CPU.",
        "",
        f"**Single stream** (in process, prompt 32 tokens, {new_tokens} new tokens, greedy, {rounds} interleaved rounds, "
        "medians):",
        "",
        "| engine | tokens/s |",
        "|---|---:|",
        f"| fmforge Engine | {single['fmforge_tok_s']:.0f} |",
        f"| transformers `generate` | {single['hf_tok_s']:.0f} |",
        f"| **ratio** (median of per-round ratios) | **{single['ratio']:.2f}x** |",
        "",
        f"Same greedy tokens from both: {single['same_tokens']} (fp32; a mismatch late in a sequence is a near-tie "
        "flipped by summation order).",
        "",
        f"**Server** (`fmforge serve`, 16 slots; each request streams {new_tokens} tokens from /v1/completions, "
        f"temperature 0.8; {waves} wave(s) per level; TTFT = request sent -> first text chunk):",
        "",
        "| concurrent streams | aggregate tokens/s | TTFT p50 | TTFT p99 |",
        "|---:|---:|---:|---:|",
    ]
    for row in load:
        lines.append(f"| {row['streams']} | {row['tok_s']:.0f} | {row['ttft_p50'] * 1000:.0f} ms | "
                     f"{row['ttft_p99'] * 1000:.0f} ms |")
    base = load[0]["tok_s"]
    lines += ["", "Batching gain over one stream: " + ", ".join(
        f"{row['streams']} streams {row['tok_s'] / base:.1f}x" for row in load[1:]) + "."]
    write_section(RESULTS, SECTION, "\n".join(lines))
    print(f"written: {RESULTS.name} (section {SECTION})")


if __name__ == "__main__":
    main()
