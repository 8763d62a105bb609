"""Audio data: reading, resampling and writing waveforms, and built-in and user speech sets with transcripts.

Every waveform here is a 1-D float32 array in [-1, 1], mono, at a stated sample rate (SAMPLE_RATE = 16,000 Hz
unless asked otherwise): files of any rate and channel count are averaged to mono and resampled with soxr.
`read_audio` and `decode_audio_bytes` check what they can before decoding a frame (the file or the bytes exist
and are not over the caps, soundfile recognises the format, the header's duration is at most `max_seconds`) and
raise `DataError` with one line naming the input for anything wrong: missing, empty, corrupt, too long, NaN or
infinite samples.

`load_audio(source, split, limit, rate)` returns an `AudioSet`: `waves` (one array per utterance), `rate` and
`records`, one dict per utterance with at least "text" (the transcript) and "source". Sources:

    fsdd:DIR     the Free Spoken Digit Dataset (Jackson et al., CC BY-SA 4.0): DIR/recordings/{digit}_{speaker}_
                 {take}.wav (or the files in DIR itself), 6 speakers x 10 digits x 50 takes, 8 kHz. Records {"text":
                 the digit as a word ("seven"), "digit", "speaker", "take", "path"} (+ "gender", "accent" from
                 DIR/metadata.py). Split: the dataset's own, takes 0-4 = test (300); val = takes FSDD_VAL_TAKES (5
                 takes drawn once from 5-49 with numpy seed FSDD_SPLIT_SEED: 300); train = the other 40 takes (2,400).
    fsdd:DIR@SPEAKER
                 leave one speaker out: test = all of SPEAKER's 500 recordings; val = the other speakers' takes
                 FSDD_VAL_TAKES (250); train = the rest of the other speakers' (2,250). Val speakers are seen in
                 training, so val is optimistic about the unseen-speaker test.
    espeak:numbers    0-999 spoken from their words (`number_words`): 1, 2 or 3 digits with equal chance, then a
                      uniform number of that many digits. Records {"text", "number"}. 5,000 / 500 / 500.
    espeak:digits     0-9 as words, like FSDD. Records {"text", "digit"}. 3,000 / 300 / 300.
    espeak:sentences  short sentences from a fixed grammar (SENTENCE_TEMPLATES over a ~200-word vocabulary,
                      `sentence_vocabulary()`), e.g. "the red ball is behind the small box". 5,000 / 500 / 500.
    espeak:KIND:N     the same with N utterances in train and max(1, N // 10) in val and test (N <= 100,000).
    espeak:KIND[:N]@VOICE
                      the same texts, speeds and pitches, every utterance of every split said by the one espeak
                      VOICE ("en-us", "en-gb-x-rp+f3"): one way to say a text, e.g. for a speak specialist whose
                      replies a listener should hear in one voice. Its test split is then no new-voice test.

espeak utterances are synthesised on demand by the libespeak-ng that ships in the espeakng-loader wheel (about
1000x faster than real time; nothing is cached). Each gets a seeded random voice (an English accent plus a voice
variant), speed 130-200 words per minute and pitch 30-70; its record adds {"voice", "words_per_minute",
"pitch"}. Train and val use TRAIN_VOICES (6 accents x 12 variants); the test split uses only HELD_OUT_VOICES
(accents en-us-nyc and en-gb-x-gbcwmd, variants m4 and f2, none of them ever heard in train or val): test
measures generalisation to new voices. Utterance i's text and voice come from numpy.random.default_rng([
ESPEAK_SEED, kind, split, i]), so they do not depend on N or `limit`. libespeak-ng keeps state between
utterances in static variables (the same text and voice twice in one process give different samples), so each
call loads a fresh private copy of the library, synthesises the split from its first utterance and seeds the
random generators its noise draws on (its own and the C library's rand()) before each: a split is the same,
sample for sample, on every call, and `limit` keeps a prefix of it.

User sources (resampled to `rate`):

    DIR        one sub-folder per class; every .wav/.flac/.ogg/.mp3 file below it is an utterance with {"text":
               sub-folder name, "label": sub-folder name, "path": path relative to DIR}. Hidden files, files
               directly in DIR and files with other suffixes are ignored.
    X.jsonl    one {"audio": path, "text": transcript} per line, paths relative to the JSONL file; records {"text",
               "path": as written} plus the line's other string and number fields (e.g. "speaker").

User audio is split 80/10/10 by a seeded hash of its path (`user_split`), so adding files never moves a file
between splits. Every listed file is checked before any is decoded (exists, at most MAX_AUDIO_BYTES, a format
soundfile reads, at most MAX_AUDIO_SECONDS by its header); any bad file raises `DataError` with one line naming
it, and nothing is returned. A bad split, limit or rate raises `ConfigError`.

Val is always drawn from the training side, never from test. The test split is for the final report only: never
use it to choose anything.
"""

