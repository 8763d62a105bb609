"""Specialise a foundation checkpoint: full fine-tuning or LoRA, on any trainable task of the registry
(data/tasks.py: sft, completion, classify, lm).

The output directory is a training run (checkpoints/, latest, metrics.jsonl, loss.png). With LoRA, every
checkpoint holds only the adapter (PEFT layout) and, for classification, the head; when training ends the
final adapter is also copied to the top of the output directory, so `--adapter OUT` and
`peft.PeftModel.from_pretrained` both find it. The base checkpoint is only ever read.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..adapt.embedding import ContrastiveEmbedder, PairDataset
from ..adapt.heads import SequenceClassifier, head_pooling
from ..adapt.lora import LoRAConfig, inject_lora, load_adapter_weights, write_adapter
from ..adapt.media import (MEDIA_ENCODER_FILE, MediaEncoded, base_readers, load_media_encoders_into,
                           save_media_encoders)
from ..config import TrainConfig, load_recipe
from ..data import finetune as ft
from ..data.loader import PretrainBatches, WindowDataset
from ..data.tasks import (BUILTIN, EMBEDDING_HEAD, TASKS, Task, get_task, lm_examples, read_records, split_records,
                          trainable_tasks)
from ..errors import ConfigError, DataError, SettingsMismatchError
from ..checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_RECORD, HEAD_FILE, LABELS_FILE, atomic_copy_files,
                          fingerprint_checkpoint, load_model_and_tokenizer, load_weights, read_finetune_record,
                          write_finetune_record, write_model_files)
from ..device import keep_freed_memory, resolve_device
from ..modalities.encoders import MEDIA_ENCODERS, new_media_encoders
from ..modalities.stream import has_modality
from . import distributed
from .trainer import Trainer, TrainResult, count_targets, to_device

ADAPTER_FILES = [ADAPTER_WEIGHTS, HEAD_FILE, LABELS_FILE, FINETUNE_RECORD, ADAPTER_CONFIG, MEDIA_ENCODER_FILE]
# Tasks whose prompts hold media: --media-encoder on trains understanding encoders for them. Off by default: on the
# vision benchmark's base, a 2-minute recognise LoRA scored 0.732 on 500 MNIST val digits with an encoder (125
# steps) and 0.762 without (140 steps); answer, read and FSDD transcription were level or worse on weaker bases
# (benchmarks/RESULTS.md, "vision"). The encoder costs 12-20% of the steps; at these budgets it does not repay them.
IMAGE_PROMPT_TASKS = ("recognise", "describe", "answer", "read", "edit")  # the vision tasks among them
MEDIA_PROMPT_TASKS = IMAGE_PROMPT_TASKS + ("transcribe", "say")
# Fine-tuning defaults differ from pretraining: fewer steps, lower peak lr for full fine-tuning.
FINETUNE_DEFAULTS = dict(max_steps=200, warmup_steps=10, eval_interval=50, checkpoint_interval=100,
                         batch_size=8, log_interval=10, weight_decay=0.0)


@dataclass
class FinetuneSpec:
    checkpoint: str
    data: str  # a JSONL file, a prepared shard directory (task lm), or a built-in task name
    task: str | None = None  # inferred for built-in tasks
    method: str = "lora"
    out: str = "runs/finetune"
    val_data: str | None = None
    val_fraction: float = 0.1
    limit: int | None = None  # use only the first N training records
    val_limit: int = 500  # validation records of a built-in dataset or a source with its own splits (the first ones)
    train_on_all: bool = False  # sft: loss on every token, not only assistant turns
    pack: bool = True
    pooling: str = "mean"  # classify: how the head reads the hidden states (mean of every token, or the last)
    head_lr_scale: float = 1.0  # classify: the fresh head trains at this multiple of the lr
    temperature: float = 0.05  # embed: InfoNCE's softmax temperature over cosine similarities
    media_encoder: str = "off"  # on: train understanding encoders (modalities/encoders.py) for the prompt's
    #   media (tasks of MEDIA_PROMPT_TASKS); off: the model reads their codes only
    speed_perturb: tuple = ()  # transcribe: every training utterance also at these speeds (perturbed_speech)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(target_modules=None))  # None: the task's default


def default_lora_targets(task: Task) -> list[str]:
    """A task's LoRA targets unless told: attention and MLP, and the token embedding where the prompt holds an
    image or the task is a classifier (RESULTS.md, "transfer"). A base's image codes mean what pretraining made of
    them, mostly for drawing (their rows are also the output layer's); reading them for a task re-weighs them:
    MNIST recognise, 140 steps on the vision benchmark's base, 0.668 vs 0.572 on 500 val digits (RESULTS.md,
    "vision"). Audio tasks, say (an image -> speech) among them, were not measured and keep attention and MLP."""
    return ["all-linear", "embed_tokens"] if task.name in IMAGE_PROMPT_TASKS or task.classifier else ["all-linear"]


def default_lr(method: str) -> float:
    return 1e-3 if method == "lora" else 3e-4


@dataclass
class TaskData:
    """A task's training and validation data, validated before anything is written."""
    task: Task
    train: object  # PackedDataset, ClassificationDataset or WindowDataset
    val: object | None
    labels: list[str] | None = None  # a classifier's label names


