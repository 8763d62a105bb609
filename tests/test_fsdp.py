"""Scale: FSDP2 beside DDP, sharded checkpoints through torch.distributed.checkpoint, activation checkpointing and
`fmforge plan`, on CPU with gloo and two real torchrun processes.

Two FSDP processes with batch 2 follow one process with batch 4 (the same global batch); a run resumes exactly
on the same number of processes, and continues on another (2 -> 1, 1 -> 2); every checkpoint still holds a whole
model.safetensors that loads with no distributed setup."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, tiny_overrides
from fmforge.cli import main
from fmforge.config import TrainConfig

SHAPE = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, context_length=32, max_steps=6, warmup_steps=2,
             eval_interval=3, eval_tokens=512, checkpoint_interval=3, log_interval=3)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def overrides(data: Path, out: Path, **extra) -> list[str]:
    return tiny_overrides(data, out, **{**SHAPE, **extra})


def torchrun(data: Path, out: Path, *flags: str, **extra) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m fmforge.cli pretrain ...` as a user launches it on one machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fmforge.cli", "pretrain", *flags, *overrides(data, out, batch_size=2, **extra)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def rewound(run: Path, to: Path, step: int) -> Path:
    """A copy of a finished run whose `latest` names an earlier checkpoint, as if it had been killed after it."""
    shutil.copytree(run, to)
    (to / "latest").write_text(f"step-{step:08d}\n")
    return to


@pytest.fixture(scope="module")
def data(tmp_path_factory, corpus_dir) -> Path:
    """The tiny corpus with a small validation split (every run's final eval reads all of it)."""
    out = tmp_path_factory.mktemp("fsdp-data")
    assert main(["prepare", str(corpus_dir), "--vocab-size", "512", "--out", str(out), "--val-fraction", "0.03",
                 "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, Path]:
    """The same 6 steps on one process (batch 4, train.parallel ddp) and on two FSDP2 processes (batch 2)."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    assert main(["pretrain", *overrides(data, root / "single", batch_size=4)]) == 0
    torchrun(data, root / "fsdp", "--train.parallel", "fsdp")
    return {"single": root / "single", "fsdp": root / "fsdp"}


def test_two_fsdp_processes_follow_one_process_and_write_a_complete_checkpoint(runs):
    from fmforge.checkpoint import load_model, load_model_and_tokenizer

    single, fsdp = losses(runs["single"]), losses(runs["fsdp"])
    assert single.keys() == fsdp.keys() == set(range(1, 7))
    for step in single:
        assert fsdp[step] == pytest.approx(single[step], rel=1e-5), step
    checkpoint = runs["fsdp"] / "checkpoints" / "step-00000006"
    state = checkpoint / "train_state"
    assert sorted(p.name for p in (state / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (state / "optimizer.pt").exists()  # the optimizer lives only in the shards
    assert json.loads((state / "state.json").read_text())["world_size"] == 2
    # Later stages read the whole model with no process group: gathered weights equal one process's weights. The
    # two runs sum a batch's gradients in another order (two halves reduce-scattered vs one pass), and AdamW divides
    # each weight's update by its own gradient's RMS: where a gradient is near zero its rounding moves the update by
    # a visible part of the lr (on the AMD EPYC one up_proj weight of 4,096 ended 1.6e-6 apart after 6 steps). So
    # all but a few per mille must agree to 1e-6 and every weight to 1e-5.
    model, tokenizer, _ = load_model_and_tokenizer(runs["fsdp"])
    reference, _ = load_model(runs["single"])
    for name, tensor in reference.state_dict().items():
        gathered = model.state_dict()[name]
        torch.testing.assert_close(gathered, tensor, rtol=1e-4, atol=1e-5)
        tight = (gathered - tensor).abs() <= 1e-6 + 1e-4 * tensor.abs()
        assert tight.float().mean() >= 0.998, (name, int((~tight).sum()))
    assert tokenizer.vocab_size == model.config.vocab_size == 512


def test_fsdp_resumes_exactly_on_the_same_number_of_processes(runs, data, tmp_path):
    run = rewound(runs["fsdp"], tmp_path / "resumed", 3)
    done = torchrun(data, run, "--resume", "--train.parallel", "fsdp")
    assert "resumed from" in done.stdout
    assert losses(run) == losses(runs["fsdp"])  # bit-identical, every step


def test_a_two_process_fsdp_run_continues_on_one_process(runs, data, tmp_path, capsys):
    from fmforge.checkpoint import load_model
    from fmforge.model import Transformer
    from fmforge.train.optim import build_optimizer
    from fmforge.train.sharded_state import load_sharded

    # The sharded state, read by one process, is exactly what was saved: the model equals model.safetensors.
    checkpoint = runs["fsdp"] / "checkpoints" / "step-00000003"
    saved, _ = load_model(checkpoint)
    torch.manual_seed(0)
    model = Transformer(saved.config)
    optimizer = build_optimizer(model, TrainConfig(lr=3e-3))
    load_sharded(model, optimizer, checkpoint / "train_state" / "sharded")
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert all(int(s["step"]) == 3 for s in optimizer.state.values())
    assert len(optimizer.state) == sum(1 for _ in model.parameters())

    # And training goes on, on one process with the same global batch, along the two-process trajectory.
    run = rewound(runs["fsdp"], tmp_path / "on-one", 3)
    capsys.readouterr()
    assert main(["pretrain", "--resume", *overrides(data, run, batch_size=4)]) == 0
    assert "written by 2 processes; continuing on 1" in capsys.readouterr().out
    resumed, original = losses(run), losses(runs["fsdp"])
    assert resumed.keys() == original.keys()
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], rel=1e-5), step
    assert (run / "checkpoints" / "step-00000006" / "train_state" / "optimizer.pt").exists()  # ddp's format again


def test_a_one_process_run_continues_on_two_fsdp_processes(runs, data, tmp_path):
    run = rewound(runs["single"], tmp_path / "on-two", 3)  # train_state/optimizer.pt, written by one process
    done = torchrun(data, run, "--resume", "--train.parallel", "fsdp")
    assert "written by 1 process; continuing on 2" in done.stdout
    resumed, original = losses(run), losses(runs["single"])
    for step in original:
        assert resumed[step] == pytest.approx(original[step], rel=1e-5), step
    assert (run / "checkpoints" / "step-00000006" / "train_state" / "sharded" / ".metadata").exists()


def test_bf16_fsdp_with_activation_checkpointing_trains_and_saves_fp32_weights(runs, data, tmp_path):
    """FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 reduce) with checkpointed blocks follows one process under
    bf16 autocast closely (not exactly: the residual stream is bf16 here, fp32 there)."""
    from safetensors import safe_open

    assert main(["pretrain", *overrides(data, tmp_path / "autocast", batch_size=4, max_steps=3,
                                        precision="bf16")]) == 0
    torchrun(data, tmp_path / "fsdp-bf16", "--train.parallel", "fsdp", "--train.activation_checkpointing", "true",
             max_steps=3, precision="bf16")
    reference, fsdp = losses(tmp_path / "autocast"), losses(tmp_path / "fsdp-bf16")
    for step in reference:
        assert fsdp[step] == pytest.approx(reference[step], rel=2e-3), step
    with safe_open(str(tmp_path / "fsdp-bf16" / "checkpoints" / "step-00000003" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float32}


def test_one_process_with_fsdp_and_checkpointing_trains_exactly_like_a_plain_one(runs, data, tmp_path):
    """train.parallel fsdp without torchrun has nothing to shard, but its checkpoints are DCP's, so the run can
    move to N processes later; activation checkpointing recomputes the same numbers. Both change no loss."""
    out = tmp_path / "one-fsdp"
    flags = ["--train.parallel", "fsdp", "--train.activation_checkpointing", "true"]
    assert main(["pretrain", *overrides(data, out, batch_size=4, max_steps=3), *flags]) == 0
    assert (out / "checkpoints" / "step-00000003" / "train_state" / "sharded" / ".metadata").exists()
    assert main(["pretrain", "--resume", *overrides(data, out, batch_size=4), *flags]) == 0
    assert losses(out) == losses(runs["single"])


def test_a_crafted_sharded_state_is_refused_and_never_run(runs, data, tmp_path, capsys):
    """DCP's own reader unpickles .metadata; fmforge's allows only DCP's record classes, so a checkpoint cannot run
    code on resume."""
    run = rewound(runs["fsdp"], tmp_path / "crafted", 6)
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (run / "checkpoints" / "step-00000006" / "train_state" / "sharded" / ".metadata").write_bytes(
        pickle.dumps(Payload()))
    capsys.readouterr()
    assert main(["pretrain", "--resume", *overrides(data, run, batch_size=4, max_steps=9)]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: cannot load the sharded train_state")
    assert "is not part of a checkpoint's metadata" in error[0]
    assert not marker.exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--train.parallel", "foo", "train.parallel must be ddp or fsdp, got 'foo'"),
    ("--train.activation_checkpointing", "maybe", "train.activation_checkpointing must be bool, got 'maybe'"),
])
def test_bad_scale_settings_are_one_line_errors(data, tmp_path, capsys, flag, value, message):
    assert main(["pretrain", *overrides(data, tmp_path / "bad"), flag, value]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"error: {message}"]


def test_fine_tuning_refuses_fsdp_in_one_line(runs, tmp_path, capsys):
    records = tmp_path / "train.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"def f{i}(x):", "completion": " return x"}) + "\n"
                               for i in range(8)))
    assert main(["finetune", "--checkpoint", str(runs["single"]), "--data", str(records), "--task", "completion",
                 "--out", str(tmp_path / "specialist"), "--train.parallel", "fsdp", "--max_steps", "1"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["error: train.parallel fsdp is for pretraining; fine-tune with train.parallel ddp"]


# ---- fmforge plan: the memory arithmetic ------------------------------------------------------------------------

def test_plan_numbers_match_hand_computation():
    from fmforge.config import ModelConfig, model_config_from_preset
    from fmforge.train.plan import GiB, activation_bytes, estimate, smallest_gpu_count

    tiny = ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, intermediate_size=192)
    # One block per token: 24*64 + 8*192 = 3072 B (FSDP2 bf16); head 4*512 + 10*64 = 2688 B; B*T = 2*128 tokens.
    assert activation_bytes(tiny, 128, 2, "fsdp", "bf16", False) == 256 * (2 * 3072 + 2688)
    # Checkpointed: each block keeps its bf16 input (2*64 B) and one block is live again in backward.
    assert activation_bytes(tiny, 128, 2, "fsdp", "bf16", True) == 256 * (2 * 128 + 3072 + 2688)
    # DDP under autocast: 34*64 + 8*192 = 3712 B per block per token, fp32 block inputs of 4*64 B.
    assert activation_bytes(tiny, 128, 2, "ddp", "bf16", False) == 256 * (2 * 3712 + 2688)
    assert activation_bytes(tiny, 128, 2, "ddp", "bf16", True) == 256 * (2 * 256 + 3712 + 2688)

    llama = model_config_from_preset("llama-3.1-8b")
    P = llama.num_parameters()
    assert P == 8_030_261_248  # meta-llama/Llama-3.1-8B
    ddp = estimate(llama, 8192, 1, 8, "ddp", False)
    assert (ddp.parameters, ddp.gradients, ddp.optimizer, ddp.weight_copies) == (4 * P, 4 * P, 8 * P, 2 * P)
    per_token = 32 * (34 * 4096 + 8 * 14336) + 4 * 128256 + 10 * 4096
    assert ddp.activations == 8192 * per_token
    fsdp = estimate(llama, 8192, 1, 8, "fsdp", True)
    assert fsdp.parameters == 4 * P / 8 and fsdp.optimizer == 8 * P / 8
    root = 2 * 128256 * 4096 + 4096  # untied embeddings and head + final norm
    block = (P - root) / 32
    assert fsdp.weight_copies == (root + 2 * block) * 2 * 2  # gathered bf16 weights + their bf16 gradients
    assert fsdp.activations == 8192 * (32 * 2 * 4096 + 24 * 4096 + 8 * 14336 + 4 * 128256 + 10 * 4096)
    # 8B at 8k context on 80 GiB GPUs: DDP never fits (200 GiB of it), FSDP2 needs checkpointing to fit on 8.
    assert smallest_gpu_count(llama, 8192, 1, "ddp", True, 80) is None
    assert smallest_gpu_count(llama, 8192, 1, "fsdp", False, 80) == 16
    assert smallest_gpu_count(llama, 8192, 1, "fsdp", True, 80) == 4
    assert estimate(llama, 8192, 1, 4, "fsdp", True).total <= 0.9 * 80 * GiB < \
        estimate(llama, 8192, 1, 2, "fsdp", True).total


@pytest.mark.parametrize("parallel, precision", [("fsdp", "bf16"), ("ddp", "bf16"), ("ddp", "fp32")])
def test_plan_block_activations_are_what_autograd_saves(parallel, precision, monkeypatch):
    """The per-block constants of the plan, held to the bytes torch autograd keeps for backward in fmforge's own
    block (weights and RoPE tables excluded), measured with saved_tensors_hooks. The plan is for GPUs, where
    attention is SDPA's: the CPU's explicit training attention (which keeps T x T scores) is switched off here."""
    import fmforge.model

    from fmforge.config import ModelConfig
    from fmforge.model import Transformer
    from fmforge.train.plan import block_activation_bytes

    config = ModelConfig(vocab_size=512, n_layer=1, n_embd=64, n_head=4, n_kv_head=4, intermediate_size=192,
                         context_length=128)
    model = Transformer(config)
    if parallel == "fsdp":
        model = model.to(torch.bfloat16)  # what MixedPrecisionPolicy(param_dtype=bf16) computes with
    block, B, T = model.layers[0], 2, 128
    monkeypatch.setattr(fmforge.model, "EXPLICIT_ATTENTION_MAX_T", 0)
    x = torch.randn(B, T, 64, dtype=model.embed_tokens.weight.dtype, requires_grad=True)
    kept = set(t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()])
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept and tensor.shape[0] in (B, B * T):  # per-token tensors, not weight casts
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=parallel == "ddp" and precision == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        block(x, model.rope_cos[:T], model.rope_sin[:T])
    measured = sum(saved.values()) / (B * T)
    assert measured == pytest.approx(block_activation_bytes(config, parallel, precision), rel=0.1)


def test_fmforge_plan_prints_the_table_and_the_gpu_counts(capsys):
    assert main(["plan", "--preset", "llama-3.1-8b", "--context", "8192", "--batch", "1", "--gpus", "8",
                 "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llama-3.1-8b: 8.03B parameters (32 layers, n_embd 4096, vocabulary 128,256)")
    assert "weights (fp32)                        29.9 GiB           3.7 GiB" in out
    assert "AdamW moments (2 x fp32)              59.8 GiB           7.5 GiB" in out
    assert "DDP                                 no: 200.8 GiB per GPU" in out
    assert "FSDP2 + activation checkpointing    on 4 GPUs or more: 43.3 GiB per GPU" in out
    assert main(["plan", "--preset", "llama-3.2-1b", "--context", "2048"]) == 0
    assert "DDP                                 yes, on each GPU" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--preset", "llama-3.1-8b", "--gpus", "1"], "--gpus is the FSDP2 column's GPU count and must be at least 2"),
    (["--preset", "llama-3.1-8b", "--context", "-5"], "--context must be a positive integer, got -5"),
    (["--preset", "llama-3.1-8b", "--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB, got 0"),
    (["--preset", "giant"], "unknown model preset 'giant'"),
])
def test_fmforge_plan_refuses_bad_values_in_one_line(capsys, args, message):
    assert main(["plan", *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: {message}")
