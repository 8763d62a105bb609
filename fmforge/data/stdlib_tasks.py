"""Built-in datasets for the specialist tasks, made from the built-in corpus (the Python standard library) with `ast`.

    stdlib-docstring  completion  a function with its docstring removed -> the docstring's first line
    stdlib-body       completion  a function's signature and docstring -> its body
    stdlib-module     classify    a function's source -> the standard-library module it comes from
                                  (the 16 top-level modules/packages with the most eligible functions)

Functions and methods of 40-900 characters are eligible (the docstring tasks also need a docstring whose
first line is 10-120 characters and a body after it). Duplicates are dropped before anything is split: two
functions whose syntax trees are equal once every string constant is blanked (the same code with another
docstring, codec name or message, like the `getregentry` of every codec in `encodings`) count as one, the
first in file order. Each remaining function is assigned to train / val / test by a seeded hash of
"file path:qualified name" (80 / 10 / 10), so the splits are fixed for a given Python version and no function
is in two splits. The first N training records (in hash order) form the N-example set.
Note: the stdlib is also the pretraining corpus, so the base model has read these functions; the tasks
measure how cheaply a specialisation is learnt, not generalisation to unseen code.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import sysconfig
from collections import Counter
from functools import lru_cache
from pathlib import Path

from ..errors import DataError
from .sources import stdlib_files

NAMES = ("stdlib-docstring", "stdlib-body", "stdlib-module")
SPLIT_SEED = "fmforge-tasks-v2"
MAX_SOURCE_CHARS = 900
N_MODULES = 16


class _BlankStrings(ast.NodeTransformer):
    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        return ast.Constant("") if isinstance(node.value, str) else node


def _shape(fn: ast.AST) -> str:
    """A function's syntax tree with every string constant blanked: equal for copies that differ only in
    docstrings, string literals, comments or layout."""
    return ast.dump(_BlankStrings().visit(copy.deepcopy(fn)))


def _functions(path: Path, root: Path):
    """(module, file, qualified name, source, docstring first line, source without docstring, head, shape)
    per function or method (nested classes included)."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    relative = path.relative_to(root)
    module, file = relative.parts[0].removesuffix(".py"), relative.as_posix()
    lines = text.splitlines(keepends=True)

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from describe(child, f"{prefix}{child.name}")

    def describe(fn, qualname):
        start, end = fn.lineno - 1, fn.end_lineno
        indent = len(lines[start]) - len(lines[start].lstrip())
        # Dedent a method; a blank line stays a line break (its indentation may be shorter than the method's).
        source = "".join("\n" if not line.strip() else line[indent:] if line[:indent].isspace() else line
                         for line in lines[start:end])
        if len(source) > MAX_SOURCE_CHARS or "\t" in source or len(source) < 40:
            return
        shape = _shape(fn)
        doc = ast.get_docstring(fn, clean=True)
        first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
        if not 10 <= len(first) <= 120 or len(fn.body) < 2:
            yield module, file, qualname, source, None, None, None, shape  # usable for stdlib-module only
            return
        doc_node = fn.body[0]
        body_start = fn.body[1].lineno - fn.lineno  # line offset of the first statement after the docstring
        doc_start, doc_end = doc_node.lineno - fn.lineno, doc_node.end_lineno - fn.lineno + 1
        src_lines = source.splitlines(keepends=True)
        without_doc = "".join(src_lines[:doc_start] + src_lines[doc_end:])
        head = "".join(src_lines[:body_start])  # signature + docstring
        yield module, file, qualname, source, first, without_doc, head, shape

    yield from visit(tree, "")


@lru_cache(maxsize=1)
def _all_functions() -> tuple:
    """Every eligible function of the stdlib, without duplicates (see the module docstring)."""
    files = stdlib_files()
    if not files:
        raise DataError("the Python standard library was not found, so the built-in tasks cannot be made")
    root = Path(sysconfig.get_paths()["stdlib"])
    found, seen = [], set()
    for path in files:
        for function in _functions(path, root):
            shape = function[-1]
            if shape not in seen:
                seen.add(shape)
                found.append(function[:-1])
    return tuple(found)


def _split(file: str, qualname: str) -> tuple[str, str]:
    digest = hashlib.sha1(f"{SPLIT_SEED}:{file}:{qualname}".encode()).hexdigest()
    value = int(digest[:8], 16) / 16**8
    return ("train" if value < 0.8 else "val" if value < 0.9 else "test"), digest


def task_records(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs of a built-in task's split ("train", "val" or "test")."""
    if name not in NAMES:
        raise DataError(f"unknown built-in dataset {name!r}; built-in datasets: {', '.join(NAMES)}")
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use train, val or test")
    functions = _all_functions()
    if name == "stdlib-module":
        counts = Counter(module for module, *_ in functions)
        modules = {m for m, _ in counts.most_common(N_MODULES)}
        functions = [f for f in functions if f[0] in modules]
    chosen = []
    for module, file, qualname, source, first, without_doc, head in functions:
        which, digest = _split(file, qualname)
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
        chosen.append((digest, f"{name}:{split}:{file}:{qualname}", record))
    chosen.sort(key=lambda item: item[0])
    records = [(where, record) for _, where, record in chosen]
    return records[:limit] if limit is not None else records
