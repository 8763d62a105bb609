"""Time to a held-out loss on Tiny Shakespeare: a BPE tokenizer against a byte-level one, same model, same
wall-clock budget, through the real CLI pipeline (`fmforge prepare`, then `fmforge pretrain`).

Loss is reported as bits per byte (bpb = nats/token x tokens/bytes / ln 2, from the shard manifest), so that a
byte-level model and a BPE model of the same text compare. Tiny Shakespeare is ASCII: bits/byte = bits/char.

Held-out split. `fmforge prepare` splits by document, and a text file is one document, so the file is first
cut into ~8 KB documents at blank lines (their concatenation is the file, byte for byte) and written as
.jsonl; `--val-fraction 0.1` then holds out ~10% of them. Both tokenizers see the same documents and the
same seed, so the split is identical. The BPE tokenizer is trained on all documents (val included); that
leaks merge statistics only, as nanoGPT's character vocabulary does.

Setups (both: recipe `shakespeare` = preset `small`, 6 layers, width 256, context 256 tokens, batch 16,
lr 3e-3 cosine, precision auto; `--max_minutes` budget; eval every --eval-interval steps on 8k val tokens (the same windows each time),
the final eval on the whole val split):
    bpe-2048    byte-level BPE with 2048 ids (the recipe's tokenizer)
    byte-272    the smallest vocabulary fmforge allows: 16 special tokens + 256 bytes (no merges), i.e. bytes

On a shared machine two runs one after the other meet different loads, and `--max_minutes` is turned into a
step count from a few timed passes at the start, so a load change mid-run stretches one run and not the
other. By default both runs therefore train at the same time, on half the cores each (one thread each on
2 cores); `--sequential` gives each run all cores in turn, which is fair only on an idle machine.

    .venv/bin/python benchmarks/time_to_loss.py               # 3 minutes of training (~4 minutes in all)
    .venv/bin/python benchmarks/time_to_loss.py --quick       # 1 minute
    .venv/bin/python benchmarks/time_to_loss.py --sequential  # 2 x 3 minutes, all cores each
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import HERE, REPO, RESULTS, cpu_sample, describe_machine, git_state, other_cpu_share, write_section

DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
PLOT = HERE / "time_to_loss.png"
SECTION = "time_to_loss"
FMFORGE = [sys.executable, "-m", "fmforge.cli"]
EVAL_TOKENS = 8192  # val tokens per periodic eval: 32 windows, ~7% of the training time at eval_interval 10
THRESHOLDS = [4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.1, 2.0, 1.9, 1.8, 1.7, 1.6, 1.5]
NANOGPT_CHAR_BPB = 1.47 / 0.6931  # nanoGPT shakespeare_char: val loss ~1.47 nats/char on a GPU, ~10M params


def split_into_documents(text: str, target_bytes: int) -> list[str]:
    """Cut `text` after blank lines into pieces of at least `target_bytes` (the last may be shorter);
    "".join(pieces) == text."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n\n", start + target_bytes)
        end = len(text) if cut == -1 else cut + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def run_together(commands: list[tuple[list[str], Path]], env: dict) -> tuple[list[float], float]:
    """Start all `commands` at once (output to each one's log), wait for all; return each one's wall seconds
    and the share of the CPUs we use that other processes took while all of ours were running."""
    threads = int(env.get("OMP_NUM_THREADS", os.cpu_count())) * len(commands)
    start = time.perf_counter()
    logs = [open(log, "w") for _, log in commands]
    procs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
             for (cmd, _), log in zip(commands, logs)]
    walls: list[float | None] = [None] * len(procs)
    first = last = None  # CPU samples taken while every process still ran
    while any(w is None for w in walls):
        time.sleep(1.0)
        if all(p.poll() is None for p in procs):
            try:
                last = cpu_sample([p.pid for p in procs])
                first = first or last
            except (FileNotFoundError, ProcessLookupError):  # one ended meanwhile
                pass
        for i, p in enumerate(procs):
            if walls[i] is None and p.poll() is not None:
                walls[i] = time.perf_counter() - start
    for log in logs:
        log.close()
    for (cmd, log), p in zip(commands, procs):
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n--- {log}:\n{log.read_text()[-3000:]}")
    return walls, other_cpu_share(first, last, threads) if first else 0.0


def read_evals(metrics: Path) -> list[dict]:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if "val_bpb" in r]


