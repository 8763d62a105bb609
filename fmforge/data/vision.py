"""Vision data in the one token stream: pretraining sequences from image sources, and the vision tasks' records.

Pretraining (`fmforge prepare image:SOURCE ...`): every image with its caption gives two documents,

    caption -> image    [bos] caption-text <|image|> h w codes... <|/image|> [eos]
    image -> caption    [bos] <|image|> h w codes... <|/image|> caption-text [eos]

from the source's own train split (train shards) and val split (val shards); the test split is never read.
A document's byte count (for bits-per-byte) is its caption's UTF-8 bytes plus the image's raw pixel bytes.

Tasks (data/tasks.py registers them) are chat turns, so the server's chat route serves their specialists:

    recognise  {"image", "label"}                  user: [image, "What is in this image?"] -> label
    describe   {"image", "text"}                   user: [image, "Describe the image."] -> text
    answer     {"image", "question", "answer"}     user: [image, question] -> answer
    read       {"image", "text"}                   user: [image, "What does the image say?"] -> text
    draw       {"text", "image"}                   user: text -> [image]
    edit       {"image", "instruction", "output"}  user: [image, instruction] -> [output image]

An image field is a path (relative to the JSONL file) or, for the built-in datasets, the pixels themselves.

Guidance: a fixed tenth of the draw records (by a hash of where each comes from) train with the text left out,
so that the specialist also models images without their condition, which classifier-free guidance contrasts with
the conditional model at each token (`unconditional_prompt`; infer/engine.py's Guide).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..modalities.encoders import placements
from ..modalities.stream import content_media, has_modality
from . import images as image_data
from .finetune import Example

IMAGE_PREFIX = "image:"
PROMPTS = {"recognise": "What is in this image?", "describe": "Describe the image.",
           "read": "What does the image say?"}
MAX_GRID = 64  # the largest code grid side a record's image may have (the grammar's bound)
UNCONDITIONAL_SHARE = 0.1  # of draw records trained without their text (the unconditional side of guidance)
DRAW_GUIDANCE = 2.0  # the guidance scale drawings use unless told (benchmarks/vision.py measures it)


# ---- pretraining documents ------------------------------------------------------------------------------

def caption(source: str, record: dict) -> str:
    """The caption of a record of an image source."""
    if source in ("mnist", "digits"):
        return f"a handwritten digit {record['label']}"
    if "caption" in record:
        return record["caption"]
    if source == "glyphs":
        return f"the text {record['text']}"
    if "label" in record:
        return f"a picture of {record['label']}"
    return record["text"]


def image_documents(source: str, split: str, tokenizer, limit: int | None = None, size: int | None = None):
    """(tokens, byte count) of the caption -> image and image -> caption documents of one split of a source."""
    images = image_data.load_images(source, split, limit, size)
    spans = tokenizer.encode_images(images.images)
    bos = [tokenizer.bos_id] if tokenizer.add_bos_token else []
    for span, record, pixels in zip(spans, images.records, images.images):
        text = caption(source, record)
        words = tokenizer.encode(text)
        n_bytes = len(text.encode("utf-8")) + pixels.size
        yield np.array(bos + words + span + [tokenizer.eos_id]), n_bytes
        yield np.array(bos + span + words + [tokenizer.eos_id]), n_bytes


def image_sources(specs: list[str]) -> list[str]:
    """The sources of `image:SOURCE` specs; ConfigError for a spec without the prefix."""
    sources = []
    for spec in specs:
        if not str(spec).startswith(IMAGE_PREFIX) or not str(spec)[len(IMAGE_PREFIX):]:
            raise ConfigError(f"{spec!r}: image sources are written image:SOURCE (image:mnist, image:shapes, "
                              "image:glyphs, image:digits, image:FOLDER, image:captions.jsonl); prepare text and "
                              "image sources into separate directories and mix them with train.mixture")
        sources.append(str(spec)[len(IMAGE_PREFIX):])
    return sources


def prepare_images(specs: list[str], tokenizer, out_dir, *, limit: int | None = None, size: int | None = None,
                   progress: bool = True):
    """Token shards of image sources' caption <-> image documents (train split -> train, val -> val)."""
    from .shards import write_token_documents

    if not has_modality(tokenizer, "image"):
        raise ConfigError("image sources need a tokenizer with an image tokenizer: train one with `fmforge "
                          "tokenizer train --modality image SOURCE --tokenizer TEXT_TOKENIZER_DIR`")
    sources = image_sources(specs)
    digest = hashlib.sha256(json.dumps({"sources": sources, "limit": limit, "size": size,
                                        "tokenizer": tokenizer.fingerprint(), "kind": "images-v1"}).encode())
    for source in sources:  # user data: its files' sizes and times
        path = Path(source)
        if path.exists():
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    digest.update(f"{file}:{file.stat().st_size}:{file.stat().st_mtime_ns}".encode())

    def documents(split):
        for source in sources:
            yield from image_documents(source, split, tokenizer, limit, size)

    manifest = write_token_documents(out_dir, tokenizer, {"train": documents("train"), "val": documents("val")},
                                     input_fingerprint=digest.hexdigest(),
                                     sources={"specs": list(map(str, specs)), "files": len(sources)},
                                     options={"limit": limit, "size": size}, progress=progress)
    if progress:
        import sys
        print(f"prepared {manifest.train.documents:,} train and {manifest.val.documents:,} val image documents "
              f"-> {manifest.train.tokens:,} + {manifest.val.tokens:,} tokens in {out_dir}", file=sys.stderr)
    return manifest


