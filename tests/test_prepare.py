"""Corpus sources and token shards: what a user runs with `fmforge prepare`, checked on tiny data."""

import json
import logging
import os
import sysconfig

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import fmforge.data.shards as shards
from fmforge.data.shards import load_split, prepare, read_manifest, token_dtype
from fmforge.data.sources import SourceReport, iter_documents, resolve_sources, stdlib_files
from fmforge.errors import ConfigError, DataError
from fmforge.tokenizer import train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\r\n",
    "naïve café — 中文 😀\n",
    "\tindented\n  lines\n",
    "import os\nprint(os.getcwd())\n",
    "class A:\n    pass\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS * 20, vocab_size=320)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode("utf-8"))
    return path


def text_corpus(root, n=6):
    for i in range(n):
        write(root / f"doc{i:02d}.txt", TEXTS[i % len(TEXTS)] + f"# document {i}\n")
    return root


def all_tokens(out_dir, split):
    arrays = load_split(out_dir, split)
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


def decoded_documents(tokenizer, out_dir):
    """Texts back from the shards: split each stream at eos, check the leading bos, and decode."""
    texts = []
    for split in ("train", "val"):
        tokens = all_tokens(out_dir, split).tolist()
        start = 0
        for i, token in enumerate(tokens):
            if token == tokenizer.eos_id:
                assert tokens[start] == tokenizer.bos_id  # every document starts with bos
                texts.append(tokenizer.decode(tokens[start + 1:i]))
                start = i + 1
        assert start == len(tokens)  # every stream ends with eos
    return texts


# ---- sources ---------------------------------------------------------------------------------------------


def test_text_directory_and_glob_sources(tmp_path):
    write(tmp_path / "a.txt", "first")
    write(tmp_path / "sub" / "deeper" / "c.txt", "third")
    write(tmp_path / "sub" / "b.md", "second")
    write(tmp_path / ".hidden" / "x.txt", "hidden dir")
    write(tmp_path / "sub" / ".secret", "hidden file")
    directory = [d.text for d in iter_documents([str(tmp_path)])]
    assert directory == ["first", "second", "third"]  # sorted by path, hidden skipped
    assert [d.text for d in iter_documents([str(tmp_path / "**" / "*.txt")])] == ["first", "third"]
    assert [d.text for d in iter_documents([str(tmp_path / "sub" / "b.md")])] == ["second"]
    # a file named twice is read once
    assert [d.text for d in iter_documents([str(tmp_path / "a.txt"), str(tmp_path)])] == directory


def test_text_files_keep_every_character(tmp_path):
    raw = "line one\r\nline two\ttab\n  indented 😀"
    write(tmp_path / "crlf.txt", raw)
    write(tmp_path / "bom.txt", b"\xef\xbb\xbfwith bom")
    documents = list(iter_documents([str(tmp_path)]))
    assert [d.text for d in documents] == ["with bom", raw]
    assert documents[1].source == str(tmp_path / "crlf.txt")


def test_jsonl_source(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"body": "one", "id": 1}\n\n{"body": "two"}\r\n{"body": ""}\n')
    documents = list(iter_documents([str(path)], jsonl_field="body"))
    assert [(d.text, d.source) for d in documents] == [("one", f"{path}:1"), ("two", f"{path}:3")]


def test_parquet_source_reads_row_groups(tmp_path):
    path = tmp_path / "data.parquet"
    table = pa.table({"content": ["r0", None, "r2", "r3", "r4"], "n": [0, 1, 2, 3, 4]})
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    documents = list(iter_documents([str(path)], parquet_column="content"))
    assert [d.text for d in documents] == ["r0", "r2", "r3", "r4"]
    assert documents[-1].source == f"{path}:5"


def test_stdlib_corpus_excludes_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    root = sysconfig.get_paths()["stdlib"]
    relative = [os.path.relpath(f, root).split(os.sep) for f in files]
    banned = {"test", "tests", "idle_test", "site-packages"}
    assert not [r for r in relative if banned & set(r)]
    assert ["json", "decoder.py"] in relative
    sources = resolve_sources(["stdlib"])
    assert [s.path for s in sources] == files
    assert "stdlib:json/decoder.py" in {s.name for s in sources}


def test_spec_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"no files match '.*missing\.txt' — check the path or glob"):
        list(iter_documents([str(tmp_path / "missing.txt")]))
    with pytest.raises(DataError, match="no files match"):
        list(iter_documents([str(tmp_path / "*.nothing")]))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no files match"):
        list(iter_documents([str(tmp_path / "empty_dir")]))


