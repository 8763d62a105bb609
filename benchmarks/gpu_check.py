"""GPU check: the CUDA path end to end, in one short run (for a lent GPU machine; CPU-only CI never runs it).

    python3 benchmarks/gpu_check.py --out DIR            # on a CUDA machine, ~5-6 minutes
    python3 benchmarks/gpu_check.py --out DIR --smoke    # the same steps on the CPU, tiny sizes (checks the script)

Each part is timed and recorded in DIR/gpu_check.json (a failing part records its error and the rest go on):
  env        torch / GPU / bf16 support, a bf16 8192^3 matmul's TFLOP/s (the ceiling for MFU)
  prepare    corpus (a slice of the standard library) -> tokenizer -> shards, with the CLI
  pretrain   the quickstart recipe on cuda: bf16 autocast (precision auto) and + torch.compile; tokens/s, val bpb
  scale      `medium` preset (12 x 768, ctx 1024) and a 24 x 1536 model: tokens/s and MFU, eager and compiled,
             against transformers LlamaForCausalLM of the same shape (bf16 autocast, same step)
  resume     20 steps + resume to 40 vs 40 straight (constant lr, so the schedule does not depend on max_steps)
  finetune   LoRA on the built-in stdlib-docstring task on cuda, then its eval
  decode     the serving engine (bf16) vs transformers generate, single stream, and 16 streams batched
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import traceback
from pathlib import Path

import torch

from _common import REPO, hf_model, hf_twin

# A lent GPU machine runs this from a bare copy of the checkout, with fmforge not installed.
sys.path.insert(0, str(REPO))

RESULTS: dict = {}


def part(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                RESULTS[name] = fn(*args, **kwargs) or {}
            except Exception as exc:  # noqa: BLE001 — record and go on
                RESULTS[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
                print(RESULTS[name]["trace"], flush=True)
            RESULTS[name]["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps({k: v for k, v in RESULTS[name].items() if k != "trace"}, default=str), flush=True)
            save()
        return run
    return wrap


def save() -> None:
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def cli(*args: str, timeout: float = 600) -> str:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fmforge.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})
    output = proc.stdout + proc.stderr
    (OUT / "cli.log").open("a").write(f"\n$ fmforge {' '.join(args)}  ({time.perf_counter() - started:.1f}s)\n"
                                      f"{output[-6000:]}")
    if proc.returncode != 0:
        raise RuntimeError(f"fmforge {args[0]} exited {proc.returncode}: {output[-1500:]}")
    return output


def last_metrics(run_dir: Path) -> dict:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    train = [l for l in lines if "tokens_per_s" in l]
    evals = [l for l in lines if "val_bpb" in l]
    speeds = sorted(l["tokens_per_s"] for l in train[len(train) // 2:])  # second half: past compile/warm-up
    return {"steps": train[-1]["step"] if train else None, "loss": train[-1]["loss"] if train else None,
            "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None,
            "val_bpb": evals[-1]["val_bpb"] if evals else None}


@part("env")
def env() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info.update(device=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
                    capability=torch.cuda.get_device_capability())
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        info["bf16_matmul_tflops"] = round(10 * 2 * 8192 ** 3 / (time.perf_counter() - started) / 1e12, 1)
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


@part("prepare")
def prepare(work: Path, files: int) -> dict:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    chosen = sorted(p for p in stdlib.glob("*.py"))[:files]
    for p in chosen:
        shutil.copy(p, corpus / p.name)
    cli("prepare", str(corpus), "--vocab-size", "4096", "--val-fraction", "0.05", "--out", str(work / "data"))
    manifest = json.loads((work / "data" / "manifest.json").read_text())
    return {"files": len(chosen), "manifest_keys": sorted(manifest)[:8]}


def pretrain_run(work: Path, name: str, steps: int, device: str, *extra: str) -> dict:
    out = work / name
    cli("pretrain", "--config", "quickstart", "--data_dir", str(work / "data"), "--out_dir", str(out),
        "--max_steps", str(steps), "--device", device, "--eval_interval", str(steps), "--checkpoint_interval",
        str(steps), "--log_interval", "10", *extra)
    return last_metrics(out)


@part("pretrain")
def pretrain(work: Path, device: str, steps: int) -> dict:
    return {"eager_bf16": pretrain_run(work, "run-eager", steps, device),
            "compiled_bf16": pretrain_run(work, "run-compiled", steps, device, "--compile", "true"),
            "fp32": pretrain_run(work, "run-fp32", max(steps // 3, 20), device, "--precision", "fp32")}


@part("scale")
def scale(device: str, shapes: list[tuple[str, dict]], steps: int) -> dict:
    from fmforge.config import model_config_from_preset
    from fmforge.model import Transformer

    results = {}
    peak = RESULTS.get("env", {}).get("bf16_matmul_tflops")
    for label, shape in shapes:
        cfg = model_config_from_preset("medium", vocab_size=32768, **shape)
        B, T = (8, cfg.context_length)
        x = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
        row = {"params_M": round(cfg.num_parameters() / 1e6, 1), "batch": B, "ctx": T}
        for contender in ("fmforge", "fmforge+compile", "hf"):
            torch.manual_seed(0)
            if contender == "hf":
                model = hf_model(cfg).to(device).train()
                step_model = lambda: model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # noqa: E731
            else:
                model = Transformer(cfg).to(device)
                fwd = torch.compile(model) if contender.endswith("compile") else model
                step_model = lambda: fwd(x[:, :-1], targets=x[:, 1:]).loss  # noqa: E731
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

            def step():
                with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
                    loss = step_model()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            for _ in range(3):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                loss = step()
            float(loss)
            seconds = (time.perf_counter() - started) / steps
            tps = B * T / seconds
            n = cfg.active_parameters() + cfg.n_embd * cfg.vocab_size
            flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_embd * T
            row[contender] = {"tokens_per_s": round(tps), "mfu": round(tps * flops_per_token / (peak * 1e12), 3)
                              if peak else None}
            model = opt = None  # free its memory before the next contender
            if device == "cuda":
                torch.cuda.empty_cache()
        row["fmforge_vs_hf"] = round(row["fmforge"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
        row["compiled_vs_hf"] = round(row["fmforge+compile"]["tokens_per_s"] / row["hf"]["tokens_per_s"], 2)
        results[label] = row
        print(label, json.dumps(row), flush=True)
    return results


@part("resume")
def resume(work: Path, device: str) -> dict:
    common = ["--config", "quickstart", "--data_dir", str(work / "data"), "--device", device, "--eval_interval",
              "40", "--log_interval", "10", "--warmup_steps", "5", "--schedule", "constant"]
    cli("pretrain", *common, "--out_dir", str(work / "straight"), "--max_steps", "40", "--checkpoint_interval", "40")
    cli("pretrain", *common, "--out_dir", str(work / "split"), "--max_steps", "20", "--checkpoint_interval", "20")
    cli("pretrain", *common, "--out_dir", str(work / "split"), "--max_steps", "40", "--checkpoint_interval", "20",
        "--resume")
    a, b = last_metrics(work / "straight"), last_metrics(work / "split")
    return {"straight_loss": a["loss"], "resumed_loss": b["loss"],
            "abs_diff": abs(a["loss"] - b["loss"]) if a["loss"] is not None and b["loss"] is not None else None}


@part("finetune")
def finetune(work: Path, device: str) -> dict:
    base = work / "run-eager"
    cli("finetune", "--checkpoint", str(base), "--data", "stdlib-docstring", "--method", "lora", "--out",
        str(work / "lora"), "--max_steps", "60", "--eval_interval", "60", "--checkpoint_interval", "60",
        "--device", device, "--lr", "2e-3")
    report = cli("eval", "--checkpoint", str(base), "--adapter", str(work / "lora"), "--tasks", "stdlib-docstring",
                 "--limit", "40")
    return {"eval": report.strip().splitlines()[-6:]}


@part("decode")
def decode(work: Path, device: str, new_tokens: int) -> dict:
    import threading

    from fmforge.adapt.lora import LoRAConfig, inject_lora, write_adapter
    from fmforge.checkpoint import fingerprint_checkpoint, load_model_and_tokenizer, resolve_checkpoint
    from fmforge.infer.engine import Engine
    from fmforge.infer.lora import read_adapter
    from fmforge.infer.sampling import SamplingParams

    model, tokenizer, _ = load_model_and_tokenizer(work / "run-eager", device)
    model.eval()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = hf_twin(model.float().cpu()).to(device, dtype)
    model.to(device, dtype)
    prompt = tokenizer.encode("def parse_args(argv):\n", add_bos=True)
    n = min(new_tokens, model.config.context_length - len(prompt) - 1)
    results = {}
    for speculate in (0, 4):
        engine = Engine(model, tokenizer, max_batch=16, speculate=speculate)
        engine.start()

        def run(count: int) -> float:
            done = threading.Semaphore(0)

            def on_event(event):
                if event.finish_reason:
                    done.release()

            started = time.perf_counter()
            for i in range(count):
                engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0 if count == 1 else 0.8, seed=i,
                                                     logit_bias={tokenizer.eos_id: -100.0}), on_event)
            for _ in range(count):
                done.acquire()
            return count * n / (time.perf_counter() - started)

        run(1)
        results[f"engine_speculate{speculate}_1stream_tok_s"] = round(max(run(1) for _ in range(3)))
        results[f"engine_speculate{speculate}_16streams_tok_s"] = round(run(16))
        engine.stop()
    # Three models in one batch: the base and two random LoRA adapters, applied per row, unmerged.
    base_dir = resolve_checkpoint(work / "run-eager")
    adapters = []
    for index in range(2):
        donor, _, _ = load_model_and_tokenizer(base_dir)
        config = LoRAConfig(rank=16, alpha=32.0)
        inject_lora(donor, config)
        for name, p in donor.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.02)
        write_adapter(work / f"adapter-{index}", donor, config, base_dir, fingerprint_checkpoint(base_dir))
        adapters.append(read_adapter(f"a{index}", work / f"adapter-{index}", base_dir))
    served, _, _ = load_model_and_tokenizer(base_dir, device)
    served.to(dtype)
    engine = Engine(served, tokenizer, adapters, max_batch=16)
    engine.start()
    done = threading.Semaphore(0)
    started = time.perf_counter()
    for i in range(16):
        engine.submit(prompt, SamplingParams(max_tokens=n, temperature=0.8, seed=i,
                                             logit_bias={tokenizer.eos_id: -100.0}),
                      lambda event: event.finish_reason and done.release(), adapter=i % 3)
    for _ in range(16):
        done.acquire()
    results["engine_16streams_3models_tok_s"] = round(16 * n / (time.perf_counter() - started))
    engine.stop()
    ids = torch.tensor([prompt], device=device)

    def hf_run() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False)
        return n / (time.perf_counter() - started)

    hf_run()
    results["hf_generate_1stream_tok_s"] = round(max(hf_run() for _ in range(3)))
    results["ratio_1stream"] = round(results["engine_speculate4_1stream_tok_s"] / results["hf_generate_1stream_tok_s"], 2)
    results["ratio_1stream_no_speculation"] = round(
        results["engine_speculate0_1stream_tok_s"] / results["hf_generate_1stream_tok_s"], 2)
    return results


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: check the script itself")
    parser.add_argument("--parts", default="all", help="comma-separated subset, e.g. decode (prepare and a short "
                        "eager pretrain always run first, for the model the later parts use)")
    args = parser.parse_args()
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.smoke else "cuda"
    work = Path("/tmp/fmforge-gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    wanted = set(args.parts.split(",")) if args.parts != "all" else None
    env()
    prepare(work, 20 if args.smoke else 150)
    if wanted is None or "pretrain" in wanted:
        pretrain(work, device, 20 if args.smoke else 300)
    else:
        RESULTS["pretrain"] = {"eager_bf16": pretrain_run(work, "run-eager", 20 if args.smoke else 300, device)}
    if wanted is None or "decode" in wanted:
        decode(work, device, 30 if args.smoke else 200)
    if wanted is None or "resume" in wanted:
        resume(work, device)
    if wanted is None or "finetune" in wanted:
        finetune(work, device)
    if wanted is not None and "scale" not in wanted:
        return finish()
    scale(device, [("medium", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "context_length": 64})]
          if args.smoke else [("medium", {}), ("24x1536", {"n_layer": 24, "n_embd": 1536, "n_head": 12,
                                                            "n_kv_head": 4})], 2 if args.smoke else 10)
    finish()


def finish() -> None:
    save()
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "trace"} for k, v in RESULTS.items()},
                     indent=1, default=str))


if __name__ == "__main__":
    main()
