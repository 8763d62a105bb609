"""The README's main job, end to end at a tiny budget: the real stdlib corpus, tokenizer, shards, pretraining,
samples, two LoRA specialists and their scores."""

import json

from conftest import run_cli


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
    for task in ["stdlib-docstring", "stdlib-module"]:
        assert (out / "specialists" / task / "adapter_config.json").exists()
    # Running it again reuses everything and trains nothing new.
    again = run_cli(*args, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing tokenizer" in again.stdout and "resumed from" in again.stdout