from __future__ import annotations

import ast
import ctypes
import hashlib
import io
import json
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmforge.errors import ConfigError, DataError
from fmforge.fileio import atomic_write_bytes

SAMPLE_RATE = 16_000  # the default target rate (Hz)
MAX_AUDIO_SECONDS = 30.0  # the default cap on one input's duration, read from its header
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # the default cap on one input's size (OpenAI's upload limit)
MAX_RATE = 192_000
SPLITS = ("train", "val", "test")
RESAMPLE_QUALITY = "HQ"  # soxr's high quality: 0.1 dB passband ripple, far below what a codec resolves

# format name -> what soundfile calls the container (input_audio and multipart parts name their format)
AUDIO_FORMATS = {"wav": ("WAV", "WAVEX", "RF64"), "flac": ("FLAC",), "mp3": ("MP3",), "ogg": ("OGG",)}
WRITE_SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")

# FSDD
FSDD_SPLIT_SEED = 14
FSDD_TEST_TAKES = range(0, 5)  # the dataset's own test split
FSDD_VAL_TAKES = (8, 11, 20, 33, 39)  # sorted(np.random.default_rng(FSDD_SPLIT_SEED).choice(range(5, 50), 5, False))
FSDD_NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")

# user data
USER_SPLIT_SEED = "fmforge-audio-v1"  # the hash behind user data's splits

# espeak
ESPEAK_SEED = 1401
ESPEAK_KINDS = ("numbers", "digits", "sentences")
ESPEAK_COUNTS = {"numbers": 5_000, "digits": 3_000, "sentences": 5_000}  # train; val and test get a tenth each
MAX_ESPEAK_COUNT = 100_000
_ESPEAK_LOCK = threading.Lock()  # one synthesis at a time: the C library's rand() is shared by the whole process
TRAIN_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029")
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m5", "m6", "m7", "f1", "f3", "f4", "f5", "klatt")  # "": the accent's own
HELD_OUT_ACCENTS = ("en-us-nyc", "en-gb-x-gbcwmd")  # New York City; West Midlands
HELD_OUT_VARIANTS = ("m4", "f2")
TRAIN_VOICES = tuple(accent + (f"+{variant}" if variant else "") for accent in TRAIN_ACCENTS
                     for variant in TRAIN_VARIANTS)
HELD_OUT_VOICES = tuple(f"{accent}+{variant}" for accent in HELD_OUT_ACCENTS for variant in HELD_OUT_VARIANTS)
WORDS_PER_MINUTE = (130, 200)  # inclusive range of espeak's speed
PITCH = (30, 70)  # inclusive range of espeak's pitch (0-100, 50 = the voice's own)

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
DIGIT_WORDS = tuple(ONES[:10])

