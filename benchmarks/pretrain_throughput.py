"""Pretraining throughput: fmforge's training step against Hugging Face `LlamaForCausalLM` of the same shape.

One training step = forward with targets -> loss, backward, grad-norm clipping to 1.0, AdamW step, zero_grad,
loss.item() (what both training loops do). Contenders:

    fmforge-fp32     fmforge Transformer, fp32, fmforge's AdamW (build_optimizer: fused on CPU)
    hf-fp32          transformers LlamaForCausalLM (sdpa), fp32, torch.optim.AdamW() defaults (not fused):
                     the HF Trainer without --bf16 (transformers 5 with torch >= 2.8 actually defaults to
                     optim="adamw_torch_fused"; the optimizer is ~1% of the step here, see the opt column)
    fmforge-default  fmforge's defaults for `fmforge pretrain` on this machine: precision auto (bf16 autocast
                     where the CPU has avx512_bf16/amx_bf16) + fused AdamW
    fmforge-compile  fmforge-default + torch.compile (train.compile); only with --compile
    hf-fp32-malloc   hf-fp32 with the glibc malloc setting fmforge's training makes (device.keep_freed_memory),
                     to show how much of the gap is that setting; only with --hf-malloc

The fmforge contenders set up the process as `fmforge pretrain` does (keep_freed_memory before the model).

Every contender lives in its own worker process (so its peak RSS is its own), builds its model once with
random weights, and waits on stdin. The parent then runs R rounds; in each round every worker in turn runs
S steps while the others sleep, in alternating order, so slow drift of a shared, noisy machine hits all of
them alike. Before each turn the parent waits (within the time budget) until other processes leave the CPUs
alone, and it records how much CPU others took during the turn; only rounds where that stayed under
--max-interference for every contender count, unless fewer than 3 did. Reported: medians over rounds, and
speed ratios computed within each round, then the median.

MFU = tokens/s x Transformer.flops_per_token() / peak, with the peak measured here (2048^2 matmul, best
of several) in fp32 and bf16; flops_per_token is 6 x (non-embedding params + lm_head) + attention (PaLM).

Memory: peak RSS (VmHWM) of each worker, its RSS before the model was built (Python + libraries), and the
theoretical need: 16 bytes/param (fp32 weights, grads, AdamW exp_avg and exp_avg_sq) + the tensors autograd
saves for backward (measured with saved_tensors_hooks, one forward) + the logits' gradient (B x T x V fp32,
alive during backward). See RESULTS.md for the activation formula.

    .venv/bin/python benchmarks/pretrain_throughput.py            # ~4-5 minutes, writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/pretrain_throughput.py --quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

from _common import (RESULTS, cpu_sample, describe_machine, git_state, hf_model, other_cpu_share, proc_status_kib,
                     section_name, write_section)

SECTION = "pretrain_throughput"

# Shape of the comparison: fmforge preset `base` with an 8192-token vocabulary.
PRESET, VOCAB = "base", 8192


# ---- measurement helpers (used by parent and workers) -----------------------------------------------------

def matmul_peak_gflops(dtype, size: int = 2048, repeats: int = 5, tries: int = 3) -> float:
    """Best-of-`tries` GFLOP/s of a (size x size) @ (size x size) matmul: the machine's practical peak."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b  # warm-up (oneDNN/MKL picks its kernel)
    best = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def wait_for_quiet(max_share: float, deadline: float, threads: int, window: float = 0.5) -> float:
    """Sleep until other processes use less than `max_share` of the CPUs over `window` seconds (or until
    `deadline`); return the seconds waited. Our workers are all idle here, so any busy CPU is someone else's."""
    start = time.perf_counter()
    while time.perf_counter() < deadline:
        before = cpu_sample([os.getpid()])
        time.sleep(window)
        if other_cpu_share(before, cpu_sample([os.getpid()]), threads) < max_share:
            break
    return time.perf_counter() - start


def model_config(tie: bool):
    from fmforge.config import model_config_from_preset

    return model_config_from_preset(PRESET, vocab_size=VOCAB, tie_embeddings=tie)