def crossing_time(evals: list[dict], threshold: float) -> float | None:
    """Wall seconds (from the first training step) of the first eval at or below `threshold` bpb."""
    return next((r["elapsed_s"] for r in evals if r["val_bpb"] <= threshold), None)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ax.plot([r["elapsed_s"] for r in run["evals"]], [r["val_bpb"] for r in run["evals"]], marker="o",
                markersize=3, label=f"{run['name']} ({run['vocab']} ids): {run['final_bpb']:.3f} bpb")
    ax.axhline(NANOGPT_CHAR_BPB, color="grey", linestyle="--", linewidth=1)
    ax.text(0.01, NANOGPT_CHAR_BPB, "nanoGPT char baseline on a GPU (~1.47 nats/char)", va="bottom", fontsize=8,
            color="grey", transform=ax.get_yaxis_transform())
    ax.set_xlabel("wall seconds of training (evals included)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("Tiny Shakespeare, fmforge preset small, same wall-clock budget")
    top = max(r["val_bpb"] for run in runs for r in run["evals"])
    ax.set_ylim(min(NANOGPT_CHAR_BPB, min(run["final_bpb"] for run in runs)) - 0.1, min(top, 5.0) + 0.1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 minute per setup instead of 3")
    parser.add_argument("--minutes", type=float, default=None, help="training budget per setup (default 3)")
    parser.add_argument("--bpe-vocab", type=int, default=2048)
    parser.add_argument("--eval-interval", type=int, default=None, help="steps between evals (default 10; quick 5)")
    parser.add_argument("--document-bytes", type=int, default=8192)
    parser.add_argument("--work-dir", default="/tmp/fmforge-time-to-loss", help="data and runs (rewritten)")
    parser.add_argument("--sequential", action="store_true",
                        help="train the two setups one after the other on all cores (default: at the same time, "
                             "half the cores each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS per training run (default: cores / 2; --sequential: all cores)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = parser.parse_args()
    minutes = args.minutes or (1.0 if args.quick else 3.0)
    eval_interval = args.eval_interval or (5 if args.quick else 10)
    if not DATA.is_file():
        print(f"skipped: {DATA} not found (Tiny Shakespeare, 1.1 MB; put it there to run this benchmark)")
        return

    from fmforge.tokenizer import SPECIAL_TOKENS

    # Default: both setups train at the same time, one thread each, so that whatever else the machine does
    # hits both alike; --sequential gives each run all cores in turn (fair only on an otherwise idle machine).
    threads = args.threads or (os.cpu_count() if args.sequential else max(1, os.cpu_count() // 2))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))

    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = DATA.read_text(encoding="utf-8")
    documents = split_into_documents(text, args.document_bytes)
    assert "".join(documents) == text
    corpus = work / "tinyshakespeare.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))

    setups = [("bpe", args.bpe_vocab), ("byte", len(SPECIAL_TOKENS) + 256)]
    runs = []
    for name, vocab in setups:
        name = f"{name}-{vocab}"
        data_dir, out_dir = work / name / "data", work / name / "model"
        prepare_cmd = FMFORGE + ["prepare", str(corpus), "--vocab-size", str(vocab), "--out", str(data_dir),
                                 "--val-fraction", "0.1", "--seed", "0"]
        (work / name).mkdir()
        (prepare_s,), _ = run_together([(prepare_cmd, work / name / "prepare.log")], dict(os.environ))
        manifest = json.loads((data_dir / "manifest.json").read_text())
        runs.append({"name": name, "vocab": manifest["vocab_size"], "data_dir": data_dir, "out_dir": out_dir,
                     "manifest": manifest, "prepare_s": prepare_s})
        split = manifest["splits"]
        print(f"{name}: prepared in {prepare_s:.1f}s | train {split['train']['tokens']:,} tokens "
              f"({split['train']['bytes'] / split['train']['tokens']:.2f} bytes/token) | val {split['val']['tokens']:,} "
              f"tokens, {split['val']['documents']} documents, {split['val']['bytes']:,} bytes", flush=True)

    def pretrain_command(run: dict) -> tuple[list[str], Path]:
        return (FMFORGE + ["pretrain", "--config", "shakespeare", "--data_dir", str(run["data_dir"]),
                           "--out_dir", str(run["out_dir"]), "--max_minutes", f"{minutes:g}",
                           "--eval_interval", str(eval_interval), "--eval_tokens", str(EVAL_TOKENS),
                           "--checkpoint_interval", "100000", "--log_interval", "10"],
                run["out_dir"].parent / "pretrain.log")

    if args.sequential:
        for run in runs:
            print(f"{run['name']}: training for {minutes:g} min on {threads} thread(s) ...", flush=True)
            (run["wall_s"],), run["interference"] = run_together([pretrain_command(run)], env)
    else:
        print(f"{' and '.join(r['name'] for r in runs)}: training at the same time, {minutes:g} min, "
              f"{threads} thread(s) each ...", flush=True)
        walls, interference = run_together([pretrain_command(r) for r in runs], env)
        for run, wall in zip(runs, walls):
            run.update(wall_s=wall, interference=interference)
    for run in runs:
        run["evals"] = read_evals(run["out_dir"] / "metrics.jsonl")
        last = run["evals"][-1]
        run.update(final_bpb=last["val_bpb"], final_loss=last["val_loss"], steps=last["step"],
                   train_s=last["elapsed_s"], tokens=last["tokens"])
        print(f"{run['name']}: {run['steps']} steps in {run['train_s']:.0f}s -> val {run['final_bpb']:.3f} bpb "
              f"({run['final_loss']:.3f} nats/token); other processes took {100 * run['interference']:.0f}% "
              f"of our CPUs meanwhile", flush=True)

    plot_path = work / PLOT.name if args.no_write else PLOT
    plot(runs, plot_path)

    # ---- report
    lines = ["| setup | ids | bytes/token | steps | train s | train tokens (epochs) | tokens/s | bytes/s "
             "| final val nats/token | final val bpb | CPU used by others |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        train = run["manifest"]["splits"]["train"]
        bytes_per_token = train["bytes"] / train["tokens"]
        tps = run["tokens"] / run["train_s"]
        lines.append(f"| {run['name']} | {run['vocab']} | {bytes_per_token:.2f} | {run['steps']} | {run['train_s']:.0f} | "
                     f"{run['tokens']:,} ({run['tokens'] / train['tokens']:.2f}) | {tps:,.0f} | "
                     f"{tps * bytes_per_token:,.0f} | {run['final_loss']:.3f} | **{run['final_bpb']:.3f}** | "
                     f"{100 * run['interference']:.0f}% |")
    result_table = "\n".join(lines)
    crossed = [t for t in THRESHOLDS if any(crossing_time(r["evals"], t) is not None for r in runs)]
    lines = ["| val bpb <= | " + " | ".join(r["name"] for r in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for t in crossed:
        cells = [crossing_time(r["evals"], t) for r in runs]
        lines.append(f"| {t:g} | " + " | ".join("-" if c is None else f"{c:.0f}s" for c in cells) + " |")
    crossing_table = "\n".join(lines)

    command = "benchmarks/time_to_loss.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        "## Time to loss: Tiny Shakespeare, BPE vs bytes",
        "",
        f"Command: `.venv/bin/python {command.strip()}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; fmforge at {git_state()}  ",
        f"Machine: {describe_machine()}; shared with other jobs (run-to-run 10-20%). "
        f"{'The runs were sequential' if args.sequential else 'Both runs trained at the same time'}, "
        f"{threads} thread(s) each; the last column is the share of our CPUs other processes took meanwhile  ",
        f"Pipeline: `fmforge prepare tinyshakespeare.jsonl --vocab-size N --val-fraction 0.1` "
        f"({len(documents)} documents of ~{args.document_bytes // 1024} KB cut at blank lines), then "
        f"`fmforge pretrain --config shakespeare --max_minutes {minutes:g} --eval_interval {eval_interval} "
        f"--eval_tokens {EVAL_TOKENS}` (preset small, 6 x 256, context 256, batch 16, lr 3e-3 cosine, precision auto "
        f"= bf16 here). Val split: {runs[0]['manifest']['splits']['val']['bytes']:,} bytes. Wall seconds count from "
        f"the first step and include periodic evals; the last point is the full-val-split final eval.",
        "",
        result_table,
        "",
        "Wall seconds until the first eval at or below each bits-per-byte threshold:",
        "",
        crossing_table,
        "",
        f"Plot: `{plot_path.relative_to(REPO) if plot_path == PLOT else plot_path}`. Reference: nanoGPT's char-level Shakespeare baseline reaches ~1.47 "
        f"nats/char = {NANOGPT_CHAR_BPB:.2f} bpb after a few minutes on a GPU with a 10.7M-parameter model.",
    ])
    print("\n" + report)
    if not args.no_write:
        write_section(SECTION, report)
        print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
