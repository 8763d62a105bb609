"""Specialisation: LoRA and full fine-tuning on SFT / completion / classify / lm, packing, merge, chat, eval."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from fmforge.cli import main
from fmforge.checkpoint import load_model_and_tokenizer, resolve_checkpoint

TRAIN = ["--max_steps", "12", "--warmup_steps", "2", "--eval_interval", "6", "--checkpoint_interval", "6",
         "--batch_size", "4", "--precision", "fp32", "--log_interval", "6"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"messages": [{"role": "system", "content": "You add numbers."},
                                 {"role": "user", "content": f"{a} plus {b}?"},
                                 {"role": "assistant", "content": f"{a + b}"},
                                 {"role": "user", "content": "thanks"},
                                 {"role": "assistant", "content": "You are welcome."}]})
    return out


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft") / "chat.jsonl", chats(60))


@pytest.fixture(scope="module")
def lora_run(checkpoint, sft_file, tmp_path_factory) -> Path:
    base = resolve_checkpoint(checkpoint)
    before = digest(base)
    out = tmp_path_factory.mktemp("lora") / "adder"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(sft_file), "--task", "sft",
                 "--method", "lora", "--lora-rank", "4", "--out", str(out), *TRAIN]) == 0
    assert digest(base) == before, "the base checkpoint must stay bit-identical"
    return out


def test_sft_loss_mask_covers_exactly_the_assistant_turns(checkpoint):
    from fmforge.data.finetune import sft_example

    _, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    record = chats(1)[0]
    example = sft_example(record, tokenizer, "test")
    trained = tokenizer.decode([t for t, m in zip(example.tokens, example.loss_mask) if m])
    a_plus_b = record["messages"][2]["content"]
    assert trained == f"\n{a_plus_b}<|end|>\n\nYou are welcome.<|end|>\n"
    assert tokenizer.decode(example.tokens) == tokenizer.apply_chat_template(record["messages"])
    everything = sft_example(record, tokenizer, "test", train_on_all=True)
    assert sum(everything.loss_mask) > sum(example.loss_mask)


def test_completion_loss_is_on_the_completion_only(checkpoint):
    from fmforge.data.finetune import completion_example

    _, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    example = completion_example({"prompt": "def add(a, b):", "completion": " return a + b"}, tokenizer, "t")
    assert tokenizer.decode([t for t, m in zip(example.tokens, example.loss_mask) if m]) == " return a + b<|eos|>"


def test_packing_keeps_attention_inside_each_example(checkpoint):
    from fmforge.data.finetune import Example, PackedDataset

    model, _, _ = load_model_and_tokenizer(checkpoint)
    examples = [Example(list(range(5 + i, 25 + 3 * i)), [True] * (20 + 2 * i)) for i in range(3)]
    packed = PackedDataset(examples, length=64, pad_id=2, pack=True)
    assert len(packed) == 1  # 19 + 21 + 23 = 63 tokens fit one row
    batch = packed.batch([0])
    with torch.no_grad():
        logits = model(batch["input_ids"], attn_mask=batch["attn_mask"]).logits[0]
        position = 0
        for example_tokens in [r[0] for r in packed.rows[0]]:
            alone = model(torch.tensor([example_tokens])).logits[0]
            n = len(example_tokens)
            torch.testing.assert_close(logits[position:position + n], alone, rtol=1e-4, atol=1e-4)
            position += n


def test_periodic_validation_reads_about_eval_tokens():
    from fmforge.data.finetune import ClassificationDataset, Example, PackedDataset
    from fmforge.train.finetune import eval_rows

    packed = PackedDataset([Example(list(range(40)), [True] * 40) for _ in range(50)], length=64, pad_id=0)
    assert len(packed) == 50 and eval_rows(packed, None) == list(range(50))
    assert eval_rows(packed, 640) == [round(i * 49 / 9) for i in range(10)]  # 10 rows of 64, spread out
    classify = ClassificationDataset([[1] * 16] * 100, [0] * 100, pad_id=0)
    assert len(eval_rows(classify, 160)) == 10 and len(eval_rows(classify, 10**9)) == 100


def test_default_lora_targets_follow_the_task():
    from fmforge.adapt.lora import ATTENTION_MODULES, MLP_MODULES, LoRAConfig, inject_lora
    from fmforge.data.tasks import TASKS
    from fmforge.errors import ConfigError
    from fmforge.train.finetune import FinetuneSpec, default_lora_targets

    assert FinetuneSpec(checkpoint="c", data="d").lora.target_modules is None  # chosen once the task is known
    for name in ("sft", "completion", "translate", "draw", "transcribe", "speak"):
        assert default_lora_targets(TASKS[name]) == ["all-linear"], name
    for name in ("recognise", "answer", "read", "describe", "edit", "classify"):
        assert default_lora_targets(TASKS[name]) == ["all-linear", "embed_tokens"], name
    chosen = LoRAConfig(rank=4, target_modules=default_lora_targets(TASKS["recognise"]))
    assert chosen.target_modules == [*ATTENTION_MODULES, *MLP_MODULES, "embed_tokens"]
    with pytest.raises(ConfigError, match="not chosen"):
        inject_lora(torch.nn.Linear(2, 2), LoRAConfig(target_modules=None))


def test_lora_trains_only_the_adapter_and_saves_peft_layout(lora_run, checkpoint):
    from safetensors.torch import load_file

    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    weights = load_file(str(lora_run / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in weights
    assert all(".lora_A." in k or ".lora_B." in k for k in weights)
    info = json.loads((lora_run / "finetune.json").read_text())
    model, _, _ = load_model_and_tokenizer(checkpoint)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in config["target_modules"]]
    assert info["trainable_parameters"] == sum(4 * (m.in_features + m.out_features) for m in linears)
    assert info["total_parameters"] == model.num_parameters() + info["trainable_parameters"]
    assert any(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # training moved B from zero
    records = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def test_adapter_load_round_trip_and_merge_agree(lora_run, checkpoint, tmp_path):
    from fmforge.adapt.lora import merge_lora, set_lora_enabled
    from fmforge.adapt.specialist import load_specialist

    model, tokenizer, _, info = load_specialist(checkpoint, lora_run)
    assert info["task"] == "sft"
    x = torch.tensor([tokenizer.encode("def f(x):\n    return x + 1\n", add_bos=True)])
    with torch.no_grad():
        adapted = model(x).logits
        set_lora_enabled(model, False)
        base = model(x).logits
        set_lora_enabled(model, True)
        assert (adapted - base).abs().max() > 1e-3
        merged = merge_lora(model)(x).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    # The CLI merge writes a plain checkpoint with the same logits.
    assert main(["merge", "--checkpoint", str(checkpoint), "--adapter", str(lora_run), "--out", str(tmp_path / "m")]) == 0
    merged_model, _, _ = load_model_and_tokenizer(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(merged_model(x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_gradient_accumulation_equals_a_bigger_batch_with_packing_and_masks(checkpoint, sft_file, tmp_path):
    common = ["finetune", "--checkpoint", str(checkpoint), "--data", str(sft_file), "--task", "sft",
              "--method", "full", "--max_steps", "4", "--precision", "fp32", "--eval_interval", "4",
              "--checkpoint_interval", "4", "--no-packing"]
    assert main([*common, "--out", str(tmp_path / "big"), "--batch_size", "4"]) == 0
    assert main([*common, "--out", str(tmp_path / "accum"), "--batch_size", "2", "--grad_accum", "2"]) == 0
    read = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    big, accum = read(tmp_path / "big"), read(tmp_path / "accum")
    assert big == pytest.approx(accum, rel=1e-5)


def test_lora_run_resumes_exactly(checkpoint, sft_file, tmp_path):
    common = ["finetune", "--checkpoint", str(checkpoint), "--data", str(sft_file), "--task", "sft",
              "--schedule", "constant", "--warmup_steps", "2", "--precision", "fp32", "--batch_size", "4",
              "--eval_interval", "5", "--checkpoint_interval", "5"]
    assert main([*common, "--out", str(tmp_path / "whole"), "--max_steps", "10"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--max_steps", "5"]) == 0
    assert main([*common, "--out", str(tmp_path / "split"), "--max_steps", "10", "--resume"]) == 0
    read = lambda d: [json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert read(tmp_path / "split") == read(tmp_path / "whole")


def test_classifier_head_learns_labels_and_refuses_unseen_ones(checkpoint, tmp_path, capsys):
    rng = random.Random(0)
    records = [{"text": " ".join(rng.choice(words) for _ in range(8)), "label": label}
               for _ in range(40) for label, words in [("math", ["sum", "add", "plus", "times"]),
                                                       ("text", ["word", "line", "page", "book"])]]
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    out = tmp_path / "cls"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify",
                 "--out", str(out), *TRAIN, "--max_steps", "40", "--lr", "5e-3", "--eval_interval", "40"]) == 0
    assert json.loads((out / "labels.json").read_text()) == ["math", "text"]
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["val_accuracy"] >= 0.9
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "add plus sum times", "label": "math"},
                                                 {"text": "page book word line", "label": "text"}])
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(checkpoint), "--adapter", str(out), "--tasks", f"classify:{test}",
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["results"][f"classify:{test}"]["accuracy"] == 1.0
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "x", "label": "music"}])
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify",
                 "--val-data", str(unseen), "--out", str(tmp_path / "never")]) == 1
    assert "label 'music' was not seen in training" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_classifier_pooling_reads_only_real_tokens_and_is_saved_with_the_head(checkpoint, tmp_path):
    from fmforge.adapt.heads import HEAD_FILE, SequenceClassifier, load_classifier
    from fmforge.errors import ConfigError

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    model.eval()
    short, long = tokenizer.encode("x = 1", add_bos=True), tokenizer.encode("def f(a, b):\n    return a", add_bos=True)
    ids = torch.full((2, len(long) + 5), tokenizer.pad_id)  # right-padded past the longer text
    ids[0, :len(short)], ids[1, :len(long)] = torch.tensor(short), torch.tensor(long)
    lengths = torch.tensor([len(short), len(long)])
    with torch.no_grad():
        alone = [model(torch.tensor([row]), return_logits=False, return_hidden=True).hidden[0] for row in (short, long)]
        for pooling, expected in [("mean", [h.mean(0) for h in alone]), ("last", [h[-1] for h in alone])]:
            classifier = SequenceClassifier(model, ["a", "b", "c"], pooling).eval()
            logits = classifier(ids, lengths).logits
            torch.testing.assert_close(logits, classifier.score(torch.stack(expected)), rtol=1e-4, atol=1e-5)
            classifier.save_head(tmp_path)
            (tmp_path / "labels.json").write_text(json.dumps(classifier.labels))
            loaded = load_classifier(model, tmp_path)
            assert loaded.pooling == pooling and torch.equal(loaded(ids, lengths).logits, logits)
    # A head saved before the pooling was recorded is a last-token head.
    from safetensors.torch import save_file
    save_file({"score.weight": torch.zeros(3, model.config.n_embd)}, str(tmp_path / HEAD_FILE))
    assert load_classifier(model, tmp_path).pooling == "last"
    with pytest.raises(ConfigError, match="unknown pooling"):
        SequenceClassifier(model, ["a"], "max")


def test_resuming_with_other_settings_is_a_settings_mismatch(checkpoint, tmp_path, capsys):
    """Resuming a run made with other LoRA modules or another head pooling raises SettingsMismatchError (what the
    quickstart moves aside and trains again); the CLI prints one line and exits 1, and the run is untouched."""
    from fmforge.adapt.lora import LoRAConfig
    from fmforge.errors import SettingsMismatchError
    from fmforge.train.finetune import FinetuneSpec, finetune

    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": f"word {i}", "label": "ab"[i % 2]} for i in range(16)])
    out = tmp_path / "run"
    train = lambda steps: ["--max_steps", str(steps), "--batch_size", "4", "--precision", "fp32"]  # noqa: E731
    tree = lambda: {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}  # noqa: E731
    spec = lambda targets, pooling: FinetuneSpec(  # noqa: E731
        checkpoint=str(checkpoint), data=str(data), task="classify", out=str(out), pooling=pooling,
        lora=LoRAConfig(rank=2, alpha=4.0, target_modules=targets))
    finetune(spec("all-linear", "mean"), train(2), quiet=True)
    before = tree()
    with pytest.raises(SettingsMismatchError, match="does not fit this model"):
        finetune(spec("all-linear,embed_tokens", "mean"), train(4), resume=True, quiet=True)
    with pytest.raises(SettingsMismatchError, match="its head pools 'mean', not 'last'"):
        finetune(spec("all-linear", "last"), train(4), resume=True, quiet=True)
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify", "--out",
                 str(out), "--lora-rank", "2", "--lora-alpha", "4", "--pooling", "last", "--max_steps", "4",
                 "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "its head pools 'mean'" in err
    assert tree() == before


def test_head_lr_scale_multiplies_only_the_heads_step(checkpoint, tmp_path, capsys):
    """--head-lr-scale 10: after one Adam step (each element moves by ~lr) from the same start, the head has moved
    10x as far as with the default while the LoRA weights moved identically; resuming with another scale is refused."""
    from safetensors.torch import load_file

    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": f"word {i} " * 3, "label": "ab"[i % 2]} for i in range(16)])
    one_step = ["--max_steps", "1", "--warmup_steps", "0", "--schedule", "constant", "--lr", "1e-3",
                "--batch_size", "4", "--precision", "fp32", "--eval_interval", "1", "--lora-rank", "2"]
    runs = {}
    for scale in ("1", "10"):
        out = tmp_path / f"head{scale}"
        assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify", "--out",
                     str(out), "--head-lr-scale", scale, *one_step]) == 0
        runs[scale] = out
    from fmforge.adapt.heads import SequenceClassifier
    model, _, _ = load_model_and_tokenizer(checkpoint)
    torch.manual_seed(1337)  # the head's initialisation in both runs (fmforge's default seed)
    start = SequenceClassifier(model, ["a", "b"], "mean").score.weight.detach()
    moved = {scale: (load_file(str(out / "head.safetensors"))["score.weight"] - start).abs()
             for scale, out in runs.items()}
    assert 0.5e-3 < moved["1"].median() < 1.5e-3 and 5e-3 < moved["10"].median() < 15e-3
    torch.testing.assert_close(moved["10"], 10 * moved["1"], rtol=0.05, atol=1e-5)
    adapters = {scale: load_file(str(out / "adapter_model.safetensors")) for scale, out in runs.items()}
    assert all(torch.equal(adapters["1"][k], adapters["10"][k]) for k in adapters["1"])
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify", "--out",
                 str(runs["10"]), *one_step, "--max_steps", "2", "--resume"]) == 1
    assert "its head trained at 10 x the lr, not 1" in capsys.readouterr().err
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify", "--out",
                 str(tmp_path / "bad"), "--head-lr-scale", "0"]) == 1
    assert "--head-lr-scale must be > 0" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_embedding_lora_trains_merges_untied_and_round_trips(checkpoint, tmp_path):
    """LoRA on the token embedding of a model whose head shares the table: only the input side changes, the
    CLI merge unties head and embedding, and merged logits equal the unmerged adapter's."""
    from fmforge.adapt.lora import LoRAConfig, LoRAEmbedding, inject_lora, lora_modules, merge_lora
    from fmforge.adapt.specialist import load_specialist

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    assert model.config.tie_embeddings
    x = torch.tensor([tokenizer.encode("def f(x):\n    return x + 1\n", add_bos=True)])
    with torch.no_grad():
        plain = model(x).logits
        config = LoRAConfig(rank=4, target_modules="embed_tokens")
        assert config.target_modules == ["embed_tokens"]
        inject_lora(model, config)
        assert isinstance(model.embed_tokens, LoRAEmbedding)
        assert torch.equal(model(x).logits, plain)  # A starts at zero: the base's output exactly
        lora_modules(model)["embed_tokens"].lora_embedding_A.normal_(0.0, 0.1)
        adapted = model(x).logits
        assert (adapted - plain).abs().max() > 1e-3
        head = model.lm_head.weight.clone()
        merged = merge_lora(model)
        assert not merged.config.tie_embeddings and merged.lm_head.weight is not merged.embed_tokens.weight
        assert torch.equal(merged.lm_head.weight, head)  # the output side is the base's
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)

    rng = random.Random(0)
    records = [{"text": " ".join(rng.choice(words) for _ in range(8)), "label": label}
               for _ in range(20) for label, words in [("math", ["sum", "add", "plus"]), ("text", ["word", "page"])]]
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "classify",
                 "--lora-targets", "all-linear,embed_tokens", "--out", str(tmp_path / "ad"), *TRAIN]) == 0
    saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert "embed_tokens" in saved["target_modules"] and "q_proj" in saved["target_modules"]
    info = json.loads((tmp_path / "ad" / "finetune.json").read_text())
    V, C, r = model.config.vocab_size, model.config.n_embd, saved["r"]
    assert info["pooling"] == "mean"
    linears = sum(r * (m.in_features + m.out_features) for n, m in merged.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in saved["target_modules"])
    assert info["trainable_parameters"] == linears + r * (V + C) + 2 * C  # + embedding LoRA + the 2-way head
    assert main(["merge", "--checkpoint", str(checkpoint), "--adapter", str(tmp_path / "ad"),
                 "--out", str(tmp_path / "merged")]) == 0
    unmerged, tokenizer, _, _ = load_specialist(checkpoint, tmp_path / "ad")
    merged_clf, _, _, _ = load_specialist(tmp_path / "merged")
    ids = torch.tensor([tokenizer.encode("add plus sum", add_bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(merged_clf(ids, torch.tensor([ids.shape[1]])).logits,
                                   unmerged(ids, torch.tensor([ids.shape[1]])).logits, rtol=1e-4, atol=1e-4)
    assert not json.loads((tmp_path / "merged" / "config.json").read_text())["model"]["tie_embeddings"]


@pytest.mark.parametrize("line, message", [
    ('{"messages": [}', "chat.jsonl:3: not valid JSON"),
    ('{"msgs": []}', "chat.jsonl:3: missing field 'messages' (fields present: msgs)"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "chat.jsonl:3: message 0 has unknown role 'bot'"),
])
def test_malformed_data_names_the_line_and_writes_nothing(checkpoint, tmp_path, capsys, line, message):
    records = [json.dumps(r) for r in chats(2)] + [line]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    capsys.readouterr()
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(data), "--task", "sft",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_adapter_for_a_different_base_is_refused(lora_run, prepared, tmp_path, capsys):
    from conftest import tiny_overrides

    other = tmp_path / "other-base"
    assert main(["pretrain", *tiny_overrides(prepared, other, max_steps=2, seed=7)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(other), "--adapter", str(lora_run), "--tasks", "stdlib-docstring",
                 "--limit", "1"]) == 1
    assert "trained on a different base model" in capsys.readouterr().err


def test_continued_pretraining_on_shards_with_lora(checkpoint, prepared, tmp_path):
    out = tmp_path / "lm"
    assert main(["finetune", "--checkpoint", str(checkpoint), "--data", str(prepared), "--task", "lm",
                 "--out", str(out), *TRAIN]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "val_loss" in records[-1] and (out / "adapter_model.safetensors").exists()


def test_lora_reaches_moe_experts():
    from fmforge.adapt.lora import LoRAConfig, inject_lora
    from fmforge.config import model_config_from_preset
    from fmforge.model import Transformer

    model = Transformer(model_config_from_preset("tiny-moe", vocab_size=100))
    names = inject_lora(model, LoRAConfig(rank=2))
    assert "layers.0.mlp.experts.3.gate_proj" in names and "layers.1.mlp.shared_experts.0.down_proj" in names
    assert not any("router" in n for n in names)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_chat_streams_a_reply_per_turn(lora_run, checkpoint):
    result = run_cli("chat", "--checkpoint", str(checkpoint), "--adapter", str(lora_run), "--max-new-tokens", "8",
                     "--seed", "0", input_text="1 plus 2?\nthanks\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant> ") == 2


def test_eval_scores_multiple_choice_and_completion_files(checkpoint, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "import ", "choices": ["os", "zzzzqqq"], "answer": 0}] * 3)
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "def f(", "completion": "x):"}] * 2)
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", f"mc:{mc},completion:{comp}",
                 "--out", str(tmp_path / "r")]) == 0
    results = json.loads((tmp_path / "r" / "report.json").read_text())["results"]
    assert set(results[f"mc:{mc}"]) == {"acc", "acc_norm", "examples"}
    assert results[f"completion:{comp}"]["bits_per_byte"] > 0
    assert "| task | metric | value |" in (tmp_path / "r" / "report.md").read_text()


