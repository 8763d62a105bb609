"""The discrete audio tokenizer: log-mel analysis, Griffin-Lim, the FSQ conv codec, its training on real speech
(FSDD), save/load, audio spans and the CLI command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fmforge.errors import ConfigError, DataError, TokenizerError
from fmforge.modalities import (MODALITIES, AudioCodec, AudioCodecConfig, audio_span, load_audio_codec,
                                parse_audio_span, save_audio_codec, train_audio_codec)
from fmforge.modalities.audio import (LOG_FLOOR, MAX_ROWS, griffin_lim, hz_to_mel, log_mel_spectrogram, mel_filterbank,
                                      mel_to_hz, normalise, trim_trailing_silence)

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
needs_fsdd = pytest.mark.skipif(not (FSDD / "recordings").is_dir(),
                                reason=f"the Free Spoken Digit Dataset is not at {FSDD} (real speech for training)")
RATE = 16000


def fsdd_waves(every: int = 5) -> list[np.ndarray]:
    """Every `every`-th FSDD recording (sorted by name: all digits, speakers and takes), 8 kHz -> 16 kHz float32."""
    import soundfile
    import soxr

    waves = []
    for path in sorted((FSDD / "recordings").glob("*.wav"))[::every]:
        wave, rate = soundfile.read(path, dtype="float32")
        waves.append(soxr.resample(wave, rate, RATE).astype(np.float32))
    return waves


def tone(frequency: float, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    return fsdd_waves()


@pytest.fixture(scope="module")
def trained(speech):
    """A small codec (width 32) trained for 300 steps on 540 FSDD recordings, 60 held out; with its report."""
    torch.set_num_threads(1)
    config = AudioCodecConfig(width=32)
    return train_audio_codec(speech, config, steps=300, lr=4e-3, seed=0, batch_size=16, crop_seconds=0.5)


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    return AudioCodec(AudioCodecConfig(width=8)).eval()


def test_registry_names_the_audio_modality_and_its_span_tokens():
    from fmforge.modalities.stream import MAX_GRID
    from fmforge.tokenizer import SPECIAL_TOKENS

    audio = MODALITIES["audio"]
    assert audio.codec is AudioCodec and audio.content_part == "input_audio"
    assert SPECIAL_TOKENS[audio.begin_id] == audio.begin_token == "<|audio|>"
    assert SPECIAL_TOKENS[audio.end_id] == audio.end_token == "<|/audio|>"
    assert MAX_ROWS == MAX_GRID


def test_default_config_is_25_codes_per_second_from_a_1000_code_book():
    config = AudioCodecConfig()
    assert config.codebook_size == 1000 and config.codes_per_second == 25
    assert config.fmax == 8000 and config.max_seconds == pytest.approx(40.96)  # 64 rows x 16 codes x 40 ms


@pytest.mark.parametrize("settings_,message", [
    ({"levels": (8, 1)}, "levels must be integers >= 2"),
    ({"downsample": 3}, "downsample must be a power of two"),
    ({"hop_length": 500}, "hop_length <= win_length <= n_fft"),
    ({"fmax": 9000.0}, "fmax <= sample_rate / 2"),
    ({"row_length": 65}, "row_length must be between 1 and 64"),
    ({"levels": (2, 2), "row_length": 8}, "row_length must be between 1 and 3"),
    ({"n_mels": 200}, "mel bands fall between FFT bins"),
    ({"width": 0}, "must be positive"),
])
def test_bad_config_is_refused(settings_, message):
    with pytest.raises(ConfigError, match=message):
        AudioCodecConfig(**settings_)


def test_mel_filterbank_is_slaney_style():
    assert hz_to_mel(1000) == pytest.approx(15) and hz_to_mel(6400) == pytest.approx(42)  # linear, then log
    assert mel_to_hz(hz_to_mel(np.array([0.0, 300.0, 1000.0, 5000.0]))) == pytest.approx([0, 300, 1000, 5000])
    config = AudioCodecConfig()
    bank = mel_filterbank(config).numpy()
    assert bank.shape == (64, 257) and bank.min() >= 0
    assert np.all(np.diff(bank.argmax(1)) >= 0)  # band centres rise with the band index
    areas = bank.sum(1) * config.sample_rate / config.n_fft  # Slaney normalisation: unit area in Hz
    assert areas[4:-1] == pytest.approx(1, rel=0.1)


def test_log_mel_has_a_frame_per_hop_and_silence_at_the_floor():
    config = AudioCodecConfig()
    assert log_mel_spectrogram(torch.zeros(1), config).shape == (64, 1)
    silence = log_mel_spectrogram(torch.zeros(RATE), config)
    assert silence.shape == (64, 100) and torch.all(silence == LOG_FLOOR) and torch.all(normalise(silence) == -1)
    loud = normalise(log_mel_spectrogram(torch.from_numpy(tone(440, amplitude=1.0)), config))
    assert 0.5 < loud.max() < 1.5  # a full-scale tone reaches about +1 on the network's scale


@pytest.mark.parametrize("frequency", [440.0, 1000.0])
def test_griffin_lim_of_a_tone_returns_that_tone(frequency):
    config = AudioCodecConfig()
    wave = tone(frequency)
    log_mel = log_mel_spectrogram(torch.from_numpy(wave), config)
    rebuilt = griffin_lim(log_mel, config)
    assert rebuilt.dtype == np.float32 and rebuilt.shape == wave.shape
    middle = rebuilt[2000:-2000]  # away from the edges
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    dominant = spectrum.argmax() * RATE / len(middle)
    assert abs(dominant - frequency) <= config.sample_rate / config.n_fft  # within one STFT bin
    assert np.sqrt((middle ** 2).mean()) == pytest.approx(0.5 / math.sqrt(2), rel=0.1)  # the tone's loudness
    assert np.array_equal(griffin_lim(log_mel, config), rebuilt)  # seeded phase: deterministic


def expected_rows(samples: int, config: AudioCodecConfig) -> int:
    frames = math.ceil(samples / config.hop_length)
    return math.ceil(frames / (config.row_length * config.downsample))


@settings(max_examples=12, deadline=None)
@given(samples=st.integers(1, 64 * 10240))
@example(samples=1)
@example(samples=10240)  # exactly one row
@example(samples=10241)
@example(samples=64 * 10240)  # the longest span
def test_any_length_encodes_to_whole_rows_of_codes(untrained, samples):
    config = untrained.config  # one row = 16 codes x 4 frames x 160 samples = 10,240 samples (0.64 s)
    wave = (np.random.default_rng(samples).uniform(-0.5, 0.5, samples)).astype(np.float32)
    codes = untrained.encode(wave)
    assert codes.dtype == torch.long and codes.shape == (expected_rows(samples, config), 16)
    assert 1 <= codes.shape[0] <= MAX_ROWS and codes.min() >= 0 and codes.max() < 1000
    assert untrained.decode_mel(codes).shape == (64, codes.shape[0] * 16 * 4)


def test_batched_encoding_gives_each_wave_its_own_grid(untrained):
    rng = np.random.default_rng(0)
    waves = [rng.uniform(-0.3, 0.3, n).astype(np.float32) for n in (30000, 1, 10240, 16000, 10241, 5000)]
    batched = untrained.encode_batch(waves)
    assert [grid.shape[0] for grid in batched] == [3, 1, 1, 2, 2, 1]
    for wave, grid in zip(waves, batched):
        assert torch.equal(grid, untrained.encode(wave))


def test_longer_than_one_span_or_bad_waves_are_refused(untrained):
    with pytest.raises(DataError, match="longer than one audio span holds"):
        untrained.encode(np.zeros(64 * 10240 + 1, dtype=np.float32))
    bad = [(np.zeros(100, dtype=np.int16), "1-D float array"), (np.zeros((2, 100), dtype=np.float32), "1-D float"),
           (np.zeros(0, dtype=np.float32), "non-empty"), (np.full(10, np.nan, dtype=np.float32), "NaN"),
           (np.full(10, 3000.0, dtype=np.float32), "must lie in \\[-1, 1\\]"), ([0.0, 0.1], "numpy array or tensor")]
    for wave, message in bad:
        with pytest.raises(DataError, match=message):
            untrained.encode(wave)
    with pytest.raises(DataError, match="codes must lie in"):
        untrained.decode(torch.full((1, 16), 1000))
    with pytest.raises(DataError, match="long tensor"):
        untrained.decode(torch.zeros(16, dtype=torch.int32))


def test_training_input_is_checked():
    config = AudioCodecConfig(width=8)
    with pytest.raises(DataError, match="waves is empty"):
        train_audio_codec([], config)
    with pytest.raises(DataError, match="at least 2 waveforms"):
        train_audio_codec([tone(440)], config)
    with pytest.raises(DataError, match="list of 1-D float arrays"):
        train_audio_codec(np.zeros((3, 100), dtype=np.float32), config)
    with pytest.raises(DataError, match=r"waves\[1\] holds NaN"):
        train_audio_codec([tone(440), np.full(10, np.nan, dtype=np.float32)], config)
    with pytest.raises(ConfigError, match="steps and batch_size must be positive"):
        train_audio_codec([tone(440), tone(880)], config, steps=0)


@needs_fsdd
def test_short_training_on_speech_lowers_log_mel_error_and_uses_many_codes(trained):
    _, report = trained
    assert report["held_out_waves"] == 60 and report["train_waves"] == 540 and report["codes_per_second"] == 25
    assert report["untrained_mse"] > 0.2 and report["mse"] < report["untrained_mse"] / 10
    assert report["codes_used"] > 30 and report["perplexity"] > 20 and report["untrained_codes_used"] < 10
    assert report["seconds"] < 30


@needs_fsdd
def test_speech_decodes_to_speech_and_the_padding_to_silence(trained, speech):
    codec, _ = trained
    wave = speech[-1]  # one FSDD recording (seen in training or not: the test is that speech comes back)
    codes = codec.encode(wave)
    original = log_mel_spectrogram(torch.from_numpy(wave), codec.config)
    frames = original.shape[1]
    decoded_mel = codec.decode_mel(codes)
    assert decoded_mel.shape[1] == codes.numel() * 4 > frames  # the last row is part padding
    assert normalise(decoded_mel[:, frames + 4:]).mean() < -0.95  # which decodes to silence
    rebuilt = codec.decode(codes)
    spoken = len(trim_trailing_silence(wave, 160))  # the recording up to its last frame above -60 dBFS
    assert rebuilt.dtype == np.float32 and abs(len(rebuilt) - spoken) <= 4 * 160  # the padding is trimmed
    resynthesised = log_mel_spectrogram(torch.from_numpy(rebuilt[:len(wave)]), codec.config)[:, :frames]
    error = (normalise(resynthesised) - normalise(original[:, :resynthesised.shape[1]])).pow(2).mean()
    assert error < 0.05  # the spectrum comes back (silence vs speech would be ~0.3)


@pytest.mark.parametrize("grid", [(1, 16), (3, 16), (64, 4)])
def test_audio_span_round_trips(grid):
    codes = torch.arange(grid[0] * grid[1]).view(*grid) * 7 % 1000
    offset = 4096
    ids = audio_span(codes, offset)
    assert ids[0] == 9 and ids[-1] == 10 and ids[1:3] == [offset + grid[0], offset + grid[1]]
    assert len(ids) == 4 + codes.numel() and min(ids[3:-1]) >= offset
    assert torch.equal(parse_audio_span(ids, offset), codes)


def test_encoded_speech_round_trips_through_its_span(untrained):
    codes = untrained.encode(tone(300, seconds=1.5))
    ids = audio_span(codes, 5000)
    assert ids[1:3] == [5000 + 3, 5000 + 16]
    assert torch.equal(parse_audio_span(ids, 5000), codes)


def test_malformed_audio_span_is_refused():
    ids = audio_span(np.zeros((2, 2), dtype=np.int64), 100)
    with pytest.raises(DataError, match="needs 4 codes, got 3"):
        parse_audio_span(ids[:-2] + ids[-1:], 100)
    with pytest.raises(DataError, match="starts with <|audio|>"):
        parse_audio_span(ids[1:], 100)
    with pytest.raises(DataError, match="ends"):
        parse_audio_span(ids[:-1], 100)
    with pytest.raises(DataError, match="below the code offset"):
        parse_audio_span(ids[:3] + [5] + ids[4:], 100)
    with pytest.raises(DataError, match="grid size must be positive"):
        parse_audio_span([9, 100, 116, 10], 100)
    with pytest.raises(DataError, match="integer code grid"):
        audio_span(np.zeros(4, dtype=np.int64), 100)


def test_save_load_round_trips_exactly(untrained, tmp_path):
    out = save_audio_codec(untrained, tmp_path / "audio_tokenizer", {"mse": 0.1})
    assert sorted(p.name for p in out.iterdir()) == ["codec.safetensors", "config.json", "report.json"]
    saved = json.loads((out / "config.json").read_text())
    assert saved["modality"] == "audio" and saved["codebook_size"] == 1000 and saved["levels"] == [8, 5, 5, 5]
    loaded = load_audio_codec(out)
    wave = tone(523.25, seconds=0.9)
    codes = untrained.encode(wave)
    assert torch.equal(loaded.encode(wave), codes)
    assert torch.equal(loaded.decode_mel(codes), untrained.decode_mel(codes))
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed away


def test_loading_a_missing_corrupt_or_foreign_tokenizer_is_a_clear_error(untrained, tmp_path):
    from fmforge.modalities import ImageCodec, ImageCodecConfig, save_image_codec

    with pytest.raises(TokenizerError, match="is not an audio tokenizer"):
        load_audio_codec(tmp_path / "nothing")
    image = save_image_codec(ImageCodec(ImageCodecConfig(width=4)), tmp_path / "image_tokenizer")
    with pytest.raises(TokenizerError, match="not an audio tokenizer of format 1"):
        load_audio_codec(image)
    out = save_audio_codec(untrained, tmp_path / "audio_tokenizer")
    (out / "config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_audio_codec(out)
    out = save_audio_codec(untrained, tmp_path / "audio_tokenizer")
    weights = out / "codec.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TokenizerError, match="cannot load"):
        load_audio_codec(out)


@needs_fsdd
def test_cli_trains_an_audio_tokenizer_and_reports_error_and_code_usage(tmp_path, capsys):
    from fmforge.cli import main

    out = tmp_path / "audio_tokenizer"
    assert main(["tokenizer", "train", "--modality", "audio", f"fsdd:{FSDD}", "--limit", "100", "--steps", "30",
                 "--width", "16", "--levels", "5,5,5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "audio tokenizer: 125 codes (levels 5x5x5), 25 codes/s in rows of 16" in printed
    assert "log-mel MSE" in printed and "codes used" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 30 and report["train_waves"] == 90 and report["mse"] < report["untrained_mse"]
    assert load_audio_codec(out).encode(tone(440, seconds=0.7)).shape == (2, 16)


@needs_fsdd
def test_cli_adds_audio_to_a_tokenizer_that_has_images(tmp_path, capsys):
    from fmforge.checkpoint import load_tokenizer
    from fmforge.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the spoken digits zero one two three four five six seven eight nine\n" * 50)
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "text")]) == 0
    assert main(["tokenizer", "train", "--modality", "image", "digits", "--size", "16", "--limit", "100",
                 "--steps", "5", "--width", "8", "--tokenizer", str(tmp_path / "text"),
                 "--out", str(tmp_path / "image")]) == 0
    assert main(["tokenizer", "train", "--modality", "audio", f"fsdd:{FSDD}", "--limit", "40", "--steps", "5",
                 "--width", "8", "--tokenizer", str(tmp_path / "image"), "--out", str(tmp_path / "both")]) == 0
    assert "1000 image codes" in capsys.readouterr().out
    tokenizer = load_tokenizer(tmp_path / "both")
    text_vocab = tokenizer.text_vocab_size
    assert tokenizer.ranges == {"image": (text_vocab, 1000), "audio": (text_vocab + 1000, 1000)}
    assert (tmp_path / "both" / "audio_tokenizer" / "report.json").is_file()
    wave = tone(440, seconds=0.5)
    assert torch.equal(parse_audio_span(tokenizer.encode_audio(wave), text_vocab + 1000),
                       tokenizer.codecs["audio"].encode(wave))


@pytest.mark.parametrize("flags,message", [
    (["--modality", "audio", "SOURCE", "--size", "16"], "--size is for --modality image"),
    (["--modality", "image", "digits", "--row-length", "8"], "--row-length is for --modality audio"),
    (["--modality", "audio", "SOURCE", "--downsample", "3"], "downsample must be a power of two"),
    (["--modality", "audio", "SOURCE", "--row-length", "65"], "row_length must be between 1 and 64"),
    (["--modality", "audio", "SOURCE", "--steps", "0"], "--steps must be at least 1"),
    (["--modality", "audio", "SOURCE", "--vocab-size", "512"], "--vocab-size is for --modality text"),
    (["--modality", "audio", "EMPTY"], "no audio files"),
])
def test_bad_audio_tokenizer_flags_or_sources_give_one_error_line(tmp_path, capsys, flags, message):
    from fmforge.cli import main

    (tmp_path / "empty").mkdir()
    flags = [str(FSDD) if flag == "SOURCE" else str(tmp_path / "empty") if flag == "EMPTY" else flag
             for flag in flags]
    capsys.readouterr()
    assert main(["tokenizer", "train", *flags, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()
