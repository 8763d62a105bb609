"""Translation benchmark (issue 15): Multi30K English -> German, German -> English and English -> French with a
decoder-only model pretrained and fine-tuned here on the CPU, scored by sacrebleu on test_2016_flickr; and the
foundation claim at N = 1,000 pairs.

    python benchmarks/translation.py --multi30k DIR --threads 2            # the full run (<= 60 min on 2 CPUs)
    python benchmarks/translation.py --multi30k DIR --threads 1 --quick    # the whole pipeline, tiny budgets

DIR holds Multi30K's task-1 text: train / val / test_2016_flickr .en/.de/.fr(.gz), one sentence a line, aligned.
Stages, each cached in --work (a training run cut short resumes from its last checkpoint; rerun the same command):
 1. monolingual text: the train split's en, de and fr sentences, unpaired and shuffled together, one JSONL
    document a sentence (the pairs are never seen side by side).
 2. data: `fmforge prepare --vocab-size 4096` trains one byte-level BPE on those sentences and shards them (1% val).
 3. base: `fmforge pretrain --optimizer muon`, a 4-layer x 256 causal decoder (context 128) on the monolingual
    shards (Muon beat AdamW here as on Tiny Shakespeare: RESULTS.md's translation reading of 2026-12-08).
 4. method: full fine-tuning and LoRA (rank 32), each for --probe-minutes on en->de, scored by chrF on the first
    --probe-limit pairs of the val split; the better one trains every direction (--method full|lora skips this).
 5. directions: `fmforge finetune --task translate --data parallel:train.SRC.gz:train.TGT.gz` on all 29,000 pairs
    for --direction-minutes each (the val split's loss is logged; test is never read in training).
 6. scores: `fmforge eval --tasks translate:parallel:test_2016_flickr.SRC.gz:test_2016_flickr.TGT.gz`, sacrebleu's
    default BLEU and chrF of greedy translations on detokenized text (what the model writes, as written).
 6b. decoding: greedy against beam search (`fmforge eval --beams N --length-penalty A`, each of
    --length-penalties) on the first --probe-limit en->de val pairs with the en->de specialist; the best by chrF
    scores every direction's test set again (the table shows both).
 7. the foundation claim: the first 1,000 en->de training pairs; the base + the chosen method vs the same
    architecture from random weights (full fine-tuning, the pretraining lr), the same steps and batches, seeds 0
    and 1, both scored on the first --claim-test-limit pairs of the test set.
Writes RESULTS.md's "translation" section (not with --quick). The full run's plan on 2 idle cores, ~50 min (48
measured on 2026-12-08): data < 1, pretraining 12, method 2 x 1.5 + val scoring, directions 3 x 9, test scoring
0.3-2 each (greedy; a model that rambles to the 96-token cap is the slow case), decoding ~1, beam-search test
scoring ~0.7 each, claim 4 runs of 120 steps (~0.7 min each) + scoring. The minute budgets hold on a busier
machine (fewer steps); the claim's fixed step counts and the scoring stretch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

from _common import REPO, describe_machine, git_state, write_section, cached_json, cli, latest

BASE_SHAPE = ["--n_layer", "4", "--n_embd", "256", "--n_head", "4", "--n_kv_head", "4", "--context_length", "128"]
QUICK_SHAPE = ["--n_layer", "2", "--n_embd", "64", "--n_head", "2", "--n_kv_head", "2", "--context_length", "128"]
DIRECTIONS = (("en", "de"), ("de", "en"), ("en", "fr"))
CLAIM_DIRECTION = ("en", "de")
NAMES = {"en": "English", "de": "German", "fr": "French"}
TARGET_BLEU = {("en", "de"): 30.0}  # the issue's bar; it sets none for the other two directions
PRETRAIN_LR = 3e-3
PRETRAIN_OPTIMIZER = "muon"  # the scratch arm of the claim and the specialists keep finetune's AdamW
FINETUNE_LR = {"full": 1e-3, "lora": 3e-3}
LORA_RANK = 32
BATCH_SIZE = 16  # packed rows of 128 tokens: ~29 sentence pairs a step (29,000 pairs pack into ~16,000 rows)


def run_steps(run: Path) -> tuple[int, int] | None:
    """(steps done, steps planned) of a training run's newest checkpoint; None before its first checkpoint."""
    import yaml

    from fmforge.checkpoint import latest_in_run
    if not (run / "latest").exists():
        return None
    state = latest_in_run(run) / "train_state"
    planned = yaml.safe_load((state / "run.yaml").read_text())["train"]["max_steps"]
    return json.loads((state / "state.json").read_text())["step"], planned


