"""Reliability of what fmforge reads and writes (issue 12: CLI, files, training), checked as a user meets it.

- Text that is not Unicode (a JSON "\\ud800" escape, a parquet string that is not UTF-8) is one `error:` line
  naming file:line, and `prepare` leaves no partial dataset.
- A checkpoint whose weights hold nan/inf is refused by every inference command.
- Training stops cleanly on SIGTERM; a full or read-only disk while saving is one error line and keeps the
  previous checkpoint; a `latest` pointing outside its run and a pickled optimizer state are refused.
- An imported tokenizer prepends bos exactly when transformers' tokenizer does.
- SIGKILL at random instants never leaves a `latest` that does not load, and resuming stays exact.

Kill trials: 7 SIGKILLs in all, at delays drawn from random.Random(KILL_SEED + n): 2 of `fmforge pretrain` and
2 of `fmforge finetune --method lora`, each writing a checkpoint every step and killed 0-20 ms after a
checkpoint's temporary directory appears (inside the ~15 ms write, or just after it: the rename and `latest`);
3 of `fmforge prepare`, killed between the moment its building directory appears and about when it would finish.
Plus 1 SIGTERM of `fmforge pretrain`.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, report, tiny_overrides
from fmforge.checkpoint import (latest_in_run, load_model, read_adapter_tensors, read_train_state, resolve_adapter,
                                resolve_checkpoint)
from fmforge.cli import main
from fmforge.data.shards import load_split, read_manifest
from fmforge.errors import CheckpointError, DataError
from fmforge.tokenizer import Tokenizer

KILL_SEED = 12
# Pretraining that resumes exactly whatever its max_steps: a constant schedule after a short warmup.
RESUMABLE = dict(schedule="constant", warmup_steps=2, eval_interval=1000, log_interval=1000)
REFERENCE_STEPS = 30
LORA = ["--task", "sft", "--method", "lora", "--lora-rank", "4", "--schedule", "constant", "--warmup_steps", "2",
        "--eval_interval", "1000", "--log_interval", "1000", "--batch_size", "4", "--precision", "fp32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train as fast on one thread, and stay fast when other work shares the two cores (two
    OpenMP threads then spin-wait for each other). Subprocesses get the same, so their losses match ours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def error_line(capsys) -> str:
    """The last stderr line, checked to be the one `error:` line of a failed command (no traceback)."""
    report("refused command")
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    return last


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def start(*args: str) -> subprocess.Popen:
    """`fmforge ARGS` as a user starts it from a shell."""
    return subprocess.Popen([sys.executable, "-m", "fmforge.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_after(process: subprocess.Popen, ready, delay: float, timeout: float = 120) -> None:
    """Wait until ready() (polled every millisecond), then `delay` seconds more, then SIGKILL the process."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert process.poll() is None, f"the command ended before it could be killed: {process.stderr.read()}"
            assert time.monotonic() < deadline, "the command never got going"
            time.sleep(0.001)
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()


# ---- 9. text that is not Unicode -------------------------------------------------------------------------------

def test_lone_surrogate_in_jsonl_is_one_error_line_and_prepare_leaves_no_dataset(prepared, checkpoint, tmp_path,
                                                                                   capsys):
    data = tmp_path / "corpus.jsonl"  # valid JSON whose second record decodes to a lone surrogate
    data.write_text('{"text": "fine \\ud83d\\ude00 pair"}\n{"text": "bad \\ud800 here"}\n', encoding="utf-8")
    for number, tokenizer_option in enumerate((["--tokenizer", str(prepared)], ["--vocab-size", "300"])):
        out = tmp_path / f"out{number}"
        assert main(["prepare", str(data), *tokenizer_option, "--out", str(out), "--workers", "1"]) == 1
        assert error_line(capsys) == (f"error: {data}:2: field 'text' holds a lone UTF-16 surrogate (\\ud800), "
                                      "which is not text — fix the escape or remove the line")
        assert not (out / "manifest.json").exists() and not list(out.glob("*.bin"))
        assert not list(tmp_path.glob(".out*"))  # no half-built directory beside it

    completion = tmp_path / "pairs.jsonl"
    completion.write_text('{"prompt": "a", "completion": "b"}\n' * 2 + '{"prompt": "a", "completion": "\\udc00"}\n')
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(completion), "--task", "completion",
                 "--out", str(tmp_path / "ft")]) == 1
    assert f"error: {completion}:3: holds a lone UTF-16 surrogate (\\udc00)" in error_line(capsys)
    assert not (tmp_path / "ft").exists()

    data.write_text('{"text": "fine \\ud83d\\ude00 pair"}\n', encoding="utf-8")  # a surrogate pair is text
    assert main(["prepare", str(data), "--tokenizer", str(prepared), "--out", str(tmp_path / "ok"),
                 "--workers", "1", "--val-fraction", "0"]) == 0
    assert read_manifest(tmp_path / "ok").train.documents == 1