def load_task_records(spec: FinetuneSpec) -> tuple[Task, list, list]:
    """(task, train records, val records) of a built-in dataset or a JSONL file."""
    if spec.data in BUILTIN:
        builtin = BUILTIN[spec.data]
        if spec.task not in (None, builtin.task):
            raise ConfigError(f"built-in dataset {spec.data} is a {builtin.task} task, not {spec.task}")
        return TASKS[builtin.task], builtin.records("train", spec.limit), builtin.records("val", spec.val_limit)
    if spec.task is None:
        raise ConfigError(f"give --task ({', '.join(trainable_tasks())}) for {spec.data}")
    task = get_task(spec.task, trainable=True)
    own_splits = split_records(task, spec.data, "train", spec.limit)
    if own_splits is not None:  # a source with its own splits (an audio source): its train and val
        return task, own_splits, split_records(task, spec.data, "val", spec.val_limit)
    records = read_records(task, spec.data)
    if spec.val_data:
        train, val = records, read_records(task, spec.val_data)
    else:
        train = [(w, r) for w, r in records if ft.split_of(r, spec.val_fraction) == "train"]
        val = [(w, r) for w, r in records if ft.split_of(r, spec.val_fraction) == "val"]
        if not train:
            train, val = records, []
    if spec.limit is not None:
        train = train[:spec.limit]
    return task, train, val


def load_task_data(spec: FinetuneSpec, tokenizer, base_checkpoint: Path, length: int, seed: int,
                   quiet: bool, readers: dict | None = None) -> TaskData:
    """The task's datasets: token windows of prepared shards (lm), labelled texts (a classifier head), or packed
    examples with loss masks (the other LM-head tasks)."""
    if spec.task == "lm" or (spec.task is None and Path(spec.data, "manifest.json").exists()):
        from ..data.shards import load_split, read_manifest
        manifest = read_manifest(spec.data)
        if manifest.tokenizer_fingerprint != tokenizer.fingerprint():
            raise DataError(f"{spec.data} was tokenized with a different tokenizer than {base_checkpoint}")
        val_shards = load_split(spec.data, "val")
        return TaskData(TASKS["lm"], WindowDataset(load_split(spec.data, "train"), length),
                        WindowDataset(val_shards, length) if sum(len(s) for s in val_shards) > length else None)
    task, train_records, val_records = load_task_records(spec)
    if spec.speed_perturb:
        train_records = perturbed_speech(task, train_records, spec.speed_perturb, tokenizer)
    if task.head == EMBEDDING_HEAD:  # (query, positive) pairs; the rest of the batch is each query's negatives
        return TaskData(task, PairDataset(train_records, tokenizer, length),
                        PairDataset(val_records, tokenizer, length) if len(val_records) > 1 else None)
    if task.classifier:
        labels = ft.label_set(train_records)
        return TaskData(task, ft.classification_data(train_records, labels, tokenizer, length),
                        ft.classification_data(val_records, labels, tokenizer, length) if val_records else None,
                        labels)

    keep_media = uses_media_encoder(spec, task, tokenizer, readers) or bool(prompt_readers(task, readers))

    def packed(records):
        return ft.PackedDataset(lm_examples(task, records, tokenizer, spec.train_on_all), length,
                                tokenizer.pad_id, seed=seed, pack=spec.pack, keep_media=keep_media)

    data = TaskData(task, packed(train_records), packed(val_records) if val_records else None)
    if data.train.truncated and not quiet:
        print(f"warning: {data.train.truncated} training examples are longer than the context ({length} tokens) "
              "and were truncated", file=sys.stderr)
    return data