def train(command: str, out: Path, *args) -> Path:
    """`fmforge pretrain|finetune ARGS` into `out`, unless that run has finished. Always with --resume: a run cut
    short (Ctrl-C saves a checkpoint; a kill leaves the last periodic one) continues, a new one starts at step 0."""
    steps = run_steps(out)
    print(f"== {command} {out.name}" + (" (cached)" if steps and steps[0] >= steps[1] else ""), flush=True)
    if not (steps and steps[0] >= steps[1]):
        cli(command, *args, "--resume")
        steps = run_steps(out)
        if not (steps and steps[0] >= steps[1]):
            raise SystemExit(f"{out} stopped at step {steps and steps[0]}; run the same command again to resume it")
    return out


# ---- 1-3. text, data, base ---------------------------------------------------------------------------------------

def monolingual_text(multi30k: Path, path: Path, seed: int = 0) -> None:
    """The train split's en, de and fr sentences shuffled together: one {"text": sentence} a line."""
    from fmforge.data.translation import read_lines
    sentences = [line for lang in ("en", "de", "fr") for line in read_lines(split_file(multi30k, "train", lang))
                 if line.strip()]
    random.Random(seed).shuffle(sentences)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in sentences), encoding="utf-8")


def split_file(multi30k: Path, split: str, lang: str) -> Path:
    """Multi30K's file of one split and language, gzipped or not."""
    gz = multi30k / f"{split}.{lang}.gz"
    return gz if gz.exists() else multi30k / f"{split}.{lang}"


def parallel(multi30k: Path, split: str, source: str, target: str) -> str:
    return f"parallel:{split_file(multi30k, split, source)}:{split_file(multi30k, split, target)}"


# ---- 4-7. specialists, scores, the claim -------------------------------------------------------------------------

def finetune(start: Path, out: Path, data: str, val: str, method: str, budget: list, seed: int = 0,
             limit: int | None = None, lr: float | None = None) -> Path:
    """`fmforge finetune --task translate` of one specialist (resumed or skipped when done); its run directory."""
    return train("finetune", out, "--checkpoint", start, "--task", "translate", "--data", data, "--val-data", val,
                 "--out", out, "--method", method, "--lora-rank", LORA_RANK, "--lr", lr or FINETUNE_LR[method],
                 "--batch_size", BATCH_SIZE, "--seed", seed, "--eval_interval", 100000, "--log_interval", 50,
                 "--checkpoint_interval", 200, *budget, *(["--limit", limit] if limit else []))


def specialist_args(base: Path, run: Path, method: str) -> list:
    """--checkpoint/--adapter of a specialist: the base with its LoRA, or the fine-tuned checkpoint itself."""
    return ["--checkpoint", base, "--adapter", run] if method == "lora" else ["--checkpoint", latest(run)]


def fmforge_eval(base: Path, run: Path, method: str, spec: str, out: Path, limit: int | None,
                 decoding: tuple[int, float] = (1, 1.0)) -> dict:
    """`fmforge eval --tasks SPEC` of a specialist (cached in out/report.json), with the minutes it took; decoding:
    (beams, length penalty), (1, _) = greedy."""
    if not (out / "report.json").exists():
        started = time.perf_counter()
        beams, penalty = decoding
        cli("eval", *specialist_args(base, run, method), "--tasks", spec, "--out", out,
            *(["--limit", limit] if limit else []),
            *(["--beams", beams, "--length-penalty", penalty] if beams > 1 else []))
        report = json.loads((out / "report.json").read_text())
        report["minutes"] = (time.perf_counter() - started) / 60
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    report = json.loads((out / "report.json").read_text())
    return {**report["results"][spec], "minutes": report.get("minutes")}


