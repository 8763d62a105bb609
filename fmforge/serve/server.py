"""Start the server: load the base and adapters, start the engine, run uvicorn until SIGTERM/SIGINT.

Both signals drain: uvicorn stops accepting connections and lets requests in flight (streams included) go on for
`drain_timeout` seconds; then the remaining ones end (a stream with an error event and [DONE], another request
with 503), the app's shutdown stops the engine, and the process exits 0. If the engine's loop dies, the server
shuts down the same way and exits non-zero, so that a process manager restarts it.

Connections: a request head must arrive within `header_timeout` seconds and its body within `body_timeout`
(else 408), an idle kept-alive connection closes after 5 s (uvicorn's default), more than `max_connections` open
connections get 503, and a log message repeated many times is written only a few times a minute.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field


from ..data.audio import MAX_AUDIO_BYTES, MAX_AUDIO_SECONDS
from ..errors import CheckpointError, ConfigError, ServingError


@dataclass
class ServeOptions:
    checkpoint: str
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, directory)
    model_name: str = "base"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 16
    max_queue: int = 64
    max_context: int | None = None
    max_body_bytes: int = 4 << 20
    speculate: int = 4
    compile: bool = False  # decode steps compiled (infer/compiled.py)
    prefill_chunk: int | None = None  # prompt tokens per prefill forward while others decode (0 = whole prompts;
    # None = 32 on a CPU, 512 on a GPU: infer.engine.default_prefill_chunk)
    log_level: str = "info"
    header_timeout: float = 10.0  # seconds for a request head to arrive whole (slow clients are cut off: 408)
    body_timeout: float = 60.0  # seconds from the head to the body's last byte (408)
    max_connections: int = 512  # open connections; a request beyond them gets 503
    drain_timeout: float = 30.0  # seconds requests in flight may go on after SIGTERM
    max_image_bytes: int = 4 << 20  # one image's encoded bytes (a chat image_url part); more is a 400
    max_image_pixels: int = 4096 * 4096  # one image's width x height, read from its header before decoding
    max_images: int = 8  # images in one chat request
    max_audio_bytes: int = MAX_AUDIO_BYTES  # one clip's encoded bytes (chat input_audio, transcription upload)
    max_audio_seconds: float = MAX_AUDIO_SECONDS  # one clip's duration, read from its header before decoding
    max_audios: int = 8  # audio clips in one chat request
    stream_interval: float = 20.0  # ms: the event loop takes the engine's tokens at most this often (serving.py)


def parse_adapter_option(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter takes NAME=DIR, got {value!r}")
    return name, path


def describe_kv_cache(engine) -> str:
    """One line: the KV cache's bytes per token and what it holds per sequence and in all, and the prefill chunk."""
    cache, config = engine.cache, engine.model.config
    dtype = str(engine.dtype).removeprefix("torch.")
    per_sequence = cache.bytes_per_token * cache.capacity
    held = (f"at most {_size(per_sequence)} per sequence (sliding window {cache.window} + {engine.speculate} "
            f"drafted: {cache.capacity} positions, however long it runs)" if cache.window is not None else
            f"{_size(per_sequence)} per sequence of {cache.capacity} tokens")
    chunk = f"prefill in chunks of {engine.prefill_chunk} tokens" if engine.prefill_chunk else "prefill unchunked"
    return (f"KV cache {_size(cache.bytes_per_token)} per token (2 x {config.n_layer} layers x {config.n_kv_head} KV "
            f"heads x {config.head_dim} x {dtype}), {held}, {_size(per_sequence * cache.slots)} for {cache.slots} "
            f"slots; {chunk}")


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def build_engine(options: ServeOptions):
    """(engine, base info) — every check a user can trip happens here, before the port is opened."""
    from ..adapt.media import read_media_encoders
    from ..checkpoint import HEAD_FILE, load_model_and_tokenizer
    from ..infer.engine import Engine
    from ..infer.lora import read_adapter

    names = [options.model_name] + [name for name, _ in options.adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model names must be unique; {duplicates[0]!r} is given twice")
    if (options.max_batch < 1 or options.max_queue < 0 or options.speculate < 0
            or (options.prefill_chunk is not None and options.prefill_chunk < 0)):
        raise ConfigError("--max-batch must be at least 1, --max-queue, --speculate and --prefill-chunk at least 0")
    if not (options.header_timeout > 0 and options.body_timeout > 0 and options.drain_timeout >= 0
            and options.max_connections >= 1):
        raise ConfigError("--header-timeout and --body-timeout must be > 0, --drain-timeout >= 0, "
                          "--max-connections at least 1")
    if options.max_image_bytes < 1 or options.max_image_pixels < 1 or options.max_images < 0:
        raise ConfigError("--max-image-bytes and --max-image-pixels must be at least 1, --max-images at least 0")
    if options.max_audio_bytes < 1 or not options.max_audio_seconds > 0 or options.max_audios < 0:
        raise ConfigError("--max-audio-bytes must be at least 1, --max-audio-seconds > 0, --max-audios at least 0")
    if not 0 <= options.stream_interval <= 1000:
        raise ConfigError("--stream-interval must be between 0 and 1000 ms")
    from ..device import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    model, tokenizer, checkpoint = load_model_and_tokenizer(options.checkpoint, device)
    if (checkpoint / HEAD_FILE).exists():
        raise CheckpointError(f"{checkpoint} is a classifier (it has {HEAD_FILE}); serve a generative model")
    model.to(dtype)
    model.media_encoders = read_media_encoders(checkpoint)  # a full fine-tune's understanding encoders, if any
    adapters = [read_adapter(name, path, checkpoint) for name, path in options.adapters]
    engine = Engine(model, tokenizer, adapters, max_batch=options.max_batch, max_queue=options.max_queue,
                    max_context=options.max_context, speculate=options.speculate,
                    prefill_chunk=options.prefill_chunk, compile=options.compile)
    info = {"checkpoint": str(checkpoint), "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    return engine, info


def serve(options: ServeOptions) -> None:
    import uvicorn

    from .api import create_app
    from .connections import RepeatFilter, limit_repeated_logs, protocol_class
    from .serving import AudioLimits, ImageLimits

    started = time.perf_counter()
    engine, info = build_engine(options)
    server: uvicorn.Server | None = None

    def on_engine_death() -> None:
        print(f"fmforge serve: the engine stopped ({engine.error!r}); shutting down", file=sys.stderr, flush=True)
        server.should_exit = True

    app = create_app(engine, options.model_name, [name for name, _ in options.adapters], api_key=options.api_key,
                     max_body_bytes=options.max_body_bytes, body_timeout=options.body_timeout, base_info=info,
                     on_engine_death=on_engine_death,
                     image_limits=ImageLimits(options.max_image_bytes, options.max_image_pixels, options.max_images),
                     audio_limits=AudioLimits(options.max_audio_bytes, options.max_audio_seconds, options.max_audios),
                     stream_interval=options.stream_interval / 1000)
    serving, metrics = app.app.state.serving, app.metrics
    models = ", ".join([options.model_name] + [name for name, _ in options.adapters])
    print(f"fmforge serve: {info['checkpoint']} on {info['device']} ({info['dtype']}), models: {models}; "
          f"{engine.max_batch} slots x {engine.max_context} tokens; loaded in {time.perf_counter() - started:.1f}s",
          file=sys.stderr, flush=True)
    print(f"fmforge serve: {describe_kv_cache(engine)}", file=sys.stderr, flush=True)
    print(f"chat page: http://{options.host}:{options.port}/   API: http://{options.host}:{options.port}/v1",
          file=sys.stderr, flush=True)

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            serving.start_draining(options.drain_timeout)  # requests in flight end at the deadline
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.log_level,
        access_log=options.log_level == "debug", lifespan="on",
        http=protocol_class(options.header_timeout, options.max_connections, metrics.refused.inc),
        # a backstop: requests still running a little after the drain deadline are cancelled
        timeout_graceful_shutdown=math.ceil(options.drain_timeout) + 5)
    limit_repeated_logs(RepeatFilter())
    server = DrainingServer(config)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a no-op one here, so
    # a drained server exits 0 instead of dying of the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if engine.error is not None:  # exit non-zero, so that a process manager restarts the server
        raise ServingError(f"the engine stopped: {engine.error!r}")
    if getattr(server, "started", True) is False:
        raise ConfigError(f"could not listen on {options.host}:{options.port} (in use?)")
