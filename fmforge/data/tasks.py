"""Built-in specialist tasks, made from the built-in corpus (the Python standard library) with `ast`.

    stdlib-docstring  completion  a function with its docstring removed -> the docstring's first line
    stdlib-body       completion  a function's signature and docstring -> its body
    stdlib-module     classify    a function's source -> the standard-library module it comes from
                                  (the 16 top-level modules/packages with the most eligible functions)

Functions of 40-900 characters are eligible (the docstring tasks also need a docstring whose first line
is 10-120 characters and a body after it). Each is assigned to train / val / test by a seeded hash of "module:qualified name" (80 / 10 / 10), so the splits
are fixed for a given Python version. The first N training records (in hash order) form the N-example set.
Note: the stdlib is also the pretraining corpus, so the base model has read these functions; the tasks
measure how cheaply a specialisation is learnt, not generalisation to unseen code.
"""

from __future__ import annotations

import ast
import hashlib
import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

from ..errors import DataError
from .sources import stdlib_files

BUILTIN_TASKS = {"stdlib-docstring": "completion", "stdlib-body": "completion", "stdlib-module": "classify"}
SPLIT_SEED = "fmforge-tasks-v1"
MAX_SOURCE_CHARS = 900
N_MODULES = 16


def _functions(path: Path, root: Path):
    """(module, qualified name, source, docstring first line, source without docstring, head) per function."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    relative = path.relative_to(root)
    module = relative.parts[0].removesuffix(".py")
    lines = text.splitlines(keepends=True)

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from describe(child, f"{prefix}{child.name}")

    def describe(fn, qualname):
        start, end = fn.lineno - 1, fn.end_lineno
        indent = len(lines[start]) - len(lines[start].lstrip())
        source = "".join(line[indent:] if line[:indent].isspace() else line for line in lines[start:end])
        if len(source) > MAX_SOURCE_CHARS or "\t" in source or len(source) < 40:
            return
        doc = ast.get_docstring(fn, clean=True)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if not 10 <= len(first) <= 120 or len(fn.body) < 2:
            yield module, qualname, source, None, None, None  # usable for stdlib-module only
            return
        doc_node = fn.body[0]
        body_start = fn.body[1].lineno - fn.lineno  # line offset of the first statement after the docstring
        doc_start, doc_end = doc_node.lineno - fn.lineno, doc_node.end_lineno - fn.lineno + 1
        src_lines = source.splitlines(keepends=True)
        without_doc = "".join(src_lines[:doc_start] + src_lines[doc_end:])
        head = "".join(src_lines[:body_start])  # signature + docstring
        yield module, qualname, source, first, without_doc, head

    yield from visit(tree, "")


@lru_cache(maxsize=1)
def _all_functions() -> tuple:
    root = None
    found = []
    files = stdlib_files()
    if not files:
        raise DataError("the Python standard library was not found, so the built-in tasks cannot be made")
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in files:
        found.extend(_functions(path, root))
    return tuple(found)


def _split(module: str, qualname: str) -> tuple[str, str]:
    digest = hashlib.sha1(f"{SPLIT_SEED}:{module}:{qualname}".encode()).hexdigest()
    value = int(digest[:8], 16) / 16**8
    return ("train" if value < 0.8 else "val" if value < 0.9 else "test"), digest


def task_records(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs of a built-in task's split ("train", "val" or "test")."""
    if name not in BUILTIN_TASKS:
        raise DataError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use train, val or test")
    functions = _all_functions()
    if name == "stdlib-module":
        counts = Counter(module for module, *_ in functions)
        modules = {m for m, _ in counts.most_common(N_MODULES)}
        functions = [f for f in functions if f[0] in modules]
    chosen = []
    for module, qualname, source, first, without_doc, head in functions:
        which, digest = _split(module, qualname)
        if which != split or (first is None and name != "stdlib-module"):
            continue
        if name == "stdlib-docstring":
            record = {"prompt": without_doc.rstrip() + "\n# Summary:", "completion": " " + first}
        elif name == "stdlib-body":
            record = {"prompt": head, "completion": source[len(head):]}
            if not record["completion"].strip() or not source.startswith(head):
                continue
        else:
            record = {"text": source, "label": module}
        chosen.append((digest, f"{name}:{split}:{module}.{qualname}", record))
    chosen.sort(key=lambda item: item[0])
    records = [(where, record) for _, where, record in chosen]
    return records[:limit] if limit is not None else records


def write_task(name: str, out_dir: Path) -> dict[str, int]:
    """Write train/val/test JSONL files of a built-in task; returns record counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val", "test"):
        records = task_records(name, split)
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _, record in records:
                f.write(json.dumps(record) + "\n")
        counts[split] = len(records)
    return counts
