"""Built-in datasets for the specialist tasks, made from the built-in corpus (the Python standard library) with `ast`.

    stdlib-docstring  completion  a function with its docstring removed -> the docstring's first line
    stdlib-body       completion  a function's signature and docstring -> its body
    stdlib-module     classify    a function's source -> the standard-library module it comes from
                                  (the 16 top-level modules/packages with the most eligible functions)
    stdlib-chat       sft         chat records {"messages": [...], "kind": ...} about a function: "write a function
                                  that <docstring's first line>" -> the function; "explain this function: <code
                                  without its docstring>" -> the docstring's first line; "which module is this
                                  from?" -> "It comes from `<module>`."; and two-turn conversations that ask a
                                  follow-up question about the same function (kinds write, explain, module,
                                  explain+module, write+module, module+explain)

Functions and methods of 40-900 characters are eligible (the docstring tasks also need a docstring whose
first line is 10-120 characters and a body after it). Duplicates are dropped before anything is split: two
functions whose syntax trees are equal once every string constant is blanked (the same code with another
docstring, codec name or message, like the `getregentry` of every codec in `encodings`) count as one, the
first in file order. Each remaining function is assigned to train / val / test by a seeded hash of
"file path:qualified name" (80 / 10 / 10), so the splits are fixed for a given Python version and no function
is in two splits. The first N training records (in hash order) form the N-example set.
stdlib-chat uses the same split (a test function of one set is a test function of all four), the functions that
have a docstring, at most MAX_CHAT_SOURCE_CHARS characters (so that every record fits the quickstart's 256-token
context), and code that does not show the docstring's first line elsewhere; more of the seeded hash picks each
record's kind and each question's phrasing (CHAT_QUESTIONS, FOLLOW_UPS).
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
from typing import NamedTuple

from ..errors import DataError
from .sources import stdlib_files

NAMES = ("stdlib-docstring", "stdlib-body", "stdlib-module", "stdlib-chat", "stdlib-search")
SPLIT_SEED = "fmforge-tasks-v2"
MAX_SOURCE_CHARS = 900
# With the quickstart's tokenizer (4,096-token BPE of the stdlib: 3.4 characters a token on average) the longest
# chat record is 244 tokens (a function written, then its module asked for), the mean 109: inside its 256 context.
MAX_CHAT_SOURCE_CHARS = 500
N_MODULES = 16


class StdlibFunction(NamedTuple):
    module: str  # top-level module or package, e.g. "json"
    file: str  # path under the stdlib, e.g. "json/decoder.py"
    qualname: str
    source: str  # dedented
    first: str | None  # the docstring's first line (None: no usable docstring)
    without_doc: str | None  # the source without its docstring
    head: str | None  # signature + docstring


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
                found.append(StdlibFunction(*function[:-1]))
    return tuple(found)


def _split(file: str, qualname: str) -> tuple[str, str]:
    digest = hashlib.sha1(f"{SPLIT_SEED}:{file}:{qualname}".encode()).hexdigest()
    value = int(digest[:8], 16) / 16**8
    return ("train" if value < 0.8 else "val" if value < 0.9 else "test"), digest


# Chat phrasing: several ways to ask each kind of question ({name}: the qualified name, {doc}: the docstring's first
# line, {code}: the source); the seeded hash picks one per question.
CHAT_QUESTIONS = {
    "write": ("Write a Python function `{name}`: {doc}",
              "Can you write `{name}`? It should do this: {doc}",
              "Implement `{name}`, whose docstring says:\n{doc}",
              "I need a function called `{name}`. What it does: {doc}",
              "Please write the code of `{name}` ({doc})"),
    "explain": ("Explain this function:\n\n{code}",
                "What does this code do?\n\n{code}",
                "{code}\n\nCan you tell me what this function does?",
                "In one line, what is `{name}` for?\n\n{code}",
                "Summarise this:\n\n{code}"),
    "module": ("Which module is this from?\n\n{code}",
               "{code}\n\nWhich standard-library module does this come from?",
               "Where in the Python standard library would I find this?\n\n{code}",
               "Which stdlib module defines `{name}`?\n\n{code}"),
}
FOLLOW_UPS = {  # the second question of a two-turn conversation, about the function of the first
    "module": ("Which module is it from?", "And which standard-library module is that in?",
               "Where in the standard library does it live?"),
    "explain": ("What does it do?", "And what is it for?", "Can you explain it in one line?"),
}
CHAT_KINDS = ("write", "explain", "module", "explain+module", "write+module", "module+explain")
ASKED_THROUGH_CHAT = {"stdlib-docstring": "explain", "stdlib-body": "write", "stdlib-module": "module"}


def module_answer(module: str) -> str:
    """The assistant's reply to "which module is this from?" (one fixed sentence, so that exact match of the reply
    is the accuracy of the module's name)."""
    return f"It comes from `{module}`."


