"""Vision in the one token stream: the media tokenizer, the span grammar, image pretraining data and the mixture,
the vision tasks end to end (finetune -> eval), generate --image/--output-image, and export refusal."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from fmforge.checkpoint import load_model_and_tokenizer, load_tokenizer, resolve_checkpoint
from fmforge.cli import main
from fmforge.data.images import encode_png, load_images
from fmforge.data.loader import MixtureDataset
from fmforge.data.shards import load_split, read_manifest
from fmforge.infer.sampling import SamplingParams, sample_rows
from fmforge.modalities import IMAGE_BEGIN_ID, IMAGE_END_ID
from fmforge.modalities.stream import MAX_GRID, MediaTokenizer
from fmforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(media_tokenizer) -> MediaTokenizer:
    return load_tokenizer(media_tokenizer)


# ---- the media tokenizer ---------------------------------------------------------------------------------------

def test_media_tokenizer_extends_the_text_vocabulary(tokenizer, prepared):
    text = Tokenizer.load(prepared)
    assert isinstance(tokenizer, MediaTokenizer)
    assert tokenizer.ranges == {"image": (text.vocab_size, 125)}
    assert tokenizer.vocab_size == text.vocab_size + 125
    assert tokenizer.encode("def f(): pass") == text.encode("def f(): pass")  # text is the text tokenizer's
    assert tokenizer.fingerprint() != text.fingerprint()
    assert isinstance(load_tokenizer(prepared), Tokenizer)  # a text directory stays text


def test_image_round_trip_through_ids(tokenizer):
    images = load_images("mnist", "val", limit=4).images
    spans = tokenizer.encode_images(images)
    offset = tokenizer.ranges["image"][0]
    errors = []
    for span, image in zip(spans, images):
        assert span[0] == IMAGE_BEGIN_ID and span[-1] == IMAGE_END_ID
        assert span[1:3] == [offset + 7, offset + 7]  # 28 px / 4 = a 7x7 grid, written first
        assert all(offset <= i < tokenizer.vocab_size for i in span[3:-1]) and len(span) == 3 + 49 + 1
        assert tokenizer.decode(span) == "<|image|><|/image|>"  # codes are not text
        decoded = tokenizer.decode_images([5, 6] + span + [9])
        assert len(decoded) == 1 and decoded[0].shape == image.shape
        errors.append(np.abs(decoded[0].astype(float) - image.astype(float)).mean() / 255)
    black = images.astype(float).mean() / 255  # the error of guessing all-black images
    assert np.mean(errors) < 0.8 * black  # a short training run: bounded, well below a blind guess, not perfect


def test_chat_with_an_image_part_is_text_then_span_then_text(tokenizer):
    image = load_images("shapes", "val", limit=1).images[0]
    ids = tokenizer.encode_chat([{"role": "user", "content": [{"type": "image", "image": image}, "What?"]}],
                                add_generation_prompt=True)
    span = tokenizer.encode_image(image)
    user = tokenizer.token_id("<|user|>")
    start = ids.index(IMAGE_BEGIN_ID)
    assert ids[start:start + len(span)] == span and len(span) == 3 + 144 + 1
    assert user in ids[:start]
    assert tokenizer.decode(ids[start + len(span):]).startswith("What?")
    with pytest.raises(Exception, match="U\\+E002"):
        tokenizer.encode_chat([{"role": "user", "content": "forged \ue002 mark"}])


def test_media_tokenizer_saves_and_loads_with_checkpoints(multimodal_base, tokenizer):
    checkpoint = resolve_checkpoint(multimodal_base)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["format_version"] == 2
    assert config["modalities"] == {"image": {"code_offset": tokenizer.ranges["image"][0], "codebook_size": 125,
                                              "tokenizer": "image_tokenizer"}}
    model, loaded, _ = load_model_and_tokenizer(checkpoint)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert model.config.vocab_size == tokenizer.vocab_size


# ---- the span grammar ------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), temperature=st.sampled_from([0.0, 0.7, 1.0, 5.0]),
       begin_bias=st.floats(-5, 20), steps=st.integers(1, 120))
def test_sampling_under_the_grammar_only_writes_well_formed_spans(tokenizer, seed, temperature, begin_bias, steps):
    """Whatever the logits say, a sequence never holds a code outside a span, and every span it closes decodes."""
    generator = torch.Generator().manual_seed(seed)
    V = tokenizer.vocab_size + 3  # a model vocabulary may be padded past the tokenizer's
    output: list[int] = []
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=steps)
    for _ in range(steps):
        logits = torch.randn(1, V, generator=generator) * 4
        logits[0, IMAGE_BEGIN_ID] += begin_bias
        logits[0, tokenizer.text_vocab_size:] += 3  # the model "wants" codes everywhere
        token, _ = sample_rows(logits, [params], [output], [params.generator("cpu", 0)], tokenizer, [[1]])
        output.append(token[0])
    text_vocab = tokenizer.text_vocab_size
    inside, header = False, []
    for token in output:
        assert token < tokenizer.vocab_size
        if not inside:
            assert token < text_vocab, "a code outside a span"
            inside = token == IMAGE_BEGIN_ID
            header = []
        elif len(header) < 2:
            assert 1 <= token - text_vocab <= MAX_GRID
            header.append(token - text_vocab)
        elif token == IMAGE_END_ID:
            inside = False
    for _, start, end in tokenizer.spans(output):
        span = output[start:end]
        assert len(span) == 3 + (span[1] - text_vocab) * (span[2] - text_vocab) + 1
    tokenizer.decode_images(output)  # every complete span decodes


def test_allowed_follows_the_header(tokenizer):
    offset = tokenizer.ranges["image"][0]
    assert tokenizer.allowed([1, 2], []) == (0, offset)  # text: no codes
    assert tokenizer.allowed([1], [IMAGE_BEGIN_ID]) == (offset + 1, offset + MAX_GRID + 1)
    body = [IMAGE_BEGIN_ID, offset + 2, offset + 3]
    assert tokenizer.allowed(body, []) == (offset, offset + 125)
    assert tokenizer.allowed(body + [offset] * 5, []) == (offset, offset + 125)
    assert tokenizer.allowed(body + [offset] * 6, []) == (IMAGE_END_ID, IMAGE_END_ID + 1)
    assert tokenizer.allowed(body + [offset] * 6 + [IMAGE_END_ID], []) == (0, offset)


# ---- pretraining data --------------------------------------------------------------------------------------

def test_image_prepare_writes_caption_image_pairs_from_the_sources_splits(tmp_path, media_tokenizer, tokenizer):
    out = tmp_path / "images"
    assert main(["prepare", "image:mnist", "--image-limit", "10", "--tokenizer", str(media_tokenizer),
                 "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest.train.documents == 20 and manifest.val.documents == 20  # two documents per image
    train = np.concatenate([np.asarray(s) for s in load_split(out, "train")])
    assert train.max() < tokenizer.vocab_size
    assert (train == IMAGE_BEGIN_ID).sum() == 20 and (train == IMAGE_END_ID).sum() == 20
    assert "a handwritten digit" in tokenizer.decode(train[:80].tolist())
    assert load_tokenizer(out).fingerprint() == manifest.tokenizer_fingerprint
    # the same command again reuses the shards; a text tokenizer is refused for image sources
    assert main(["prepare", "image:mnist", "--image-limit", "10", "--tokenizer", str(media_tokenizer),
                 "--out", str(out)]) == 0


def test_image_sources_need_a_media_tokenizer_and_the_prefix(tmp_path, prepared, media_tokenizer, capsys):
    assert main(["prepare", "image:mnist", "--tokenizer", str(prepared), "--out", str(tmp_path / "x")]) == 1
    assert "image tokenizer" in capsys.readouterr().err
    assert main(["prepare", "image:mnist", str(prepared), "--tokenizer", str(media_tokenizer),
                 "--out", str(tmp_path / "y")]) == 1
    assert "image:SOURCE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mixture_draws_in_proportion_and_is_deterministic():
    class Rows:
        def __init__(self, value, n):
            self.value, self.n = value, n

        def __len__(self):
            return self.n

        def batch(self, indices):
            return {"input_ids": torch.tensor([[self.value, i] for i in indices])}

    mixture = MixtureDataset([Rows(0, 10), Rows(1, 1000)], [3.0, 1.0])
    assert len(mixture) == round(1010 * 0.75) + round(1010 * 0.25)
    rows = mixture.batch(range(len(mixture)))["input_ids"]
    assert (rows[:, 0] == 0).sum() == round(1010 * 0.75)  # the small set is repeated to its share
    assert set(rows[rows[:, 0] == 0][:, 1].tolist()) == set(range(10))
    spread = rows[rows[:, 0] == 1][:, 1]
    assert spread.min() == 0 and spread.max() > 900  # the big set is sampled evenly through, not its first rows
    assert torch.equal(rows, mixture.batch(range(len(mixture)))["input_ids"])


def test_mixture_of_different_tokenizers_is_refused(tmp_path, prepared, corpus_dir):
    other = tmp_path / "other"
    assert main(["prepare", str(corpus_dir), "--vocab-size", "300", "--out", str(other), "--workers", "1"]) == 0
    result = run_cli("pretrain", "--train.mixture", f"{{{prepared}: 1, {other}: 1}}", "--max_steps", "1",
                     "--out_dir", str(tmp_path / "run"))
    assert result.returncode == 1 and "different tokenizers" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ---- tasks end to end ------------------------------------------------------------------------------------------

def _digits_jsonl(directory: Path, split: str, count: int) -> Path:
    """A recognise JSONL of MNIST 0s and 1s as PNG files (a two-class problem a tiny model can learn)."""
    data = load_images("mnist", split)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, record) in enumerate(zip(data.images, data.records)):
        if record["label"] in (0, 1) and len(lines) < count:
            name = f"{split}-{index}.png"
            (directory / name).write_bytes(encode_png(image))
            lines.append(json.dumps({"image": name, "label": "zero" if record["label"] == 0 else "one"}))
    path = directory / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _eval(checkpoint, adapter, task_spec, limit, tmp_path, name) -> dict:
    out = tmp_path / name
    args = ["eval", "--checkpoint", str(checkpoint), "--tasks", task_spec, "--limit", str(limit), "--out", str(out)]
    assert main(args + (["--adapter", str(adapter)] if adapter else [])) == 0
    return json.loads((out / "report.json").read_text())["results"][task_spec]


def test_recognise_specialist_learns_from_user_images(multimodal_base, tmp_path):
    train = _digits_jsonl(tmp_path / "digits", "train", 120)
    test = _digits_jsonl(tmp_path / "digits", "test", 40)
    spec = f"recognise:{test}"
    before = _eval(multimodal_base, None, spec, 40, tmp_path, "before")
    adapter = tmp_path / "recognise"
    assert main(["finetune", "--checkpoint", str(multimodal_base), "--data", str(train), "--task", "recognise",
                 "--method", "full", "--out", str(adapter), "--max_steps", "60", "--batch_size", "8", "--lr", "1e-2",
                 "--eval_interval", "60", "--log_interval", "20", "--val-fraction", "0"]) == 0
    after = _eval(adapter, None, spec, 40, tmp_path, "after")
    # the base answers with anything but a label; the specialist answers with the labels (a tiny model in a minute
    # of training: the accuracy targets are benchmarks/vision.py's, on a real budget)
    assert before["accuracy"] < 0.2 and after["accuracy"] >= 0.5, (before, after)


def _yes_no_jsonl(directory: Path, split: str, count: int) -> Path:
    """An answer JSONL of shapes scenes (PNG files) with their "Is there a ...?" questions, yes and no balanced."""
    from fmforge.data.tasks import BUILTIN

    directory.mkdir(parents=True, exist_ok=True)
    lines, answers = [], {"yes": 0, "no": 0}
    for index, (_, record) in enumerate(BUILTIN["shapes-answer"].records(split, 400)):
        if record["question"].startswith("Is there") and answers[record["answer"]] < count // 2:
            answers[record["answer"]] += 1
            (directory / f"{split}-{index}.png").write_bytes(encode_png(record["image"]))
            lines.append(json.dumps({"image": f"{split}-{index}.png", "question": record["question"],
                                     "answer": record["answer"]}))
    path = directory / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# draw: full fine-tuning (100 steps: 40/40 valid images at 1 and 2 threads); a 60-150-step LoRA of this tiny base
# drew 0-6 of 40, at the mercy of the sampler's draws (the quickstart's LoRA draw specialist, at scale: 1.00 valid).
@pytest.mark.parametrize("dataset,metric,better,method", [
    ("mnist-draw", "valid", "higher", "full"), ("shapes-edit", "pixel_error", "lower", "lora"),
    ("yes-no", "accuracy", "higher", "full"), ("glyphs-read", "char_accuracy", "higher", "full"),
])
def test_each_vision_task_trains_and_improves_its_metric(multimodal_base, tmp_path, dataset, metric, better, method):
    spec, data, task = dataset, dataset, []
    if dataset == "yes-no":  # the answer task from user files; its metric moves within a tiny run
        data = str(_yes_no_jsonl(tmp_path / "scenes", "train", 64))
        spec = f"answer:{_yes_no_jsonl(tmp_path / 'scenes', 'test', 20)}"
        task = ["--task", "answer", "--val-fraction", "0"]
    before = _eval(multimodal_base, None, spec, 20, tmp_path, "before")
    out = tmp_path / "specialist"
    # (20 LoRA steps left the edit specialist drawing no image on one CI machine)
    steps = "60" if method == "lora" else "100"
    assert main(["finetune", "--checkpoint", str(multimodal_base), "--data", data, *task, "--limit", "64",
                 "--method", method, "--out", str(out), "--max_steps", steps, "--batch_size", "8", "--lr", "1e-2",
                 "--eval_interval", steps, "--log_interval", steps, "--eval_tokens", "4096"]) == 0
    if method == "lora":  # the default targets of a task whose prompt holds an image take in the token embedding
        assert "embed_tokens" in json.loads((out / "adapter_config.json").read_text())["target_modules"]
    after = _eval(multimodal_base, out, spec, 20, tmp_path, "after") if method == "lora" else \
        _eval(out, None, spec, 20, tmp_path, "after")
    assert (after[metric] > before[metric]) if better == "higher" else (after[metric] < before[metric]), \
        (before, after)
    if dataset == "yes-no":  # it answers yes or no now (the base answers anything but); which one is a coin flip
        assert _answers(out, spec.split(":", 1)[1]) <= {"yes", "no"}


def _answers(checkpoint: Path, path: str) -> set[str]:
    """The distinct replies of a specialist to an answer JSONL's questions."""
    from fmforge.adapt.specialist import load_specialist
    from fmforge.data.tasks import TASKS, read_records
    from fmforge.eval.vision import TEXT_REPLY_TOKENS, replies

    model, tokenizer, _, _ = load_specialist(str(checkpoint))
    records = read_records(TASKS["answer"], path)
    outputs = replies(model, tokenizer, "answer", records, TEXT_REPLY_TOKENS)
    return {tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs}


