"""The one token stream: a text tokenizer whose vocabulary is extended by media codes.

`MediaTokenizer` wraps a text tokenizer (fmforge.tokenizer.Tokenizer; everything it does not define is the text
tokenizer's) and one codec per modality. Each modality's codes take one contiguous id range after the text
vocabulary, in the registry's order:

    ids [0, text_vocab)                          text (BPE + special tokens, the span markers among them)
    ids [text_vocab, text_vocab + image codes)   image codes (grid sizes are written in this range too)
    ... + audio codes                            audio codes (a span's rows and row length likewise)

On disk a media tokenizer is a text tokenizer directory whose tokenizer_config.json has a "media" entry
({"image": {"offset", "size", "directory": "image_tokenizer"}}) and the codec directories beside it.

Generation follows the span grammar (`allowed`): outside a span no code id may be written; after a span's marker
come its header (an image: height and width; audio: rows and codes per row), then exactly the codes the header
announces, then the end marker. So every span a model writes decodes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, TokenizerError
from . import MODALITIES

MEDIA_KEY = "media"  # the entry in tokenizer_config.json
CONFIG_FILE = "tokenizer_config.json"
MAX_GRID = 64  # the largest header value (grid side) generation may write; sources here use 7 to 12
MEDIA_MARK = "\ue002"  # stands for a media part while a chat template renders


SPAN_CACHE_SIZE = 50_000  # remembered media spans (int32: ~600 bytes for a 12x12 image grid)


def _media_key(media: np.ndarray) -> bytes:
    return hashlib.sha1(repr((media.shape, media.dtype.str)).encode() + media.tobytes()).digest()


def media_kind(media: np.ndarray, strict: bool = True) -> str | None:
    """"image" for an (H, W, C) uint8 array, "audio" for a 1-D float waveform; otherwise DataError (None when not
    `strict`)."""
    if media.ndim == 3 and media.dtype == np.uint8:
        return "image"
    if media.ndim == 1 and np.issubdtype(media.dtype, np.floating):
        return "audio"
    if not strict:
        return None
    raise DataError(f"media must be an (H, W, 3) uint8 image or a 1-D float waveform, got {media.dtype} "
                    f"{media.shape}")


def has_modality(tokenizer, modality: str) -> bool:
    """Whether `tokenizer` (a text or media tokenizer) has a codec for `modality`."""
    return modality in (getattr(tokenizer, "codecs", None) or {})


def codec_directory(modality: str) -> str:
    return f"{modality}_tokenizer"


class MediaTokenizer:
    """A text tokenizer plus codecs; ids of each modality's codes follow the text vocabulary."""

    def __init__(self, text, codecs: dict):
        if not codecs:
            raise TokenizerError("a media tokenizer needs at least one codec")
        for name in codecs:
            modality = MODALITIES.get(name)
            if modality is None:
                raise TokenizerError(f"unknown modality {name!r}; modalities: {', '.join(MODALITIES)}")
            for token, expected in ((modality.begin_token, modality.begin_id), (modality.end_token, modality.end_id)):
                if text.token_id(token) != expected:
                    raise TokenizerError(f"the text tokenizer has {token} at id {text.token_id(token)}, not "
                                         f"{expected}: media needs a tokenizer trained by fmforge")
        self.text = text
        self.codecs = {name: codecs[name] for name in MODALITIES if name in codecs}  # registry order
        self.ranges: dict[str, tuple[int, int]] = {}
        offset = text.vocab_size
        for name, codec in self.codecs.items():
            self.ranges[name] = (offset, codec.config.codebook_size)
            offset += codec.config.codebook_size
        self._by_begin = {MODALITIES[name].begin_id: name for name in self.codecs}
        self._span_cache: dict[bytes, np.ndarray] = {}

    def __getattr__(self, name):  # everything else is the text tokenizer's
        if name == "text":
            raise AttributeError(name)
        return getattr(self.text, name)

    # ---- vocabulary ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size + sum(size for _, size in self.ranges.values())

    @property
    def text_vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def modalities(self) -> list[str]:
        return list(self.codecs)

    def has(self, modality: str) -> bool:
        return modality in self.codecs

    def code_offset(self, modality: str) -> int:
        if modality not in self.ranges:
            raise DataError(f"this model has no {modality} tokenizer (it has: {', '.join(self.ranges)})")
        return self.ranges[modality][0]

    def fingerprint(self) -> str:
        """The text tokenizer's fingerprint combined with every codec's weights."""
        digest = hashlib.sha256(self.text.fingerprint().encode())
        for name, codec in self.codecs.items():
            digest.update(name.encode())
            for key, tensor in sorted(codec.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ---- media -> spans ---------------------------------------------------------------------------------

    def encode_image(self, image: np.ndarray) -> list[int]:
        """An (H, W, 3) uint8 image -> its span of ids (remembered: a record's image is encoded once however many
        questions ask about it, and a prompt and its example share the work)."""
        return self._remembered("image", image)

    def encode_audio(self, wave: np.ndarray) -> list[int]:
        """A 1-D float32 waveform at the audio codec's sample rate -> its span of ids (remembered like images)."""
        return self._remembered("audio", wave)

    def _remembered(self, modality: str, media: np.ndarray) -> list[int]:
        self.code_offset(modality)  # DataError when this tokenizer has no codec for it
        media = np.ascontiguousarray(media)
        key = _media_key(media)
        if key not in self._span_cache:
            self.prime([media])
        return self._span_cache[key].tolist()

    def prime(self, media) -> None:
        """Encode the media not yet remembered, in batches (much faster than one at a time): images (uint8, 3-D)
        grouped by size, waveforms (float, 1-D) together. Arrays of a modality this tokenizer lacks are skipped
        (encoding one alone says why)."""
        groups: dict[tuple, dict[bytes, np.ndarray]] = {}
        for item in media:
            item = np.ascontiguousarray(item)
            modality = media_kind(item, strict=False)
            if modality not in self.codecs:
                continue
            key = _media_key(item)
            if key not in self._span_cache:
                group = (modality, item.shape) if modality == "image" else (modality,)
                groups.setdefault(group, {})[key] = item
        for (modality, *_), group in groups.items():
            if len(self._span_cache) + len(group) > SPAN_CACHE_SIZE:
                self._span_cache.clear()
            spans = (self.encode_images(np.stack(list(group.values()))) if modality == "image"
                     else self.encode_audios(list(group.values())))
            self._span_cache.update({key: np.array(span, dtype=np.int32) for key, span in zip(group, spans)})

    def encode_images(self, images: np.ndarray, batch_size: int = 256) -> list[list[int]]:
        """(N, H, W, 3) uint8 images of one size -> one span of ids each."""
        offset = self.code_offset("image")
        codec = self.codecs["image"]
        images = np.asarray(images)
        spans = []
        for start in range(0, len(images), batch_size):
            codes = codec.encode(torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])))
            spans += [MODALITIES["image"].span(grid, offset) for grid in codes.numpy()]
        return spans

    def encode_audios(self, waves: list[np.ndarray], batch_size: int = 64) -> list[list[int]]:
        """1-D float32 waveforms (any lengths) -> one span of ids each; similar lengths are batched together."""
        offset = self.code_offset("audio")
        codec = self.codecs["audio"]
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        spans: list = [None] * len(waves)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            for index, grid in zip(chosen, codec.encode_batch([waves[i] for i in chosen])):
                spans[index] = MODALITIES["audio"].span(grid, offset)
        return spans

    def spans(self, ids) -> list[tuple[str, int, int]]:
        """(modality, start, end) of each complete media span in ids (ids[start] is the marker, ids[end - 1]
        the end marker)."""
        ids = [int(i) for i in ids]
        found, start = [], None
        for position, token in enumerate(ids):
            if token in self._by_begin:
                start = position
            elif start is not None and token == MODALITIES[self._by_begin[ids[start]]].end_id:
                found.append((self._by_begin[ids[start]], start, position + 1))
                start = None
        return found

    def _codes(self, modality: str, ids) -> list[torch.Tensor]:
        """The code grid of every complete span of `modality` in ids; a malformed span raises DataError."""
        ids = [int(i) for i in ids]
        offset, size = self.code_offset(modality), self.ranges[modality][1]
        grids = []
        for name, start, end in self.spans(ids):
            if name == modality:
                grid = MODALITIES[modality].parse_span(ids[start:end], offset)
                if grid.max() >= size:
                    raise DataError(f"an {modality} span holds ids past the {modality} codes")
                grids.append(grid)
        return grids

    def decode_images(self, ids) -> list[np.ndarray]:
        """Every complete image span in ids, decoded to (H, W, 3) uint8; a malformed span raises DataError."""
        return [self.codecs["image"].decode(grid[None])[0].numpy() for grid in self._codes("image", ids)]

    def decode_audio(self, ids) -> list[np.ndarray]:
        """Every complete audio span in ids, decoded to a float32 waveform at the codec's sample rate."""
        return [self.codecs["audio"].decode(grid) for grid in self._codes("audio", ids)]

    # ---- text ------------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ids; media codes are not text and are left out (their markers are special tokens)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        limit = self.text.vocab_size
        return self.text.decode([int(i) for i in ids if int(i) < limit], skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """The text tokenizer's encode_chat, where a message's content may also be a list of parts: strings,
        {"type": "image", "image": (H, W, 3) uint8} and {"type": "audio", "audio": 1-D float32} (each becomes its
        span)."""
        return self.text.encode_chat([{**m, "content": self.content_ids(m.get("content"))}
                                      if isinstance(m, dict) and isinstance(m.get("content"), list) else m
                                      for m in messages], add_generation_prompt)

    def content_ids(self, parts: list) -> list:
        """A content list with its media parts encoded: strings stay, an image part becomes a list of ids."""
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and part.get("type") == "image":
                out.append(self.encode_image(part["image"]))
            elif isinstance(part, dict) and part.get("type") == "audio":
                out.append(self.encode_audio(part["audio"]))
            else:
                raise TokenizerError("a message content part must be a string, {'type': 'image', 'image': array} "
                                     "or {'type': 'audio', 'audio': waveform}")
        return out

    # ---- generation grammar ----------------------------------------------------------------------------

    def allowed(self, prompt: list[int], output: list[int] = ()) -> tuple[int, int]:
        """The id range [low, high) the next token must fall in after prompt + output: inside a span its header
        (grid sizes), then exactly the codes the header announces, then the end marker; outside a span any
        text id, no code."""
        text_vocab = self.text.vocab_size
        tail = itertools.chain(reversed(output), reversed(prompt))
        for back, token in enumerate(itertools.islice(tail, 3 + MAX_GRID * MAX_GRID)):
            if token in self._by_begin:
                name = self._by_begin[token]
                offset, size = self.ranges[name]
                after = (list(prompt) + list(output))[len(prompt) + len(output) - back:]
                if len(after) < 2:  # the header: grid height, then width
                    return offset + 1, offset + min(size, MAX_GRID + 1)
                body = (after[0] - offset) * (after[1] - offset)
                if len(after) < 2 + body:
                    return offset, offset + size
                return MODALITIES[name].end_id, MODALITIES[name].end_id + 1
            if token < text_vocab:  # a text token (an end marker among them): not inside a span
                break
        return 0, text_vocab

    # ---- persistence -----------------------------------------------------------------------------------

    def save(self, directory) -> None:
        """The text tokenizer's files, the "media" entry in its config, and each codec's directory."""
        from ..fileio import atomic_write_text

        directory = Path(directory)
        self.text.save(directory)
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        config[MEDIA_KEY] = {name: {"offset": offset, "size": size, "directory": codec_directory(name)}
                             for name, (offset, size) in self.ranges.items()}
        for name, codec in self.codecs.items():
            MODALITIES[name].save(codec, directory / codec_directory(name))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")

    def __repr__(self) -> str:
        return f"MediaTokenizer({self.text!r}, {self.ranges})"


def content_media(parts) -> list[np.ndarray]:
    """The media arrays of a message's content parts, in order (a string content has none)."""
    if not isinstance(parts, list):
        return []
    return [part[part["type"]] for part in parts
            if isinstance(part, dict) and part.get("type") in ("image", "audio") and part.get(part["type"]) is not None]


def messages_media(messages: list[dict]) -> list[np.ndarray]:
    """The media arrays of every message's content, in order."""
    return [media for message in messages if isinstance(message, dict)
            for media in content_media(message.get("content"))]


def media_entry(directory) -> dict:
    """The "media" entry of a tokenizer directory's config ({} for a text tokenizer)."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entry = config.get(MEDIA_KEY, {}) if isinstance(config, dict) else {}
    return entry if isinstance(entry, dict) else {}


def with_media(text, directory):
    """`text` (a loaded text tokenizer) with the codecs its directory names, or `text` itself if none."""
    entry = media_entry(directory)
    if not entry:
        return text
    codecs = {}
    for name, spec in entry.items():
        if name not in MODALITIES or not isinstance(spec, dict):
            raise TokenizerError(f"{Path(directory) / CONFIG_FILE}: unknown media entry {name!r}")
        codecs[name] = MODALITIES[name].load(Path(directory) / str(spec.get("directory", codec_directory(name))))
    tokenizer = MediaTokenizer(text, codecs)
    for name, spec in entry.items():
        if tuple(tokenizer.ranges[name]) != (spec.get("offset"), spec.get("size")):
            raise TokenizerError(f"{Path(directory) / CONFIG_FILE}: the {name} codes are recorded at "
                                 f"{spec.get('offset')}+{spec.get('size')} but the tokenizers give "
                                 f"{tokenizer.ranges[name][0]}+{tokenizer.ranges[name][1]}; re-create the tokenizer")
    return tokenizer