def perturbed_speech(task: Task, records: list, speeds, tokenizer) -> list:
    """The records, then each again with its prompt's utterance at every speed of `speeds` (tempo and pitch
    together, by resampling: Kaldi's 0.9 / 1.1 speed perturbation, Ko et al. 2015): more voices from the same
    recordings. It needs steps to pay: at the audio benchmark's 0.8-minute leave-one-speaker-out budget it scored
    0.465 against 0.500 without (RESULTS.md, "audio"), so nothing turns it on by default."""
    from ..data.audio import resample
    from ..data.speech import codec_rate, record_audio

    if task.name != "transcribe":
        raise ConfigError(f"--speed-perturb is for transcribe (speech in the prompt), not {task.name}")
    for speed in speeds:
        if not 0.5 <= speed <= 2.0:
            raise ConfigError(f"--speed-perturb speeds must lie in [0.5, 2], got {speed:g}")
    rate = codec_rate(tokenizer)
    out = list(records)
    for where, record in records:
        wave = record_audio(record, "audio", where, tokenizer)
        out += [(f"{where}@speed{speed:g}", {**record, "audio": resample(wave, round(rate * speed), rate)})
                for speed in speeds if speed != 1.0]
    return out


def prompt_readers(task: Task, readers: dict | None) -> dict:
    """The base's readers (adapt/media.base_readers) that a task's prompts feed: a base that learnt to read images
    keeps reading them in every specialist whose prompt holds one."""
    return (readers or {}) if task.name in IMAGE_PROMPT_TASKS + ("say",) else {}


def uses_media_encoder(spec: FinetuneSpec, task: Task, tokenizer, readers: dict | None = None) -> bool:
    """Whether this run trains understanding encoders (--media-encoder on); ConfigError where it cannot."""
    if spec.media_encoder not in ("on", "off"):
        raise ConfigError(f"--media-encoder must be on or off, got {spec.media_encoder!r}")
    if spec.media_encoder == "off":
        return False
    if readers:
        raise ConfigError("--media-encoder on: this base reads images itself (pretrained with train.image_reader); "
                          "its specialists use that reader")
    if not any(has_modality(tokenizer, name) for name in MEDIA_ENCODERS) or task.name not in MEDIA_PROMPT_TASKS:
        raise ConfigError(f"--media-encoder on needs a task whose prompts hold media "
                          f"({', '.join(MEDIA_PROMPT_TASKS)}; not {task.name}) and a base with an image or audio "
                          "tokenizer")
    return True


def specialist_model(spec: FinetuneSpec, data: TaskData, base_model, tokenizer=None, readers: dict | None = None):
    """The model that trains: the base (LM head) or the base under a new classifier head, with LoRA injected or
    every weight trainable; with understanding encoders (trained in full) when the data carries media, or the
    base's own readers (frozen) where it has them."""
    model = SequenceClassifier(base_model, data.labels, spec.pooling) if data.task.classifier else base_model
    if data.task.head == EMBEDDING_HEAD:
        model = ContrastiveEmbedder(base_model, spec.temperature)
    if spec.method == "lora":
        inject_lora(base_model, spec.lora)
        if data.task.classifier:
            model.score.weight.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    kinds = data.train.media_modalities() if getattr(data.train, "keep_media", False) else []
    if kinds and readers:  # the base's own (images): a prompt's other media are read as their codes only
        model = MediaEncoded(model, {name: readers[name] for name in kinds if name in readers})
    elif kinds:  # an encoder for each modality the prompts hold
        rms = float(base_model.embed_tokens.weight.detach().float().pow(2).mean().sqrt())
        model = MediaEncoded(model, new_media_encoders(tokenizer, base_model.config.n_embd, kinds, scale=rms))
    return model


