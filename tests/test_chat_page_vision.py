"""The chat page's images, in a real headless Chromium: an image attached in the composer (file picker) goes to a
real `fmforge serve` of a tiny multimodal base as an OpenAI image_url part and shows in the sent message; files
that are not images or too large are refused in the page, with no request; a text-only model's 400 is shown and
the page chats on. Images in replies are tested with canned streamed replies (the tiny model does not reliably
draw): a markdown PNG data URL split across stream chunks becomes an <img> once whole, and HTML, remote URLs and
other media types in a reply stay text."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ServerProcess

KEY = "test-key"
CHAT = "**/v1/chat/completions"


def png_bytes(size: int = 28, seed: int = 0) -> bytes:
    """A real PNG: a white disc on black (MNIST's size and colours)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(image).ellipse((6 + seed, 6, size - 6, size - 6), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def sse(*contents: str) -> bytes:
    """A streamed chat reply whose deltas are `contents`, as the server writes it."""
    head = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 0, "model": "base"}
    events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    events += [{**head, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in contents]
    events += [{**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": len(contents),
                                                 "total_tokens": 3 + len(contents)}}]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


# ---- servers and the browser -------------------------------------------------------------------------------------

def serving(run: Path):
    """`fmforge serve` of a run's checkpoint with the page's API key, stopped cleanly after the module."""
    from fmforge.checkpoint import resolve_checkpoint

    process = ServerProcess("--checkpoint", str(resolve_checkpoint(run)), "--api-key", KEY, "--max-batch", "2")
    yield process
    assert process.stop() == 0, process.output()


@pytest.fixture(scope="module")
def vision_server(multimodal_base):
    yield from serving(multimodal_base)


@pytest.fixture(scope="module")
def text_server(checkpoint):
    yield from serving(checkpoint)


def open_page(browser, server):
    """The chat page, logged in with the API key, its models listed; every request it makes is in page.sent."""
    context = browser.new_context(http_credentials={"username": "user", "password": KEY})
    page = context.new_page()
    page.sent = []
    page.on("request", lambda request: page.sent.append(request))
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='base']", state="attached")
    page.fill("#max_tokens", "8")
    return page


def api_requests(page) -> list:
    return [r for r in page.sent if "/v1/" in r.url and r.method == "POST"]


# ---- images in the composer, against real servers -------------------------------------------------------------

def test_an_attached_image_goes_to_the_vision_model_as_an_image_url_part(browser, vision_server, tmp_path):
    png = tmp_path / "disc.png"
    png.write_bytes(png_bytes())
    other = tmp_path / "other.png"
    other.write_bytes(png_bytes(seed=4))
    url = data_url(png.read_bytes())
    page = open_page(browser, vision_server)
    try:
        statuses = []
        page.on("response", lambda response: statuses.append(response.status) if "/v1/chat" in response.url else None)
        # two images attached, one removed again: the composer shows what will be sent
        page.set_input_files("#file", [str(other), str(png)])
        page.wait_for_function("document.querySelectorAll('#attachments img').length == 2")
        page.locator("#attachments .attachment").first.locator("button.remove").click()
        assert page.locator("#attachments img").evaluate_all("images => images.map(i => i.src)") == [url]
        page.fill("#input", "What is in this image?")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .meta", timeout=60_000)

        assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
        assert statuses == [200]
        (request,) = api_requests(page)
        content = request.post_data_json["messages"][-1]["content"]
        assert content == [{"type": "image_url", "image_url": {"url": url}},
                           {"type": "text", "text": "What is in this image?"}]
        user = page.locator(".message.user")
        assert user.locator("img.thumb").evaluate_all("images => images.map(i => i.src)") == [url]
        assert user.locator("img.thumb").evaluate("i => i.complete && i.naturalWidth") == 28  # it decoded
        assert user.inner_text().strip() == "What is in this image?"
        assert "tokens" in page.locator(".message.assistant .meta").inner_text()
        assert page.locator("#attachments img").count() == 0 and page.locator("#notice").inner_text() == ""

        # The next turn sends the conversation again, the image with it; a text-only turn is a plain string.
        page.fill("#input", "And now?")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.message.assistant .meta').length == 2", timeout=60_000)
        messages = api_requests(page)[-1].post_data_json["messages"]
        assert messages[0]["content"] == content and messages[-1]["content"] == "And now?"
        assert statuses[-1] == 200 and page.locator(".message.error").count() == 0

        # The page reloaded from its session storage shows the image in the user's message again.
        page.reload()
        page.wait_for_selector(".message.user img.thumb")
        assert page.locator(".message.user img.thumb").get_attribute("src") == url
    finally:
        page.context.close()


