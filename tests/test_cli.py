"""Every mistake a user can make prints one clear line and exits non-zero; generate works as documented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


from conftest import run_cli, tiny_overrides
from fmforge.cli import main


def cli_error(capsys, *args: str) -> str:
    """Run the CLI in-process, expect exit status 1 and exactly one line on stderr; return that line."""
    capsys.readouterr()
    assert main(list(args)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    line = err[-1]
    assert line.startswith("error: ") and "Traceback" not in "\n".join(err)
    return line


def copy_checkpoint(run_dir: Path, to: Path) -> Path:
    from fmforge.checkpoint import resolve_checkpoint

    shutil.copytree(resolve_checkpoint(run_dir), to)
    return to


def test_unknown_config_key_suggests_the_right_one(capsys, prepared, tmp_path):
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r"), "--model.n_layr", "3")
    assert "unknown config key" in line and "n_layer" in line
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r"), "--learning_rate", "0.1")
    assert "unknown config key --learning_rate" in line


def test_unknown_preset_lists_the_presets(capsys, prepared, tmp_path):
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r", preset="giant"))
    assert "unknown model preset 'giant'" in line and "llama-3.2-1b" in line


def test_bad_values_and_recipes(capsys, prepared, tmp_path):
    assert "batch_size must be int" in cli_error(
        capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r", batch_size="many"))
    assert "n_embd (64) must be divisible by model.n_head (5)" in cli_error(
        capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r", n_head=5))
    assert "recipe file not found" in cli_error(capsys, "pretrain", "--config", str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in cli_error(capsys, "pretrain", "--config", str(bad))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optimizer:\n  lr: 1\n")
    assert "unknown recipe section 'optimizer'" in cli_error(capsys, "pretrain", "--config", str(wrong))
    assert "data_dir is not set" in cli_error(capsys, "pretrain", "--max_steps", "1")
    assert "run `fmforge prepare`" in cli_error(capsys, "pretrain", "--data_dir", str(tmp_path))


def test_model_vocabulary_smaller_than_the_tokenizer(capsys, prepared, tmp_path):
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r", vocab_size=100))
    assert "tokenizer has 512 tokens but model.vocab_size is 100" in line


def test_existing_run_needs_resume_and_resume_needs_the_same_model(capsys, checkpoint, prepared):
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, checkpoint, max_steps=30))
    assert "already holds a training run; pass --resume" in line
    line = cli_error(capsys, "pretrain", "--resume", *tiny_overrides(prepared, checkpoint, n_layer=3, max_steps=30))
    assert "model config differs" in line


def test_missing_and_corrupt_checkpoints(capsys, checkpoint, tmp_path):
    assert "checkpoint not found" in cli_error(capsys, "generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x")
    assert "neither a checkpoint" in cli_error(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "x")

    truncated = copy_checkpoint(checkpoint, tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt weights file" in cli_error(capsys, "generate", "--checkpoint", str(truncated), "--prompt", "x")

    garbled = copy_checkpoint(checkpoint, tmp_path / "garbled")
    (garbled / "config.json").write_text("{not json")
    assert "cannot read" in cli_error(capsys, "generate", "--checkpoint", str(garbled), "--prompt", "x")

    reshaped = copy_checkpoint(checkpoint, tmp_path / "reshaped")
    config = json.loads((reshaped / "config.json").read_text())
    config["model"]["n_embd"] = 128
    (reshaped / "config.json").write_text(json.dumps(config))
    assert "has shape" in cli_error(capsys, "generate", "--checkpoint", str(reshaped), "--prompt", "x")

    no_tokenizer = copy_checkpoint(checkpoint, tmp_path / "no-tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    assert "tokenizer.json" in cli_error(capsys, "generate", "--checkpoint", str(no_tokenizer), "--prompt", "x")


def test_tokenizer_that_does_not_belong_to_the_model(capsys, checkpoint, corpus_dir, tmp_path):
    mismatched = copy_checkpoint(checkpoint, tmp_path / "mismatched")
    assert main(["tokenizer", "train", str(corpus_dir), "--vocab-size", "1024", "--out", str(tmp_path / "tok")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tmp_path / "tok" / name, mismatched / name)
    line = cli_error(capsys, "generate", "--checkpoint", str(mismatched), "--prompt", "x")
    assert "tokenizer has 1024 tokens but the model's vocabulary has only 512" in line


def test_prompt_longer_than_the_context(capsys, checkpoint):
    line = cli_error(capsys, "generate", "--checkpoint", str(checkpoint), "--prompt", "word " * 200)
    assert "model's context is 64" in line and "shorten the prompt" in line


def test_bad_sampling_settings(capsys, checkpoint):
    assert "top_p must be in (0, 1]" in cli_error(capsys, "generate", "--checkpoint", str(checkpoint),
                                                  "--prompt", "x", "--top-p", "1.5")
    assert "temperature must be >= 0" in cli_error(capsys, "generate", "--checkpoint", str(checkpoint),
                                                   "--prompt", "x", "--temperature", "-1")


def test_prepare_errors(capsys, tmp_path, prepared):
    line = cli_error(capsys, "prepare", str(tmp_path / "nothing-*.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o"))
    assert "no files match" in line
    (tmp_path / "empty.txt").write_text("   \n")
    line = cli_error(capsys, "prepare", str(tmp_path / "empty.txt"), "--vocab-size", "300", "--out", str(tmp_path / "o"))
    assert "no text to train the tokenizer on" in line
    line = cli_error(capsys, "prepare", str(tmp_path / "empty.txt"), "--tokenizer", str(prepared), "--out", str(tmp_path / "o"))
    assert "corpus is empty" in line
    line = cli_error(capsys, "prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"))
    assert "--tokenizer" in line


def test_the_installed_command_exits_nonzero_with_one_line():
    result = run_cli("pretrain", "--model.preset", "giant")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown model preset")


def test_greedy_generation_is_deterministic_and_streams_text(checkpoint):
    first = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "def ", "--temperature", "0",
                    "--max-new-tokens", "20")
    second = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", "def ", "--temperature", "0",
                     "--max-new-tokens", "20")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("def ") and len(first.stdout) > len("def \n")


def generate_text(model, tokenizer, prompt: str, params) -> str:
    from fmforge.infer.engine import generate_once

    return generate_once(model, tokenizer, tokenizer.encode(prompt, add_bos=True), params).text


def test_seeded_sampling_repeats_and_different_seeds_differ(checkpoint):
    from fmforge.infer.sampling import SamplingParams
    from fmforge.checkpoint import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    sample = lambda seed: generate_text(model, tokenizer, "import ", SamplingParams(
        max_tokens=30, temperature=1.0, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=seed))
    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_strings_end_generation_before_the_stop_text(checkpoint):
    from fmforge.infer.sampling import SamplingParams
    from fmforge.checkpoint import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    free = generate_text(model, tokenizer, "def ", SamplingParams(max_tokens=40, temperature=0))
    stop = free[5:7]  # a string that greedy decoding is known to produce
    stopped = generate_text(model, tokenizer, "def ", SamplingParams(max_tokens=40, temperature=0, stop=(stop,)))
    assert stopped == free[:free.index(stop)]


def test_override_values_keep_their_hyphens_while_keys_accept_them():
    from fmforge.config import parse_overrides

    assert parse_overrides(["--out-dir", "runs/my-run", "--train.data_dir=a-b/c-d", "--lr", "1e-3"]) == [
        ("out_dir", "runs/my-run"), ("train.data_dir", "a-b/c-d"), ("lr", 0.001)]


def test_a_diverging_run_stops_with_one_line(capsys, prepared, tmp_path):
    line = cli_error(capsys, "pretrain", *tiny_overrides(prepared, tmp_path / "r", lr=1e6, max_steps=30, grad_clip=0))
    assert "loss became" in line and "lower train.lr" in line