def test_binary_and_non_utf8_files_are_skipped_with_a_warning(tmp_path, caplog):
    write(tmp_path / "good.txt", "good text")
    write(tmp_path / "image.bin", b"GIF89a\x00\x01binary")
    write(tmp_path / "latin1.txt", "ok so far caf\xe9".encode("latin-1"))
    report = SourceReport()
    with caplog.at_level(logging.WARNING, logger="fmforge.data"):
        documents = list(iter_documents([str(tmp_path)], report=report))
    assert [d.text for d in documents] == ["good text"]
    assert report.files_read == 1 and report.documents == 1 and report.bytes == len("good text")
    assert report.files_skipped == [
        (str(tmp_path / "image.bin"), "binary file (NUL byte at offset 6)"),
        (str(tmp_path / "latin1.txt"), "not valid UTF-8 at byte 13"),
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "image.bin: binary file" in warnings[0]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        list(iter_documents([str(path)]))
    path = write(tmp_path / "list.jsonl", '["not", "an object"]\n')
    with pytest.raises(DataError, match=r"list\.jsonl:1: expected a JSON object"):
        list(iter_documents([str(path)]))


def test_jsonl_missing_field_lists_fields_present(tmp_path):
    path = write(tmp_path / "chat.jsonl", '{"text": "a"}\n{"prompt": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"chat\.jsonl:2: no field 'text' \(fields: prompt, answer\)"):
        list(iter_documents([str(path)]))


def test_parquet_missing_column_lists_columns(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), path)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, id\)"):
        list(iter_documents([str(path)]))
    with pytest.raises(DataError, match="holds int"):
        list(iter_documents([str(path)], parquet_column="id"))


# ---- prepare --------------------------------------------------------------------------------------------


def test_prepare_writes_shards_that_match_the_manifest(tokenizer, tmp_path, capsys):
    corpus = text_corpus(tmp_path / "corpus")
    write(corpus / "blank.txt", "  \n\n")  # empty documents are skipped silently
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", val_fraction=0.2, workers=1)
    assert "prepared 6 documents" in capsys.readouterr().err
    texts = [d.text for d in iter_documents([str(corpus)])]
    assert manifest.train.documents + manifest.val.documents == 6
    assert manifest.val.documents >= 1 and manifest.train.documents >= 1
    assert manifest.train.bytes + manifest.val.bytes == sum(len(t.encode("utf-8")) for t in texts)
    # bos + text + eos per document
    assert manifest.train.tokens + manifest.val.tokens == sum(len(tokenizer.encode(t)) + 2 for t in texts)
    assert manifest.dtype == "uint16" and manifest.eos_id == tokenizer.eos_id
    assert manifest.tokenizer_fingerprint == tokenizer.fingerprint()
    assert manifest.sources == {"specs": [str(corpus)], "files": 7}
    for split in ("train", "val"):
        info = manifest.splits[split]
        assert sum(s.tokens for s in info.shards) == info.tokens
        for shard in info.shards:
            assert (tmp_path / "out" / shard.file).stat().st_size == 2 * shard.tokens
    assert sorted(decoded_documents(tokenizer, tmp_path / "out")) == sorted(texts)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["format_version"] == 2 and on_disk["splits"]["val"]["tokens"] == manifest.val.tokens
    assert read_manifest(tmp_path / "out") == manifest