def test_parquet_and_text_files_that_are_not_utf8(prepared, tmp_path, capsys):
    strings = pa.array([b"fine", b"x\xed\xa0\x80y"], type=pa.binary()).view(pa.string())  # a CESU-8 surrogate
    pq.write_table(pa.table({"text": strings}), tmp_path / "rows.parquet")
    assert main(["prepare", str(tmp_path / "rows.parquet"), "--tokenizer", str(prepared), "--out",
                 str(tmp_path / "out"), "--workers", "1"]) == 1
    assert error_line(capsys) == f"error: {tmp_path / 'rows.parquet'}:2: column 'text' is not valid UTF-8 at byte 1 " \
                                 "— fix the file"
    assert not (tmp_path / "out" / "manifest.json").exists()

    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "good.txt").write_text("def f():\n    return 1\n")
    (corpus / "surrogate.txt").write_bytes(b"bad \xed\xa0\x80 bytes\n")  # a text file: skipped with a warning
    assert main(["prepare", str(corpus), "--tokenizer", str(prepared), "--out", str(tmp_path / "texts-out"),
                 "--workers", "1", "--val-fraction", "0"]) == 0
    assert [f["reason"] for f in read_manifest(tmp_path / "texts-out").skipped_files] == ["not valid UTF-8 at byte 4"]


# ---- 10. non-finite weights -----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_by_inference(value, checkpoint, prepared, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(resolve_checkpoint(checkpoint), bad, ignore=shutil.ignore_patterns("train_state"))
    weights = load_file(bad / "model.safetensors")
    weights["layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    expected = f"error: {bad / 'model.safetensors'}: tensor layers.1.mlp.down_proj.weight holds 1 nan/inf values"
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "def ", "--max-tokens", "3"]) == 1
    assert error_line(capsys).startswith(expected)
    assert main(["eval", "--checkpoint", str(bad), "--tasks", "perplexity", "--data", str(prepared)]) == 1
    assert error_line(capsys).startswith(expected)


# ---- 11. training: SIGTERM, a failing disk, refused checkpoints ----------------------------------------------

@pytest.fixture(scope="module")
def pretrain_reference(prepared, tmp_path_factory) -> dict[int, float]:
    """Losses of an uninterrupted run of RESUMABLE pretraining (what every stopped and resumed run must match)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=REFERENCE_STEPS, checkpoint_interval=1000,
                                             **RESUMABLE)]) == 0
    return losses(out)


def resume_and_compare(prepared, run: Path, reference: dict[int, float]) -> None:
    """Resume `run` in this process for two more steps and compare every step's loss with the reference."""
    stopped_at = read_train_state(resolve_checkpoint(run))[0]["step"]
    assert stopped_at + 2 <= REFERENCE_STEPS, "ran past the reference before it was stopped"
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, run, max_steps=stopped_at + 2,
                                                         checkpoint_interval=1000, **RESUMABLE)]) == 0
    assert losses(run) == {step: reference[step] for step in range(1, stopped_at + 3)}  # bit-identical


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(prepared, pretrain_reference, tmp_path):
    run = tmp_path / "run"
    process = start("pretrain", *tiny_overrides(prepared, run, max_steps=200, checkpoint_interval=1000, **RESUMABLE))
    deadline = time.monotonic() + 120
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # what `docker stop` and schedulers send
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr  # not 0: `pretrain && finetune` must not go on
    assert "SIGTERM: finishing this step, saving a checkpoint" in stderr
    step = len(losses(run))
    assert f"stopped at step {step}; continue with the same command plus --resume" in stderr
    saved = run / "checkpoints" / f"step-{step:08d}"
    assert stderr.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {step} (checkpoint saved: {saved}); "
                                               "run the same command with --resume to continue")
    assert "done:" not in stdout
    assert (run / "latest").read_text().strip() == f"step-{step:08d}"
    resume_and_compare(prepared, run, pretrain_reference)


