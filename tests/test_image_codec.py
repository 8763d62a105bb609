"""The discrete image tokenizer: FSQ, the conv codec, its training, save/load, image spans and the CLI command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fmforge.errors import DataError
from fmforge.modalities import (MODALITIES, ImageCodec, ImageCodecConfig, image_span, load_image_codec,
                                parse_image_span, save_image_codec, train_image_codec)
from fmforge.modalities.image import FSQ


def digit_images(size: int = 16) -> np.ndarray:
    """sklearn's 8x8 digits (0..16), upscaled by pixel repetition to size x size, as uint8 RGB (N, H, W, 3)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    repeat = size // 8
    big = np.repeat(np.repeat(digits, repeat, axis=1), repeat, axis=2)
    gray = np.clip(big / 16 * 255, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def trained():
    """A codec trained for 150 steps on 400 16x16 digits (f=4: 4x4 codes), with its report."""
    torch.set_num_threads(1)
    config = ImageCodecConfig(image_size=16, levels=(8, 5, 5, 5), downsample=4, width=32)
    codec, report = train_image_codec(digit_images()[:400], config, steps=150, lr=3e-3, seed=0, batch_size=32)
    return codec, report


def test_registry_names_the_image_modality_and_its_span_tokens():
    from fmforge.tokenizer import SPECIAL_TOKENS

    image = MODALITIES["image"]
    assert image.codec is ImageCodec and image.content_part == "image_url"
    assert SPECIAL_TOKENS[image.begin_id] == image.begin_token == "<|image|>"
    assert SPECIAL_TOKENS[image.end_id] == image.end_token == "<|/image|>"


def test_fsq_rounds_to_the_level_grid_and_passes_gradients_straight_through():
    levels = (8, 5, 3)
    fsq = FSQ(levels)
    z = (torch.randn(500, 3) * 3).requires_grad_()
    quantized, codes = fsq(z)
    half_width = torch.tensor([4.0, 2.0, 1.0])
    steps = quantized * half_width
    assert torch.equal(steps, steps.round())  # on the integer grid, scaled to [-1, 1]
    assert quantized.abs().max() <= 1
    for channel, level in enumerate(levels):  # every channel takes exactly its L values
        assert len(steps[:, channel].unique()) == level
    assert codes.min() >= 0 and codes.max() < 8 * 5 * 3 and len(codes.unique()) > 60
    assert torch.equal(fsq.from_codes(codes), quantized.detach())  # codes <-> values is a bijection
    quantized.sum().backward()  # straight through: the gradient is the bound's, not round's zero
    unrounded = z.detach().clone().requires_grad_()
    (fsq.bound(unrounded) / half_width).sum().backward()
    assert (z.grad[z.abs() < 2] > 0).all() and torch.allclose(z.grad, unrounded.grad)


@pytest.mark.parametrize("size,downsample", [((8, 8), 2), ((16, 24), 4)])
def test_codec_maps_images_to_code_grids_and_back(size, downsample):
    torch.manual_seed(0)
    config = ImageCodecConfig(image_size=size[0], levels=(8, 5, 5, 5), downsample=downsample, width=8)
    codec = ImageCodec(config)
    images = torch.randint(0, 256, (3, *size, 3), dtype=torch.uint8)
    codes = codec.encode(images)
    assert codes.shape == (3, size[0] // downsample, size[1] // downsample) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 1000
    decoded = codec.decode(codes)
    assert decoded.shape == images.shape and decoded.dtype == torch.uint8
    with pytest.raises(DataError, match="multiples of"):
        codec.encode(torch.zeros(1, size[0] + 1, size[1], 3, dtype=torch.uint8))


def test_tiny_training_lowers_reconstruction_error_and_uses_many_codes(trained):
    _, report = trained
    assert report["mse"] < report["untrained_mse"] / 4
    assert report["psnr"] > report["untrained_psnr"] + 6
    assert report["codes_used"] > 50 and report["perplexity"] > 20
    assert report["held_out_images"] == 40 and report["grid"] == [4, 4]


def test_save_load_round_trips_exactly(trained, tmp_path):
    codec, report = trained
    out = save_image_codec(codec, tmp_path / "image_tokenizer", report)
    assert sorted(p.name for p in out.iterdir()) == ["codec.safetensors", "config.json", "report.json"]
    assert json.loads((out / "config.json").read_text())["codebook_size"] == 1000
    loaded = load_image_codec(out)
    images = torch.from_numpy(digit_images()[400:420])
    codes = codec.encode(images)
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), codec.decode(codes))
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary directory was renamed away


@pytest.mark.parametrize("seed", [1, 3])
def test_a_mostly_black_dataset_does_not_collapse_to_one_code(seed):
    """MNIST alone (~80% black pixels): without the latent norm a codec's latent could run into tanh's flat
    tails within a few dozen steps and stay there, every patch one code (benchmarks/audio.py's image tokenizer:
    1 code of 1,000; at this size, seed 3 gave 5 codes). With it every seed uses hundreds."""
    from fmforge.data.images import load_images

    torch.set_num_threads(1)
    images = load_images("mnist", "train", 300).images
    _, report = train_image_codec(images, ImageCodecConfig(width=16), steps=150, lr=2e-3, seed=seed)
    assert report["codes_used"] > 200 and report["mse"] < report["untrained_mse"] / 4, report


def test_an_image_encodes_the_same_whatever_else_is_in_the_batch(trained):
    codec, _ = trained
    codec.train()  # even in training mode: encoding reads the norm's running statistics, not the batch's
    images = torch.from_numpy(digit_images()[400:410])
    together = codec.encode(images)
    alone = torch.cat([codec.encode(images[i:i + 1]) for i in range(len(images))])
    codec.eval()
    assert torch.equal(together, alone) and torch.equal(codec.encode(images), together)


