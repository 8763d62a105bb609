"""Pretraining behaviour a user relies on: the loss falls, schedules have their shape, a killed run resumes
exactly, torchrun with 2 processes matches 1 process, and checkpoints survive a crash mid-write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, tiny_overrides
from fmforge.cli import main
from fmforge.config import TrainConfig
from fmforge.train.optim import lr_at


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_tiny_pretrain_lowers_the_loss_and_writes_a_complete_run(prepared, tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=40, lr=1e-2)]) == 0
    trajectory = losses(out)
    assert len(trajectory) == 40
    first, last = sum(trajectory[s] for s in (1, 2, 3)) / 3, sum(trajectory[s] for s in (38, 39, 40)) / 3
    assert last < first - 0.6, (first, last)  # from ln(512) = 6.24 at initialisation
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    checkpoint = out / "checkpoints" / (out / "latest").read_text().strip()
    assert checkpoint.name == "step-00000040"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "train_state/optimizer.pt", "train_state/state.json", "train_state/run.yaml"]:
        assert (checkpoint / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000030", "step-00000040"]


def test_lr_schedules_warm_up_then_decay_to_the_floor():
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, schedule="cosine")
    assert lr_at(0, cosine) == pytest.approx(0.1)
    assert lr_at(9, cosine) == pytest.approx(1.0)
    assert lr_at(55, cosine) == pytest.approx(0.55)
    assert lr_at(100, cosine) == pytest.approx(0.1)
    values = [lr_at(s, cosine) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5)
    assert lr_at(100, wsd) == pytest.approx(0.0)


def test_gradient_accumulation_matches_a_bigger_batch(prepared, tmp_path):
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=6)]) == 0
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=6)]) == 0
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5)


def test_killed_run_resumes_with_exactly_the_same_losses(prepared, tmp_path):
    """SIGKILL a real `fmforge pretrain` process mid-run, resume it, and compare every step's loss."""
    options = dict(max_steps=24, checkpoint_interval=4, eval_interval=8, precision="bf16")
    reference = tmp_path / "reference"
    done = run_cli("pretrain", *tiny_overrides(prepared, reference, **options))
    assert done.returncode == 0, done.stderr

    killed = tmp_path / "killed"
    args = [sys.executable, "-m", "fmforge.cli", "pretrain", *tiny_overrides(prepared, killed, **options)]
    process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a checkpoint past step 4 exists, wherever the process is
        latest = killed / "latest"
        if latest.exists() and latest.read_text().strip() >= "step-00000008":
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = (killed / "latest").read_text().strip()
    assert interrupted_at < "step-00000024", "the run finished before it could be killed"

    resumed = run_cli("pretrain", "--resume", *tiny_overrides(prepared, killed, **options))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert losses(killed) == losses(reference)  # bit-identical, every step


def test_muon_trains_and_resumes_exactly(prepared, tmp_path, capsys):
    """train.optimizer muon: Muon on the blocks' matrices, AdamW on the rest; the loss falls, and a run stopped
    at a checkpoint continues with exactly the losses of the uninterrupted one (both optimizers' state saved)."""
    options = dict(max_steps=12, checkpoint_interval=6, eval_interval=6, optimizer="muon", lr=1e-2)
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "whole", **options)]) == 0
    whole = losses(tmp_path / "whole")
    assert whole[12] < whole[1] - 0.5, whole
    adamw = tmp_path / "adamw"
    assert main(["pretrain", *tiny_overrides(prepared, adamw, **{**options, "optimizer": "adamw"})]) == 0
    assert losses(adamw)[12] != whole[12]  # the option changes the run
    saved = torch.load(tmp_path / "whole" / "checkpoints" / "step-00000006" / "train_state" / "optimizer.pt",
                       weights_only=True)
    assert any("momentum_buffer" in s for s in saved["state"].values())  # Muon's state is in the checkpoint
    assert any("exp_avg" in s for s in saved["state"].values())  # and AdamW's
    # a copy of the run taken back to its step-6 checkpoint, resumed: the same losses as the uninterrupted run
    halves = tmp_path / "halves"
    shutil.copytree(tmp_path / "whole", halves)
    shutil.rmtree(halves / "checkpoints" / "step-00000012")
    (halves / "latest").write_text("step-00000006\n")
    (halves / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (halves / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["step"] <= 6))
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, halves, **options)]) == 0
    assert losses(halves) == whole
    capsys.readouterr()
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "fsdp", optimizer="muon", parallel="fsdp")]) == 1
    assert "use train.parallel ddp with muon" in capsys.readouterr().err


