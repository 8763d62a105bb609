"""Corpus sources: turn user specs (paths, directories, globs, jsonl, parquet, `stdlib`) into documents.

A spec is one of
    stdlib              the built-in corpus: every .py file of this Python's standard library (tests excluded)
    PATH                a file; its kind follows its extension:
                          .jsonl    one JSON object per line, the text in field `jsonl_field`; one document a line
                          .parquet  the text in column `parquet_column`; one document a row
                          other     a UTF-8 text file; the whole file is one document
    DIR                 every regular file below DIR (recursive, sorted; hidden files and directories skipped)
    GLOB                e.g. "data/*.txt" or "data/**/*.jsonl" (`**` crosses directories)

Order is deterministic: specs in the order given, files sorted within a spec, a file listed twice read once.
Binary and non-UTF-8 text files are skipped with a one-line warning and recorded in a `SourceReport`;
malformed jsonl/parquet input raises `DataError` naming file:line (or file:row), and so does text that is not
Unicode: a JSON escape of a lone UTF-16 surrogate ("\\ud800") or a parquet string that is not valid UTF-8.
Empty (whitespace-only) documents are skipped silently.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fmforge.errors import DataError

logger = logging.getLogger("fmforge.data")

STDLIB_SPEC = "stdlib"
GLOB_CHARACTERS = re.compile(r"[*?[]")
MAX_SKIP_WARNINGS = 20  # then one summary line; the full list is in SourceReport / manifest.json
BINARY_SNIFF_BYTES = 8192  # like git and grep: a NUL byte in the first 8 KiB means "binary"
# JSON's "\udXXX" escapes can decode to a lone UTF-16 surrogate: a str that no encoder can write as UTF-8.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Directory names under the stdlib whose files are test suites or test data, not library code.
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass
class Document:
    """One training document: its text and where it came from ("path", "path:line", "stdlib:json/decoder.py")."""

    text: str
    source: str


@dataclass(frozen=True)
class SourceFile:
    """One input file found by `resolve_sources`."""

    path: Path
    kind: str  # "text", "jsonl" or "parquet"
    name: str  # how its documents are named: the path as given, or "stdlib:<relpath>"
    spec: str  # the spec that matched it


@dataclass
class SourceReport:
    """What `iter_documents` read: filled in while iterating."""

    files_read: int = 0
    files_skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents yielded


def lone_surrogate(value) -> str | None:
    """The first lone UTF-16 surrogate in a string, or in the keys and values of a decoded JSON value, written
    as its escape ("\\ud800"); None when there is none. (JSON decodes a surrogate pair to one character.)"""
    if isinstance(value, str):
        match = LONE_SURROGATE.search(value)
        return f"\\u{ord(match.group()):04x}" if match else None
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        for item in value:
            found = lone_surrogate(item)
            if found is not None:
                return found
    return None


def stdlib_files() -> list[Path]:
    """Sorted .py files of the running interpreter's standard library, without test suites and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        files.extend(Path(directory) / name for name in filenames if name.endswith(".py"))
    return sorted(files)


