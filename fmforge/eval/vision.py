"""Scores of the vision tasks (data/vision.py): replies generated on the engine from each record's chat prompt.

    recognise, answer    accuracy: the reply (stripped) equals the label / answer; answer also splits it into
                         relational and non-relational questions when the records say which
    describe, read       exact_match, and char_accuracy = 1 - edit distance / reference length (at least 0)
    draw                 valid: share of replies holding an image; distinct: share of distinct code sequences
                         among the samples of each prompt (seeded sampling, temperature 1, classifier-free
                         guidance at DRAW_GUIDANCE); pixel_error: mean absolute error (pixels in [0, 1]) against
                         the record's image (a reference, not a target:
                         whether a drawing shows what was asked is judged by a separate classifier in
                         benchmarks/vision.py, never by the model under test)
    edit                 exact_edit: share of outputs within tolerance of the programmatic result: pixel error at
                         most floor + EDIT_SLACK x (the size of the asked change), where floor is the image
                         tokenizer's own round-trip error on that result (the best any output can do) and the
                         size of the change is the error of leaving the input as it was; pixel_error; floor
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.vision import DRAW_GUIDANCE, record_image, turns, unconditional_prompt
from ..errors import DataError
from ..modalities.stream import content_media, has_modality
from ..infer.engine import Engine, GenerationRequest
from ..infer.sampling import SamplingParams

TEXT_REPLY_TOKENS = 32
EDIT_SLACK = 0.25
DRAW_SAMPLES = 4  # samples per distinct prompt for `distinct`


def _require_images(tokenizer) -> None:
    if not has_modality(tokenizer, "image"):
        raise DataError("vision tasks need a multimodal model (a checkpoint with an image tokenizer)")


def replies(model, tokenizer, task: str, records, max_tokens, params=None, batch: int = 8) -> list[list[int]]:
    """The generated ids of each record's reply (greedy unless `params`; `max_tokens` an int or one per record)."""
    _require_images(tokenizer)

    def user_of(where, record):
        return turns(task, record, where, tokenizer, reply=False)[0]

    unconditional = unconditional_prompt(tokenizer) if task == "draw" else None
    return record_replies(model, tokenizer, records, user_of, max_tokens, params, batch, unconditional)


def record_replies(model, tokenizer, records, user_of, max_tokens, params=None, batch: int = 8,
                   unconditional: list[int] | None = None) -> list[list[int]]:
    """Replies of a media task's records (the audio tasks' too): their media encoded in batches first, then each
    record's user turn, user_of(where, record) (content parts), asked on the engine as a chat turn, to the chat's
    stop ids; its media go with it (for a model with understanding encoders). `unconditional`: the prompt without
    its condition, for requests whose params ask for guidance."""
    stop = tokenizer.chat_stop_ids()
    tokenizer.prime([v for _, record in records for v in record.values() if isinstance(v, np.ndarray)])
    requests = []
    for index, (where, record) in enumerate(records):
        limit = max_tokens[index] if isinstance(max_tokens, list) else max_tokens
        sampling = params[index] if isinstance(params, list) else params or SamplingParams(max_tokens=limit,
                                                                                           temperature=0)
        user = user_of(where, record)  # read once: a record's image may be a file
        prompt = tokenizer.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
        requests.append(GenerationRequest(prompt, sampling, stop_ids=stop, unconditional_ids=unconditional,
                                          media=content_media(user)))
    return [c.token_ids for c in Engine(model, tokenizer, max_batch=batch).complete(requests)]


def _text(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def char_accuracy(prediction: str, reference: str) -> float:
    """1 - Levenshtein distance / len(reference), at least 0."""
    previous = list(range(len(prediction) + 1))
    for i, r in enumerate(reference, 1):
        current = [i]
        for j, p in enumerate(prediction, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != p)))
        previous = current
    return max(0.0, 1 - previous[-1] / max(len(reference), 1))


def evaluate_recognise(model, tokenizer, records, labels=None) -> dict:
    outputs = replies(model, tokenizer, "recognise", records, TEXT_REPLY_TOKENS)
    correct = [_text(tokenizer, ids) == str(r["label"]).strip() for (_, r), ids in zip(records, outputs)]
    return {"accuracy": float(np.mean(correct)), "examples": len(records)}


def evaluate_answer(model, tokenizer, records, labels=None) -> dict:
    outputs = replies(model, tokenizer, "answer", records, TEXT_REPLY_TOKENS)
    correct = np.array([_text(tokenizer, ids) == str(r["answer"]).strip() for (_, r), ids in zip(records, outputs)])
    result = {"accuracy": float(correct.mean()), "examples": len(records)}
    kinds = np.array([r.get("relational") for _, r in records])
    for name, value in (("relational", True), ("non_relational", False)):
        chosen = kinds == value
        if chosen.any():
            result[f"{name}_accuracy"] = float(correct[chosen].mean())
            result[f"{name}_examples"] = int(chosen.sum())
    return result