# ---- worker: one contender, driven over stdin/stdout -------------------------------------------------------

CONTENDERS = {
    "fmforge-fp32": dict(impl="fmforge", precision="fp32", compile=False),
    "hf-fp32": dict(impl="hf", precision="fp32", compile=False),
    "fmforge-default": dict(impl="fmforge", precision="auto", compile=False),
    "fmforge-compile": dict(impl="fmforge", precision="auto", compile=True),
    "hf-fp32-malloc": dict(impl="hf", precision="fp32", compile=False, malloc=True),
}


def saved_activation_bytes(model, loss_fn) -> int:
    """Bytes of the tensors autograd saves in one forward (unique storages, parameters excluded)."""
    import torch

    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def worker(name: str, args) -> None:
    # Replies go to the original stdout; anything libraries print goes to stderr.
    reply_stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj) -> None:
        reply_stream.write(json.dumps(obj) + "\n")

    import torch

    torch.set_num_threads(args.threads)
    from fmforge.model import Transformer
    from fmforge.train.optim import build_optimizer
    from fmforge.train.trainer import autocast_context, resolve_precision
    from fmforge.config import TrainConfig

    if CONTENDERS[name]["impl"] == "hf":
        import transformers  # noqa: F401  (import cost belongs to the baseline RSS)
    spec = CONTENDERS[name]
    if spec["impl"] == "fmforge" or spec.get("malloc"):
        from fmforge.device import keep_freed_memory

        keep_freed_memory()
    device = torch.device("cpu")
    precision = resolve_precision(spec["precision"], device)
    baseline_kib = proc_status_kib("VmRSS")

    cfg = model_config(args.tie)
    torch.manual_seed(0)
    B, T = args.batch_size, cfg.context_length
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (B, T + 1), generator=generator) for _ in range(4)]

    if spec["impl"] == "fmforge":
        model = Transformer(cfg)
        optimizer = build_optimizer(model, TrainConfig())  # lr 3e-3, betas (0.9, 0.95), wd 0.1 on matrices
        optimizer_name = "AdamW fused" if optimizer.defaults.get("fused") else "AdamW"
        train_model = torch.compile(model) if spec["compile"] else model
        fused_loss = not spec["compile"] and model.fuses_loss(torch.empty(0))

        def loss_of(batch):
            x, y = batch[:, :-1], batch[:, 1:]
            return train_model(x, targets=y, return_logits=False).loss
    else:
        model = hf_model(cfg)
        optimizer = torch.optim.AdamW(model.parameters())  # HF Trainer: adamw_torch (defaults, not fused)
        optimizer_name = "AdamW (torch defaults)"
        train_model = model
        fused_loss = False

        def loss_of(batch):
            x = batch[:, :-1]
            return train_model(input_ids=x, labels=x).loss  # HF shifts labels inside (T-1 targets per row)
    model.train()
    autocast = autocast_context(precision, device)

    activation_bytes = None
    if not spec["compile"]:
        with autocast:
            activation_bytes = saved_activation_bytes(model, lambda: loss_of(batches[0]))

    def step(batch) -> dict:
        t0 = time.perf_counter()
        with autocast:
            loss = loss_of(batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        t4 = time.perf_counter()
        return {"total": t4 - t0, "fwd": t1 - t0, "bwd": t2 - t1, "clip": t3 - t2, "opt": t4 - t3}

    started = time.perf_counter()
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    warmup_s = time.perf_counter() - started
    reply({"ready": True, "params": sum(p.numel() for p in model.parameters()), "precision": precision,
           "optimizer": optimizer_name, "warmup_s": warmup_s, "activation_bytes": activation_bytes,
           "fused_loss": fused_loss,
           "baseline_kib": baseline_kib})
    counter = 0
    for line in sys.stdin:
        command = line.split()
        if command[0] == "run":
            times = []
            for _ in range(int(command[1])):
                times.append(step(batches[counter % len(batches)]))
                counter += 1
            reply({"steps": times})
        elif command[0] == "memory":
            reply({"hwm_kib": proc_status_kib("VmHWM"), "rss_kib": proc_status_kib("VmRSS")})
        elif command[0] == "quit":
            return


class Worker:
    def __init__(self, name: str, args):
        cmd = [sys.executable, __file__, "--worker", name, "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--warmup", str(args.warmup)] + (["--untied"] if not args.tie else [])
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info: dict = {}

    def ask(self, command: str | None) -> dict:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit code {self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)


# ---- parent: rounds, statistics, report ---------------------------------------------------------------------

def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def run_benchmark(args) -> str:
    import torch

    from fmforge.model import Transformer

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    names = (["fmforge-fp32", "hf-fp32", "fmforge-default"] + (["fmforge-compile"] if args.compile else [])
             + (["hf-fp32-malloc"] if args.hf_malloc else []))
    cfg = model_config(args.tie)
    reference = Transformer(cfg)
    flops_per_token = reference.flops_per_token()
    params = reference.num_parameters()
    del reference

    peaks_before = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"matmul peak (2048^2, {args.threads} threads): fp32 {peaks_before['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks_before['bf16']:.0f} GFLOP/s", flush=True)

    workers = []
    for name in names:  # start one at a time so start-up (and compilation) does not overlap
        w = Worker(name, args)
        w.info = w.ask(None)
        print(f"{name}: ready ({w.info['params']:,} params, {w.info['precision']}, {w.info['optimizer']}, "
              f"warm-up {w.info['warmup_s']:.1f}s)", flush=True)
        workers.append(w)
    for w in workers:
        if w.info["params"] != params:
            raise SystemExit(f"parameter counts differ: {w.name} has {w.info['params']:,}, fmforge {params:,}")

    tokens_per_step = args.batch_size * cfg.context_length
    # Every worker's run in a round is recorded with the share of the machine that other processes used
    # meanwhile; a round is "clean" when that share stayed under --max-interference for every contender.
    rounds: list[dict[str, dict]] = []
    deadline = time.perf_counter() + 60 * args.max_minutes
    peaks = dict(peaks_before)
    waited = 0.0
    while sum(r["clean"] for r in rounds) < args.rounds and time.perf_counter() < deadline:
        order = workers if len(rounds) % 2 == 0 else workers[::-1]
        result: dict = {}
        for w in order:
            time.sleep(0.2)  # let the previous worker's OpenMP threads go to sleep
            waited += wait_for_quiet(args.max_interference, min(deadline, time.perf_counter() + args.max_wait),
                                     args.threads)
            before = cpu_sample([w.proc.pid])
            steps = w.ask(f"run {args.steps}")["steps"]
            interference = other_cpu_share(before, cpu_sample([w.proc.pid]), args.threads)
            result[w.name] = {"tps": tokens_per_step * len(steps) / sum(s["total"] for s in steps),
                              "steps": steps, "interference": interference}
        waited += wait_for_quiet(args.max_interference, min(deadline, time.perf_counter() + args.max_wait),
                                 args.threads)
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):  # the peak, too, needs a quiet moment
            peaks[key] = max(peaks[key], matmul_peak_gflops(dtype, repeats=3, tries=1))
        rounds.append({"clean": all(v["interference"] < args.max_interference for v in result.values()),
                       "by": result})
        print(f"round {len(rounds)} ({'clean' if rounds[-1]['clean'] else 'contended'}): " + "  ".join(
            f"{n} {v['tps']:,.0f} tok/s [{100 * v['interference']:.0f}% other]" for n, v in result.items()),
            flush=True)
    memory = {w.name: w.ask("memory") for w in workers}
    for w in workers:
        w.close()
    peaks_after = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    peaks = {k: max(peaks[k], peaks_after[k]) for k in peaks}
    elapsed = time.perf_counter() - started
    clean = [r for r in rounds if r["clean"]]
    for r in rounds:
        r["interference"] = max(v["interference"] for v in r["by"].values())
    if len(clean) >= 3:
        used = clean
        selection = f"{len(clean)} clean rounds of {len(rounds)}"
    else:  # a busy machine: take the least disturbed rounds, and say so
        used = sorted(rounds, key=lambda r: r["interference"])[:max(3, len(rounds) // 2)]
        selection = (f"the {len(used)} least disturbed of {len(rounds)} rounds -- only {len(clean)} were clean; "
                     f"others took up to {100 * max(r['interference'] for r in used):.0f}% of our CPUs in these, "
                     f"so treat absolute numbers with care")
    selection += f"; {waited:.0f}s spent waiting for quiet moments"
    per_round = {w.name: [r["by"][w.name]["tps"] for r in used] for w in workers}
    phases = {w.name: [s for r in used for s in r["by"][w.name]["steps"]] for w in workers}

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(per_round[a], per_round[b])]

    # ---- throughput table
    lines = ["| contender | precision | optimizer | tokens/s median (min-max) | ms/step | fwd / bwd / clip / opt ms "
             "| MFU | vs hf-fp32 |", "|---|---|---|---|---|---|---|---|"]
    for w in workers:
        median_tps = statistics.median(per_round[w.name])
        ms = {k: 1000 * statistics.median(s[k] for s in phases[w.name]) for k in ("total", "fwd", "bwd", "clip", "opt")}
        peak = peaks["bf16" if w.info["precision"] == "bf16" else "fp32"]
        mfu = median_tps * flops_per_token / (peak * 1e9)
        vs = statistics.median(ratio(w.name, "hf-fp32"))
        lines.append(f"| {w.name} | {w.info['precision']} | {w.info['optimizer']} | {spread(per_round[w.name])} | "
                     f"{ms['total']:.0f} | {ms['fwd']:.0f} / {ms['bwd']:.0f} / {ms['clip']:.0f} / {ms['opt']:.0f} | "
                     f"{100 * mfu:.1f}% of {peak:.0f} | {vs:.2f}x |")
    throughput_table = "\n".join(lines)

    # ---- memory table
    mib = 1 / 1024  # KiB -> MiB
    logits_grad = 4 * args.batch_size * cfg.context_length * cfg.vocab_size
    lines = ["| contender | peak RSS MiB | RSS before model MiB | peak - before MiB | theory MiB "
             "(16 B/param + saved activations + logits grad; a fused loss saves its gradients instead) |",
             "|---|---|---|---|---|"]
    for w in workers:
        hwm, base = memory[w.name]["hwm_kib"] * mib, w.info["baseline_kib"] * mib
        act = w.info["activation_bytes"]
        if act is None:
            theory = "n/a (compiled graph)"
        else:
            grad = 0 if w.info["fused_loss"] else logits_grad
            total = 16 * params + act + grad
            theory = f"{total / 2**20:.0f} = {16 * params / 2**20:.0f} + {act / 2**20:.0f} + {grad / 2**20:.0f}"
        lines.append(f"| {w.name} | {hwm:.0f} | {base:.0f} | {hwm - base:.0f} | {theory} |")
    memory_table = "\n".join(lines)

    ratios = {
        "fmforge-fp32 / hf-fp32 (a)": ratio("fmforge-fp32", "hf-fp32"),
        "fmforge-default / hf-fp32 (b)": ratio("fmforge-default", "hf-fp32"),
        "fmforge-default / fmforge-fp32": ratio("fmforge-default", "fmforge-fp32"),
    }
    if args.compile:
        ratios["fmforge-compile / fmforge-default (c)"] = ratio("fmforge-compile", "fmforge-default")
    if args.hf_malloc:
        ratios["hf-fp32-malloc / hf-fp32"] = ratio("hf-fp32-malloc", "hf-fp32")
        ratios["fmforge-default / hf-fp32-malloc"] = ratio("fmforge-default", "hf-fp32-malloc")
    ratio_lines = [f"- {k}: median {statistics.median(v):.2f}x (per round: {min(v):.2f}-{max(v):.2f}x)"
                   for k, v in ratios.items()]
    a = statistics.median(ratios["fmforge-fp32 / hf-fp32 (a)"])
    b = statistics.median(ratios["fmforge-default / hf-fp32 (b)"])

    def verdict(ratios: list[float], target: float) -> str:
        """PASS when the median meets the target; TIE when it misses but per-round ratios straddle it (noise)."""
        middle = statistics.median(ratios)
        return "PASS" if middle >= target else "TIE (within round-to-round noise)" if max(ratios) >= target else "FAIL"

    verdicts = [f"- (a) fp32, fmforge not slower than HF: {verdict(ratios['fmforge-fp32 / hf-fp32 (a)'], 1.0)} "
                f"({a:.2f}x)",
                f"- (b) fmforge default >= 2x HF default (issue 17; 1.5x before): "
                f"{verdict(ratios['fmforge-default / hf-fp32 (b)'], 2.0)} ({b:.2f}x)"]
    if args.compile:
        w = next(w for w in workers if w.name == "fmforge-compile")
        c = statistics.median(ratios["fmforge-compile / fmforge-default (c)"])
        verdicts.append(f"- (c) torch.compile: {c:.2f}x the eager default step, after a "
                        f"{w.info['warmup_s']:.0f}s warm-up (compilation) -> {'helps' if c > 1.05 else 'does not help'}")

    command = "benchmarks/pretrain_throughput.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"## Pretraining throughput: fmforge vs Hugging Face Llama ({args.threads} thread"
        f"{'s' if args.threads > 1 else ''})",
        "",
        f"Command: `.venv/bin/python {command.strip()}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; total time {elapsed:.0f}s; "
        f"fmforge at {git_state()}  ",
        f"Machine: {describe_machine(args.threads)}; "
        f"shared with other jobs (run-to-run 10-20%); contenders interleaved, {args.steps} steps each per round; "
        f"statistics over {selection} (clean = other processes took < {100 * args.max_interference:.0f}% of the CPUs "
        f"we run on during each contender's turn, from /proc/stat)  ",
        f"Shape: preset `{PRESET}` (6 layers, width {cfg.n_embd}, {cfg.n_head} heads, ffn {cfg.intermediate_size}, "
        f"context {cfg.context_length}), vocab {cfg.vocab_size}, {'tied' if cfg.tie_embeddings else 'untied'} "
        f"embeddings, {params:,} params in both models, micro-batch {args.batch_size} x {cfg.context_length} tokens, "
        f"{flops_per_token / 1e6:.1f} MFLOP/token  ",
        f"Measured matmul peak (2048^2, best of before, after and one try per round): fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s",
        "",
        throughput_table,
        "",
        "Speed ratios (per round, then median):",
        "",
        *ratio_lines,
        "",
        *verdicts,
        "",
        "Peak memory (each contender in its own process):",
        "",
        memory_table,
    ])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1 minute: 3 rounds x 2 steps")
    parser.add_argument("--rounds", type=int, default=None, help="clean interleaved rounds wanted (default 12; quick 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per contender per round (default 3; quick 2)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop adding rounds after this many minutes, waits for quiet included (default 3.5; quick 0.75)")
    parser.add_argument("--max-interference", type=float, default=0.1,
                        help="a round is clean when other processes took less than this share of our CPUs")
    parser.add_argument("--max-wait", type=float, default=5.0,
                        help="seconds to wait for a quiet machine before each turn (then run anyway, flagged)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender before the rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads (default: all CPUs; 1 gives stable numbers when another job holds a core)")
    parser.add_argument("--untied", dest="tie", action="store_false", help="untied input/output embeddings")
    parser.add_argument("--compile", action="store_true", help="add fmforge + torch.compile (slow warm-up on CPU)")
    parser.add_argument("--hf-malloc", action="store_true",
                        help="add hf-fp32 with fmforge's malloc setting (device.keep_freed_memory)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    args.rounds = args.rounds or (3 if args.quick else 12)
    args.steps = args.steps or (2 if args.quick else 3)
    args.max_minutes = args.max_minutes or (0.75 if args.quick else 3.5)
    if args.quick:
        args.warmup = min(args.warmup, 2)
    report = run_benchmark(args)
    print("\n" + report)
    if not args.no_write:
        write_section(section_name(SECTION, args.threads), report)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
