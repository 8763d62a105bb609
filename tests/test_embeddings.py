"""Embeddings: `fmforge embed`, the server's /v1/embeddings on an encoder, and the embed task (contrastive
fine-tuning on stdlib-search and on parallel text)."""

from __future__ import annotations

import json

import pytest
import torch

from fmforge.cli import main


@pytest.fixture(scope="module")
def encoder(mlm_encoder):
    return mlm_encoder


def test_embed_on_the_command_line_gives_unit_vectors_that_match_the_library(encoder, capsys):
    from fmforge.adapt.embedding import embed_texts
    from fmforge.checkpoint import load_model_and_tokenizer

    assert main(["embed", "--checkpoint", str(encoder), "--text", "Return the sum.", "--text", "def f(): pass"]) == 0
    vectors = torch.tensor([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    model, tokenizer, _ = load_model_and_tokenizer(encoder)
    assert vectors.shape == (2, 64)
    assert torch.allclose(vectors, embed_texts(model, tokenizer, ["Return the sum.", "def f(): pass"]), atol=1e-6)
    # a batch pads its rows; an encoder must not let the padding change a shorter text's vector
    alone = embed_texts(model, tokenizer, ["Return the sum."])
    assert torch.allclose(alone[0], vectors[0], atol=1e-5)


def test_embed_bad_inputs_are_one_line_errors(encoder, capsys):
    assert main(["embed", "--checkpoint", str(encoder), "--text", "  "]) != 0
    err = capsys.readouterr().err.strip()
    assert "give non-empty texts" in err and len(err.splitlines()) == 1


def test_contrastive_finetune_improves_recall_at_1_on_held_out_pairs(encoder, tmp_path):
    """Held-out pairs (stdlib-search's test split, a small pool) are found better after a short embed fine-tune."""
    from fmforge.adapt.embedding import embed_texts, retrieval_scores
    from fmforge.adapt.lora import load_adapter
    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.data.tasks import task_records

    held_out = task_records("stdlib-search", "test", 64)
    queries, code = [r["query"] for _, r in held_out], [r["positive"] for _, r in held_out]

    def scores(adapter=None):
        model, tokenizer, checkpoint = load_model_and_tokenizer(encoder)
        if adapter:
            load_adapter(model, adapter, checkpoint)
        return retrieval_scores(embed_texts(model, tokenizer, queries), embed_texts(model, tokenizer, code))

    before = scores()
    out = tmp_path / "search"
    assert main(["finetune", "--checkpoint", str(encoder), "--data", "stdlib-search", "--out", str(out),
                 "--limit", "512", "--method", "full", "--train.max_steps", "60", "--train.batch_size", "16",
                 "--train.lr", "1e-3", "--train.eval_interval", "60", "--train.eval_tokens", "4096",
                 "--train.checkpoint_interval", "60", "--train.precision", "fp32"]) == 0
    model, tokenizer, _ = load_model_and_tokenizer(out)
    after = retrieval_scores(embed_texts(model, tokenizer, queries), embed_texts(model, tokenizer, code))
    assert after["recall@1"] > before["recall@1"] + 0.1, (before, after)
    assert after["mrr"] > before["mrr"]

    report = tmp_path / "report"  # fmforge eval measures the same thing on the built-in set
    assert main(["eval", "--checkpoint", str(out), "--tasks", "stdlib-search", "--limit", "64",
                 "--out", str(report)]) == 0
    scores = json.loads((report / "report.json").read_text())["results"]["stdlib-search"]
    assert scores["recall@1"] == pytest.approx(after["recall@1"], abs=1e-6)


def test_the_server_embeds_with_an_encoder_and_refuses_to_generate(encoder):
    import httpx
    from conftest import ServerProcess

    from fmforge.adapt.embedding import embed_texts
    from fmforge.checkpoint import load_model_and_tokenizer

    process = ServerProcess("--checkpoint", str(encoder))
    try:
        texts = ["Return the sum.", "def f(): pass"]
        reply = httpx.post(process.url + "/v1/embeddings", json={"model": "base", "input": texts,
                                                                   "encoding_format": "float"}, timeout=60).json()
        served = torch.tensor([item["embedding"] for item in reply["data"]])
        model, tokenizer, _ = load_model_and_tokenizer(encoder)
        assert torch.allclose(served, embed_texts(model, tokenizer, texts), atol=1e-5)
        refused = httpx.post(process.url + "/v1/completions", json={"model": "base", "prompt": "def",
                                                                    "max_tokens": 2}, timeout=60)
        assert refused.status_code == 400 and "is an encoder" in refused.json()["error"]["message"]
        assert httpx.get(process.url + "/health").status_code == 200
    finally:
        assert process.stop() == 0, process.output()


@pytest.mark.parametrize("records,flags,message", [
    ([{"query": "a"}] * 4, [], "positive"),
    ([{"query": "find me", "positive": "def f(): pass"}] * 4, ["--train.batch_size", "1"], "batch_size >= 2"),
    ([{"query": "find me", "positive": "def f(): pass"}] * 4, ["--temperature", "0"], "--temperature must be > 0"),
])
def test_embed_finetune_bad_inputs_are_one_line_errors(encoder, tmp_path, capsys, records, flags, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["finetune", "--checkpoint", str(encoder), "--data", str(data), "--task", "embed",
                 "--out", str(tmp_path / "out"), *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_embed_trains_on_parallel_files_and_misaligned_ones_are_one_line_errors(encoder, tmp_path, capsys):
    english = ["a dog runs", "two men sit", "a red car", "the child laughs", "a cat sleeps", "people walk"]
    german = ["ein hund rennt", "zwei manner sitzen", "ein rotes auto", "das kind lacht", "eine katze schlaft",
              "leute gehen"]
    (tmp_path / "pairs.en").write_text("\n".join(english) + "\n")
    (tmp_path / "pairs.de").write_text("\n".join(german) + "\n")
    (tmp_path / "short.de").write_text("\n".join(german[:4]) + "\n")
    data = f"parallel:{tmp_path / 'pairs.en'}:{tmp_path / 'pairs.de'}"
    assert main(["finetune", "--checkpoint", str(encoder), "--task", "embed", "--data", data, "--val-data", data,
                 "--out", str(tmp_path / "xling"), "--train.max_steps", "2", "--train.batch_size", "4"]) == 0
    assert (tmp_path / "xling" / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(encoder), "--task", "embed", "--out", str(tmp_path / "bad"),
                 "--data", f"parallel:{tmp_path / 'pairs.en'}:{tmp_path / 'short.de'}"]) != 0
    err = capsys.readouterr().err.strip()
    assert "not aligned" in err and len(err.splitlines()) == 1, err
