"""Audio data (fmforge/data/audio.py): resampling and downmix keep what a listener hears, files and bytes round-trip,
caps refuse an input before decoding it, number words, FSDD's splits, espeak's held-out voices, user folders and
transcripts JSONL, and a one-line DataError for every bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from fmforge.data import audio
from fmforge.data.audio import (FSDD_VAL_TAKES, HELD_OUT_VOICES, NUMBER_VOCABULARY, SAMPLE_RATE, TRAIN_VOICES,
                                decode_audio_bytes, encode_pcm16, encode_wav, load_audio, number_words, read_audio,
                                resample, sentence_vocabulary, to_mono, write_audio)
from fmforge.errors import ConfigError, DataError

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"  # beside the checkout; never used by fmforge
needs_fsdd = pytest.mark.skipif(not (FSDD / "recordings").is_dir(), reason=f"the FSDD recordings are not at {FSDD}")


def tone(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def one_line_error(call, *args, **kwargs) -> str:
    """The message of the DataError that call raises, checked to be one line."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def wav_bytes(wave: np.ndarray, rate: int, subtype: str = "PCM_16", format: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format=format, subtype=subtype)
    return buffer.getvalue()


# --- waveforms ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_keeps_a_tones_frequency_and_duration(tmp_path, rate):
    path = tmp_path / f"tone_{rate}.wav"
    soundfile.write(path, tone(440, 1.0, rate), rate)
    wave = read_audio(path)  # to SAMPLE_RATE
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == SAMPLE_RATE  # 1 second stays 1 second
    assert abs(peak_frequency(wave, SAMPLE_RATE) - 440) <= 1.0  # within one 1 Hz bin
    assert 0.45 < np.abs(wave[1000:-1000]).max() < 0.55  # the amplitude too
    assert abs(peak_frequency(resample(wave, SAMPLE_RATE, 24000), 24000) - 440) <= 1.0


def test_resampling_removes_what_the_new_rate_cannot_hold():
    high = tone(6000, 1.0, 16000)  # above 8 kHz's Nyquist frequency: must vanish, not fold down to 2 kHz
    assert np.sqrt(np.mean(resample(high, 16000, 8000)[400:-400] ** 2)) < 0.01


def test_stereo_is_averaged_to_mono(tmp_path):
    left = tone(440, 0.5, 16000)
    soundfile.write(tmp_path / "left.wav", np.stack([left, np.zeros_like(left)], axis=1), 16000)
    mono = read_audio(tmp_path / "left.wav")
    assert abs(np.abs(mono).max() - 0.25) < 0.01  # half the tone's amplitude
    soundfile.write(tmp_path / "opposite.flac", np.stack([left, -left], axis=1), 16000)
    assert np.abs(read_audio(tmp_path / "opposite.flac")).max() < 1e-3  # opposite phases cancel
    assert np.array_equal(to_mono(np.stack([left, left], axis=1)), left) and to_mono(left) is not None


@pytest.mark.parametrize("suffix,tolerance", [(".wav", 1e-4), (".flac", 1e-4), (".ogg", None), (".mp3", None)])
def test_write_then_read_round_trips(tmp_path, suffix, tolerance):
    wave = tone(440, 1.0, SAMPLE_RATE)
    path = tmp_path / f"tone{suffix}"
    write_audio(path, wave, SAMPLE_RATE)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # atomic: no temporary file left beside it
    back = read_audio(path)
    assert abs(len(back) - len(wave)) <= 0.06 * SAMPLE_RATE  # lossy codecs pad a few frames
    assert abs(peak_frequency(back, SAMPLE_RATE) - 440) <= 1.0
    if tolerance:  # lossless: the same samples to 16-bit precision
        assert len(back) == len(wave) and np.abs(back - wave).max() < tolerance
    else:
        assert 0.4 < np.abs(back).max() < 0.6


