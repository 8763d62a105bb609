"""Audio through `fmforge serve` as a real process, driven by the official `openai` client (raw HTTP where the
client would hide what is checked): input_audio parts in chat (wav, flac, ogg, mp3), replies that speak
(`message.audio`, streamed as `delta.audio`, sent back in the next turn), POST /v1/audio/transcriptions (json, text,
verbose_json) and POST /v1/audio/speech (wav, pcm), exact usage, and every bad clip refused with OpenAI's 400 naming
its field, before it is decoded, the server serving on afterwards."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import ServerProcess, no_stop

TRANSCRIBE = "Transcribe the audio."
TRANSCRIBE_PART = {"type": "text", "text": TRANSCRIBE}
MAX_AUDIO_BYTES = 1 << 20  # the server's --max-audio-bytes here (a body of 8 MiB carries more)


@pytest.fixture(scope="module")
def base(speech_base) -> Path:
    from fmforge.checkpoint import resolve_checkpoint
    return resolve_checkpoint(speech_base)


@pytest.fixture(scope="module")
def tokenizer(base):
    from fmforge.checkpoint import load_tokenizer
    return load_tokenizer(base)


@pytest.fixture(scope="module")
def rate(tokenizer) -> int:
    return tokenizer.codecs["audio"].config.sample_rate


@pytest.fixture(scope="module")
def server(base):
    process = ServerProcess("--checkpoint", str(base), "--max-batch", "4", "--max-body-bytes", str(8 << 20),
                            "--max-audio-bytes", str(MAX_AUDIO_BYTES), "--max-audio-seconds", "10")
    yield process
    assert process.stop() == 0, process.output()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def chirp(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A rising tone with a little noise: a clip with something in it for the codec."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.02, len(t))
    return (0.4 * np.sin(2 * np.pi * (300 + 400 * t) * t) + noise).astype(np.float32)


def encoded(wave: np.ndarray, fmt: str, rate: int = 16000) -> bytes:
    from fmforge.data.audio import _encode
    return _encode(wave, rate, fmt)


def audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode("ascii"), "format": fmt}}


def heard(tokenizer, data: bytes, rate: int) -> np.ndarray:
    """A clip as the server hears it: decoded to mono at the codec's rate."""
    from fmforge.data.audio import decode_audio_bytes
    return decode_audio_bytes(data, rate)


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    return wave, rate


# ---- audio in ------------------------------------------------------------------------------------------------------

def test_chat_hears_audio_and_counts_every_token(client, tokenizer, rate):
    clip = chirp(1.0, 22050)  # another rate than the codec's: resampled
    wav = encoded(clip, "wav", 22050)
    expected = tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "audio", "audio": heard(tokenizer, wav, rate)}, TRANSCRIBE]}], add_generation_prompt=True)
    spans = [name for name, _, _ in tokenizer.spans(expected)]
    assert spans == ["audio"]
    response = client.chat.completions.create(model="base", max_tokens=4, temperature=0, logit_bias=no_stop(tokenizer),
                                              messages=[{"role": "user", "content": [audio_part(wav), TRANSCRIBE_PART]}])
    assert response.usage.prompt_tokens == len(expected)  # the audio's span counted, exactly
    assert response.usage.completion_tokens == 4 and response.choices[0].finish_reason == "length"
    # FLAC is lossless: the same tokens; OGG Vorbis and MP3 are lossy, and about as long.
    flac = client.chat.completions.create(model="base", max_tokens=1, messages=[
        {"role": "user", "content": [audio_part(encoded(clip, "flac", 22050), "flac"), TRANSCRIBE_PART]}])
    assert flac.usage.prompt_tokens == len(expected)
    for fmt in ("ogg", "mp3"):
        lossy = client.chat.completions.create(model="base", max_tokens=1, messages=[
            {"role": "user", "content": [audio_part(encoded(clip, fmt, 22050), fmt.upper()), TRANSCRIBE_PART]}])
        assert abs(lossy.usage.prompt_tokens - len(expected)) <= 16, fmt  # within a row of codes


