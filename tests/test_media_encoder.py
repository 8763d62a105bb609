"""Understanding encoders: continuous image features added to a prompt's code embeddings (modalities/encoders.py,
adapt/media.py) — shapes, the zero start, where features land in packed batches, the engine against a plain
recompute-everything loop (chunked prefill and hybrid batches included), and finetune -> eval -> resume."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fmforge.adapt.media import MEDIA_ENCODER_FILE, MediaEncoded, read_media_encoders, save_media_encoders
from fmforge.checkpoint import load_model_and_tokenizer, load_tokenizer
from fmforge.cli import main
from fmforge.data.finetune import PackedDataset
from fmforge.data.images import load_images
from fmforge.data.vision import vision_example
from fmforge.infer.engine import Engine, GenerationRequest
from fmforge.infer.sampling import SamplingParams
from fmforge.modalities import IMAGE_BEGIN_ID
from fmforge.modalities.encoders import ImageEncoderConfig, ImagePatchEncoder, new_media_encoders, placements
from fmforge.model import Transformer


@pytest.fixture(scope="module")
def tokenizer(media_tokenizer):
    return load_tokenizer(media_tokenizer)


@pytest.fixture(scope="module")
def digits():
    return load_images("mnist", "test", 6)


def _randomised(encoders: dict, seed: int = 0) -> dict:
    """The encoders with an open gate (a fresh one adds nothing, which would test nothing)."""
    torch.manual_seed(seed)
    for encoder in encoders.values():
        encoder.out.gate.data.fill_(1.0)
        encoder.out.scale = encoder.config.scale = 0.5  # features the size of these tiny models' embeddings
    return encoders


def test_encoder_gives_one_feature_per_code_and_starts_at_zero():
    encoder = ImagePatchEncoder(ImageEncoderConfig(downsample=4, width=8, n_embd=32))
    images = torch.randint(0, 256, (3, 12, 20, 3), dtype=torch.uint8)
    features = encoder(images)
    assert features.shape == (3, 3 * 5, 32)  # (N, h*w, n_embd), one per 4x4 patch, as the codes
    assert torch.count_nonzero(features) == 0  # the gate starts closed: a fresh encoder changes nothing
    encoder.out.gate.data.fill_(0.5)
    rms = encoder(images).pow(2).mean(-1).sqrt()  # open, every feature is the size its scale says
    torch.testing.assert_close(rms, torch.full_like(rms, 0.02 * math.tanh(0.5)), rtol=1e-3, atol=1e-6)
    with pytest.raises(Exception, match="uint8"):
        encoder(images.float())


def test_a_fresh_encoder_leaves_the_model_as_it_was(multimodal_base, tokenizer, digits):
    model, _, _ = load_model_and_tokenizer(multimodal_base)
    example = vision_example("recognise", {"image": digits.images[0], "label": "7"}, tokenizer, "t:1")
    wrapped = MediaEncoded(model, new_media_encoders(tokenizer, model.config.n_embd)).eval()
    ids = torch.tensor([example.tokens])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(ids, media=example.media).logits, model(ids).logits)
        _randomised(wrapped.encoders)
        assert not torch.allclose(wrapped(ids, media=example.media).logits, model(ids).logits)


def test_placements_find_each_image_span_in_order(tokenizer, digits):
    a, b, absent = digits.images[0], digits.images[1], digits.images[2]
    ids = tokenizer.encode_chat([{"role": "user", "content": [{"type": "image", "image": a}, "and",
                                                              {"type": "image", "image": b}, "?"]}])
    found = placements(tokenizer, ids, [a, b, absent])
    assert [item.media is x for item, x in zip(found, (a, b))] == [True, True] and len(found) == 2
    for item, image in zip(found, (a, b)):
        span = tokenizer.encode_image(image)
        assert ids[item.position - 3] == IMAGE_BEGIN_ID
        assert ids[item.position:item.position + len(span) - 4] == span[3:-1]  # the codes, after the header


def test_packed_batches_place_media_where_their_codes_are(tokenizer, digits):
    examples = [vision_example("recognise", {"image": image, "label": str(record["label"])}, tokenizer, f"t:{i}")
                for i, (image, record) in enumerate(zip(digits.images, digits.records))]
    packed = PackedDataset(examples, 352, tokenizer.pad_id, seed=3, keep_media=True)
    assert len(packed) < len(examples)  # several examples share a row
    batch = packed.batch(list(range(len(packed))))
    assert len(batch["media"]) == len(examples)
    for item in batch["media"]:
        codes = tokenizer.encode_image(item.media)[3:-1]
        row = batch["input_ids"][item.row].tolist()
        assert row[item.position - 3] == IMAGE_BEGIN_ID and row[item.position:item.position + len(codes)] == codes
    assert "media" not in PackedDataset(examples, 352, tokenizer.pad_id).batch([0])  # only when asked for


@torch.no_grad()
def _reference_greedy(wrapped: MediaEncoded, tokenizer, prompt: list[int], media, steps: int) -> list[int]:
    """Greedy tokens recomputing the whole sequence each step through the training wrapper, each within the id range
    the token stream's grammar allows there (tokenizer.allowed: no image code outside a span), as the engine picks."""
    found = placements(tokenizer, prompt, media)
    tokens = []
    for _ in range(steps):
        ids = torch.tensor([prompt + tokens])
        low, high = tokenizer.allowed(prompt, tokens)
        tokens.append(low + int(wrapped(ids, media=found).logits[0, -1, low:high].argmax()))
    return tokens


