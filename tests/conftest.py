"""Shared fixtures: a tiny corpus from the Python standard library, prepared once per test session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

# Keep runs reproducible and light on the 2-core CI machine: 2 threads, or 1 in each of pytest-xdist's workers
# (`-n 2`), whose processes would otherwise fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A fixed handful of stdlib modules: real code, comments and docstrings, on every machine.
CORPUS_MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "bisect.py", "heapq.py",
                  "shlex.py", "fnmatch.py", "glob.py", "colorsys.py", "keyword.py", "queue.py", "sched.py",
                  "calendar.py", "difflib.py", "dataclasses.py", "functools.py", "contextlib.py"]


def report(kind: str, **detail) -> None:
    """Append one observation (a request and its status, a kill trial, a property example) as a JSON line to the
    file FMFORGE_RELIABILITY_REPORT names, with the test it happened in; nothing when the variable is unset.
    benchmarks/reliability.py sets it and turns the lines into the numbers of its RESULTS.md section."""
    path = os.environ.get("FMFORGE_RELIABILITY_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # "tests/x.py::test_y[p] (call)"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "test": test, **detail}) + "\n")


def run_cli(*args: str, timeout: float = 300, env: dict | None = None,
            input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m fmforge.cli ARGS` in a subprocess, as a user would from a shell."""
    return subprocess.run([sys.executable, "-m", "fmforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO, input=input_text)


def no_stop(tokenizer) -> dict[str, int]:
    """A chat request's logit_bias that keeps a tiny base from ending its turn at once (what it says first
    depends on its few training steps)."""
    return {str(i): -100 for i in tokenizer.chat_stop_ids()}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """A directory of ~18 stdlib modules copied as text files."""
    out = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_MODULES:
        source = STDLIB / name
        (out / name.replace("/", "_")).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> Path:
    """Token shards + tokenizer (vocab 512) for the tiny corpus, made with the CLI."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", str(corpus_dir), "--vocab-size", "512", "--out", str(out), "--val-fraction", "0.15",
                 "--workers", "1"]) == 0
    return out


def tiny_overrides(data_dir: Path, out_dir: Path, **extra) -> list[str]:
    """CLI overrides for a tiny, fast pretraining run."""
    values = dict(preset="tiny", n_layer=2, n_embd=64, n_head=4, n_kv_head=2, context_length=64,
                  data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, max_steps=20, warmup_steps=5,
                  lr=3e-3, eval_interval=10, eval_tokens=2048, checkpoint_interval=10, log_interval=5,
                  precision="fp32")
    values.update(extra)
    args = []
    for key, value in values.items():
        section = "model" if key in {"preset", "n_layer", "n_embd", "n_head", "n_kv_head", "context_length",
                                     "n_experts", "vocab_size"} else "train"
        args += [f"--{section}.{key}", str(value)]
    return args


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, prepared) -> Path:
    """A run directory holding a tiny model pretrained for 30 steps."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=30, lr=1e-2, eval_interval=30,
                                             checkpoint_interval=30)]) == 0
    return out


