"""One generation path: `fmforge generate` and the server's /v1/completions run the same engine with the same
sampler, so for a fixed seed and the same settings they return the same text, token for token."""

from __future__ import annotations

import httpx
import pytest

from conftest import ServerProcess, run_cli

PROMPT = "def "
CASES = {
    "greedy": dict(temperature=0.0),
    "seeded sampling": dict(temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1,
                            presence_penalty=0.3, frequency_penalty=0.2, seed=7),
}
FLAGS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
         "repetition_penalty": "--repetition-penalty", "presence_penalty": "--presence-penalty",
         "frequency_penalty": "--frequency-penalty", "seed": "--seed"}


@pytest.fixture(scope="module")
def server(checkpoint):
    process = ServerProcess("--checkpoint", str(checkpoint))
    yield process
    assert process.stop() == 0, process.output()


@pytest.mark.parametrize("case", list(CASES))
def test_cli_and_server_generate_the_same_text(checkpoint, server, case):
    settings = CASES[case]
    flags = [part for name, value in settings.items() for part in (FLAGS[name], str(value))]
    # One thread on both sides (ServerProcess runs the server with OMP_NUM_THREADS=1): the same arithmetic.
    cli = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens", "40",
                  *flags, env={"OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(PROMPT) and cli.stdout.endswith("\n")
    cli_text = cli.stdout[len(PROMPT):-1]
    reply = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "base", "prompt": PROMPT, "max_tokens": 40, **settings}).json()
    server_text = reply["choices"][0]["text"]
    assert cli_text == server_text
    assert reply["usage"]["completion_tokens"] > 5  # a real continuation, not an empty agreement
    if case == "seeded sampling":  # and the seed matters: another seed gives another text on both sides
        other = httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"model": "base", "prompt": PROMPT, "max_tokens": 40, **settings, "seed": 8}).json()
        assert other["choices"][0]["text"] != server_text


def test_generate_with_an_adapter_equals_the_server_serving_it(checkpoint, tmp_path):
    """`fmforge generate --adapter` applies the specialist as the server's per-row LoRA does."""
    from fmforge.checkpoint import resolve_checkpoint

    from conftest import make_adapter

    base = resolve_checkpoint(checkpoint)
    adapter = make_adapter(base, tmp_path / "spec", 3, ["q_proj", "v_proj", "embed_tokens"], 4)
    flags = ["--temperature", "0", "--max-new-tokens", "30"]
    plain = run_cli("generate", "--checkpoint", str(checkpoint), "--prompt", PROMPT, *flags,
                    env={"OMP_NUM_THREADS": "1"})
    adapted = run_cli("generate", "--checkpoint", str(checkpoint), "--adapter", str(adapter), "--prompt", PROMPT,
                      *flags, env={"OMP_NUM_THREADS": "1"})
    assert plain.returncode == 0 and adapted.returncode == 0, plain.stderr + adapted.stderr
    process = ServerProcess("--checkpoint", str(base), "--adapter", f"spec={adapter}")
    try:
        reply = httpx.post(process.url + "/v1/completions", timeout=60,
                           json={"model": "spec", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}).json()
    finally:
        assert process.stop() == 0, process.output()
    assert adapted.stdout[len(PROMPT):-1] == reply["choices"][0]["text"]
    assert adapted.stdout != plain.stdout  # the adapter changes what is generated
