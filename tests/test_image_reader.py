"""A base's image reader (`fmforge pretrain --image_reader true`, modalities/encoders.ImageCodeReader): features of
each code's decoded patch added to the codes of images that open a document, those codes out of the loss, the
reader saved with the base, inherited by its specialists and used by the engine from the prompt's ids alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fmforge.adapt.media import MediaEncoded, base_readers, read_media_encoders
from fmforge.adapt.specialist import load_specialist
from fmforge.checkpoint import load_tokenizer, resolve_checkpoint
from fmforge.cli import main
from fmforge.data.images import load_images
from fmforge.infer.engine import Engine
from fmforge.infer.sampling import SamplingParams
from fmforge.modalities import IMAGE_BEGIN_ID, IMAGE_END_ID
from fmforge.modalities.encoders import HEADER, code_placements, new_image_reader
from fmforge.train.pretrain import reading_batches


@pytest.fixture(scope="module")
def tokenizer(media_tokenizer):
    return load_tokenizer(media_tokenizer)


@pytest.fixture(scope="module")
def digits():
    return load_images("mnist", "test", 4)


@pytest.fixture(scope="module")
def reader_base(multimodal_base, tmp_path_factory) -> Path:
    """The tiny multimodal base's recipe and data, pretrained with the reader."""
    from conftest import tiny_overrides

    root = multimodal_base.parent
    out = tmp_path_factory.mktemp("reader-base") / "run"
    assert main(["pretrain", *tiny_overrides(root / "text", out, max_steps=12, lr=1e-2, eval_interval=12,
                                             checkpoint_interval=12, context_length=352),
                 "--train.mixture", f"{{{root / 'text'}: 1, {root / 'images'}: 2}}", "--image_reader", "true"]) == 0
    return out


def _document(tokenizer, image, caption: str, image_first: bool) -> list[int]:
    span, text = tokenizer.encode_image(image), tokenizer.encode(caption, add_bos=False)
    return [tokenizer.bos_id, *(span + text if image_first else text + span), tokenizer.eos_id]


def test_reader_reads_an_image_as_its_codes(tokenizer, digits):
    reader = new_image_reader(tokenizer, 32)
    assert not any(p.requires_grad for p in reader.parameters())  # nothing in it trains
    image = digits.images[0]
    span = tokenizer.encode_image(image)
    offset = tokenizer.code_offset("image")
    h, w = span[1] - offset, span[2] - offset
    grid = np.asarray(span[HEADER:-1]).reshape(h, w) - offset
    from_image, from_codes = reader.encode_media([image, grid])
    assert from_image.shape == (h * w, 32)
    torch.testing.assert_close(from_image, from_codes)  # a prompt image is read as the base read its codes
    other = reader.encode_media([digits.images[1]])[0]
    assert not torch.allclose(from_image, other)
    again = new_image_reader(tokenizer, 32)  # seeded: a fresh reader is the same reader
    torch.testing.assert_close(again.encode_media([grid])[0], from_codes)


def test_code_placements_find_the_images_that_open_a_document(tokenizer, digits):
    a, b = digits.images[0], digits.images[1]
    ids = _document(tokenizer, a, "a digit", True) + _document(tokenizer, b, "draw it", False)
    everything, _ = code_placements(tokenizer, ids)
    opening, spans = code_placements(tokenizer, ids, row=3, after_bos=True)
    assert len(everything) == 2 and len(opening) == 1 and opening[0].row == 3
    start, end = spans[0]
    assert ids[start - 1] == tokenizer.bos_id and opening[0].position == start + HEADER
    assert opening[0].media.size == end - start - HEADER - 1  # one code per position up to the end marker
    broken = list(ids)
    broken[2] += 1  # the header's height no longer fits the codes: read as ids only
    assert len(code_placements(tokenizer, broken)[0]) == 1