@pytest.fixture(scope="session")
def mlm_encoder(prepared, tmp_path_factory) -> Path:
    """A run directory holding a tiny encoder pretrained with masked-language modelling for 10 steps."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("encoder")
    assert main(["pretrain", *tiny_overrides(prepared, out, max_steps=10, eval_interval=10),
                 "--model.objective", "mlm"]) == 0
    return out


def write_tiny_checkpoint(directory: Path, tokenizer, **shape):
    """A seeded random 2-layer model (3 ids beyond the tokenizer's, init_std 0.1 so that logits differ clearly)
    saved with `tokenizer` as DIRECTORY/ckpt; returns the model."""
    import torch

    from fmforge.checkpoint import write_checkpoint
    from fmforge.config import ModelConfig
    from fmforge.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size + 3, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                         context_length=64, init_std=0.1, **shape)
    model = Transformer(config).eval()
    tokenizer.save(directory / "tok")
    write_checkpoint(directory / "ckpt", model, directory / "tok")
    return model


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through playwright (the chat page's tests); skipped where it is not installed, unless
    FMFORGE_REQUIRE_BROWSER says it must be there."""
    if CHROMIUM is None:
        message = "Debian chromium is not installed (scripts/setup.sh installs it when run as root with apt)"
        if os.environ.get("FMFORGE_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def app_server(app, timeout: float = 30):
    """An ASGI app (serve.api.create_app) served by uvicorn on a free port of 127.0.0.1 in a thread of this process;
    yields (url, the uvicorn.Server), and stops it on the way out."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(30)


class ServerProcess:
    """`fmforge serve ...` in a subprocess on a free port of 127.0.0.1, as a user starts it."""

    def __init__(self, *args: str, timeout: float = 90, entry: tuple[str, ...] = ("-m", "fmforge.cli")):
        import socket
        import tempfile
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        # `entry`: what runs `fmforge serve` (a test may give a script that wraps fmforge.cli.main)
        self.process = subprocess.Popen([sys.executable, *entry, "serve", "--port", str(self.port),
                                         "--log-level", "warning", *args], cwd=REPO, stdout=self.log,
                                        stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def make_adapter(base: Path, out: Path, seed: int, targets: list[str], rank: int) -> Path:
    """A LoRA adapter for checkpoint `base` with random, clearly non-zero weights (so it changes the output)."""
    import torch

    from fmforge.adapt.lora import LoRAConfig, inject_lora, write_adapter
    from fmforge.checkpoint import fingerprint_checkpoint
    from fmforge.checkpoint import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(base)
    config = LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules=targets)
    inject_lora(model, config)
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.3
    write_adapter(out, model, config, base, fingerprint_checkpoint(base), {"task": "completion"})
    return out


@pytest.fixture(scope="session")
def long_base(prepared, tmp_path_factory) -> Path:
    """An untrained model with a 2048-token context: long generations for disconnect/drain/queue tests."""
    import torch

    from fmforge.checkpoint import write_checkpoint
    from fmforge.config import ModelConfig
    from fmforge.model import Transformer
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(prepared)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_embd=64, n_head=4, n_kv_head=2,
                                    context_length=2048))
    return write_checkpoint(tmp_path_factory.mktemp("long") / "model", model, prepared)


# ---- vision: a tiny multimodal base, made with the CLI as a user makes one -------------------------------------

@pytest.fixture(scope="session")
def media_tokenizer(tmp_path_factory, prepared) -> Path:
    """The tiny corpus's text tokenizer extended by an image tokenizer (FSQ levels 5,5,5: 125 codes) trained for
    a few steps on MNIST and shape-scene crops."""
    from fmforge.cli import main

    out = tmp_path_factory.mktemp("media-tokenizer") / "tokenizer"
    assert main(["tokenizer", "train", "--modality", "image", "mnist", "shapes", "--limit", "200", "--steps", "300", "--lr", "0.005",
                 "--width", "16", "--levels", "5,5,5", "--tokenizer", str(prepared), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def multimodal_base(tmp_path_factory, prepared, media_tokenizer) -> Path:
    """A run directory: a tiny model pretrained 40 steps on a mixture of stdlib text and MNIST/shapes
    caption <-> image documents (context 352: a 12x12 scene, an instruction and the edited scene fit)."""
    from fmforge.cli import main

    root = tmp_path_factory.mktemp("multimodal")
    text, images = root / "text", root / "images"
    assert main(["prepare", str(STDLIB / "json"), "--tokenizer", str(media_tokenizer), "--out", str(text),
                 "--workers", "1", "--val-fraction", "0.2"]) == 0
    assert main(["prepare", "image:mnist", "image:shapes", "--image-limit", "60", "--tokenizer",
                 str(media_tokenizer), "--out", str(images)]) == 0
    out = root / "run"
    assert main(["pretrain", *tiny_overrides(text, out, max_steps=40, lr=1e-2, eval_interval=40,
                                             checkpoint_interval=40, context_length=352),
                 "--train.mixture", f"{{{text}: 1, {images}: 2}}"]) == 0
    return out


# ---- audio: the tiny multimodal base with speech too ------------------------------------------------------------

@pytest.fixture(scope="session")
def speech_tokenizer(tmp_path_factory, media_tokenizer) -> Path:
    """The vision media tokenizer (text + image codes) extended by an audio tokenizer (FSQ levels 5,5,5: 125
    codes) trained for a few steps on synthetic spoken digits (espeak, through the espeakng-loader wheel)."""
    from fmforge.cli import main

    pytest.importorskip("espeakng_loader", reason="synthetic speech needs espeakng-loader (the dev extras)")
    out = tmp_path_factory.mktemp("speech-tokenizer") / "tokenizer"
    assert main(["tokenizer", "train", "--modality", "audio", "espeak:digits:300", "--steps", "150", "--lr", "0.005",
                 "--width", "32", "--levels", "5,5,5", "--tokenizer", str(media_tokenizer), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def speech_base(tmp_path_factory, prepared, speech_tokenizer) -> Path:
    """A run directory: a tiny model pretrained 40 steps on stdlib text, MNIST caption <-> image and spoken digit
    transcript <-> speech documents (context 352)."""
    from fmforge.cli import main

    root = tmp_path_factory.mktemp("speech")
    text, images, audio = root / "text", root / "images", root / "audio"
    assert main(["prepare", str(STDLIB / "json"), "--tokenizer", str(speech_tokenizer), "--out", str(text),
                 "--workers", "1", "--val-fraction", "0.2"]) == 0
    assert main(["prepare", "image:mnist", "--image-limit", "60", "--tokenizer", str(speech_tokenizer),
                 "--out", str(images)]) == 0
    assert main(["prepare", "audio:espeak:digits:300", "--tokenizer", str(speech_tokenizer), "--out", str(audio)]) == 0
    out = root / "run"
    assert main(["pretrain", *tiny_overrides(text, out, max_steps=40, lr=1e-2, eval_interval=40,
                                             checkpoint_interval=40, context_length=352),
                 "--train.mixture", f"{{{text}: 1, {images}: 1, {audio}: 2}}"]) == 0
    return out


# The slowest modules start first, then the rest by their number of tests (most first): pytest-xdist (scripts/test.sh,
# which turns off xdist's own reordering by test count) hands out modules in this order, and a slow module begun last
# would leave one worker running it alone at the end.
SLOWEST_MODULES = ("tests/test_quickstart_multimodal.py", "tests/test_quickstart.py", "tests/test_vision.py",
                   "tests/test_train.py", "tests/test_speech.py", "tests/test_lm_eval.py", "tests/test_serve_audio.py",
                   "tests/test_chat_page_audio.py")  # measured: `scripts/test.sh --durations=40`


def pytest_collection_modifyitems(config, items):
    modules = [item.nodeid.split("::")[0] for item in items]
    count = {module: modules.count(module) for module in set(modules)}

    def rank(module: str) -> tuple[int, int]:
        first = SLOWEST_MODULES.index(module) if module in SLOWEST_MODULES else len(SLOWEST_MODULES)
        return first, -count[module]

    order = {id(item): rank(module) for item, module in zip(items, modules)}
    items.sort(key=lambda item: order[id(item)])  # stable: each module's tests keep their order
