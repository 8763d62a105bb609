"""Translation data: parallel text as records of the `translate` task, and the chat prompt that asks for one.

A record is {"source": ..., "target": ..., "source_lang": "en", "target_lang": "de"} (the languages are optional in
JSONL; "en" and "de" when absent). Two aligned text files (one sentence per line, gzip or not, line i of one
translating line i of the other) are read with the spec `parallel:SOURCE_FILE:TARGET_FILE`; their languages come
from the file names' last suffix before an optional .gz (Multi30K's `train.en.gz`, `train.de.gz`).

The task is decoder-only, like every specialist: the user's turn asks for the translation, the assistant's turn is
it, so the chat route of the server serves a translation specialist as it serves any other.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from ..errors import DataError

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish", "it": "Italian",
             "nl": "Dutch", "pt": "Portuguese", "ru": "Russian", "zh": "Chinese", "ja": "Japanese"}
DEFAULT_LANGS = ("en", "de")
PARALLEL_PREFIX = "parallel:"


def language_name(code: str) -> str:
    return LANGUAGES.get(code, code)


def translation_prompt(source: str, source_lang: str, target_lang: str) -> str:
    """The user's turn: what to translate, from which language into which."""
    return f"Translate from {language_name(source_lang)} to {language_name(target_lang)}:\n{source.strip()}"


def record_languages(record: dict, where: str) -> tuple[str, str]:
    langs = (record.get("source_lang", DEFAULT_LANGS[0]), record.get("target_lang", DEFAULT_LANGS[1]))
    for lang in langs:
        if not isinstance(lang, str) or not lang.strip():
            raise DataError(f"{where}: source_lang and target_lang must be language codes like 'en', got {lang!r}")
    return langs


def translation_messages(record: dict, where: str) -> list[dict]:
    """The record as chat turns: the prompt, then the translation."""
    for key in ("source", "target"):
        if not isinstance(record[key], str) or not record[key].strip():
            raise DataError(f"{where}: '{key}' must be a non-empty string")
    source_lang, target_lang = record_languages(record, where)
    return [{"role": "user", "content": translation_prompt(record["source"], source_lang, target_lang)},
            {"role": "assistant", "content": record["target"].strip()}]


def translation_example(record: dict, tokenizer, where: str):
    from .finetune import sft_example
    return sft_example({"messages": translation_messages(record, where)}, tokenizer, where)


def read_lines(path: Path) -> list[str]:
    """One sentence a line of a text file (`.gz` read through gzip): the lines of one side of a parallel corpus,
    aligned with the other side's. DataError for a missing or unreadable file."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            # Lines end at \n (or \r\n) only: str.splitlines would also split at U+2028, U+0085, ..., shifting
            # every later pair of one file against the other.
            lines = f.read().split("\n")
    except FileNotFoundError:
        raise DataError(f"parallel text file not found: {path}") from None
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"cannot read {path} as UTF-8 text: {exc}") from None
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _language_of(path: Path) -> str:
    """The language code a file name ends with (`train.de.gz` -> "de"); "" when it names none we know."""
    suffix = Path(path.name.removesuffix(".gz")).suffix.lstrip(".")
    return suffix if suffix in LANGUAGES else ""


def read_parallel(spec: str) -> list[tuple[str, dict]]:
    """(where, record) pairs of `parallel:SOURCE_FILE:TARGET_FILE`; DataError if the files are not aligned."""
    paths = spec.removeprefix(PARALLEL_PREFIX).split(":")
    if len(paths) != 2 or not all(paths):
        raise DataError(f"{spec!r}: give two aligned files as parallel:SOURCE_FILE:TARGET_FILE")
    source_path, target_path = Path(paths[0]), Path(paths[1])
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise DataError(f"parallel files are not aligned: {source_path} has {len(sources):,} lines, {target_path} "
                        f"has {len(targets):,}; line i of one must translate line i of the other")
    source_lang = _language_of(source_path) or DEFAULT_LANGS[0]
    target_lang = _language_of(target_path) or DEFAULT_LANGS[1]
    records = []
    for number, (source, target) in enumerate(zip(sources, targets), 1):
        if source.strip() and target.strip():
            records.append((f"{source_path}:{number}", {"source": source, "target": target,
                                                         "source_lang": source_lang, "target_lang": target_lang}))
    if not records:
        raise DataError(f"{source_path} and {target_path} hold no sentence pairs")
    return records
