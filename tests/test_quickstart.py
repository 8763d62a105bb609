"""The README's main job, end to end at a tiny budget: the real stdlib corpus, tokenizer, shards, pretraining,
samples, three LoRA specialists (docstrings, modules, chat) and their scores."""

import json

from safetensors.torch import load_file, save_file

from conftest import run_cli
from fmforge.checkpoint import latest_in_run


def test_quickstart_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--max-steps", "3", "--specialist-steps", "2", "--eval-limit", "3",
            "--sample-tokens", "20", "--batch_size", "4"]
    first = run_cli(*args, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    for stage in ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6"]:
        assert f"== {stage}" in first.stdout
    assert "bits/byte" in first.stdout and "stdlib-module" in first.stdout
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["sources"]["specs"] == ["stdlib"] and manifest["splits"]["train"]["tokens"] > 1_000_000
    assert (out / "model" / "loss.png").exists()
    for task in ["stdlib-docstring", "stdlib-module", "stdlib-chat"]:
        assert (out / "specialists" / task / "adapter_config.json").exists()
    # the scores table: base, specialist and, for the dedicated tasks, the chat specialist asked through chat
    table = first.stdout.split("== 6/6")[1].splitlines()
    assert table[1].split() == ["task", "metric", "base", "specialist", "chat"]
    rows = {line.split()[0]: line.split() for line in table[2:] if line.startswith("stdlib-")}
    assert set(rows) == {"stdlib-docstring", "stdlib-module", "stdlib-chat"}
    for task in ("stdlib-docstring", "stdlib-module"):
        assert all(0 <= float(value) for value in rows[task][-3:])  # base, specialist, chat
    assert rows["stdlib-chat"][-1] == "-" and float(rows["stdlib-chat"][-2]) > 0
    assert f"--adapter chat={out / 'specialists' / 'stdlib-chat'} --adapter docstring=" in first.stdout
    # Make the module specialist look like one of an earlier fmforge (no embedding LoRA): running again reuses
    # everything else and trains nothing new, but moves that specialist aside and trains it again.
    module = out / "specialists" / "stdlib-module"
    adapter = latest_in_run(module) / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    save_file({k: v for k, v in tensors.items() if "embed_tokens" not in k}, str(adapter))
    again = run_cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing tokenizer" in again.stdout and "resumed from" in again.stdout
    assert "trained with other settings" in again.stdout
    kept = list(module.parent.glob("stdlib-module.old-*"))
    assert len(kept) == 1 and (kept[0] / "finetune.json").exists()
    assert any("embed_tokens" in k for k in load_file(str(latest_in_run(module) / "adapter_model.safetensors")))


def test_example_limits_must_be_positive(tmp_path):
    """--eval-limit (quickstart: test and validation examples per task) and --val-limit (finetune) of 0 are one
    error line, before anything is built."""
    done = run_cli("quickstart", "--out", str(tmp_path / "qs"), "--eval-limit", "0")
    assert done.returncode == 1 and done.stderr.strip() == "error: --eval-limit must be a positive number of " \
        "examples, got 0" and not (tmp_path / "qs").exists()
    done = run_cli("finetune", "--checkpoint", str(tmp_path / "none"), "--data", "stdlib-chat", "--out",
                   str(tmp_path / "ft"), "--val-limit", "0")
    assert done.returncode == 1 and "--val-limit must be a positive number" in done.stderr