# ---- task records --------------------------------------------------------------------------------------

def record_image(record: dict, key: str, where: str, tokenizer) -> np.ndarray:
    """The image of a record's field: pixels as given, or the file it names (relative to the JSONL file), at its
    own size when the image tokenizer takes it (square, a multiple of the codec's downsampling), else resized to
    the codec's training size."""
    value = record.get(key)
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: field '{key}' must be an image file path")
    base = Path(where.rsplit(":", 1)[0]).parent if ":" in where else Path(".")
    path = Path(value) if Path(value).is_absolute() else base / value
    image = image_data.read_image(path, where=f"{where}: {value}")
    return fit_image(image, tokenizer)


def fit_image(image: np.ndarray, tokenizer) -> np.ndarray:
    """`image` as the image tokenizer takes it: kept when square with a side a multiple of the codec's
    downsampling (and at most MAX_GRID codes across), else centre-cropped and resized to its training size."""
    codec = tokenizer.codecs["image"].config
    height, width = image.shape[:2]
    if height == width and height % codec.downsample == 0 and height // codec.downsample <= MAX_GRID:
        return image
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image_data._resize(np.ascontiguousarray(image[top:top + side, left:left + side]), codec.image_size)


def image_grid(size: str, tokenizer) -> tuple[int, int]:
    """(height, width) in codes of a "WIDTHxHEIGHT" pixel size; ConfigError unless each side is a multiple of the
    codec's downsampling, at most MAX_GRID codes."""
    import re

    step = tokenizer.codecs["image"].config.downsample
    match = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", str(size))
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not (match and width % step == 0 and height % step == 0 and 1 <= width // step <= MAX_GRID
            and 1 <= height // step <= MAX_GRID):
        raise ConfigError(f"image size must be WIDTHxHEIGHT in pixels, each a multiple of {step} up to "
                          f"{step * MAX_GRID}, e.g. 28x28; got {size!r}")
    return height // step, width // step


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string")
    return value


def turns(task: str, record: dict, where: str, tokenizer, reply: bool = True) -> tuple[list, list]:
    """(user parts, assistant parts) of a vision task's record; image parts are {"type": "image", "image": ...}.
    With reply=False the assistant parts are not read (a prompt needs only the user's)."""
    def image(key):
        return {"type": "image", "image": record_image(record, key, where, tokenizer)}

    def answer(key, as_image=False):
        if not reply:
            return []
        return [image(key)] if as_image else [_text(record, key, where)]

    if task == "recognise":
        return [image("image"), record.get("prompt") or PROMPTS[task]], answer("label")
    if task in ("describe", "read"):
        return [image("image"), record.get("prompt") or PROMPTS[task]], answer("text")
    if task == "answer":
        return [image("image"), _text(record, "question", where)], answer("answer")
    if task == "draw":
        return [_text(record, "text", where)], answer("image", as_image=True)
    if task == "edit":
        return [image("image"), _text(record, "instruction", where)], answer("output", as_image=True)
    raise ConfigError(f"{task!r} is not a vision task")


def vision_prompt(task: str, record: dict, where: str, tokenizer) -> list[int]:
    """The prompt ids of a record: the user turn and the assistant's role marker."""
    user, _ = turns(task, record, where, tokenizer, reply=False)
    return tokenizer.encode_chat([{"role": "user", "content": user}], add_generation_prompt=True)


def unconditional_prompt(tokenizer, media: list | tuple = ()) -> list[int]:
    """A prompt without its condition, the text: the user turn's media parts (none for draw) and empty text, then
    the assistant's role marker (what the unconditional tenth of the draw records trains on)."""
    return tokenizer.encode_chat([{"role": "user", "content": [*media, ""]}], add_generation_prompt=True)


def trains_unconditional(where: str) -> bool:
    """Whether the draw record from `where` trains without its text: a fixed UNCONDITIONAL_SHARE of them, chosen
    by a hash of `where`, so every epoch and every run drops the same ones."""
    digest = int(hashlib.sha1(f"fmforge-unconditional:{where}".encode()).hexdigest()[:8], 16)
    return digest < UNCONDITIONAL_SHARE * 2**32


def vision_example(task: str, record: dict, tokenizer, where: str) -> Example:
    """The chat turns of a record; the loss is on the assistant's turn (its text or image span and <|end|>)."""
    if not has_modality(tokenizer, "image"):
        raise DataError(f"{where}: task {task} needs a model with an image tokenizer (a multimodal base)")
    user, assistant = turns(task, record, where, tokenizer)
    if task == "draw" and trains_unconditional(where):
        user = [""]
    return chat_turn_example(user, assistant, tokenizer, where)


def chat_turn_example(user: list, assistant: list, tokenizer, where: str) -> Example:
    """One user turn and the assistant's reply (content parts: text and media) as an Example whose loss is on the
    reply (its text and spans, and <|end|>)."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    prompt = tokenizer.encode_chat(messages[:1], add_generation_prompt=True)
    tokens = tokenizer.encode_chat(messages)
    if tokens[:len(prompt)] != prompt:
        raise DataError(f"{where}: the chat template is not prefix-stable")
    return Example(tokens, [False] * len(prompt) + [True] * (len(tokens) - len(prompt)),
                   placements(tokenizer, prompt, content_media(user)))


# ---- built-in datasets ------------------------------------------------------------------------------------

def builtin_records(name: str, split: str, limit: int | None = None) -> list[tuple[str, dict]]:
    """(where, record) of a built-in vision dataset's split."""
    source, task = name.split("-", 1)
    # (answer: `limit` scenes give at least `limit` questions; the records are cut to `limit` below)
    images = image_data.load_images(source, split, limit, 28 if source == "digits" else None)
    records: list[tuple[str, dict]] = []
    for index, (pixels, meta) in enumerate(zip(images.images, images.records)):
        where = f"{name}:{split}:{index}"
        if task == "recognise":
            records.append((where, {"image": pixels, "label": str(meta["label"])}))
        elif task == "draw":
            records.append((where, {"text": f"a handwritten digit {meta['label']}", "image": pixels,
                                    "label": str(meta["label"])}))
        elif task == "describe":
            records.append((where, {"image": pixels, "text": meta["caption"]}))
        elif task == "read":
            records.append((where, {"image": pixels, "text": meta["text"], "font": meta["font"]}))
        elif task == "answer":
            for number, q in enumerate(meta["questions"]):
                records.append((f"{where}:{number}", {"image": pixels, "question": q["question"],
                                                      "answer": q["answer"], "relational": q["relational"]}))
        elif task == "edit":
            rng = np.random.default_rng([EDIT_SEED, image_data.SPLITS.index(split), index])
            instruction, output, operation = edit_scene(meta["objects"], pixels, rng)
            records.append((where, {"image": pixels, "instruction": instruction, "output": output,
                                    "operation": operation}))
    return records[:limit] if limit else records


# ---- edits of shapes scenes: instruction -> the programmatic result --------------------------------------

EDIT_SEED = 1303
EDIT_OPERATIONS = ("invert", "rotate", "flip", "recolour", "move", "remove")
MOVE_STEP = 8  # pixels


def edit_scene(objects: list[dict], pixels: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray, str]:
    """(instruction, edited image, operation) for a scene: one operation drawn at random, applied exactly."""
    order = list(rng.permutation(len(EDIT_OPERATIONS)))
    for k in order:
        operation = EDIT_OPERATIONS[int(k)]
        done = apply_edit(operation, objects, pixels, rng)
        if done is not None:
            return done[0], done[1], operation
    raise DataError("no edit applies to this scene")  # invert always applies


def apply_edit(operation: str, objects: list[dict], pixels: np.ndarray, rng: np.random.Generator):
    """(instruction, result) of one operation on a scene, or None when it does not apply (a move off the image)."""
    if operation == "invert":
        return "invert the colours", 255 - pixels
    if operation == "rotate":
        return "rotate the image a quarter turn clockwise", np.ascontiguousarray(np.rot90(pixels, k=-1))
    if operation == "flip":
        return "flip the image left to right", np.ascontiguousarray(pixels[:, ::-1])
    target = objects[int(rng.integers(len(objects)))]
    name = f"the {target['colour']} {target['shape']}"
    others = [o for o in objects if o is not target]
    if operation == "remove":
        return f"remove {name}", image_data.draw_scene(others)
    if operation == "recolour":
        taken = {o["colour"] for o in objects if o["shape"] == target["shape"]}
        free = [c for c in image_data.COLOURS if c not in taken]
        if not free:
            return None
        colour = free[int(rng.integers(len(free)))]
        return f"make {name} {colour}", image_data.draw_scene(others + [{**target, "colour": colour}])
    if operation == "move":
        directions = {"left": (-MOVE_STEP, 0), "right": (MOVE_STEP, 0), "up": (0, -MOVE_STEP), "down": (0, MOVE_STEP)}
        low, high = image_data.SHAPE_HALF + 1, image_data.SCENE_SIZE - image_data.SHAPE_HALF - 2
        apart = 2 * image_data.SHAPE_HALF + 1 + image_data.SHAPE_GAP
        for direction in rng.permutation(list(directions)):
            dx, dy = directions[str(direction)]
            moved = {**target, "x": target["x"] + dx, "y": target["y"] + dy}
            if low <= moved["x"] <= high and low <= moved["y"] <= high and all(
                    max(abs(moved["x"] - o["x"]), abs(moved["y"] - o["y"])) >= apart for o in others):
                return f"move {name} {direction}", image_data.draw_scene(others + [moved])
        return None
    raise ConfigError(f"unknown edit operation {operation!r}")