def test_reading_batches_add_features_and_drop_the_read_codes_from_the_loss(tokenizer, digits):
    ids = _document(tokenizer, digits.images[0], "a seven", True) + _document(tokenizer, digits.images[1], "x", False)
    row = torch.tensor([ids])
    plain = {"input_ids": row[:, :-1], "targets": row[:, 1:]}
    reader = new_image_reader(tokenizer, 16)
    batch = reading_batches(lambda step, micro: plain, reader, tokenizer)(0, 0)
    (start, end), = code_placements(tokenizer, ids, after_bos=True)[1]
    codes = range(start + HEADER, end - 1)  # positions of the opening image's codes
    ignored = (batch["targets"][0] == -100).nonzero().flatten().tolist()
    assert ignored == [p - 1 for p in codes]  # exactly the predictions of those codes
    added = batch["added_embeds"][0]
    found = code_placements(tokenizer, ids, after_bos=True)[0][0]
    torch.testing.assert_close(added[codes.start:codes.stop], reader.encode_media([found.media])[0])
    assert added[codes.start:codes.stop].abs().sum() > 0  # a digit has ink (background patches add nothing)
    outside = torch.ones(len(added), dtype=torch.bool)
    outside[codes.start:codes.stop] = False
    assert added[outside].abs().sum() == 0  # nothing elsewhere: the drawn image keeps its loss and no features
    text_only = {"input_ids": torch.tensor([[5, 6, 7]]), "targets": torch.tensor([[6, 7, 8]])}
    assert "added_embeds" not in reading_batches(lambda s, m: text_only, reader, tokenizer)(0, 0)


def test_pretrain_saves_the_reader_and_specialists_inherit_it(reader_base, tokenizer, digits, tmp_path, capsys):
    from test_vision import _digits_jsonl

    base = reader_base
    assert set(base_readers(resolve_checkpoint(base))) == {"image"}
    train = _digits_jsonl(tmp_path / "digits", "train", 24)
    out = tmp_path / "recognise"
    args = ["finetune", "--checkpoint", str(base), "--data", str(train), "--task", "recognise", "--method", "lora",
            "--out", str(out), "--batch_size", "4", "--max_steps", "3", "--val-fraction", "0"]
    assert main(args + ["--media-encoder", "on"]) != 0  # the base reads images itself
    assert "reads images itself" in capsys.readouterr().err
    assert main(args) == 0
    saved = read_media_encoders(out)
    assert set(saved) == {"image"} and getattr(saved["image"], "reads_codes", False)

    # the engine reads the prompt's image from its ids, as the training forward does
    model, tok, _, _ = load_specialist(base, out)
    ids = tok.encode_chat([{"role": "user", "content": [{"type": "image", "image": digits.images[0]}, "Which?"]}],
                          add_generation_prompt=True)
    wrapped = MediaEncoded(model, model.media_encoders).eval()
    engine = Engine(model, tok, speculate=0)
    events = []
    engine.submit(ids, SamplingParams(max_tokens=1, temperature=0, logprobs=0), events.append, stop_ids=frozenset())
    while engine.step():
        pass
    token, logprob = events[0].token_id, events[0].logprob.logprob
    with torch.no_grad():
        read, unread = [float(wrapped(torch.tensor([ids]), media=media).logits[0, -1].float().log_softmax(-1)[token])
                        for media in (code_placements(tok, ids)[0], [])]
    assert logprob == pytest.approx(read, abs=1e-4) and abs(read - unread) > 1e-3  # served as trained, and it matters


def test_pretrain_refuses_a_reader_without_images(prepared, tmp_path, capsys):
    from conftest import tiny_overrides

    assert main(["pretrain", *tiny_overrides(prepared, tmp_path / "run", max_steps=2), "--image_reader", "true"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "image tokenizer" in err[0]


def test_the_base_alone_reads_prompt_images(reader_base, digits):
    model, tok, _, _ = load_specialist(reader_base)
    engine = Engine(model, tok, speculate=0)
    ids = tok.encode_chat([{"role": "user", "content": [{"type": "image", "image": digits.images[1]}]}],
                          add_generation_prompt=True)
    assert len(engine._media_placements(ids, 0, None)) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.tuples(st.integers(1, 3), st.integers(1, 3), st.booleans())),
                max_size=8), st.data())
def test_code_placements_take_exactly_the_well_formed_spans(tokenizer, pieces, data):
    """Any mix of text ids and image spans, some of them broken (a wrong height): no error, and one placement per
    well-formed span, at its first code, holding its grid."""
    offset, size = tokenizer.code_offset("image"), tokenizer.ranges["image"][1]
    ids, expected = [], []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
            continue
        h, w, broken = piece
        grid = np.array(data.draw(st.lists(st.integers(0, size - 1), min_size=h * w, max_size=h * w))).reshape(h, w)
        span = [IMAGE_BEGIN_ID, offset + h + broken, offset + w, *(offset + grid.reshape(-1)).tolist(), IMAGE_END_ID]
        if not broken:
            expected.append((len(ids) + HEADER, grid))
        ids += span
    found, spans = code_placements(tokenizer, ids)
    assert [(item.position, item.media.tolist()) for item in found] == [(p, g.tolist()) for p, g in expected]
    assert all(ids[start] == IMAGE_BEGIN_ID and ids[end - 1] == IMAGE_END_ID for start, end in spans)
