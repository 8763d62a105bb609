"""Translation as a user runs it: parallel text (two aligned files or JSONL) -> `fmforge finetune --task translate`
-> `fmforge eval --tasks translate:...` reporting sacrebleu's BLEU and chrF."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from fmforge.cli import main
from fmforge.data.tasks import TASKS, read_records
from fmforge.data.translation import translation_messages, translation_prompt

sacrebleu = pytest.importorskip("sacrebleu")
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"

# A toy language pair with an exact word-for-word translation: enough to see a tiny model learn.
WORDS = {"dog": "Hund", "man": "Mann", "red": "rot", "runs": "rennt", "big": "gross", "cat": "Katze"}


def toy_pairs(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    english = list(WORDS)
    pairs = []
    for _ in range(count):
        words = [rng.choice(english) for _ in range(rng.randint(2, 3))]
        pairs.append({"source": " ".join(words), "target": " ".join(WORDS[w] for w in words),
                      "source_lang": "en", "target_lang": "de"})
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bleu_and_chrf_are_sacrebleus_on_known_pairs(checkpoint, tmp_path):
    """sacrebleu's own README example (two references) is 48.53 BLEU; our evaluator reports sacrebleu's numbers for
    what the model wrote, so a perfect and an empty translation bound it."""
    hypotheses = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    references = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
                  ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    assert sacrebleu.corpus_bleu(hypotheses, references).score == pytest.approx(48.530827, abs=1e-4)
    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.eval.tasks import evaluate_translate
    model, tokenizer = load_model_and_tokenizer(checkpoint)[:2]
    records = [(f"r{i}", r) for i, r in enumerate(toy_pairs(6, seed=3))]
    scores = evaluate_translate(model, tokenizer, records, max_new_tokens=8)
    assert 0 <= scores["bleu"] <= 100 and 0 <= scores["chrf"] <= 100 and scores["examples"] == 6


def test_parallel_files_read_with_languages_from_their_names(tmp_path):
    (tmp_path / "train.en.gz").write_bytes(gzip.compress("A dog runs.\n\nA man.\n".encode()))
    (tmp_path / "train.fr").write_text("Un chien court.\n\nUn homme.\n")
    records = read_records(TASKS["translate"], f"parallel:{tmp_path / 'train.en.gz'}:{tmp_path / 'train.fr'}")
    assert [r for _, r in records] == [
        {"source": "A dog runs.", "target": "Un chien court.", "source_lang": "en", "target_lang": "fr"},
        {"source": "A man.", "target": "Un homme.", "source_lang": "en", "target_lang": "fr"}]
    assert translation_messages(records[0][1], "x")[0]["content"] == translation_prompt("A dog runs.", "en", "fr") \
        == "Translate from English to French:\nA dog runs."


@pytest.mark.parametrize("make, message", [
    (lambda d: ((d / "a.en").write_text("one\ntwo\n"), (d / "b.de").write_text("eins\n")), "are not aligned"),
    (lambda d: (d / "a.en").write_text("one\n"), "not found"),
])
def test_bad_parallel_data_is_one_line(make, message, checkpoint, tmp_path, capsys):
    make(tmp_path)
    capsys.readouterr()
    code = main(["finetune", "--checkpoint", str(checkpoint), "--task", "translate", "--data",
                 f"parallel:{tmp_path / 'a.en'}:{tmp_path / 'b.de'}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_translation_finetune_improves_chrf(checkpoint, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_pairs(400, seed=0))
    test = write_jsonl(tmp_path / "test.jsonl", toy_pairs(24, seed=1))

    def chrf_of(model: Path) -> float:
        out = tmp_path / f"eval-{model.name}"
        assert main(["eval", "--checkpoint", str(model), "--tasks", f"translate:{test}", "--out", str(out)]) == 0
        return json.loads((out / "report.json").read_text())["results"][f"translate:{test}"]["chrf"]

    before = chrf_of(checkpoint)
    assert main(["finetune", "--checkpoint", str(checkpoint), "--task", "translate", "--data", str(train),
                 "--out", str(tmp_path / "spec"), "--method", "full", "--max_steps", "60", "--lr", "3e-3",
                 "--batch_size", "16", "--precision", "fp32", "--eval_interval", "60"]) == 0
    after = chrf_of(tmp_path / "spec")
    assert after > before + 5, (before, after)  # measured: 1.1 -> 8.7 (the first letters and words come)


@pytest.mark.skipif(not MULTI30K.exists(), reason="the shared Multi30K copy is not on this machine")
def test_multi30k_test_set_reads_as_1000_pairs():
    records = read_records(TASKS["translate"], f"parallel:{MULTI30K / 'test_2016_flickr.en.gz'}:"
                                               f"{MULTI30K / 'test_2016_flickr.de.gz'}")
    assert len(records) == 1000 and records[0][1]["source_lang"] == "en" and records[0][1]["target_lang"] == "de"


def test_line_separators_inside_a_sentence_keep_the_pairs_aligned(tmp_path):
    (tmp_path / "a.en").write_text("one\u2028still one\ntwo\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("eins\nzwei\n", encoding="utf-8")
    records = [r for _, r in read_records(TASKS["translate"], f"parallel:{tmp_path / 'a.en'}:{tmp_path / 'b.txt'}")]
    assert [(r["source"], r["target"]) for r in records] == [("one\u2028still one", "eins"), ("two", "zwei")]
    assert (records[0]["source_lang"], records[0]["target_lang"]) == ("en", "de")  # .txt names no language


def test_a_source_longer_than_the_context_scores_empty_not_an_error(checkpoint):
    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.eval.tasks import evaluate_translate
    model, tokenizer = load_model_and_tokenizer(checkpoint)[:2]
    records = [("r0", {"source": "dog " * 200, "target": "Hund"}), ("r1", toy_pairs(1, seed=4)[0])]
    scores = evaluate_translate(model, tokenizer, records, max_new_tokens=4)
    assert scores["examples"] == 2 and scores["prompts_over_context"] == 1
