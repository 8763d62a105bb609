"""Time to quality on Tiny Shakespeare: fmforge's shipped `shakespeare` recipe against nanoGPT's README CPU
command, side by side in one script, on nanoGPT's split (the first 90% of the file trains, the last 10% scores).

nanoGPT is a checkout kept out of this repository (`git clone https://github.com/karpathy/nanoGPT DIR`) passed as
`--nanogpt DIR`; its files are copied into the work directory, its own `data/shakespeare_char/prepare.py` reads
our copy of the text (no download) and its `train.py` runs the README's CPU command. Without a checkout the
nanoGPT column is skipped with a message and fmforge runs alone.

fmforge runs as a user does: `fmforge prepare train.txt --val-data val.txt --vocab-size V`, then `fmforge
pretrain --config shakespeare --max_minutes M` for each budget M (and each --variant: extra recipe overrides,
for ablations).

Quality is bits per byte on the whole held-out 10% (Tiny Shakespeare is ASCII: bits/byte = bits/char). nanoGPT's
log estimates its val loss on 20 random 64-character blocks; the script also scores its saved checkpoint on every
64-character block of the val split with nanoGPT's own model code, so that its final number is not a sample.
fmforge's final eval covers the whole val split in windows of the recipe's context.

Time: training seconds from the first optimizer step (nanoGPT: from its step-0 eval line; fmforge: metrics.jsonl's
elapsed_s), evals included, and each process's wall time. The runs go one after the other with the same threads
(default: all cores), so time this on a quiet machine; the load average is recorded.

    python benchmarks/time_to_loss.py --data ../shared/data/tinyshakespeare.txt --nanogpt ~/nanoGPT
    python benchmarks/time_to_loss.py --data ... --budgets 1 --variant muon="--optimizer muon" --no-write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from _common import HERE, REPO, RESULTS, describe_machine, git_state, load_average, write_section

PLOT = HERE / "time_to_loss.png"
SECTION = "time_to_loss"
FMFORGE = [sys.executable, "-m", "fmforge.cli"]
EVAL_TOKENS = 8192  # val tokens per periodic eval of fmforge (the final eval reads the whole val split)
# nanoGPT README, "I only have a macbook" / CPU: the command a new user runs.
NANOGPT_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                   "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
                   "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
LN2 = 0.6931471805599453


def split_like_nanogpt(text: str) -> tuple[str, str]:
    """nanoGPT's data/shakespeare_char/prepare.py: the first int(0.9 n) characters train, the rest is val."""
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


def run_logged(command: list[str], log: Path, env: dict, cwd: Path) -> tuple[float, list[tuple[float, str]]]:
    """Run `command`, keep its output in `log`; return its wall seconds and each output line with the seconds
    since start at which it arrived."""
    start = time.perf_counter()
    lines = []
    with open(log, "w") as sink, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  text=True, cwd=cwd, env=env, bufsize=1) as proc:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
            sink.write(line)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {shlex.join(command)}\n--- {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start, lines


# ---- nanoGPT ------------------------------------------------------------------------------------------------

def run_nanogpt(checkout: Path, text: str, work: Path, env: dict) -> dict:
    here = work / "nanoGPT"
    shutil.copytree(checkout, here, ignore=shutil.ignore_patterns(".git", "assets", "out-*", "*.bin", "*.pkl"))
    data = here / "data" / "shakespeare_char"
    (data / "input.txt").write_text(text, encoding="utf-8")  # present, so prepare.py downloads nothing
    run_logged([sys.executable, "data/shakespeare_char/prepare.py"], work / "nanogpt-prepare.log", env, here)
    print(f"nanoGPT: {shlex.join(['python', *NANOGPT_COMMAND])} ...", flush=True)
    wall, lines = run_logged([sys.executable, *NANOGPT_COMMAND], work / "nanogpt.log", env, here)
    evals = [(at, NANOGPT_EVAL.match(line)) for at, line in lines if NANOGPT_EVAL.match(line)]
    origin = evals[0][0]  # the step-0 eval is printed just before the first optimizer step
    curve = [{"step": int(m[1]), "elapsed_s": at - origin, "val_bpb": float(m[3]) / LN2} for at, m in evals]
    checkpoint = here / "out-shakespeare-char" / "ckpt.pt"
    full = score_nanogpt(here, checkpoint, data / "val.bin")
    return {"name": "nanoGPT", "setting": "README CPU command (4 x 128, block 64, 2000 iters)", "wall_s": wall,
            "train_s": curve[-1]["elapsed_s"], "steps": curve[-1]["step"], "evals": curve,
            "final_bpb": full["bpb"], "logged_bpb": curve[-1]["val_bpb"], "scored_step": full["step"]}


def score_nanogpt(here: Path, checkpoint: Path, val_bin: Path, block: int = 64) -> dict:
    """Mean loss of nanoGPT's checkpoint over every `block`-character block of the val split (its estimator's
    blocks, all of them instead of 20 x 12 random ones), with nanoGPT's own model code."""
    import numpy as np
    import torch

    sys.path.insert(0, str(here))
    try:
        from model import GPT, GPTConfig  # nanoGPT's model.py
    finally:
        sys.path.remove(str(here))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**saved["model_args"]))
    model.load_state_dict(saved["model"])
    model.eval()
    ids = torch.from_numpy(np.fromfile(val_bin, dtype=np.uint16).astype(np.int64))
    n = (len(ids) - 1) // block
    x, y = ids[:n * block].view(n, block), ids[1:n * block + 1].view(n, block)
    total = 0.0
    with torch.no_grad():
        for i in range(0, n, 64):
            logits, _ = model(x[i:i + 64], y[i:i + 64])  # with targets: logits at every position
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + 64].flatten(),
                                                       reduction="sum").item()
    return {"bpb": total / (n * block) / LN2, "step": int(saved["iter_num"])}