def test_vision_task_on_a_text_model_is_one_error_line(checkpoint, tmp_path):
    result = run_cli("finetune", "--checkpoint", str(checkpoint), "--data", "mnist-recognise", "--limit", "4",
                     "--out", str(tmp_path / "a"), "--max_steps", "1")
    assert result.returncode == 1 and "image tokenizer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()


# ---- generate --image / --output-image -------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring width x height, with one tiny IDAT: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_generate_reads_an_image_and_writes_one(multimodal_base, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(encode_png(load_images("mnist", "test", limit=1).images[0]))
    out = tmp_path / "drawn.png"
    result = run_cli("generate", "--checkpoint", str(multimodal_base), "--image", str(image), "--prompt",
                     "What is in this image?", "--max-new-tokens", "8", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    result = run_cli("generate", "--checkpoint", str(multimodal_base), "--prompt", "a handwritten digit 3",
                     "--output-image", str(out), "--output-size", "28x24", "--temperature", "1", "--seed", "0")
    assert result.returncode == 0, result.stderr
    from PIL import Image
    with Image.open(out) as drawn:
        assert drawn.format == "PNG" and drawn.size == (28, 24)
    result = run_cli("generate", "--checkpoint", str(multimodal_base), "--prompt", "x", "--output-image",
                     str(tmp_path / "odd.png"), "--output-size", "30x28")
    assert result.returncode == 1 and "multiple of 4" in result.stderr and not (tmp_path / "odd.png").exists()
    # Classifier-free guidance (default DRAW_GUIDANCE) changes the drawing of the same seed; 1 turns it off.
    drawn = []
    for guidance in ([], ["--guidance", "1"], ["--guidance", "6"]):
        target = tmp_path / f"guided-{len(drawn)}.png"
        result = run_cli("generate", "--checkpoint", str(multimodal_base), "--prompt", "a handwritten digit 3",
                         "--output-image", str(target), "--output-size", "28x28", "--seed", "0", *guidance)
        assert result.returncode == 0, result.stderr
        drawn.append(target.read_bytes())
    assert len(set(drawn)) == 3
    for flags, message in ((["--guidance", "2"], "goes with --output-image"),
                           (["--guidance", "-1", "--output-image", str(tmp_path / "g.png")], "guidance must be")):
        result = run_cli("generate", "--checkpoint", str(multimodal_base), "--prompt", "x", *flags)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()


def test_a_tenth_of_the_draw_records_train_without_their_text(tokenizer):
    from fmforge.data.vision import (UNCONDITIONAL_SHARE, builtin_records, trains_unconditional,
                                     unconditional_prompt, vision_example, vision_prompt)

    records = builtin_records("mnist-draw", "train", 2000)
    dropped = [(where, record) for where, record in records if trains_unconditional(where)]
    assert abs(len(dropped) / len(records) - UNCONDITIONAL_SHARE) < 0.03
    assert [w for w, _ in dropped] == [w for w, _ in builtin_records("mnist-draw", "train", 2000)
                                       if trains_unconditional(w)]  # the same ones every time
    where, record = dropped[0]
    example = vision_example("draw", record, tokenizer, where)
    prompt = unconditional_prompt(tokenizer)
    assert example.tokens[:len(prompt)] == prompt and not any(example.loss_mask[:len(prompt)])
    assert example.tokens[len(prompt)] == IMAGE_BEGIN_ID  # the reply is the image, as for the others
    kept = next((w, r) for w, r in records if not trains_unconditional(w))
    with_text = vision_example("draw", kept[1], tokenizer, kept[0])
    assert with_text.tokens[:len(vision_prompt("draw", kept[1], kept[0], tokenizer))] == \
        vision_prompt("draw", kept[1], kept[0], tokenizer)
    # other tasks keep their text whatever the hash says
    recognise = vision_example("recognise", {"image": record["image"], "label": "3"}, tokenizer, where)
    assert recognise.tokens[:len(prompt)] != prompt


@pytest.mark.parametrize("content,message", [
    (b"not an image at all", "not an image"),
    (encode_png(np.zeros((28, 28, 3), np.uint8))[:60], "cannot decode"),
    (_png_header_only(20000, 20000), "pixel limit"),
])
def test_generate_with_a_bad_image_is_one_error_line(multimodal_base, tmp_path, content, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    out = tmp_path / "out.png"
    result = run_cli("generate", "--checkpoint", str(multimodal_base), "--image", str(bad), "--prompt", "x",
                     "--output-image", str(out))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_images_on_a_text_model_and_a_wrong_output_suffix_are_refused(checkpoint, multimodal_base, tmp_path):
    image = tmp_path / "digit.png"
    image.write_bytes(encode_png(load_images("mnist", "test", limit=1).images[0]))
    result = run_cli("generate", "--checkpoint", str(checkpoint), "--image", str(image), "--prompt", "x")
    assert result.returncode == 1 and "text only" in result.stderr
    result = run_cli("generate", "--checkpoint", str(multimodal_base), "--prompt", "x", "--output-image",
                     str(tmp_path / "x.jpg"))
    assert result.returncode == 1 and ".png" in result.stderr and not (tmp_path / "x.jpg").exists()


# ---- export ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["export", "hf"], ["export", "gguf"]])
def test_export_of_a_multimodal_checkpoint_is_refused(multimodal_base, tmp_path, command):
    out = tmp_path / ("out.gguf" if command[-1] == "gguf" else "out")
    result = run_cli(*command, str(multimodal_base), "--out", str(out))
    assert result.returncode == 1 and "multimodal" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
