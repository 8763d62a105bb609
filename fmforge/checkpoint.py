"""The checkpoint contract: the directories every pipeline stage reads and writes.

A checkpoint is a directory holding

    config.json              {"architecture": "fmforge.Transformer", "format_version": 2, "model": {...},
                              "modalities": {...}}   (the modalities section is optional: absent = text only)
    model.safetensors        weights (a tied lm_head is stored once, as embed_tokens)
    tokenizer.json           + tokenizer_config.json (its "media" entry: each modality's code range)
    image_tokenizer/         the image codec (config.json + codec.safetensors), when the model has images
    train_state/             state.json, rng.pt, run.yaml, and optimizer.pt (torch.load(weights_only=True)), or
                             sharded/ (model + optimizer through torch.distributed.checkpoint, train.parallel
                             fsdp: resumes on any number of processes) (resume only)

A training run directory keeps several of them:

    RUN/checkpoints/step-00000200/   a complete checkpoint
    RUN/latest                       the name of the newest complete checkpoint
    RUN/metrics.jsonl, RUN/loss.png, RUN/run.yaml

A specialist is an adapter directory in PEFT's layout (adapter_config.json + adapter_model.safetensors), or a
full checkpoint, plus its fine-tuning record `finetune.json` (task, method, base fingerprint, labels) and, for a
classifier, head.safetensors + labels.json. It is never written inside its base.

Writes are atomic: a checkpoint is written into a temporary directory, flushed to disk, then renamed into
place; only after that is `latest` replaced (write + os.replace). A process killed at any instant leaves
`latest` naming a complete checkpoint. Every command accepts either a checkpoint or a run directory.

Format versions: 1 (no modalities section) and 2 load; a newer one is refused with a message.
This module is the bottom of the house: every stage (train, infer, eval, serve, interop) loads models through it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, SettingsMismatchError, TokenizerError
from .fileio import atomic_directory, atomic_write_bytes, atomic_write_text
from .model import Transformer
from .modalities.stream import media_entry, with_media
from .tokenizer import Tokenizer

FORMAT_VERSION = 2
SHARDED_STATE = "sharded"  # train_state/sharded/: model + optimizer through torch.distributed.checkpoint
ARCHITECTURE = "fmforge.Transformer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
FINETUNE_RECORD = "finetune.json"  # what a specialist was trained for: task, method, base fingerprint, labels
HEAD_FILE, LABELS_FILE = "head.safetensors", "labels.json"  # a classifier's head and its label names
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model."  # PEFT's key prefix for the Hugging Face export of the same model


def model_state_for_saving(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                           ) -> dict[str, torch.Tensor]:
    """State dict (`model`'s, or `state` when given) without the tied lm_head duplicate, contiguous and detached
    (what safetensors needs)."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def write_model_files(directory: Path, model: Transformer, tokenizer_dir: Path | None,
                      modalities: dict | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors (+ the tokenizer files) of a plain model; `modalities` (format 2) describes
    the media the model reads and writes (absent = text only); `state`: the weights to write instead of
    model.state_dict() (a sharded model's, gathered whole)."""
    config = {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    if modalities is None and tokenizer_dir is not None:
        modalities = tokenizer_modalities(Path(tokenizer_dir))
    if modalities:
        config["modalities"] = modalities
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(model_state_for_saving(model, state), str(directory / "model.safetensors"), metadata={"format": "pt"})
    copy_tokenizer(tokenizer_dir, directory)


def copy_tokenizer(tokenizer_dir: Path | None, directory: Path) -> None:
    """The text tokenizer's files and, for a media tokenizer, its codecs' directories."""
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)
        for spec in media_entry(tokenizer_dir).values():
            codec_dir = str(spec.get("directory", ""))
            if codec_dir and "/" not in codec_dir and (Path(tokenizer_dir) / codec_dir).is_dir():
                shutil.copytree(Path(tokenizer_dir) / codec_dir, directory / codec_dir, dirs_exist_ok=True)


def tokenizer_modalities(tokenizer_dir: Path) -> dict:
    """The checkpoint's modalities section for a tokenizer directory: per modality its code range and codec
    directory ({} for a text tokenizer)."""
    return {name: {"code_offset": spec.get("offset"), "codebook_size": spec.get("size"),
                   "tokenizer": spec.get("directory")} for name, spec in media_entry(tokenizer_dir).items()}


def load_tokenizer(directory: str | Path):
    """The tokenizer in a directory: a Tokenizer, or a MediaTokenizer when it names media codecs."""
    return with_media(Tokenizer.load(directory), directory)


def write_checkpoint(path: Path, model: Transformer | None = None, tokenizer_dir: Path | None = None,
                     train_state: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                     run_yaml: str | None = None, write_files=None, sharded_state: Path | None = None) -> Path:
    """Write a complete checkpoint directory at `path` atomically (temp dir + rename).

    The model files come from `write_files(directory)` when given (adapters, heads), else from
    write_model_files(model, tokenizer_dir). `sharded_state`: a directory that every process has just written
    through torch.distributed.checkpoint; it is moved (renamed) into train_state/sharded/ inside the temporary
    directory, so it too appears only with the complete checkpoint.
    """
    path = Path(path)
    try:
        with atomic_directory(path) as tmp:
            if write_files is not None:
                write_files(tmp)
            else:
                write_model_files(tmp, model, tokenizer_dir)
            if train_state is not None:
                state_dir = tmp / "train_state"
                state_dir.mkdir()
                (state_dir / "state.json").write_text(json.dumps(train_state, indent=2) + "\n")
                if optimizer is not None:
                    _save_torch(optimizer.state_dict(), state_dir / "optimizer.pt")
                if sharded_state is not None:
                    Path(sharded_state).rename(state_dir / SHARDED_STATE)
                _save_torch({"torch": torch.get_rng_state()}, state_dir / "rng.pt")
                if run_yaml is not None:
                    (state_dir / "run.yaml").write_text(run_yaml)
    except (OSError, RuntimeError, SafetensorError) as exc:
        # A full or read-only disk (safetensors reports it as SafetensorError, torch as RuntimeError).
        raise CheckpointError(f"cannot write checkpoint {path}: {_write_failure(exc)} — free disk space or make "
                              f"{path.parent} writable") from None
    return path


def _write_failure(exc: BaseException) -> str:
    """What the system said about a failed write: "FILE: No space left on device", or the library's first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return _first_line(exc)


def _save_torch(obj, file: Path) -> None:
    # Through a Python file object, so that a full disk surfaces as OSError(ENOSPC) rather than torch's
    # "[enforce fail at inline_container.cc] unexpected pos".
    with open(file, "wb") as f:
        torch.save(obj, f)


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
            if (target / "adapter_config.json").exists():
                raise CheckpointError(f"{path} is an adapter run ({target.name} holds a LoRA adapter, not a model); "
                                      "load it on its base checkpoint as an adapter (--adapter)")
            raise CheckpointError(f"{path / 'latest'} names {target.name}, which is missing or incomplete")
        return target
    if (path / "adapter_config.json").exists():
        raise CheckpointError(f"{path} is a LoRA adapter, not a model; load it on its base checkpoint (--adapter)")
    raise CheckpointError(f"{path} is neither a checkpoint (no config.json) nor a run directory (no 'latest' file)")


def latest_in_run(run_dir: Path) -> Path:
    """The checkpoint directory named by RUN/latest (model, adapter or head files + train_state). The name must
    be a directory inside RUN/checkpoints: a `latest` that points elsewhere is refused."""
    try:
        name = (run_dir / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read {run_dir / 'latest'}: {exc}") from None
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(f"{run_dir / 'latest'} names {name!r}, which is not a checkpoint of this run "
                              "(it must be a directory name inside checkpoints/)")
    target = run_dir / "checkpoints" / name
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(f"{run_dir / 'latest'} names {name}, which is missing")
    return target


def read_checkpoint_config(checkpoint: Path) -> dict:
    """config.json of a checkpoint, checked: an fmforge architecture and a format version this code reads."""
    try:
        raw = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {checkpoint / 'config.json'}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("architecture") != ARCHITECTURE or not isinstance(raw.get("model"), dict):
        raise CheckpointError(f"{checkpoint / 'config.json'} is not an fmforge checkpoint config")
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{checkpoint / 'config.json'} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{checkpoint} is in checkpoint format {version}, newer than this fmforge reads "
                              f"(up to {FORMAT_VERSION}); upgrade fmforge to load it")
    if not isinstance(raw.get("modalities", {}), dict):
        raise CheckpointError(f"{checkpoint / 'config.json'}: 'modalities' must be an object")
    return raw


def read_model_config(checkpoint: Path) -> ModelConfig:
    raw = read_checkpoint_config(checkpoint)
    try:
        return ModelConfig(**raw["model"])
    except (TypeError, ConfigError) as exc:
        raise CheckpointError(f"{checkpoint / 'config.json'} has an invalid model config: {exc}") from None


def read_modalities(checkpoint: Path) -> dict:
    """The checkpoint's modalities section ({} for a text-only model, and for every format-1 checkpoint)."""
    return read_checkpoint_config(checkpoint).get("modalities", {})


def check_text_only(checkpoint: Path, target: str) -> None:
    """Refuse to export a multimodal checkpoint to a text-only format (its image codes and codec would be lost)."""
    modalities = read_modalities(checkpoint)
    if modalities:
        raise CheckpointError(f"{checkpoint} is multimodal ({', '.join(['text', *modalities])}); {target} holds "
                              "text models only, so its media codes and tokenizers would be lost — export a "
                              "text-only checkpoint, or keep this one in fmforge's format")


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
    """(state.json contents, optimizer state dict, run.yaml text) of a checkpoint written during training; the
    optimizer state is None when there is no optimizer.pt (a sharded train_state/sharded/ holds it instead).
    Torch files are read with weights_only=True: one holding other pickled objects is refused, never run."""
    state_dir = checkpoint / "train_state"
    try:
        state = json.loads((state_dir / "state.json").read_text())
        optimizer = None
        if (state_dir / "optimizer.pt").exists():
            optimizer = _load_tensors_only(state_dir / "optimizer.pt", checkpoint)
        rng = _load_tensors_only(state_dir / "rng.pt", checkpoint)
        torch.set_rng_state(rng["torch"])
    except FileNotFoundError as exc:
        raise CheckpointError(f"{checkpoint} has no complete train_state/ to resume from ({exc.filename})") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, bad JSON, a torch file without "torch"
        raise CheckpointError(f"corrupt train_state in {checkpoint}: {_first_line(exc)}") from None
    run_yaml = (state_dir / "run.yaml").read_text() if (state_dir / "run.yaml").exists() else None
    return state, optimizer, run_yaml


def _load_tensors_only(file: Path, checkpoint: Path):
    """torch.load(weights_only=True), with one-line errors. Torch's own refusal suggests weights_only=False,
    which would run whatever code the file holds: fmforge never offers that."""
    try:
        return torch.load(file, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} is not a safe weights-only torch file, so {checkpoint} cannot be resumed "
                              "from; resume from a checkpoint fmforge wrote, or start a new run") from None
    except Exception as exc:  # a truncated or overwritten file: torch raises RuntimeError, KeyError, EOFError...
        raise CheckpointError(f"corrupt {file}: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def commit_run_checkpoint(run_dir: Path, step: int, keep: int, **write_kwargs) -> Path:
    """Write RUN/checkpoints/step-N atomically, point RUN/latest at it, then prune old checkpoints.
    When a write fails (a full or read-only disk), `latest` still names the previous checkpoint."""
    name = f"step-{step:08d}"
    try:
        target = write_checkpoint(run_dir / "checkpoints" / name, **write_kwargs)
        atomic_write_text(run_dir / "latest", name + "\n")
    except (CheckpointError, OSError) as exc:
        reason = str(exc) if isinstance(exc, CheckpointError) else f"cannot update {run_dir / 'latest'}: " \
            f"{_write_failure(exc)} — free disk space or make {run_dir} writable"
        kept = f"{run_dir / 'latest'} still names the previous checkpoint" if (run_dir / "latest").exists() \
            else "no checkpoint of this run was saved"
        raise CheckpointError(f"{reason}; {kept}") from None
    existing = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    for old in existing[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def clean_stale_temporaries(run_dir: Path) -> None:
    """Remove half-written checkpoint directories left by a killed process."""
    for tmp in (run_dir / "checkpoints").glob(".tmp-*") if (run_dir / "checkpoints").exists() else []:
        shutil.rmtree(tmp, ignore_errors=True)


def check_finite_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Refuse weights holding nan or inf: such a model generates garbage and scores nan. One pass over each
    tensor (a boolean copy at a time)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{checkpoint / 'model.safetensors'}: tensor {name} holds {bad} nan/inf values — "
                                  "the checkpoint is corrupt or its training diverged; use an earlier checkpoint")


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, checkpoint dir) for inference; checks that every weight is finite and that the
    tokenizer fits the model."""
    model, checkpoint = load_model(path, device)
    check_finite_weights(model, checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TokenizerError(f"{checkpoint}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary has only {model.config.vocab_size}; they do not belong together")
    return model, tokenizer, checkpoint


# ---- specialists: adapters in PEFT's layout and the fine-tuning record ---------------------------------------

def fingerprint_checkpoint(checkpoint: Path) -> str:
    """sha256 of a checkpoint's config.json and weights: identifies the exact base an adapter was trained on."""
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(checkpoint / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_adapter_config(directory: Path) -> dict:
    file = directory / ADAPTER_CONFIG
    if not file.exists():
        raise CheckpointError(f"{directory} is not an adapter: no {ADAPTER_CONFIG}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"corrupt {file}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        peft_type = config.get("peft_type") if isinstance(config, dict) else None
        raise CheckpointError(f"{file}: only LoRA adapters are supported, got peft_type {peft_type!r}")
    return config


def resolve_adapter(path: str | Path) -> Path:
    """An adapter directory, or the newest adapter checkpoint of a fine-tuning run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"adapter not found: {path}")
    if (path / ADAPTER_CONFIG).exists():
        return path
    if (path / "latest").exists():
        candidate = latest_in_run(path)
        if (candidate / ADAPTER_CONFIG).exists():
            return candidate
    raise CheckpointError(f"{path} holds no adapter (no {ADAPTER_CONFIG})")


def check_adapter_base(adapter_config: dict, base_checkpoint: Path, adapter_dir: Path) -> None:
    """Refuse an adapter trained on another base (compared by the base's weights fingerprint)."""
    expected = adapter_config.get("fmforge", {}).get("base_fingerprint")
    if expected is None:
        return  # a foreign PEFT adapter: shapes are still checked on load
    actual = fingerprint_checkpoint(base_checkpoint)
    if actual != expected:
        raise SettingsMismatchError(f"adapter {adapter_dir} was trained on a different base model than "
                                    f"{base_checkpoint} (base fingerprint {expected[:12]}…, this base {actual[:12]}…)")


def read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """adapter_model.safetensors of an adapter directory, by PEFT key."""
    try:
        return load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt or missing adapter weights in {adapter_dir}: {exc}") from None


def adapter_key(module: str, part: str, embedding: bool) -> str:
    """PEFT's key of a LoRA weight: ...q_proj.lora_A.weight, or ...embed_tokens.lora_embedding_A."""
    return f"{PEFT_PREFIX}{module}.lora_embedding_{part}" if embedding else f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def split_adapter_key(key: str) -> tuple[str, str]:
    """A PEFT key -> (module path in fmforge's model, "A" or "B"); ("", "") when it is no LoRA weight."""
    if not key.startswith(PEFT_PREFIX):
        return "", ""
    rest = key[len(PEFT_PREFIX):]
    for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                         (".lora_embedding_B", "B")):
        if rest.endswith(suffix):
            return rest[:-len(suffix)], part
    return "", ""


def read_finetune_record(directory: Path) -> dict:
    """The fine-tuning record of a specialist directory ({} when there is none: a base, or a foreign adapter)."""
    file = Path(directory) / FINETUNE_RECORD
    if not file.exists():
        return {}
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return record


def write_finetune_record(directory: Path, record: dict) -> None:
    (Path(directory) / FINETUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def atomic_copy_files(source: Path, target: Path, names: list[str]) -> None:
    """Copy files so that each appears complete or not at all (temp file + os.replace)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (source / name).exists():
            atomic_write_bytes(target / name, (source / name).read_bytes())
