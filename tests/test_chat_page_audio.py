"""The chat page's audio, in a real headless Chromium against a real `fmforge serve` of the tiny speech base: a WAV
file attached in the composer goes as an OpenAI input_audio part and plays in the sent message; a recording from
the microphone (Chromium's fake device) is converted to WAV in the page and goes the same way; audio the browser
cannot decode is refused in the page. A spoken reply (a canned stream: the tiny model does not reliably speak) shows
an <audio> player where the span was, survives a reload, and goes back to the real server as the assistant's
input_audio part."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from conftest import CHROMIUM, ServerProcess

KEY = "test-key"
CHAT = "**/v1/chat/completions"
TRANSCRIBE = "Transcribe the audio."


@pytest.fixture(scope="module")
def browser():
    """Chromium as in conftest's `browser`, with a fake microphone (a beep) that needs no permission prompt."""
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (scripts/setup.sh installs it when run as root with apt)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def speech_server(speech_base):
    from fmforge.checkpoint import resolve_checkpoint

    process = ServerProcess("--checkpoint", str(resolve_checkpoint(speech_base)), "--api-key", KEY,
                            "--max-batch", "2")
    yield process
    assert process.stop() == 0, process.output()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    from fmforge.data.audio import encode_wav

    t = np.arange(int(seconds * rate)) / rate
    return encode_wav((0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def open_page(browser, server):
    """The chat page, logged in, its models listed, allowed the microphone; its requests are in page.sent."""
    context = browser.new_context(http_credentials={"username": "user", "password": KEY}, permissions=["microphone"])
    page = context.new_page()
    page.sent = []
    page.on("request", lambda request: page.sent.append(request))
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='base']", state="attached")
    page.fill("#max_tokens", "6")
    return page


def chat_requests(page) -> list:
    return [r for r in page.sent if r.url.endswith("/v1/chat/completions") and r.method == "POST"]


def duration(locator) -> float:
    """Seconds of an <audio> element's media, once the browser has decoded its header."""
    return locator.evaluate("""a => new Promise((resolve, reject) => {
        if (a.readyState >= 1) return resolve(a.duration);
        a.addEventListener("loadedmetadata", () => resolve(a.duration));
        a.addEventListener("error", () => reject(new Error("the audio did not load")));
    })""")


def send_and_wait(page, text: str, replies: int = 1) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.message.assistant .meta').length == {replies}",
                           timeout=60_000)


def test_an_attached_wav_goes_to_the_model_as_an_input_audio_part(browser, speech_server, tmp_path):
    path = tmp_path / "tone.wav"
    path.write_bytes(wav_bytes(1.0))
    page = open_page(browser, speech_server)
    try:
        statuses = []
        page.on("response", lambda response: statuses.append(response.status) if "/v1/chat" in response.url else None)
        page.set_input_files("#audiofile", str(path))
        page.wait_for_selector("#attachments audio")
        assert duration(page.locator("#attachments audio")) == pytest.approx(1.0, abs=0.01)
        send_and_wait(page, TRANSCRIBE)
        assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
        assert statuses == [200]
        (request,) = chat_requests(page)
        assert request.post_data_json["messages"][-1]["content"] == [
            {"type": "input_audio", "input_audio": {"data": b64(path.read_bytes()), "format": "wav"}},
            {"type": "text", "text": TRANSCRIBE}]
        sent = page.locator(".message.user audio")
        assert sent.get_attribute("src") == "data:audio/wav;base64," + b64(path.read_bytes())
        assert duration(sent) == pytest.approx(1.0, abs=0.01)
        assert page.locator("#attachments .attachment").count() == 0
        # Audio the browser cannot decode is refused in the page, and nothing is attached.
        page.set_input_files("#audiofile", {"name": "noise.webm", "mimeType": "audio/webm", "buffer": b"not audio"})
        page.wait_for_function("document.getElementById('notice').textContent !== ''")
        assert "noise.webm could not be read as audio" in page.locator("#notice").inner_text()
        assert page.locator("#attachments .attachment").count() == 0
    finally:
        page.context.close()


def test_a_recording_from_the_microphone_is_sent_as_wav(browser, speech_server):
    import soundfile

    page = open_page(browser, speech_server)
    try:
        page.click("#record")
        page.wait_for_function("document.getElementById('record').textContent === 'Stop recording'")
        page.wait_for_timeout(1200)
        page.click("#record")
        page.wait_for_selector("#attachments audio", timeout=10_000)
        assert page.locator("#notice").inner_text() == "" and page.locator("#record").inner_text() == "Record"
        send_and_wait(page, TRANSCRIBE)
        assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
        part = chat_requests(page)[-1].post_data_json["messages"][-1]["content"][0]
        assert part["type"] == "input_audio" and part["input_audio"]["format"] == "wav"
        wave, rate = soundfile.read(io.BytesIO(base64.b64decode(part["input_audio"]["data"])))
        assert rate == 16000 and wave.ndim == 1 and 0.8 < len(wave) / rate < 3.0
        assert np.abs(wave).max() > 0.01  # the fake microphone's beep, not silence
    finally:
        page.context.close()


def sse_with_audio(text: str, wav: bytes) -> bytes:
    """A streamed chat reply as the server writes one that speaks: text, then the span's audio, then more text."""
    head = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 0, "model": "base"}
    deltas = [{"role": "assistant", "content": ""}, {"content": text},
              {"audio": {"id": "audio_canned", "data": b64(wav), "expires_at": 0}}, {"content": " ok"}]
    events = [{**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    events += [{**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
               {**head, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 9, "total_tokens": 12}}]
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def test_a_spoken_reply_plays_and_goes_back_to_the_server_as_audio(browser, speech_server):
    wav = wav_bytes(0.5)
    page = open_page(browser, speech_server)
    try:
        page.route(CHAT, lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                     body=sse_with_audio("Here:", wav)), times=1)
        send_and_wait(page, "Say: seven")
        reply = page.locator(".message.assistant")
        player = reply.locator("audio")
        assert player.count() == 1 and player.get_attribute("src") == "data:audio/wav;base64," + b64(wav)
        assert duration(player) == pytest.approx(0.5, abs=0.01)
        # where the span was: between the text before it and the text after it
        assert reply.locator(".body").evaluate("b => Array.from(b.childNodes).map(n => n.nodeName)") == [
            "SPAN", "AUDIO", "SPAN"]
        assert reply.locator(".body").inner_text().split() == ["Here:", "ok"]
        # The next turn goes to the real server, the spoken reply in it as the assistant's audio.
        send_and_wait(page, "again", replies=2)
        assert page.locator(".message.error").count() == 0, page.locator(".message.error").all_inner_texts()
        assert chat_requests(page)[-1].post_data_json["messages"][1] == {"role": "assistant", "content": [
            {"type": "text", "text": "Here:"}, {"type": "input_audio", "input_audio": {"data": b64(wav),
                                                                                      "format": "wav"}},
            {"type": "text", "text": " ok"}]}
        # A reload shows the player again, from the stored conversation.
        page.reload()
        page.wait_for_selector(".message.assistant audio")
        src = page.locator(".message.assistant audio").first.get_attribute("src")
        assert src == "data:audio/wav;base64," + b64(wav)
    finally:
        page.context.close()