def test_training_on_batches_of_one_latent_runs():
    """Two 4x4 images at downsample 4: one trains (a 1x1 grid, batches of one), one is held out."""
    images = np.full((2, 4, 4, 3), 200, np.uint8)
    _, report = train_image_codec(images, ImageCodecConfig(image_size=4, width=4), steps=3, batch_size=1)
    assert report["grid"] == [1, 1] and report["steps"] == 3


def test_a_codec_saved_before_the_latent_norm_still_loads(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    old = ImageCodec(ImageCodecConfig(image_size=16, width=8, latent_norm=False))
    out = save_image_codec(old, tmp_path / "image_tokenizer")
    saved = json.loads((out / "config.json").read_text())
    del saved["latent_norm"]  # as written before the field existed
    (out / "config.json").write_text(json.dumps(saved))
    assert not any("latent_norm" in key for key in load_file(str(out / "codec.safetensors")))
    loaded = load_image_codec(out)
    assert loaded.config.latent_norm is False and loaded.latent_norm is None
    images = torch.from_numpy(digit_images()[:4])
    assert torch.equal(loaded.encode(images), old.encode(images))


@pytest.mark.parametrize("grid", [(2, 3), (4, 4)])
def test_image_span_round_trips(grid):
    codes = torch.arange(grid[0] * grid[1]).view(*grid) * 7 % 1000
    offset = 4096
    ids = image_span(codes, offset)
    assert ids[0] == 7 and ids[-1] == 8 and ids[1:3] == [offset + grid[0], offset + grid[1]]
    assert len(ids) == 4 + codes.numel() and min(ids[3:-1]) >= offset
    assert torch.equal(parse_image_span(ids, offset), codes)


def test_malformed_image_span_is_refused():
    ids = image_span(np.zeros((2, 2), dtype=np.int64), 100)
    with pytest.raises(DataError, match="needs 4 codes, got 3"):
        parse_image_span(ids[:-2] + ids[-1:], 100)
    with pytest.raises(DataError, match="starts with <|image|>"):
        parse_image_span(ids[1:], 100)
    with pytest.raises(DataError, match="ends"):
        parse_image_span(ids[:-1], 100)
    with pytest.raises(DataError, match="below the code offset"):
        parse_image_span(ids[:3] + [5] + ids[4:], 100)


def test_cli_trains_an_image_tokenizer_and_reports_error_and_code_usage(tmp_path, capsys):
    from fmforge.cli import main

    out = tmp_path / "image_tokenizer"
    assert main(["tokenizer", "train", "--modality", "image", "digits", "--size", "16", "--limit", "300",
                 "--steps", "60", "--width", "16", "--levels", "5,5,5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "125 codes (levels 5x5x5), 4x4 codes per 16x16 image" in printed
    assert "reconstruction MSE" in printed and "codes used" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 60 and report["mse"] < report["untrained_mse"]
    codec = load_image_codec(out)
    assert codec.encode(torch.from_numpy(digit_images()[:2])).shape == (2, 4, 4)


def test_a_collapsed_codec_is_reported(tmp_path, capsys):
    from PIL import Image

    from fmforge.cli import main

    folder = tmp_path / "black" / "nothing"
    folder.mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (16, 16)).save(folder / f"{i}.png")
    assert main(["tokenizer", "train", "--modality", "image", str(tmp_path / "black"), "--steps", "5", "--width", "8",
                 "--out", str(tmp_path / "codec")]) == 0
    err = capsys.readouterr().err
    assert "warning: the codec uses 1 of its 1000 codes on held-out data: it has collapsed" in err
    assert (tmp_path / "codec" / "codec.safetensors").exists()  # written all the same


@pytest.mark.parametrize("flags,message", [
    (["--modality", "image", "digits", "--levels", "8,x"], "--levels takes integers >= 2"),
    (["--modality", "image", "digits", "--downsample", "3"], "downsample must be a power of two"),
    (["--modality", "image", "digits", "--tokenizer", "/nonexistent"], "not found"),
    (["--modality", "image", "digits", "--steps", "0"], "--steps must be at least 1"),
    (["--modality", "image", "digits", "--vocab-size", "512"], "--vocab-size is for --modality text"),
    (["some_texts/", "--steps", "10"], "--steps is for --modality image"),
])
def test_bad_image_tokenizer_flags_give_one_error_line(tmp_path, capsys, flags, message):
    from fmforge.cli import main

    capsys.readouterr()
    assert main(["tokenizer", "train", *flags, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_loading_a_missing_or_truncated_image_tokenizer_is_a_clear_error(trained, tmp_path):
    from fmforge.errors import TokenizerError

    with pytest.raises(TokenizerError, match="is not an image tokenizer"):
        load_image_codec(tmp_path / "nothing")
    out = save_image_codec(trained[0], tmp_path / "image_tokenizer")
    weights = out / "codec.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(TokenizerError, match="cannot load"):
        load_image_codec(out)


@given(steps=st.integers(1, 400))
@settings(max_examples=60, deadline=None)
def test_the_codec_schedule_runs_any_number_of_steps(steps):
    """Warmup then cosine for every step count (torch's OneCycleLR divided by zero at exactly 20 steps)."""
    from fmforge.modalities.image import warmup_cosine

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    schedule = warmup_cosine(optimizer, steps)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert all(0 <= rate <= 1 for rate in rates) and max(rates) == pytest.approx(1.0)
    assert rates[-1] <= rates[len(rates) // 2] + 1e-12  # decaying by the end