def finetune(spec: FinetuneSpec, overrides: list[str] | None = None, resume: bool = False,
             quiet: bool = False) -> TrainResult:
    if spec.method not in ("full", "lora"):
        raise ConfigError(f"--method must be full or lora, got {spec.method!r}")
    if not spec.head_lr_scale > 0:
        raise ConfigError(f"--head-lr-scale must be > 0, got {spec.head_lr_scale}")
    base_model, tokenizer, base_checkpoint = load_model_and_tokenizer(spec.checkpoint)
    run = load_recipe(None, [f"--train.{k}={v}" for k, v in {**FINETUNE_DEFAULTS, "lr": default_lr(spec.method),
                                                               "out_dir": spec.out}.items()] + (overrides or []))
    run.model, run.preset = base_model.config, None
    cfg: TrainConfig = run.train
    readers = base_readers(base_checkpoint)
    data = load_task_data(spec, tokenizer, base_checkpoint, base_model.config.context_length, cfg.seed, quiet,
                          readers)
    task = data.task
    if spec.lora.target_modules is None:
        spec = dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, target_modules=default_lora_targets(task)))
    if not task.classifier and spec.head_lr_scale != 1.0:
        raise ConfigError(f"--head-lr-scale is for --task classify (its head); this task is {task.name}")
    if not spec.temperature > 0:
        raise ConfigError(f"--temperature must be > 0, got {spec.temperature}")
    if task.head == EMBEDDING_HEAD and cfg.batch_size < 2:
        raise ConfigError("--task embed needs batch_size >= 2: the other pairs of a batch are the negatives")

    device = resolve_device(cfg.device, "train.device")
    keep_freed_memory()  # before any timing: sizing measures steps as the run takes them
    dist = distributed.setup(device.type)
    torch.manual_seed(cfg.seed)
    model = specialist_model(spec, data, base_model, tokenizer, prompt_readers(task, readers))
    model = model.train().to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = {"task": task.name, "method": spec.method, "base_checkpoint": str(base_checkpoint),
            "base_fingerprint": fingerprint_checkpoint(base_checkpoint), "data": spec.data,
            "train_examples": len(data.train), "trainable_parameters": trainable, "total_parameters": total}
    if task.classifier:
        info.update(pooling=spec.pooling, head_lr_scale=spec.head_lr_scale)
    if task.head == EMBEDDING_HEAD:
        info.update(temperature=spec.temperature)
    if isinstance(model, MediaEncoded):
        info.update(media_encoders=sorted(model.encoders))
    if dist.is_main and not quiet:
        print(f"{spec.method} fine-tuning for {task.name}: {trainable:,} of {total:,} parameters train "
              f"({100 * trainable / total:.2f}%) | {len(data.train):,} training rows", flush=True)
    files = SpecialistFiles(spec, data, model, base_model, base_checkpoint, info)
    batches = PretrainBatches(data.train, cfg.batch_size, cfg.grad_accum, cfg.seed, dist.rank, dist.world_size)
    evaluate = make_evaluator(task, data.val, cfg.batch_size, device, dist) if data.val is not None else None
    try:
        trainer = Trainer(model, run, batches.get, evaluate, Path(cfg.out_dir), base_checkpoint, dist, device,
                          resume=resume, quiet=quiet, save_files=files.save, load_files=files.load,
                          lr_scale={p: spec.head_lr_scale for p in model.score.parameters()} if task.classifier
                          else None)
        result = trainer.fit()
        if dist.is_main and spec.method == "lora" and result.checkpoint is not None:
            atomic_copy_files(result.checkpoint, Path(cfg.out_dir), ADAPTER_FILES)
        return result
    finally:
        distributed.teardown(dist)


