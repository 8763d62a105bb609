"""Long-context extension as a user runs it: `fmforge pretrain --config extend-context --train.init_from BASE` continues
a pretrained checkpoint at a longer context with RoPE scaling; the benchmark's passkey prompts are well formed."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch

from fmforge.checkpoint import load_model, read_model_config, resolve_checkpoint
from fmforge.cli import builtin_recipe, main
from fmforge.config import load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import long_context  # noqa: E402

YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}


def extend_args(base: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["pretrain", "--config", "extend-context", "--train.init_from", str(base), "--train.data_dir", str(data),
            "--train.out_dir", str(out), "--model.context_length", "128", "--model.rope_scaling", json.dumps(YARN),
            "--train.max_steps", "4", "--train.batch_size", "2", "--train.warmup_steps", "1",
            "--train.eval_interval", "4", "--train.eval_tokens", "1024", "--train.checkpoint_interval", "4",
            "--train.precision", "fp32", *extra]


def test_extension_starts_from_the_base_and_keeps_its_shape(checkpoint, prepared, tmp_path):
    base_model, _ = load_model(checkpoint)
    out = tmp_path / "extended"
    assert main(extend_args(checkpoint, prepared, out, "--train.lr", "1e-9")) == 0
    extended, _ = load_model(out)
    config = read_model_config(resolve_checkpoint(out))
    assert config.context_length == 128 and config.rope_scaling == YARN
    assert (config.n_layer, config.n_embd, config.vocab_size) == (base_model.config.n_layer, base_model.config.n_embd,
                                                                   base_model.config.vocab_size)
    # At a learning rate of 1e-9 four steps leave the base's weights (not a fresh initialisation) in place.
    for name, tensor in base_model.state_dict().items():
        torch.testing.assert_close(extended.state_dict()[name], tensor, rtol=0, atol=1e-6)
    run_yaml = (resolve_checkpoint(out) / "train_state" / "run.yaml").read_text()
    assert "init_from" in run_yaml and "yarn" in run_yaml


def test_extension_with_a_real_learning_rate_learns(checkpoint, prepared, tmp_path):
    out = tmp_path / "extended"
    assert main(extend_args(checkpoint, prepared, out, "--train.lr", "3e-3", "--train.max_steps", "12",
                            "--train.eval_interval", "12", "--train.checkpoint_interval", "12")) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("extra, message", [
    (["--model.preset", "tiny"], "remove model.preset"),
    (["--model.n_embd", "96"], "shape"),
])
def test_extension_errors_are_one_line(extra, message, checkpoint, prepared, tmp_path, capsys):
    capsys.readouterr()
    assert main(extend_args(checkpoint, prepared, tmp_path / "out", *extra)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_extension_refuses_data_of_another_tokenizer(checkpoint, corpus_dir, tmp_path, capsys):
    other = tmp_path / "other-data"
    assert main(["prepare", str(corpus_dir), "--vocab-size", "300", "--out", str(other), "--val-fraction", "0.15",
                 "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(extend_args(checkpoint, other, tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err and "\n" not in err


def test_shipped_recipe_reads():
    run = load_recipe(builtin_recipe("extend-context"))
    assert run.train.init_from and run.model.rope_scaling["rope_type"] == "ntk"
    assert run.model.context_length == 256 * run.model.rope_scaling["factor"]  # the quickstart base's context: 256
    assert set(run.model_fields) == {"context_length", "rope_scaling"}


def test_passkey_prompts_hold_one_key_at_the_asked_length(prepared):
    from fmforge.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(prepared)
    for tokens in (256, 1024):
        prompt, answer = long_context.passkey_document(random.Random(tokens),
                                                       long_context.repeats_for(tokenizer, tokens))
        key = answer.strip()
        assert prompt.count(key) == 2 and prompt.endswith("The pass key is") and key.isdigit()
        assert 0.8 * tokens <= len(tokenizer.encode(prompt + answer)) <= tokens


def test_aligned_passkey_data_puts_each_whole_document_in_one_window(prepared, tmp_path):
    """Packed end to end, most long passkey documents are cut across two windows; aligned, every training window
    the loader cuts starts with bos and holds one whole document: its key, then the question that asks for it."""
    import numpy as np

    from fmforge.data.loader import WindowDataset
    from fmforge.data.shards import load_split, read_manifest
    from fmforge.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(prepared)
    padding = np.concatenate([s[:] for s in load_split(prepared, "train")])
    window, count = 160, 30
    out = tmp_path / "aligned"
    long_context.write_aligned_passkey(out, tokenizer, window, count, shortest=60, seed=3, words=True,
                                       padding=padding)
    assert read_manifest(out).train.documents == count
    dataset = WindowDataset(load_split(out, "train"), window)
    assert len(dataset) == count - 1  # the last unit lacks the next window's first token
    lengths = []
    for i in range(len(dataset)):
        ids = dataset.window(i).tolist()
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.bos_id  # the next unit starts right after
        document = tokenizer.decode(ids[:ids.index(tokenizer.eos_id)])
        key = document.rsplit("The pass key is ", 1)[1].rstrip(".")
        assert key in long_context.KEY_WORDS and f"The pass key is {key}. Remember it." in document
        lengths.append(ids.index(tokenizer.eos_id) + 1)
    assert min(lengths) >= 40 and max(lengths) <= window and max(lengths) > 0.8 * window