def test_builtin_tasks_have_fixed_disjoint_splits():
    from fmforge.data.tasks import task_records

    train = task_records("stdlib-module", "train")
    test = task_records("stdlib-module", "test")
    assert len(train) > 500 and len(test) > 50
    assert not {w for w, _ in train} & {w for w, _ in test}
    # Deduplicated before splitting: no function text twice, and none in both train and test.
    texts = [r["text"] for _, r in train]
    assert len(set(texts)) == len(texts) and not set(texts) & {r["text"] for _, r in test}
    assert len(set(r["label"] for _, r in train)) == 16
    assert task_records("stdlib-docstring", "train", limit=100) == task_records("stdlib-docstring", "train")[:100]
    record = task_records("stdlib-docstring", "test", limit=1)[0][1]
    assert record["prompt"].endswith("# Summary:") and record["completion"].startswith(" ")


def test_completion_longer_than_the_context_is_scored_on_what_fits(checkpoint, tmp_path):
    from fmforge.eval.tasks import evaluate_completion

    model, tokenizer, _ = load_model_and_tokenizer(checkpoint)
    long = " ".join(f"x{i}" for i in range(200))  # far more than the 64-token context
    result = evaluate_completion(model, tokenizer, [("t", {"prompt": "def f():", "completion": long})])
    assert 0 < result["bits_per_byte"] < 20
