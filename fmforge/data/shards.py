"""Token shards: tokenize a corpus once into flat binary arrays that training memory-maps.

Layout of a prepared directory:

    manifest.json                 what was built from what (no manifest, no dataset)
    train-00000.bin, ...          raw little-endian token ids, uint16 (vocab <= 65536) or uint32
    val-00000.bin, ...
    tokenizer.json, tokenizer_config.json

It is written into a directory beside the output (`.NAME.prepare-PID`) and renamed into place once complete:
a failed or killed run leaves no partial dataset, and a previous dataset stays as it was until the new one
replaces it.

Each document becomes `[bos_id] + tokenizer.encode(text) + [eos_id]` (no bos when the tokenizer starts sequences
without one, see Tokenizer.add_bos_token), appended to its split's stream; a new
shard starts every `shard_tokens` tokens (a document may continue into the next shard).

Train/val split: with `val_specs`, the documents of those sources are the val split and every document of the
sources is train (a held-out file of one's own, e.g. the last 10% of Tiny Shakespeare as nanoGPT splits it).
Otherwise each document goes to val when a hash of (seed, document text) falls below `val_fraction`,
so the split does not depend on file order or worker count, and identical documents always share a split
(no verbatim leakage from train into val). When that puts no document into val (small corpora) the one
with the lowest hash moves there, so with >= 2 documents and val_fraction > 0 val is never empty (and
train never is, when there is >= 1 document).

Re-running `prepare` with unchanged inputs (paths, sizes, mtimes), tokenizer and options reuses the shards.
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fmforge.data.sources import Document, SourceFile, SourceReport, iter_documents, resolve_sources
from fmforge.errors import ConfigError, DataError
from fmforge.fileio import atomic_write_text, fsync_directory
from fmforge.tokenizer import Tokenizer

logger = logging.getLogger("fmforge.data")

FORMAT_VERSION = 2  # 2: documents start with bos
MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "val")
SHARD_PATTERN = re.compile(r"^(train|val)-\d{5}\.bin$")
CHUNK_CHARACTERS = 1 << 20  # text sent to a worker at a time: big enough to amortise pickling, small for balance
CHUNK_DOCUMENTS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65536 ids, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


@dataclass
class ShardInfo:
    file: str  # name relative to the prepared directory
    tokens: int


@dataclass
class SplitInfo:
    tokens: int = 0
    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the documents' text (for bits-per-byte)
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class Manifest:
    """Contents of manifest.json."""

    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str  # "uint16" or "uint32"
    eos_id: int
    val_fraction: float
    seed: int
    shard_tokens: int
    jsonl_field: str
    parquet_column: str
    input_fingerprint: str
    sources: dict  # {"specs": [...], "files": number of files resolved}
    splits: dict[str, SplitInfo]
    skipped_files: list[dict]  # [{"path": ..., "reason": ...}]
    format_version: int = FORMAT_VERSION

    @property
    def train(self) -> SplitInfo:
        return self.splits["train"]

    @property
    def val(self) -> SplitInfo:
        return self.splits["val"]

    def to_dict(self) -> dict:
        data = asdict(self)
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["splits"] = {
            name: SplitInfo(**{**split, "shards": [ShardInfo(**shard) for shard in split["shards"]]})
            for name, split in data["splits"].items()
        }
        return cls(**data)


def read_manifest(out_dir: str | os.PathLike) -> Manifest:
    """Load manifest.json of a prepared directory."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(f"no {MANIFEST_FILE} in {out_dir} — run `fmforge prepare` to create token shards there")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is corrupt ({error}) — delete it and re-run `fmforge prepare`") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise DataError(f"{path} has format version {version}, this fmforge reads {FORMAT_VERSION} — "
                        "re-run `fmforge prepare`")
    try:
        manifest = Manifest.from_dict(data)
    except (TypeError, KeyError, AttributeError) as error:
        raise DataError(f"{path} is incomplete ({error}) — delete it and re-run `fmforge prepare`") from None
    if set(manifest.splits) != set(SPLITS):
        raise DataError(f"{path} lacks a split (has {sorted(manifest.splits)}) — re-run `fmforge prepare`")
    return manifest