def run_summary(run: Path) -> dict:
    """Steps, training rows (packed examples) and epochs of a finished fine-tuning run."""
    from fmforge.checkpoint import latest_in_run
    steps, _ = run_steps(run)
    record = latest_in_run(run) / "finetune.json"  # in every checkpoint, full or LoRA
    rows = json.loads(record.read_text()).get("train_examples") if record.exists() else None
    return {"steps": steps, "rows": rows, "epochs": steps * BATCH_SIZE / rows if rows else None}


def sample_translations(base: Path, run: Path, method: str, multi30k: Path, source: str, target: str,
                        decoding: tuple[int, float], count: int = 3) -> list[dict]:
    """The specialist's translations (decoded as `decoding` says) of the first `count` test sentences, next to the
    references."""
    from fmforge.adapt.specialist import load_specialist
    from fmforge.data.translation import read_parallel, translation_messages
    from fmforge.eval.tasks import Decoding, decoded_replies

    model, tokenizer, _, _ = load_specialist(str(base), str(run)) if method == "lora" else \
        load_specialist(str(latest(run)), None)
    records = read_parallel(parallel(multi30k, "test_2016_flickr", source, target))[:count]
    prompts = [tokenizer.encode_chat(translation_messages(r, w)[:1], add_generation_prompt=True) for w, r in records]
    replies = decoded_replies(model, tokenizer, prompts, [64] * len(prompts), decoding=Decoding(*decoding))
    return [{"source": r["source"], "reference": r["target"], "model": reply.split("\n")[0].strip()}
            for (_, r), reply in zip(records, replies)]


def parameter_count(checkpoint: Path) -> int:
    from fmforge.checkpoint import load_model_and_tokenizer
    model, _, _ = load_model_and_tokenizer(checkpoint)
    return sum(p.numel() for p in model.parameters())


def scratch_init(base: Path, out: Path) -> Path:
    """A checkpoint of the base's architecture with fresh random weights (seed 0) and the same tokenizer."""
    if not (out / "model.safetensors").exists():
        import torch

        from fmforge.checkpoint import load_model_and_tokenizer, write_checkpoint
        from fmforge.model import Transformer
        model, _, _ = load_model_and_tokenizer(latest(base))
        torch.manual_seed(0)
        write_checkpoint(out, Transformer(model.config), tokenizer_dir=latest(base))
    return out


def foundation_claim(base: Path, method: str, multi30k: Path, work: Path, n: int, steps: int, seeds,
                     test_limit: int | None) -> dict:
    """en->de with the first n training pairs: the base + `method` vs the same architecture from random weights
    (all of them train, at the pretraining lr), same steps and batches; test BLEU and chrF per seed."""
    source, target = CLAIM_DIRECTION
    data, val = parallel(multi30k, "train", source, target), parallel(multi30k, "val", source, target)
    test = "translate:" + parallel(multi30k, "test_2016_flickr", source, target)
    scratch = scratch_init(base, work / "claim" / "scratch-init")
    results = {}
    for arm, start, arm_method, lr in (("base", latest(base), method, None), ("scratch", scratch, "full", PRETRAIN_LR)):
        for seed in seeds:
            out = finetune(start, work / "claim" / f"{arm}-{seed}", data, val, arm_method, ["--max_steps", steps],
                           seed=seed, limit=n, lr=lr)
            got = fmforge_eval(start, out, arm_method, test, work / "claim" / f"eval-{arm}-{seed}", test_limit)
            results[f"{arm} {seed}"] = {"bleu": got["bleu"], "chrf": got["chrf"], **run_summary(out)}
            print(f"claim N={n} {arm} seed {seed}: BLEU {got['bleu']:.2f} chrF {got['chrf']:.2f}", flush=True)
    return results


