"""Audio data in the one token stream: pretraining sequences from audio sources, and the audio tasks' records.

Pretraining (`fmforge prepare audio:SOURCE ...`): every utterance with its transcript gives two documents,

    transcript -> speech    [bos] transcript <|audio|> rows cols codes... <|/audio|> [eos]
    speech -> transcript    [bos] <|audio|> rows cols codes... <|/audio|> transcript [eos]

from the source's own train split (train shards) and val split (val shards); the test split is never read.
A document's byte count (for bits-per-byte) is its transcript's UTF-8 bytes plus the audio's 16-bit PCM bytes at
the codec's sample rate.

Tasks (data/tasks.py registers them) are chat turns, so the server's chat route serves their specialists:

    transcribe  {"audio", "text"}            user: [audio, "Transcribe the audio."] -> text
    speak       {"text", "audio"}            user: "Say: TEXT" -> [audio]
    say         {"image", "text", "audio"}   user: [image, "Say what the image shows."] -> text, [audio]

`say` is the cross-modal chain: the model reads the image, writes what it shows, then speaks it. An audio field is
a path (relative to the JSONL file) or, for records of an audio source (`fsdd:DIR`, `espeak:numbers`, ...: see
data/audio.py), the waveform itself. Any audio source also serves as a task's data: `--data espeak:numbers`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..modalities.stream import has_modality
from .finetune import Example

AUDIO_PREFIX = "audio:"
PROMPTS = {"transcribe": "Transcribe the audio.", "say": "Say what the image shows."}
AUDIO_TASKS = ("transcribe", "speak", "say")
SPOKEN_DIGIT_VOICE = "en-us"  # the voice of the built-in `mnist-say` replies (one voice: one way to say a digit)


def speak_prompt(text: str) -> str:
    return f"Say: {text}"


def codec_rate(tokenizer) -> int:
    return tokenizer.codecs["audio"].config.sample_rate


def _require_audio(tokenizer, where: str) -> None:
    if not has_modality(tokenizer, "audio"):
        raise DataError(f"{where}: audio needs a model with an audio tokenizer (a multimodal base; train one with "
                        "`fmforge tokenizer train --modality audio`)")


# ---- pretraining documents ------------------------------------------------------------------------------

def audio_sources(specs: list[str]) -> list[str]:
    """The sources of `audio:SOURCE` specs; ConfigError for a spec without the prefix."""
    sources = []
    for spec in specs:
        if not str(spec).startswith(AUDIO_PREFIX) or not str(spec)[len(AUDIO_PREFIX):]:
            raise ConfigError(f"{spec!r}: audio sources are written audio:SOURCE (audio:fsdd:DIR, "
                              "audio:espeak:numbers, audio:espeak:sentences, audio:FOLDER, audio:transcripts.jsonl); "
                              "prepare text, image and audio sources into separate directories and mix them with "
                              "train.mixture")
        sources.append(str(spec)[len(AUDIO_PREFIX):])
    return sources


def audio_documents(source: str, split: str, tokenizer, limit: int | None = None):
    """(tokens, byte count) of the transcript -> speech and speech -> transcript documents of one split."""
    from .audio import load_audio

    audio = load_audio(source, split, limit, rate=codec_rate(tokenizer))
    spans = tokenizer.encode_audios(audio.waves)
    bos = [tokenizer.bos_id] if tokenizer.add_bos_token else []
    for span, record, wave in zip(spans, audio.records, audio.waves):
        words = tokenizer.encode(record["text"])
        n_bytes = len(record["text"].encode("utf-8")) + 2 * len(wave)
        yield np.array(bos + words + span + [tokenizer.eos_id]), n_bytes
        yield np.array(bos + span + words + [tokenizer.eos_id]), n_bytes


def prepare_audio(specs: list[str], tokenizer, out_dir, *, limit: int | None = None, progress: bool = True):
    """Token shards of audio sources' transcript <-> speech documents (train split -> train, val -> val)."""
    from .shards import write_token_documents

    _require_audio(tokenizer, "prepare")
    sources = audio_sources(specs)
    digest = hashlib.sha256(json.dumps({"sources": sources, "limit": limit, "tokenizer": tokenizer.fingerprint(),
                                        "kind": "audio-v1"}).encode())
    for source in sources:  # user data: its files' sizes and times
        path = Path(source.split(":", 1)[1] if source.startswith("fsdd:") else source).expanduser()
        if path.exists():
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    digest.update(f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())

    def documents(split):
        for source in sources:
            yield from audio_documents(source, split, tokenizer, limit)

    manifest = write_token_documents(out_dir, tokenizer, {"train": documents("train"), "val": documents("val")},
                                     input_fingerprint=digest.hexdigest(),
                                     sources={"specs": list(map(str, specs)), "files": len(sources)},
                                     options={"limit": limit}, progress=progress)
    if progress:
        import sys
        print(f"prepared {manifest.train.documents:,} train and {manifest.val.documents:,} val audio documents "
              f"-> {manifest.train.tokens:,} + {manifest.val.tokens:,} tokens in {out_dir}", file=sys.stderr)
    return manifest


