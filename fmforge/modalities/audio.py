"""The discrete audio tokenizer: log-mel analysis, a small conv1d encoder/decoder with FSQ, Griffin-Lim synthesis.

A mono float waveform at `sample_rate` becomes a log-mel spectrogram (100 frames/s by default), the encoder
downsamples it in time (`downsample` frames per code) and FSQ rounds each latent (the image tokenizer's `FSQ`: no
codebook to collapse, no auxiliary loss). Decoding runs the decoder back to a log-mel and turns that into a
waveform with fast Griffin-Lim (Perraudin et al. 2013), so no vocoder has to be trained.

An utterance's codes are one sequence in time, laid out as a grid of `rows` x `row_length` (row-major) so that an
audio span has the same two-token header as an image span (`audio_span`):

    <|audio|>  offset+rows  offset+row_length  offset+code_0 ... offset+code_{rows*row_length-1}  <|/audio|>

The last row is filled by encoding silence (the log-mel is padded with its floor), which decodes to near-silence
and is trimmed. Rows are at most MAX_ROWS (the largest header value generation may write), so one span holds at
most `config.max_seconds` of audio (41 s by default: 64 rows of 16 codes at 25 codes/s).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, DataError
from .codec_files import load_codec, save_codec
from .image import FSQ, warmup_cosine

AUDIO_BEGIN_ID = 9   # "<|audio|>" in tokenizer.SPECIAL_TOKENS (tests check they agree)
AUDIO_END_ID = 10    # "<|/audio|>"
MAX_ROWS = 64        # = stream.MAX_GRID: header values generation may write (tests check they agree)

LOG_FLOOR = math.log(1e-5)  # mel magnitudes are clamped at 1e-5 before the log (as in HiFi-GAN): -11.5 = silence
LOG_SCALE = 7.0             # normalised = (log_mel - LOG_FLOOR) / LOG_SCALE - 1: silence -1, loud speech ~ +1
MAX_AMPLITUDE = 2.0         # resampling may overshoot full scale a little; int16 PCM read as floats is far past this
SILENCE_RMS = 1e-3          # decode trims trailing hop-sized frames quieter than this (-60 dBFS)


@dataclass
class AudioCodecConfig:
    sample_rate: int = 16000                 # Hz; encode takes waveforms at this rate
    n_fft: int = 512                         # STFT size (32 ms)
    win_length: int = 400                    # Hann window (25 ms), the speech front end's usual frame
    hop_length: int = 160                    # 10 ms: 100 mel frames per second
    n_mels: int = 64                         # Slaney-style mel bands
    fmin: float = 0.0                        # Hz
    fmax: float | None = None                # Hz; None: sample_rate / 2
    levels: tuple[int, ...] = (8, 5, 5, 5)   # FSQ levels per latent channel; codebook = product (1000)
    downsample: int = 4                      # mel frames per code, a power of two (a stride-2 conv each): 25 codes/s
    width: int = 128                         # conv channels
    row_length: int = 16                     # codes per grid row (the span header's second value)

    def __post_init__(self):
        self.levels = tuple(int(level) for level in self.levels)
        if self.fmax is None:
            self.fmax = self.sample_rate / 2
        if not self.levels or any(level < 2 for level in self.levels):
            raise ConfigError(f"levels must be integers >= 2, got {self.levels}")
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ConfigError(f"downsample must be a power of two (1, 2, 4, 8, ...), got {self.downsample}")
        if self.sample_rate < 1 or self.width < 1 or self.n_mels < 1:
            raise ConfigError(f"sample_rate, width and n_mels must be positive, got {self.sample_rate}, "
                              f"{self.width} and {self.n_mels}")
        if not 1 <= self.hop_length <= self.win_length <= self.n_fft:
            raise ConfigError(f"need 1 <= hop_length <= win_length <= n_fft, got {self.hop_length}, "
                              f"{self.win_length} and {self.n_fft}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"need 0 <= fmin < fmax <= sample_rate / 2 = {self.sample_rate / 2:g} Hz, got "
                              f"{self.fmin:g} and {self.fmax:g}")
        if not 1 <= self.row_length <= min(MAX_ROWS, self.codebook_size - 1):
            raise ConfigError(f"row_length must be between 1 and {min(MAX_ROWS, self.codebook_size - 1)} (a span "
                              f"header value), got {self.row_length}")
        empty = int((mel_filterbank(self).sum(1) == 0).sum())
        if empty:
            raise ConfigError(f"{empty} of the {self.n_mels} mel bands fall between FFT bins; use fewer n_mels or a "
                              f"larger n_fft")

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length

    @property
    def codes_per_second(self) -> float:
        return self.frames_per_second / self.downsample

    @property
    def max_seconds(self) -> float:
        """The longest waveform one span (MAX_ROWS rows) holds."""
        return MAX_ROWS * self.row_length * self.downsample * self.hop_length / self.sample_rate


# ---- log-mel analysis and Griffin-Lim synthesis ------------------------------------------------------------

def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (the Auditory Toolbox; librosa's default): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200 / 3)
    log_part = 15 + np.log(np.maximum(hz, 1e-10) / 1000) / (np.log(6.4) / 27)
    return np.where(hz >= 1000, log_part, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15, 1000 * np.exp((mel - 15) * np.log(6.4) / 27), mel * 200 / 3)


def mel_filterbank(config: AudioCodecConfig) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters, each of unit area in Hz (Slaney normalisation)."""
    return _filterbank(config.sample_rate, config.n_fft, config.n_mels, float(config.fmin), float(config.fmax))


