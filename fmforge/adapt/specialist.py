"""Load a specialist for use: a base, a base + LoRA adapter, or a full fine-tune, with its head if it has one.

Every stage that runs a specialist (chat, eval, the server, the benchmarks) loads it here, not through the stage
that trained it.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import HEAD_FILE, load_model_and_tokenizer, read_finetune_record, resolve_adapter
from .heads import load_classifier
from .lora import load_adapter
from .media import read_media_encoders


def load_specialist(checkpoint: str | Path, adapter: str | Path | None = None, device="cpu"):
    """(model, tokenizer, base checkpoint, fine-tuning record) for a base, a base + adapter, or a full fine-tune.

    `model` is a SequenceClassifier when the specialist is a classifier, else a Transformer (with its understanding
    encoders, if any, as `model.media_encoders`); the record is {} for a plain base.
    """
    model, tokenizer, base_checkpoint = load_model_and_tokenizer(checkpoint, device)
    head_dir = base_checkpoint if (base_checkpoint / HEAD_FILE).exists() else None
    info = read_finetune_record(base_checkpoint)
    if adapter is not None:
        adapter_dir = resolve_adapter(adapter)
        load_adapter(model, adapter_dir, base_checkpoint)
        info = read_finetune_record(adapter_dir) or info
        if (adapter_dir / HEAD_FILE).exists():
            head_dir = adapter_dir
    if head_dir is not None:
        model = load_classifier(model, head_dir)
    else:  # the understanding encoders a generative specialist trained (the engine finds them here)
        model.media_encoders = read_media_encoders(adapter_dir if adapter is not None else base_checkpoint, device)
    model.eval()
    return model, tokenizer, base_checkpoint, info
