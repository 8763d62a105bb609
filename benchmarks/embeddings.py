"""Code search on held-out stdlib functions (issue 15): a docstring's first line must find its function's source
(docstring removed) among the whole test pool of stdlib-search. Five retrievers:

  (a) BM25 (bm25s, Lucene's variant, on lower-cased words)
  (b) the causal base's mean-pooled final states (a decoder pretrained on the stdlib)
  (c) the MLM encoder, untuned (the same shape and steps, model.objective mlm)
  (d) the embedding specialist: (c) fully fine-tuned with `fmforge finetune --task embed --method full` on
      stdlib-search's train split (in-batch negatives: 63 per query at batch 64)
  (d') the same with a LoRA adapter instead (the finetune default), for comparison

Also the encoder's masked-token accuracy next to the decoder's next-token accuracy on the same val text, and, with
--multi30k DIR, cross-lingual retrieval: an encoder pretrained (MLM) on Multi30K's English and German train
sentences, then fine-tuned on the train pairs, finds each English test sentence's German translation among the
1,000 test_2016_flickr pairs (recall@1), against the same encoder untuned and BM25.
Every stage runs through the CLI and is cached in --out (delete a stage's directory to redo it).

    python benchmarks/embeddings.py --multi30k ../shared/data/multi30k   # ~25 min on 2 cores; writes RESULTS.md
    python benchmarks/embeddings.py --quick      # tiny budgets, ~4 minutes: checks the pipeline, not the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import _common

MODEL = ["--model.preset", "tiny", "--model.n_layer", "2", "--model.n_embd", "128", "--model.n_head", "4",
         "--model.n_kv_head", "4", "--model.context_length", "256"]
# The measured plan: 2 x 128 models (~0.7M parameters besides the embeddings), 1,000 pretraining steps of 16 x 256
# tokens each, the specialist 600 steps of 64 pairs at lr 1e-3 (the LoRA comparison: 600 steps of 32 at 2e-3).
PLAN = dict(vocab=2048, model=MODEL, pretrain_steps=1000, batch_size=16, finetune_steps=600, finetune_batch=64,
            finetune_lr=1e-3, lora_batch=32, lora_lr=2e-3)
QUICK = dict(PLAN, pretrain_steps=150, finetune_steps=100)


def fmforge(*args: str) -> None:
    """One CLI command, its output passed through; a failure stops the benchmark."""
    print("$ fmforge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "fmforge.cli", *args], check=True)


def pretrain(data: Path, run: Path, objective: str, plan: dict) -> None:
    if not (run / "latest").exists():
        fmforge("pretrain", *plan["model"], "--model.objective", objective, "--train.data_dir", str(data),
                "--train.out_dir", str(run), "--train.max_steps", str(plan["pretrain_steps"]),
                "--train.batch_size", str(plan["batch_size"]), "--train.eval_interval", str(plan["pretrain_steps"]),
                "--train.checkpoint_interval", str(plan["pretrain_steps"]))


def specialise(base: Path, data: str, out: Path, plan: dict, method: str, *extra: str) -> None:
    """`fmforge finetune --task embed` of `base` (cached: skipped when `out` holds its result)."""
    done = out / ("adapter_model.safetensors" if method == "lora" else "latest")
    if done.exists():
        return
    batch, lr = (plan["lora_batch"], plan["lora_lr"]) if method == "lora" else (plan["finetune_batch"],
                                                                                   plan["finetune_lr"])
    steps = str(plan["finetune_steps"])
    fmforge("finetune", "--checkpoint", str(base), "--data", data, "--task", "embed", "--method", method, "--out",
            str(out), *extra, "--train.max_steps", steps, "--train.batch_size", str(batch), "--train.lr", str(lr),
            "--train.eval_interval", steps, "--train.checkpoint_interval", steps)


def build(out: Path, plan: dict) -> dict[str, Path]:
    """Tokenizer + shards of the stdlib, the causal base, the MLM encoder and the two specialists (cached)."""
    data = out / "data"
    if not (data / "manifest.json").exists():
        fmforge("prepare", "stdlib", "--vocab-size", str(plan["vocab"]), "--out", str(data), "--val-fraction", "0.02")
    runs = {"causal": out / "causal", "mlm": out / "mlm"}
    for objective, run in runs.items():
        pretrain(data, run, objective, plan)
    specialise(runs["mlm"], "stdlib-search", out / "search-full", plan, "full")
    specialise(runs["mlm"], "stdlib-search", out / "search", plan, "lora")
    return {**runs, "specialist": out / "search-full", "lora": out / "search", "data": data}


def cross_lingual(multi30k: Path, out: Path, plan: dict) -> dict[str, dict]:
    """English test sentence -> its German translation among the 1,000 test pairs: BM25, an MLM encoder pretrained
    on the train split's English and German sentences (unpaired, shuffled), and that encoder fine-tuned on the train
    pairs (full, as the code-search specialist)."""
    from translation import parallel, split_file

    from fmforge.data.translation import read_lines

    text, data, encoder = out / "sentences.jsonl", out / "data", out / "mlm"
    if not text.exists():
        sentences = [line for lang in ("en", "de") for line in read_lines(split_file(multi30k, "train", lang))
                     if line.strip()]
        random.Random(0).shuffle(sentences)
        out.mkdir(parents=True, exist_ok=True)
        text.write_text("".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in sentences),
                        encoding="utf-8")
    if not (data / "manifest.json").exists():
        fmforge("prepare", str(text), "--vocab-size", str(plan["vocab"]), "--out", str(data), "--val-fraction", "0.01")
    pretrain(data, encoder, "mlm", plan)
    specialist = out / "pairs-full"
    specialise(encoder, parallel(multi30k, "train", "en", "de"), specialist, plan, "full",
               "--val-data", parallel(multi30k, "val", "en", "de"))
    queries = read_lines(split_file(multi30k, "test_2016_flickr", "en"))
    documents = read_lines(split_file(multi30k, "test_2016_flickr", "de"))
    return {"BM25 (bm25s)": bm25_scores(queries, documents),
            "MLM encoder, untuned": neural_scores(encoder, queries, documents),
            "embedding specialist (encoder, full fine-tune on the train pairs)": neural_scores(specialist, queries,
                                                                                               documents)}


def bm25_scores(queries: list[str], documents: list[str]) -> dict[str, float]:
    import bm25s
    import torch

    from fmforge.adapt.embedding import retrieval_scores

    def words(text: str) -> list[str]:  # identifiers split at underscores, as a docstring would spell them
        return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))

    retriever = bm25s.BM25()
    retriever.index([words(d) for d in documents], show_progress=False)
    scores = torch.zeros(len(queries), len(documents))
    for row, query in enumerate(queries):
        scores[row] = torch.from_numpy(retriever.get_scores(words(query))).float()
    # retrieval_scores ranks by dot product: give it the scores as "similarities" through an identity document set
    return retrieval_scores(scores, torch.eye(len(documents)))


def neural_scores(checkpoint: Path, queries: list[str], documents: list[str], adapter: Path | None = None) -> dict:
    from fmforge.adapt.embedding import embed_texts, retrieval_scores
    from fmforge.adapt.lora import load_adapter
    from fmforge.checkpoint import load_model_and_tokenizer

    model, tokenizer, base = load_model_and_tokenizer(checkpoint)
    if adapter is not None:
        load_adapter(model, adapter, base)
    return retrieval_scores(embed_texts(model, tokenizer, queries), embed_texts(model, tokenizer, documents))


def token_accuracies(paths: dict[str, Path], windows: int = 64) -> dict[str, float]:
    """The decoder's next-token accuracy and the encoder's masked-token accuracy on the same val windows."""
    import torch

    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.data.loader import WindowDataset, eval_windows
    from fmforge.data.masking import mask_token_id, special_id_count
    from fmforge.data.shards import load_split
    from fmforge.train.evaluation import evaluate_masked_windows

    decoder, tokenizer, _ = load_model_and_tokenizer(paths["causal"])
    encoder, _, _ = load_model_and_tokenizer(paths["mlm"])
    data = WindowDataset(load_split(paths["data"], "val"), decoder.config.context_length)
    indices = eval_windows(data)[:windows]
    correct = count = 0
    with torch.no_grad():
        for start in range(0, len(indices), 16):
            batch = data.batch(indices[start:start + 16])
            predicted = decoder(batch["input_ids"]).logits.argmax(-1)
            correct += int((predicted == batch["targets"]).sum())
            count += batch["targets"].numel()
    _, masked_correct, masked_count = evaluate_masked_windows(encoder, data, indices, 16, seed=0, mask_rate=0.3,
                                        mask_id=mask_token_id(tokenizer), n_special=special_id_count(tokenizer),
                                        vocab_size=tokenizer.vocab_size)
    return {"next_token_accuracy": correct / count,
            "masked_token_accuracy (30% masked)": masked_correct / max(masked_count, 1)}


def table(results: dict[str, dict]) -> list[str]:
    rows = ["| retriever | recall@1 | recall@10 | MRR |", "|---|---:|---:|---:|"]
    return rows + [f"| {name} | {s['recall@1']:.3f} | {s['recall@10']:.3f} | {s['mrr']:.3f} |"
                   for name, s in results.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not a result")
    parser.add_argument("--out", default=None, help="cache directory (default runs/bench-embeddings[-quick])")
    parser.add_argument("--multi30k", type=Path, help="Multi30K directory: also measure cross-lingual retrieval")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="steps of each base (default: the plan's)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="steps of the specialists (default: the "
                        "plan's)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else PLAN)
    for key in ("pretrain_steps", "finetune_steps"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    out = Path(args.out or f"runs/bench-embeddings{'-quick' if args.quick else ''}")
    started, machine = time.time(), _common.describe_machine()
    paths = build(out, plan)

    from fmforge.data.tasks import task_records

    pool = task_records("stdlib-search", "test")
    queries, documents = [r["query"] for _, r in pool], [r["positive"] for _, r in pool]
    results = {
        "(a) BM25 (bm25s)": bm25_scores(queries, documents),
        "(b) causal base, mean-pooled": neural_scores(paths["causal"], queries, documents),
        "(c) MLM encoder, untuned": neural_scores(paths["mlm"], queries, documents),
        "(d) embedding specialist (encoder, full fine-tune)": neural_scores(paths["specialist"], queries, documents),
        "(d') embedding specialist (encoder + LoRA)": neural_scores(paths["mlm"], queries, documents, paths["lora"]),
    }
    accuracies = token_accuracies(paths)
    specialist = results["(d) embedding specialist (encoder, full fine-tune)"]["mrr"]
    bm25, causal = results["(a) BM25 (bm25s)"]["mrr"], results["(b) causal base, mean-pooled"]["mrr"]
    crossed = cross_lingual(args.multi30k, out / "multi30k", plan) if args.multi30k else None
    body = [
        f"## Embeddings: code search on held-out stdlib functions{' (quick)' if args.quick else ''}",
        "",
        f"`python {' '.join(sys.argv)}` — {time.time() - started:.0f} s on {machine}; {_common.git_state()}.",
        "",
        f"Docstring line -> function source (docstring removed) among the whole stdlib-search test pool of "
        f"{len(pool)} functions. Models `{' '.join(plan['model'])}`, BPE {plan['vocab']}, {plan['pretrain_steps']} "
        f"pretraining steps of {plan['batch_size']} x 256 tokens each; specialists {plan['finetune_steps']} steps on "
        f"the train split's {len(task_records('stdlib-search', 'train')):,} pairs (full: batch "
        f"{plan['finetune_batch']}, lr {plan['finetune_lr']:g}; LoRA rank 8: batch {plan['lora_batch']}, lr "
        f"{plan['lora_lr']:g}), temperature 0.05.",
        "",
        *table(results),
        "",
        f"- (d) beats BM25 on MRR: **{'yes' if specialist > bm25 else 'no'}** ({specialist:.3f} vs {bm25:.3f})",
        f"- (d) beats the causal base (b): **{'yes' if specialist > causal else 'no'}** ({specialist:.3f} vs "
        f"{causal:.3f})",
        "- token accuracy on the same val windows: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracies.items()),
    ]
    if crossed:
        body += ["", "**Cross-lingual retrieval** (Multi30K test_2016_flickr: each English sentence finds its German "
                 "translation among the 1,000; an encoder of the same shape and steps pretrained (MLM) on the train "
                 "split's English and German sentences, unpaired and shuffled, with its own BPE; the specialist "
                 "fully fine-tuned on the 29,000 train pairs as above):", "", *table(crossed)]
    print("\n".join(body))
    (out / "results.json").write_text(json.dumps({"retrieval": results, "accuracy": accuracies, "pool": len(pool),
                                                   "cross_lingual": crossed}, indent=2) + "\n")
    if not args.quick:
        _common.write_section("embeddings", "\n".join(body))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