# ---- task records --------------------------------------------------------------------------------------

def is_audio_source(spec: str) -> bool:
    """Whether a task's --data names an audio source rather than a JSONL file (fsdd:DIR, espeak:KIND)."""
    return str(spec).startswith(("fsdd:", "espeak:"))


def source_records(task: str, source: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) of one split of an audio source, as records of `task` (transcribe or speak: the waveform
    and its transcript)."""
    from .audio import SAMPLE_RATE, load_audio

    if task not in ("transcribe", "speak"):
        raise ConfigError(f"an audio source ({source}) gives records of transcribe and speak, not {task}")
    audio = load_audio(source, split, limit, rate=SAMPLE_RATE)
    return [(f"{source}:{split}:{index}", {**meta, "audio": wave, "text": meta["text"]})
            for index, (wave, meta) in enumerate(zip(audio.waves, audio.records))]


def record_audio(record: dict, key: str, where: str, tokenizer) -> np.ndarray:
    """The waveform of a record's field at the codec's rate: as given (a source's records are at that rate), or
    read from the file it names (relative to the JSONL file), resampled and downmixed."""
    from .audio import read_audio

    value = record.get(key)
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field '{key}' must be an audio file path")
    base = Path(where.rsplit(":", 1)[0]).parent if ":" in where else Path(".")
    path = Path(value) if Path(value).is_absolute() else base / value
    return read_audio(path, rate=codec_rate(tokenizer), where=f"{where}: {value}")


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field '{key}' must be a non-empty string")
    return value.strip()


def turns(task: str, record: dict, where: str, tokenizer, reply: bool = True) -> tuple[list, list]:
    """(user parts, assistant parts) of an audio task's record; audio parts are {"type": "audio", "audio": ...}.
    With reply=False the assistant parts are not read (a prompt needs only the user's)."""
    def audio(key):
        return {"type": "audio", "audio": record_audio(record, key, where, tokenizer)}

    if task == "transcribe":
        return [audio("audio"), record.get("prompt") or PROMPTS[task]], [_text(record, "text", where)] if reply else []
    if task == "speak":
        return [speak_prompt(_text(record, "text", where))], [audio("audio")] if reply else []
    if task == "say":
        from .vision import record_image
        image = {"type": "image", "image": record_image(record, "image", where, tokenizer)}
        return [image, record.get("prompt") or PROMPTS[task]], \
            [_text(record, "text", where) + " ", audio("audio")] if reply else []
    raise ConfigError(f"{task!r} is not an audio task")


def audio_example(task: str, record: dict, tokenizer, where: str) -> Example:
    """The chat turns of a record; the loss is on the assistant's turn (its text and/or audio span, <|end|>)."""
    from .vision import chat_turn_example

    _require_audio(tokenizer, where)
    if task == "say" and not has_modality(tokenizer, "image"):
        raise DataError(f"{where}: task say needs a model with an image tokenizer too")
    return chat_turn_example(*turns(task, record, where, tokenizer), tokenizer, where)


# ---- built-in: the chain ----------------------------------------------------------------------------------

def say_records(split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """`mnist-say`: an MNIST digit -> its name, then the name spoken (espeak, one voice: one way to say a digit)."""
    from .audio import SAMPLE_RATE, Espeak, number_words, resample
    from .images import load_images

    images = load_images("mnist", split, limit)
    with Espeak() as espeak:
        spoken = {digit: resample(espeak.say(number_words(digit), SPOKEN_DIGIT_VOICE, seed=digit), espeak.rate,
                                  SAMPLE_RATE) for digit in range(10)}
    records = []
    for index, (pixels, meta) in enumerate(zip(images.images, images.records)):
        digit = int(meta["label"])
        records.append((f"mnist-say:{split}:{index}", {"image": pixels, "text": number_words(digit),
                                                       "audio": spoken[digit], "label": str(digit)}))
    return records