def test_split_is_deterministic_and_by_content(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus", n=30)
    write(corpus / "zz-copy.txt", (corpus / "doc03.txt").read_text())  # a duplicate shares its twin's split
    first = prepare([str(corpus)], tokenizer, tmp_path / "a", val_fraction=0.3, progress=False, workers=1)
    second = prepare([str(corpus)], tokenizer, tmp_path / "b", val_fraction=0.3, progress=False, workers=1)
    for split in ("train", "val"):
        assert all_tokens(tmp_path / "a", split).tobytes() == all_tokens(tmp_path / "b", split).tobytes()
    assert first == second and 0 < first.val.documents < 31
    val_text = tokenizer.decode(all_tokens(tmp_path / "a", "val"))
    twin = (corpus / "doc03.txt").read_text()
    assert val_text.count(twin) in (0, 2)
    other_seed = prepare([str(corpus)], tokenizer, tmp_path / "c", val_fraction=0.3, seed=1, progress=False,
                         workers=1)
    assert all_tokens(tmp_path / "c", "val").tobytes() != all_tokens(tmp_path / "a", "val").tobytes()
    assert other_seed.train.tokens + other_seed.val.tokens == first.train.tokens + first.val.tokens


def test_val_sources_are_the_whole_val_split(tokenizer, tmp_path):
    """--val-data: a held-out file of one's own is val, every document of the sources is train (the split nanoGPT
    makes of Tiny Shakespeare: the first 90% and the last 10%)."""
    corpus = text_corpus(tmp_path / "corpus", n=5)
    held = write(tmp_path / "held" / "tail.txt", "the last tenth of the text\n")
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", val_fraction=0.0, val_specs=[str(held)],
                       progress=False, workers=1)
    assert (manifest.train.documents, manifest.val.documents) == (5, 1)
    assert tokenizer.decode(all_tokens(tmp_path / "out", "val")[1:-1]) == held.read_text()
    assert manifest.sources["val_specs"] == [str(held)] and read_manifest(tmp_path / "out") == manifest
    write(held, "another tail\n")  # the val file changed: the shards are rebuilt, not reused
    again = prepare([str(corpus)], tokenizer, tmp_path / "out", val_fraction=0.0, val_specs=[str(held)],
                    progress=False, workers=1)
    assert again.input_fingerprint != manifest.input_fingerprint and again.val.bytes == len("another tail\n")
    with pytest.raises(ConfigError, match="not both"):
        prepare([str(corpus)], tokenizer, tmp_path / "x", val_fraction=0.1, val_specs=[str(held)], progress=False)
    with pytest.raises(ConfigError, match="both a training and a val source"):
        prepare([str(corpus)], tokenizer, tmp_path / "x", val_fraction=0.0, val_specs=[str(corpus / "doc01.txt")],
                progress=False)


def test_cli_val_data_trains_the_tokenizer_on_the_training_text_only(tmp_path):
    from conftest import run_cli

    write(tmp_path / "train.txt", "alpha beta gamma delta\n" * 200)
    write(tmp_path / "val.txt", "zebra quokka\n" * 50)
    done = run_cli("prepare", str(tmp_path / "train.txt"), "--val-data", str(tmp_path / "val.txt"), "--vocab-size",
                   "300", "--out", str(tmp_path / "out"), "--workers", "1")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "out")
    assert (manifest.train.documents, manifest.val.documents) == (1, 1) and manifest.val_fraction == 0.0
    vocab = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["model"]["vocab"]
    assert any("alpha" in piece for piece in vocab) and not any("zebra" in piece for piece in vocab)
    both = run_cli("prepare", str(tmp_path / "train.txt"), "--val-data", str(tmp_path / "val.txt"),
                   "--val-fraction", "0.1", "--vocab-size", "300", "--out", str(tmp_path / "out2"))
    assert both.returncode != 0 and "leave out --val-fraction" in both.stderr and "Traceback" not in both.stderr


def test_tiny_corpus_still_gets_a_val_document(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus", n=2)
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", val_fraction=1e-9, progress=False, workers=1)
    assert (manifest.train.documents, manifest.val.documents) == (1, 1)
    single = prepare([str(corpus / "doc00.txt")], tokenizer, tmp_path / "one", val_fraction=0.999,
                     progress=False, workers=1)
    assert (single.train.documents, single.val.documents) == (1, 0)
    assert load_split(tmp_path / "one", "val") == []


def test_worker_count_does_not_change_the_output(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "CHUNK_DOCUMENTS", 3)  # several chunks, so both workers get some
    corpus = text_corpus(tmp_path / "corpus", n=40)
    prepare([str(corpus)], tokenizer, tmp_path / "one", val_fraction=0.1, workers=1, progress=False)
    prepare([str(corpus)], tokenizer, tmp_path / "two", val_fraction=0.1, workers=2, progress=False)
    for name in sorted(os.listdir(tmp_path / "one")):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_shards_roll_over_every_shard_tokens(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus", n=12)
    prepare([str(corpus)], tokenizer, tmp_path / "big", val_fraction=0.1, workers=1, progress=False)
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "small", val_fraction=0.1, shard_tokens=50,
                       workers=1, progress=False)
    shard_sizes = [s.tokens for s in manifest.train.shards]
    assert len(shard_sizes) > 2 and all(size == 50 for size in shard_sizes[:-1]) and 0 < shard_sizes[-1] <= 50
    assert all_tokens(tmp_path / "small", "train").tobytes() == all_tokens(tmp_path / "big", "train").tobytes()


def test_rerun_reuses_unchanged_shards_and_redoes_changed_ones(tokenizer, tmp_path, caplog):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    first = prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    shard = out / first.train.shards[0].file
    mtime = shard.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="fmforge.data"):
        again = prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    assert again == first and shard.stat().st_mtime_ns == mtime
    assert any("reusing" in r.getMessage() for r in caplog.records)

    write(corpus / "doc00.txt", "completely new content\n")
    changed = prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    assert changed.input_fingerprint != first.input_fingerprint
    assert "completely new content\n" in decoded_documents(tokenizer, out)

    other_options = prepare([str(corpus)], tokenizer, out, workers=1, progress=False, seed=5)
    assert other_options.seed == 5 and other_options.input_fingerprint != changed.input_fingerprint


