"""Code search on held-out stdlib functions (issue 15): a docstring's first line must find its function's source
(docstring removed) among the whole test pool of stdlib-search. Four retrievers:

  (a) BM25 (bm25s, Lucene's variant, on lower-cased words)
  (b) the causal base's mean-pooled final states (a decoder pretrained on the stdlib)
  (c) the MLM encoder, untuned (the same shape and steps, model.objective mlm)
  (d) the embedding specialist: (c) fine-tuned with `fmforge finetune --task embed` on stdlib-search's train split

Also the encoder's masked-token accuracy next to the decoder's next-token accuracy on the same val text.
Every stage runs through the CLI and is cached in --out (delete a stage's directory to redo it).

    python benchmarks/embeddings.py --quick      # tiny models, ~5 minutes on 2 cores; prints, writes OUT/results.json
    python benchmarks/embeddings.py              # the quickstart's shape; also writes RESULTS.md's section
    python benchmarks/embeddings.py --pretrain-steps 800 --finetune-steps 300   # shorter runs (a cache per --out)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import _common

QUICK = dict(vocab=2048, model=["--model.preset", "tiny", "--model.n_layer", "2", "--model.n_embd", "128",
                                "--model.n_head", "4", "--model.n_kv_head", "4", "--model.context_length", "256"],
             pretrain_steps=150, finetune_steps=100, batch_size=16)
FULL = dict(vocab=4096, model=["--model.preset", "small"], pretrain_steps=2000, finetune_steps=600, batch_size=16)


def fmforge(*args: str) -> None:
    """One CLI command, its output passed through; a failure stops the benchmark."""
    print("$ fmforge " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "fmforge.cli", *args], check=True)


def build(out: Path, plan: dict) -> dict[str, Path]:
    """Tokenizer + shards of the stdlib, the causal base, the MLM encoder and the embedding specialist (cached)."""
    data = out / "data"
    if not (data / "manifest.json").exists():
        fmforge("prepare", "stdlib", "--vocab-size", str(plan["vocab"]), "--out", str(data), "--val-fraction", "0.02")
    runs = {"causal": out / "causal", "mlm": out / "mlm"}
    for objective, run in runs.items():
        if not (run / "latest").exists():
            fmforge("pretrain", *plan["model"], "--model.objective", objective, "--train.data_dir", str(data),
                    "--train.out_dir", str(run), "--train.max_steps", str(plan["pretrain_steps"]),
                    "--train.batch_size", str(plan["batch_size"]), "--train.eval_interval",
                    str(plan["pretrain_steps"]), "--train.checkpoint_interval", str(plan["pretrain_steps"]))
    specialist = out / "search"
    if not (specialist / "adapter_model.safetensors").exists():
        fmforge("finetune", "--checkpoint", str(runs["mlm"]), "--data", "stdlib-search", "--out", str(specialist),
                "--train.max_steps", str(plan["finetune_steps"]), "--train.batch_size", "32", "--train.lr", "2e-3",
                "--train.eval_interval", str(plan["finetune_steps"]), "--train.checkpoint_interval",
                str(plan["finetune_steps"]))
    return {**runs, "specialist": specialist, "data": data}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke run, not a result")
    parser.add_argument("--out", default=None, help="cache directory (default runs/bench-embeddings[-quick])")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="steps of each base (default: the plan's)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="steps of the specialist (default: the "
                        "plan's)")
    args = parser.parse_args()
    plan = dict(QUICK if args.quick else FULL)
    for key in ("pretrain_steps", "finetune_steps"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    out = Path(args.out or f"runs/bench-embeddings{'-quick' if args.quick else ''}")
    started = time.time()
    paths = build(out, plan)

    from fmforge.data.tasks import task_records

    pool = task_records("stdlib-search", "test")
    queries, documents = [r["query"] for _, r in pool], [r["positive"] for _, r in pool]
    results = {
        "BM25 (bm25s)": bm25_scores(queries, documents),
        "causal base, mean-pooled": neural_scores(paths["causal"], queries, documents),
        "MLM encoder, untuned": neural_scores(paths["mlm"], queries, documents),
        "embedding specialist (encoder + embed LoRA)": neural_scores(paths["mlm"], queries, documents,
                                                                     paths["specialist"]),
    }
    accuracies = token_accuracies(paths)
    table = ["| retriever | recall@1 | recall@10 | MRR |", "|---|---|---|---|"]
    table += [f"| {name} | {s['recall@1']:.3f} | {s['recall@10']:.3f} | {s['mrr']:.3f} |" for name, s in results.items()]
    body = "\n".join([
        f"## Embeddings: code search on held-out stdlib functions{' (quick)' if args.quick else ''}",
        "",
        f"`python {' '.join(sys.argv)}` — docstring line -> function source "
        f"(docstring removed), the whole stdlib-search test pool of {len(pool)} functions; models "
        f"{' '.join(plan['model'])}, {plan['pretrain_steps']} pretraining steps each, the specialist "
        f"{plan['finetune_steps']} LoRA steps on the train split. {_common.git_state()}, "
        f"{time.time() - started:.0f} s.",
        "",
        *table,
        "",
        "Token accuracy on the same val windows: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracies.items()),
    ])
    print(body)
    (out / "results.json").write_text(json.dumps({"retrieval": results, "accuracy": accuracies,
                                                   "pool": len(pool)}, indent=2) + "\n")
    if not args.quick:
        _common.write_section("embeddings", body)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