# ---- fmforge ------------------------------------------------------------------------------------------------

def prepare_fmforge(work: Path, vocab: int, env: dict) -> tuple[Path, dict]:
    data = work / "fmforge-data"
    command = FMFORGE + ["prepare", str(work / "train.txt"), "--val-data", str(work / "val.txt"),
                         "--vocab-size", str(vocab), "--out", str(data)]
    run_logged(command, work / "fmforge-prepare.log", env, REPO)
    return data, json.loads((data / "manifest.json").read_text())


def run_fmforge(data: Path, out: Path, minutes: float, eval_interval: int, extra: list[str], env: dict) -> dict:
    command = FMFORGE + ["pretrain", "--config", "shakespeare", "--data_dir", str(data), "--out_dir", str(out),
                         "--max_minutes", f"{minutes:g}", "--eval_interval", str(eval_interval),
                         "--eval_tokens", str(EVAL_TOKENS), "--checkpoint_interval", "100000", *extra]
    wall, _ = run_logged(command, out.parent / f"{out.name}.log", env, REPO)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in records if "val_bpb" in r]
    shape = yaml.safe_load((out / "run.yaml").read_text())["model"]
    return {"wall_s": wall, "train_s": evals[-1]["elapsed_s"], "steps": evals[-1]["step"], "evals": evals,
            "final_bpb": evals[-1]["val_bpb"], "tokens": evals[-1]["tokens"],
            "shape": f"{shape.get('n_layer')} x {shape.get('n_embd')}, context {shape.get('context_length')}"}


def crossing_time(evals: list[dict], threshold: float) -> float | None:
    """Training seconds of the first eval at or below `threshold` bits/byte."""
    return next((r["elapsed_s"] for r in evals if r["val_bpb"] <= threshold), None)


def plot(runs: list[dict], target: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for run in runs:
        label = f"{run['name']}: {run['final_bpb']:.3f} bits/byte in {run['train_s']:.0f}s"
        ax.plot([r["elapsed_s"] for r in run["evals"]], [r["val_bpb"] for r in run["evals"]], marker="o",
                markersize=3, label=label, linestyle="--" if run["name"] == "nanoGPT" else "-")
    if target is not None:
        ax.axhline(target, color="grey", linewidth=1)
        ax.text(0.99, target, "nanoGPT's final quality", ha="right", va="bottom", fontsize=8, color="grey",
                transform=ax.get_yaxis_transform())
    ax.set_xlabel("training seconds (from the first step, evals included)")
    ax.set_ylabel("held-out bits per byte (last 10% of the file)")
    ax.set_title("Tiny Shakespeare on the CPU: time to quality")
    ax.set_ylim(top=min(4.5, max(r["val_bpb"] for run in runs for r in run["evals"]) + 0.1))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 1.0], help="fmforge --max_minutes runs")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="also run the recipe with these overrides, e.g. muon='--optimizer muon' (repeatable)")
    parser.add_argument("--vocab-size", type=int, default=None, help="BPE ids (default: the recipe's comment, 1024)")
    parser.add_argument("--eval-interval", type=int, default=20, help="fmforge steps between periodic evals")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS for every run")
    parser.add_argument("--work-dir", default="/tmp/fmforge-time-to-loss", help="data and runs (rewritten)")
    parser.add_argument("--no-write", action="store_true", help=f"print only; do not update {RESULTS.name}")
    args = parser.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    text = Path(args.data).read_text(encoding="utf-8")
    train, val = split_like_nanogpt(text)
    (work / "train.txt").write_text(train, encoding="utf-8")
    (work / "val.txt").write_text(val, encoding="utf-8")
    load_before = load_average()

    runs = []
    checkout = Path(args.nanogpt).expanduser() if args.nanogpt else None
    if checkout is None or not (checkout / "train.py").is_file():
        print(f"nanoGPT skipped: {'no --nanogpt given' if checkout is None else f'{checkout}/train.py not found'} "
              "(git clone https://github.com/karpathy/nanoGPT DIR, then --nanogpt DIR)", flush=True)
    else:
        runs.append(run_nanogpt(checkout, text, work, env))
        print(f"nanoGPT: {runs[0]['steps']} iters in {runs[0]['train_s']:.0f}s -> {runs[0]['final_bpb']:.3f} "
              f"bits/byte on the whole val split (its own estimate: {runs[0]['logged_bpb']:.3f})", flush=True)

    vocab = args.vocab_size or recipe_vocab()
    data, manifest = prepare_fmforge(work, vocab, env)
    split = manifest["splits"]
    assert split["val"]["bytes"] == len(val.encode()), "fmforge's val split must be nanoGPT's last 10%"
    variants = [("recipe", [])] + [(v.split("=", 1)[0], shlex.split(v.split("=", 1)[1])) for v in args.variant]
    for name, extra in variants:
        for minutes in args.budgets:
            label = f"fmforge {name}, {minutes:g} min"
            print(f"{label}: training ...", flush=True)
            out = work / f"fmforge-{name}-{minutes:g}min"
            run = run_fmforge(data, out, minutes, args.eval_interval, extra, env)
            run.update(name=label, setting=" ".join(extra) or "as shipped", minutes=minutes)
            runs.append(run)
            print(f"{label}: {run['steps']} steps in {run['train_s']:.0f}s ({run['shape']}) -> "
                  f"{run['final_bpb']:.3f} bits/byte", flush=True)
    load_after = load_average()

    nanogpt = next((r for r in runs if r["name"] == "nanoGPT"), None)
    target = nanogpt["final_bpb"] if nanogpt else None
    plot_path = work / PLOT.name if args.no_write else PLOT
    plot(runs, target, plot_path)
    report = format_report(args, runs, nanogpt, manifest, vocab, load_before, load_after, plot_path)
    print(report)
    if not args.no_write:
        write_section(SECTION, report)


