"""Long context: passkey retrieval at 1x, 2x, 4x and 8x the trained context, before and after a short extension
run, per RoPE scaling method; and held-out bits per byte as a function of position.

    python benchmarks/long_context.py --text ../shared/data/tinyshakespeare.txt [--quick]

1. A BPE tokenizer and prepared directories: Tiny Shakespeare (split into documents), passkey documents
   (Mohtashami & Jaggi 2023's format: repeated filler sentences, "The pass key is 48213. Remember it." at a random
   depth, then "What is the pass key? The pass key is 48213") and copy drills (a list of numbers, then the list
   again: the retrieval skill in its plainest form).
2. The base: pretrained at context T on a mixture of the three (`train.mixture`, 0.5:1:2).
3. Extension (`train.init_from`, the extension recipe fmforge/recipes/extend-context.yaml): continue pretraining at
   4T with each method's `model.rope_scaling` (none, linear, ntk, yarn; factor 4 over the original T), a short
   budget, the same mixture with passkey documents up to 4T long, packed end to end (`--packing aligned` puts each
   whole in a window of its own: measured weaker), plus `--full-docs W` (default 1): documents of 0.9-1 x 4T tokens,
   each whole in a training window, at weight W: what took retrieval at 4x past 0.95.
4. Passkey accuracy (the key's tokens are each the greedy choice after "...The pass key is") on held-out prompts of
   T, 2T, 4T and 8T tokens with the key at a uniformly random depth, for the base (plain RoPE, and each scaling
   applied without training) and for each extended model; bits/byte per position on held-out Shakespeare windows
   of 8T tokens (plot: benchmarks/long-context-bpb.png).
Cached and resumable in --work; the results go to RESULTS.md ("long-context").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import REPO, describe_machine, git_state, write_section, cli, stage

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there. ")
METHODS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "ntk": {"rope_type": "ntk", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0},  # + original_max_position_embeddings = T
}
PROMPT_SEED = 1234  # the passkey prompts of the results' rows; another --prompt-seed adds rows of its own


# --keys words: the key is one of these words instead of a 5-digit number (see main's help).
KEY_WORDS = ("apricot", "badger", "cobalt", "dolphin", "emerald", "falcon", "gondola", "harpoon", "iguana", "jasmine",
             "kettle", "lantern", "mango", "nutmeg", "octopus", "pelican", "quartz", "raccoon", "saffron", "tulip",
             "umbrella", "violin", "walrus", "xylophone", "yogurt", "zeppelin", "anchor", "biscuit", "cactus",
             "dragon", "eclipse", "fossil", "giraffe", "hammock", "igloo", "jaguar", "koala", "lobster", "magnet",
             "napkin", "orchid", "penguin", "quill", "rocket", "scarab", "trumpet", "unicorn", "volcano", "wizard",
             "yacht", "zucchini", "acorn", "banjo", "comet", "dynamo", "engine", "feather", "glacier", "helmet",
             "ivory", "juniper", "kayak", "lemur", "marble")


def passkey_document(rng: random.Random, repeats: int, key: int | str | None = None,
                     words: bool = False) -> tuple[str, str]:
    """(prompt ending in "The pass key is", " KEY"): the key sentence after a random number of the filler repeats."""
    if key is None:
        key = rng.choice(KEY_WORDS) if words else rng.randrange(10000, 100000)
    depth = rng.randint(0, repeats)
    prompt = (INTRO + FILLER * depth + f"The pass key is {key}. Remember it. {key} is the pass key. "
              + FILLER * (repeats - depth) + "What is the pass key? The pass key is")
    return prompt, f" {key}"


def write_passkey_jsonl(path: Path, count: int, max_repeats: int, seed: int, words: bool,
                        min_repeats: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            prompt, answer = passkey_document(rng, rng.randint(min_repeats, max_repeats), words=words)
            f.write(json.dumps({"text": prompt + answer + "."}) + "\n")


def write_aligned_passkey(out: Path, tokenizer, window: int, count: int, shortest: int, seed: int, words: bool,
                          padding: np.ndarray) -> None:
    """Prepared passkey data in which every document starts a training window and ends inside it.

    The loader cuts fixed windows from one packed stream, so a document of D tokens lies whole in a window of W only
    when it happens to start in the first W - D tokens of one: a passkey document of 0.9 W is whole in one window of
    ten, and in the other nine the question comes without its key (the model learns to guess) or the key without its
    question. Here each document (bos + prompt + answer + eos, between `shortest` and `window` tokens) is followed
    by `padding` tokens (Shakespeare) up to exactly `window`, so each window holds one whole document, its key at a
    uniformly random depth."""
    from fmforge.data.shards import write_token_documents
    rng = random.Random(seed)
    bos = [tokenizer.bos_id] if tokenizer.add_bos_token else []

    def documents(n: int):
        for _ in range(n):
            repeats = repeats_for(tokenizer, rng.randint(shortest, window))
            while True:
                prompt, answer = passkey_document(rng, repeats, words=words)
                ids = bos + tokenizer.encode(prompt + answer + ".") + [tokenizer.eos_id]
                if len(ids) <= window or repeats == 0:
                    break
                repeats -= 1
            start = rng.randrange(len(padding) - window)
            unit = np.asarray(ids[:window] + padding[start:start + window - len(ids)].tolist(), dtype=np.int64)
            yield unit, len(tokenizer.decode(unit).encode())

    write_token_documents(out, tokenizer, {"train": documents(count), "val": documents(max(1, count // 50))},
                          input_fingerprint=f"aligned-passkey:{tokenizer.fingerprint()}:{window}:{count}:{shortest}:"
                                            f"{seed}:{words}:{len(padding)}",
                          sources={"specs": ["aligned passkey documents"]}, options={"val_fraction": 0.02},
                          progress=False)


def write_copy_jsonl(path: Path, count: int, max_numbers: int, seed: int) -> None:
    """Copy drills: a list of random 5-digit numbers, then the same list again. Induction heads (Olsson et al. 2022)
    form from such repeats far sooner than from the passkey documents alone, whose keys are ~2% of their tokens."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(count):
            numbers = " ".join(str(rng.randrange(10000, 100000)) for _ in range(rng.randint(2, max_numbers)))
            f.write(json.dumps({"text": f"Numbers: {numbers}. Again: {numbers}."}) + "\n")