# espeak:sentences: each template's {slot} is filled from SENTENCE_WORDS[slot]
SENTENCE_WORDS = {
    "colour": "red green blue yellow black white brown orange purple pink grey silver".split(),
    "size": "small big old new little heavy tiny large round soft clean dirty".split(),
    "object": "ball box cup book chair table lamp key coat hat bag bottle pen plate clock phone shoe bowl spoon "
              "pillow basket candle mirror ladder".split(),
    "relation": ["on", "under", "next to", "behind", "in front of", "near", "inside", "beside", "above", "below",
                 "to the left of", "to the right of"],
    "name": "anna tom maria peter lucy david emma james sara john kate mark nina paul rosa sam".split(),
    "took": "took found bought lost saw dropped washed painted moved opened carried cleaned sold needed".split(),
    "count": "two three four five six seven eight nine ten eleven twelve".split(),
    "put": "put place move leave hide keep".split(),
    "place": "kitchen garden station market school office park library river beach city house shop museum bank "
             "farm harbour bridge hotel airport".split(),
    "go": "walk drive run go travel cycle".split(),
    "when": ["today", "tomorrow", "tonight", "later", "soon", "on monday", "on tuesday", "on wednesday",
             "on thursday", "on friday", "on saturday", "on sunday", "next week", "this morning", "this evening"],
    "weather": "sunny cold warm windy cloudy rainy dry wet hot cool foggy quiet busy".split(),
}
SENTENCE_TEMPLATES = (
    "the {colour} {object} is {relation} the {size} {object}",
    "the {size} {colour} {object} is {relation} the {object}",
    "{name} {took} {count} {colour} {objects}",
    "please {put} the {colour} {object} {relation} the {object}",
    "{when} {name} will {go} to the {place}",
    "{name} and {name} are at the {place}",
    "it is {weather} at the {place} {when}",
    "where is the {size} {colour} {object}",
)
PLURALS = {"box": "boxes"}  # objects whose plural is not object + "s"


@dataclass
class AudioSet:
    """A split of one source: one float32 mono waveform per utterance at `rate` Hz, and one record per utterance."""

    waves: list[np.ndarray]  # each (samples,) float32 in [-1, 1]
    rate: int  # Hz
    records: list[dict]  # each has "text", the transcript
    name: str = ""  # "source:split", e.g. "espeak:digits:test"

    def __len__(self) -> int:
        return len(self.records)


def load_audio(source: str, split: str = "train", limit: int | None = None, rate: int = SAMPLE_RATE) -> AudioSet:
    """One split of an audio source ("fsdd:DIR", "fsdd:DIR@SPEAKER", "espeak:KIND[:N]", a class-folder path or a
    transcripts .jsonl path), every utterance resampled to `rate` Hz. `limit` keeps the split's first `limit`
    utterances (in its fixed order)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use train, val or test")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    if not isinstance(rate, int) or isinstance(rate, bool) or not 1_000 <= rate <= MAX_RATE:
        raise ConfigError(f"rate must be an integer number of Hz from 1000 to {MAX_RATE}, got {rate!r}")
    if source.startswith("fsdd:"):
        waves, records = _fsdd(source.removeprefix("fsdd:"), split, limit, rate)
    elif source.startswith("espeak:"):
        waves, records = _espeak(source.removeprefix("espeak:"), split, limit, rate)
    else:
        waves, records = _user_audio(source, split, limit, rate)
    if not records:
        raise DataError(f"{source}: no audio in the {split} split (user audio is split 80/10/10 by a hash of its "
                        "path; add more files)")
    for record in records:
        record.setdefault("source", source)
    return AudioSet(waves=waves, rate=rate, records=records, name=f"{source}:{split}")


# --- waveforms: read, decode, resample, write ----------------------------------------------------------------


def read_audio(path: str | Path, rate: int = SAMPLE_RATE, where: str | None = None,
               max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """An audio file soundfile reads (WAV, FLAC, OGG, MP3, ...) -> (samples,) float32 mono in [-1, 1] at `rate`
    Hz. The duration in its header is checked against `max_seconds` before any frame is decoded."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such audio file")
    if path.stat().st_size == 0:
        raise DataError(f"{where}: empty file (0 bytes)")
    with _open(path, where) as file:
        return _decode(file, rate, where, max_seconds)


