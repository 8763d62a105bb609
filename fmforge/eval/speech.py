"""Scores of the audio tasks (data/speech.py): replies generated on the engine from each record's chat prompt.

    transcribe  wer: word error rate (jiwer) of the replies against the transcripts, both normalised (lower case,
                punctuation dropped, spaces collapsed); exact_match: share of replies equal to the transcript
    speak       valid: share of replies holding a complete audio span; seconds: their mean duration;
                length_ratio: generated over reference duration (1 = the right length). Whether the speech says
                the words is judged by a separate recogniser in benchmarks/audio.py, never by the model under test.
    say         accuracy: the written part of the reply equals the record's text; valid: it holds an audio span
"""

from __future__ import annotations

import re

import numpy as np

from ..data.speech import codec_rate, record_audio, turns
from ..errors import DataError
from ..modalities.stream import has_modality
from .vision import record_replies

TEXT_REPLY_TOKENS = 48
SPEECH_MARGIN = 1.5  # a spoken reply may run this much longer than its reference


def normalise(text: str) -> str:
    """Lower case, letters, digits and apostrophes only, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def word_error_rate(references: list[str], predictions: list[str]) -> float:
    """Corpus WER (jiwer) of normalised texts; an empty prediction counts every reference word as deleted."""
    import jiwer

    references = [normalise(r) for r in references]
    if not any(references):
        raise DataError("word error rate needs at least one non-empty reference")
    pairs = [(r, normalise(p)) for r, p in zip(references, predictions) if r]
    return float(jiwer.wer([r for r, _ in pairs], [p or "<empty>" for _, p in pairs]))


def _require_audio(tokenizer) -> None:
    if not has_modality(tokenizer, "audio"):
        raise DataError("audio tasks need a multimodal model (a checkpoint with an audio tokenizer)")


def replies(model, tokenizer, task: str, records, max_tokens, batch: int = 8) -> list[list[int]]:
    """The greedy reply ids of each record (`max_tokens` an int or one per record)."""
    _require_audio(tokenizer)
    return record_replies(model, tokenizer, records,
                          lambda where, record: turns(task, record, where, tokenizer, reply=False)[0], max_tokens,
                          batch=batch)


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def evaluate_transcribe(model, tokenizer, records, labels=None) -> dict:
    outputs = replies(model, tokenizer, "transcribe", records, TEXT_REPLY_TOKENS)
    predictions = [_text(tokenizer, ids) for ids in outputs]
    references = [str(r["text"]) for _, r in records]
    return {"wer": word_error_rate(references, predictions),
            "exact_match": float(np.mean([normalise(p) == normalise(t) for p, t in zip(predictions, references)])),
            "examples": len(records)}


def spoken_tokens(wave: np.ndarray, tokenizer) -> int:
    """Tokens a reply saying `wave` may take: its span with margin, and the end of the turn."""
    return int(len(tokenizer.encode_audio(wave)) * SPEECH_MARGIN) + 2


def evaluate_speak(model, tokenizer, records, labels=None) -> dict:
    _require_audio(tokenizer)
    references = [record_audio(r, "audio", w, tokenizer) for w, r in records]
    outputs = replies(model, tokenizer, "speak", records, [spoken_tokens(ref, tokenizer) for ref in references])
    rate = codec_rate(tokenizer)
    valid, seconds, ratios = [], [], []
    for ids, reference in zip(outputs, references):
        waves = tokenizer.decode_audio(ids)
        valid.append(bool(waves))
        if waves:
            seconds.append(len(waves[0]) / rate)
            ratios.append(len(waves[0]) / max(len(reference), 1))
    return {"valid": float(np.mean(valid)), "seconds": float(np.mean(seconds)) if seconds else 0.0,
            "length_ratio": float(np.mean(ratios)) if ratios else 0.0, "examples": len(records)}


def evaluate_say(model, tokenizer, records, labels=None) -> dict:
    _require_audio(tokenizer)
    limits = [TEXT_REPLY_TOKENS + spoken_tokens(record_audio(r, "audio", w, tokenizer), tokenizer)
              for w, r in records]
    outputs = replies(model, tokenizer, "say", records, limits)
    correct, valid = [], []
    for (_, record), ids in zip(records, outputs):
        spans = tokenizer.spans(ids)
        written = ids[:spans[0][1]] if spans else ids
        correct.append(normalise(_text(tokenizer, written)) == normalise(str(record["text"])))
        valid.append(any(name == "audio" for name, _, _ in spans))
    return {"accuracy": float(np.mean(correct)), "valid": float(np.mean(valid)), "examples": len(records)}


EVALUATORS = {"transcribe": evaluate_transcribe, "speak": evaluate_speak, "say": evaluate_say}
