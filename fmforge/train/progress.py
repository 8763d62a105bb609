"""What a long run shows: a progress line (step, loss, tokens/s, ETA), metrics.jsonl, TensorBoard, loss.png."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..errors import ConfigError, TrainingError


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLog:
    """Progress on stderr: an updating line on a terminal, one line per log_interval otherwise."""

    def __init__(self, max_steps: int, start_step: int, log_interval: int, enabled: bool = True, stream=None):
        self.max_steps, self.log_interval, self.enabled = max_steps, log_interval, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self._window_time, self._window_tokens = self.start_time, 0
        self.tokens_per_second = 0.0

    def step(self, step: int, loss: float, lr: float, tokens: int) -> None:
        """Record a finished optimizer step that processed `tokens` tokens (all ranks)."""
        self._window_tokens += tokens
        if not self.enabled or not (self.tty or step % self.log_interval == 0 or step == self.max_steps):
            return
        now = time.perf_counter()
        if now > self._window_time:
            self.tokens_per_second = self._window_tokens / (now - self._window_time)
        self._window_time, self._window_tokens = now, 0
        elapsed = now - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        line = (f"step {step}/{self.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{self.tokens_per_second:,.0f} tok/s | {format_duration(elapsed)} elapsed | ETA {format_duration(eta)}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            if step == self.max_steps:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()


class MetricsWriter:
    """Appends one JSON record per line to RUN/metrics.jsonl; optionally mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, keep_until_step: int | None, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        records = read_metrics(self.path) if keep_until_step is not None else []
        # On resume, forget what was logged after the checkpoint: those steps will be redone.
        records = [r for r in records if r.get("step", 0) <= (keep_until_step or 0)]
        try:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in records))
            self.file = open(self.path, "a")
        except OSError as exc:
            raise TrainingError(f"cannot write {self.path}: {exc.strerror or exc} — free disk space or choose a "
                                "writable --out_dir") from None
        self.tensorboard = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.tensorboard is on but tensorboard is not installed: pip install tensorboard") from None
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise TrainingError(f"cannot write {self.path}: {exc.strerror or exc} — free disk space; "
                                "the last checkpoint is kept, continue with --resume") from None
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass  # every record was flushed when written, or write() has already reported the failure
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
    return records


def plot_losses(metrics_path: Path, out_path: Path, title: str = "training loss") -> None:
    """loss.png: training loss (raw and smoothed) and validation loss/bits-per-byte against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"], r.get("val_bpb")) for r in records if "val_loss" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
    smoothed, ema = [], 0.0
    for i, value in enumerate(losses, start=1):
        ema = 0.9 * ema + 0.1 * value
        smoothed.append(ema / (1 - 0.9 ** i))  # bias-corrected, so the curve starts on the data
    ax.plot(steps, smoothed, color="tab:blue", linewidth=1.6, label="train loss (EMA 0.9)")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", color="tab:orange", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if val and val[-1][2] is not None:
        title += f" — final val {val[-1][2]:.3f} bits/byte"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_path)