def test_write_audio_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(ConfigError, match=r"\.aac.*\.wav"):
        write_audio(tmp_path / "x.aac", tone(440, 0.1, 16000), 16000)


def test_wav_and_pcm16_encodings_agree_and_decode_back():
    wave = np.concatenate([tone(300, 0.25, 16000), [1.5, -1.5]]).astype(np.float32)  # out-of-range samples clip
    data = encode_wav(wave, 16000)
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("WAV", "PCM_16", 16000, len(wave))
    pcm = np.frombuffer(encode_pcm16(wave), dtype="<i2")
    assert np.array_equal(pcm, soundfile.read(io.BytesIO(data), dtype="int16")[0])
    assert pcm[-2:].tolist() == [32767, -32768]
    assert np.abs(pcm[:-2] / 32768 - wave[:-2]).max() <= 0.5 / 32768  # rounded, not floored
    back = decode_audio_bytes(data, rate=16000, format="wav")
    assert np.abs(back - np.clip(wave, -1, 1)).max() < 1e-4
    assert len(decode_audio_bytes(data, rate=8000)) == len(wave) // 2


def test_byte_cap_is_checked_before_anything_is_decoded(monkeypatch):
    data = encode_wav(tone(440, 1.0, 16000), 16000)

    def no_opening(*args, **kwargs):
        raise AssertionError("soundfile opened bytes over the cap")

    monkeypatch.setattr(soundfile, "SoundFile", no_opening)
    message = one_line_error(decode_audio_bytes, data, where="input_audio", max_bytes=1000)
    assert message == f"input_audio: {len(data):,} bytes, over the 1,000-byte limit"


def test_duration_cap_is_read_from_the_header_before_any_frame(monkeypatch, tmp_path):
    data = encode_wav(tone(440, 3.0, 16000), 16000)
    (tmp_path / "long.wav").write_bytes(data)

    def no_decoding(*args, **kwargs):
        raise AssertionError("frames were decoded for audio over the cap")

    monkeypatch.setattr(soundfile.SoundFile, "read", no_decoding)
    assert one_line_error(decode_audio_bytes, data, max_seconds=2) == "audio: 3.0 seconds, over the 2-second limit"
    message = one_line_error(read_audio, tmp_path / "long.wav", max_seconds=2.5)
    assert message.endswith("long.wav: 3.0 seconds, over the 2.5-second limit")
    monkeypatch.undo()
    assert len(decode_audio_bytes(data, max_seconds=3.5)) == 3 * 16000


def test_a_header_that_understates_the_length_cannot_make_it_decode_more():
    class Lying:  # a container whose header says 1 s (an MP3's frame count is an estimate) but holds 3 s
        frames, samplerate = 16000, 16000

        def read(self, frames, dtype, always_2d):
            return tone(440, 3.0, 16000)[:frames, None]

    assert len(audio._decode(Lying(), 16000, "lying.mp3", max_seconds=5)) == 3 * 16000
    assert one_line_error(audio._decode, Lying(), 16000, "lying.mp3", max_seconds=2) == (
        "lying.mp3: over the 2-second limit")  # refused after reading at most 2 s and one frame
    data = bytearray(encode_wav(tone(440, 3.0, 16000), 16000))
    data[40:44] = (2 * 16000).to_bytes(4, "little")  # a WAV data chunk that claims 1 s: libsndfile reads 1 s
    assert len(decode_audio_bytes(bytes(data), max_seconds=2)) == 16000


