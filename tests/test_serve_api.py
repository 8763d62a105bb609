"""`fmforge serve` as a real process on 127.0.0.1, driven by the official `openai` client (and raw HTTP where
the client would hide what is checked): models, completions, chat, streaming, embeddings, adapters, every
error status, client disconnects, the queue limit, SIGTERM draining, 16 concurrent streams, and the chat page
in a real headless Chromium."""

from __future__ import annotations

import json
import re
from signal import SIGTERM
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import ServerProcess, app_server, make_adapter

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def base(checkpoint) -> Path:
    from fmforge.checkpoint import resolve_checkpoint
    return resolve_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-adapters")
    a = make_adapter(base, root / "a", 1, ["q_proj", "v_proj"], 4)
    b = make_adapter(base, root / "b", 2, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"], 8)
    process = ServerProcess("--checkpoint", str(base), "--adapter", f"spec-a={a}", "--adapter", f"spec-b={b}",
                            "--api-key", KEY, "--max-batch", "4", "--max-queue", "64", "--max-body-bytes", "65536")
    yield process
    assert process.stop() == 0, process.output()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(url + "/metrics", headers=AUTH).text
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else r"(?:\{\})?") + r" ([0-9.e+-]+)"
    match = re.search("^" + pattern + "$", text, re.M)
    return float(match.group(1)) if match else 0.0


def assert_serving(server, client) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert client.completions.create(model="base", prompt="def", max_tokens=2).choices[0].finish_reason


# ---- the API ----------------------------------------------------------------------------------------------------