def load_split(out_dir: str | os.PathLike, split: str) -> list[np.memmap]:
    """Memory-map the shards of `split` ("train" or "val"): a list of 1-D read-only arrays of token ids.

    The list is empty only for "val" of a corpus prepared with val_fraction=0 or a single document.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' — use 'train' or 'val'")
    manifest = read_manifest(out_dir)
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    _check_shards(Path(out_dir), manifest)
    return [np.memmap(Path(out_dir) / shard.file, dtype=dtype, mode="r", shape=(shard.tokens,))
            for shard in manifest.splits[split].shards]


def _check_shards(out_dir: Path, manifest: Manifest) -> None:
    itemsize = np.dtype(manifest.dtype).itemsize
    for split in SPLITS:
        for shard in manifest.splits[split].shards:
            path = out_dir / shard.file
            if not path.is_file():
                raise DataError(f"{path} is missing — re-run `fmforge prepare`")
            expected = shard.tokens * itemsize
            if path.stat().st_size != expected:
                raise DataError(f"{path} is {path.stat().st_size} bytes but {MANIFEST_FILE} says {expected} "
                                f"({shard.tokens} tokens of {manifest.dtype}) — re-run `fmforge prepare`")


def prepare(
    specs: list[str],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.01,
    workers: int | None = None,
    jsonl_field: str = "text",
    parquet_column: str = "text",
    seed: int = 0,
    shard_tokens: int = 100_000_000,
    progress: bool = True,
    val_specs: list[str] | None = None,
) -> Manifest:
    """Tokenize the documents of `specs` into train/val shards in `out_dir` and return the manifest.
    `val_specs`: sources whose documents are the val split (then val_fraction must be 0).

    `workers` tokenizer processes (default: all CPUs; 1 = in this process). The output bytes do not depend
    on `workers`. Summaries go to stderr when `progress` is true.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction {val_fraction} is out of range — use a value in [0, 1), e.g. 0.01")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens {shard_tokens} must be positive")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConfigError(f"workers {workers} must be at least 1")
    specs = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    val_specs = [str(s) for s in val_specs or []]
    if val_specs and val_fraction:
        raise ConfigError("give either a val fraction or val sources, not both: with val sources every document "
                          "of the other sources is training data")
    out_dir = Path(out_dir)
    sources = resolve_sources(specs)
    val_sources = resolve_sources(val_specs) if val_specs else []
    both = {s.path.resolve() for s in sources} & {s.path.resolve() for s in val_sources}
    if both:
        raise ConfigError(f"{sorted(both)[0]} is both a training and a val source — a file goes to one split")
    options = {"val_fraction": val_fraction, "seed": seed, "shard_tokens": shard_tokens,
               "jsonl_field": jsonl_field, "parquet_column": parquet_column}
    # The same tokenizer.json without bos at the start of documents makes other shards. Val sources join the
    # fingerprint only when given, so that shards prepared before they existed are still reused.
    tokenizer_identity = tokenizer.fingerprint() + ("" if tokenizer.add_bos_token else ":no-bos")
    input_fingerprint = _input_fingerprint(sources + val_sources, {**options, "val_specs": val_specs} if val_specs
                                           else options, tokenizer_identity)

    existing = _reusable_manifest(out_dir, input_fingerprint)
    if existing is not None:
        message = f"reusing token shards in {out_dir}: inputs, tokenizer and options unchanged"
        logger.info(message)
        if progress:
            print(message, file=sys.stderr)
        return existing
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} is a file — choose a directory")

    # Everything is written into a directory beside out_dir and renamed into place once complete, so a failed
    # or killed run never leaves a partial dataset (and leaves a previous one as it was).
    target = Path(os.path.abspath(out_dir))  # "--out ." has no name to put a directory beside
    _remove_abandoned_builds(target)
    building = target.with_name(f".{target.name}.prepare-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    started = time.perf_counter()
    try:
        splits, report = _write_shards(building, sources, tokenizer, val_fraction=val_fraction, workers=workers,
                                       seed=seed, shard_tokens=shard_tokens, jsonl_field=jsonl_field,
                                       parquet_column=parquet_column, progress=progress, val_sources=val_sources)
        if report.documents == 0:
            skipped = f"{len(report.files_skipped)} of {len(sources)} files skipped" if report.files_skipped \
                else "every document is empty"
            raise DataError(f"corpus is empty: no documents in {', '.join(map(str, specs))} ({skipped}) — "
                            "check the sources")
        manifest = Manifest(
            tokenizer_fingerprint=tokenizer.fingerprint(),
            vocab_size=tokenizer.vocab_size,
            dtype=token_dtype(tokenizer.vocab_size).name,
            eos_id=tokenizer.eos_id,
            input_fingerprint=input_fingerprint,
            sources={"specs": [str(s) for s in specs], "files": len(sources),
                     **({"val_specs": val_specs, "val_files": len(val_sources)} if val_specs else {})},
            splits=splits,
            skipped_files=[{"path": path, "reason": reason} for path, reason in report.files_skipped],
            **options,
        )
        tokenizer.save(building)  # the directory is self-contained
        _write_json_atomically(building / MANIFEST_FILE, manifest.to_dict())
        _move_into_place(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if progress:
        seconds = time.perf_counter() - started
        tokens = manifest.train.tokens + manifest.val.tokens
        print(f"prepared {report.documents:,} documents, {report.bytes:,} bytes -> {tokens:,} tokens "
              f"(train {manifest.train.tokens:,}, val {manifest.val.tokens:,}) in {out_dir}; "
              f"skipped {len(report.files_skipped)} files; {tokens / max(seconds, 1e-9):,.0f} tokens/s",
              file=sys.stderr)
    return manifest


def write_token_documents(out_dir: str | os.PathLike, tokenizer, splits: dict[str, Iterator[tuple[np.ndarray, int]]],
                          *, input_fingerprint: str, sources: dict, options: dict, progress: bool = True) -> Manifest:
    """Shards of already-tokenized documents (each (tokens, byte count)) per split, written like `prepare`'s: into
    a directory beside `out_dir`, renamed into place once complete, reused when `input_fingerprint` is unchanged.
    Media sources (data/vision.py) come this way: their documents are token arrays, not text."""
    out_dir = Path(out_dir)
    existing = _reusable_manifest(out_dir, input_fingerprint)
    if existing is not None:
        if progress:
            print(f"reusing token shards in {out_dir}: inputs, tokenizer and options unchanged", file=sys.stderr)
        return existing
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output {out_dir} is a file — choose a directory")
    target = Path(os.path.abspath(out_dir))
    _remove_abandoned_builds(target)
    building = target.with_name(f".{target.name}.prepare-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(building, split, dtype, options.get("shard_tokens", 100_000_000))
               for split in SPLITS}
    try:
        try:
            for split, documents in splits.items():
                for tokens, n_bytes in documents:
                    writers[split].write(np.asarray(tokens), int(n_bytes))
        finally:
            for writer in writers.values():
                writer.close()
        if writers["train"].info.documents == 0:
            raise DataError(f"no training documents in {', '.join(map(str, sources.get('specs', [])))}")
        manifest = Manifest(tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=tokenizer.vocab_size,
                            dtype=dtype.name, eos_id=tokenizer.eos_id, input_fingerprint=input_fingerprint,
                            sources=sources, splits={split: writers[split].info for split in SPLITS},
                            skipped_files=[], val_fraction=options.get("val_fraction", 0.0),
                            seed=options.get("seed", 0), shard_tokens=options.get("shard_tokens", 100_000_000),
                            jsonl_field="text", parquet_column="text")
        tokenizer.save(building)
        _write_json_atomically(building / MANIFEST_FILE, manifest.to_dict())
        _move_into_place(building, target)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return manifest


def _write_shards(directory: Path, sources: list[SourceFile], tokenizer: Tokenizer, *, val_fraction: float,
                  workers: int, seed: int, shard_tokens: int, jsonl_field: str, parquet_column: str,
                  progress: bool, val_sources: list[SourceFile] = ()) -> tuple[dict[str, SplitInfo], SourceReport]:
    """Tokenize every document of `sources` (and of `val_sources`, all into val) into train/val shard files in
    `directory`, flushed to disk. Returns each split's shards and counts, and what was read."""
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {split: _ShardWriter(directory, split, dtype, shard_tokens) for split in SPLITS}
    report = SourceReport()
    try:
        everything = [*sources, *val_sources]
        total_bytes = sum(s.path.stat().st_size for s in everything) if all(s.kind == "text" for s in everything) \
            else None
        splitter = _Splitter(writers, val_fraction)
        passes = [(sources, splitter.add)]
        if val_sources:
            passes.append((val_sources, lambda tokens, n_bytes, _hash: writers["val"].write(tokens, n_bytes)))
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
                  file=sys.stderr) as bar:
            for pass_sources, add in passes:
                documents = iter_documents(pass_sources, jsonl_field=jsonl_field, parquet_column=parquet_column,
                                           report=report)
                for tokens, lengths, byte_counts, hashes in _encode_all(documents, tokenizer, seed, dtype, workers):
                    per_document = np.split(tokens, np.cumsum(lengths)[:-1])
                    for document_tokens, n_bytes, hash_value in zip(per_document, byte_counts, hashes, strict=True):
                        add(document_tokens, int(n_bytes), float(hash_value))
                    bar.update(int(byte_counts.sum()))
        splitter.finish()
    finally:
        for writer in writers.values():
            writer.close()
    return {split: writers[split].info for split in SPLITS}, report


# ---- tokenization (parallel, order-preserving) ---------------------------------------------------------

_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    # The tokenizer arrives pickled as its JSON text (Tokenizer.__getstate__). One process per core already
    # uses every core, so the Rust library's own thread pool would only oversubscribe them.
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str], seed: int, dtype_name: str):
    return _encode_chunk(_worker_tokenizer, texts, seed, np.dtype(dtype_name))