@pytest.mark.parametrize("prefill_chunk", [0, 7])
def test_engine_adds_the_features_as_the_training_forward_does(multimodal_base, tokenizer, digits, prefill_chunk):
    """The base's shape with large random weights (init_std 0.5), whose greedy replies wander and follow the features;
    a 40-step base can answer one token whatever it sees (it did on an Intel Xeon), which would test nothing."""
    config = load_model_and_tokenizer(multimodal_base)[0].config
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(config, init_std=0.5)).eval()
    model.media_encoders = _randomised(new_media_encoders(tokenizer, model.config.n_embd))
    wrapped = MediaEncoded(model, model.media_encoders).eval()
    prompts = []
    for image in digits.images[:3]:
        user = [{"type": "image", "image": image}, "What is in this image?"]
        prompts.append((tokenizer.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True),
                        [image]))
    expected = [_reference_greedy(wrapped, tokenizer, ids, media, 6) for ids, media in prompts]
    plain = [_reference_greedy(wrapped, tokenizer, ids, [], 6) for ids, _ in prompts]
    assert expected != plain  # the features change what the model says
    engine = Engine(model, tokenizer, max_batch=4, speculate=0, prefill_chunk=prefill_chunk)
    requests = [GenerationRequest(ids, SamplingParams(max_tokens=6, temperature=0), stop_ids=frozenset(), media=media)
                for ids, media in prompts]
    assert [c.token_ids for c in engine.complete(requests)] == expected
    # one sequence decoding while the others' prompts arrive in chunks (the hybrid decode + prefill forward)
    engine = Engine(model, tokenizer, max_batch=4, speculate=0, prefill_chunk=prefill_chunk or 9)
    hybrid = []
    original = engine._decode_with_chunk
    engine._decode_with_chunk = lambda *args: (hybrid.append(1), original(*args))
    outputs: list[list[int]] = [[], [], []]

    def submit(index):
        request = requests[index]
        engine.submit(request.prompt_ids, request.params, lambda event: outputs[index].append(event.token_id),
                      stop_ids=frozenset(), media=request.media)

    submit(0)
    while not outputs[0]:
        engine.step()
    submit(1), submit(2)
    while engine.step():
        pass
    assert hybrid and [[t for t in out if t is not None] for out in outputs] == expected


def test_finetune_trains_saves_and_serves_the_encoder(multimodal_base, tmp_path, capsys):
    from test_vision import _digits_jsonl, _eval

    train = _digits_jsonl(tmp_path / "digits", "train", 60)
    test = _digits_jsonl(tmp_path / "digits", "test", 10)
    out = tmp_path / "recognise"
    args = ["finetune", "--checkpoint", str(multimodal_base), "--data", str(train), "--task", "recognise",
            "--method", "lora", "--out", str(out), "--batch_size", "4", "--lr", "1e-2", "--eval_interval", "100",
            "--log_interval", "10", "--val-fraction", "0", "--checkpoint_interval", "10"]
    assert main(args + ["--max_steps", "10", "--media-encoder", "on"]) == 0
    encoders = read_media_encoders(out)
    assert set(encoders) == {"image"} and float(encoders["image"].out.gate.detach()) != 0  # it trained
    record = json.loads((out / "finetune.json").read_text()) if (out / "finetune.json").exists() else None
    assert record is None or record.get("media_encoders") == ["image"]
    report = _eval(multimodal_base, out, f"recognise:{test}", 10, tmp_path, "eval")
    assert 0.0 <= report["accuracy"] <= 1.0
    # resuming with another encoder setting is refused in one line, and nothing is overwritten
    before = (out / MEDIA_ENCODER_FILE).read_bytes()
    capsys.readouterr()
    assert main(args + ["--max_steps", "20", "--media-encoder", "off", "--resume"]) != 0
    assert "--media-encoder" in capsys.readouterr().err
    assert (out / MEDIA_ENCODER_FILE).read_bytes() == before


