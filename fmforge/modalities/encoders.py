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

A base may carry its own reader instead (`fmforge pretrain --image_reader true`, `ImageCodeReader`): a fixed random
linear map of each code's patch of the image the span's codes decode to. It needs no pixels, so pretraining gives it
the image -> caption documents' images, read from their codes; nothing in it trains (the base learns to read it),
and specialists inherit it. On a from-scratch probe (the 4 x 256 model classifying MNIST's 4,000 train digits from
codes, 300 steps of 64) code embeddings reached 0.57, the decoded patches through a fixed random map 0.71, plus the
code embeddings 0.77 (a trained map 0.66; the real pixels 0.79): continuous patches are easier to learn from than
ids, as Janus argues, and a frozen random patch projection trains steadier than a learned one (as MoCo v3 found for
ViTs). benchmarks/RESULTS.md ("vision") has the measurement on real bases.

A placement (`MediaPlacement`) says where one array's features go: the batch row, the position of the span's first
code, the modality and the array (for a reader also a code grid). `MEDIA_ENCODERS` is the registry: a modality
without an entry has none; `READERS` holds the base readers, told apart by their config's `reads: codes`.
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
from .codec_files import saved_config
from .image import ImageCodec, ImageCodecConfig
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
        return batched_by_shape([torch.from_numpy(np.ascontiguousarray(image)) for image in images],
                                lambda batch: self(batch.to(device)))


def batched_by_shape(items: list[torch.Tensor], forward) -> list[torch.Tensor]:
    """forward over the items stacked by shape (one call per shape), its outputs back in the items' order."""
    out: list = [None] * len(items)
    by_shape: dict[tuple, list[int]] = {}
    for index, item in enumerate(items):
        by_shape.setdefault(tuple(item.shape), []).append(index)
    for indices in by_shape.values():
        for i, features in zip(indices, forward(torch.stack([items[i] for i in indices]))):
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


@dataclass
class ImageReaderConfig:
    codec: dict = field(default_factory=dict)  # the image codec's config fields (its weights are copied in)
    n_embd: int = 256
    seed: int = 0
    # times the map's output: a patch full of ink comes out at ~0.14 RMS, the size trained code embeddings reach
    # (~0.15); background (pixels 0) at 0. At 4x that and with background at -1 plus a bias (RMS ~0.55, a large
    # constant over every code) the reader hurt: benchmarks/RESULTS.md, "vision".
    scale: float = 0.25
    reads: str = "codes"  # tells a reader's saved config from an encoder's (adapt/media.read_media_encoders)

    def __post_init__(self):
        if self.reads != "codes" or self.n_embd < 1 or not self.scale > 0:
            raise CheckpointError(f"an image reader reads codes and has a positive width and scale, got "
                                  f"reads={self.reads!r}, n_embd={self.n_embd}, scale={self.scale}")


class ImageCodeReader(nn.Module):
    """Code grids (N, h, w) -> features (N, h * w, n_embd): each code's f x f patch of the grid's decoding (by a
    frozen copy of the image codec; pixels in [0, 1]), through a fixed random linear map without bias, times
    `scale` (nothing here trains). `encode_media` takes code grids, or uint8 images, which it encodes first, so
    that a prompt image is read exactly as the base read its codes in pretraining."""

    reads_codes = True

    def __init__(self, config: ImageReaderConfig):
        super().__init__()
        self.config = config
        self.codec = ImageCodec(saved_config(ImageCodecConfig, config.codec))
        c = self.codec.config
        self.project = nn.Linear(c.downsample * c.downsample * c.channels, config.n_embd, bias=False)
        generator = torch.Generator().manual_seed(config.seed)
        bound = 1 / math.sqrt(self.project.in_features)  # nn.Linear's own initialisation, seeded
        with torch.no_grad():
            self.project.weight.uniform_(-bound, bound, generator=generator)
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, grids: torch.Tensor) -> torch.Tensor:
        c = self.codec.config
        f = c.downsample
        N, h, w = grids.shape
        dtype = self.project.weight.dtype
        quantized = self.codec.quantizer.from_codes(grids.to(self.project.weight.device)).permute(0, 3, 1, 2)
        pixels = (self.codec.decoder(quantized.to(dtype)).clamp(-1, 1) + 1) / 2  # (N, C, h f, w f) in [0, 1]
        patches = pixels.reshape(N, c.channels, h, f, w, f).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, -1)
        return self.config.scale * self.project(patches)

    def encode_media(self, items: list[np.ndarray]) -> list[torch.Tensor]:
        """Code grids (h, w) or uint8 images (H, W, C) -> one (h * w, n_embd) tensor each, batched by grid size."""
        grids = [torch.as_tensor(np.asarray(item), dtype=torch.long) if np.asarray(item).ndim == 2
                 else self.codec.encode(torch.from_numpy(np.ascontiguousarray(item))[None])[0] for item in items]
        return batched_by_shape(grids, self)


def new_image_reader(tokenizer, n_embd: int, seed: int = 0) -> ImageCodeReader:
    """A base's image reader for `tokenizer`'s image codec (its weights copied in)."""
    reader = ImageCodeReader(ImageReaderConfig(**READERS["image"].defaults(tokenizer), n_embd=n_embd, seed=seed))
    reader.codec.load_state_dict(tokenizer.codecs["image"].state_dict())
    return reader.requires_grad_(False)


def code_placements(tokenizer, ids, row: int = 0, after_bos: bool = False) -> tuple[list[MediaPlacement], list]:
    """(placements, spans) of the complete image spans in `ids` for a reader: each placement's array is the span's
    code grid. after_bos: only spans that open a document (just after a BOS id), as image -> caption documents do."""
    ids = [int(i) for i in ids]
    found, spans = [], []
    offset = tokenizer.code_offset("image")
    for modality, start, end in tokenizer.spans(ids):
        if modality != "image" or (after_bos and (start == 0 or ids[start - 1] != tokenizer.bos_id)):
            continue
        h, w = ids[start + 1] - offset, ids[start + 2] - offset
        codes = np.asarray(ids[start + HEADER:end - 1]) - offset
        if h < 1 or w < 1 or codes.size != h * w or codes.min() < 0 or codes.max() >= tokenizer.ranges["image"][1]:
            continue  # a malformed span is read as its ids only
        found.append(MediaPlacement(row, start + HEADER, "image", codes.reshape(h, w)))
        spans.append((start, end))
    return found, spans


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


READERS: dict[str, EncoderKind] = {
    "image": EncoderKind(ImageReaderConfig, ImageCodeReader,
                         lambda tokenizer: {"codec": dataclasses.asdict(tokenizer.codecs["image"].config)}),
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
