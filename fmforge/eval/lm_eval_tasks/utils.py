"""Datasets of the local lm-eval tasks: JSON-lines files beside this module (no download)."""

import json
from pathlib import Path


def load_jsonl(file: str, **metadata):
    """{"test": datasets.Dataset} from a .jsonl file in this directory (lm-eval's `custom_dataset` hook)."""
    import datasets

    rows = [json.loads(line) for line in Path(__file__).with_name(file).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
