"""The modality registry: per non-text modality, how it enters the one token stream.

A record names the modality, the special tokens that mark its spans in the text tokenizer, its codec (media <->
discrete codes placed after the text vocabulary), the functions that train and load a codec, and the server's
content part type that carries it: images (`modalities/image.py`) and audio (`modalities/audio.py`). Data sources
live in `fmforge/data/` (level 2: `data/images.py`, `data/audio.py`), which may import this level, not the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .audio import (AUDIO_BEGIN_ID, AUDIO_END_ID, AudioCodec, AudioCodecConfig, audio_span, load_audio_codec,
                    parse_audio_span, save_audio_codec, train_audio_codec)
from .image import (IMAGE_BEGIN_ID, IMAGE_END_ID, ImageCodec, ImageCodecConfig, image_span, load_image_codec,
                    parse_image_span, save_image_codec, train_image_codec)


@dataclass(frozen=True)
class Modality:
    name: str
    begin_token: str              # opens a span; a special token of tokenizer.SPECIAL_TOKENS
    end_token: str                # closes it
    begin_id: int                 # their ids (tokenizer.SPECIAL_TOKENS.index(...); tests check they agree)
    end_id: int
    codec: type                   # nn.Module with encode(media) -> codes and decode(codes) -> media
    codec_config: type            # its config dataclass
    train: Callable               # train(media, config, steps, lr, seed, batch_size) -> (codec, report); media:
                                  # uint8 images (N, H, W, C) or a list of 1-D float waveforms
    save: Callable                # save(codec, directory, report)
    load: Callable                # load(directory) -> codec
    span: Callable                # span(codes, code_offset) -> token ids
    parse_span: Callable          # parse_span(ids, code_offset) -> codes
    content_part: str             # the OpenAI chat content part type the server accepts for it


MODALITIES: dict[str, Modality] = {
    "image": Modality(name="image", begin_token="<|image|>", end_token="<|/image|>", begin_id=IMAGE_BEGIN_ID,
                      end_id=IMAGE_END_ID, codec=ImageCodec, codec_config=ImageCodecConfig, train=train_image_codec,
                      save=save_image_codec, load=load_image_codec, span=image_span, parse_span=parse_image_span,
                      content_part="image_url"),
    "audio": Modality(name="audio", begin_token="<|audio|>", end_token="<|/audio|>", begin_id=AUDIO_BEGIN_ID,
                      end_id=AUDIO_END_ID, codec=AudioCodec, codec_config=AudioCodecConfig, train=train_audio_codec,
                      save=save_audio_codec, load=load_audio_codec, span=audio_span, parse_span=parse_audio_span,
                      content_part="input_audio"),
}

__all__ = ["MODALITIES", "Modality", "ImageCodec", "ImageCodecConfig", "image_span", "parse_image_span",
           "train_image_codec", "save_image_codec", "load_image_codec", "AudioCodec", "AudioCodecConfig", "audio_span",
           "parse_audio_span", "train_audio_codec", "save_audio_codec", "load_audio_codec"]