def test_muon_half_is_torch_muons_update():
    """With bf16 Newton-Schulz (what a GPU uses), the Muon half of MuonAdamW steps exactly as torch.optim.Muon with
    match_rms_adamw, and the rest exactly as AdamW; the CPU's fp32 iteration stays within bf16 rounding of it."""
    from fmforge.train.optim import MuonAdamW

    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(32, 80))]
    norm = torch.nn.Parameter(torch.randn(32))
    grads = [torch.randn_like(w) for w in weights] + [torch.randn_like(norm)]

    def stepped(make):
        params = [torch.nn.Parameter(p.detach().clone()) for p in (*weights, norm)]
        optimizers = make(params)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            for optimizer in optimizers:
                optimizer.step()
        return params

    adamw = dict(lr=0.01, betas=(0.9, 0.95), fused=False)
    reference = stepped(lambda p: [torch.optim.Muon(p[:2], lr=0.01, weight_decay=0.1, momentum=0.95,
                                                    adjust_lr_fn="match_rms_adamw"),
                                   torch.optim.AdamW([{"params": p[2:], "weight_decay": 0.0}], **adamw)])
    ours = stepped(lambda p: [MuonAdamW([{"params": p[:2], "weight_decay": 0.1}],
                                        [{"params": p[2:], "weight_decay": 0.0}], lr=0.01, momentum=0.95,
                                        adamw=adamw, ns_dtype=torch.bfloat16)])
    for a, b in zip(reference, ours):
        assert torch.equal(a, b)
    fp32 = stepped(lambda p: [MuonAdamW([{"params": p[:2], "weight_decay": 0.1}],
                                        [{"params": p[2:], "weight_decay": 0.0}], lr=0.01, momentum=0.95,
                                        adamw=adamw)])
    for a, b in zip(reference, fp32):
        assert torch.allclose(a, b, atol=1e-3)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(prepared, tmp_path, monkeypatch, capsys):
    import fmforge.checkpoint as checkpoint_module

    out = tmp_path / "run"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=10, checkpoint_interval=5)]) == 0
    original = checkpoint_module.save_file

    def crash_midway(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")  # the disk fills up while the weights are being written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", crash_midway)
    capsys.readouterr()
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, out, max_steps=20, checkpoint_interval=5)]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot write checkpoint") and "No space left on device" in error
    assert "step-00000015" in error and "still names the previous checkpoint" in error
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written directory is gone at once
    monkeypatch.setattr(checkpoint_module, "save_file", original)
    assert (out / "latest").read_text().strip() == "step-00000010"
    model, _ = checkpoint_module.load_model(out)  # still loads
    # And the run continues from there.
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, out, max_steps=15, checkpoint_interval=5)]) == 0
    assert (out / "latest").read_text().strip() == "step-00000015"


def test_two_processes_match_one_process_with_the_same_global_batch(prepared, tmp_path):
    options = dict(max_steps=6, eval_interval=3, checkpoint_interval=3)
    single = run_cli("pretrain", *tiny_overrides(prepared, tmp_path / "one", batch_size=4, **options))
    assert single.returncode == 0, single.stderr
    env = {"OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "fmforge.cli", "pretrain", *tiny_overrides(prepared, tmp_path / "two", batch_size=2, **options)]
    double = subprocess.run(launcher, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, **env})
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    # Only rank 0 wrote the run: one metrics file, one set of checkpoints.
    assert (tmp_path / "two" / "latest").read_text().strip() == "step-00000006"
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-00000006" / "train_state" / "state.json").read_text())
    assert state["world_size"] == 2