def test_models(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "spec-a", "spec-b"}
    assert models["spec-a"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None


def test_completion_usage_and_adapter_selection(client, base):
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(base)
    prompt = "def parse(text):\n"
    outputs = {}
    for model in ("base", "spec-a", "spec-b", "base"):
        response = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
        choice = response.choices[0]
        assert response.usage.prompt_tokens == len(tokenizer.encode(prompt, add_bos=True))
        assert response.usage.completion_tokens == 12 and choice.finish_reason == "length"
        outputs.setdefault(model, []).append((choice.text, choice.logprobs.token_logprobs[0]))
    assert outputs["base"][0] == outputs["base"][1]  # greedy is deterministic
    # Each adapter changes the model's distribution (the first token's log-probability), and so its text.
    firsts = [outputs[m][0][1] for m in ("base", "spec-a", "spec-b")]
    assert len({round(x, 4) for x in firsts}) == 3, firsts
    assert outputs["spec-b"][0][0] != outputs["base"][0][0]


def test_chat_streaming_equals_non_streaming(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model="spec-b", messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model="spec-b", messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and len(text) > 0
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_seed_n_and_stop(client):
    kwargs = dict(model="base", prompt="import", max_tokens=10, temperature=1.0, top_p=0.9, seed=7, n=2, extra_body={"top_k": 40},
                  presence_penalty=0.5, frequency_penalty=0.5)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1] and first.usage.completion_tokens == 20
    greedy = client.completions.create(model="base", prompt="class A:", max_tokens=20, temperature=0).choices[0].text
    stop = greedy[5:8]
    cut = client.completions.create(model="base", prompt="class A:", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_logprobs(client):
    response = client.completions.create(model="base", prompt="def f(", max_tokens=5, temperature=0, logprobs=3)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) <= 3
        assert logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy picked the most likely token
    assert "".join(lp.tokens) == response.choices[0].text
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_embeddings(client, server):
    texts = ["def f(x): return x", "import os", "def f(x): return x"]
    packed = client.embeddings.create(model="base", input=texts)  # the client asks for base64 by default
    plain = httpx.post(server.url + "/v1/embeddings", headers=AUTH,
                       json={"model": "base", "input": texts, "encoding_format": "float"}).json()
    vectors = np.array([d.embedding for d in packed.data])
    floats = np.array([d["embedding"] for d in plain["data"]])
    assert vectors.shape == (3, 64) and np.allclose(vectors, floats, atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(vectors[0], vectors[2]) and not np.allclose(vectors[0], vectors[1])
    adapted = client.embeddings.create(model="spec-b", input=texts[0]).data[0].embedding
    assert not np.allclose(adapted, vectors[0])
    assert packed.usage.prompt_tokens > 0


# ---- errors: OpenAI's JSON, the right status, and the server keeps serving -----------------------------------

def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_errors(server, client):
    url = server.url
    # malformed JSON, wrong types, unsupported fields
    r = httpx.post(url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                   content=b'{"model": "base", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "temperature": "hot"})
    assert r.status_code == 422 and error_of(r)["param"] == "temperature"
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH,
                   json={"model": "base", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 422 and "messages" in error_of(r)["param"]
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "base", "prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and error_of(r)["param"] == "suffix"
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="base", prompt="x", max_tokens=-3)
    # unknown model
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found" and "spec-a" in info.value.body["message"]
    # prompt longer than the context window: both counts named
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="base", prompt="word " * 200, max_tokens=5)
    message = info.value.body["message"]
    assert "64 tokens" in message and re.search(r"prompt has (\d+) tokens", message)
    assert int(re.search(r"prompt has (\d+) tokens", message).group(1)) > 64
    # API key: missing or wrong is 401 everywhere but /health
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/")):
            r = httpx.request(method, url + path, headers=headers, json={"model": "base", "prompt": "x"})
            assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key", (path, r.text)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(url + "/health").status_code == 200
    # oversized bodies, with a Content-Length and chunked
    big = {"model": "base", "prompt": "x" * 70_000}
    r = httpx.post(url + "/v1/completions", headers=AUTH, json=big)
    assert r.status_code == 413 and "65536" in error_of(r)["message"]

    def chunks():
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(url + "/v1/completions", headers={**AUTH, "Content-Type": "application/json"}, content=chunks())
    assert r.status_code == 413
    # unknown route
    r = httpx.get(url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    assert_serving(server, client)


# ---- load: 16 streams at once --------------------------------------------------------------------------------

def read_sse(response: httpx.Response) -> list:
    """Parse an SSE body strictly: every event is one `data: ` line; the last is [DONE]."""
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    parsed = []
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        parsed.append(json.loads(event[len("data: "):]))
    return parsed


def test_kv_cache_bytes_in_the_start_up_line_and_metrics(server, base, capsys):
    from fmforge.checkpoint import read_model_config
    from fmforge.cli import main

    config = read_model_config(base)
    per_token = 2 * config.n_layer * config.n_kv_head * config.head_dim * 4  # float32 on the CPU
    assert metric(server.url, "fmforge_kv_cache_bytes_per_token") == per_token
    assert metric(server.url, "fmforge_kv_cache_bytes_per_sequence") == per_token * config.context_length
    line = next(line for line in server.output().splitlines() if "KV cache" in line)
    assert f"per token (2 x {config.n_layer} layers x {config.n_kv_head} KV heads" in line
    assert "x float32" in line and "prefill in chunks of 32 tokens" in line  # the CPU's default
    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(base), "--prefill-chunk", "-1"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --max-batch must be at least 1, --max-queue, --speculate and "
                                               "--prefill-chunk at least 0")
    for bad in ("-5", "nan", "5000"):
        assert main(["serve", "--checkpoint", str(base), "--stream-interval", bad]) == 1
        assert capsys.readouterr().err.strip() == "error: --stream-interval must be between 0 and 1000 ms"


def test_sixteen_concurrent_streams(server):
    route = 'route="/v1/chat/completions",status="200"'
    before_requests = metric(server.url, "fmforge_requests_total", route)
    before_tokens = metric(server.url, "fmforge_completion_tokens_total")
    results, errors = [None] * 16, []

    def client_thread(i: int):
        try:
            body = {"model": ["base", "spec-a", "spec-b"][i % 3], "stream": True, "max_tokens": 10 + i,
                    "messages": [{"role": "user", "content": f"request {i}"}], "temperature": 0.7, "seed": i,
                    "stream_options": {"include_usage": True}}
            with httpx.Client(timeout=120) as http:
                response = http.post(server.url + "/v1/chat/completions", headers=AUTH, json=body)
            results[i] = (response.status_code, read_sse(response) if response.status_code == 200 else response.text)
        except Exception as exc:  # noqa: BLE001 — reported below
            errors.append(repr(exc))

    started = time.monotonic()
    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert time.monotonic() - started < 180
    total = 0
    for i, (status, events) in enumerate(results):
        assert status == 200, events
        finishes = [c["choices"][0]["finish_reason"] for c in events if c["choices"] and c["choices"][0]["finish_reason"]]
        assert len(finishes) == 1 and finishes[0] in ("stop", "length")
        usage = events[-1]["usage"]
        assert events[-1]["choices"] == [] and usage["completion_tokens"] <= 10 + i
        total += usage["completion_tokens"]
    assert metric(server.url, "fmforge_requests_total", route) - before_requests == 16
    assert metric(server.url, "fmforge_completion_tokens_total") - before_tokens == total
    assert metric(server.url, "fmforge_running_sequences") == 0 and metric(server.url, "fmforge_queue_depth") == 0


# ---- long generations: disconnects, the queue limit, SIGTERM ----------------------------------------------------

NO_EOS = {"logit_bias": {"1": -100}}  # the untrained model must not stop early (id 1 is <|eos|>)


def test_disconnect_stops_generation_and_full_queue_answers_429(long_base):
    from fmforge.tokenizer import Tokenizer

    assert Tokenizer.load(long_base).eos_id == 1
    server = ServerProcess("--checkpoint", str(long_base), "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"model": "base", "prompt": "def", "max_tokens": 2000, "stream": True, **NO_EOS}
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server.url + "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")  # generation is under way ...
            # ... and the client has gone away: the slot frees long before 2000 tokens.
        deadline = time.monotonic() + 10
        while metric(server.url, "fmforge_running_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server.url, "fmforge_running_sequences") == 0
        assert metric(server.url, "fmforge_cancelled_sequences_total") == 1  # stopped unfinished, not run out
        assert metric(server.url, "fmforge_engine_generated_tokens_total") < 2000

        # One running + one waiting fill it; the third request is refused at once, not queued.
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        streams = [client.completions.create(model="base", prompt="x", max_tokens=1500, stream=True, **NO_EOS)
                   for _ in range(2)]
        first = next(iter(streams[0]))
        assert first.choices[0].text is not None
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="base", prompt="x", max_tokens=5)
        assert time.monotonic() - started < 5
        for stream in streams:
            stream.close()
        assert metric(server.url, 'fmforge_rejected_requests_total') == 1
        deadline = time.monotonic() + 10
        while (metric(server.url, "fmforge_running_sequences") or metric(server.url, "fmforge_queue_depth")) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.completions.create(model="base", prompt="x", max_tokens=3, **NO_EOS).usage.completion_tokens == 3
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_drains_in_flight_streams(long_base):
    server = ServerProcess("--checkpoint", str(long_base))
    body = {"model": "base", "prompt": "def", "max_tokens": 1500, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}, **NO_EOS}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines)]
            server.process.send_signal(SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.ConnectError):  # draining: no new connections ...
                httpx.get(server.url + "/health")
            received = [line for line in received + list(lines) if line]  # events are separated by blank lines
    events = [json.loads(line[6:]) for line in received if line.startswith("data: {")]
    assert received[-1] == "data: [DONE]"
    assert events[-1]["usage"]["completion_tokens"] == 1500  # ... but the reply in flight is finished whole
    assert server.process.wait(30) == 0, server.output()