def test_ctrl_c_stops_finetune_with_exit_130_and_resume_finishes_it(checkpoint, tmp_path, monkeypatch, capsys):
    """Ctrl-C in `fmforge finetune`: the step ends, a checkpoint is saved, and the command exits 130 (a script or
    the quickstart must not take the half-trained specialist for a finished one); --resume then completes it."""
    import fmforge.train.trainer as trainer_module

    original = trainer_module.Trainer._optimizer_step

    def interrupted_at_step_2(self, step, *args, **kwargs):
        if step == 1:  # the second step: Ctrl-C arrives while it runs
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", interrupted_at_step_2)
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(checkpoint), "--data", "stdlib-docstring", "--limit", "16", "--val-limit",
            "4", "--out", str(out), "--max_steps", "4", "--batch_size", "2", "--checkpoint_interval", "1000"]
    assert main(args) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert "SIGINT: finishing this step" in captured.err and "done:" not in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("stopped by SIGINT at step 2 (checkpoint saved: ")
    assert read_train_state(latest_in_run(out))[0]["step"] == 2
    monkeypatch.setattr(trainer_module.Trainer, "_optimizer_step", original)
    assert main(args + ["--resume"]) == 0
    assert read_train_state(latest_in_run(out))[0]["step"] == 4 and "done: 4 steps" in capsys.readouterr().out


def _fail_weights(monkeypatch):
    import fmforge.checkpoint as checkpoint_module

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    return "model.safetensors: No space left on device"


def _fail_optimizer(monkeypatch):
    original = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "param_groups" in obj:  # the optimizer state: torch writes through our file object, which fails
            f.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)
    return ": No space left on device"


def _fail_read_only(monkeypatch):
    original = pathlib.Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.name.startswith(".tmp-step-"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    return "Read-only file system"


def _fail_latest(monkeypatch):
    import fmforge.checkpoint as checkpoint_module

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint_module, "atomic_write_text", full_disk)
    return "latest: No space left on device"


@pytest.mark.parametrize("fail", [_fail_weights, _fail_optimizer, _fail_read_only, _fail_latest])
def test_a_full_or_read_only_disk_while_saving_keeps_the_previous_checkpoint(fail, prepared, tmp_path, monkeypatch,
                                                                            capsys):
    run = tmp_path / "run"
    options = dict(checkpoint_interval=2, eval_interval=1000)
    assert main(["pretrain", *tiny_overrides(prepared, run, max_steps=2, **options)]) == 0
    reason = fail(monkeypatch)
    capsys.readouterr()
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, run, max_steps=4, **options)]) == 1
    monkeypatch.undo()
    line = error_line(capsys)
    assert reason in line and str(run) in line, line
    assert line.endswith(f"{run / 'latest'} still names the previous checkpoint")
    assert (run / "latest").read_text().strip() == "step-00000002"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the failed write took its temporary directory along
    load_model(run)
    assert read_train_state(resolve_checkpoint(run))[0]["step"] == 2


@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp", "..", "", "symlink"])
def test_latest_pointing_outside_its_run_is_refused(name, checkpoint, prepared, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    if name == "symlink":  # a checkpoint directory that is a link to somewhere else
        (run / "checkpoints" / name).symlink_to(resolve_checkpoint(checkpoint))
    (run / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="latest names"):
        resolve_checkpoint(run)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "x", "--max-tokens", "2"]) == 1
    assert error_line(capsys).startswith(f"error: {run / 'latest'} names")
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, run, max_steps=31, lr=1e-2, eval_interval=30,
                                                         checkpoint_interval=30)]) == 1
    assert error_line(capsys).startswith(f"error: {run / 'latest'} names")


