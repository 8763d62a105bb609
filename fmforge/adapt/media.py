"""A specialist's understanding encoders (modalities/encoders.py): training wrapper, files, loading.

A specialist trained with encoders (`fmforge finetune --media-encoder on`) keeps them beside its adapter or
weights, in MEDIA_ENCODER_FILE, with their configs in the safetensors metadata; everything that runs the specialist
(eval, generate, the server) loads them through `read_media_encoders`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..modalities.encoders import MEDIA_ENCODERS, READERS, media_features
from ..model import ModelOutput, Transformer

MEDIA_ENCODER_FILE = "media_encoders.safetensors"


class MediaEncoded(nn.Module):
    """A language model whose input embeddings at a prompt's media codes get its encoders' features added.

    forward takes the model's arguments plus `media` (a list of MediaPlacement, positions within the batch);
    without media it is the model itself."""

    def __init__(self, model: Transformer, encoders: dict[str, nn.Module]):
        super().__init__()
        self.model = model
        self.encoders = nn.ModuleDict(encoders)

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids: torch.Tensor, media=None, **kwargs) -> ModelOutput:
        x = self.model.embed(input_ids)  # (B, T, n_embd)
        added = media_features(self.encoders, media or [], tuple(input_ids.shape), x)
        return self.model(inputs_embeds=x if added is None else x + added, **kwargs)


def save_media_encoders(directory: Path, encoders: dict[str, nn.Module]) -> None:
    """Every encoder's weights (prefixed by modality) in one safetensors file; configs in its metadata."""
    tensors = {f"{name}.{key}": value.detach().contiguous().cpu()
               for name, encoder in encoders.items() for key, value in encoder.state_dict().items()}
    configs = {name: vars(encoder.config) for name, encoder in encoders.items()}
    save_file(tensors, str(Path(directory) / MEDIA_ENCODER_FILE), metadata={"configs": json.dumps(configs)})


def read_media_encoders(directory: Path, device="cpu") -> dict[str, nn.Module]:
    """The encoders saved in `directory` ({} when it has none), in eval mode."""
    path = Path(directory) / MEDIA_ENCODER_FILE
    if not path.exists():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            configs = json.loads((f.metadata() or {})["configs"])
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"cannot read the media encoders in {path}: {exc}") from None
    encoders = {}
    for name, fields in configs.items():
        registry = READERS if isinstance(fields, dict) and fields.get("reads") == "codes" else MEDIA_ENCODERS
        if name not in registry:
            raise CheckpointError(f"{path}: an encoder for {name!r}, a modality without one here")
        kind = registry[name]
        try:
            encoder = kind.module(kind.config(**fields))
        except TypeError as exc:
            raise CheckpointError(f"{path}: the {name} encoder's config does not fit: {exc}") from None
        state = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(f"{name}.")}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the {name} encoder's weights do not fit its config: {exc}") from None
        encoders[name] = encoder.to(device).eval()
        if getattr(encoder, "reads_codes", False):
            encoder.requires_grad_(False)
    return encoders


def base_readers(directory: Path) -> dict[str, nn.Module]:
    """The readers a base checkpoint carries (`fmforge pretrain --image_reader true`): encoders that read codes."""
    return {name: encoder for name, encoder in read_media_encoders(directory).items()
            if getattr(encoder, "reads_codes", False)}


def load_media_encoders_into(encoders: dict[str, nn.Module], directory: Path) -> None:
    """Load saved weights into existing (training) encoders, for resuming."""
    saved = read_media_encoders(directory)
    if set(saved) != set(encoders):
        raise CheckpointError(f"{directory} has encoders for {sorted(saved) or 'nothing'}, this run trains "
                              f"{sorted(encoders)}")
    for name, encoder in encoders.items():
        encoder.load_state_dict(saved[name].state_dict())