# ---- the chat page in a real browser -----------------------------------------------------------------------------

def test_chat_page_streams_a_reply(server, browser):
    context = browser.new_context(http_credentials={"username": "user", "password": KEY})
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#model option[value='spec-a']", state="attached")
    page.select_option("#model", "spec-a")
    page.fill("#max_tokens", "24")
    page.fill("#input", "hello there")
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant .meta", timeout=60_000)
    user = page.locator(".message.user").all_inner_texts()
    reply = page.locator(".message.assistant").first.inner_text()
    meta = page.locator(".message.assistant .meta").inner_text()
    assert user == ["hello there"]
    assert "model: spec-a" in meta and re.search(r"\d+ tokens", meta)
    assert len(reply.replace(meta, "").strip()) > 0
    # The conversation stays in the page: a second turn sends both.
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant .meta').length == 2",
                           timeout=60_000)
    assert page.locator(".message.user").all_inner_texts() == ["hello there", "and again"]
    # Past the 64-token context the page leaves the oldest turns out of the request, and says so.
    for turn in range(3, 6):
        page.fill("#input", f"turn number {turn}, a somewhat longer message than before")
        page.press("#input", "Enter")
        page.wait_for_function(f"document.querySelectorAll('.message.assistant .meta').length == {turn}",
                               timeout=60_000)
    assert "left out" in page.locator(".message.assistant .meta").last.inner_text()
    assert page.locator(".message.error").count() == 0