def test_corrupt_wrong_format_empty_and_nan_audio_are_refused(tmp_path):
    assert "not audio soundfile can read" in one_line_error(decode_audio_bytes, b"RIFF\x00\x00not a wave" * 20)
    mp3 = wav_bytes(tone(440, 0.5, 16000), 16000, "MPEG_LAYER_III", "MP3")
    assert len(decode_audio_bytes(mp3, format="mp3")) > 7000
    assert one_line_error(decode_audio_bytes, mp3, format="wav", where="part 'file'") == (
        "part 'file': declared wav but the bytes are MP3 audio")
    message = one_line_error(decode_audio_bytes, mp3, format="aac")
    assert "unsupported audio format 'aac'" in message and "wav, flac, mp3, ogg" in message
    assert one_line_error(decode_audio_bytes, b"") == "audio: empty (0 bytes)"
    assert "0 frames" in one_line_error(decode_audio_bytes, wav_bytes(np.zeros(0, np.float32), 16000))
    nan = tone(440, 0.1, 16000)
    nan[100] = np.nan
    assert "NaN" in one_line_error(decode_audio_bytes, wav_bytes(nan, 16000, "FLOAT"))
    (tmp_path / "empty.wav").write_bytes(b"")
    assert one_line_error(read_audio, tmp_path / "empty.wav").endswith("empty.wav: empty file (0 bytes)")
    assert one_line_error(read_audio, tmp_path / "gone.wav").endswith("gone.wav: no such audio file")
    (tmp_path / "text.wav").write_text("hello, not audio\n" * 10)
    assert "not audio soundfile can read" in one_line_error(read_audio, tmp_path / "text.wav")


# --- number words ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,words", [
    (0, "zero"), (7, "seven"), (10, "ten"), (15, "fifteen"), (20, "twenty"), (42, "forty two"),
    (100, "one hundred"), (101, "one hundred one"), (342, "three hundred forty two"),
    (999, "nine hundred ninety nine"), (1000, "one thousand"),
    (999_999, "nine hundred ninety nine thousand nine hundred ninety nine"),
    (20_019, "twenty thousand nineteen"), (700_000, "seven hundred thousand")])
def test_number_words(n, words):
    assert number_words(n) == words


@pytest.mark.parametrize("bad", [-1, 1_000_000, 2.0, True, "7"])
def test_number_words_refuses_what_it_cannot_say(bad):
    with pytest.raises(ValueError):
        number_words(bad)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 999_999))
def test_number_words_are_plain_lowercase_words_of_a_fixed_vocabulary(n):
    words = number_words(n)
    assert words and words == words.strip() and "  " not in words
    assert set(words.split()) <= NUMBER_VOCABULARY
    assert ("zero" in words.split()) == (n == 0)


def test_number_words_are_distinct_for_every_number():
    assert len({number_words(n) for n in range(0, 1_000_000, 7)}) == len(range(0, 1_000_000, 7))


# --- FSDD -----------------------------------------------------------------------------------------------------


def keys(audio_set) -> set[tuple]:
    return {(r["speaker"], r["digit"], r["take"]) for r in audio_set.records}