# ---- the run -----------------------------------------------------------------------------------------------------

def budgets(args) -> dict:
    """The run's budgets: the flags, or tiny ones for --quick (a pipeline check, not a result)."""
    if args.quick:
        return dict(shape=QUICK_SHAPE, vocab=4096, pretrain_minutes=0.3, probe_minutes=0.15, direction_minutes=0.2,
                    probe_limit=20, test_limit=40, claim_steps=10, claim_test_limit=20, seeds=(0,), beams=2)
    return dict(shape=BASE_SHAPE, vocab=4096, pretrain_minutes=args.pretrain_minutes, probe_minutes=args.probe_minutes,
                direction_minutes=args.direction_minutes, probe_limit=args.probe_limit, test_limit=args.test_limit,
                claim_steps=args.claim_steps, claim_test_limit=args.claim_test_limit,
                seeds=tuple(range(args.claim_seeds)), beams=args.beams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multi30k", required=True, type=Path, help="Multi30K's task-1 text folder")
    parser.add_argument("--work", default=None, help="stage cache (default runs/bench-translation[-quick])")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the numbers")
    parser.add_argument("--method", choices=("auto", "full", "lora"), default="auto",
                        help="auto: the better of the two on en->de val after --probe-minutes each")
    parser.add_argument("--pretrain-minutes", type=float, default=12.0)
    parser.add_argument("--probe-minutes", type=float, default=1.5, help="each method's en->de run in stage 4")
    parser.add_argument("--probe-limit", type=int, default=200, help="val pairs that choose the method")
    parser.add_argument("--direction-minutes", type=float, default=9.0, help="fine-tuning of each direction")
    parser.add_argument("--test-limit", type=int, default=None, help="test pairs scored per direction (all 1,000)")
    parser.add_argument("--beams", type=int, default=4, help="beam width tried against greedy decoding on en->de val")
    parser.add_argument("--length-penalties", default="0.6,1.0",
                        help="length penalties tried with --beams on en->de val (comma-separated)")
    parser.add_argument("--claim-n", type=int, default=1000, help="training pairs of the foundation claim")
    parser.add_argument("--claim-steps", type=int, default=120, help="steps of each foundation-claim run")
    parser.add_argument("--claim-seeds", type=int, default=2)
    parser.add_argument("--claim-test-limit", type=int, default=500, help="test pairs scored per claim run")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not write RESULTS.md")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    b = budgets(args)
    multi30k = args.multi30k.resolve()
    work = Path(args.work or REPO / "runs" / ("bench-translation-quick" if args.quick else "bench-translation"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    timings = cached_json(work / "timings.json", dict)
    print(f"machine: {describe_machine(args.threads)}", flush=True)

    def timed(name: str, compute):
        """compute(), its minutes added to the stage's (a cached stage adds ~0; a stage cut short keeps its time)."""
        begin = time.perf_counter()
        try:
            return compute()
        finally:
            timings[name] = timings.get(name, 0.0) + (time.perf_counter() - begin) / 60
            (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")

    # 1-2. monolingual text and its shards (the tokenizer is trained on the same sentences)
    text, data = work / "monolingual" / "sentences.jsonl", work / "data"
    if not text.exists():
        monolingual_text(multi30k, text)
    if not (data / "manifest.json").exists():
        timed("data", lambda: cli("prepare", text, "--vocab-size", b["vocab"], "--out", data, "--val-fraction",
                                  "0.01", "--workers", "1"))
    manifest = json.loads((data / "manifest.json").read_text())

    # 3. the base
    base = timed("pretrain", lambda: train(
        "pretrain", work / "base", *b["shape"], "--batch_size", 32, "--lr", PRETRAIN_LR, "--warmup_steps", 50,
        "--schedule", "wsd", "--optimizer", PRETRAIN_OPTIMIZER, "--eval_interval", 500, "--log_interval", 50,
        "--checkpoint_interval", 200, "--max_minutes", b["pretrain_minutes"], "--data_dir", data,
        "--out_dir", work / "base"))
    base_checkpoint = latest(base)
    base_model = {"steps": run_steps(base)[0], "shape": ", ".join(f"{k.strip('-')} {v}" for k, v in
                                                                  zip(b["shape"][::2], b["shape"][1::2])),
                  "parameters": parameter_count(base_checkpoint)}

    # 4. the method, on en->de val
    source, target = CLAIM_DIRECTION
    if args.method == "auto":
        def probe(method: str) -> dict:
            run = finetune(base_checkpoint, work / "probe" / method, parallel(multi30k, "train", source, target),
                           parallel(multi30k, "val", source, target), method, ["--max_minutes", b["probe_minutes"]])
            return fmforge_eval(base_checkpoint, run, method, "translate:" + parallel(multi30k, "val", source, target),
                                work / "probe" / f"eval-{method}", b["probe_limit"])
        choice = timed("method", lambda: {method: probe(method) for method in ("full", "lora")})
        method = max(choice, key=lambda m: choice[m]["chrf"])
    else:
        choice, method = {}, args.method
    print(f"method: {method} " + " ".join(f"({m}: val chrF {c['chrf']:.1f})" for m, c in choice.items()), flush=True)

    # 5-6. one specialist per direction, scored greedily on the test set
    directions, runs = {}, {}
    for src, tgt in DIRECTIONS:
        name = f"{src}-{tgt}"
        run = runs[name] = timed(f"finetune {name}", lambda: finetune(
            base_checkpoint, work / "directions" / name, parallel(multi30k, "train", src, tgt),
            parallel(multi30k, "val", src, tgt), method, ["--max_minutes", b["direction_minutes"]]))
        scores = timed(f"test {name}", lambda: fmforge_eval(
            base_checkpoint, run, method, "translate:" + parallel(multi30k, "test_2016_flickr", src, tgt),
            work / "scores" / name, b["test_limit"]))
        directions[name] = {**scores, **run_summary(run)}
        print(f"{name}: greedy BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} on {scores['examples']} test "
              "pairs", flush=True)

    # 6b. the decoding: greedy or beam search (each length penalty), chosen on en->de val by chrF; then every
    # direction's test set again with it
    val_spec = "translate:" + parallel(multi30k, "val", source, target)
    tried = [(1, 1.0)]
    if b["beams"] > 1:
        tried += [(b["beams"], float(a)) for a in args.length_penalties.split(",")]
    searched = timed("decoding", lambda: {decoding_label(d): fmforge_eval(
        base_checkpoint, runs["-".join(CLAIM_DIRECTION)], method, val_spec,
        work / "decoding" / decoding_label(d).replace(" ", "-"), b["probe_limit"], d) for d in tried})
    decoding = max(tried, key=lambda d: searched[decoding_label(d)]["chrf"])
    chosen = decoding_label(decoding)
    print("decoding: " + ", ".join(f"{k} val chrF {v['chrf']:.1f}" for k, v in searched.items()) + f" -> {chosen}",
          flush=True)
    for name, run in runs.items():
        src, tgt = name.split("-")
        if decoding[0] > 1:
            scores = timed(f"test {name} {chosen}", lambda: fmforge_eval(
                base_checkpoint, run, method, "translate:" + parallel(multi30k, "test_2016_flickr", src, tgt),
                work / "scores" / f"{name}-{chosen.replace(' ', '-')}", b["test_limit"], decoding))
            directions[name]["chosen"] = scores
            print(f"{name}: {chosen} BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f}", flush=True)
        else:
            directions[name]["chosen"] = {k: directions[name][k] for k in ("bleu", "chrf", "examples", "minutes")}
        directions[name]["samples"] = cached_json(
            work / "scores" / f"{name}-samples-{chosen.replace(' ', '-')}.json",
            lambda: sample_translations(base_checkpoint, run, method, multi30k, src, tgt, decoding))

    # 7. the foundation claim
    claim = timed("claim", lambda: foundation_claim(base, method, multi30k, work, args.claim_n, b["claim_steps"],
                                                    b["seeds"], b["claim_test_limit"]))

    timings["this run"] = (time.perf_counter() - started) / 60
    (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    body = report(b, args, manifest, base_model, choice, method, directions, claim, timings, load_at_start,
                  searched, decoding)
    print(body)
    (work / "results.json").write_text(json.dumps({"directions": directions, "claim": claim, "method": choice,
                                                   "decoding": searched, "timings": timings}, indent=2,
                                                  ensure_ascii=False) + "\n")
    if not args.no_results and not args.quick:
        write_section("translation", body)


def decoding_label(decoding: tuple[int, float]) -> str:
    beams, penalty = decoding
    return "greedy" if beams == 1 else f"beam {beams} lp {penalty:g}"


def mean_spread(values: list[float]) -> str:
    import numpy as np
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def report(b, args, manifest, base_model, choice, method, directions, claim, timings, load, searched,
           decoding) -> str:
    command = "python benchmarks/translation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "this run")
    tested = next(iter(directions.values()))["examples"]
    lines = [
        "## Translation (issue 15): Multi30K with a decoder-only model trained on the CPU"
        + (" (quick: a pipeline check, not a result)" if args.quick else ""),
        "",
        f"`{command}` — {sum(v for k, v in timings.items() if k != 'this run'):.0f} min of stages in all ({stages} "
        f"min; this invocation {timings['this run']:.0f} min) on {describe_machine(args.threads)}; load average at "
        f"start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}. Commit {git_state()}.",
        "",
        f"Model: {base_model['parameters'] / 1e6:.1f}M parameters ({base_model['shape']}), BPE 4,096 trained on the "
        f"train split's en/de/fr sentences. Budgets: pretraining {b['pretrain_minutes']:g} min ({base_model['steps']} "
        f"steps of 32 x 128 tokens, {PRETRAIN_OPTIMIZER.title()}, over {manifest['splits']['train']['tokens']:,} "
        f"tokens of the unpaired, shuffled sentences), each direction {b['direction_minutes']:g} min of "
        f"`fmforge finetune --method {method}` on all 29,000 train pairs, the claim {b['claim_steps']} steps a "
        f"run. Up to 96 new tokens, greedy or by `fmforge eval --beams` as chosen below; sacrebleu's default BLEU "
        f"(13a tokenization) and chrF on detokenized text; test_2016_flickr, {tested} pairs a direction.",
    ]
    if choice:
        lines += ["", f"Method, chosen on en→de val (its first {b['probe_limit']} pairs) after "
                  f"{b['probe_minutes']:g} min each: "
                  + ", ".join(f"{m} chrF {c['chrf']:.1f} / BLEU {c['bleu']:.1f}" for m, c in choice.items())
                  + f" → **{method}**."]
    chosen = decoding_label(decoding)
    lines += ["", f"Decoding, chosen on en→de val (its first {b['probe_limit']} pairs) by chrF: "
              + ", ".join(f"{k} chrF {v['chrf']:.1f} / BLEU {v['bleu']:.1f}" for k, v in searched.items())
              + f" → **{chosen}**."]
    lines += ["", f"| direction | BLEU ({chosen}) | chrF ({chosen}) | BLEU (greedy) | chrF (greedy) | target | met | "
              "fine-tuning steps (epochs) |", "|---|---|---|---|---|---|---|---|"]
    for name, d in directions.items():
        src, tgt = name.split("-")
        target = TARGET_BLEU.get((src, tgt))
        bleu = d["chosen"]["bleu"]
        met = "—" if target is None else ("yes" if bleu >= target else f"**no** ({bleu - target:+.1f})")
        epochs = f" ({d['epochs']:.1f})" if d["epochs"] else ""
        lines.append(f"| {NAMES[src]} → {NAMES[tgt]} | {bleu:.1f} | {d['chosen']['chrf']:.1f} | {d['bleu']:.1f} | "
                     f"{d['chrf']:.1f} | {f'≥ {target:g} BLEU' if target else 'none set'} | {met} | "
                     f"{d['steps']}{epochs} |")
    lines += ["", f"What the en→de specialist writes ({chosen}) for the first test sentences:", ""]
    for sample in directions.get("en-de", {}).get("samples", []):
        written = sample["model"] if len(sample["model"]) <= 160 else sample["model"][:160] + " …"
        lines.append(f"- {sample['source']} → *{written}* (reference: {sample['reference']})")
    arms = {arm: [v for k, v in claim.items() if k.startswith(arm + " ")] for arm in ("base", "scratch")}
    clearly = min(r["chrf"] for r in arms["base"]) > max(r["chrf"] for r in arms["scratch"])
    lines += [
        "",
        f"Foundation claim: en→de from the first {args.claim_n:,} train pairs, {b['claim_steps']} steps of "
        f"{BATCH_SIZE} packed rows each ({claim_epochs(arms)}); the base + {method} (lr {FINETUNE_LR[method]:g}) vs "
        f"the same architecture from random weights (every weight trains, lr {PRETRAIN_LR:g}), seeds "
        f"{', '.join(map(str, b['seeds']))}; test BLEU / chrF on the first {b['claim_test_limit'] or 1000} test "
        "pairs (mean ± std over seeds):",
        "",
        "| arm | BLEU | chrF | chrF per seed |",
        "|---|---|---|---|",
    ]
    for arm, label in (("base", f"base + {method}"), ("scratch", "scratch (random init, full)")):
        rows = arms[arm]
        per_seed = ", ".join(f"{r['chrf']:.1f}" for r in rows)
        lines.append(f"| {label} | {mean_spread([r['bleu'] for r in rows])} | "
                     f"{mean_spread([r['chrf'] for r in rows])} | {per_seed} |")
    lines += ["", "Clearly better (every base seed above every scratch seed on chrF): "
              f"**{'yes' if clearly else 'no'}**.", "",
              where_it_lands(base_model, directions, timings, args.threads, chosen)]
    return "\n".join(lines) + "\n"


def claim_epochs(arms: dict) -> str:
    epochs = [r["epochs"] for rows in arms.values() for r in rows if r.get("epochs")]
    return f"{epochs[0]:.1f} epochs of the pairs" if epochs else "epochs unknown"


def where_it_lands(base_model: dict, directions: dict, timings: dict, threads: int, chosen: str) -> str:
    """The paragraph that says what the numbers rest on: the model and the minutes, against GPU-trained baselines."""
    en_de = directions.get("en-de")
    if en_de is None:
        return ""
    minutes = sum(v for k, v in timings.items() if k.startswith("pretrain") or k == "finetune en-de")
    return (
        f"Where this lands and why: en→de reaches {en_de['chosen']['bleu']:.1f} BLEU ({chosen}) against the issue's "
        "30; published text-only NMT baselines on this test set sit in the mid-to-high 30s. Those are encoder-decoder "
        "models, typically of tens of millions of parameters, trained on a GPU for many epochs of the 29,000 pairs and "
        f"decoded with beam search. This is a {base_model['parameters'] / 1e6:.1f}M-parameter decoder-only model "
        f"whose en→de specialist had {minutes:.0f} minutes of training in all on {threads} CPU "
        f"thread{'s' * (threads > 1)}: {base_model['steps']} pretraining steps on the unpaired sentences, then "
        f"{en_de['steps']} fine-tuning steps ({en_de['epochs'] or 0:.1f} epochs of the pairs). "
        "Being decoder-only, it also spends compute on the prompt and the source sentence, more than half of every "
        "training example, while only the translation carries loss.")


if __name__ == "__main__":
    main()
