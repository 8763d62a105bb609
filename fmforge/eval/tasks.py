"""Task evaluation: completion (bits-per-byte of the reference + exact match of greedy output), chat (the same for
each conversation's last reply, + character similarity), classification (accuracy with a trained head, or zero-shot
by log-likelihood of each label), multiple choice (log-likelihood, raw and length-normalised), and held-out perplexity
on prepared shards.

Task specs for `fmforge eval --tasks`: a built-in dataset of the task registry (stdlib-docstring, stdlib-body,
stdlib-module, stdlib-chat, and the vision sets mnist-recognise, shapes-answer, glyphs-read, mnist-draw,
shapes-edit, ... scored by eval/vision.py; its test split), `perplexity` (needs --data PREPARED_DIR), or
TASK:FILE.jsonl for any task whose registry entry names an evaluator (completion, classify, mc, translate, sft; mc
records: {"prompt": ..., "choices": [...], "answer": index}; translate also reads
translate:parallel:SOURCE_FILE:TARGET_FILE and reports sacrebleu's BLEU and chrF; sft scores each conversation's last
reply, see evaluate_chat). The audio tasks (eval/speech.py) also take an audio source after the colon and score its
test split: transcribe:fsdd:DIR, transcribe:espeak:numbers, speak:espeak:numbers; mnist-say is built in.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..adapt.heads import SequenceClassifier
from ..data import finetune as ft
from ..data.tasks import BUILTIN, TASKS, Task, read_records, split_records
from ..errors import ConfigError, DataError, GenerationError
from ..infer.beam import beam_search_batch, check_beams, searches_at_once
from ..infer.engine import Engine, GenerationRequest
from ..infer.sampling import SamplingParams
from .speech import EVALUATORS as SPEECH_EVALUATORS
from .vision import EVALUATORS as VISION_EVALUATORS

ZERO_SHOT_SUFFIX = "\n# module:"  # how a plain LM is asked which label fits a text (zero-shot classification)


@dataclass(frozen=True)
class Decoding:
    """How the tasks that score generated text (translate, chat) decode: greedily (beams 1, the default) or by beam
    search (`fmforge eval --beams N --length-penalty A`; infer/beam.py)."""
    beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self):
        try:
            check_beams(self.beams)
        except ValueError as exc:
            raise ConfigError(f"--beams: {exc}") from None
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"--length-penalty must be a finite number, got {self.length_penalty}")


DECODED = ("translate", "chat")  # the evaluators that take a Decoding


@torch.no_grad()
def continuation_logprobs(model, context: list[int], continuations: list[list[int]]) -> list[float]:
    """Sum of log-probabilities of each continuation after the shared context (one batched forward)."""
    limit = model.config.context_length
    rows, spans = [], []
    for cont in continuations:
        ids = (context + cont)[-limit:]
        rows.append(ids)
        spans.append((len(ids) - len(cont), len(ids)))
    width = max(len(r) for r in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    device = next(model.parameters()).device
    logprobs = F.log_softmax(model(batch.to(device)).logits.float(), dim=-1)
    scores = []
    for i, (start, end) in enumerate(spans):
        targets = batch[i, start:end].to(device)
        scores.append(float(logprobs[i, start - 1:end - 1].gather(1, targets[:, None]).sum()))
    return scores


def evaluate_completion(model, tokenizer, records, max_new_tokens: int = 48, batch: int = 8) -> dict:
    """Completion bits-per-byte of the reference, and exact match of the greedy first line (generated on the
    engine, `batch` records at a time)."""
    nats = 0.0
    n_bytes = 0
    limit = model.config.context_length
    references, requests = [], []
    greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0)
    for _, record in records:
        prompt = tokenizer.encode(record["prompt"], add_bos=True)
        completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
        if len(completion) > limit - 1:  # score only what fits after at least one prompt token
            completion = completion[:limit - 1]
        prompt = prompt[-(limit - len(completion)):]  # keep the end of the prompt, nearest the completion
        nats -= continuation_logprobs(model, prompt, [completion])[0]
        # Bytes of exactly the scored text (the eos counts as one byte when it is scored).
        scored = completion[:-1] if completion[-1] == tokenizer.eos_id else completion
        n_bytes += len(tokenizer.decode(scored).encode("utf-8")) + (completion[-1] == tokenizer.eos_id)
        if len(prompt) < limit - 1:
            references.append(record["completion"].strip().splitlines()[0] if record["completion"].strip() else "")
            requests.append(GenerationRequest(prompt, greedy))
    exact = 0
    if requests:
        outputs = [[] for _ in requests]
        generation = Engine(model, tokenizer, max_batch=batch).generate(requests)
        for index, event in generation:
            if event.finish_reason == "error":
                raise GenerationError(f"generating for the completion task failed: {event.error}")
            if event.token_id is None or event.token_id == tokenizer.eos_id:
                continue
            outputs[index].append(event.token_id)
            if "\n" in tokenizer.decode(outputs[index]).lstrip("\n"):  # the first line is complete
                generation.cancel(index)
        for ids, reference in zip(outputs, references):
            generated = tokenizer.decode(ids).strip().splitlines()
            exact += int(bool(generated) and generated[0].strip() == reference)
    return {"bits_per_byte": nats / max(n_bytes, 1) / math.log(2), "exact_match": exact / len(records),
            "examples": len(records)}


def decoded_replies(model, tokenizer, prompts: list[list[int]], max_tokens: list[int], batch: int = 8,
                   decoding: Decoding | None = None) -> list[str]:
    """The chat reply to each prompt (ids ending in the assistant's generation prompt), up to its `max_tokens`:
    greedy, generated on the engine `batch` at a time, or (`decoding.beams` > 1) the best hypothesis of a beam
    search per prompt, up to `batch` searches side by side (infer/beam.searches_at_once); decoded without special
    tokens and stripped."""
    stop = tokenizer.chat_stop_ids()
    if decoding is not None and decoding.beams > 1:
        best, together = [], searches_at_once(decoding.beams, batch)
        for first in range(0, len(prompts), together):
            best += [found[0] for found in beam_search_batch(
                model, prompts[first:first + together], beams=decoding.beams,
                max_tokens=max_tokens[first:first + together], stop_ids=stop, length_penalty=decoding.length_penalty)]
        return [tokenizer.decode(h.token_ids, skip_special_tokens=True).strip() for h in best]
    requests = [GenerationRequest(prompt, SamplingParams(max_tokens=n, temperature=0), stop_ids=stop)
                for prompt, n in zip(prompts, max_tokens)]
    return [tokenizer.decode(c.token_ids, skip_special_tokens=True).strip()
            for c in Engine(model, tokenizer, max_batch=batch).complete(requests)]


def evaluate_chat(model, tokenizer, records, extra_tokens: int = 16, batch: int = 8,
                  decoding: Decoding | None = None) -> dict:
    """Each conversation's last message, the assistant's reply, scored after the turns before it (earlier replies
    are the reference ones, as in training), through the chat template as the server asks:
    - bits_per_byte of the reference reply and its end-of-turn token (counted as one byte);
    - exact_match: the greedy reply (generated on the engine, up to the reference's tokens + `extra_tokens`) equals
      the reference, whitespace aside;
    - similarity: difflib's ratio of the greedy reply to the reference, 0-1 (2 x matching characters / both lengths).
    A conversation longer than the context keeps its end (the reply, and the turns nearest it), as completion does;
    `prompts_truncated` counts them. Records with a "kind" (stdlib-chat's) get the three metrics per kind too."""
    model = language_model(model)
    stop, limit = tokenizer.chat_stop_ids(), model.config.context_length
    kinds, prompts, budgets, references = [], [], [], []
    nats, n_bytes, truncated = [], [], 0
    for where, record in records:
        messages = ft.chat_messages(record, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's reply (it is what is scored)")
        prompt = tokenizer.encode_chat(messages[:-1], add_generation_prompt=True)
        whole = tokenizer.encode_chat(messages)
        if whole[:len(prompt)] != prompt or len(whole) == len(prompt):
            raise DataError(f"{where}: the chat template renders the reply's turn differently from its generation "
                            "prompt, so the reply cannot be scored")
        reply = whole[len(prompt):]
        end = next((i for i, token in enumerate(reply) if token in stop), None)
        reply = reply[:limit - 1] if end is None else reply[:min(end + 1, limit - 1)]
        truncated += len(prompt) > limit - len(reply)
        prompt = prompt[-(limit - len(reply)):]  # keep the end, nearest the reply
        nats.append(-continuation_logprobs(model, prompt, [reply])[0])
        ends_turn = reply[-1] in stop
        n_bytes.append(len(tokenizer.decode(reply[:-1] if ends_turn else reply).encode("utf-8")) + ends_turn)
        prompts.append(prompt)
        budgets.append(min(len(reply) + extra_tokens, limit - len(prompt)))
        references.append(messages[-1]["content"].strip())
        kinds.append(record.get("kind") if isinstance(record.get("kind"), str) else None)
    exact, similar = [], []
    for reply, reference in zip(decoded_replies(model, tokenizer, prompts, budgets, batch, decoding), references):
        exact.append(reply == reference)
        similar.append(difflib.SequenceMatcher(None, reply, reference, autojunk=False).ratio())

    def scores(rows: list[int]) -> dict:
        return {"bits_per_byte": sum(nats[i] for i in rows) / max(sum(n_bytes[i] for i in rows), 1) / math.log(2),
                "exact_match": sum(exact[i] for i in rows) / max(len(rows), 1),
                "similarity": sum(similar[i] for i in rows) / max(len(rows), 1)}

    result = {**scores(list(range(len(records)))), "examples": len(records), "prompts_truncated": truncated}
    for kind in sorted({k for k in kinds if k is not None}):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        result.update({f"{kind}.{name}": value for name, value in scores(rows).items()})
        result[f"{kind}.examples"] = len(rows)
    return result


def evaluate_classify(model, tokenizer, records, labels: list[str] | None = None) -> dict:
    """Accuracy: with the classifier head when the model has one, else zero-shot by label log-likelihood."""
    T = (model.base if isinstance(model, SequenceClassifier) else model).config.context_length
    if isinstance(model, SequenceClassifier):
        data = ft.classification_data(records, model.labels, tokenizer, T)
        correct = 0
        with torch.no_grad():
            for start in range(0, len(data), 16):
                batch = data.batch(range(start, min(start + 16, len(data))))
                logits = model(batch["input_ids"], batch["lengths"]).logits
                correct += int((logits.argmax(-1) == batch["targets"]).sum())
        return {"accuracy": correct / len(data), "examples": len(data), "mode": "head"}
    labels = labels or sorted({str(r["label"]) for _, r in records})
    choices = [tokenizer.encode(" " + label) + [tokenizer.token_id("<|eos|>")] for label in labels]
    correct = 0
    for _, record in records:
        context = tokenizer.encode(record["text"].rstrip() + ZERO_SHOT_SUFFIX, add_bos=True)
        context = context[-(T - max(len(c) for c in choices)):]
        scores = continuation_logprobs(model, context, choices)
        correct += int(labels[max(range(len(labels)), key=scores.__getitem__)] == str(record["label"]))
    return {"accuracy": correct / len(records), "examples": len(records), "mode": "zero-shot log-likelihood"}


def evaluate_multiple_choice(model, tokenizer, records) -> dict:
    """acc (highest total log-likelihood) and acc_norm (per byte of the choice), as lm-eval-harness reports."""
    correct = correct_norm = 0
    for where, record in records:
        choices, answer = record.get("choices"), record.get("answer")
        if not isinstance(choices, list) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: mc records need 'choices' (a list) and 'answer' (an index into it)")
        context = tokenizer.encode(record["prompt"], add_bos=True)
        scores = continuation_logprobs(model, context, [tokenizer.encode(c) for c in choices])
        normalised = [s / max(1, len(c.encode("utf-8"))) for s, c in zip(scores, choices)]
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
        correct_norm += int(max(range(len(choices)), key=normalised.__getitem__) == answer)
    return {"acc": correct / len(records), "acc_norm": correct_norm / len(records), "examples": len(records)}


def evaluate_perplexity(model, data_dir: str | Path, batch_size: int = 8) -> dict:
    from ..data.loader import WindowDataset, eval_windows
    from ..data.shards import load_split, read_manifest
    from ..train.evaluation import bits_per_byte, evaluate_windows

    manifest = read_manifest(data_dir)
    dataset = WindowDataset(load_split(data_dir, "val"), model.config.context_length)
    total, count = evaluate_windows(model, dataset, eval_windows(dataset), batch_size,
                                    device=next(model.parameters()).device)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": bits_per_byte(loss, manifest.val.tokens, manifest.val.bytes), "tokens": count}


EVALUATORS = {  # the evaluator names of the task registry (data/tasks.py): (model, tokenizer, records, labels)
    "completion": lambda model, tokenizer, records, labels: evaluate_completion(language_model(model), tokenizer,
                                                                                records),
    "classify": evaluate_classify,
    "mc": lambda model, tokenizer, records, labels: evaluate_multiple_choice(language_model(model), tokenizer,
                                                                             records),
    "translate": lambda model, tokenizer, records, labels, decoding=None: evaluate_translate(model, tokenizer,
                                                                                             records,
                                                                                             decoding=decoding),
    "chat": lambda model, tokenizer, records, labels, decoding=None: evaluate_chat(model, tokenizer, records,
                                                                                   decoding=decoding),
    "retrieval": lambda model, tokenizer, records, labels: evaluate_retrieval(language_model(model), tokenizer,
                                                                              records),
    **VISION_EVALUATORS,  # recognise, answer, read, describe, draw, edit (eval/vision.py)
    **SPEECH_EVALUATORS,  # transcribe, speak, say (eval/speech.py)
}


def evaluate_translate(model, tokenizer, records, max_new_tokens: int = 96, batch: int = 8,
                       decoding: Decoding | None = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu's defaults, on detokenized text) of the translations (greedy, or by
    `decoding`'s beam search), asked for through the chat template as the server asks."""
    import sacrebleu

    from ..data.translation import translation_messages

    model = language_model(model)
    limit = model.config.context_length
    prompts, budgets, fitting = [], [], []
    for index, (where, record) in enumerate(records):
        prompt = tokenizer.encode_chat(translation_messages(record, where)[:1], add_generation_prompt=True)
        if len(prompt) < limit:  # a prompt that leaves no room is scored as an empty translation
            prompts.append(prompt)
            budgets.append(min(max_new_tokens, limit - len(prompt)))
            fitting.append(index)
    hypotheses = [""] * len(records)
    for index, text in zip(fitting, decoded_replies(model, tokenizer, prompts, budgets, batch, decoding)):
        hypotheses[index] = text.split("\n")[0].strip()
    references = [record["target"].strip() for _, record in records]
    return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score, "examples": len(records),
            "prompts_over_context": len(records) - len(fitting)}


def evaluate_retrieval(model, tokenizer, records) -> dict:
    """Each record's query searches all the records' positives by embedding (adapt/embedding.py): recall@1,
    recall@10 and MRR over the whole pool."""
    from ..adapt.embedding import embed_texts, retrieval_scores

    queries = embed_texts(model, tokenizer, [record["query"] for _, record in records])
    documents = embed_texts(model, tokenizer, [record["positive"] for _, record in records])
    return {**retrieval_scores(queries, documents), "pool": len(records)}


def language_model(model):
    """The LM under a specialist (a classifier's base, or the model itself)."""
    return model.base if isinstance(model, SequenceClassifier) else model


def resolve_eval_task(spec: str, limit: int | None) -> tuple[Task, list, list[str] | None]:
    """(task, records, label names) of an eval spec: a built-in dataset (its test split) or TASK:FILE.jsonl."""
    if spec in BUILTIN:
        builtin = BUILTIN[spec]
        task = TASKS[builtin.task]
        labels = sorted({str(r["label"]) for _, r in builtin.records("train", None)}) if task.classifier else None
        return task, builtin.records("test", limit), labels
    measurable = [t.name for t in TASKS.values() if t.evaluator in EVALUATORS]
    if ":" in spec:
        name, path = spec.split(":", 1)
        if name not in measurable:
            raise ConfigError(f"unknown task {name!r} in {spec!r}; use one of {', '.join(measurable)} before ':'")
        own_splits = split_records(TASKS[name], path, "test", limit)  # an audio source: its test split
        if own_splits is not None:
            return TASKS[name], own_splits, None
        return TASKS[name], read_records(TASKS[name], path)[:limit], None
    raise ConfigError(f"unknown task {spec!r}; use perplexity, {', '.join(BUILTIN)}, "
                      f"or {'/'.join(n + ':' for n in measurable)}FILE.jsonl")


def run_tasks(model, tokenizer, tasks: list[str], data_dir: str | None = None, limit: int | None = None,
              decoding: Decoding | None = None) -> dict:
    """Evaluate each task spec; returns {task: metrics}. `decoding`: how translate and chat tasks decode (a beam
    search is refused where no task decodes)."""
    resolved = {spec: None if spec == "perplexity" else resolve_eval_task(spec, limit) for spec in tasks}
    if decoding is not None and decoding.beams > 1 and not any(
            r is not None and r[0].evaluator in DECODED for r in resolved.values()):
        raise ConfigError(f"--beams applies to the tasks scored on generated text ({', '.join(DECODED)}); "
                          f"none of {', '.join(tasks)} is one")
    results = {}
    for spec in tasks:
        if spec == "perplexity":
            if data_dir is None:
                raise ConfigError("task perplexity needs --data PREPARED_DIR (from `fmforge prepare`)")
            results[spec] = evaluate_perplexity(language_model(model), data_dir)
            continue
        task, records, labels = resolved[spec]
        options = {"decoding": decoding} if task.evaluator in DECODED else {}
        results[spec] = EVALUATORS[task.evaluator](model, tokenizer, records, labels, **options)
    return results


def markdown_report(results: dict, title: str) -> str:
    lines = [f"# {title}", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results.items():
        for name, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {task} | {name} | {shown} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: Path, title: str, meta: dict) -> None:
    from ..fileio import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", markdown_report(results, title))