def split_text(text_file: Path, out: Path, lines_per_part: int = 500) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = text_file.read_text().splitlines(keepends=True)
    for i in range(0, len(lines), lines_per_part):
        (out / f"part-{i // lines_per_part:03d}.txt").write_text("".join(lines[i:i + lines_per_part]))


def repeats_for(tokenizer, tokens: int) -> int:
    """Filler repeats that make a passkey prompt about `tokens` tokens long."""
    base = len(tokenizer.encode(passkey_document(random.Random(0), 0)[0]))
    per_repeat = len(tokenizer.encode(FILLER * 10)) / 10
    return max(0, int((tokens - base - 8) / per_repeat))


def model_at(checkpoint: Path, length: int, scaling: dict | None):
    """The checkpoint's weights in a model that runs `length` positions with `scaling` (None = as trained)."""
    from fmforge.checkpoint import load_model
    from fmforge.model import Transformer
    model, _ = load_model(checkpoint)
    config = dataclasses.replace(model.config, context_length=max(length, model.config.context_length),
                                 rope_scaling=model.config.rope_scaling if scaling == "trained" else scaling)
    longer = Transformer(config).eval()
    longer.load_state_dict(model.state_dict())
    return longer


@torch.no_grad()
def passkey_accuracy(model, tokenizer, length: int, count: int, seed: int, words: bool = False) -> float:
    """Share of prompts of ~`length` tokens whose key tokens are each the model's greedy choice."""
    rng = random.Random(seed)
    repeats = repeats_for(tokenizer, length)
    correct = 0
    for _ in range(count):
        prompt, answer = passkey_document(rng, repeats, words=words)
        prompt_ids, answer_ids = tokenizer.encode(prompt, add_bos=True), tokenizer.encode(answer)
        ids = torch.tensor([prompt_ids + answer_ids])
        logits = model(ids[:, :-1]).logits[0, len(prompt_ids) - 1:]
        correct += int(logits.argmax(-1).tolist() == answer_ids)
    return correct / count