@needs_fsdd
def test_fsdd_keeps_the_datasets_own_split():
    splits = {split: load_audio(f"fsdd:{FSDD}", split) for split in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [2400, 300, 300]
    train, val, test = (keys(splits[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test) and len(train | val | test) == 3000
    assert {take for _, _, take in test} == set(range(5))
    assert {take for _, _, take in val} == set(FSDD_VAL_TAKES) and min(FSDD_VAL_TAKES) >= 5  # from train's takes
    assert sorted(FSDD_VAL_TAKES) == sorted(int(t) for t in np.random.default_rng(audio.FSDD_SPLIT_SEED).choice(
        range(5, 50), 5, replace=False))
    sample = splits["test"]
    assert sample.rate == SAMPLE_RATE and all(w.dtype == np.float32 for w in sample.waves)
    assert all(r["text"] == audio.DIGIT_WORDS[r["digit"]] and r["source"] == "fsdd" for r in sample.records)
    seconds = np.array([len(w) / SAMPLE_RATE for w in sample.waves])
    assert 0.1 < seconds.min() and seconds.max() < 3 and 0.2 < np.median(seconds) < 0.8
    assert all(np.abs(w).max() > 0.01 for w in sample.waves)  # some takes are quiet (theo's peak at 0.02), none silent
    first = load_audio(f"fsdd:{FSDD}", "test", limit=30, rate=8000)  # a limit keeps a spread of speakers, digits
    assert first.records == sample.records[:30] and len({r["speaker"] for r in first.records}) >= 4
    assert abs(len(first.waves[0]) * 2 - len(sample.waves[0])) <= 2


@needs_fsdd
def test_fsdd_leave_one_speaker_out():
    test = load_audio(f"fsdd:{FSDD}@theo", "test")
    train = load_audio(f"fsdd:{FSDD}@theo", "train", rate=8000)
    val = load_audio(f"fsdd:{FSDD}@theo", "val", rate=8000)
    assert len(test) == 500 and {r["speaker"] for r in test.records} == {"theo"}
    assert (len(train), len(val)) == (2250, 250)
    assert "theo" not in {r["speaker"] for r in train.records + val.records}
    assert len({r["speaker"] for r in train.records}) == 5 and not keys(train) & keys(val)
    message = one_line_error(load_audio, f"fsdd:{FSDD}@zoe", "test")
    assert "unknown speaker 'zoe'" in message and "george, jackson, lucas, nicolas, theo, yweweler" in message


def test_fsdd_folder_errors(tmp_path):
    assert "no such folder" in one_line_error(load_audio, f"fsdd:{tmp_path / 'nowhere'}")
    assert "no FSDD recordings" in one_line_error(load_audio, f"fsdd:{tmp_path}")
    soundfile.write(tmp_path / "hello.wav", tone(440, 0.2, 8000), 8000)
    assert "not an FSDD recording name" in one_line_error(load_audio, f"fsdd:{tmp_path}")


# --- espeak ---------------------------------------------------------------------------------------------------


def test_espeak_speaks_each_kind_at_16_khz():
    for kind, shortest, longest in (("digits", 0.15, 1.5), ("numbers", 0.15, 3.5), ("sentences", 0.8, 5.0)):
        spoken = load_audio(f"espeak:{kind}", "train", limit=12)
        assert len(spoken) == 12 and spoken.rate == SAMPLE_RATE and spoken.name == f"espeak:{kind}:train"
        for wave, record in zip(spoken.waves, spoken.records):
            assert wave.dtype == np.float32 and shortest < len(wave) / SAMPLE_RATE < longest, record
            assert np.sqrt(np.mean(wave ** 2)) > 0.008 and np.abs(wave).max() <= 1.0, record  # klatt is the quietest
            assert record["voice"] in TRAIN_VOICES and 130 <= record["words_per_minute"] <= 200
            assert 30 <= record["pitch"] <= 70 and record["source"] == f"espeak:{kind}"
        if kind == "numbers":
            assert all(r["text"] == number_words(r["number"]) for r in spoken.records)
        if kind == "digits":
            assert all(r["text"] == audio.DIGIT_WORDS[r["digit"]] for r in spoken.records)


def test_espeak_numbers_take_longer_to_say_when_they_have_more_words():
    spoken = load_audio("espeak:numbers", "val", limit=40)
    words = [len(r["text"].split()) * 60 / r["words_per_minute"] for r in spoken.records]
    seconds = [len(w) / SAMPLE_RATE for w in spoken.waves]
    assert np.corrcoef(words, seconds)[0, 1] > 0.7  # the audio says the transcript, not something else


def test_espeak_is_deterministic_and_a_limit_keeps_a_prefix():
    first = load_audio("espeak:digits", "train", limit=8)
    again = load_audio("espeak:digits", "train", limit=12)
    assert again.records[:8] == first.records
    assert all(np.array_equal(a, b) for a, b in zip(first.waves, again.waves))  # sample for sample
    other = load_audio("espeak:digits", "val", limit=8)
    assert [r["voice"] for r in other.records] != [r["voice"] for r in first.records]


def test_espeak_test_split_uses_only_held_out_voices():
    assert len(HELD_OUT_VOICES) >= 2 and not set(HELD_OUT_VOICES) & set(TRAIN_VOICES)
    held_accents = {v.partition("+")[0] for v in HELD_OUT_VOICES}
    held_variants = {v.partition("+")[2] for v in HELD_OUT_VOICES}
    assert not held_accents & {v.partition("+")[0] for v in TRAIN_VOICES}  # a new accent and a new variant
    assert not held_variants & {v.partition("+")[2] for v in TRAIN_VOICES}
    test = load_audio("espeak:numbers", "test", limit=40)
    assert {r["voice"] for r in test.records} <= set(HELD_OUT_VOICES)
    assert len({r["voice"] for r in test.records}) == len(HELD_OUT_VOICES)
    for split in ("train", "val"):
        assert {r["voice"] for r in load_audio("espeak:numbers", split, limit=40).records} <= set(TRAIN_VOICES)


def test_espeak_every_voice_exists_in_the_bundled_data():
    with audio.Espeak() as engine:
        assert engine.rate == 22050
        for voice in TRAIN_VOICES + HELD_OUT_VOICES:
            assert len(engine.say("one", voice)) > 0.1 * engine.rate, voice
        with pytest.raises(DataError, match="variant 'zz'"):
            engine.say("one", "en+zz")
        with pytest.raises(DataError, match="'xx-nowhere'"):
            engine.say("one", "xx-nowhere")


def test_espeak_sentences_come_from_a_small_fixed_vocabulary():
    vocabulary = sentence_vocabulary()
    assert 100 <= len(vocabulary) <= 300
    rng = np.random.default_rng(0)
    sentences = [audio.random_sentence(rng) for _ in range(2000)]
    assert all(set(s.split()) <= vocabulary and s == s.lower() for s in sentences)
    assert len(set(sentences)) > 1900 and len({w for s in sentences for w in s.split()}) > 0.9 * len(vocabulary)


def test_espeak_counts_and_bad_names():
    assert [len(load_audio("espeak:digits:20", split)) for split in ("train", "val", "test")] == [20, 2, 2]
    assert "espeak:numbers, espeak:digits or espeak:sentences" in one_line_error(load_audio, "espeak:letters")
    assert "integer from 1 to 100,000" in one_line_error(load_audio, "espeak:digits:lots")


def test_espeak_at_a_voice_says_the_same_texts_in_that_one_voice_in_every_split():
    for split in ("train", "test"):
        many = load_audio("espeak:numbers:50", split, limit=6)
        one = load_audio("espeak:numbers:50@en-us", split, limit=6)
        assert [r["text"] for r in one.records] == [r["text"] for r in many.records]
        assert [(r["words_per_minute"], r["pitch"]) for r in one.records] == \
            [(r["words_per_minute"], r["pitch"]) for r in many.records]  # speed and pitch still seeded
        assert {r["voice"] for r in one.records} == {"en-us"} and one.records[0]["source"] == "espeak:numbers@en-us"
    again = load_audio("espeak:numbers:50@en-us", "test", limit=6)
    assert all(np.array_equal(a, b) for a, b in zip(one.waves, again.waves))  # deterministic
    assert "@VOICE" in one_line_error(load_audio, "espeak:digits@EN US")
    assert "'xx-nowhere'" in one_line_error(load_audio, "espeak:digits@xx-nowhere", limit=1)


def test_espeak_without_the_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails as if it were not installed
    assert "pip install espeakng-loader" in one_line_error(load_audio, "espeak:digits", limit=1)


# --- user audio -------------------------------------------------------------------------------------------------


def test_user_transcripts_jsonl(tmp_path):
    (tmp_path / "clips").mkdir()
    lines = []
    for i in range(40):
        suffix = (".wav", ".flac")[i % 2]
        soundfile.write(tmp_path / "clips" / f"{i}{suffix}", tone(200 + 10 * i, 0.2, 22050), 22050)
        lines.append(json.dumps({"audio": f"clips/{i}{suffix}", "text": f"clip {i}", "speaker": f"s{i % 3}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    splits = {split: load_audio(str(tmp_path / "data.jsonl"), split) for split in ("train", "val", "test")}
    paths = [{r["path"] for r in splits[s].records} for s in ("train", "val", "test")]
    assert sum(map(len, paths)) == 40 and len(set.union(*paths)) == 40 and len(paths[0]) > 25
    record, wave = splits["train"].records[0], splits["train"].waves[0]
    i = int(record["text"].split()[1])
    assert record["path"].startswith(f"clips/{i}.") and record["speaker"] == f"s{i % 3}"
    assert len(wave) == int(0.2 * SAMPLE_RATE) and abs(peak_frequency(wave, SAMPLE_RATE) - (200 + 10 * i)) <= 5
    assert all(r["text"] == f"clip {r['path'].split('/')[1].split('.')[0]}" for r in splits["val"].records)


def test_bad_transcripts_jsonl_fail_with_the_line(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(440, 0.2, 16000), 16000)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"audio": "a.wav", "text": "fine"}\n{"audio": "a.wav", "text": 3}\n')
    assert one_line_error(load_audio, str(jsonl)).startswith(f"{jsonl}:2: expected")
    jsonl.write_text('{"audio": "a.wav", "text": "fine"}\n{"audio": "a.wav"\n')
    assert one_line_error(load_audio, str(jsonl)).startswith(f"{jsonl}:2: not valid JSON")
    jsonl.write_text('{"audio": "a.wav", "text": "fine"}\n{"audio": "missing.wav", "text": "gone"}\n')
    assert one_line_error(load_audio, str(jsonl)) == f"{tmp_path / 'missing.wav'} ({jsonl}:2): no such audio file"
    (tmp_path / "junk.wav").write_bytes(b"\x00\x01" * 500)
    jsonl.write_text('{"audio": "junk.wav", "text": "noise"}\n')
    assert "junk.wav" in one_line_error(load_audio, str(jsonl))
    jsonl.write_text("\n\n")
    assert "no lines" in one_line_error(load_audio, str(jsonl))


def test_user_class_folders(tmp_path):
    for label in ("yes", "no"):
        (tmp_path / label).mkdir()
        for i in range(15):
            soundfile.write(tmp_path / label / f"{i}.ogg", tone(300, 0.3, 16000), 16000, format="OGG")
    (tmp_path / "yes" / "notes.txt").write_text("ignored")
    (tmp_path / "loose.wav").write_bytes(b"ignored: not in a class folder")
    records = [r for split in ("train", "val", "test") for r in load_audio(str(tmp_path), split).records]
    assert len(records) == 30 and {r["text"] for r in records} == {"yes", "no"}
    assert all(r["text"] == r["label"] == r["path"].split("/")[0] for r in records)
    (tmp_path / "no" / "3.ogg").write_bytes(b"truncated")
    assert one_line_error(load_audio, str(tmp_path)).startswith(f"{tmp_path / 'no' / '3.ogg'}: not audio")
    empty = tmp_path / "empty"
    (empty / "yes").mkdir(parents=True)
    assert "no audio files" in one_line_error(load_audio, str(empty))


def test_unknown_sources_and_bad_arguments(tmp_path):
    message = one_line_error(load_audio, "librispeech")
    assert "fsdd:DIR" in message and "espeak:numbers" in message and ".jsonl" in message
    (tmp_path / "notes.txt").write_text("x")
    assert "not an audio source" in one_line_error(load_audio, str(tmp_path / "notes.txt"))
    for bad in ({"split": "dev"}, {"limit": 0}, {"rate": 100}):
        with pytest.raises(ConfigError):
            load_audio("espeak:digits", **bad)