def _pick(options: tuple[str, ...], digest: str, turn: int) -> str:
    """One of `options`, by the hex digits of the seeded hash that belong to this turn (the split uses the first 8)."""
    return options[int(digest[16 + 8 * turn:24 + 8 * turn], 16) % len(options)]


def chat_record(function: StdlibFunction, digest: str, kind: str) -> dict:
    """A conversation of `kind` (CHAT_KINDS; the one-turn kinds also work without a docstring for "module")."""
    first, *follow = kind.split("+")
    fields = {"name": function.qualname, "doc": function.first}
    if first == "write":
        question, answer = _pick(CHAT_QUESTIONS["write"], digest, 0).format(**fields), function.source.rstrip()
    elif first == "explain":
        question = _pick(CHAT_QUESTIONS["explain"], digest, 0).format(code=function.without_doc.rstrip(), **fields)
        answer = function.first
    else:  # a module question; followed by "what does it do?" the code it shows must not hold the answer
        code = function.without_doc if follow else function.source
        question = _pick(CHAT_QUESTIONS["module"], digest, 0).format(code=code.rstrip(), **fields)
        answer = module_answer(function.module)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    for turn, asked in enumerate(follow, start=1):
        messages += [{"role": "user", "content": _pick(FOLLOW_UPS[asked], digest, turn)},
                     {"role": "assistant", "content": function.first if asked == "explain"
                      else module_answer(function.module)}]
    return {"messages": messages, "kind": kind}


def _record(name: str, function: StdlibFunction, digest: str) -> dict | None:
    """The record of built-in set `name` for one function (None: the function has none)."""
    if name == "stdlib-module":
        return {"text": function.source, "label": function.module}
    if function.first is None:
        return None
    if name == "stdlib-docstring":
        return {"prompt": function.without_doc.rstrip() + "\n# Summary:", "completion": " " + function.first}
    if name == "stdlib-search":  # code search: the docstring's first line finds the code, its docstring removed
        if function.first in function.without_doc:
            return None
        return {"query": function.first, "positive": function.without_doc.rstrip()}
    if name == "stdlib-body":
        head, source = function.head, function.source
        if not source[len(head):].strip() or not source.startswith(head):
            return None
        return {"prompt": head, "completion": source[len(head):]}
    if len(function.source) > MAX_CHAT_SOURCE_CHARS or function.first in function.without_doc:
        return None  # too long for the context, or a first line found in the code (os.execvp's is its signature)
    return chat_record(function, digest, CHAT_KINDS[int(digest[8:16], 16) % len(CHAT_KINDS)])


def _check(name: str, split: str) -> None:
    if name not in NAMES:
        raise DataError(f"unknown built-in dataset {name!r}; built-in datasets: {', '.join(NAMES)}")
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; use train, val or test")


def _split_functions(name: str, split: str) -> list[tuple[str, StdlibFunction]]:
    """(hash, function) of the functions in a split that built-in set `name` may use, in hash order."""
    functions = _all_functions()
    if name == "stdlib-module":
        counts = Counter(f.module for f in functions)
        modules = {m for m, _ in counts.most_common(N_MODULES)}
        functions = [f for f in functions if f.module in modules]
    chosen = []
    for function in functions:
        which, digest = _split(function.file, function.qualname)
        if which == split:
            chosen.append((digest, function))
    chosen.sort(key=lambda item: item[0])
    return chosen


def task_records(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) pairs of a built-in task's split ("train", "val" or "test")."""
    _check(name, split)
    records = []
    for digest, function in _split_functions(name, split):
        record = _record(name, function, digest)
        if record is not None:
            records.append((f"{name}:{split}:{function.file}:{function.qualname}", record))
    return records[:limit] if limit is not None else records


def chat_questions(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """The records of stdlib-docstring, -body or -module (the same functions, in the same order) asked through chat as
    stdlib-chat asks them: "explain this function", "write a function that ...", "which module is this from?"."""
    _check(name, split)
    if name not in ASKED_THROUGH_CHAT:
        raise DataError(f"{name} is not asked through chat; use one of {', '.join(ASKED_THROUGH_CHAT)}")
    records = []
    for digest, function in _split_functions(name, split):
        if _record(name, function, digest) is not None:
            records.append((f"{name}:{split}:{function.file}:{function.qualname}",
                            chat_record(function, digest, ASKED_THROUGH_CHAT[name])))
    return records[:limit] if limit is not None else records
