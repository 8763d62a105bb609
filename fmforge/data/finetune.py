"""Fine-tuning data: JSONL records -> token sequences with loss masks -> packed, batched rows.

Record formats (one JSON object per line; the task registry, data/tasks.py, names each task's fields):
    sft         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    completion  {"prompt": "...", "completion": "..."}
    classify    {"text": "...", "label": "..."}

An Example is a token list plus, per token, whether predicting it counts in the loss. Packing puts several
examples into one row of context_length tokens; an attention mask keeps each example to itself
(block-diagonal causal), so packed training computes what one-example-per-row training computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..tokenizer import Tokenizer
from .sources import lone_surrogate

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    tokens: list[int]
    loss_mask: list[bool]  # loss_mask[i]: the prediction of tokens[i] (from tokens[:i]) is trained
    media: list = field(default_factory=list)  # MediaPlacement of the prompt's media (row 0, positions in tokens)


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; DataError naming the line for bad JSON or fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        surrogate = lone_surrogate(record) if "\\u" in line else None
        if surrogate is not None:
            raise DataError(f"{path}:{number}: holds a lone UTF-16 surrogate ({surrogate}), which is not text — "
                            "fix the escape or remove the line")
        for name in fields:
            if name not in record:
                raise DataError(f"{path}:{number}: missing field '{name}' (fields present: {', '.join(record) or 'none'})")
        records.append((number, record))
    if not records:
        raise DataError(f"{path} has no records")
    return records


def _string(record: dict, name: str, where: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def chat_messages(record: dict, where: str) -> list[dict]:
    """The record's "messages", checked: a non-empty list of {"role": one of ROLES, "content": a string}."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: message {i} needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has unknown role {message['role']!r}; roles: {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{where}: message {i} content must be a string")
    return messages


def sft_example(record: dict, tokenizer: Tokenizer, where: str, train_on_all: bool = False) -> Example:
    """Chat messages rendered with the tokenizer's template; loss on assistant turns (or on everything)."""
    messages = chat_messages(record, where)
    if not train_on_all and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    # Special tokens split the text, so the tokens of a rendered prefix are a prefix of the tokens of the
    # whole conversation: each message's tokens are what its rendering adds.
    tokens: list[int] = []
    mask: list[bool] = []
    for i, message in enumerate(messages):
        rendered = tokenizer.encode_chat(messages[:i + 1])  # contents stay text: no forged markers
        if rendered[:len(tokens)] != tokens:
            raise DataError(f"{where}: chat template rendering is not prefix-stable at message {i}")
        new = rendered[len(tokens):]
        if message["role"] == "assistant" or train_on_all:
            # Train on everything after the role marker: the content and the closing <|end|>.
            role_id = tokenizer.token_id(f"<|{message['role']}|>")
            start = new.index(role_id) + 1 if role_id in new else 0
            mask += [False] * start + [True] * (len(new) - start)
        else:
            mask += [False] * len(new)
        tokens += new
    return Example(tokens, mask)


def completion_example(record: dict, tokenizer: Tokenizer, where: str) -> Example:
    """bos + prompt + completion + eos, loss on the completion and eos."""
    prompt = tokenizer.encode(_string(record, "prompt", where), add_bos=True)
    completion = tokenizer.encode(_string(record, "completion", where)) + [tokenizer.eos_id]
    return Example(prompt + completion, [False] * len(prompt) + [True] * len(completion))


def classify_text_ids(text: str, tokenizer: Tokenizer, max_length: int) -> list[int]:
    """The text's ids (after bos when the tokenizer adds one), truncated from the left so that the end of the
    text (nearest the head) is kept."""
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) <= max_length:
        return ids
    start = tokenizer.encode("", add_bos=True)  # [bos], or nothing for a tokenizer that adds none
    return start + ids[len(start):][-(max_length - len(start)):]


