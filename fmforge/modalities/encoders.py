"""Understanding encoders: continuous features of a prompt's media added to the embeddings of its code tokens.

The image tokenizer's codes are what generation needs (a small vocabulary the model can sample), but they are
lossy (~22 dB) and a transformer must learn shapes from scratch out of them. Janus (Wu et al. 2024) found that
decoupling understanding from generation helps: understanding reads a continuous encoder's output instead. Here
the two are kept aligned: a span stays `<|image|> h w codes... <|/image|>` (so usage, prompts and the grammar do not
change), and a specialist may carry an encoder whose features, one per code, are ADDED to the embeddings of that
span's code tokens. Its output gate starts at zero, so a fresh encoder leaves the model exactly as it was, and
fine-tuning learns what the codes lose (conv filters see pixels, with the inductive bias of a CNN).

Only media in the prompt are encoded: a span the model generates (draw, edit's output) has no pixels yet, and in
training its pixels would leak the very codes being predicted (a conv's receptive field spans neighbouring codes).

Audio works the same way: the codec's own log-mels through 1-D convolutions, one feature per code of the span
(benchmarks/audio.py's digit judge reads FSDD test speech at 0.895, its codec round trip at 0.305: the codes lose
much of what tells real voices' words apart).

A placement (`MediaPlacement`) says where one array's features go: the batch row, the position of the span's first
code, the modality and the array. `MEDIA_ENCODERS` is the registry: a modality without an entry has none.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, DataError
from .audio import AudioCodecConfig, check_wave, log_mel_spectrogram, normalise
from .stream import media_kind

HEADER = 3  # a span's marker and its grid rows, cols come before the codes


@dataclass(frozen=True)
class MediaPlacement:
    row: int               # batch row (0 for a lone sequence)
    position: int          # where the span's first code sits in that row
    modality: str
    media: np.ndarray      # the array the span encodes (an image (H, W, C) uint8)


@dataclass
class ImageEncoderConfig:
    downsample: int = 4    # the image codec's: one feature per f x f pixels, as one code
    channels: int = 3
    width: int = 64        # conv channels
    n_embd: int = 256      # the language model's width
    scale: float = 0.02    # the RMS of the features at a fully open gate: the base's token embeddings' RMS

    def __post_init__(self):
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise CheckpointError(f"encoder downsample must be a power of two, got {self.downsample}")
        if min(self.channels, self.width, self.n_embd) < 1 or not self.scale > 0:
            raise CheckpointError("encoder channels, width, n_embd and scale must be positive")


class GatedFeatures(nn.Module):
    """(N, L, width) -> (N, L, n_embd): a linear map, RMS-normalised to `scale`, times tanh(gate) with the gate
    starting at 0 (Flamingo's gated cross-attention, Alayrac et al. 2022). The encoder starts adding nothing, and
    however its weights move, what it adds stays the size of a token embedding: an ungated projection at the
    specialist's lr outgrew the embeddings and the specialist collapsed to chance (MNIST 0.102 in a benchmark run)."""

    def __init__(self, width: int, n_embd: int, scale: float):
        super().__init__()
        self.project = nn.Linear(width, n_embd)
        self.gate = nn.Parameter(torch.zeros(()))
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.project(h)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * (self.scale * torch.tanh(self.gate))


class ImagePatchEncoder(nn.Module):
    """uint8 images (N, H, W, C) -> features (N, H/f * W/f, n_embd), row-major like the span's codes.

    Convolutions at full resolution, one stride-2 step per halving (the codec's shape, so each feature sits over its
    code's patch), then gated features of the model's width (GatedFeatures)."""

    def __init__(self, config: ImageEncoderConfig):
        super().__init__()
        self.config = config
        width = config.width
        layers = [nn.Conv2d(config.channels, width, 3, padding=1), nn.GELU()]
        for _ in range(int(math.log2(config.downsample))):
            layers += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = GatedFeatures(width, config.n_embd, config.scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != self.config.channels:
            raise DataError(f"images must be uint8 (N, H, W, {self.config.channels}), got {images.dtype} "
                            f"{tuple(images.shape)}")
        pixels = images.permute(0, 3, 1, 2).to(self.out.project.weight.dtype) / 127.5 - 1
        hidden = self.body(pixels)  # (N, width, h, w)
        return self.out(hidden.flatten(2).transpose(1, 2))  # (N, h * w, n_embd)

    def encode_media(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """(H, W, C) uint8 arrays -> one (h * w, n_embd) tensor each; same-sized images in one forward."""
        device = self.out.project.weight.device
        out: list = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(index)
        for indices in by_shape.values():
            batch = torch.from_numpy(np.stack([np.ascontiguousarray(images[i]) for i in indices])).to(device)
            for i, features in zip(indices, self(batch)):
                out[i] = features
        return out


@dataclass
class AudioEncoderConfig:
    codec: dict = field(default_factory=dict)  # the audio codec's config fields: the same mels, the same grid
    width: int = 128
    n_embd: int = 256
    scale: float = 0.02  # as ImageEncoderConfig's

    def __post_init__(self):
        if min(self.width, self.n_embd) < 1 or not self.scale > 0:
            raise CheckpointError("encoder width, n_embd and scale must be positive")


class AudioFrameEncoder(nn.Module):
    """Waveforms -> features (codes, n_embd), one per code of the waveform's span (rows x row_length, the last row
    padded with silence as the codec pads it): normalised log-mels, convolutions, one stride-2 step per halving,
    then gated features of the model's width (GatedFeatures)."""

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        self.codec_config = AudioCodecConfig(**config.codec)
        width, mels = config.width, self.codec_config.n_mels
        layers = [nn.Conv1d(mels, width, 3, padding=1), nn.GELU()]
        for _ in range(int(math.log2(self.codec_config.downsample))):
            layers += [nn.Conv1d(width, width, 4, stride=2, padding=1), nn.GELU(),
                       nn.Conv1d(width, width, 3, padding=1), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.out = GatedFeatures(width, config.n_embd, config.scale)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        """normalised log-mels (N, n_mels, T), T a multiple of downsample -> (N, T / downsample, n_embd)."""
        return self.out(self.body(mels.to(self.out.project.weight.dtype)).transpose(1, 2))

    def encode_media(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        """1-D float waveforms at the codec's rate -> one (codes, n_embd) tensor each, batched by grid size."""
        c = self.codec_config
        per_row = c.row_length * c.downsample
        device = self.out.project.weight.device
        mels = [normalise(log_mel_spectrogram(check_wave(wave).to(device), c)) for wave in waves]
        out: list = [None] * len(waves)
        by_frames: dict[int, list[int]] = {}
        for index, mel in enumerate(mels):
            by_frames.setdefault(max(1, -(-mel.shape[-1] // per_row)) * per_row, []).append(index)
        for frames, indices in by_frames.items():
            batch = torch.stack([F.pad(mels[i], (0, frames - mels[i].shape[-1]), value=-1.0) for i in indices])
            for i, features in zip(indices, self(batch)):
                out[i] = features
        return out


@dataclass(frozen=True)
class EncoderKind:
    config: type
    module: type
    defaults: object  # tokenizer -> the config fields that follow from the modality's codec


MEDIA_ENCODERS: dict[str, EncoderKind] = {
    "image": EncoderKind(ImageEncoderConfig, ImagePatchEncoder,
                         lambda tokenizer: {"downsample": tokenizer.codecs["image"].config.downsample,
                                            "channels": tokenizer.codecs["image"].config.channels}),
    "audio": EncoderKind(AudioEncoderConfig, AudioFrameEncoder,
                         lambda tokenizer: {"codec": dataclasses.asdict(tokenizer.codecs["audio"].config)}),
}


def new_media_encoders(tokenizer, n_embd: int, modalities=None, scale: float = 0.02) -> dict[str, nn.Module]:
    """A fresh encoder for each modality of `tokenizer` that has one in the registry (or those named); `scale`:
    the RMS of their features at a fully open gate (pass the model's token embeddings' RMS)."""
    names = [m for m in (modalities or tokenizer.modalities) if m in MEDIA_ENCODERS and tokenizer.has(m)]
    return {name: MEDIA_ENCODERS[name].module(MEDIA_ENCODERS[name].config(
        **MEDIA_ENCODERS[name].defaults(tokenizer), n_embd=n_embd, scale=scale)) for name in names}


def placements(tokenizer, ids, media, row: int = 0) -> list[MediaPlacement]:
    """Where each array of `media` sits in `ids`: the first span not yet placed whose ids are the array's own
    span (the tokenizer remembers what it encoded, so this costs a lookup). Arrays without such a span — or of a
    modality the tokenizer lacks — are left out: their codes, if any, are all the model reads of them."""
    if not media:
        return []
    ids = [int(i) for i in ids]
    spans = tokenizer.spans(ids)
    taken, found = set(), []
    for array in media:
        array = np.asarray(array)
        kind = media_kind(array, strict=False)
        if kind is None or not tokenizer.has(kind):
            continue
        span = tokenizer.encode_image(array) if kind == "image" else tokenizer.encode_audio(array)
        for index, (modality, start, end) in enumerate(spans):
            if index not in taken and modality == kind and ids[start:end] == span:
                taken.add(index)
                found.append(MediaPlacement(row, start + HEADER, modality, array))
                break
    return found


def media_features(encoders, items: list[MediaPlacement], shape: tuple[int, int],
                   like: torch.Tensor) -> torch.Tensor | None:
    """(B, T, n_embd) features to add to the input embeddings of a (B, T) window, zeros where no media lies;
    `items` positions are relative to the window (features falling outside it are cut). None when nothing lands.
    Each modality's arrays go through its encoder together (batched by size)."""
    items = [item for item in items if item.modality in encoders]
    if not items:
        return None
    B, T = shape
    out = torch.zeros(B, T, like.shape[-1], dtype=like.dtype, device=like.device)
    groups: dict[str, list[MediaPlacement]] = {}
    for item in items:
        groups.setdefault(item.modality, []).append(item)
    landed = False
    for modality, group in groups.items():
        features = encoders[modality].encode_media([item.media for item in group])  # (L_i, n_embd) each
        for item, feature in zip(group, features):
            feature = feature.to(like.dtype)
            lo, hi = max(item.position, 0), min(item.position + feature.shape[0], T)
            if lo < hi:
                out[item.row, lo:hi] += feature[lo - item.position:hi - item.position]
                landed = True
    return out if landed else None