class RunsCodeWhenUnpickled:
    """What a pickled optimizer.pt may hold: an object whose unpickling runs code (here: creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickled_optimizer_state_is_refused_without_suggesting_unsafe_loading(checkpoint, prepared, tmp_path,
                                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)
    optimizer_file = resolve_checkpoint(run) / "train_state" / "optimizer.pt"
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "extra": RunsCodeWhenUnpickled(marker)}, optimizer_file)
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, run, max_steps=31, lr=1e-2, eval_interval=30,
                                                         checkpoint_interval=30)]) == 1
    line = error_line(capsys)
    assert line == (f"error: {optimizer_file} is not a safe weights-only torch file, so {resolve_checkpoint(run)} "
                    "cannot be resumed from; resume from a checkpoint fmforge wrote, or start a new run")
    assert "weights_only=False" not in line and not marker.exists()


# ---- 12. bos as transformers' tokenizer adds it ------------------------------------------------------------

PROMPT = "def wrap(text, width=70):\n    "


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """make(bos_post_processor) -> a tiny random Llama directory whose tokenizer.json adds <s> or nothing."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    text = Path(__file__).read_text()
    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=1, initializer_range=0.2)

    def make(bos_post_processor: bool) -> Path:
        directory = tmp_path_factory.mktemp("hf-llama")
        if bos_post_processor:  # as Llama 2/3 tokenizers: "<s> $A"
            rust.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        else:
            rust.post_processor = None
        transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>") \
            .save_pretrained(directory)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(directory)
        return directory
    return transformers, make


@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_imported_tokenizer_prepends_bos_exactly_when_transformers_does(bos_post_processor, hf_llama, tmp_path):
    from fmforge.infer.engine import generate_once
    from fmforge.infer.sampling import SamplingParams

    transformers, make = hf_llama
    source = make(bos_post_processor)
    assert main(["import", "hf", str(source), "--out", str(tmp_path / "ckpt")]) == 0
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    expected = reference_tokenizer(PROMPT)["input_ids"]
    assert (expected[0] == 0) == bos_post_processor
    prompt = Tokenizer.load(tmp_path / "ckpt").encode(PROMPT, add_bos=True)  # what `fmforge generate` sends
    assert prompt == expected

    reference = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    greedy = reference.generate(torch.tensor([expected]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                eos_token_id=None, pad_token_id=1)[0, len(expected):].tolist()
    model, _ = load_model(tmp_path / "ckpt")
    assert generate_once(model, None, prompt, SamplingParams(max_tokens=12, temperature=0.0)).token_ids == greedy


def test_exported_fmforge_tokenizer_prepends_bos_in_transformers_too(checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", "hf", str(checkpoint), "--out", str(tmp_path / "hf")]) == 0
    ours = Tokenizer.load(resolve_checkpoint(checkpoint)).encode(PROMPT, add_bos=True)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(PROMPT)["input_ids"] == ours


# ---- SIGKILL at random instants ----------------------------------------------------------------------------

WRITE_SECONDS = 0.02  # a tiny checkpoint's temporary directory lives ~15 ms (2-core machine, fsync included)


def writing_a_checkpoint(run: Path) -> bool:
    """A checkpoint is being written (its temporary directory exists) and an earlier one is complete."""
    return (run / "latest").exists() and any((run / "checkpoints").glob(".tmp-step-*"))


def report_kill(write: str, seed: int, delay: float, building: Path, pattern: str) -> None:
    """Into the reliability report: a SIGKILL trial, and whether it hit before the write's rename (its temporary
    directory, `pattern` in `building`, is left behind)."""
    report("kill", write=write, seed=seed, delay_ms=round(delay * 1000, 2),
           left_temporary=any(building.glob(pattern)))


def test_killed_while_writing_checkpoints_latest_always_loads_and_resumes_exactly(prepared, pretrain_reference,
                                                                                  tmp_path):
    rng = random.Random(KILL_SEED)
    for trial in range(2):
        run = tmp_path / f"run{trial}"
        process = start("pretrain", *tiny_overrides(prepared, run, max_steps=200, checkpoint_interval=1,
                                                    **RESUMABLE))
        delay = rng.uniform(0.0, WRITE_SECONDS)
        kill_after(process, lambda: writing_a_checkpoint(run), delay=delay)
        assert process.returncode == -signal.SIGKILL
        report_kill("checkpoint", KILL_SEED, delay, run / "checkpoints", ".tmp-step-*")
        load_model(run)  # whatever instant the kill hit, `latest` names a complete checkpoint
        read_train_state(resolve_checkpoint(run))
        resume_and_compare(prepared, run, pretrain_reference)
        report("kill survived", write="checkpoint")  # `latest` loaded and the resume was exact


def test_killed_while_writing_adapters_latest_always_loads_and_resumes_exactly(checkpoint, tmp_path):
    from fmforge.adapt.specialist import load_specialist

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} plus {b}?"},
                                                     {"role": "assistant", "content": f"{a + b}"}]}) + "\n"
                            for a in range(8) for b in range(5)))
    common = ["finetune", "--checkpoint", str(checkpoint), "--data", str(data), *LORA]
    reference = tmp_path / "reference"
    assert main([*common, "--out", str(reference), "--max_steps", "16", "--checkpoint_interval", "1000"]) == 0
    rng = random.Random(KILL_SEED + 1)
    for trial in range(2):
        out = tmp_path / f"adapter{trial}"
        process = start(*common, "--out", str(out), "--max_steps", "200", "--checkpoint_interval", "1")
        delay = rng.uniform(0.0, WRITE_SECONDS)
        kill_after(process, lambda: writing_a_checkpoint(out), delay=delay)
        assert process.returncode == -signal.SIGKILL
        report_kill("adapter", KILL_SEED + 1, delay, out / "checkpoints", ".tmp-step-*")
        adapter = resolve_adapter(out)
        assert all(torch.isfinite(t).all() for t in read_adapter_tensors(adapter).values())
        load_specialist(checkpoint, out)  # the base + the adapter `latest` names
        stopped_at = read_train_state(adapter)[0]["step"]
        assert stopped_at + 2 <= 16, "ran past the reference before it was killed"
        assert main([*common, "--out", str(out), "--max_steps", str(stopped_at + 2), "--checkpoint_interval", "1000",
                     "--resume"]) == 0
        assert losses(out) == {s: loss for s, loss in losses(reference).items() if s <= stopped_at + 2}
        report("kill survived", write="adapter")  # the adapter `latest` names loaded and the resume was exact


