"""Pretraining: prepared token shards -> a foundation checkpoint (causal language modelling, or masked language
modelling for an encoder: model.objective mlm)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import yaml

from ..config import RunConfig
from ..adapt.media import base_readers, save_media_encoders
from ..checkpoint import load_tokenizer, resolve_checkpoint
from ..data.loader import MixtureDataset, PretrainBatches, WindowDataset, eval_windows
from ..data.shards import load_split, read_manifest
from ..errors import ConfigError, TokenizerError
from ..data.masking import mask_token_id, masked_batch, special_id_count
from .evaluation import bits_per_byte, evaluate_masked_windows, evaluate_windows
from ..model import Transformer
from ..modalities.encoders import HEADER, code_placements, media_features, new_image_reader
from ..modalities.stream import has_modality
from ..tokenizer import Tokenizer
from . import distributed, parallel
from ..device import keep_freed_memory, resolve_device
from .sizing import measure_step_seconds, pick_size
from .trainer import BUDGET_SHARE, Trainer, TrainResult, autocast_context, resolve_precision


def check_vocab(model_vocab: int | None, tokenizer: Tokenizer, where: str) -> int:
    """The model's vocabulary must hold every tokenizer id; None means 'take the tokenizer's size'."""
    if model_vocab is None:
        return tokenizer.vocab_size
    if model_vocab < tokenizer.vocab_size:
        raise TokenizerError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                             f"{model_vocab}; remove model.vocab_size to use the tokenizer's size")
    return model_vocab


def data_sources(cfg) -> list[tuple[Path, object, object, float]]:
    """(directory, manifest, tokenizer, weight) of train.data_dir, or of each train.mixture entry in order; every
    directory's shards must match its tokenizer, and all must share one text tokenizer (media codecs may differ
    only in that some directories have none)."""
    if cfg.mixture:
        entries = [(Path(str(path)), float(weight)) for path, weight in cfg.mixture.items()]
    elif cfg.data_dir:
        entries = [(Path(cfg.data_dir), 1.0)]
    else:
        raise ConfigError("train.data_dir is not set: point it at a directory made by `fmforge prepare` (or give "
                          "train.mixture: {DIR: weight, ...})")
    sources = []
    for directory, weight in entries:
        manifest = read_manifest(directory)
        tokenizer = load_tokenizer(directory)
        if tokenizer.fingerprint() != manifest.tokenizer_fingerprint:
            raise TokenizerError(f"{directory}: tokenizer.json does not match the tokenizer the shards were made "
                                 "with; re-run `fmforge prepare`")
        sources.append((directory, manifest, tokenizer, weight))
    texts = {getattr(t, "text", t).fingerprint() for _, _, t, _ in sources}
    media = {t.fingerprint() for _, _, t, _ in sources if hasattr(t, "codecs")}
    if len(texts) > 1 or len(media) > 1:
        raise TokenizerError("train.mixture directories were prepared with different tokenizers; prepare them all "
                             "with one (a media tokenizer extends the text one, so text and image data can mix)")
    return sources


def model_from_checkpoint(run: RunConfig, tokenizer) -> Transformer:
    """train.init_from: the checkpoint's model with the recipe's set model fields applied over its config (e.g. a
    longer context_length and a rope_scaling), its weights loaded; its tokenizer must be the data's."""
    from ..checkpoint import load_weights, read_model_config

    checkpoint = resolve_checkpoint(run.train.init_from)
    if load_tokenizer(checkpoint).fingerprint() != tokenizer.fingerprint():
        raise TokenizerError(f"train.init_from {checkpoint} was trained with another tokenizer than the data's; "
                             "prepare the data with the checkpoint's tokenizer (fmforge prepare --tokenizer)")
    config = read_model_config(checkpoint)
    changes = {name: getattr(run.model, name) for name in run.model_fields if name != "vocab_size"}
    run.model = dataclasses.replace(config, **changes)
    model = Transformer(run.model)
    load_weights(model, checkpoint)  # one line naming the tensor if a changed field changed a shape
    return model


