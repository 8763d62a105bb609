"""lm-evaluation-harness runs fmforge models (model type "fmforge") on the small local tasks shipped in
fmforge/eval/lm_eval_tasks, and scores them exactly as it scores the same model exported to Hugging Face
and run through lm-eval's own "hf" model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")
pytest.importorskip("transformers")

from fmforge.cli import main  # noqa: E402
from fmforge.config import ModelConfig  # noqa: E402
from fmforge.model import Transformer  # noqa: E402
from fmforge.tokenizer import train_tokenizer  # noqa: E402
from fmforge.checkpoint import write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS = ["fmforge_tiny_mc", "fmforge_tiny_gen", "fmforge_tiny_ppl"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(fmforge checkpoint, the same model exported to Hugging Face) of a tiny random model."""
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    root = tmp_path_factory.mktemp("lm-eval")
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    tokenizer = train_tokenizer([text], vocab_size=400)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         context_length=96, init_std=0.1)
    write_checkpoint(root / "ckpt", Transformer(config).eval(), root / "tok")
    assert main(["export", "hf", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


def evaluate(model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    import fmforge.eval.lm_eval_model as adapter  # registers "fmforge"

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=8,
                                   task_manager=TaskManager(include_path=str(adapter.TASKS_DIR)),
                                   log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)


def test_fmforge_scores_like_lm_evals_own_hf_model(model_dirs):
    checkpoint, exported = model_dirs
    ours = evaluate("fmforge", f"checkpoint={checkpoint}")
    reference = evaluate("hf", f"pretrained={exported},dtype=float32,device=cpu")

    for task in TASKS:
        for key, value in reference["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)
    for task in TASKS:  # every single request, not just the averages
        for mine, theirs in zip(ours["samples"][task], reference["samples"][task], strict=True):
            for a, b in zip(mine["resps"], theirs["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(a, str):
                    assert a == b, task
                elif isinstance(a, (tuple, list)):
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1], task
                else:
                    assert a == pytest.approx(b, abs=1e-3), task
    mc = ours["results"]["fmforge_tiny_mc"]
    assert 0.0 <= mc["acc,none"] <= 1.0 and ours["results"]["fmforge_tiny_ppl"]["bits_per_byte,none"] > 0


def test_documented_command_line(model_dirs, tmp_path):
    checkpoint, _ = model_dirs
    result = subprocess.run(
        [sys.executable, "-m", "fmforge.eval.lm_eval_model", "--model", "fmforge",
         "--model_args", f"checkpoint={checkpoint}", "--tasks", "fmforge_tiny_mc",
         "--include_path", str(REPO / "fmforge" / "eval" / "lm_eval_tasks"), "--limit", "4",
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **OFFLINE})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fmforge_tiny_mc" in result.stdout and "acc" in result.stdout
    written = list((tmp_path / "results").rglob("results_*.json"))
    assert written and "fmforge_tiny_mc" in json.loads(written[0].read_text())["results"]
