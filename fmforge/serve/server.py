"""Start the server: load the base and adapters, start the engine, run uvicorn until SIGTERM/SIGINT.

uvicorn handles both signals gracefully: it stops accepting connections, lets in-flight requests (streams
included) finish, then runs the app's shutdown, which stops the engine.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field


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
    log_level: str = "info"


def parse_adapter_option(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter takes NAME=DIR, got {value!r}")
    return name, path


def build_engine(options: ServeOptions):
    """(engine, base info) — every check a user can trip happens here, before the port is opened."""
    from ..checkpoint import HEAD_FILE, load_model_and_tokenizer
    from ..infer.engine import Engine
    from ..infer.lora import read_adapter

    names = [options.model_name] + [name for name, _ in options.adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"model names must be unique; {duplicates[0]!r} is given twice")
    if options.max_batch < 1 or options.max_queue < 0 or options.speculate < 0:
        raise ConfigError("--max-batch must be at least 1, --max-queue and --speculate at least 0")
    from ..device import resolve_device, resolve_dtype

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    model, tokenizer, checkpoint = load_model_and_tokenizer(options.checkpoint, device)
    if (checkpoint / HEAD_FILE).exists():
        raise CheckpointError(f"{checkpoint} is a classifier (it has {HEAD_FILE}); serve a generative model")
    model.to(dtype)
    adapters = [read_adapter(name, path, checkpoint) for name, path in options.adapters]
    engine = Engine(model, tokenizer, adapters, max_batch=options.max_batch, max_queue=options.max_queue,
                    max_context=options.max_context, speculate=options.speculate)
    info = {"checkpoint": str(checkpoint), "device": str(device), "dtype": str(dtype).replace("torch.", "")}
    return engine, info


def serve(options: ServeOptions) -> None:
    import uvicorn

    from .api import create_app

    started = time.perf_counter()
    engine, info = build_engine(options)
    server: uvicorn.Server | None = None

    def on_engine_death() -> None:
        print(f"fmforge serve: the engine stopped ({engine.error!r}); shutting down", file=sys.stderr, flush=True)
        server.should_exit = True

    app = create_app(engine, options.model_name, [name for name, _ in options.adapters], api_key=options.api_key,
                     max_body_bytes=options.max_body_bytes, base_info=info, on_engine_death=on_engine_death)
    models = ", ".join([options.model_name] + [name for name, _ in options.adapters])
    print(f"fmforge serve: {info['checkpoint']} on {info['device']} ({info['dtype']}), models: {models}; "
          f"{engine.max_batch} slots x {engine.max_context} tokens; loaded in {time.perf_counter() - started:.1f}s",
          file=sys.stderr, flush=True)
    print(f"chat page: http://{options.host}:{options.port}/   API: http://{options.host}:{options.port}/v1",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            access_log=options.log_level == "debug", lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found: a no-op one here, so
    # a drained server exits 0 instead of dying of the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if engine.error is not None:  # exit non-zero, so that a process manager restarts the server
        raise ServingError(f"the engine stopped: {engine.error!r}")
    if getattr(server, "started", True) is False:
        raise ConfigError(f"could not listen on {options.host}:{options.port} (in use?)")