def test_engine_events_reach_the_event_loop_in_order_with_one_wake_up_per_burst():
    """The engine's thread posts a token event per stream per step; the loop is woken once for all that came since
    it last looked, and every queue gets its events in the order they were posted. A closed loop refuses (the engine
    then cancels the sequence) every time, not only the first."""
    import asyncio

    from fmforge.serve.serving import _Inbox

    loop = asyncio.new_event_loop()

    def spin():  # let the loop look once, from a thread of its own (this one may have a loop running)
        looker = threading.Thread(target=lambda: loop.run_until_complete(asyncio.sleep(0)))
        looker.start()
        looker.join()

    wakes = []
    post = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (wakes.append(1), post(*args))
    mail = _Inbox(loop)
    queues = [asyncio.Queue() for _ in range(3)]
    engine = threading.Thread(target=lambda: [mail.put(queues[i % 3], i) for i in range(300)])
    engine.start()
    engine.join()
    assert len(wakes) == 1  # the loop did not run in between: one wake-up for the whole burst
    spin()
    assert [[q.get_nowait() for _ in range(q.qsize())] for q in queues] == [list(range(i, 300, 3)) for i in range(3)]
    mail.put(queues[0], "next")  # the loop looked: the next event wakes it again
    assert len(wakes) == 2
    spin()
    loop.close()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            mail.put(queues[0], "after close")


def test_the_servers_stream_interval_holds_tokens_that_follow_a_flush(base):
    """create_app's stream_interval (serve --stream-interval) is the wake interval of the loop's inbox: a stream's
    first token is written at once, the tokens decoded right after it wait for the interval, then come together."""
    from fmforge.checkpoint import load_model_and_tokenizer
    from fmforge.infer.engine import Engine
    from fmforge.serve.api import create_app
    from fmforge.serve.serving import _INBOXES

    model, tokenizer, _ = load_model_and_tokenizer(base)
    app = create_app(Engine(model, tokenizer, max_batch=2), stream_interval=0.4)
    with app_server(app) as (url, _):
        arrivals = []
        body = {"model": "base", "prompt": "def", "max_tokens": 6, "temperature": 0, "stream": True,
                "logit_bias": {str(tokenizer.eos_id): -100}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                    arrivals.append(time.monotonic())
        assert len(arrivals) == 6
        assert arrivals[-1] - arrivals[0] >= 0.35  # six tiny steps take milliseconds: the rest waited for the interval
        assert [mail.interval for mail in _INBOXES.values() if mail.loop is not None and not mail.loop.is_closed()] \
            == [0.4]


def test_engine_events_wait_for_the_wake_interval_then_arrive_together():
    """The loop takes events at most every `interval`: a post soon after a flush is delivered when the interval has
    passed, together with everything posted meanwhile (the streams then write several tokens at once)."""
    import asyncio

    from fmforge.serve.serving import _Inbox

    loop = asyncio.new_event_loop()
    mail = _Inbox(loop, interval=0.2)
    queue = asyncio.Queue()

    def run(seconds: float):  # the loop runs for `seconds`, from a thread of its own
        looker = threading.Thread(target=lambda: loop.run_until_complete(asyncio.sleep(seconds)))
        looker.start()
        looker.join()

    mail.put(queue, 0)
    run(0)
    assert queue.qsize() == 1  # the first flush is immediate
    mail.put(queue, 1)
    mail.put(queue, 2)
    run(0.05)
    assert queue.qsize() == 1  # within the interval: held
    run(0.3)
    assert [queue.get_nowait() for _ in range(3)] == [0, 1, 2]
    loop.close()