@dataclass
class SpecialistFiles:
    """What a fine-tuning checkpoint holds (the record, the adapter or the full weights, the head) and the checks
    that a checkpoint being resumed was made with the same settings."""
    spec: FinetuneSpec
    data: TaskData
    model: object
    base_model: object
    base_checkpoint: Path
    info: dict

    def save(self, directory: Path) -> None:
        write_finetune_record(directory, {**self.info, "labels": self.data.labels})
        if self.spec.method == "lora":
            write_adapter(directory, self.base_model, self.spec.lora, self.base_checkpoint,
                          self.info["base_fingerprint"], extra={"task": self.data.task.name, "labels": self.data.labels})
        else:
            write_model_files(directory, self.base_model, self.base_checkpoint)
        if self.data.task.classifier:
            self.model.save_head(directory)
        if isinstance(self.model, MediaEncoded):
            save_media_encoders(directory, self.model.encoders)

    def load(self, checkpoint: Path) -> None:
        self.check_settings(checkpoint)
        if self.spec.method == "lora":
            load_adapter_weights(self.base_model, checkpoint)
        else:
            load_weights(self.base_model, checkpoint)
        if self.data.task.classifier:
            self.model.load_head(checkpoint)
        if isinstance(self.model, MediaEncoded):
            load_media_encoders_into(self.model.encoders, checkpoint)

    def check_settings(self, checkpoint: Path) -> None:
        saved = read_finetune_record(checkpoint)
        if (saved.get("base_fingerprint") != self.info["base_fingerprint"] or saved.get("task") != self.info["task"]
                or saved.get("method") != self.spec.method):
            raise SettingsMismatchError(f"cannot resume {checkpoint}: it was trained with another base, task or "
                                        "method")
        if saved.get("media_encoders", []) != self.info.get("media_encoders", []):
            raise SettingsMismatchError(f"cannot resume {checkpoint}: it trained media encoders "
                                        f"{saved.get('media_encoders', []) or 'none'}, this run "
                                        f"{self.info.get('media_encoders', []) or 'none'} (--media-encoder)")
        if self.data.task.classifier:
            pooling, head_lr_scale = head_pooling(checkpoint), saved.get("head_lr_scale", 1.0)
            if pooling != self.spec.pooling:
                raise SettingsMismatchError(f"cannot resume {checkpoint}: its head pools {pooling!r}, "
                                            f"not {self.spec.pooling!r} (--pooling)")
            if head_lr_scale != self.spec.head_lr_scale:
                raise SettingsMismatchError(f"cannot resume {checkpoint}: its head trained at {head_lr_scale:g} x "
                                            f"the lr, not {self.spec.head_lr_scale:g} (--head-lr-scale)")


def eval_rows(val_data, max_tokens: int | None) -> list[int]:
    """Evenly spaced validation rows holding about `max_tokens` input tokens (every row when None): the
    periodic evals read `train.eval_tokens`, the final one the whole split."""
    if max_tokens is None:
        return list(range(len(val_data)))
    if isinstance(val_data, ft.ClassificationDataset):
        row_tokens = sum(len(text) for text in val_data.texts) / len(val_data)
    else:
        row_tokens = val_data.length  # packed rows and pretraining windows are full width
    n = min(len(val_data), max(1, round(max_tokens / row_tokens)))
    return np.linspace(0, len(val_data) - 1, n).round().astype(int).tolist()


def make_evaluator(task: Task, val_data, batch_size: int, device, dist):
    """Validation: loss per target token (and accuracy for classification; for embed, in-batch top-1)."""
    scores_choice = task.classifier or task.head == EMBEDDING_HEAD

    @torch.no_grad()
    def evaluate(model, max_tokens, autocast) -> dict:
        was_training = model.training
        model.eval()
        indices = eval_rows(val_data, max_tokens)[dist.rank::dist.world_size]
        loss_sum = correct = count = 0.0
        for start in range(0, len(indices), batch_size):
            batch = to_device(val_data.batch(indices[start:start + batch_size]), device)
            with autocast:
                out = model(**batch, reduction="sum", return_logits=scores_choice)
            loss_sum += float(out.loss)
            count += count_targets(batch)
            if scores_choice:
                correct += float((out.logits.argmax(-1) == batch["targets"]).sum())
        totals = distributed.all_reduce_sum(torch.tensor([loss_sum, correct, count], dtype=torch.float64), dist)
        model.train(was_training)
        result = {"val_loss": float(totals[0] / max(totals[2], 1))}
        if scores_choice:
            result["val_accuracy"] = float(totals[1] / max(totals[2], 1))
        return result

    return evaluate