def test_large_vocab_uses_uint32(tokenizer, tmp_path, monkeypatch):
    assert token_dtype(256) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32
    monkeypatch.setattr(shards, "token_dtype", lambda vocab_size: np.dtype("<u4"))
    corpus = text_corpus(tmp_path / "corpus")
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", workers=1, progress=False)
    arrays = load_split(tmp_path / "out", "train")
    assert manifest.dtype == "uint32" and arrays[0].dtype == np.uint32
    assert (tmp_path / "out" / manifest.train.shards[0].file).stat().st_size == 4 * manifest.train.tokens
    assert arrays[0][-1] == tokenizer.eos_id


def test_sources_of_every_kind_in_one_corpus(tokenizer, tmp_path):
    write(tmp_path / "notes.txt", "plain text file\n")
    write(tmp_path / "records.jsonl", json.dumps({"text": "from jsonl"}) + "\n")
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "rows.parquet")
    subset = [str(p) for p in stdlib_files() if p.name in {"textwrap.py", "colorsys.py"}]
    manifest = prepare([str(tmp_path / "*.txt"), str(tmp_path / "records.jsonl"), str(tmp_path / "rows.parquet"),
                        *subset], tokenizer, tmp_path / "out", workers=1, progress=False)
    assert manifest.train.documents + manifest.val.documents == 5
    texts = decoded_documents(tokenizer, tmp_path / "out")
    assert {"plain text file\n", "from jsonl", "from parquet"} <= set(texts)


def test_skipped_files_are_recorded_in_the_manifest(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    write(corpus / "blob.bin", b"\x00\x01\x02")
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", workers=1, progress=False)
    reason = "binary file (NUL byte at offset 0)"
    assert manifest.skipped_files == [{"path": str(corpus / "blob.bin"), "reason": reason}]


def test_empty_corpus_is_an_error_and_leaves_nothing(tokenizer, tmp_path):
    write(tmp_path / "corpus" / "blank.txt", "\n\n")
    write(tmp_path / "corpus" / "blob.bin", b"\x00")
    with pytest.raises(DataError, match="corpus is empty: .*1 of 2 files skipped"):
        prepare([str(tmp_path / "corpus")], tokenizer, tmp_path / "out", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no leftover directory


def test_bad_jsonl_midway_leaves_no_partial_dataset(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    first = prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write(corpus / "zz.jsonl", '{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match=r"zz\.jsonl:2: malformed JSON"):
        prepare([str(corpus)], tokenizer, out, workers=1, progress=False)
    # The previous complete dataset is untouched and nothing half-written is left beside it.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_manifest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_load_split_detects_damage(tokenizer, tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    manifest = prepare([str(corpus)], tokenizer, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(DataError, match="unknown split 'test'"):
        load_split(tmp_path / "out", "test")
    shard = tmp_path / "out" / manifest.train.shards[0].file
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="bytes but manifest.json says"):
        load_split(tmp_path / "out", "train")
    # ...and a re-run notices the damage and rebuilds instead of reusing
    prepare([str(corpus)], tokenizer, tmp_path / "out", workers=1, progress=False)
    assert len(load_split(tmp_path / "out", "train")[0]) == manifest.train.shards[0].tokens
    (tmp_path / "out" / "manifest.json").write_text("{")
    with pytest.raises(DataError, match="corrupt"):
        read_manifest(tmp_path / "out")