def auto_size(run: RunConfig, resume: bool, device: torch.device, dist, quiet: bool) -> tuple[RunConfig, dict, float]:
    """train.size auto: (the run with the size chosen for its budget, what to record in run.yaml, seconds spent
    choosing). A resumed run keeps the size recorded when it started; without max_minutes nothing is chosen."""
    def say(text: str) -> None:
        if dist.is_main and not quiet:
            print(text, flush=True)

    if run.train.max_minutes is None:
        say("size auto picks a size for a time budget and none was given (--max_minutes): training the recipe's "
            "model section as written")
        return run, {}, 0.0
    run_yaml = Path(run.train.out_dir) / "run.yaml"
    if resume and run_yaml.is_file():
        recorded = yaml.safe_load(run_yaml.read_text()) or {}
        size = recorded.get("train", {}).get("size")
        if size in run.sizes:
            say(f"size auto: continuing with {size}, chosen when the run started")
            sizing = recorded.get("resolved", {}).get("sizing")
            return run.with_size(size), ({"sizing": sizing} if sizing else {}), 0.0
    started = time.perf_counter()
    precision = resolve_precision(run.train.precision, device)
    autocast = autocast_context(parallel.autocast_precision(precision, run.train, dist), device)

    def step_seconds(candidate: RunConfig) -> float:  # every process must choose alike: their mean
        seconds = measure_step_seconds(candidate, device, autocast)
        return float(distributed.all_reduce_mean(torch.tensor(seconds, dtype=torch.float64), dist))

    sized, record = pick_size(run, run.train.max_minutes * 60 * BUDGET_SHARE, step_seconds, say)
    spent = time.perf_counter() - started
    say(f"  (choosing took {spent:.1f} s of the budget)")
    return sized, {"sizing": {**record, "seconds_spent": round(spent, 3)}}, spent


def image_reader(run: RunConfig, tokenizer, tokenizer_dir: Path):
    """train.image_reader: the base's reader of image codes (modalities/encoders.ImageCodeReader), or ConfigError
    where it cannot be: a model without an image tokenizer, or an encoder (it has no captions to write)."""
    if not has_modality(tokenizer, "image"):
        raise ConfigError(f"train.image_reader needs data prepared with an image tokenizer; {tokenizer_dir}'s has "
                          "none (fmforge tokenizer train --modality image, then fmforge prepare image:...)")
    if not run.model.causal:
        raise ConfigError("train.image_reader is for decoders (image -> caption documents); this model is an encoder")
    if run.train.init_from:
        readers = base_readers(resolve_checkpoint(run.train.init_from))
        if "image" in readers:
            return readers["image"]
    return new_image_reader(tokenizer, run.model.n_embd, seed=0)


def reading_batches(get_batch, reader, tokenizer):
    """get_batch with the reader's features of every image that opens a document (image -> caption) as
    "added_embeds", and those images' codes taken out of the loss: the model reads them, it does not predict them."""
    def get(step: int, micro: int) -> dict:
        batch = get_batch(step, micro)
        targets, items = batch["targets"].clone(), []
        for row, ids in enumerate(batch["input_ids"].tolist()):
            found, spans = code_placements(tokenizer, ids, row, after_bos=True)
            items += found
            for start, end in spans:  # targets[p] is the id at p + 1: the codes lie at start + HEADER .. end - 2
                targets[row, start + HEADER - 1:end - 2] = -100
        added = media_features({"image": reader}, items, tuple(batch["input_ids"].shape),
                               reader.project.weight[:, 0])  # (n_embd,): the features' width, dtype, device
        return {**batch, "targets": targets} if added is None else {**batch, "targets": targets,
                                                                    "added_embeds": added}
    return get