def test_not_an_image_or_too_large_is_refused_in_the_page(browser, text_server):
    page = open_page(browser, text_server)
    try:
        page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
        page.wait_for_function("document.getElementById('notice').textContent !== ''")
        assert "notes.txt is not a PNG, JPEG or WebP image" in page.locator("#notice").inner_text()
        assert page.locator("#notice").is_visible()
        page.set_input_files("#file", {"name": "huge.png", "mimeType": "image/png",
                                       "buffer": png_bytes() + bytes(9 << 20)})
        page.wait_for_function("document.getElementById('notice').textContent.includes('huge.png')")
        assert "at most 8 MB" in page.locator("#notice").inner_text()
        assert page.locator("#attachments img").count() == 0
        page.press("#input", "Enter")  # nothing to send
        # plain completion reads text only: an image is not sent there
        page.set_input_files("#file", {"name": "ok.png", "mimeType": "image/png", "buffer": png_bytes()})
        page.wait_for_selector("#attachments img")
        assert page.locator("#notice").inner_text() == ""  # a good file clears the last message
        page.check("#raw")
        page.fill("#input", "def")
        page.press("#input", "Enter")
        assert "plain completion reads text only" in page.locator("#notice").inner_text()
        assert page.locator("#attachments img").count() == 1 and page.input_value("#input") == "def"
        page.wait_for_timeout(300)
        assert api_requests(page) == [] and page.locator(".message").count() == 0
    finally:
        page.context.close()


def test_a_pasted_or_dropped_image_is_attached(browser, text_server):
    page = open_page(browser, text_server)
    url = data_url(png_bytes())
    try:
        page.evaluate("""async (url) => {
            const blob = await (await fetch(url)).blob();
            const carrying = (name, type) => {
                const d = new DataTransfer();
                d.items.add(new File([blob], name, { type }));
                return d;
            };
            document.getElementById("input").dispatchEvent(new ClipboardEvent("paste", {
                clipboardData: carrying("pasted.png", "image/png"), bubbles: true, cancelable: true }));
            document.getElementById("log").dispatchEvent(new DragEvent("drop", {
                dataTransfer: carrying("dropped.gif", "image/gif"), bubbles: true, cancelable: true }));
        }""", url)
        page.wait_for_selector("#attachments img")
        page.wait_for_function("document.getElementById('notice').textContent !== ''")
        assert page.locator("#attachments img").evaluate_all("images => images.map(i => i.src)") == [url]
        assert "dropped.gif is not a PNG, JPEG or WebP image" in page.locator("#notice").inner_text()
        assert page.input_value("#input") == ""  # the pasted image is not pasted as text
    finally:
        page.context.close()


def test_a_text_only_model_refusing_an_image_is_shown_and_the_page_chats_on(browser, text_server):
    page = open_page(browser, text_server)
    try:
        page.set_input_files("#file", {"name": "disc.png", "mimeType": "image/png", "buffer": png_bytes()})
        page.wait_for_selector("#attachments img")
        page.fill("#input", "What is this?")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.error", timeout=60_000)
        error = page.locator(".message.error").inner_text()
        assert "does not accept images" in error, error
        page.fill("#input", "hello there")  # the refused turn is not sent again
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .meta", timeout=60_000)
        assert api_requests(page)[-1].post_data_json["messages"] == [{"role": "user", "content": "hello there"}]
        assert page.locator(".message.error").count() == 1
    finally:
        page.context.close()


# ---- images in replies: canned streamed replies ------------------------------------------------------------------

