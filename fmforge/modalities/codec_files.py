"""A codec's directory, the same for every modality: config.json (the modality, the format and the config's fields)
+ codec.safetensors (+ report.json), written atomically and read through safetensors only."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..errors import ConfigError, TokenizerError
from ..fileio import atomic_directory

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "codec.safetensors"
FORMAT = 1


def save_codec(codec: torch.nn.Module, path: Path, modality: str, report: dict | None = None,
               **extra) -> Path:
    """Write `path/` = config.json + codec.safetensors (+ report.json) atomically: temp dir, fsync, rename.
    `extra` values go into config.json for people to read (the codebook size, ...); loading ignores them."""
    from safetensors.torch import save_file

    path = Path(path)
    try:
        with atomic_directory(path) as tmp:
            config = {"modality": modality, "format": FORMAT, **asdict(codec.config),
                      "levels": list(codec.config.levels), **extra}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            state = {name: tensor.detach().cpu().contiguous() for name, tensor in codec.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            if report is not None:
                (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise TokenizerError(f"cannot write {modality} tokenizer {path}: {exc.strerror or exc}") from None
    return path


def saved_config(config_class: type, saved: dict):
    """A codec config from saved fields: a field added later (metadata "before": its value until then) takes
    that value when missing; any other missing field is a KeyError."""
    return config_class(**{field.name: saved[field.name] if field.name in saved or "before" not in field.metadata
                           else field.metadata["before"] for field in fields(config_class)})


def load_codec(path: Path, modality: str, config_class: type, codec_class: type,
               device: str | torch.device = "cpu") -> torch.nn.Module:
    """The codec of a directory written by save_codec; TokenizerError (one line) for anything else."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise TokenizerError(f"{path} is not an {modality} tokenizer (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                             f"make one with `fmforge tokenizer train --modality {modality}`")
    try:
        saved = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(saved, dict) or saved.get("modality") != modality or saved.get("format") != FORMAT:
        raise TokenizerError(f"{path / CONFIG_FILE} is not an {modality} tokenizer of format {FORMAT}")
    try:
        config = saved_config(config_class, saved)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise TokenizerError(f"{path / CONFIG_FILE} has a bad or missing setting: {exc}") from None
    codec = codec_class(config)
    try:
        codec.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    except Exception as exc:  # a truncated file (SafetensorError) or other shapes (RuntimeError)
        raise TokenizerError(f"cannot load {path / WEIGHTS_FILE}: {str(exc).splitlines()[0]}") from None
    return codec.to(device).eval()