def speaking(tokenizer) -> dict:
    """A chat request pushed to open an audio span of 2 x 2 codes and end it: a spoken reply, deterministically."""
    offset = tokenizer.ranges["audio"][0]
    return dict(model="base", messages=[{"role": "user", "content": "Say: seven"}], max_tokens=8, temperature=0,
                logit_bias={"9": 100, str(offset + 2): 100})


def test_a_reply_that_speaks_carries_message_audio(client, tokenizer, rate):
    kwargs = speaking(tokenizer)
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert message.content == "" and "<|audio|>" not in message.content  # the span is not text
    assert whole.usage.completion_tokens == 8  # <|audio|> 2 2, four codes, <|/audio|>
    assert set(message.audio.model_dump()) >= {"id", "data", "expires_at", "transcript"}
    wave, wave_rate = wav_samples(base64.b64decode(message.audio.data))
    assert wave_rate == rate and 0 < len(wave) <= 4 * 4 * 160  # 4 codes of 4 mel frames of 10 ms
    assert message.audio.transcript == message.content and message.audio.id.startswith("audio_")
    # Streamed: the text deltas carry no codes; the span arrives as delta.audio, the same audio.
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    audio = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    assert [a.data for a in audio] == [message.audio.data] and audio[0].id.startswith("audio_")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert chunks[-1].usage.completion_tokens == 8
    # pcm16: the same samples as raw 16-bit PCM (OpenAI's audio: {"format": "pcm16"}); the voice is ignored.
    pcm = client.chat.completions.create(**kwargs, modalities=["text", "audio"],
                                         audio={"voice": "alloy", "format": "pcm16"})
    samples = np.frombuffer(base64.b64decode(pcm.choices[0].message.audio.data), "<i2")
    assert np.array_equal(samples, np.round(wave * 32768).astype(np.int16))


def test_a_spoken_reply_goes_back_in_as_audio(client, tokenizer, rate):
    kwargs = speaking(tokenizer)
    reply = client.chat.completions.create(**kwargs).choices[0].message
    spoken = heard(tokenizer, base64.b64decode(reply.audio.data), rate)
    expected = tokenizer.encode_chat(kwargs["messages"] + [
        {"role": "assistant", "content": ["", {"type": "audio", "audio": spoken}]},
        {"role": "user", "content": "again"}], add_generation_prompt=True)
    # The official client's message, sent back as it came (content "", audio with its data) ...
    again = client.chat.completions.create(model="base", max_tokens=1, messages=kwargs["messages"] + [
        reply.model_dump(exclude_none=True), {"role": "user", "content": "again"}])
    assert again.usage.prompt_tokens == len(expected)
    # ... or as an input_audio part of the assistant's content (what the chat page sends).
    again = client.chat.completions.create(model="base", max_tokens=1, messages=kwargs["messages"] + [
        {"role": "assistant", "content": [audio_part(base64.b64decode(reply.audio.data))]},
        {"role": "user", "content": "again"}])
    assert again.usage.prompt_tokens == len(expected)
    # An id alone cannot be looked up: this server keeps no audio.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="base", max_tokens=1, messages=kwargs["messages"] + [
            {"role": "assistant", "content": None, "audio": {"id": reply.audio.id}}])
    assert refused.value.body["param"] == "messages.1.audio.data" and "keeps no audio" in refused.value.body["message"]


# ---- the Audio API ---------------------------------------------------------------------------------------------------