def _encode_chunk(tokenizer: Tokenizer, texts: list[str], seed: int, dtype: np.dtype):
    """Tokens of all texts (each bos + text + eos) as one array, plus per-text token counts, UTF-8 byte counts
    and split hashes in [0, 1)."""
    encoded = tokenizer.encode_batch(texts)
    # bos + text + eos: a document starts the way a prompt does (generation prepends bos when the tokenizer does).
    bos = [tokenizer.bos_id] if tokenizer.add_bos_token else []
    eos = [tokenizer.eos_id]
    lengths = np.array([len(bos) + len(ids) + 1 for ids in encoded], dtype=np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(bos, ids, eos) for ids in encoded),
                         dtype=dtype, count=int(lengths.sum()))
    seed_bytes = seed.to_bytes(8, "little", signed=True)
    byte_counts = np.empty(len(texts), dtype=np.int64)
    hashes = np.empty(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        byte_counts[i] = len(data)
        digest = hashlib.sha1(seed_bytes + data).digest()
        hashes[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return tokens, lengths, byte_counts, hashes


def _chunks(documents: Iterator[Document]) -> Iterator[list[str]]:
    chunk, characters = [], 0
    for document in documents:
        chunk.append(document.text)
        characters += len(document.text)
        if characters >= CHUNK_CHARACTERS or len(chunk) >= CHUNK_DOCUMENTS:
            yield chunk
            chunk, characters = [], 0
    if chunk:
        yield chunk


def _encode_all(documents: Iterator[Document], tokenizer: Tokenizer, seed: int, dtype: np.dtype, workers: int):
    """Yield `_encode_chunk` results in document order. Reading stays in this process; encoding runs in
    `workers` spawned processes with a bounded number of chunks in flight."""
    if workers == 1:
        for chunk in _chunks(documents):
            yield _encode_chunk(tokenizer, chunk, seed, dtype)
        return
    context = multiprocessing.get_context("spawn")  # fork + the Rust thread pool can deadlock
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(tokenizer,)) as pool:
        pending: deque[concurrent.futures.Future] = deque()
        try:
            for chunk in _chunks(documents):
                pending.append(pool.submit(_encode_in_worker, chunk, seed, dtype.name))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise DataError("tokenizer worker processes died — if prepare() runs from a script, call it under "
                            "`if __name__ == '__main__':` (workers are spawned), or pass workers=1") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


# ---- writing -------------------------------------------------------------------------------------------


class _ShardWriter:
    """Appends token arrays to `{split}-NNNNN.bin` files, starting a new file every `shard_tokens` tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.info = SplitInfo()
        self._file = None

    def write(self, tokens: np.ndarray, n_bytes: int) -> None:
        self.info.documents += 1
        self.info.bytes += n_bytes
        self.info.tokens += len(tokens)
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None or self.info.shards[-1].tokens == self.shard_tokens:
                self._open_next()
            shard = self.info.shards[-1]
            take = min(len(tokens), self.shard_tokens - shard.tokens)
            self._file.write(tokens[:take].tobytes())
            shard.tokens += take
            tokens = tokens[take:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.info.shards):05d}.bin"
        self._file = open(self.out_dir / name, "wb")
        self.info.shards.append(ShardInfo(name, 0))

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


class _Splitter:
    """Routes documents to the train/val writers by hash, holding back one document per split so that
    neither split ends up empty when the other could spare one (see the module docstring)."""

    def __init__(self, writers: dict[str, _ShardWriter], val_fraction: float):
        self.writers, self.val_fraction = writers, val_fraction
        self.held: dict[str, tuple | None] = {"train": None, "val": None}

    def add(self, tokens: np.ndarray, n_bytes: int, hash_value: float) -> None:
        split = "val" if hash_value < self.val_fraction else "train"
        # Hold the train document closest to val (lowest hash) and the val document closest to train.
        key = -hash_value if split == "train" else hash_value
        held = self.held[split]
        document = (key, tokens, n_bytes)
        if held is None:
            self.held[split] = document
        elif key > held[0]:
            self.writers[split].write(held[1], held[2])
            self.held[split] = document
        else:
            self.writers[split].write(tokens, n_bytes)

    def finish(self) -> None:
        train_count = self.writers["train"].info.documents + (self.held["train"] is not None)
        val_count = self.writers["val"].info.documents + (self.held["val"] is not None)
        if self.val_fraction > 0 and val_count == 0 and train_count >= 2:
            self.held = {"train": None, "val": self.held["train"]}
        elif train_count == 0 and val_count > 0:
            self.held = {"train": self.held["val"], "val": None}
        for split, document in self.held.items():
            if document is not None:
                self.writers[split].write(document[1], document[2])


# ---- reuse ---------------------------------------------------------------------------------------------


def _input_fingerprint(sources: list[SourceFile], options: dict, tokenizer_fingerprint: str) -> str:
    """sha256 over what determines the shards: each file's path, size and mtime, the options and tokenizer."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format_version": FORMAT_VERSION, "tokenizer": tokenizer_fingerprint,
                              "options": options}, sort_keys=True).encode())
    for source in sources:
        stat = source.path.stat()
        digest.update(f"\n{source.path.resolve()}\t{source.kind}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _reusable_manifest(out_dir: Path, input_fingerprint: str) -> Manifest | None:
    if not (out_dir / MANIFEST_FILE).is_file():
        return None
    try:
        manifest = read_manifest(out_dir)
        _check_shards(out_dir, manifest)
    except DataError as error:
        logger.info("not reusing %s: %s", out_dir, error)
        return None
    return manifest if manifest.input_fingerprint == input_fingerprint else None


def _remove_outputs(out_dir: Path) -> None:
    """Delete a previous manifest (first, so a half-rewritten directory is never taken as complete) and shards."""
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    if out_dir.is_dir():
        for path in out_dir.iterdir():
            if SHARD_PATTERN.match(path.name):
                path.unlink()


def _move_into_place(building: Path, out_dir: Path) -> None:
    """Make the finished `building` directory `out_dir`: one rename when `out_dir` is absent or empty. When it
    holds files (a previous dataset, a tokenizer saved there, the user's own files), retire its dataset (manifest
    first), move the new files in and the manifest last: it is a dataset again only once all of them are there."""
    if not out_dir.is_symlink() and (not out_dir.exists() or not any(out_dir.iterdir())):
        os.replace(building, out_dir)
    else:
        _remove_outputs(out_dir)
        for path in sorted(building.iterdir(), key=lambda p: p.name == MANIFEST_FILE):
            if path.is_dir() and (out_dir / path.name).is_dir():  # a codec directory of a media tokenizer
                shutil.rmtree(out_dir / path.name)
            os.replace(path, out_dir / path.name)
        building.rmdir()
    fsync_directory(out_dir)
    fsync_directory(out_dir.parent)


def _remove_abandoned_builds(out_dir: Path) -> None:
    """Delete the building directories of earlier runs for `out_dir` that were killed (their process is gone)."""
    for path in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.prepare-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _write_json_atomically(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