def split_of(record: dict, val_fraction: float, seed: int = 0) -> str:
    """Deterministic train/val assignment by a hash of the record's content."""
    digest = hashlib.sha1(f"{seed}:{json.dumps(record, sort_keys=True)}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


# ---- datasets -----------------------------------------------------------------------------------------------

class PackedDataset:
    """Examples packed into rows of `length` tokens (inputs and next-token targets).

    Rows are built once, in a seeded order; the batch stream permutes rows per epoch.
    With pack=False every example gets its own row. With keep_media, batches carry the examples' media
    placements ("media", for a model with understanding encoders, adapt/media.py).
    """

    def __init__(self, examples: list[Example], length: int, pad_id: int, seed: int = 0, pack: bool = True,
                 keep_media: bool = False):
        self.length, self.pad_id, self.keep_media = length, pad_id, keep_media
        self.truncated = 0
        order = np.random.default_rng(seed).permutation(len(examples)) if pack else np.arange(len(examples))
        rows: list[list[tuple[list[int], list[int], list]]] = []
        current: list[tuple[list[int], list[int], list]] = []
        used = 0
        for index in order:
            example = examples[int(index)]
            tokens, mask = example.tokens, example.loss_mask
            if len(tokens) > length + 1:
                tokens, mask = tokens[:length + 1], mask[:length + 1]
                self.truncated += 1
            inputs = tokens[:-1]
            targets = [t if m else -100 for t, m in zip(tokens[1:], mask[1:])]
            if not inputs or all(t == -100 for t in targets):
                continue
            if current and (not pack or used + len(inputs) > length):
                rows.append(current)
                current, used = [], 0
            media = [item for item in example.media if item.position < len(inputs)] if keep_media else []
            current.append((inputs, targets, media))
            used += len(inputs)
        if current:
            rows.append(current)
        if not rows:
            raise DataError("no trainable examples: every example is empty or has no tokens to learn")
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """{"input_ids", "targets", "attn_mask"}: (B, T), (B, T), (B, 1, T, T) bool (True = may attend), T the
        longest of these rows (padding past every row's end would be computed and thrown away). When every row holds
        one example there is no "attn_mask": plain causal attention computes the same (padding only follows)."""
        B = len(indices)
        T = max(sum(len(inputs) for inputs, *_ in self.rows[int(index)]) for index in indices)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        targets = torch.full((B, T), -100, dtype=torch.long)
        segment = torch.zeros((B, T), dtype=torch.long)  # example number within the row; padding = 0
        placed = []
        for b, index in enumerate(indices):
            position = 0
            for number, (inputs, row_targets, media) in enumerate(self.rows[int(index)], start=1):
                n = len(inputs)
                input_ids[b, position:position + n] = torch.tensor(inputs)
                targets[b, position:position + n] = torch.tensor(row_targets)
                segment[b, position:position + n] = number
                placed += [dataclasses.replace(item, row=b, position=position + item.position) for item in media]
                position += n
        batch = {"input_ids": input_ids, "targets": targets}
        if self.keep_media:
            batch["media"] = placed
        if all(len(self.rows[int(index)]) == 1 for index in indices):
            return batch
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = segment.unsqueeze(2) == segment.unsqueeze(1)  # (B, T, T)
        return {**batch, "attn_mask": (same & causal).unsqueeze(1)}

    def media_modalities(self) -> list[str]:
        """The modalities of the media the batches carry (keep_media), sorted."""
        return sorted({item.modality for row in self.rows for *_, media in row for item in media})

    def target_tokens(self) -> int:
        return sum(sum(t != -100 for t in targets) for row in self.rows for _, targets, _ in row)


class ClassificationDataset:
    """One text per row, right-padded; targets are label indices."""

    def __init__(self, texts: list[list[int]], labels: list[int], pad_id: int):
        self.texts, self.labels, self.pad_id = texts, labels, pad_id

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, indices) -> dict[str, torch.Tensor]:
        rows = [self.texts[int(i)] for i in indices]
        # Round the width up to a multiple of 32: a few distinct shapes keep CPU kernels (oneDNN) cached.
        T = -(-max(len(r) for r in rows) // 32) * 32
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, :len(row)] = torch.tensor(row)
        return {"input_ids": input_ids, "lengths": torch.tensor([len(r) for r in rows]),
                "targets": torch.tensor([self.labels[int(i)] for i in indices])}


# ---- classification ------------------------------------------------------------------------------------------

def label_set(records: list[tuple[str, dict]]) -> list[str]:
    labels = set()
    for where, record in records:
        label = record["label"]
        if not isinstance(label, (str, int)) or isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be a string or an integer")
        labels.add(str(label))
    if len(labels) < 2:
        raise DataError(f"classification needs at least 2 labels in the training data, found {sorted(labels)}")
    return sorted(labels)


def classification_data(records: list[tuple[str, dict]], labels: list[str], tokenizer: Tokenizer,
                        max_length: int) -> ClassificationDataset:
    index = {label: i for i, label in enumerate(labels)}
    texts, targets = [], []
    for where, record in records:
        label = str(record["label"])
        if label not in index:
            raise DataError(f"{where}: label {label!r} was not seen in training (labels: {', '.join(labels)})")
        texts.append(classify_text_ids(_string(record, "text", where), tokenizer, max_length))
        targets.append(index[label])
    return ClassificationDataset(texts, targets, tokenizer.pad_id)
