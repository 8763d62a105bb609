"""The encoder: masked-language-modelling pretraining through the usual prepare -> pretrain path (masking
statistics, loss, resume) and its export to transformers (EuroBERT) and sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_overrides
from fmforge.cli import main
from fmforge.data.masking import mask_tokens


def test_masking_chooses_the_rate_and_splits_80_10_10_without_touching_special_tokens():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(16, 512, (64, 512), generator=generator)
    ids[:, ::50] = 1  # eos separators: special, never chosen
    inputs, targets = mask_tokens(ids, 0.3, mask_id=11, n_special=16, vocab_size=512, generator=generator)
    chosen = targets != -100
    ordinary = ids >= 16
    assert not chosen[~ordinary].any() and (inputs[~ordinary] == ids[~ordinary]).all()
    assert abs(chosen.sum().item() / ordinary.sum().item() - 0.3) < 0.01  # ~32,000 tokens: sd ~0.003
    assert (targets[chosen] == ids[chosen]).all()
    masked = (inputs == 11) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
    assert abs(kept.sum().item() / n - 0.1) < 0.01  # (a random draw equal to the original counts as kept)
    assert (inputs[~chosen] == ids[~chosen]).all()
    assert (inputs[replaced] >= 16).all()


def test_an_encoder_sees_the_future_and_a_decoder_does_not():
    from fmforge.config import ModelConfig
    from fmforge.model import Transformer

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 100
    for objective, moves in (("mlm", True), ("causal", False)):
        model = Transformer(ModelConfig(vocab_size=100, n_layer=1, n_embd=32, n_head=2, context_length=16,
                                        objective=objective)).eval()
        first = model(ids).logits[0, 0], model(changed).logits[0, 0]
        assert (not torch.allclose(*first)) == moves, objective


def test_mlm_pretraining_lowers_the_masked_loss(prepared, tmp_path):
    out = tmp_path / "encoder"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=120, batch_size=8, lr=3e-3,
                                              eval_interval=40, checkpoint_interval=120),
                 "--model.objective", "mlm", "--train.mask_rate", "0.3"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_masked_accuracy" in r]
    assert evals[0]["val_loss"] < 6.24  # ln(512): already better than uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    assert evals[-1]["val_masked_accuracy"] > evals[0]["val_masked_accuracy"] + 0.02
    from fmforge.checkpoint import read_model_config, resolve_checkpoint

    assert read_model_config(resolve_checkpoint(out)).objective == "mlm"


@pytest.mark.parametrize("flag,value,message", [
    ("--model.objective", "bert", "model.objective must be causal or mlm"),
    ("--train.mask_rate", "1.5", "train.mask_rate must be a number between 0 and 1"),
])
def test_bad_encoder_settings_are_one_line_errors(prepared, tmp_path, capsys, flag, value, message):
    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "x"), "--model.objective", "mlm",
                 flag, value]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture(scope="module")
def encoder(mlm_encoder):
    return mlm_encoder


def test_export_matches_transformers_and_sentence_transformers(encoder, tmp_path):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    from fmforge.adapt.embedding import embed_texts
    from fmforge.checkpoint import load_model, load_tokenizer, resolve_checkpoint

    checkpoint = resolve_checkpoint(encoder)
    model, tokenizer = load_model(checkpoint)[0], load_tokenizer(checkpoint)
    texts = ["def add(a, b):\n    return a + b", "Return the sum of a and b.", "x"]
    ours = embed_texts(model, tokenizer, texts)
    out = tmp_path / "hf"
    assert main(["export", "hf", str(encoder), "--out", str(out)]) == 0

    hf_tokenizer = AutoTokenizer.from_pretrained(out)
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"][0].tolist()[:len(tokenizer.encode(texts[0], add_bos=True))] == \
        tokenizer.encode(texts[0], add_bos=True)
    masked_lm = AutoModelForMaskedLM.from_pretrained(out).eval()
    ids = torch.tensor([tokenizer.encode(texts[0], add_bos=True)])
    with torch.no_grad():
        assert torch.allclose(masked_lm(ids).logits, model(ids).logits, atol=1e-4)
    base = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        hidden = base(**batch).last_hidden_state
    weights = batch["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    assert (pooled - ours).abs().max() < 1e-4

    from sentence_transformers import SentenceTransformer

    sentence_model = SentenceTransformer(str(out), device="cpu")
    theirs = torch.from_numpy(sentence_model.encode(texts))
    assert (theirs - ours).abs().max() < 1e-4

    back = tmp_path / "back"  # and EuroBERT comes back in as an encoder
    assert main(["import", "hf", str(out), "--out", str(back)]) == 0
    imported, imported_tokenizer = load_model(back)[0], load_tokenizer(back)
    assert imported.config.objective == "mlm"
    assert torch.allclose(embed_texts(imported, imported_tokenizer, texts), ours, atol=1e-5)


def test_gguf_export_of_an_encoder_is_a_one_line_error(encoder, tmp_path, capsys):
    assert main(["export", "gguf", str(encoder), "--out", str(tmp_path / "e.gguf")]) != 0
    err = capsys.readouterr().err.strip()
    assert "this is an encoder" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "e.gguf").exists()


def test_a_resumed_mlm_run_masks_and_learns_as_the_uninterrupted_one(prepared, tmp_path):
    """The masking is a function of (seed, step, micro-batch, rank), so steps after a resume see the same masks."""
    options = dict(schedule="constant", warmup_steps=1, log_interval=1, eval_interval=100, checkpoint_interval=5)

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["pretrain", *tiny_overrides(prepared, whole, max_steps=10, **options), "--model.objective", "mlm"]) == 0
    assert main(["pretrain", *tiny_overrides(prepared, split, max_steps=5, **options), "--model.objective", "mlm"]) == 0
    assert main(["pretrain", "--resume", *tiny_overrides(prepared, split, max_steps=10, **options),
                 "--model.objective", "mlm"]) == 0
    assert losses(split)[-5:] == pytest.approx(losses(whole)[-5:], abs=1e-6)