@functools.lru_cache(maxsize=8)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    bins = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))  # band i spans edges[i:i+3]
    widths = np.diff(edges)
    rising = (bins[None, :] - edges[:-2, None]) / widths[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / widths[1:, None]
    triangles = np.maximum(0, np.minimum(rising, falling))
    return torch.from_numpy(triangles * (2 / (edges[2:] - edges[:-2]))[:, None]).float()


def _window(config: AudioCodecConfig, device) -> torch.Tensor:
    return torch.hann_window(config.win_length, device=device)


def log_mel_spectrogram(wave: torch.Tensor, config: AudioCodecConfig) -> torch.Tensor:
    """A waveform (N,) -> natural-log mel magnitudes (n_mels, ceil(N / hop)) clamped at LOG_FLOOR; frame t is
    centred on sample t * hop."""
    frames = max(1, -(-wave.shape[-1] // config.hop_length))
    padded = F.pad(wave, (0, frames * config.hop_length - wave.shape[-1]))
    spectrum = torch.stft(padded, config.n_fft, config.hop_length, config.win_length, _window(config, wave.device),
                          center=True, pad_mode="constant", return_complex=True)[..., :frames]
    mel = mel_filterbank(config).to(wave.device) @ spectrum.abs()
    return mel.clamp(min=math.exp(LOG_FLOOR)).log()


def normalise(log_mel: torch.Tensor) -> torch.Tensor:
    return (log_mel - LOG_FLOOR) / LOG_SCALE - 1


def denormalise(values: torch.Tensor) -> torch.Tensor:
    return ((values + 1) * LOG_SCALE + LOG_FLOOR).clamp(min=LOG_FLOOR)


def mel_to_linear(mel: torch.Tensor, config: AudioCodecConfig, iterations: int = 20) -> torch.Tensor:
    """Mel magnitudes (n_mels, T) -> the non-negative linear magnitudes (n_fft // 2 + 1, T) whose mel best matches:
    non-negative least squares by multiplicative updates (Lee & Seung 2001) from the clamped pseudo-inverse."""
    basis = mel_filterbank(config).to(mel.device)
    linear = (torch.linalg.pinv(basis) @ mel).clamp(min=1e-8)
    target = basis.T @ mel
    for _ in range(iterations):
        linear = linear * target / (basis.T @ (basis @ linear) + 1e-12)
    return linear


def griffin_lim(log_mel: torch.Tensor, config: AudioCodecConfig, iterations: int = 48,
                momentum: float = 0.99) -> np.ndarray:
    """A natural-log mel (n_mels, T) -> float32 waveform (T * hop,) by fast Griffin-Lim (Perraudin, Balazs &
    Søndergaard 2013: Griffin-Lim with momentum). The initial phase is seeded, so the result is deterministic."""
    magnitude = mel_to_linear(log_mel.exp(), config)
    magnitude = F.pad(magnitude, (0, 1))  # the analysis drops the frame centred past the end; give it back as silence
    length = (magnitude.shape[-1] - 1) * config.hop_length
    window = _window(config, magnitude.device)
    generator = torch.Generator().manual_seed(0)
    angles = torch.polar(torch.ones(magnitude.shape), torch.rand(magnitude.shape, generator=generator) * 2 * math.pi)
    angles = angles.to(magnitude.device)
    previous = torch.zeros_like(angles)

    def istft(spectrum):
        return torch.istft(spectrum, config.n_fft, config.hop_length, config.win_length, window, center=True,
                           length=length)

    for _ in range(iterations):
        rebuilt = torch.stft(istft(magnitude * angles), config.n_fft, config.hop_length, config.win_length, window,
                             center=True, pad_mode="constant", return_complex=True)
        angles = rebuilt - previous * (momentum / (1 + momentum))
        angles = angles / (angles.abs() + 1e-16)
        previous = rebuilt
    return istft(magnitude * angles).clamp(-1, 1).cpu().numpy().astype(np.float32)


def trim_trailing_silence(wave: np.ndarray, hop: int) -> np.ndarray:
    """Cut the hop-sized frames at the end whose RMS is below SILENCE_RMS (keeps at least one frame)."""
    frames = max(1, -(-len(wave) // hop))
    padded = np.pad(wave, (0, frames * hop - len(wave)))
    rms = np.sqrt((padded.reshape(frames, hop) ** 2).mean(1))
    loud = np.flatnonzero(rms >= SILENCE_RMS)
    end = (loud[-1] + 1 if len(loud) else 1) * hop
    return wave[:end]


def check_wave(wave, what: str = "waveform") -> torch.Tensor:
    """A 1-D float waveform in [-1, 1] (numpy or tensor) -> float32 tensor; anything else raises DataError."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu()
        wave = (wave.float() if wave.dtype == torch.bfloat16 else wave).numpy()  # numpy has no bfloat16
    if not isinstance(wave, np.ndarray):
        raise DataError(f"{what} must be a numpy array or tensor, got {type(wave).__name__}")
    if not np.issubdtype(wave.dtype, np.floating) or wave.ndim != 1 or wave.size == 0:
        raise DataError(f"{what} must be a non-empty 1-D float array (mono samples in [-1, 1]), got {wave.dtype} "
                        f"{wave.shape}")
    if not np.isfinite(wave).all():
        raise DataError(f"{what} holds NaN or infinite samples")
    peak = float(np.abs(wave).max())
    if peak > MAX_AMPLITUDE:
        raise DataError(f"{what} peaks at {peak:g}; samples must lie in [-1, 1] (scale integer PCM by 1/32768)")
    return torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))


# ---- the codec -------------------------------------------------------------------------------------------------

class ResidualBlock(nn.Module):
    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.mix = nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(F.gelu(self.conv(F.gelu(x))))


def _downsampling_steps(downsample: int) -> int:
    return int(math.log2(downsample))


class AudioCodec(nn.Module):
    """Waveforms <-> code grids (rows, row_length) long, through normalised log-mels (n_mels, frames)."""

    def __init__(self, config: AudioCodecConfig):
        super().__init__()
        self.config = config
        mels, width, latent = config.n_mels, config.width, len(config.levels)
        steps = _downsampling_steps(config.downsample)
        down = [nn.Conv1d(mels, width, 3, padding=1), ResidualBlock(width, 1)]
        for _ in range(steps):
            down += [nn.Conv1d(width, width, 4, stride=2, padding=1), ResidualBlock(width, 1)]
        self.encoder = nn.Sequential(*down, ResidualBlock(width, 3), nn.GELU(), nn.Conv1d(width, latent, 1))
        up = [nn.Conv1d(latent, width, 3, padding=1), ResidualBlock(width, 1), ResidualBlock(width, 3)]
        for _ in range(steps):
            up += [nn.ConvTranspose1d(width, width, 4, stride=2, padding=1), ResidualBlock(width, 1)]
        self.decoder = nn.Sequential(*up, nn.GELU(), nn.Conv1d(width, mels, 3, padding=1))
        self.quantizer = FSQ(config.levels)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- float path (training) ----
    def reconstruct(self, mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """normalised log-mels (B, n_mels, T), T a multiple of downsample -> (reconstruction (B, n_mels, T),
        codes (B, T / downsample))."""
        z = self.encoder(mels).transpose(1, 2)  # (B, T/f, latent)
        quantized, codes = self.quantizer(z)
        return self.decoder(quantized.transpose(1, 2)), codes

    def grid_frames(self, frames: int) -> int:
        """Mel frames of an utterance -> frames of its whole grid (the last row filled with silence)."""
        per_row = self.config.row_length * self.config.downsample
        return max(1, -(-frames // per_row)) * per_row

    def normalised_mel(self, wave) -> torch.Tensor:
        """A waveform -> its normalised log-mel (n_mels, ceil(N / hop)) on the codec's device."""
        return normalise(log_mel_spectrogram(check_wave(wave).to(self.device), self.config))

    def _grids(self, mels: list[torch.Tensor], decode: bool, batch_size: int = 64):
        """Normalised mels (n_mels, T_i) -> per item (codes (rows_i, row_length), reconstruction (n_mels, grid
        frames) or None). Items are batched with others of the same grid size, so each gets exactly the codes it
        would get alone (the convolutions see the same padding)."""
        results = [None] * len(mels)
        by_size: dict[int, list[int]] = {}
        for index, mel in enumerate(mels):
            by_size.setdefault(self.grid_frames(mel.shape[-1]), []).append(index)
        for frames, indices in by_size.items():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start:start + batch_size]
                batch = torch.stack([F.pad(mels[i], (0, frames - mels[i].shape[-1]), value=-1.0) for i in chunk])
                if decode:
                    reconstruction, codes = self.reconstruct(batch)
                else:
                    reconstruction, codes = None, self.quantizer(self.encoder(batch).transpose(1, 2))[1]
                for row, i in enumerate(chunk):
                    results[i] = (codes[row].view(-1, self.config.row_length).cpu(),
                                  None if reconstruction is None else reconstruction[row])
        return results

    # ---- waveform path (the tokenizer) ----
    @torch.no_grad()
    def encode(self, wave) -> torch.Tensor:
        """A 1-D float waveform at sample_rate in [-1, 1] -> codes (rows, row_length) long in [0, codebook_size)."""
        return self.encode_batch([wave])[0]

    @torch.no_grad()
    def encode_batch(self, waves: list) -> list[torch.Tensor]:
        """Waveforms -> one code grid (rows_i, row_length) each, as `encode` gives them, batched by grid size."""
        mels = [self.normalised_mel(wave) for wave in waves]
        too_long = [i for i, mel in enumerate(mels) if self.grid_frames(mel.shape[-1]) >
                    MAX_ROWS * self.config.row_length * self.config.downsample]
        if too_long:
            seconds = mels[too_long[0]].shape[-1] / self.config.frames_per_second
            raise DataError(f"a waveform of {seconds:.1f}s is longer than one audio span holds "
                            f"({self.config.max_seconds:.2f}s = {MAX_ROWS} rows of {self.config.row_length} codes); "
                            f"split it")
        return [codes for codes, _ in self._grids(mels, decode=False)]

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor) or codes.ndim != 2 or codes.dtype != torch.long or not codes.numel():
            raise DataError(f"codes must be a non-empty long tensor (rows, row_length), got "
                            f"{getattr(codes, 'dtype', type(codes).__name__)} {tuple(getattr(codes, 'shape', ()))}")
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise DataError(f"codes must lie in [0, {self.config.codebook_size})")
        return codes

    @torch.no_grad()
    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (rows, cols) long -> natural-log mel (n_mels, rows * cols * downsample) on the CPU."""
        codes = self._check_codes(codes).reshape(1, -1).to(self.device)
        quantized = self.quantizer.from_codes(codes).transpose(1, 2)  # (1, latent, codes)
        return denormalise(self.decoder(quantized)[0]).cpu()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, iterations: int = 48, trim: bool = True) -> np.ndarray:
        """codes (rows, cols) long -> float32 waveform at sample_rate (Griffin-Lim; trailing silence trimmed)."""
        wave = griffin_lim(self.decode_mel(codes), self.config, iterations)
        return trim_trailing_silence(wave, self.config.hop_length) if trim else wave


# ---- training ------------------------------------------------------------------------------------------------

def check_waves(waves, what: str = "waves") -> list[torch.Tensor]:
    """A non-empty list of 1-D float waveforms -> float32 tensors; the first bad one raises DataError."""
    if isinstance(waves, (np.ndarray, torch.Tensor)) or not isinstance(waves, (list, tuple)):
        raise DataError(f"{what} must be a list of 1-D float arrays (one per utterance), got {type(waves).__name__}")
    if not waves:
        raise DataError(f"{what} is empty: no audio to train on")
    return [check_wave(wave, f"{what}[{index}]") for index, wave in enumerate(waves)]


@torch.no_grad()
def evaluate_audio_codec(codec: AudioCodec, waves: list) -> dict:
    """Reconstruction MSE of the normalised log-mel (silence -1, loud speech ~ +1) through the quantized codes,
    over the utterances' own frames; code usage: share of the codebook used and perplexity of the code
    frequencies (codebook_size if all were equally used)."""
    codec.eval()
    mels = [codec.normalised_mel(wave) for wave in check_waves(waves)]
    squared_error, count = 0.0, 0
    counts = torch.zeros(codec.config.codebook_size, dtype=torch.long)
    for mel, (codes, reconstruction) in zip(mels, codec._grids(mels, decode=True)):
        squared_error += (reconstruction[:, :mel.shape[-1]] - mel).pow(2).sum().item()
        count += mel.numel()
        counts += torch.bincount(codes.flatten(), minlength=codec.config.codebook_size)
    frequencies = counts.float() / counts.sum()
    entropy = -(frequencies[frequencies > 0] * frequencies[frequencies > 0].log()).sum().item()
    return {"mse": squared_error / max(count, 1), "codes_used": int((counts > 0).sum()),
            "code_usage": float((counts > 0).float().mean()), "perplexity": math.exp(entropy)}


def train_audio_codec(waves: list, config: AudioCodecConfig, steps: int = 1500, lr: float = 2e-3, seed: int = 0,
                      batch_size: int = 16, held_out: float = 0.1, crop_seconds: float = 1.0,
                      device: str | torch.device = "cpu") -> tuple[AudioCodec, dict]:
    """Train a codec on mono float waveforms at config.sample_rate with an MSE loss on the normalised log-mel (the
    only loss FSQ needs), on random `crop_seconds` crops (shorter waves are padded with silence).

    A seeded `held_out` share of the waves (at least one) is kept out of training; the report gives its
    reconstruction error and code usage before ("untrained_*") and after training.
    """
    tensors = check_waves(waves)
    if len(tensors) < 2:
        raise DataError(f"need at least 2 waveforms (one is held out), got {len(tensors)}")
    if steps < 1 or batch_size < 1 or lr <= 0 or crop_seconds <= 0 or not 0 < held_out < 1:
        raise ConfigError(f"steps and batch_size must be positive, lr and crop_seconds > 0 and held_out in (0, 1), "
                          f"got {steps}, {batch_size}, {lr}, {crop_seconds} and {held_out}")
    generator = np.random.default_rng(seed)
    order = generator.permutation(len(tensors))
    n_held = max(1, int(len(tensors) * held_out))
    held, train = [tensors[i] for i in order[:n_held]], [tensors[i] for i in order[n_held:]]
    torch.manual_seed(seed)
    codec = AudioCodec(config).to(device)
    before = evaluate_audio_codec(codec, held)
    mels = [codec.normalised_mel(wave) for wave in train]  # (n_mels, T_i) each, computed once
    crop = -(-round(crop_seconds * config.frames_per_second) // config.downsample) * config.downsample
    optimizer = torch.optim.AdamW(codec.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    started = time.perf_counter()
    codec.train()
    for _ in range(steps):
        chosen = generator.integers(len(mels), size=batch_size)
        batch = torch.stack([random_crop(mels[i], crop, generator) for i in chosen])  # (B, n_mels, crop)
        reconstruction, _ = codec.reconstruct(batch)
        loss = F.mse_loss(reconstruction, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - started
    after = evaluate_audio_codec(codec, held)
    report = {**after, **{f"untrained_{key}": value for key, value in before.items()},
              "train_waves": len(train), "held_out_waves": len(held),
              "train_seconds_of_audio": sum(len(w) for w in train) / config.sample_rate,
              "steps": steps, "seconds": seconds, "codebook_size": config.codebook_size,
              "codes_per_second": config.codes_per_second}
    return codec.cpu().eval(), report


def random_crop(mel: torch.Tensor, frames: int, generator: np.random.Generator) -> torch.Tensor:
    """`frames` consecutive frames of mel (n_mels, T) from a random start; a shorter mel is padded with silence
    at a random offset."""
    excess = mel.shape[-1] - frames
    if excess >= 0:
        start = int(generator.integers(excess + 1))
        return mel[:, start:start + frames]
    left = int(generator.integers(-excess + 1))
    return F.pad(mel, (left, -excess - left), value=-1.0)


# ---- save / load ---------------------------------------------------------------------------------------------

def save_audio_codec(codec: AudioCodec, path: Path, report: dict | None = None) -> Path:
    """Write `path/` = config.json + codec.safetensors (+ report.json) atomically."""
    return save_codec(codec, path, "audio", report, codebook_size=codec.config.codebook_size,
                      codes_per_second=codec.config.codes_per_second)


def load_audio_codec(path: Path, device: str | torch.device = "cpu") -> AudioCodec:
    """An AudioCodec from a directory written by save_audio_codec (weights through safetensors only)."""
    return load_codec(path, "audio", AudioCodecConfig, AudioCodec, device)


# ---- token stream --------------------------------------------------------------------------------------------

def audio_span(codes: torch.Tensor | np.ndarray, code_offset: int) -> list[int]:
    """A code grid (rows, cols) -> [<|audio|>, offset+rows, offset+cols, offset+codes (row-major)..., <|/audio|>]."""
    grid = np.asarray(codes)
    if grid.ndim != 2 or grid.size == 0 or not np.issubdtype(grid.dtype, np.integer):
        raise DataError(f"an audio span needs a non-empty integer code grid (rows, cols), got {grid.dtype} "
                        f"{grid.shape}")
    if grid.min() < 0:
        raise DataError("audio codes must be >= 0")
    rows, cols = grid.shape
    return [AUDIO_BEGIN_ID, code_offset + rows, code_offset + cols,
            *(code_offset + grid.reshape(-1)).tolist(), AUDIO_END_ID]


def parse_audio_span(ids: list[int], code_offset: int) -> torch.Tensor:
    """The inverse of audio_span: token ids of one span -> codes (rows, cols) long. A malformed span raises
    DataError."""
    ids = [int(i) for i in ids]
    if len(ids) < 4 or ids[0] != AUDIO_BEGIN_ID or ids[-1] != AUDIO_END_ID:
        raise DataError(f"an audio span starts with <|audio|> ({AUDIO_BEGIN_ID}), gives rows and row length, and "
                        f"ends with <|/audio|> ({AUDIO_END_ID}); got {len(ids)} ids starting {ids[:3]}")
    rows, cols = ids[1] - code_offset, ids[2] - code_offset
    body = ids[3:-1]
    if rows < 1 or cols < 1:
        raise DataError(f"audio span grid size must be positive, got {rows}x{cols} (ids below code offset "
                        f"{code_offset})")
    if len(body) != rows * cols:
        raise DataError(f"audio span of {rows}x{cols} needs {rows * cols} codes, got {len(body)}")
    codes = torch.tensor(body, dtype=torch.long) - code_offset
    if codes.min() < 0:
        raise DataError(f"audio span holds ids below the code offset {code_offset} (text tokens inside audio)")
    return codes.view(rows, cols)