def test_mixture_of_experts_pretrains_and_tensorboard_logs(prepared, tmp_path):
    out = tmp_path / "moe"
    assert main(["pretrain", *tiny_overrides(prepared, out, preset="tiny-moe", max_steps=8, eval_interval=4,
                                             checkpoint_interval=4), "--tensorboard", "true"]) == 0
    from fmforge.checkpoint import load_model
    model, _ = load_model(out)
    assert model.config.n_experts == 4 and model.config.n_shared_experts == 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(losses(out)) == 8


def test_torch_compile_trains_like_eager(prepared, tmp_path):
    options = dict(max_steps=4, eval_interval=4, checkpoint_interval=4)
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "eager", **options)]) == 0
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "compiled", **options), "--compile", "true"]) == 0
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3)
    from fmforge.checkpoint import load_model
    load_model(tmp_path / "compiled")  # saved without torch.compile's wrapper prefixes


def test_a_time_budget_is_met_even_when_the_first_estimate_is_far_off(prepared, tmp_path, monkeypatch):
    """The timing run at start only guesses the pace; the trainer re-plans the step count as it goes, so a run
    whose first plan was 4 steps still trains for (about) its whole budget, and records the final count."""
    import time

    import yaml

    from fmforge.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "calibrate_max_steps", lambda self: 4)
    out = tmp_path / "budget"
    options = tiny_overrides(prepared, out, max_steps=1, eval_interval=1000, checkpoint_interval=1000,
                             schedule="wsd")
    started = time.perf_counter()
    assert main(["pretrain", *options, "--max_minutes", "0.15"]) == 0  # 9 s
    seconds = time.perf_counter() - started
    steps = yaml.safe_load((out / "run.yaml").read_text())["train"]["max_steps"]
    assert steps > 4 and len(losses(out)) == steps
    assert 0.6 * 9 < seconds < 1.25 * 9 + 3  # + the run's set-up, which the budget does not count


def test_a_slow_timing_run_does_not_shrink_the_budgeted_run(prepared, tmp_path, monkeypatch):
    """The timing run at start spends budget but is not a step: re-planning must not count it in the pace (it did,
    and a 30 s budget of the 6 x 256 model trained 2 steps in 3 s)."""
    import time

    from fmforge.train.trainer import Trainer

    def slow_calibration(self):
        time.sleep(3)
        return 4

    monkeypatch.setattr(Trainer, "calibrate_max_steps", slow_calibration)
    out = tmp_path / "budget"
    options = tiny_overrides(prepared, out, max_steps=1, eval_interval=1000, checkpoint_interval=1000)
    started = time.perf_counter()
    assert main(["pretrain", *options, "--max_minutes", "0.15"]) == 0  # 9 s, 3 of them the timing run
    assert time.perf_counter() - started > 0.6 * 9 and len(losses(out)) > 4


def test_time_budget_becomes_a_recorded_step_count(prepared, tmp_path):
    import yaml

    out = tmp_path / "budget"
    options = tiny_overrides(prepared, out, max_steps=1, eval_interval=1000, checkpoint_interval=1000)
    assert main(["pretrain", *options, "--max_minutes", "0.05"]) == 0
    resolved = yaml.safe_load((out / "run.yaml").read_text())
    steps = resolved["train"]["max_steps"]
    assert steps > 1 and len(losses(out)) == steps  # derived from the timing run, not the recipe's 1
    saved = yaml.safe_load((out / "checkpoints" / f"step-{steps:08d}" / "train_state" / "run.yaml").read_text())
    assert saved["train"]["max_steps"] == steps