def decode_audio_bytes(data: bytes, rate: int = SAMPLE_RATE, where: str = "audio", format: str | None = None,
                       max_bytes: int = MAX_AUDIO_BYTES, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
    """Encoded audio bytes -> (samples,) float32 mono in [-1, 1] at `rate` Hz. The byte size is checked before
    anything is read, then the container against `format` (a name in AUDIO_FORMATS, when given) and the duration in
    the header against `max_seconds`, all before any frame is decoded."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{where}: expected audio bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise DataError(f"{where}: {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    if len(data) == 0:
        raise DataError(f"{where}: empty (0 bytes)")
    if format is not None and str(format).lower() not in AUDIO_FORMATS:
        raise DataError(f"{where}: unsupported audio format {format!r}; use one of {', '.join(AUDIO_FORMATS)}")
    with _open(io.BytesIO(bytes(data)), where) as file:
        if format is not None and file.format not in AUDIO_FORMATS[format.lower()]:
            raise DataError(f"{where}: declared {format.lower()} but the bytes are {file.format} audio")
        return _decode(file, rate, where, max_seconds)


def _open(source, where: str):
    """A soundfile.SoundFile on a path or file object; its header is read, no frame yet."""
    import soundfile

    try:
        return soundfile.SoundFile(source)
    except soundfile.LibsndfileError as error:
        raise DataError(f"{where}: not audio soundfile can read ({error.error_string}); use "
                        f"{', '.join(AUDIO_FORMATS)}") from None
    except (RuntimeError, ValueError, TypeError) as error:
        raise DataError(f"{where}: not audio soundfile can read ({error})") from None


def _decode(file, rate: int, where: str, max_seconds: float) -> np.ndarray:
    """The frames of an open SoundFile, checked (duration from the header first, then every sample finite),
    averaged to mono and resampled to `rate`."""
    if file.frames == 0:
        raise DataError(f"{where}: no audio in the file (0 frames)")
    seconds = file.frames / file.samplerate
    if seconds > max_seconds:
        raise DataError(f"{where}: {seconds:.1f} seconds, over the {max_seconds:g}-second limit")
    most = int(max_seconds * file.samplerate) + 1  # a header that understates the length cannot make us read more
    try:
        frames = file.read(frames=most, dtype="float32", always_2d=True)  # (samples, channels)
    except (RuntimeError, ValueError) as error:
        raise DataError(f"{where}: cannot decode the audio ({error})") from None
    if len(frames) == 0:
        raise DataError(f"{where}: no audio in the file (0 frames decoded)")
    if len(frames) >= most:
        raise DataError(f"{where}: over the {max_seconds:g}-second limit")
    if not np.isfinite(frames).all():
        raise DataError(f"{where}: the audio holds NaN or infinite samples")
    return resample(to_mono(frames), file.samplerate, rate)


def to_mono(frames: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32: the mean of the channels."""
    frames = np.asarray(frames, dtype=np.float32)
    return frames if frames.ndim == 1 else frames.mean(axis=1, dtype=np.float32)


def resample(wave: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """(samples,) at from_rate Hz -> (about samples * to_rate / from_rate,) float32 at to_rate Hz, clipped to
    [-1, 1] (soxr, band-limited: a tone keeps its frequency, nothing above the new Nyquist aliases)."""
    import soxr

    wave = np.asarray(wave, dtype=np.float32)
    if from_rate != to_rate and len(wave):
        wave = soxr.resample(wave, from_rate, to_rate, quality=RESAMPLE_QUALITY)
    return np.clip(wave, -1.0, 1.0).astype(np.float32, copy=False)


def encode_wav(wave: np.ndarray, rate: int) -> bytes:
    """(samples,) float -> 16-bit PCM WAV bytes at `rate` Hz, samples clipped to [-1, 1]."""
    return _encode(wave, rate, "wav")


def encode_pcm16(wave: np.ndarray) -> bytes:
    """(samples,) float -> raw little-endian 16-bit PCM, no header (OpenAI's response_format="pcm")."""
    return _pcm16(wave).astype("<i2").tobytes()


def _pcm16(wave: np.ndarray) -> np.ndarray:
    """float -> int16, rounded to nearest: x * 32768 clipped to [-32768, 32767], the inverse of how soundfile reads
    16-bit audio (int / 32768). (libsndfile's own float-to-16-bit conversion floors, a half-step bias.)"""
    return np.clip(np.round(np.asarray(wave, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)


def write_audio(path: str | Path, wave: np.ndarray, rate: int) -> None:
    """Write (samples,) float audio at `rate` Hz to path atomically, in the format its suffix names (.wav and
    .flac 16-bit PCM, .ogg Vorbis, .mp3)."""
    path = Path(path)
    format = path.suffix.lower().lstrip(".")
    if format not in WRITE_SUBTYPES:
        raise ConfigError(f"{path}: cannot write audio as {path.suffix or 'a file without a suffix'}; use "
                          f"{', '.join(AUDIO_SUFFIXES)}")
    atomic_write_bytes(path, _encode(wave, rate, format))


def _encode(wave: np.ndarray, rate: int, format: str) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    if WRITE_SUBTYPES[format] == "PCM_16":
        samples = _pcm16(wave)  # written as they are
    else:
        samples = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    soundfile.write(buffer, samples, rate, format=format.upper(), subtype=WRITE_SUBTYPES[format])
    return buffer.getvalue()


# --- number words ---------------------------------------------------------------------------------------------


def number_words(n: int) -> str:
    """0..999,999 as English words, without "and" or hyphens: 342 -> "three hundred forty two"."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 0 <= n <= 999_999:
        raise ValueError(f"number_words takes an integer from 0 to 999999, got {n!r}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(int(n), 1000)
    words = [_below_thousand(thousands), "thousand"] if thousands else []
    if rest:
        words.append(_below_thousand(rest))
    return " ".join(words)


def _below_thousand(n: int) -> str:
    """1..999 as words."""
    hundreds, rest = divmod(n, 100)
    words = [ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        words.append(TENS[rest // 10])
        rest %= 10
    if rest:
        words.append(ONES[rest])
    return " ".join(words)


NUMBER_VOCABULARY = frozenset(ONES) | frozenset(TENS[2:]) | {"hundred", "thousand"}


# --- FSDD -----------------------------------------------------------------------------------------------------


def _fsdd(spec: str, split: str, limit: int | None, rate: int):
    root_text, speaker = spec, None
    if "@" in spec and not Path(spec).is_dir():
        root_text, _, speaker = spec.rpartition("@")
    root = Path(root_text)
    folder = root / "recordings" if (root / "recordings").is_dir() else root
    if not folder.is_dir():
        raise DataError(f"fsdd:{spec}: no such folder; fsdd:DIR wants the Free Spoken Digit Dataset "
                        "(DIR/recordings/{digit}_{speaker}_{take}.wav)")
    listed = []
    for path in sorted(folder.glob("*.wav")):
        match = FSDD_NAME.fullmatch(path.name)
        if not match:
            raise DataError(f"{path}: not an FSDD recording name ({{digit}}_{{speaker}}_{{take}}.wav)")
        digit, name, take = int(match[1]), match[2], int(match[3])
        listed.append((path, {"text": DIGIT_WORDS[digit], "digit": digit, "speaker": name, "take": take,
                              "path": path.name, "source": "fsdd"}))
    if not listed:
        raise DataError(f"{folder}: no FSDD recordings ({{digit}}_{{speaker}}_{{take}}.wav files)")
    speakers = sorted({record["speaker"] for _, record in listed})
    if speaker is not None and speaker not in speakers:
        raise DataError(f"fsdd:{spec}: unknown speaker {speaker!r}; FSDD speakers: {', '.join(speakers)}")
    chosen = [(path, record) for path, record in listed if fsdd_split(record, speaker) == split]
    order = np.random.default_rng([FSDD_SPLIT_SEED, SPLITS.index(split)]).permutation(len(chosen))
    chosen = [chosen[i] for i in order][:limit]  # a fixed shuffle, so that a limit still spans speakers and digits
    speaker_info = _fsdd_metadata(root, folder)
    for _, record in chosen:
        record.update(speaker_info.get(record["speaker"], {}))
    waves = [read_audio(path, rate) for path, _ in chosen]
    return waves, [record for _, record in chosen]


def fsdd_split(record: dict, held_out_speaker: str | None = None) -> str:
    """The split of an FSDD recording ({"speaker", "take"}): the dataset's own (takes 0-4 test), or with a
    held-out speaker, all of that speaker's recordings test; val is takes FSDD_VAL_TAKES of the rest."""
    if held_out_speaker is not None:
        if record["speaker"] == held_out_speaker:
            return "test"
    elif record["take"] in FSDD_TEST_TAKES:
        return "test"
    return "val" if record["take"] in FSDD_VAL_TAKES else "train"


def _fsdd_metadata(root: Path, folder: Path) -> dict[str, dict]:
    """speaker -> {"gender", "accent"} from FSDD's metadata.py (a Python dict literal, read as data, never run)."""
    for path in (root / "metadata.py", folder / "metadata.py"):
        if path.is_file():
            try:
                for node in ast.parse(path.read_text(encoding="utf-8")).body:
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "metadata" for t in node.targets):
                        table = ast.literal_eval(node.value)
                        return {speaker: {key: info[key] for key in ("gender", "accent") if key in info}
                                for speaker, info in table.items()}
            except (SyntaxError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
                raise DataError(f"{path}: not FSDD's metadata dict (metadata = {{speaker: {{...}}}})") from None
    return {}


# --- espeak: synthetic speech -----------------------------------------------------------------------------------


def _espeak(spec: str, split: str, limit: int | None, rate: int):
    body, at, single_voice = spec.partition("@")
    kind, _, count_text = body.partition(":")
    if kind not in ESPEAK_KINDS:
        raise DataError(f"espeak:{spec}: unknown espeak source; use espeak:numbers, espeak:digits or "
                        "espeak:sentences (optionally :N for N training utterances, @VOICE for one voice)")
    if at and not _is_voice(single_voice):
        raise DataError(f"espeak:{spec}: @VOICE names an espeak voice as accent or accent+variant (e.g. @en-us, "
                        f"@en-gb-x-rp+f3); the voices here: {', '.join(TRAIN_VOICES[:3])}, ...")
    train_count = ESPEAK_COUNTS[kind]
    if count_text:
        if not count_text.isdigit() or not 1 <= int(count_text) <= MAX_ESPEAK_COUNT:
            raise DataError(f"espeak:{spec}: the count after {kind}: must be an integer from 1 to "
                            f"{MAX_ESPEAK_COUNT:,}")
        train_count = int(count_text)
    count = train_count if split == "train" else max(1, train_count // 10)
    count = min(count, limit or count)
    voices = HELD_OUT_VOICES if split == "test" else TRAIN_VOICES
    utterances = [_espeak_utterance(kind, split, i, voices) for i in range(count)]
    if single_voice:  # the same texts, speeds and pitches as the many-voice form; one voice for every split
        for utterance in utterances:
            utterance.update(voice=single_voice, source=f"espeak:{kind}@{single_voice}")
    with _ESPEAK_LOCK, Espeak() as engine:
        waves = [resample(engine.say(u["text"], u["voice"], u["words_per_minute"], u["pitch"], seed=i), engine.rate,
                          rate) for i, u in enumerate(utterances)]
    return waves, utterances


def _is_voice(voice: str) -> bool:
    """Whether `voice` is written as an espeak voice: accent[+variant], lower-case letters, digits and dashes (the
    library itself says whether it has it, at the first utterance)."""
    return re.fullmatch(r"[a-z][a-z0-9-]*(\+[a-z][a-z0-9]*)?", voice) is not None


def _espeak_utterance(kind: str, split: str, index: int, voices: tuple[str, ...]) -> dict:
    """Utterance `index` of a split: its transcript and how to say it, from its own seeded generator."""
    rng = np.random.default_rng([ESPEAK_SEED, ESPEAK_KINDS.index(kind), SPLITS.index(split), index])
    if kind == "numbers":
        digits = int(rng.integers(1, 4))
        number = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))
        record = {"text": number_words(number), "number": number}
    elif kind == "digits":
        digit = int(rng.integers(10))
        record = {"text": DIGIT_WORDS[digit], "digit": digit}
    else:
        record = {"text": random_sentence(rng)}
    record.update(voice=voices[int(rng.integers(len(voices)))],
                  words_per_minute=int(rng.integers(WORDS_PER_MINUTE[0], WORDS_PER_MINUTE[1] + 1)),
                  pitch=int(rng.integers(PITCH[0], PITCH[1] + 1)), source=f"espeak:{kind}")
    return record


def random_sentence(rng: np.random.Generator) -> str:
    """A sentence of SENTENCE_TEMPLATES with each slot filled from SENTENCE_WORDS, lower case, no punctuation."""
    template = SENTENCE_TEMPLATES[int(rng.integers(len(SENTENCE_TEMPLATES)))]

    def fill(match: re.Match) -> str:
        slot = match[1]
        if slot == "objects":
            word = SENTENCE_WORDS["object"][int(rng.integers(len(SENTENCE_WORDS["object"])))]
            return PLURALS.get(word, word + "s")
        return SENTENCE_WORDS[slot][int(rng.integers(len(SENTENCE_WORDS[slot])))]

    return re.sub(r"\{(\w+)\}", fill, template)


def sentence_vocabulary() -> set[str]:
    """Every word espeak:sentences can say."""
    words = {word for template in SENTENCE_TEMPLATES for word in re.sub(r"\{\w+\}", " ", template).split()}
    words |= {word for phrases in SENTENCE_WORDS.values() for phrase in phrases for word in phrase.split()}
    return words | {PLURALS.get(word, word + "s") for word in SENTENCE_WORDS["object"]}


class Espeak:
    """A private copy of libespeak-ng (from the espeakng-loader wheel), driven through ctypes, synchronous output.

    libespeak-ng keeps synthesis state (pitch flutter, filter memories) in static variables that neither
    espeak_Terminate nor its random seed resets, so the same utterance twice differs. A copy loaded from its own
    temporary path has its own statics: a fresh one, given the same seeds, replays a sequence of utterances
    sample for sample."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise DataError("espeak sources need libespeak-ng from the espeakng-loader package: pip install "
                            "espeakng-loader (it comes with fmforge's dev extras)") from None
        self.data_path = Path(espeakng_loader.get_data_path())
        self._folder = tempfile.TemporaryDirectory(prefix="fmforge-espeak-")
        library = Path(self._folder.name) / Path(espeakng_loader.get_library_path()).name
        shutil.copyfile(espeakng_loader.get_library_path(), library)
        self.lib = ctypes.CDLL(str(library))
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        self.lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        self._libc = ctypes.CDLL(None)  # the process's C library, whose rand() the klatt voices' noise draws on
        self._libc.srand.argtypes = [ctypes.c_uint]
        self.rate = self.lib.espeak_Initialize(2, 0, str(self.data_path).encode(), 0)  # 2: AUDIO_OUTPUT_SYNCHRONOUS
        if self.rate <= 0:
            self.close()
            raise DataError(f"libespeak-ng did not start (its data at {self.data_path})")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept on self: the library calls it until close()
        self.lib.espeak_SetSynthCallback(self._callback)

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
    RATE, PITCH = 1, 3  # espeak_PARAMETER: espeakRATE (words per minute), espeakPITCH (0-100)

    def _collect(self, samples, count, events) -> int:
        if samples and count > 0:
            self._chunks.append(np.ctypeslib.as_array(samples, shape=(count,)).copy())
        return 0  # 0: go on

    def say(self, text: str, voice: str, words_per_minute: int = 175, pitch: int = 50, seed: int = 0) -> np.ndarray:
        """(samples,) float32 at self.rate Hz: `text` spoken by `voice` ("accent" or "accent+variant"). `seed`
        seeds espeak's random generator and the C library's rand() (process-wide), which its noise draws on."""
        accent, _, variant = voice.partition("+")
        if variant and not (self.data_path / "voices" / "!v" / variant).is_file():  # espeak ignores it silently
            raise DataError(f"espeak voice variant {variant!r} is not in {self.data_path / 'voices' / '!v'}")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise DataError(f"espeak voice {accent!r} is not in {self.data_path}")
        self.lib.espeak_SetParameter(self.RATE, words_per_minute, 0)
        self.lib.espeak_SetParameter(self.PITCH, pitch, 0)
        self._chunks = []
        self.lib.espeak_ng_SetRandSeed(seed)
        self._libc.srand(seed)
        encoded = text.encode("utf-8") + b"\0"
        status = self.lib.espeak_Synth(encoded, len(encoded), 0, 1, 0, 1, None, None)  # 1: POS_CHARACTER, CHARS_UTF8
        if status != 0:
            raise DataError(f"libespeak-ng could not say {text!r} (error {status})")
        self.lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return samples.astype(np.float32) / 32768

    def close(self) -> None:
        """Stop the library, unload this copy and delete its file."""
        import _ctypes

        if getattr(self, "lib", None) is not None:
            self.lib.espeak_Terminate()
            if hasattr(_ctypes, "dlclose"):
                _ctypes.dlclose(self.lib._handle)
            self.lib = None
        self._folder.cleanup()

    def __enter__(self) -> "Espeak":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- user audio: a class folder or a transcripts JSONL -------------------------------------------------------------


def user_split(path: str) -> str:
    """The split of a user audio file, from a seeded hash of its path as listed (relative): 80/10/10."""
    bucket = int(hashlib.sha1(f"{USER_SPLIT_SEED}:{path}".encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _user_audio(source: str, split: str, limit: int | None, rate: int):
    root = Path(source)
    if root.is_dir():
        listed = _class_folder(root)
    elif root.is_file() and root.suffix == ".jsonl":
        listed = _transcripts_jsonl(root)
    elif root.exists():
        raise DataError(f"{source}: not an audio source; give a folder with one sub-folder per class or a "
                        ".jsonl of {\"audio\", \"text\"} lines")
    else:
        raise DataError(f"{source}: no such audio source; use fsdd:DIR, fsdd:DIR@SPEAKER, espeak:numbers, "
                        "espeak:digits, espeak:sentences, a folder of class sub-folders or a .jsonl")
    for path, _, where in listed:
        _check_audio_file(path, where)
    chosen = [(path, record, where) for path, record, where in listed if user_split(record["path"]) == split]
    chosen = chosen[:limit]
    waves = [read_audio(path, rate, where) for path, _, where in chosen]
    return waves, [record for _, record, _ in chosen]


def _class_folder(root: Path) -> list[tuple[Path, dict, str]]:
    """(file, record, how to name it) for every audio file below root's sub-folders, sorted."""
    listed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root)
            if (path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES
                    and not any(part.startswith(".") for part in relative.parts)):
                record = {"text": folder.name, "label": folder.name, "path": relative.as_posix(), "source": "user"}
                listed.append((path, record, str(path)))
    if not listed:
        raise DataError(f"{root}: no audio files ({', '.join(AUDIO_SUFFIXES)}); put them in one sub-folder per "
                        f"class ({root}/yes/1.wav, ...)")
    return listed


def _transcripts_jsonl(jsonl: Path) -> list[tuple[Path, dict, str]]:
    """(file, record, how to name it) for each {"audio": path, "text": transcript} line of a JSONL file."""
    listed = []
    try:
        lines = jsonl.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as error:
        raise DataError(f"{jsonl}: not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{jsonl}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("audio"), str)
                and isinstance(entry.get("text"), str)):
            raise DataError(f'{where}: expected {{"audio": path, "text": transcript}} with string values')
        path = jsonl.parent / entry["audio"]
        extra = {key: value for key, value in entry.items()  # metadata such as "speaker"; nested values are left out
                 if key not in ("audio", "text") and isinstance(value, (str, int, float))}
        record = {**extra, "text": entry["text"], "path": entry["audio"], "source": "user"}
        listed.append((path, record, f"{path} ({where})"))
    if not listed:
        raise DataError(f"{jsonl}: no lines; write one {{\"audio\": path, \"text\": transcript}} per line")
    return listed


def _check_audio_file(path: Path, where: str) -> None:
    """Everything that can be checked without decoding a frame: the file, its size, format and duration."""
    if not path.is_file():
        raise DataError(f"{where}: no such audio file")
    size = path.stat().st_size
    if size > MAX_AUDIO_BYTES:
        raise DataError(f"{where}: {size:,} bytes, over the {MAX_AUDIO_BYTES:,}-byte limit")
    if size == 0:
        raise DataError(f"{where}: empty file (0 bytes)")
    with _open(path, where) as file:
        if file.frames == 0:
            raise DataError(f"{where}: no audio in the file (0 frames)")
        if file.frames / file.samplerate > MAX_AUDIO_SECONDS:
            raise DataError(f"{where}: {file.frames / file.samplerate:.1f} seconds, over the "
                            f"{MAX_AUDIO_SECONDS:g}-second limit")