def test_transcriptions(client, tokenizer, rate, tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(encoded(chirp(1.5), "wav"))
    with open(path, "rb") as file:
        result = client.audio.transcriptions.create(model="base", file=file, response_format="json")
    expected = tokenizer.encode_chat([{"role": "user", "content": [
        {"type": "audio", "audio": heard(tokenizer, path.read_bytes(), rate)}, TRANSCRIBE]}],
        add_generation_prompt=True)
    assert isinstance(result.text, str) and "<|" not in result.text
    assert result.usage.input_tokens == len(expected)
    audio_tokens = result.usage.input_token_details.audio_tokens
    assert audio_tokens == sum(end - start for _, start, end in tokenizer.spans(expected)) and audio_tokens > 10
    # Greedy by default: the same text as plain text, and in verbose_json with the clip's duration.
    with open(path, "rb") as file:
        text = client.audio.transcriptions.create(model="base", file=file, response_format="text")
    assert text.strip() == result.text
    with open(path, "rb") as file:
        verbose = client.audio.transcriptions.create(model="base", file=file, response_format="verbose_json",
                                                     language="en")
    assert verbose.text == result.text and verbose.language == "english"
    assert verbose.duration == pytest.approx(1.5, abs=0.01)
    if verbose.text:
        (segment,) = verbose.segments
        assert segment.text == verbose.text and segment.end == verbose.duration and segment.avg_logprob <= 0
    # A prompt replaces the instruction (the user turn is [audio, prompt]).
    with open(path, "rb") as file:
        prompted = client.audio.transcriptions.create(model="base", file=file, prompt="Write down what is said.")
    assert prompted.usage.input_tokens != result.usage.input_tokens


def test_speech(client, server, rate):
    response = client.audio.speech.create(model="base", voice="alloy", input="seven", response_format="wav",
                                          extra_body={"seed": 3})
    assert response.response.headers["content-type"] == "audio/wav"
    wave, wave_rate = wav_samples(response.content)
    assert wave_rate == rate and len(wave) > 0
    # pcm: the same speech as raw 16-bit PCM, its rate in a header.
    pcm = httpx.post(server.url + "/v1/audio/speech", timeout=60, json={
        "model": "base", "voice": "nova", "input": "seven", "response_format": "pcm", "seed": 3})
    assert pcm.status_code == 200 and pcm.headers["content-type"] == "audio/pcm"
    assert pcm.headers["x-sample-rate"] == str(rate)
    assert np.array_equal(np.frombuffer(pcm.content, "<i2"), np.round(wave * 32768).astype(np.int16))


def test_speech_without_room_for_a_span_is_422(server, tokenizer):
    # The 352-token context nearly filled by the input: no span can end (rows, row length, a code, the end marker).
    def length(text: str) -> int:
        return len(tokenizer.encode_chat([{"role": "user", "content": f"Say: {text}"}], add_generation_prompt=True))

    text = "seven"
    while length(text + " seven") <= 349:
        text += " seven"
    assert 340 <= length(text) <= 349
    response = httpx.post(server.url + "/v1/audio/speech", timeout=60,
                          json={"model": "base", "voice": "alloy", "input": text, "seed": 1})
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "no_audio_generated" and error_of(response)["param"] == "input"


# ---- bad input: OpenAI's 400 naming the field, before anything is decoded ------------------------------------------

def test_bad_audio_is_400_and_the_server_serves_on(server, client, tokenizer, tmp_path):
    wav = encoded(chirp(1.0), "wav")
    flac = encoded(chirp(1.0), "flac")
    long_wav = encoded(np.zeros(16000 * 11, np.float32), "wav")  # 11 s over the 10 s cap, 352 KB
    big = encoded(np.zeros(64000 * 9, np.float32), "wav", 64000)  # 9 s, but 1.15 MB over the 1 MiB cap
    b64 = lambda data: base64.b64encode(data).decode("ascii")  # noqa: E731
    where = "messages.0.content.1.input_audio"
    cases = {  # name: (input_audio, param, code)
        "aac": ({"data": b64(wav), "format": "aac"}, f"{where}.format", "unsupported_audio_format"),
        "bad base64": ({"data": "@@@@", "format": "wav"}, f"{where}.data", "invalid_audio"),
        "not audio": ({"data": b64(b"hello, world" * 100), "format": "wav"}, f"{where}.data", "invalid_audio"),
        "truncated header": ({"data": b64(wav[:30]), "format": "wav"}, f"{where}.data", "invalid_audio"),
        "flac called wav": ({"data": b64(flac), "format": "wav"}, f"{where}.data", "invalid_audio"),
        "empty": ({"data": "", "format": "wav"}, f"{where}.data", "invalid_audio"),
        "11 seconds": ({"data": b64(long_wav), "format": "wav"}, f"{where}.data", "audio_too_long"),
        "over 1 MiB": ({"data": b64(big), "format": "wav"}, f"{where}.data", "audio_too_large"),
    }
    for name, (input_audio, param, code) in cases.items():
        response = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "base", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "listen"}, {"type": "input_audio", "input_audio": input_audio}]}]})
        assert response.status_code == 400, (name, response.text[:300])
        error = error_of(response)
        assert (error["param"], error["code"]) == (param, code), (name, error)
    assert "declared wav but the bytes are FLAC" in error_of(httpx.post(server.url + "/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": [audio_part(flac, "wav")]}]}))["message"]
    # Too many clips (the default cap is 8), a part without its input_audio, audio from a user's message field.
    for body, param, code in (
            ({"content": [audio_part(wav)] * 9}, "messages", "too_many_audio_clips"),
            ({"content": [{"type": "input_audio"}]}, "messages.0.content.0.input_audio", None),
            ({"content": "hi", "audio": {"data": b64(wav)}}, "messages.0.audio", None)):
        response = httpx.post(server.url + "/v1/chat/completions",
                              json={"model": "base", "messages": [{"role": "user", **body}]})
        assert response.status_code == 400 and (error_of(response)["param"], error_of(response)["code"]) == (
            param, code), response.text
    for body, param in (({"modalities": ["video"]}, "modalities"), ({"audio": {"format": "mp3"}}, "audio.format")):
        response = httpx.post(server.url + "/v1/chat/completions", json={
            "model": "base", "messages": [{"role": "user", "content": "hi"}], **body})
        assert response.status_code == 400 and error_of(response)["param"] == param, response.text

    # Transcriptions: the same caps on the upload, a clear 400 for srt/vtt, a missing file or a body not multipart.
    for name, data, code in (("long.wav", long_wav, "audio_too_long"), ("big.wav", big, "audio_too_large"),
                             ("notes.wav", b"hello" * 50, "invalid_audio")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(openai.BadRequestError) as refused, open(path, "rb") as file:
            client.audio.transcriptions.create(model="base", file=file)
        assert (refused.value.body["param"], refused.value.body["code"]) == ("file", code), name
    path = tmp_path / "clip.wav"
    path.write_bytes(wav)
    for fmt in ("srt", "vtt"):
        with pytest.raises(openai.BadRequestError) as refused, open(path, "rb") as file:
            client.audio.transcriptions.create(model="base", file=file, response_format=fmt)
        assert refused.value.body["param"] == "response_format" and "'verbose_json'" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused, open(path, "rb") as file:
        client.audio.transcriptions.create(model="base", file=file, language="fr")
    assert refused.value.body["param"] == "language"
    response = httpx.post(server.url + "/v1/audio/transcriptions", data={"model": "base"},
                          files={"other": ("x.wav", wav)})
    assert response.status_code == 400 and error_of(response)["param"] == "file"
    response = httpx.post(server.url + "/v1/audio/transcriptions", json={"model": "base", "file": b64(wav)})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_form"
    response = httpx.post(server.url + "/v1/audio/transcriptions", content=b"--x\r\nbroken",
                          headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_form", response.text
    response = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("c.wav", wav)},
                          data={"model": "base", "temperature": "hot"})
    assert response.status_code == 422 and error_of(response)["param"] == "temperature"
    response = httpx.post(server.url + "/v1/audio/transcriptions", files={"file": ("c.wav", wav)},
                          data={"model": "nope"})
    assert response.status_code == 404 and error_of(response)["param"] == "model"

    # Speech: wav or pcm only (the message lists them), speed 1, a voice given.
    for body, status, param in (({"response_format": "mp3"}, 400, "response_format"),
                                ({"response_format": "opus"}, 400, "response_format"),
                                ({"speed": 2.0}, 400, "speed"), ({"voice": None}, 422, "voice"),
                                ({"input": ""}, 422, "input"), ({"model": "nope"}, 404, "model")):
        response = httpx.post(server.url + "/v1/audio/speech",
                              json={"model": "base", "voice": "alloy", "input": "seven", **body})
        # (a field of a union type is named with the first type tried: "voice.str")
        assert response.status_code == status and error_of(response)["param"].split(".")[0] == param, (
            body, response.text)
    assert "'wav' or 'pcm'" in error_of(httpx.post(server.url + "/v1/audio/speech", json={
        "model": "base", "voice": "alloy", "input": "seven", "response_format": "flac"}))["message"]
    # ... and the server goes on serving.
    assert httpx.get(server.url + "/health").status_code == 200
    good = client.chat.completions.create(model="base", max_tokens=2, temperature=0, logit_bias=no_stop(tokenizer),
                                          messages=[{"role": "user", "content": [audio_part(wav), TRANSCRIBE_PART]}])
    assert good.choices[0].finish_reason == "length" and good.usage.completion_tokens == 2
    assert good.usage.prompt_tokens > 20  # the audio's codes were read
    assert "Traceback" not in server.output()


