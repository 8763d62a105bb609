"""The checkpoint directory: the contract between pipeline stages.

A checkpoint is a directory holding

    config.json              {"architecture": "fmforge.Transformer", "format_version": 1, "model": {...}}
    model.safetensors        weights (a tied lm_head is stored once, as embed_tokens)
    tokenizer.json           + tokenizer_config.json
    train_state/             optimizer.pt (torch.load(weights_only=True)), state.json, run.yaml (resume only)

A training run directory keeps several of them:

    RUN/checkpoints/step-00000200/   a complete checkpoint
    RUN/latest                       the name of the newest complete checkpoint
    RUN/metrics.jsonl, RUN/loss.png, RUN/run.yaml

Writes are atomic: a checkpoint is written into a temporary directory, flushed to disk, then renamed into
place; only after that is `latest` replaced (write + os.replace). A process killed at any instant leaves
`latest` naming a complete checkpoint. Every command accepts either a checkpoint or a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text
from ..model import Transformer

FORMAT_VERSION = 1
ARCHITECTURE = "fmforge.Transformer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the tied lm_head duplicate, contiguous and detached (what safetensors needs)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_model_files(directory: Path, model: Transformer, tokenizer_dir: Path | None) -> None:
    """config.json + model.safetensors (+ the tokenizer files) of a plain model."""
    config = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(model_state_for_saving(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(tokenizer_dir, directory)


def copy_tokenizer(tokenizer_dir: Path | None, directory: Path) -> None:
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)


def write_checkpoint(path: Path, model: Transformer | None = None, tokenizer_dir: Path | None = None,
                     train_state: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                     run_yaml: str | None = None, write_files=None) -> Path:
    """Write a complete checkpoint directory at `path` atomically (temp dir + rename).

    The model files come from `write_files(directory)` when given (adapters, heads), else from
    write_model_files(model, tokenizer_dir).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if write_files is not None:
        write_files(tmp)
    else:
        write_model_files(tmp, model, tokenizer_dir)
    if train_state is not None:
        state_dir = tmp / "train_state"
        state_dir.mkdir()
        (state_dir / "state.json").write_text(json.dumps(train_state, indent=2) + "\n")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, state_dir / "rng.pt")
        if run_yaml is not None:
            (state_dir / "run.yaml").write_text(run_yaml)
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / "config.json").exists():
        return path
    if (path / "latest").exists():
        target = latest_in_run(path)
        if not (target / "config.json").exists():
            raise CheckpointError(f"{path / 'latest'} names {target.name}, which is missing or incomplete")
        return target
    raise CheckpointError(f"{path} is neither a checkpoint (no config.json) nor a run directory (no 'latest' file)")


def latest_in_run(run_dir: Path) -> Path:
    """The checkpoint directory named by RUN/latest (model, adapter or head files + train_state)."""
    name = (run_dir / "latest").read_text().strip()
    target = run_dir / "checkpoints" / name
    if not target.is_dir():
        raise CheckpointError(f"{run_dir / 'latest'} names {name}, which is missing")
    return target


def read_model_config(checkpoint: Path) -> ModelConfig:
    try:
        raw = json.loads((checkpoint / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {checkpoint / 'config.json'}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("architecture") != ARCHITECTURE or "model" not in raw:
        raise CheckpointError(f"{checkpoint / 'config.json'} is not an fmforge checkpoint config")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint} was written by a newer fmforge (format {raw['format_version']})")
    try:
        return ModelConfig(**raw["model"])
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{checkpoint / 'config.json'} has an invalid model config: {exc}") from None


def load_weights(model: Transformer, checkpoint: Path) -> None:
    """Load model.safetensors into `model` tensor by tensor (no second copy of the weights in memory),
    checking that every tensor is present with the right shape."""
    file = checkpoint / "model.safetensors"
    if not file.exists():
        raise CheckpointError(f"missing weights file {file}")
    expected = model_state_for_saving(model)
    try:
        with safe_open(str(file), framework="pt") as f:
            names = set(f.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{file} does not match its config.json: missing {missing[:3]}, "
                                      f"unexpected {unexpected[:3]}")
            for name in sorted(names):
                target = expected[name]
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(target.shape):
                    raise CheckpointError(f"{file}: tensor {name} has shape {shape}, config.json implies "
                                          f"{tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(f.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt weights file {file}: {exc}") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Path]:
    """Build the model of a checkpoint (or run directory) and load its weights. Returns (model, checkpoint)."""
    checkpoint = resolve_checkpoint(path)
    config = read_model_config(checkpoint)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device)
    model.build_rope(device)  # buffers are not saved: rebuild them on the real device
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    load_weights(model, checkpoint)
    model.eval()
    return model, checkpoint


def read_train_state(checkpoint: Path) -> tuple[dict, dict | None, str | None]:
    """(state.json contents, optimizer state dict, run.yaml text) of a checkpoint written during training."""
    state_dir = checkpoint / "train_state"
    try:
        state = json.loads((state_dir / "state.json").read_text())
        optimizer = None
        if (state_dir / "optimizer.pt").exists():
            optimizer = torch.load(state_dir / "optimizer.pt", weights_only=True)
        rng = torch.load(state_dir / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
    except FileNotFoundError as exc:
        raise CheckpointError(f"{checkpoint} has no complete train_state/ to resume from ({exc.filename})") from None
    except Exception as exc:  # corrupt pickle-free torch file or JSON
        raise CheckpointError(f"corrupt train_state in {checkpoint}: {exc}") from None
    run_yaml = (state_dir / "run.yaml").read_text() if (state_dir / "run.yaml").exists() else None
    return state, optimizer, run_yaml


def commit_run_checkpoint(run_dir: Path, step: int, keep: int, **write_kwargs) -> Path:
    """Write RUN/checkpoints/step-N atomically, point RUN/latest at it, then prune old checkpoints."""
    name = f"step-{step:08d}"
    target = write_checkpoint(run_dir / "checkpoints" / name, **write_kwargs)
    atomic_write_text(run_dir / "latest", name + "\n")
    existing = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint directories left by a killed process."""
    for tmp in (run_dir / "checkpoints").glob(".tmp-*") if (run_dir / "checkpoints").exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, checkpoint dir) for inference; checks that the tokenizer fits the model."""
    from ..tokenizer import Tokenizer
    from ..errors import TokenizerError

    model, checkpoint = load_model(path, device)
    tokenizer = Tokenizer.load(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary has only {model.config.vocab_size}; they do not belong together")
    return model, tokenizer, checkpoint