class SlowStream:
    """An HTTP server that answers every POST with a streamed reply in two parts: the first at once, the second
    when `release` is set (so that the page can be looked at between them)."""

    def __init__(self, first: bytes, second: bytes):
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for part, wait in ((first, False), (second, True)):
                    if wait:
                        outer.release.wait(30)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_streamed_markdown_image_split_across_chunks_becomes_an_img(browser, text_server):
    url = data_url(png_bytes())
    markdown = f"![image]({url})"
    cut = len("![image](data:image/png;base64,") + 20
    events = sse("Here it is: ", markdown[:cut], markdown[cut:], " done.")
    split = events.rindex(b"data: ", 0, events.index(markdown[cut:].encode()))  # the event of the second half
    stub = SlowStream(events[:split], events[split:])  # arrives later, in a read of its own
    page = open_page(browser, text_server)
    try:
        page.route(CHAT, lambda route: route.continue_(url=stub.url))
        page.fill("#input", "draw a disc")
        page.press("#input", "Enter")
        # Half an image: held back (no <img>, no base64 on the page), the text before it shown.
        page.wait_for_selector(".message.assistant .pending")
        reply = page.locator(".message.assistant")
        assert reply.locator("img").count() == 0
        assert "Here it is:" in reply.inner_text() and "base64" not in reply.inner_text()
        stub.release.set()
        page.wait_for_selector(".message.assistant .meta")
        image = reply.locator("img")
        assert image.count() == 1 and image.get_attribute("src") == url and image.get_attribute("alt") == "image"
        page.wait_for_function("document.querySelector('.message.assistant img').complete")
        assert image.evaluate("i => i.naturalWidth") == 28  # a real PNG, decoded
        assert reply.locator(".pending").count() == 0
        text = reply.locator(".body").inner_text()
        assert text.replace("\n", "") == "Here it is:  done." and "data:" not in text
    finally:
        page.context.close()
        stub.close()


def test_a_canned_reply_in_chunks_renders_its_image_and_survives_a_reload(browser, text_server):
    url = data_url(png_bytes(seed=2))
    markdown = f"![a disc]({url})"
    page = open_page(browser, text_server)
    try:
        page.route(CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                     body=sse("A ", markdown[:40], markdown[40:-1], ")")))
        page.fill("#input", "draw")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .meta")
        image = page.locator(".message.assistant img")
        assert image.count() == 1 and image.get_attribute("src") == url and image.get_attribute("alt") == "a disc"
        # The reply is kept whole in the conversation, and sent back as the assistant's text.
        page.fill("#input", "again")
        page.press("#input", "Enter")
        page.wait_for_function("document.querySelectorAll('.message.assistant .meta').length == 2")
        messages = api_requests(page)[-1].post_data_json["messages"]
        assert messages[1] == {"role": "assistant", "content": "A " + markdown}
        page.reload()
        page.wait_for_selector(".message.assistant img")
        assert page.locator(".message.assistant img").first.get_attribute("src") == url
    finally:
        page.context.close()


def test_html_remote_urls_and_other_media_types_in_a_reply_stay_text(browser, text_server):
    svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'/>").decode()
    hostile = ['<img src=x onerror="window.pwned=1">', "![x](https://example.com/a.png)", f"![s]({svg})",
               "![j](javascript:window.pwned=2)", "<script>window.pwned=3</script>", "<b>bold</b>"]
    page = open_page(browser, text_server)
    remote = []
    page.context.route("https://example.com/**", lambda route: (remote.append(route.request.url), route.abort()))
    try:
        page.route(CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                     body=sse(*[h + "\n" for h in hostile])))
        page.fill("#input", "attack")
        page.press("#input", "Enter")
        page.wait_for_selector(".message.assistant .meta")
        reply = page.locator(".message.assistant")
        assert reply.locator("img, script, b").count() == 0
        text = reply.locator(".body").inner_text()
        for h in hostile:
            assert h in text
        page.wait_for_timeout(300)
        assert page.evaluate("window.pwned") is None and remote == []
        # after a reload (the reply rendered from the stored conversation) it is still text
        page.reload()
        page.wait_for_selector(".message.assistant")
        assert page.locator(".message.assistant").locator("img, script, b").count() == 0
        assert page.evaluate("window.pwned") is None and remote == []
    finally:
        page.context.close()