@torch.no_grad()
def bits_per_byte_by_position(model, windows: torch.Tensor, bytes_per_token: float, bucket: int) -> list[float]:
    """Mean bits/byte of each `bucket` positions over held-out windows (N, L+1)."""
    import torch.nn.functional as F
    losses = []
    for row in windows:
        logits = model(row[None, :-1]).logits[0]
        losses.append(F.cross_entropy(logits.float(), row[1:], reduction="none"))
    per_position = torch.stack(losses).mean(0)  # (L,) nats/token
    bits = per_position / torch.log(torch.tensor(2.0)) / bytes_per_token
    return [float(b) for b in bits.view(-1, bucket).mean(-1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", required=True, help="Tiny Shakespeare (or another long text file)")
    parser.add_argument("--work", help="cache directory (default runs/bench-long-context[-words])")
    parser.add_argument("--keys", choices=["numbers", "words"], default="words",
                        help="numbers: 5-digit keys, copied digit by digit (needs induction heads); words: one of "
                             f"{len(KEY_WORDS)} words, found by what it is (one attention hop) and completed from "
                             "memory")
    parser.add_argument("--context", type=int, default=256, help="the base's trained context T")
    parser.add_argument("--base-steps", type=int, default=2000)
    parser.add_argument("--extend-steps", type=int, default=1500)
    parser.add_argument("--prompts", type=int, default=200, help="passkey prompts per length")
    parser.add_argument("--prompt-seed", type=int, default=PROMPT_SEED,
                        help="draws the passkey prompts (seed + length); another seed re-scores the cached models on "
                             "other prompts, in rows of their own")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the numbers")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--layers", type=int, default=4, help="the base's layers (default 4)")
    parser.add_argument("--width", type=int, default=128, help="the base's width (default 128; heads of 32)")
    parser.add_argument("--factor", type=float, default=4.0,
                        help="the scaling factor of linear/ntk/yarn (default 4: the extension's length over T; "
                             "a larger one leaves headroom past it)")
    parser.add_argument("--long-from", type=float, default=0.0,
                        help="the extension's passkey documents are between this share of 4T and ~0.9 x 4T long "
                             "(default 0: any length up to it; 0.5 puts every key further than T from its question "
                             "more often, the distances a 4T prompt asks for)")
    parser.add_argument("--packing", choices=["stream", "aligned"], default="stream",
                        help="stream (default): passkey documents packed end to end like other text, so a long one is "
                             "often cut across two windows; aligned: each starts a training window and is whole in it "
                             "(Shakespeare fills the rest; fewer questions a window, measured worse, see RESULTS)")
    parser.add_argument("--full-docs", type=float, default=1.0,
                        help="mixture weight (beside text 1, passkey documents 1, copy drills 0.5) of full-length "
                             "passkey documents in the extension: 0.9-1 x 4T tokens, each whole in its window, the key "
                             "at a uniformly random depth, the distances a 4T prompt asks for (default 1; 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the base and the extensions (the data "
                        "and the prompts stay the same)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    words = args.keys == "words"
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown --methods {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    if args.width < 32 or args.width % 32 or args.layers < 1:
        parser.error(f"--width must be a multiple of 32 (heads of 32) and --layers >= 1, got {args.width}, "
                     f"{args.layers}")
    if not 0 <= args.long_from < 0.9:
        parser.error(f"--long-from must be in [0, 0.9), got {args.long_from}")
    if args.factor < 1:
        parser.error(f"--factor must be >= 1, got {args.factor}")
    methods = {m: METHODS[m] and {**METHODS[m], "factor": args.factor} for m in args.methods.split(",")}
    tag = ("" if args.factor == 4 else f" x{args.factor:g}") + (f" full{args.full_docs:g}" if args.full_docs else "")
    # runs and rows of another factor or extension data are kept apart
    work = Path(args.work or REPO / "runs" / ("bench-long-context" + ("-words" if words else "")
                                              + ("-aligned" if args.packing == "aligned" else "")))
    work.mkdir(parents=True, exist_ok=True)
    T = args.context
    base_steps, extend_steps = (30, 10) if args.quick else (args.base_steps, args.extend_steps)
    prompts = 6 if args.quick else args.prompts
    started, load = time.perf_counter(), os.getloadavg()
    print(f"machine: {describe_machine()} | load average at start {load[0]:.2f}", flush=True)

    # 1. data
    tok = work / "tokenizer"
    text_parts, passkey_src = work / "text-parts", work / "passkey-source"
    if stage("tokenizer", tok / "tokenizer.json"):
        split_text(Path(args.text), text_parts)
        passkey_src.mkdir(exist_ok=True)
        write_passkey_jsonl(passkey_src / "sample.jsonl", 200, 40, seed=99, words=words)
        cli("tokenizer", "train", text_parts, passkey_src / "sample.jsonl", "--vocab-size", "1024", "--out", tok)
    from fmforge.checkpoint import load_tokenizer
    tokenizer = load_tokenizer(tok)
    per_repeat = len(tokenizer.encode(FILLER * 10)) / 10
    packed = "-aligned" if args.packing == "aligned" else ""
    data = {"text": work / "data-text", "short": work / f"data-passkey-short{packed}",
            "long": work / f"data-passkey-long{packed}", "full": work / "data-passkey-full",
            "copy": work / "data-copy"}
    if stage("text data", data["text"] / "manifest.json"):
        cli("prepare", text_parts, "--tokenizer", tok, "--val-fraction", "0.1", "--out", data["text"])
    for name, tokens, count in [("short", T, 6000), ("long", 4 * T, 3000)]:
        if stage(f"passkey data ({name}, up to ~{tokens} tokens, {args.packing})", data[name] / "manifest.json"):
            shortest = args.long_from * tokens if name == "long" else 0
            count = 200 if args.quick else count
            if args.packing == "aligned":
                from fmforge.data.shards import load_split
                padding = np.concatenate([s[:] for s in load_split(data["text"], "train")])
                write_aligned_passkey(data[name], tokenizer, tokens, count, int(shortest), seed=len(name),
                                      words=words, padding=padding)
                continue
            jsonl = passkey_src / f"{name}.jsonl"
            write_passkey_jsonl(jsonl, count, repeats_for(tokenizer, tokens * 0.9),
                                seed=len(name), words=words, min_repeats=repeats_for(tokenizer, shortest))
            cli("prepare", jsonl, "--tokenizer", tok, "--val-fraction", "0.02", "--out", data[name])

    if args.full_docs and stage(f"full-length passkey documents ({int(0.9 * 4 * T)}-{4 * T} tokens, whole in a window)",
                                data["full"] / "manifest.json"):
        from fmforge.data.shards import load_split
        padding = np.concatenate([s[:] for s in load_split(data["text"], "train")])
        write_aligned_passkey(data["full"], tokenizer, 4 * T, 200 if args.quick else 3000, int(0.9 * 4 * T), seed=11,
                              words=words, padding=padding)
    if stage("copy drills", data["copy"] / "manifest.json"):
        write_copy_jsonl(passkey_src / "copy.jsonl", 200 if args.quick else 8000, 20, seed=7)
        cli("prepare", passkey_src / "copy.jsonl", "--tokenizer", tok, "--val-fraction", "0.02", "--out", data["copy"])

    # 2. the base at context T
    base = work / "base"
    common = ["--model.n_layer", args.layers, "--model.n_embd", args.width, "--model.n_head", args.width // 32,
              "--train.batch_size", 16,
              "--train.eval_interval", 10_000, "--train.log_interval", 25, "--train.seed", args.seed]
    if stage(f"base at context {T} ({base_steps} steps)", base / "latest"):
        mixture = json.dumps({str(data["text"]): 0.5, str(data["short"]): 1.0, str(data["copy"]): 2.0})
        cli("pretrain", *common, "--model.context_length", T, "--train.mixture", mixture, "--train.max_steps",
            base_steps, "--train.lr", 3e-3, "--train.warmup_steps", 30, "--train.checkpoint_interval", base_steps,
            "--train.out_dir", base)

    # 3. extension to 4T, per method (the recipe fmforge/recipes/extend-context.yaml with its fields overridden)
    extended = {}
    for method, scaling in methods.items():
        out = work / (f"extend-{method}" + tag.replace(" ", "-"))
        extended[method] = out
        if scaling and scaling["rope_type"] == "yarn":
            scaling = {**scaling, "original_max_position_embeddings": T}
        if stage(f"extend to {4 * T} with {method} ({extend_steps} steps)", out / "latest"):
            mixture = {str(data["text"]): 1.0, str(data["long"]): 1.0, str(data["copy"]): 0.5}
            if args.full_docs:
                mixture[str(data["full"])] = args.full_docs
            cli("pretrain", "--config", "extend-context", "--train.init_from", base, "--model.context_length", 4 * T,
                "--model.rope_scaling", json.dumps(scaling), "--train.mixture", json.dumps(mixture),
                "--train.max_steps", extend_steps, "--train.batch_size", 4, "--train.eval_interval", 10_000,
                "--train.checkpoint_interval", extend_steps,
                "--train.seed", 1337 + args.seed, "--train.out_dir", out)  # 1337: TrainConfig's default

    # 4. scores
    lengths = [T, 2 * T, 4 * T, 8 * T]
    scores_file = work / ("scores-quick.json" if args.quick else "scores.json")
    scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
    from fmforge.checkpoint import resolve_checkpoint
    from fmforge.data.shards import load_split, read_manifest
    manifest = read_manifest(data["text"])
    bytes_per_token = manifest.val.bytes / manifest.val.tokens
    val = torch.from_numpy(np.concatenate([s[:] for s in load_split(data["text"], "val")])).long()
    L = 8 * T
    n_windows = min(len(val) // (L + 1), 2 if args.quick else 6)
    windows = val[:n_windows * (L + 1)].view(n_windows, L + 1)
    print(f"held-out: {len(val):,} val tokens, {n_windows} windows of {L} for bits/byte by position", flush=True)
    factor_tag = "" if args.factor == 4 else f" x{args.factor:g}"
    variants = [(f"base, {m}" + (factor_tag + " (no training)" if m != "none" else ""), base, methods[m], m)
                for m in methods] + [(f"extended, {m}" + (factor_tag if m != "none" else "")
                                      + (f", full-length documents {args.full_docs:g}" if args.full_docs else ""),
                                      extended[m], "trained", m) for m in methods]
    if args.prompt_seed != PROMPT_SEED:
        variants = [(f"{name} [prompt seed {args.prompt_seed}]", *rest) for name, *rest in variants]
    for name, run, scaling, method in variants:
        if name in scores:
            continue
        if isinstance(scaling, dict) and scaling["rope_type"] == "yarn":
            scaling = {**scaling, "original_max_position_embeddings": T}
        checkpoint = resolve_checkpoint(run)
        row = {"method": method}
        for length in lengths:
            model = model_at(checkpoint, length, scaling)
            row[str(length)] = passkey_accuracy(model, tokenizer, length, prompts, seed=args.prompt_seed + length,
                                                words=words)
        row["bpb_by_position"] = bits_per_byte_by_position(model_at(checkpoint, L, scaling), windows,
                                                           bytes_per_token, bucket=T // 4)
        scores[name] = row
        scores_file.write_text(json.dumps(scores, indent=1))
        print(f"{name}: passkey " + ", ".join(f"{n}: {row[str(n)]:.2f}" for n in lengths)
              + f" | bits/byte first {T}: {sum(row['bpb_by_position'][:4]) / 4:.3f}, "
              f"last {T}: {sum(row['bpb_by_position'][-4:]) / 4:.3f}", flush=True)

    minutes = (time.perf_counter() - started) / 60
    plot(scores, T, REPO / "benchmarks" / ("long-context-bpb-quick.png" if args.quick else "long-context-bpb.png"))
    body = report(scores, lengths, T, base_steps, extend_steps, prompts, per_repeat, minutes, load, args)
    print(body)
    if not args.no_results and not args.quick:
        write_section("long-context", body)


def plot(scores: dict, T: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, row in scores.items():
        if "[prompt seed" in name:  # the same model and windows as a row already drawn
            continue
        values = row["bpb_by_position"]
        bucket = 8 * T // len(values)
        ax.plot([(i + 0.5) * bucket for i in range(len(values))], values, label=name,
                linestyle="-" if name.startswith("extended") else ":")
    for multiple in (1, 4):
        ax.axvline(multiple * T, color="grey", linewidth=0.5)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_ylim(top=min(8.0, ax.get_ylim()[1]))
    ax.set_title(f"Tiny Shakespeare held-out, by position (base trained at {T}, extended at {4 * T})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(scores, lengths, T, base_steps, extend_steps, prompts, per_repeat, minutes, load, args) -> str:
    lines = [
        "## Long context: passkey retrieval and bits/byte by position",
        "",
        "`python benchmarks/long_context.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        + f"` — {minutes:.0f} min, load average "
        f"{load[0]:.2f} at start; commit {git_state()}; {describe_machine()}.",
        "",
        f"Base: {args.layers} layers, width {args.width}, BPE 1024, pretrained {base_steps} steps at context {T} "
        "(Tiny Shakespeare + "
        f"passkey documents up to {T} tokens + copy drills, 0.5:1:2; passkey documents "
        + ("each whole in a window" if args.packing == "aligned" else "packed end to end")
        + f"). Extension: `train.init_from` the base, context {4 * T}, "
        f"`model.rope_scaling` per method (factor 4; YaRN over original {T}), {extend_steps} steps of 4 x {4 * T} "
        f"tokens on Shakespeare + passkey documents of {int(args.long_from * 4 * T)} to {4 * T} tokens + copy drills"
        + (f" + full-length passkey documents (0.9-1 x {4 * T} tokens, each whole in a window), "
           f"1:1:0.5:{args.full_docs:g}. " if args.full_docs else ", 1:1:0.5. ")
        + f"Passkey: {prompts} held-out prompts per "
        f"length, key ({'one of ' + str(len(KEY_WORDS)) + ' words' if args.keys == 'words' else 'a 5-digit number'}) "
        "at a uniformly random depth; correct = every key token is the greedy choice.",
        "",
        "| model | " + " | ".join(f"{n // T}x ({n})" for n in lengths) + f" | bits/byte, first {T} | "
        f"bits/byte, {4 * T - T}-{4 * T} | bits/byte, last {T} |",
        "|---|" + "---:|" * (len(lengths) + 3),
    ]
    for name, row in scores.items():
        bpb = row["bpb_by_position"]
        q = len(bpb) // 8  # buckets per T
        lines.append(f"| {name} | " + " | ".join(f"{row[str(n)]:.2f}" for n in lengths)
                     + f" | {sum(bpb[:q]) / q:.3f} | {sum(bpb[3 * q:4 * q]) / q:.3f} | {sum(bpb[-q:]) / q:.3f} |")
    lines += ["", "![bits/byte by position](long-context-bpb.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