def pretrain(run: RunConfig, resume: bool = False, quiet: bool = False) -> TrainResult:
    """Train run.model on the shards in run.train.data_dir; checkpoints and logs go to run.train.out_dir."""
    cfg = run.train
    sources = data_sources(cfg)
    data_dir, manifest = sources[0][0], sources[0][1]
    # The checkpoint's tokenizer: the one with the most ids (a media tokenizer over a text-only directory's).
    tokenizer_dir, tokenizer = max(((d, t) for d, _, t, _ in sources), key=lambda dt: dt[1].vocab_size)
    if not cfg.init_from:
        run.model.vocab_size = check_vocab(run.model.vocab_size, tokenizer, str(tokenizer_dir))

    device = resolve_device(cfg.device, "train.device")
    keep_freed_memory()  # before any timing: sizing measures steps as the run takes them
    dist = distributed.setup(device.type)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    try:
        budget_spent, resolved = 0.0, {}
        if cfg.size == "auto":
            run, resolved, budget_spent = auto_size(run, resume, device, dist, quiet)
            cfg = run.train
        torch.manual_seed(cfg.seed)
        model = (model_from_checkpoint(run, tokenizer) if cfg.init_from else Transformer(run.model)).to(device)
        T = run.model.context_length
        windows = [WindowDataset(load_split(d, "train"), T) for d, _, _, _ in sources]
        train_data = MixtureDataset(windows, [w for _, _, _, w in sources]) if len(windows) > 1 else windows[0]
        batches = PretrainBatches(train_data, cfg.batch_size, cfg.grad_accum, cfg.seed, dist.rank, dist.world_size)
        val_shards = load_split(data_dir, "val")
        val_data = WindowDataset(val_shards, T) if sum(len(s) for s in val_shards) > T else None
        if val_data is None and dist.is_main:
            print(f"warning: {data_dir} has no validation split (fewer than {T + 1} val tokens: a corpus of a "
                  "single document?), so there is no held-out eval; prepare it from more than one document",
                  file=sys.stderr)
        if dist.is_main and not quiet:
            print(f"model: {model.num_parameters():,} parameters | train: "
                  f"{sum(m.train.tokens for _, m, _, _ in sources):,} tokens ({len(train_data):,} windows of {T}) | val: {manifest.val.tokens:,} tokens | "
                  f"{cfg.batch_size * cfg.grad_accum * dist.world_size * T:,} tokens/step", flush=True)

        get_batch = batches.get
        reader = image_reader(run, tokenizer, tokenizer_dir) if cfg.image_reader else None
        if reader is not None:
            get_batch = reading_batches(batches.get, reader, tokenizer)
        if not run.model.causal:  # an encoder: the same windows, masked (BERT's 80/10/10 at train.mask_rate)
            text = getattr(tokenizer, "text", tokenizer)
            masking = dict(mask_rate=cfg.mask_rate, mask_id=mask_token_id(tokenizer),
                           n_special=special_id_count(tokenizer), vocab_size=text.vocab_size)

            def get_batch(step: int, micro: int) -> dict:
                seed = hash((cfg.seed, step, micro, dist.rank)) % 2**63  # ints hash alike in every process
                return masked_batch(batches.get(step, micro), seed=seed, **masking)

        def evaluate(m: torch.nn.Module, max_tokens: int | None, autocast) -> dict:
            if not run.model.causal:
                indices = eval_windows(val_data, max_tokens)[dist.rank::dist.world_size]
                sums = torch.tensor(evaluate_masked_windows(m, val_data, indices, cfg.batch_size, autocast, device,
                                                            seed=cfg.seed, **masking), dtype=torch.float64)
                total, correct, count = distributed.all_reduce_sum(sums, dist).tolist()
                return {"val_loss": total / max(count, 1), "val_masked_accuracy": correct / max(count, 1)}
            chosen = eval_windows(val_data, max_tokens)
            indices = chosen[dist.rank::dist.world_size]
            most_batches = -(-len(chosen[::dist.world_size]) // cfg.batch_size)  # rank 0's, the most
            total, count = evaluate_windows(m, val_data, indices, cfg.batch_size, autocast, device, most_batches)
            sums = distributed.all_reduce_mean(torch.tensor([total, float(count)], dtype=torch.float64), dist)
            loss = float(sums[0] / sums[1])
            bpb = bits_per_byte(loss, manifest.val.tokens, manifest.val.bytes)
            return {"val_loss": loss, "val_bpb": bpb}

        trainer = Trainer(model, run, get_batch, evaluate if val_data is not None else None, Path(cfg.out_dir),
                          tokenizer_dir, dist, device, resume=resume, quiet=quiet, budget_spent=budget_spent,
                          resolved=resolved, also_write=None if reader is None else
                          (lambda directory: save_media_encoders(directory, {"image": reader})))
        return trainer.fit()
    finally:
        distributed.teardown(dist)
