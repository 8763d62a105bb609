"""The one training loop. Objectives differ only in how batches are made and how evaluation scores them;
the loop (schedule, accumulation, clipping, precision, compile, DDP/FSDP2, checkpoints, logging) is shared.
How the model is parallelised is parallel.py's business; sharded train state is sharded_state.py's.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from ..config import RunConfig
from ..errors import CheckpointError, ConfigError, SettingsMismatchError, TrainingError, TrainingStopped
from . import distributed, parallel, sharded_state
from ..checkpoint import SHARDED_STATE, clean_stale_temporaries, commit_run_checkpoint, latest_in_run, \
    load_weights, read_model_config, read_train_state, write_model_files
from ..fileio import atomic_write_text
from .optim import build_optimizer, lr_at
from .progress import MetricsWriter, ProgressLog, plot_losses
from .sizing import eval_overhead

# (step, micro_step) -> a batch: keyword arguments of the model's forward, at least "input_ids" and
# "targets" (-100 = no loss), e.g. also "attn_mask" for packed sequences. Tensors on the CPU.
BatchFn = Callable[[int, int], dict[str, torch.Tensor]]

BUDGET_SHARE = 0.95  # of train.max_minutes for training steps; the rest for the final eval and checkpoint


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != -100).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
# (model, max_tokens or None for everything, autocast context) -> {"val_loss": ..., "val_bpb": ...}
EvalFn = Callable[[torch.nn.Module, "int | None", contextlib.AbstractContextManager], dict]


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast measured ~1.9x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast_context(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    steps: int
    tokens: int
    seconds: float
    final_loss: float | None
    final_eval: dict
    stopped_by: int | None = None  # the signal (SIGINT, SIGTERM) that ended the run before max_steps, if one did

    def raise_if_stopped(self) -> None:
        """TrainingStopped where a signal ended the run early (its checkpoint is saved): what a caller that goes on
        to use the model (the CLI, the quickstart) must not ignore."""
        if self.stopped_by is not None:
            raise TrainingStopped(self.stopped_by, self.steps, self.checkpoint)


class Trainer:
    """Runs optimizer steps on `model` with batches from `get_batch`, writing everything into `run_dir`."""

    def __init__(self, model: torch.nn.Module, run: RunConfig, get_batch: BatchFn, evaluate: EvalFn | None,
                 run_dir: Path, tokenizer_dir: Path | None, dist: distributed.DistInfo, device: torch.device,
                 resume: bool = False, quiet: bool = False, save_files=None, load_files=None, lr_scale=None,
                 budget_spent: float = 0.0, resolved: dict | None = None, also_write=None):
        """save_files(directory) writes the model's files into a checkpoint directory and
        load_files(checkpoint) restores them on resume; both default to a plain Transformer checkpoint.
        lr_scale: {parameter: factor} for parameters that train at factor x the scheduled lr. budget_spent: seconds
        of train.max_minutes already used before (choosing a size); resolved: more to record in run.yaml.
        also_write(directory): more files for every checkpoint, in either layout (a pretrained base's reader)."""
        self.budget_spent, self.resolved = budget_spent, resolved or {}
        self.run, self.cfg = run, run.train
        self.model, self.get_batch, self.evaluate = model, get_batch, evaluate
        self.run_dir, self.tokenizer_dir = Path(run_dir), tokenizer_dir
        self.dist, self.device, self.quiet = dist, device, quiet
        self.precision = resolve_precision(self.cfg.precision, device)
        self.context_length = model.config.context_length
        self.model_has_aux = bool(getattr(model.config, "n_experts", 0))
        self.start_step = 0
        if self.cfg.parallel == "fsdp" and save_files is not None:
            raise ConfigError("train.parallel fsdp is for pretraining; fine-tune with train.parallel ddp")
        self.save_files = save_files or (lambda directory: write_model_files(directory, model, tokenizer_dir))
        self.also_write = also_write or (lambda directory: None)
        self.load_files = load_files or self._load_transformer
        # Parallelise before building the optimizer: FSDP2 replaces the parameters by their shards.
        self.sharded = parallel.is_sharded(self.cfg, dist)
        self.train_model = parallel.parallelize(model, self.cfg, dist, device, self.precision)
        self.optimizer = build_optimizer(model, self.cfg, lr_scale)
        if resume:
            self._resume()
        elif self._has_checkpoint():
            raise CheckpointError(
                f"{self.run_dir} already holds a training run; pass --resume to continue it or choose another --out_dir")

    # ---- set-up -------------------------------------------------------------------------------------
    def _has_checkpoint(self) -> bool:
        return (self.run_dir / "latest").exists()

    def _resume(self) -> None:
        if not self._has_checkpoint():
            self._say(f"--resume: no checkpoint in {self.run_dir} yet, starting from step 0")
            return
        checkpoint = latest_in_run(self.run_dir)
        shards = checkpoint / "train_state" / SHARDED_STATE
        if shards.is_dir() or self.sharded:
            self._check_model_config(checkpoint)
        else:
            self.load_files(checkpoint)
        state, optimizer_state, run_yaml = read_train_state(checkpoint)
        if shards.is_dir():  # written with train.parallel fsdp: loads into any number of processes
            sharded_state.load_sharded(self.model, self.optimizer, shards)
        elif optimizer_state is None:
            raise CheckpointError(f"cannot resume {checkpoint}: train_state/optimizer.pt is missing")
        elif self.sharded:  # written by one process or DDP, resumed under FSDP2
            sharded_state.load_full_into_sharded(self.model, self.optimizer, checkpoint, optimizer_state)
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.start_step = int(state["step"])
        self._note_layout_change(state, run_yaml)
        self.precision = state.get("precision", self.precision)
        if self.cfg.max_minutes is not None and run_yaml:
            # The time budget was turned into a step count when the run started; keep it, or the
            # schedule (and so the losses) would change.
            self.cfg.max_steps = yaml.safe_load(run_yaml)["train"]["max_steps"]
        self._say(f"resumed from {checkpoint} at step {self.start_step}")

    def _load_transformer(self, checkpoint: Path) -> None:
        self._check_model_config(checkpoint)
        load_weights(self.model, checkpoint)

    def _check_model_config(self, checkpoint: Path) -> None:
        if read_model_config(checkpoint) != self.model.config:
            raise SettingsMismatchError(f"cannot resume {checkpoint}: its model config differs from this recipe's")

    def _note_layout_change(self, state: dict, run_yaml: str | None) -> None:
        """Say when a run resumes on another number of processes, and warn when that changed the global batch
        (then the data order and what a step means change too: keep batch_size x grad_accum x processes)."""
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.dist.world_size:
            return
        self._say(f"the checkpoint was written by {saved_world} process{'es' * (saved_world > 1)}; continuing on "
                  f"{self.dist.world_size}")
        saved = yaml.safe_load(run_yaml)["train"] if run_yaml else {}
        before = saved.get("batch_size", 0) * saved.get("grad_accum", 0) * saved_world
        now = self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size
        if before and before != now:
            self._say(f"warning: the global batch changes from {before} to {now} sequences per step; set "
                      f"batch_size x grad_accum x processes to {before} to continue the same run")

    def _say(self, text: str) -> None:
        if self.dist.is_main and not self.quiet:
            print(text, flush=True)

    def calibrate_max_steps(self) -> int:
        """Turn train.max_minutes into a step count by timing a few forward/backward passes.

        The timing passes do not change the weights or the optimizer (gradients are discarded), so the run
        stays reproducible; the resulting max_steps is recorded in run.yaml and in every checkpoint.
        """
        autocast = autocast_context(parallel.autocast_precision(self.precision, self.cfg, self.dist), self.device)
        times = []
        for i in range(4):
            batch = to_device(self.get_batch(0, 0), self.device)
            start = time.perf_counter()
            with autocast:
                loss = self.model(**batch, return_logits=False).loss
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        self.model.zero_grad(set_to_none=True)
        micro = sorted(times[1:])[1]  # median of the timed passes (the first one warms up)
        step_seconds = micro * self.cfg.grad_accum * 1.08  # + optimizer and data (~8% measured)
        step_seconds *= eval_overhead(self.cfg, self.context_length)
        budget = self.cfg.max_minutes * 60 * BUDGET_SHARE - self.budget_spent
        # Every process must run the same number of steps (each step's collectives pair them up).
        steps = max(1, int(distributed.all_reduce_mean(torch.tensor(budget / step_seconds, dtype=torch.float64),
                                                                   self.dist)))
        self._say(f"time budget {self.cfg.max_minutes:g} min: ~{step_seconds * 1000:.0f} ms/step -> {steps} steps")
        return steps

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train from start_step to max_steps: optimizer steps, evaluation, metrics and checkpoints. SIGINT
        (Ctrl-C) or SIGTERM (schedulers, `docker stop`) finishes the current step, saves a checkpoint and returns."""
        cfg = self.cfg
        budget_started = time.perf_counter() - self.budget_spent
        rebudget = cfg.max_minutes is not None and self.start_step == 0
        if rebudget:
            cfg.max_steps = self.calibrate_max_steps()
        metrics, progress = self._open_run()
        train_model = self.train_model
        autocast = autocast_context(parallel.autocast_precision(self.precision, cfg, self.dist), self.device)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size * self.context_length
        step, loss_value, final_eval = self.start_step, None, {}
        started = time.perf_counter()
        self.model.train()
        with self._stop_signals(progress) as stop_requested:
            try:
                while step < cfg.max_steps:
                    lr = lr_at(step, cfg)
                    loss_value, extra_metrics = self._optimizer_step(step, lr, train_model, autocast)
                    step += 1
                    progress.step(step, loss_value, lr, tokens_per_step)
                    record = {"step": step, "loss": loss_value, "lr": lr, "tokens": step * tokens_per_step,
                              "tokens_per_s": round(progress.tokens_per_second, 1),
                              "elapsed_s": round(time.perf_counter() - started, 3), **extra_metrics}
                    if rebudget and self._rebudget_due(step):
                        self._rebudget(step, budget_started, started, progress)
                    stopping = self._any_rank_asked_to_stop(stop_requested)
                    done = step == cfg.max_steps or stopping
                    final_eval = self._evaluate_log_and_save(step, record, done, autocast, progress, metrics) \
                        or final_eval
                    if stopping:
                        break
            finally:
                if metrics is not None:
                    metrics.close()
        seconds = time.perf_counter() - started
        if self.dist.is_main:
            self._plot()
        checkpoint = latest_in_run(self.run_dir) if self.dist.is_main and self._has_checkpoint() else None
        stopped_by = None
        if step < cfg.max_steps:
            progress.message(f"stopped at step {step}; continue with the same command plus --resume")
            stopped_by = stop_requested[0] if stop_requested else signal.SIGTERM  # another rank's signal
        return TrainResult(self.run_dir, checkpoint, step, (step - self.start_step) * tokens_per_step, seconds,
                           loss_value, final_eval, stopped_by)

    def _rebudget_due(self, step: int) -> bool:
        """Every 5% of the planned steps, until the learning rate starts its final decay (wsd: the decay phase;
        cosine: the last 10%), whose length must not move once it has begun."""
        cfg = self.cfg
        if step % max(1, cfg.max_steps // 20):
            return False
        last = {"wsd": 1 - cfg.decay_fraction, "cosine": 0.9, "constant": 1.0}[cfg.schedule]
        return step < last * cfg.max_steps

    def _rebudget(self, step: int, budget_started: float, steps_started: float, progress: ProgressLog) -> None:
        """Re-plan max_steps from the pace measured so far (steps, periodic evals and checkpoints; the timing run at
        start only guessed it), so that a max_minutes run ends on its budget whatever the machine's speed today;
        a warmup-stable-decay schedule then places its decay by the time that remains. Recorded in run.yaml and
        in every later checkpoint, like the first plan. The pace counts from the first step: the timing run at start
        spends budget (`budget_started` is before it) but is not a step, and with a budget of a few steps counting it
        in the pace cut the run to a fraction of its time."""
        cfg = self.cfg
        now = time.perf_counter()
        per_step = (now - steps_started) / (step - self.start_step)
        planned = torch.tensor(step + (cfg.max_minutes * 60 * BUDGET_SHARE - (now - budget_started)) / per_step,
                               dtype=torch.float64)
        steps = max(step + 1, int(distributed.all_reduce_mean(planned, self.dist)))  # one count on every rank
        if steps == cfg.max_steps:
            return
        cfg.max_steps = progress.max_steps = steps
        self.run_yaml = yaml.safe_dump(self.run.to_dict(), sort_keys=False)
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "run.yaml", self._resolved_yaml())

    def _resolved_yaml(self) -> str:
        """run.yaml of the run directory: the config as it runs, and what was resolved at start."""
        resolved = {"precision": self.precision, "world_size": self.dist.world_size, **self.resolved}
        return yaml.safe_dump({**self.run.to_dict(), "resolved": resolved}, sort_keys=False)

    def _open_run(self) -> tuple[MetricsWriter | None, ProgressLog]:
        """Create the run directory (main process), record the resolved config in run.yaml, and open the
        metrics file and the progress line."""
        cfg, main = self.cfg, self.dist.is_main
        self.run_yaml = yaml.safe_dump(self.run.to_dict(), sort_keys=False)
        if main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                clean_stale_temporaries(self.run_dir)
                (self.run_dir / "run.yaml").write_text(self._resolved_yaml())
            except OSError as exc:
                raise TrainingError(f"cannot write the run directory {self.run_dir}: {exc.strerror or exc} — "
                                    "free disk space or choose a writable --out_dir") from None
        metrics = MetricsWriter(self.run_dir, self.start_step, cfg.tensorboard) if main else None
        progress = ProgressLog(cfg.max_steps, self.start_step, cfg.log_interval, enabled=main and not self.quiet)
        return metrics, progress

    @contextlib.contextmanager
    def _stop_signals(self, progress: ProgressLog):
        """While training, SIGINT and SIGTERM ask to stop after the current step (the yielded list becomes
        non-empty); a second one aborts at once (KeyboardInterrupt). Previous handlers come back afterwards."""
        stop_requested: list[int] = []
        previous = {}

        def on_signal(signum, frame):
            if stop_requested:
                raise KeyboardInterrupt
            stop_requested.append(signum)
            again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
            progress.message(f"{signal.Signals(signum).name}: finishing this step, saving a checkpoint "
                             f"({again} again to abort)")

        if self.dist.is_main or self.dist.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(ValueError):  # not in the main thread
                    previous[signum] = signal.signal(signum, on_signal)
        try:
            yield stop_requested
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _any_rank_asked_to_stop(self, stop_requested: list[int]) -> bool:
        """Whether a signal asked any process to stop. Ranks receive a signal at different instants, but they
        must stop after the same step: each saves through collectives that the others would never join."""
        if not self.dist.enabled:
            return bool(stop_requested)
        return distributed.all_reduce_sum(torch.tensor(float(bool(stop_requested))), self.dist).item() > 0

    def _optimizer_step(self, step: int, lr: float, train_model: torch.nn.Module, autocast) -> tuple[float, dict]:
        """One optimizer step over grad_accum micro-batches (on every rank). Returns the mean loss per target
        token and the step's extra metrics (grad_norm, aux_loss)."""
        cfg, device = self.cfg, self.device
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # Normalise by the number of target tokens in the whole step (all micro-batches, all ranks),
        # so that accumulation x k equals batch x k even when loss masks make row counts differ.
        batches = [self.get_batch(step, micro) for micro in range(cfg.grad_accum)]
        n_targets = distributed.all_reduce_sum(
            torch.tensor(float(sum(count_targets(b) for b in batches))), self.dist).item()
        scale = self.dist.world_size / max(n_targets, 1.0)  # DDP and FSDP2 average gradients over ranks
        aux_coef = getattr(getattr(self.model, "config", None), "moe_aux_loss_coef", 0.0)
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        for micro, batch in enumerate(batches):
            batch = to_device(batch, device)
            last = micro == cfg.grad_accum - 1
            with parallel.gradient_sync(train_model, last):
                with autocast:
                    out = train_model(**batch, reduction="sum", return_logits=False)
                    loss = out.loss * scale
                    if out.aux_loss is not None:
                        aux = out.aux_loss / cfg.grad_accum
                        aux_sum += aux.detach()
                        loss = loss + aux_coef * aux
                loss.backward()
            loss_sum += (out.loss * scale).detach()
        extra_metrics = {}
        if cfg.grad_clip > 0:
            extra_metrics["grad_norm"] = parallel.clip_grad_norm(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = distributed.all_reduce_mean(loss_sum, self.dist).item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {step + 1}; lower train.lr (now {cfg.lr:g}) "
                                "or check the data; the last good checkpoint is kept")
        if self.model_has_aux:
            extra_metrics["aux_loss"] = distributed.all_reduce_mean(aux_sum, self.dist).item()
        return loss_value, extra_metrics

    def _evaluate_log_and_save(self, step: int, record: dict, done: bool, autocast, progress: ProgressLog,
                               metrics: MetricsWriter | None) -> dict:
        """After a step: evaluate when due (every eval_interval steps and at the end), append the step's record
        to metrics.jsonl, and save a checkpoint when due. Returns the evaluation's result ({} when none ran)."""
        cfg, result = self.cfg, {}
        if self.evaluate is not None and (step % cfg.eval_interval == 0 or done):
            result = self.evaluate(self.model, None if step == cfg.max_steps else cfg.eval_tokens, autocast)
            if self.sharded:
                parallel.release_gathered_parameters(self.model)
            record.update(result)
            progress.message(f"eval step {step} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
        if metrics is not None:
            metrics.write(record)
        if step % cfg.checkpoint_interval == 0 or done:
            self.save(step)
            if self.dist.is_main:
                self._plot()
        return result

    def save(self, step: int) -> None:
        state = {"step": step, "precision": self.precision, "world_size": self.dist.world_size,
                 "tokens": step * self.cfg.batch_size * self.cfg.grad_accum * self.dist.world_size
                 * self.context_length}
        if self.cfg.parallel == "fsdp":
            self._save_sharded(step, state)
        elif self.dist.is_main:
            def write_files(directory: Path) -> None:
                self.save_files(directory)
                self.also_write(directory)

            commit_run_checkpoint(self.run_dir, step, self.cfg.keep_checkpoints, write_files=write_files,
                                  train_state=state, optimizer=self.optimizer, run_yaml=self.run_yaml)
        distributed.barrier(self.dist)

    def _save_sharded(self, step: int, state: dict) -> None:
        """train.parallel fsdp: every process writes its shards of the model and optimizer through DCP into a
        temporary directory; rank 0 gathers the whole model for model.safetensors and commits the checkpoint,
        moving the shards into train_state/sharded/ (all of it appears at once, or not at all)."""
        weights = sharded_state.full_model_state(self.model)  # a collective; {} except on rank 0
        shards = self.run_dir / "checkpoints" / f".tmp-step-{step:08d}-shards"
        sharded_state.save_sharded(self.model, self.optimizer, shards)
        distributed.barrier(self.dist)
        if self.dist.is_main:
            def write_files(directory: Path) -> None:
                write_model_files(directory, self.model, self.tokenizer_dir, state=weights)
                self.also_write(directory)

            commit_run_checkpoint(self.run_dir, step, self.cfg.keep_checkpoints, train_state=state,
                                  run_yaml=self.run_yaml, write_files=write_files, sharded_state=shards)

    def _plot(self) -> None:
        try:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except Exception as exc:  # a plot must never stop training
            print(f"warning: could not draw loss.png: {exc}")
