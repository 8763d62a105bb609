"""Does a long prompt stall the streams already decoding? The engine's decode-step latency with chunked prefill off
and on (issue 16).

N streams with short prompts decode together; then one prompt `--long-factor` times longer arrives. Every engine
step gives each running stream one token (speculation is off), so a step's wall time is the running streams'
time between tokens. Unchunked, the step in which the long prompt arrives runs its whole prefill first; chunked,
each step's decode forward carries one chunk of at most `--prefill-chunk` prompt tokens beside the streams' tokens
(Sarathi-Serve's stall-free hybrid batches, Agrawal et al. 2024).

Every condition runs in the same process, on the same engine and model, in rotating order within each round: a
baseline window without a long prompt, a window in which the long prompt arrives unchunked, and one per chunk size.
Each round starts fresh streams, so every window sees streams of similar length. Reported per condition: the
running streams' decode-step latency p50 / p99 over all windows' steps, p99 over the baseline's p99 (the target:
<= 2 with chunking), and the long prompt's time to its first token.

The model: the quickstart's shape (the `small` preset, 6 x 256) with random weights, context 1024; token ids are
random (no tokenizer is needed to time steps). The engine is driven by this thread (`Engine.step`), no server.

    .venv/bin/python benchmarks/prefill_stall.py --threads 1     # ~40 s; prints the table (1 thread on a shared
                                                                 # machine: 2 threads stall on each other there)
    .venv/bin/python benchmarks/prefill_stall.py --threads 1 --out FILE.md  # the report as a file too (the recorded
                                                                          # runs are in RESULTS.md, "prefill-stall")
    .venv/bin/python benchmarks/prefill_stall.py --quick         # a smoke test, seconds
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from _common import describe_machine, git_state, random_model


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


def measure(args) -> tuple[dict, dict]:
    """Step latencies (seconds) per condition, and the long prompt's times to first token per condition."""
    from fmforge.config import model_config_from_preset
    from fmforge.infer.engine import Engine
    from fmforge.infer.sampling import SamplingParams

    config = model_config_from_preset(args.preset, vocab_size=2048, context_length=args.context)
    model = random_model(config)
    engine = Engine(model, None, max_batch=args.streams + 1, max_queue=args.streams + 1, speculate=0)
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(0, config.vocab_size, (length,), generator=generator).tolist()

    long_length = args.prompt * args.long_factor
    conditions: list[str | int] = ["baseline", 0, *args.prefill_chunk]  # 0 = unchunked
    window = max(args.window, math.ceil(long_length / min(args.prefill_chunk)) + args.long_tokens + 2)
    steps: dict = {c: [] for c in conditions}
    first_token: dict = {c: [] for c in conditions if c != "baseline"}
    print(f"{args.streams} streams of {args.prompt}-token prompts; a {long_length}-token prompt arrives; "
          f"{args.rounds} rounds x {len(conditions)} windows of {window} steps", flush=True)

    for round_index in range(args.rounds + 1):  # round 0 warms up (every shape once) and is not recorded
        streams = [engine.submit(prompt(args.prompt), SamplingParams(max_tokens=10_000, temperature=0),
                                 lambda event: None, stop_ids=frozenset()) for _ in range(args.streams)]
        engine.prefill_chunk = 0
        for _ in range(3):
            engine.step()
        shift = round_index % len(conditions)
        for condition in conditions[shift:] + conditions[:shift]:
            arrived, first = 0.0, []
            if condition != "baseline":
                engine.prefill_chunk = condition
                arrived = time.perf_counter()
                engine.submit(prompt(long_length), SamplingParams(max_tokens=args.long_tokens, temperature=0),
                              lambda event: first.append(time.perf_counter()), stop_ids=frozenset())
            for _ in range(window):
                start = time.perf_counter()
                engine.step()
                if round_index:
                    steps[condition].append(time.perf_counter() - start)
            if condition != "baseline":
                assert len(first) == args.long_tokens, "the long prompt did not finish within its window"
                if round_index:
                    first_token[condition].append(first[0] - arrived)
        for stream in streams:
            stream.cancel()
        engine.step(admit=False)
    return steps, first_token


def table(steps: dict, first_token: dict, long_length: int) -> str:
    base_p99 = percentile(steps["baseline"], 99)
    lines = ["| condition | decode step p50 (ms) | decode step p99 (ms) | p99 / baseline p99 | long prompt: time "
             "to first token (ms, median) | steps |",
             "|---|---:|---:|---:|---:|---:|"]
    for condition, samples in steps.items():
        name = ("baseline: no long prompt" if condition == "baseline" else
                f"{long_length}-token prompt arrives, unchunked" if condition == 0 else
                f"{long_length}-token prompt arrives, chunks of {condition}")
        p50, p99 = percentile(samples, 50) * 1e3, percentile(samples, 99)
        ttft = "–" if condition == "baseline" else f"{statistics.median(first_token[condition]) * 1e3:.0f}"
        lines.append(f"| {name} | {p50:.1f} | {p99 * 1e3:.1f} | {p99 / base_p99:.2f} | {ttft} | {len(samples)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8, help="streams decoding when the long prompt arrives")
    parser.add_argument("--prompt", type=int, default=64, help="their prompts' length in tokens")
    parser.add_argument("--long-factor", type=int, default=8, help="the long prompt is this many times longer")
    parser.add_argument("--long-tokens", type=int, default=4, help="tokens the long prompt's request generates")
    parser.add_argument("--prefill-chunk", type=lambda v: [int(x) for x in v.split(",")], default=[32, 64, 128],
                        help="chunk sizes to compare with unchunked prefill, comma-separated")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of fresh streams (each runs every condition)")
    parser.add_argument("--window", type=int, default=24, help="steps recorded per condition and round, at least")
    parser.add_argument("--preset", default="small", help="model shape (default: the quickstart's)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 streams, chunks of 128: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.streams, args.prefill_chunk = 1, 2, [128]
    if min([args.streams, args.prompt, args.long_factor, args.long_tokens, args.rounds, args.window,
            *args.prefill_chunk]) < 1:
        parser.error("every count must be at least 1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    load_before = uptime()
    started = time.perf_counter()
    steps, first_token = measure(args)
    seconds = time.perf_counter() - started
    load_after = uptime()
    result = table(steps, first_token, args.prompt * args.long_factor)
    print(result)
    command = "python benchmarks/prefill_stall.py " + " ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in [("streams", args.streams), ("prompt", args.prompt), ("long_factor", args.long_factor),
                     ("prefill_chunk", args.prefill_chunk), ("rounds", args.rounds), ("threads", args.threads)])
    report = (f"## Prefill stall: decode-step latency of running streams when a long prompt arrives\n\n"
              f"`{command}` ({seconds:.0f} s), commit {git_state()}.\n\n"
              f"Machine: {describe_machine(args.threads)}.\n\n"
              f"`uptime` before: `{load_before}`; after: `{load_after}`. Other agents share these CPUs: absolute "
              f"times are noisy; the ratios, measured side by side in one process, are what to read.\n\n"
              f"{args.streams} streams of {args.prompt}-token prompts decode (greedy, no speculation); a "
              f"{args.prompt * args.long_factor}-token prompt arrives and generates {args.long_tokens} tokens. Model: "
              f"`{args.preset}` preset (random weights), context {args.context}, float32.\n\n{result}\n")
    if args.out:
        args.out.write_text(report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