def recipe_vocab() -> int:
    """The vocabulary size the shipped recipe's comment prepares with (`--vocab-size N`)."""
    recipe = (REPO / "fmforge" / "recipes" / "shakespeare.yaml").read_text()
    return int(re.search(r"--vocab-size (\d+)", recipe)[1])


def format_report(args, runs, nanogpt, manifest, vocab, load_before, load_after, plot_path) -> str:
    train = manifest["splits"]["train"]
    lines = ["| run | setting | shape | steps | training s | process s | held-out bits/byte |",
             "|---|---|---|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(f"| {run['name']} | {run['setting']} | {run.get('shape', '4 x 128, context 64')} | "
                     f"{run['steps']} | {run['train_s']:.0f} | {run['wall_s']:.0f} | **{run['final_bpb']:.3f}** |")
    verdict = []
    if nanogpt:
        target = nanogpt["final_bpb"]
        verdict.append(f"nanoGPT: {nanogpt['final_bpb']:.3f} bits/byte on the whole val split after "
                       f"{nanogpt['train_s']:.0f}s of training (checkpoint of iter {nanogpt['scored_step']}; its "
                       f"own 20-batch estimate at the end: {nanogpt['logged_bpb']:.3f}).")
        for run in runs:
            if run is nanogpt:
                continue
            crossed = crossing_time(run["evals"], target)
            reached = "reaches" if run["final_bpb"] <= target else "does not reach"
            verdict.append(f"{run['name']} {reached} it: {run['final_bpb']:.3f} after {run['train_s']:.0f}s of "
                           f"training ({run['train_s'] / nanogpt['train_s']:.2f}x nanoGPT's time)"
                           + (f"; its periodic eval (8k tokens) first at or below it at {crossed:.0f}s" if crossed
                              else "") + ".")
    command = "benchmarks/time_to_loss.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return "\n".join([
        "## Time to quality: Tiny Shakespeare, fmforge's shipped recipe vs nanoGPT's README CPU command",
        "",
        f"Command: `.venv/bin/python {command.strip()}`  ",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; fmforge at {git_state()}  ",
        f"Machine: {describe_machine(args.threads)}; runs one after the other, {args.threads} thread(s) each; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)  ",
        f"Split: nanoGPT's (first 90% of the file trains, last 10% = {manifest['splits']['val']['bytes']:,} bytes "
        f"scores). fmforge: `fmforge prepare train.txt --val-data val.txt --vocab-size {vocab}` "
        f"({train['bytes'] / train['tokens']:.2f} bytes/token), then `fmforge pretrain --config shakespeare "
        f"--max_minutes M --eval_interval {args.eval_interval} --eval_tokens {EVAL_TOKENS}`; its final eval covers "
        f"the whole val split. Training seconds count from the first step, evals included.",
        "",
        *lines,
        "",
        *verdict,
        "",
        f"Plot: `{plot_path.relative_to(REPO) if plot_path == PLOT else plot_path}`.",
    ])


if __name__ == "__main__":
    main()