def test_encoders_round_trip_through_their_file(tmp_path, tokenizer):
    encoders = _randomised(new_media_encoders(tokenizer, 24))
    save_media_encoders(tmp_path, encoders)
    loaded = read_media_encoders(tmp_path)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(loaded["image"](images), encoders["image"](images))
    (tmp_path / MEDIA_ENCODER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="cannot read the media encoders"):
        read_media_encoders(tmp_path)


@settings(max_examples=15, deadline=None)
@given(samples=st.integers(1, 40000), row_length=st.sampled_from([1, 4, 16]), downsample=st.sampled_from([1, 2, 4]))
def test_audio_encoder_gives_one_feature_per_code_of_the_span(samples, row_length, downsample):
    from fmforge.modalities.audio import AudioCodec, AudioCodecConfig
    from fmforge.modalities.encoders import AudioEncoderConfig, AudioFrameEncoder

    config = AudioCodecConfig(sample_rate=8000, n_fft=256, win_length=200, hop_length=80, n_mels=32, width=8,
                              levels=(5, 5), downsample=downsample, row_length=row_length)
    encoder = AudioFrameEncoder(AudioEncoderConfig(codec=dataclasses.asdict(config), width=8, n_embd=16))
    samples = min(samples, int(config.max_seconds * config.sample_rate) - config.hop_length)  # what one span holds
    wave = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
    short = wave[:max(1, samples // 3)]
    with torch.no_grad():
        features = encoder.encode_media([wave, short])
        codes = AudioCodec(config).encode_batch([wave, short])
    assert [f.shape for f in features] == [(c.numel(), 16) for c in codes]
    assert all(torch.count_nonzero(f) == 0 for f in features)  # a fresh encoder adds nothing


def test_encoders_are_opt_in_and_only_for_tasks_with_media_in_their_prompts(tokenizer):
    from fmforge.data.tasks import TASKS
    from fmforge.train.finetune import FinetuneSpec, uses_media_encoder

    assert not uses_media_encoder(FinetuneSpec("unused", "unused"), TASKS["recognise"], tokenizer)  # off by default
    assert uses_media_encoder(FinetuneSpec("unused", "unused", media_encoder="on"), TASKS["answer"], tokenizer)
    for task in ("completion", "draw"):  # no media in the prompt: nothing to encode
        with pytest.raises(Exception, match="--media-encoder on needs"):
            uses_media_encoder(FinetuneSpec("unused", "unused", media_encoder="on"), TASKS[task], tokenizer)


def test_the_server_reads_an_adapters_encoder_through_the_openai_client(multimodal_base, tokenizer, digits,
                                                                         tmp_path):
    import base64
    import shutil

    import openai
    from conftest import ServerProcess, make_adapter
    from fmforge.checkpoint import resolve_checkpoint
    from fmforge.data.images import encode_png
    from fmforge.infer.lora import read_adapter

    base = resolve_checkpoint(multimodal_base)
    model, _, _ = load_model_and_tokenizer(base)
    with_encoder = make_adapter(base, tmp_path / "with", 5, ["q_proj", "v_proj"], 4)
    save_media_encoders(with_encoder, _randomised(new_media_encoders(tokenizer, model.config.n_embd)))
    without = tmp_path / "without"
    shutil.copytree(with_encoder, without)
    (without / MEDIA_ENCODER_FILE).unlink()

    image = digits.images[0]
    user = [{"type": "image", "image": image}, "What is in this image?"]
    prompt = tokenizer.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)
    engine = Engine(model, tokenizer, [read_adapter("with", with_encoder, base)], speculate=0)
    params = SamplingParams(max_tokens=8, temperature=0)
    def reply(media):  # as the chat route writes it: text, special tokens left out
        ids = engine.complete([GenerationRequest(prompt, params, adapter=1, stop_ids=tokenizer.chat_stop_ids(),
                                                 media=media)])[0].token_ids
        return tokenizer.decode(ids, skip_special_tokens=True)

    expected, plain = reply([image]), reply(None)
    assert expected != plain  # the encoder changes the answer, so agreeing below means it was used

    server = ServerProcess("--checkpoint", str(base), "--adapter", f"with={with_encoder}",
                           "--adapter", f"without={without}", "--speculate", "0")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is in this image?"}]}]
        answers = {name: client.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
                   for name in ("with", "without")}
        assert answers["with"].choices[0].message.content == expected
        assert answers["without"].choices[0].message.content == plain
        assert answers["with"].usage.prompt_tokens == len(prompt)  # the token stream is the same either way
    finally:
        assert server.stop() == 0, server.output()