def test_openapi_lists_the_audio_routes_and_models_are_unchanged(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    speech = schema["paths"]["/v1/audio/speech"]["post"]
    assert speech["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SpeechRequest"}
    assert set(speech["responses"]["200"]["content"]) == {"audio/wav", "audio/pcm"}
    upload = schema["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert upload["schema"]["required"] == ["file", "model"]
    assert upload["schema"]["properties"]["file"]["format"] == "binary"
    assert upload["schema"]["properties"]["model"]["enum"] == ["base"]
    assert "InputAudio" in schema["components"]["schemas"]
    (model,) = httpx.get(server.url + "/v1/models").json()["data"]
    assert set(model) == {"id", "object", "created", "owned_by", "root", "parent", "max_model_len"}


# ---- a text-only model -----------------------------------------------------------------------------------------------

def test_a_text_only_model_refuses_audio(checkpoint, tmp_path):
    process = ServerProcess("--checkpoint", str(checkpoint))
    try:
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="none", max_retries=0, timeout=60)
        wav = encoded(chirp(0.5), "wav")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="base", max_tokens=2, messages=[
                {"role": "user", "content": [audio_part(wav), TRANSCRIBE_PART]}])
        assert "does not accept audio" in refused.value.body["message"]
        assert refused.value.body["param"] == "messages.0.content.0.type"
        path = tmp_path / "clip.wav"
        path.write_bytes(wav)
        with pytest.raises(openai.BadRequestError) as refused, open(path, "rb") as file:
            client.audio.transcriptions.create(model="base", file=file)
        assert "does not accept audio" in refused.value.body["message"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model="base", voice="alloy", input="seven", response_format="wav")
        assert refused.value.body["param"] == "model"
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="base", max_tokens=2, modalities=["text", "audio"],
                                           audio={"voice": "alloy", "format": "wav"},
                                           messages=[{"role": "user", "content": "hi"}])
        assert refused.value.body["param"] == "modalities"
        assert client.chat.completions.create(model="base", max_tokens=2, messages=[
            {"role": "user", "content": "hi"}]).choices[0].finish_reason
    finally:
        assert process.stop() == 0, process.output()
