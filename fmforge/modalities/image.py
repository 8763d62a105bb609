"""The discrete image tokenizer: a small conv encoder/decoder with finite scalar quantization (FSQ).

An (H, W) uint8 RGB image becomes an (H/f, W/f) grid of integer codes in [0, prod(levels)) and back
(f = `downsample`). FSQ (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple") bounds each
latent channel to L levels and rounds it with a straight-through gradient: the codebook is the implicit grid
of level combinations, so no codebook entries die and no auxiliary loss (commitment, entropy) is needed. The
encoder can still collapse onto one code when its latent runs into the bound's flat tails; a BatchNorm on the
latent (ImageCodecConfig.latent_norm) keeps it out of them.

In the token stream an image is a span (`image_span`):

    <|image|>  offset+h  offset+w  offset+code_0 ... offset+code_{h*w-1}  <|/image|>

The grid's height and width are the two tokens after `<|image|>`, written in the code range itself
(offset + size), so any size decodes without new vocabulary; they are told from codes by position. Hence a grid
side is at most the codebook size (1000 for the default levels). Codes follow in row-major order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .codec_files import load_codec, save_codec

IMAGE_BEGIN_ID = 7  # "<|image|>" in tokenizer.SPECIAL_TOKENS (tests check they agree)
IMAGE_END_ID = 8    # "<|/image|>"


@dataclass
class ImageCodecConfig:
    image_size: int = 28                     # training size; encode takes any H, W that are multiples of downsample
    channels: int = 3                        # RGB
    levels: tuple[int, ...] = (8, 5, 5, 5)   # FSQ levels per latent channel; codebook = product (1000, from the paper)
    downsample: int = 4                      # f: each code covers f x f pixels; a power of two (a stride-2 conv each)
    width: int = 64                          # conv channels
    # the latent normalised per channel before FSQ (a BatchNorm: batch statistics in training, a fixed affine map
    # once trained). Without it the latent of a mostly-black dataset can run into tanh's flat tails within a few
    # dozen steps and stay there: every patch one code (MNIST alone, 300 steps: 1 code of 1,000 for seed 0).
    # Codecs saved before it existed load with it off ("before").
    latent_norm: bool = field(default=True, metadata={"before": False})

    def __post_init__(self):
        self.levels = tuple(int(level) for level in self.levels)
        if not self.levels or any(level < 2 for level in self.levels):
            raise ConfigError(f"levels must be integers >= 2, got {self.levels}")
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ConfigError(f"downsample must be a power of two (1, 2, 4, 8, ...), got {self.downsample}")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ConfigError(f"image size {self.image_size} must be a positive multiple of downsample "
                              f"{self.downsample}")
        if self.width < 1 or self.channels < 1:
            raise ConfigError(f"width and channels must be positive, got {self.width} and {self.channels}")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)


class FSQ(nn.Module):
    """Finite scalar quantization: each of len(levels) channels is bounded to L levels, rounded straight-through."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        levels_tensor = torch.tensor(levels, dtype=torch.long)
        self.register_buffer("levels", levels_tensor, persistent=False)
        # basis[i] = prod(levels[:i]): mixed-radix digits -> one integer index
        self.register_buffer("basis", torch.cumprod(torch.tensor((1, *levels[:-1])), 0), persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """(..., C) -> values in (-L/2, L/2) whose rounding gives exactly L integers (the paper's tanh scaling)."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 - 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)  # even L: shift so rounding hits L values
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., C) -> (quantized in [-1, 1] (..., C) with straight-through gradient, codes (...) long)."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()  # straight-through estimator
        half_width = (self.levels // 2).to(z.dtype)
        return rounded / half_width, self.to_codes(rounded)

    def to_codes(self, rounded: torch.Tensor) -> torch.Tensor:
        digits = torch.round(rounded).long() + self.levels // 2  # (..., C) in [0, L)
        return (digits * self.basis).sum(-1)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (...) long -> quantized values in [-1, 1] (..., C)."""
        digits = (codes.unsqueeze(-1) // self.basis) % self.levels
        half_width = self.levels // 2
        return ((digits - half_width).float() / half_width.float())


def _downsampling_steps(downsample: int) -> int:
    return int(math.log2(downsample))


class ImageCodec(nn.Module):
    """uint8 images (N, H, W, 3) <-> code grids (N, H/f, W/f) long."""

    def __init__(self, config: ImageCodecConfig):
        super().__init__()
        self.config = config
        c, width, latent = config.channels, config.width, len(config.levels)
        steps = _downsampling_steps(config.downsample)
        down = [nn.Conv2d(c, width, 3, padding=1), nn.GELU()]
        for _ in range(steps):
            down += [nn.Conv2d(width, width, 4, stride=2, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1),
                     nn.GELU()]
        self.encoder = nn.Sequential(*down, nn.Conv2d(width, latent, 1))
        self.latent_norm = nn.BatchNorm2d(latent) if config.latent_norm else None
        up = [nn.Conv2d(latent, width, 3, padding=1), nn.GELU()]
        for _ in range(steps):
            up += [nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.GELU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.GELU()]
        self.decoder = nn.Sequential(*up, nn.Conv2d(width, c, 3, padding=1))
        self.quantizer = FSQ(config.levels)

    def latents(self, pixels: torch.Tensor, batch_statistics: bool = False) -> torch.Tensor:
        """pixels (N, C, H, W) in [-1, 1] -> the latent before quantization (N, h, w, latent). The norm uses the
        batch's statistics only when asked (training): encoding is the same whatever else is in the batch."""
        z = self.encoder(pixels)
        norm = self.latent_norm
        if norm is not None:  # one latent per channel has no batch statistics: the running ones serve
            batch_statistics = batch_statistics and z.numel() > z.shape[1]
            z = F.batch_norm(z, norm.running_mean, norm.running_var, norm.weight, norm.bias,
                             training=batch_statistics, momentum=norm.momentum, eps=norm.eps)
        return z.permute(0, 2, 3, 1)

    # ---- float path (training) ----
    def reconstruct(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels (N, C, H, W) in [-1, 1] -> (reconstruction (N, C, H, W), codes (N, H/f, W/f)); in training
        mode the latent is normalised by the batch's statistics (and the running ones updated)."""
        z = self.latents(pixels, batch_statistics=self.training)  # (N, h, w, latent)
        quantized, codes = self.quantizer(z)
        return self.decoder(quantized.permute(0, 3, 1, 2)), codes

    # ---- uint8 path (the tokenizer) ----
    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != self.config.channels:
            raise DataError(f"images must be uint8 (N, H, W, {self.config.channels}), got {images.dtype} "
                            f"{tuple(images.shape)}")
        f = self.config.downsample
        if images.shape[1] % f or images.shape[2] % f:
            raise DataError(f"image height and width must be multiples of {f}, got {images.shape[1]}x{images.shape[2]}")
        device = next(self.parameters()).device
        return images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> codes (N, H/f, W/f) long in [0, codebook_size)."""
        return self.quantizer(self.latents(self._pixels(images)))[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, h, w) long -> uint8 images (N, h*f, w*f, C)."""
        if codes.ndim != 3 or codes.dtype != torch.long:
            raise DataError(f"codes must be a long tensor (N, h, w), got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.config.codebook_size):
            raise DataError(f"codes must lie in [0, {self.config.codebook_size})")
        device = next(self.parameters()).device
        quantized = self.quantizer.from_codes(codes.to(device)).permute(0, 3, 1, 2)
        pixels = self.decoder(quantized)
        return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ---- training ---------------------------------------------------------------------------------------------

def _as_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def evaluate_image_codec(codec: ImageCodec, images: np.ndarray, batch_size: int = 256) -> dict:
    """Reconstruction MSE (pixels scaled to [0, 1]) and PSNR (dB) through the quantized codes; code usage:
    share of the codebook used and perplexity of the code frequencies (codebook_size if all were equally used)."""
    codec.eval()
    squared_error, count = 0.0, 0
    counts = torch.zeros(codec.config.codebook_size, dtype=torch.long)
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        codes = codec.encode(batch)
        decoded = codec.decode(codes)
        squared_error += ((decoded.float() - batch.float()) / 255).pow(2).sum().item()
        count += batch.numel()
        counts += torch.bincount(codes.flatten().cpu(), minlength=codec.config.codebook_size)
    mse = squared_error / max(count, 1)
    frequencies = counts.float() / counts.sum()
    entropy = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum().item()
    return {"mse": mse, "psnr": 10 * math.log10(1 / max(mse, 1e-12)),
            "codes_used": int((counts > 0).sum()), "code_usage": float((counts > 0).float().mean()),
            "perplexity": math.exp(entropy)}


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup_share: float = 0.05):
    """The codecs' schedule: linear warmup over ~5% of the steps (at least one), then cosine decay to 0. (torch's
    OneCycleLR divides by zero at exactly 20 steps with a 5% warmup.)"""
    warmup = max(1, round(warmup_share * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup + 1) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_image_codec(images: np.ndarray, config: ImageCodecConfig, steps: int = 500, lr: float = 2e-3,
                      seed: int = 0, batch_size: int = 32, held_out: float = 0.1,
                      device: str | torch.device = "cpu") -> tuple[ImageCodec, dict]:
    """Train a codec on uint8 images (N, H, W, C) with an MSE reconstruction loss (the only loss FSQ needs).

    A seeded `held_out` share of the images (at least one) is kept out of training; the report gives its
    reconstruction error and code usage before ("untrained_*") and after training.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != config.channels:
        raise DataError(f"images must be uint8 (N, H, W, {config.channels}), got {images.dtype} {images.shape}")
    if len(images) < 2:
        raise DataError(f"need at least 2 images (one is held out), got {len(images)}")
    if images.shape[1] % config.downsample or images.shape[2] % config.downsample:
        raise DataError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of downsample "
                        f"{config.downsample}; resize the images (--size) or lower --downsample")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"steps and batch_size must be positive and lr > 0, got {steps}, {batch_size}, {lr}")
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(images))
    n_held = max(1, int(len(images) * held_out))
    held, train = images[order[:n_held]], images[order[n_held:]]
    torch.manual_seed(seed)
    codec = ImageCodec(config).to(device)
    before = evaluate_image_codec(codec, held)
    train_pixels = _as_pixels(train).to(device)
    optimizer = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    sampler = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    codec.train()
    for _ in range(steps):
        index = torch.randint(len(train_pixels), (min(batch_size, len(train_pixels)),), generator=sampler)
        batch = train_pixels[index.to(device)]
        reconstruction, _ = codec.reconstruct(batch)
        loss = F.mse_loss(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - started
    after = evaluate_image_codec(codec, held)
    report = {**after, **{f"untrained_{key}": value for key, value in before.items()},
              "train_images": len(train), "held_out_images": len(held), "steps": steps, "seconds": seconds,
              "codebook_size": config.codebook_size, "grid": [images.shape[1] // config.downsample,
                                                              images.shape[2] // config.downsample]}
    return codec.cpu().eval(), report


# ---- save / load ------------------------------------------------------------------------------------------

def save_image_codec(codec: ImageCodec, path: Path, report: dict | None = None) -> Path:
    """Write `path/` = config.json + codec.safetensors (+ report.json) atomically."""
    return save_codec(codec, path, "image", report, codebook_size=codec.config.codebook_size)


def load_image_codec(path: Path, device: str | torch.device = "cpu") -> ImageCodec:
    """An ImageCodec from a directory written by save_image_codec (weights through safetensors only)."""
    return load_codec(path, "image", ImageCodecConfig, ImageCodec, device)


# ---- token stream -----------------------------------------------------------------------------------------

def image_span(codes: torch.Tensor | np.ndarray, code_offset: int) -> list[int]:
    """A code grid (h, w) -> [<|image|>, offset+h, offset+w, offset+codes (row-major)..., <|/image|>]."""
    grid = np.asarray(codes)
    if grid.ndim != 2 or grid.size == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise DataError(f"an image span needs a non-empty integer code grid (h, w), got {grid.dtype} {grid.shape}")
    if grid.min() < 0:
        raise DataError("image codes must be >= 0")
    height, width = grid.shape
    return [IMAGE_BEGIN_ID, code_offset + height, code_offset + width,
            *(code_offset + grid.reshape(-1)).tolist(), IMAGE_END_ID]


def parse_image_span(ids: list[int], code_offset: int) -> torch.Tensor:
    """The inverse of image_span: token ids of one span -> codes (h, w) long. A malformed span raises DataError."""
    ids = [int(i) for i in ids]
    if len(ids) < 4 or ids[0] != IMAGE_BEGIN_ID or ids[-1] != IMAGE_END_ID:
        raise DataError(f"an image span starts with <|image|> ({IMAGE_BEGIN_ID}), gives height and width, and ends "
                        f"with <|/image|> ({IMAGE_END_ID}); got {len(ids)} ids starting {ids[:3]}")
    height, width = ids[1] - code_offset, ids[2] - code_offset
    body = ids[3:-1]
    if height < 1 or width < 1:
        raise DataError(f"image span grid size must be positive, got {height}x{width} (ids below code offset "
                        f"{code_offset})")
    if len(body) != height * width:
        raise DataError(f"image span of {height}x{width} needs {height * width} codes, got {len(body)}")
    codes = torch.tensor(body, dtype=torch.long) - code_offset
    if len(body) and codes.min() < 0:
        raise DataError(f"image span holds ids below the code offset {code_offset} (text tokens inside an image)")
    return codes.view(height, width)