def _text_scores(task: str, model, tokenizer, records) -> dict:
    outputs = replies(model, tokenizer, task, records, TEXT_REPLY_TOKENS if task == "read" else 64)
    predictions = [_text(tokenizer, ids) for ids in outputs]
    references = [str(r["text"]).strip() for _, r in records]
    return {"char_accuracy": float(np.mean([char_accuracy(p, t) for p, t in zip(predictions, references)])),
            "exact_match": float(np.mean([p == t for p, t in zip(predictions, references)])),
            "examples": len(records)}


def evaluate_read(model, tokenizer, records, labels=None) -> dict:
    return _text_scores("read", model, tokenizer, records)


def evaluate_describe(model, tokenizer, records, labels=None) -> dict:
    return _text_scores("describe", model, tokenizer, records)


def span_tokens(image: np.ndarray, tokenizer) -> int:
    """Tokens of an image's span plus the end of the turn."""
    f = tokenizer.codecs["image"].config.downsample
    return (image.shape[0] // f) * (image.shape[1] // f) + 3 + 2


def pixel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, in [0, 1] (1 when their sizes differ)."""
    if a.shape != b.shape:
        return 1.0
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255)


def round_trip(image: np.ndarray, tokenizer) -> np.ndarray:
    """The image through the image tokenizer and back: what the best possible output looks like."""
    codec = tokenizer.codecs["image"]
    return codec.decode(codec.encode(torch.from_numpy(np.ascontiguousarray(image[None]))))[0].numpy()


def evaluate_draw(model, tokenizer, records, labels=None, samples: int = DRAW_SAMPLES, seed: int = 0,
                  guidance: float = DRAW_GUIDANCE) -> dict:
    """Seeded samples per prompt (classifier-free guidance at `guidance`): valid images, distinct code sequences
    per prompt, error against the reference."""
    _require_images(tokenizer)
    by_prompt: dict[str, list] = {}
    for where, record in records:
        by_prompt.setdefault(str(record["text"]), []).append((where, record))
    jobs, params, limits = [], [], []
    for prompt, group in by_prompt.items():
        for k in range(samples):
            where, record = group[k % len(group)]
            target = record_image(record, "image", where, tokenizer)
            jobs.append((where, record))
            limits.append(span_tokens(target, tokenizer))
            params.append(SamplingParams(max_tokens=limits[-1], temperature=1.0, seed=seed + len(jobs),
                                         guidance=guidance))
    outputs = replies(model, tokenizer, "draw", jobs, limits, params)
    valid, errors, distinct = [], [], []
    for prompt in by_prompt:
        sequences = set()
        for (where, record), ids in zip(jobs, outputs):
            if str(record["text"]) != prompt:
                continue
            images = tokenizer.decode_images(ids)
            valid.append(bool(images))
            if images:
                errors.append(pixel_error(images[0], record_image(record, "image", where, tokenizer)))
                spans = tokenizer.spans(ids)
                sequences.add(tuple(ids[spans[0][1]:spans[0][2]]))
        distinct.append(len(sequences) / samples)
    return {"valid": float(np.mean(valid)), "distinct": float(np.mean(distinct)),
            "pixel_error": float(np.mean(errors)) if errors else 1.0, "prompts": len(by_prompt),
            "samples": len(jobs), "guidance": guidance}


def evaluate_edit(model, tokenizer, records, labels=None) -> dict:
    _require_images(tokenizer)
    inputs = [record_image(r, "image", w, tokenizer) for w, r in records]
    targets = [record_image(r, "output", w, tokenizer) for w, r in records]
    outputs = replies(model, tokenizer, "edit", records, [span_tokens(t, tokenizer) for t in targets])
    exact, errors, floors = [], [], []
    per_operation: dict[str, list[bool]] = {}
    for (_, record), source, target, ids in zip(records, inputs, targets, outputs):
        images = tokenizer.decode_images(ids)
        floor = pixel_error(round_trip(target, tokenizer), target)
        error = pixel_error(images[0], target) if images else 1.0
        ok = error <= floor + EDIT_SLACK * pixel_error(source, target)
        exact.append(ok)
        errors.append(error)
        floors.append(floor)
        if "operation" in record:
            per_operation.setdefault(record["operation"], []).append(ok)
    result = {"exact_edit": float(np.mean(exact)), "pixel_error": float(np.mean(errors)),
              "floor": float(np.mean(floors)), "examples": len(records)}
    result.update({f"exact_{name}": float(np.mean(oks)) for name, oks in sorted(per_operation.items())})
    return result


EVALUATORS = {"recognise": evaluate_recognise, "answer": evaluate_answer, "read": evaluate_read,
              "describe": evaluate_describe, "draw": evaluate_draw, "edit": evaluate_edit}