def test_killed_while_writing_shards_leaves_the_old_dataset_or_the_new_one(corpus_dir, prepared, tmp_path, capsys):
    def prepare_args(seed: int, out: Path) -> list[str]:
        return ["prepare", str(corpus_dir), "--tokenizer", str(prepared), "--out", str(out), "--workers", "1",
                "--val-fraction", "0.15", "--seed", str(seed)]

    def contents(out: Path) -> tuple:
        return (read_manifest(out).seed,) + tuple(np.concatenate(load_split(out, split)).tobytes()
                                                 for split in ("train", "val"))

    references = {}
    for seed in range(4):
        started = time.perf_counter()
        assert main(prepare_args(seed, tmp_path / f"reference{seed}")) == 0
        prepare_seconds = time.perf_counter() - started
        references[seed] = contents(tmp_path / f"reference{seed}")
    out = tmp_path / "out"
    assert main(prepare_args(0, out)) == 0
    rng = random.Random(KILL_SEED + 2)
    for seed in (1, 2, 3):  # each trial replaces the dataset of the previous seed
        process = start(*prepare_args(seed, out))
        # From the moment the building directory appears to about when a run here finishes.
        delay = rng.uniform(0.0, prepare_seconds)
        kill_after(process, lambda: any(tmp_path.glob(".out.prepare-*")), delay=delay)
        report_kill("shards", KILL_SEED + 2, delay, tmp_path, ".out.prepare-*")
        try:
            state = contents(out)
        except DataError as error:  # killed while the new files moved in: no manifest, so no dataset
            assert "no manifest.json" in str(error)
            left = "no dataset"
        else:
            assert state in (references[seed - 1], references[seed])  # complete: the old one or the new one
            left = "old dataset" if state == references[seed - 1] else "new dataset"
        assert main(prepare_args(seed, out)) == 0  # a re-run completes, clearing the killed run's leftovers
        assert contents(out) == references[seed]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        report("kill survived", write="shards", left=left)  # what the kill left; the re-run was exact and clean
    capsys.readouterr()
    assert main(prepare_args(3, out)) == 0
    assert "reusing token shards" in capsys.readouterr().err