def resolve_sources(specs: list[str]) -> list[SourceFile]:
    """Expand specs into the files they name, in the order documents will be read."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if not specs:
        raise DataError("no corpus sources given — pass files, directories, globs or 'stdlib'")
    resolved: list[SourceFile] = []
    seen: set[Path] = set()
    for spec in map(str, specs):
        for source in _resolve_one(spec):
            key = source.path.resolve()
            if key not in seen:
                seen.add(key)
                resolved.append(source)
    return resolved


def _resolve_one(spec: str) -> list[SourceFile]:
    if spec == STDLIB_SPEC:
        root = Path(sysconfig.get_paths()["stdlib"])
        return [SourceFile(path, "text", f"stdlib:{path.relative_to(root).as_posix()}", spec)
                for path in stdlib_files()]
    expanded = os.path.expanduser(spec)
    if GLOB_CHARACTERS.search(expanded):
        paths = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(expanded):
        paths = []
        for directory, subdirectories, filenames in os.walk(expanded):
            subdirectories[:] = [d for d in subdirectories if not d.startswith(".")]
            paths.extend(Path(directory) / n for n in filenames
                         if not n.startswith(".") and os.path.isfile(os.path.join(directory, n)))
        paths.sort()
    elif os.path.isfile(expanded):
        paths = [Path(expanded)]
    else:
        paths = []
    if not paths:
        raise DataError(f"no files match '{spec}' — check the path or glob")
    return [SourceFile(path, _kind(path), str(path), spec) for path in paths]


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def iter_documents(
    specs: list[str] | list[SourceFile],
    *,
    jsonl_field: str = "text",
    parquet_column: str = "text",
    report: SourceReport | None = None,
) -> Iterator[Document]:
    """Yield the documents of all sources in deterministic order.

    `specs` may also be the output of `resolve_sources` (to avoid resolving twice).
    """
    report = report if report is not None else SourceReport()
    sources = specs if specs and all(isinstance(s, SourceFile) for s in specs) else resolve_sources(specs)
    for source in sources:
        if source.kind == "jsonl":
            documents = _jsonl_documents(source, jsonl_field)
        elif source.kind == "parquet":
            documents = _parquet_documents(source, parquet_column)
        else:
            documents = _text_documents(source, report)
        skipped_before = len(report.files_skipped)
        for document in documents:
            if not document.text.strip():
                continue
            report.documents += 1
            report.bytes += len(document.text.encode("utf-8"))
            yield document
        if len(report.files_skipped) == skipped_before:
            report.files_read += 1


def _skip(report: SourceReport, source: SourceFile, reason: str) -> None:
    report.files_skipped.append((source.name, reason))
    if len(report.files_skipped) <= MAX_SKIP_WARNINGS:
        logger.warning("skipping %s: %s", source.name, reason)
    elif len(report.files_skipped) == MAX_SKIP_WARNINGS + 1:
        logger.warning("skipping more files; not listing each (see the list of skipped files in the report)")


def _text_documents(source: SourceFile, report: SourceReport) -> Iterator[Document]:
    """The whole file as one document, or nothing (with a warning) if it is binary or not UTF-8."""
    try:
        data = source.path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {source.name} ({error.strerror}) — check permissions") from None
    nul = data.find(b"\0", 0, BINARY_SNIFF_BYTES)
    if nul != -1:
        _skip(report, source, f"binary file (NUL byte at offset {nul})")
        return
    try:
        # Read as bytes and decode ourselves: "\r\n" stays "\r\n"; a leading byte-order mark is dropped.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        _skip(report, source, f"not valid UTF-8 at byte {error.start}")
        return
    yield Document(text, source.name)


def _jsonl_documents(source: SourceFile, field_name: str) -> Iterator[Document]:
    try:
        file = open(source.path, "rb")
    except OSError as error:
        raise DataError(f"cannot read {source.name} ({error.strerror}) — check permissions") from None
    with file:
        for line_number, raw in enumerate(file, start=1):
            where = f"{source.name}:{line_number}"
            try:
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not valid UTF-8 at byte {error.start} of the line — fix the file") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: malformed JSON ({error.msg} at column {error.colno}) — "
                                "fix or remove the line") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__} — "
                                "write one object per line")
            if field_name not in record:
                present = ", ".join(record) or "none"
                raise DataError(f"{where}: no field '{field_name}' (fields: {present}) — "
                                "choose the text field with jsonl_field / --jsonl-field")
            text = record[field_name]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{where}: field '{field_name}' is {type(text).__name__}, not a string — "
                                "choose a text field with jsonl_field / --jsonl-field")
            surrogate = lone_surrogate(text) if "\\u" in line else None
            if surrogate is not None:
                raise DataError(f"{where}: field '{field_name}' holds a lone UTF-16 surrogate ({surrogate}), "
                                "which is not text — fix the escape or remove the line")
            yield Document(text, where)


def _parquet_documents(source: SourceFile, column: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(source.path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read {source.name} as parquet ({_first_line(error)}) — check the file") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{source.name}: no column '{column}' (columns: {', '.join(names) or 'none'}) — "
                        "choose the text column with parquet_column / --parquet-column")
    row = 0
    # Row group by row group: memory stays bounded by one group, not the whole file.
    for group in range(parquet.num_row_groups):
        try:
            values = parquet.read_row_group(group, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"cannot read {source.name} row group {group} ({_first_line(error)}) — "
                            "check the file") from None
        try:
            values = values.to_pylist()
        except UnicodeDecodeError:
            # Parquet does not check that strings are UTF-8 (a surrogate written as CESU-8, say): name the row.
            for offset, value in enumerate(values):
                try:
                    value.as_py()
                except UnicodeDecodeError as error:
                    raise DataError(f"{source.name}:{row + offset + 1}: column '{column}' is not valid UTF-8 "
                                    f"at byte {error.start} — fix the file") from None
            raise
        for text in values:
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(f"{source.name}: column '{column}' holds {type(text).__name__} values, not text — "
                                "choose a string column with parquet_column / --parquet-column")
            yield Document(text, f"{source.name}:{row}")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
