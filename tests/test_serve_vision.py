"""Vision through `fmforge serve` as a real process, driven by the official `openai` client (raw HTTP where the
client would hide what is checked): images in chat (PNG, JPEG, WebP data URLs), replies that draw (markdown PNG
data URLs, streamed or not), POST /v1/images/generations, a LoRA adapter beside the multimodal base, exact usage,
and every bad image refused with OpenAI's 400 before it is decoded, the server serving on afterwards."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import ServerProcess, make_adapter, no_stop

PROMPT = "What is in this image?"


@pytest.fixture(scope="module")
def base(multimodal_base) -> Path:
    from fmforge.checkpoint import resolve_checkpoint
    return resolve_checkpoint(multimodal_base)


@pytest.fixture(scope="module")
def tokenizer(base):
    from fmforge.checkpoint import load_tokenizer
    return load_tokenizer(base)


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    adapter = make_adapter(base, tmp_path_factory.mktemp("vision-adapter") / "a", 3, ["q_proj", "v_proj"], 4)
    # a body big enough to carry an image over the 4 MiB image cap, so that the image cap is what answers
    process = ServerProcess("--checkpoint", str(base), "--adapter", f"spec={adapter}", "--max-batch", "4",
                            "--max-body-bytes", str(8 << 20))
    yield process
    assert process.stop() == 0, process.output()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def png_header(width: int, height: int) -> bytes:
    """A small, valid-looking PNG whose IHDR declares width x height (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def images_in(content: str) -> list[np.ndarray]:
    from fmforge.data.images import decode_image_bytes

    return [decode_image_bytes(base64.b64decode(m)) for m in
            re.findall(r"!\[image\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", content)]


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# ---- images in, images out --------------------------------------------------------------------------------------

def test_chat_reads_images_and_counts_every_token(client, tokenizer):
    from fmforge.data.vision import fit_image

    image = picture(28, 28)
    parts = [{"type": "image", "image": fit_image(image, tokenizer)}, PROMPT]
    expected = tokenizer.encode_chat([{"role": "user", "content": parts}], add_generation_prompt=True)
    for model in ("base", "spec"):
        response = client.chat.completions.create(
            model=model, max_tokens=5, temperature=0,
            messages=[{"role": "user", "content": [image_part(data_url(encoded(image, "PNG"))),
                                                   {"type": "text", "text": PROMPT}]}])
        assert response.usage.prompt_tokens == len(expected)  # the image's span counted, exactly
        assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"
    # JPEG and WebP too, any size (fit to the image tokenizer: a 40x30 photo is centre-cropped and resized), and
    # 'detail' is accepted.
    for fmt, media_type, shape in (("JPEG", "image/jpeg", (40, 30)), ("WEBP", "image/webp", (28, 28))):
        part = {"type": "image_url", "image_url": {"url": data_url(encoded(picture(*shape), fmt), media_type),
                                                    "detail": "low"}}
        response = client.chat.completions.create(model="base", max_tokens=2, messages=[
            {"role": "user", "content": [part, {"type": "text", "text": PROMPT}]}])
        assert response.usage.prompt_tokens == len(expected), fmt


def test_a_reply_that_draws_is_markdown_with_a_png(client, tokenizer):
    offset = tokenizer.ranges["image"][0]
    # Push the model to open an image span with a 7x7 grid of one code: a drawing, deterministically.
    kwargs = dict(model="base", messages=[{"role": "user", "content": "Draw the digit 3."}], max_tokens=60,
                  logit_bias={"7": 100, str(offset + 7): 100}, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].message.content
    assert content.startswith("![image](data:image/png;base64,") and "<|image|>" not in content
    assert [image.shape for image in images_in(content)] == [(28, 28, 3)]
    assert whole.usage.completion_tokens == 60  # one 53-token span and 7 tokens of the next
    prompt = tokenizer.encode_chat(kwargs["messages"], add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == content and chunks[-1].usage.completion_tokens == 60
    # The chat page sends the conversation back: the markdown image goes in as an image again, not as text.
    messages = kwargs["messages"] + [{"role": "assistant", "content": content}, {"role": "user", "content": "x"}]
    again = client.chat.completions.create(model="base", messages=messages, max_tokens=1)
    assert again.usage.prompt_tokens < 120


def test_a_marker_split_by_a_stop_string_still_becomes_the_image():
    from fmforge.serve.serving import _Reply

    # The engine may hand a marker's text over in pieces (held back while it could start a stop string).
    reply = _Reply()
    assert reply.feed("see <|im", final=False) == "see "
    assert reply.track(7) is None and reply.track(600) is None and reply.track(8) == [7, 600, 8]
    reply.images.append("![image](x)")
    assert reply.feed("age|><|/image", final=False) == ""
    assert reply.feed("|> ok <", final=False) == "![image](x) ok "
    assert reply.feed("", final=True) == "<"  # the end: what was held back is text


def test_images_generations(client, tokenizer):
    kwargs = dict(prompt="a drawing of the digit 7", size="28x28", n=2, response_format="b64_json",
                  extra_body={"seed": 5})
    response = client.images.generate(model="base", **kwargs)
    images = [np.asarray(decode(d.b64_json)) for d in response.data]
    assert [image.shape for image in images] == [(28, 28, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # n samples, each with its own seed offset
    prompt = tokenizer.encode_chat([{"role": "user", "content": kwargs["prompt"]}], add_generation_prompt=True)
    assert response.usage.input_tokens == len(prompt) + 3  # <|image|> h w forced
    assert response.usage.output_tokens == 2 * (7 * 7 + 1)
    again = client.images.generate(model="base", **kwargs)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in response.data]  # seeded
    # Classifier-free guidance (on by default) changes what the same seed draws; guidance_scale 1 turns it off.
    plain = client.images.generate(model="base", **{**kwargs, "extra_body": {"seed": 5, "guidance_scale": 1}})
    assert [d.b64_json for d in plain.data] != [d.b64_json for d in response.data]
    assert plain.usage.output_tokens == response.usage.output_tokens  # the unconditional side is not billed
    for bad in (-1, 1000, "strong"):  # out of range or of the wrong type: 422, as for every field
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.images.generate(model="base", **{**kwargs, "extra_body": {"guidance_scale": bad}})
        assert caught.value.body["param"] == "guidance_scale"
    # A non-square size is WIDTHxHEIGHT; the adapter draws too.
    tall = client.images.generate(model="spec", prompt="a tall picture", size="16x32", response_format="b64_json")
    assert np.asarray(decode(tall.data[0].b64_json)).shape == (32, 16, 3)


def test_a_drawing_without_room_for_an_image_is_422(server, tokenizer, base):
    # No size: the model picks the grid. With at most 3 tokens left in the context after the prompt and <|image|>,
    # no span can end (height, width, a code, the end marker): a clear 422, not a 5xx.
    from fmforge.checkpoint import read_model_config

    context = read_model_config(base).context_length

    def length(prompt: str) -> int:
        return len(tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True))

    prompt = "draw"
    while length(prompt + " draw") <= context - 2:
        prompt += " draw"
    for letter in "xyzw" * 4:
        if length(prompt) < context - 4 and length(prompt + letter) <= context - 2:
            prompt += letter
    assert context - 4 <= length(prompt) <= context - 2
    response = httpx.post(server.url + "/v1/images/generations", json={"model": "base", "prompt": prompt,
                                                                       "seed": 1}, timeout=60)
    assert response.status_code == 422 and error_of(response)["code"] == "no_image_generated", response.text


def decode(b64: str) -> np.ndarray:
    from fmforge.data.images import decode_image_bytes

    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return decode_image_bytes(data)


# ---- bad input: OpenAI's 400 naming the part, before anything is decoded -----------------------------------------

def test_bad_images_are_400_and_the_server_serves_on(server, client, tokenizer):
    from PIL import Image

    png = encoded(picture(28, 28), "PNG")
    gif = encoded(picture(28, 28), "GIF")
    bmp = io.BytesIO()
    Image.fromarray(picture(28, 28)).save(bmp, format="BMP")
    cases = {  # name: (url, code)
        "http URL": ("http://example.com/cat.png", "invalid_image_url"),
        "https URL": ("https://example.com/cat.png", "invalid_image_url"),
        "file URL": ("file:///etc/passwd", "invalid_image_url"),
        "no scheme": ("cat.png", "invalid_image_url"),
        "no comma": ("data:image/png;base64", "invalid_image_url"),
        "not base64": ("data:image/png,%89PNG", "invalid_image_url"),
        "bad base64": ("data:image/png;base64,@@@@", "invalid_image_url"),
        "text": (data_url(b"hello, world", "text/plain"), "unsupported_image_type"),
        "GIF": (data_url(gif, "image/gif"), "unsupported_image_type"),
        "BMP": (data_url(bmp.getvalue(), "image/bmp"), "unsupported_image_type"),
        "GIF called PNG": (data_url(gif), "invalid_image"),
        "not an image": (data_url(b"hello, world"), "invalid_image"),
        "truncated PNG": (data_url(png[:len(png) // 2]), "invalid_image"),
        "20000x20000 PNG header": (data_url(png_header(20000, 20000)), "invalid_image"),
        "5000x4000 PNG header": (data_url(png_header(5000, 4000)), "invalid_image"),
        "over 4 MiB": (data_url(b"\x89PNG\r\n\x1a\n" + bytes(4 << 20)), "image_too_large"),
    }
    for name, (url, code) in cases.items():
        response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                                       image_part(url)]}]})
        assert response.status_code == 400, (name, response.text[:300])
        error = error_of(response)
        assert error["param"] == "messages.0.content.1.image_url.url" and error["code"] == code, (name, error)
    assert "pixel" in error_of(httpx.post(server.url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": [image_part(cases["5000x4000 PNG header"][0])]}]
    }))["message"]
    # Too many images in one request (the default cap is 8), and a part without its image_url.
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": [image_part(data_url(png))] * 9}]})
    assert response.status_code == 400 and error_of(response)["code"] == "too_many_images"
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert response.status_code == 400 and error_of(response)["param"] == "messages.0.content.0.image_url"
    # The Images API: only b64_json, sizes the image tokenizer can draw, a served model.
    for body, status, param in (({"response_format": "url"}, 400, "response_format"),
                                ({"size": "30x30"}, 400, "size"), ({"size": "1024x1024"}, 400, "size"),
                                ({"size": "big"}, 400, "size"), ({"size": "0x0"}, 400, "size"),
                                ({"stream": True}, 400, "stream"), ({"n": 0}, 422, "n"),
                                ({"model": "nope"}, 404, "model")):
        response = httpx.post(server.url + "/v1/images/generations",
                              json={"model": "base", "prompt": "a cat", **body})
        assert response.status_code == status and error_of(response)["param"] == param, (body, response.text)
    assert "b64_json" in error_of(httpx.post(server.url + "/v1/images/generations", json={
        "model": "base", "prompt": "a cat", "response_format": "url"}))["message"]
    # ... and the server goes on serving.
    assert httpx.get(server.url + "/health").status_code == 200
    good = client.chat.completions.create(model="base", max_tokens=2, temperature=0, logit_bias=no_stop(tokenizer),
                                          messages=[{"role": "user", "content": [image_part(data_url(png)),
                                                                                 {"type": "text", "text": PROMPT}]}])
    assert good.choices[0].finish_reason == "length" and good.usage.completion_tokens == 2
    assert good.usage.prompt_tokens > 20  # the image's codes were read
    assert "fmforge serve" in server.output() and "Traceback" not in server.output()


def test_openapi_describes_image_generations(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ImageGenerationRequest"}
    assert schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]["model"]["enum"] == ["base", "spec"]
    assert "ImageURL" in schema["components"]["schemas"]


# ---- a text-only model ------------------------------------------------------------------------------------------

def test_a_text_only_model_refuses_images(checkpoint):
    process = ServerProcess("--checkpoint", str(checkpoint))
    try:
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="none", max_retries=0, timeout=60)
        png = encoded(picture(28, 28), "PNG")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="base", max_tokens=2, messages=[
                {"role": "user", "content": [image_part(data_url(png)), {"type": "text", "text": PROMPT}]}])
        assert "does not accept images" in refused.value.body["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.images.generate(model="base", prompt="a cat", size="28x28", response_format="b64_json")
        assert "does not accept images" in refused.value.body["message"]
        assert client.chat.completions.create(model="base", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices[0].finish_reason
    finally:
        assert process.stop() == 0, process.output()
