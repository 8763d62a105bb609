"""One checkpoint, every skill (issue 14): `fmforge quickstart --multimodal` end to end, timed, then every skill of
the one base + its LoRA specialists asked through ONE `fmforge serve` with the official openai client, and scored
by judges that are not the model under test.

    python benchmarks/multimodal.py --fsdd ../shared/data/fsdd            # the full run (~35 min on 2 CPUs)
    python benchmarks/multimodal.py --fsdd ../shared/data/fsdd --quick    # the whole pipeline, tiny budgets

Stages (each cached in --work, so an interrupted run resumes where it stopped):
 1. the quickstart, as a user runs it: `fmforge quickstart --multimodal` in its own process (stdlib BPE, the FSQ
    image and audio tokenizers, one base pretrained on code + caption<->image + transcript<->speech, a LoRA per
    skill, its scorecard). Its wall time is the issue's "<= 20 minutes on 2 CPU cores".
 2. the text-only twin: the same shape and tokenizer pretrained on the stdlib shards alone for the text windows the
    multimodal base saw (a third of its steps: the mixture is 1:1:1); both scored on the stdlib val split.
 3. judges, trained here: a CNN on real MNIST (it reads the digits the model draws) and a CNN on log-mel (FSDD
    train + espeak digits train; it hears the digits the model says) -- benchmarks/vision.py's and audio.py's.
 4. one server: `fmforge serve --checkpoint BASE --adapter chat=... --adapter recognise=...` (all six), asked
    through the openai client: code (completions), chat, recognise (image_url parts), draw (images API), transcribe
    (audio transcriptions API, held-out espeak voices, WER with jiwer), speak (audio speech API; the digit judge and
    the transcription specialist listen), say (an MNIST image in, message.audio out; the digit judge listens).
Results go to RESULTS.md (section "multimodal").
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from _common import REPO, describe_machine, git_state, write_section, cached_json, stage

SKILLS = ("chat", "recognise", "draw", "transcribe", "speak", "say")  # the quickstart's adapters
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---- 1. the quickstart ---------------------------------------------------------------------------------------------

def run_quickstart(out: Path, quick: bool, threads: int) -> dict:
    """`fmforge quickstart --multimodal` in a process of its own, its output teed to out/quickstart.log; the wall
    time and the scorecard rows it printed."""
    budget = ["--max-steps", "30", "--specialist-steps", "10", "--media-limit", "200", "--codec-steps", "60",
              "--eval-limit", "10", "--vocab-size", "1024"] if quick else []
    command = [sys.executable, "-m", "fmforge.cli", "quickstart", "--multimodal", "--out", str(out), *budget]
    print("$ fmforge " + " ".join(command[3:]), flush=True)
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    log = out.parent / "quickstart.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=environment, cwd=REPO)
        for line in process.stdout:
            sink.write(line)
            if line.startswith(("==", "done", "stdlib val", "step ")) and "eval step" not in line:
                print("  " + line.rstrip()[:150], flush=True)
        if process.wait() != 0:
            raise SystemExit(f"the quickstart failed ({process.returncode}); see {log}")
    minutes = (time.perf_counter() - started) / 60
    return {"minutes": minutes, "scorecard": scorecard(log.read_text()),
            "command": "fmforge " + " ".join(command[3:])}


def scorecard(text: str) -> list[list[str]]:
    """The scorecard rows the quickstart printed: skill, task, metric, base, specialist."""
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("skill ") and "specialist" in line:
            started = True
            continue
        if started:
            if not line.strip() or line.startswith("("):
                break
            parts = re.split(r"\s{2,}", line.strip())
            rows.append(parts)
    return rows


def steps_of(model_dir: Path) -> int:
    from fmforge.checkpoint import resolve_checkpoint
    state = resolve_checkpoint(model_dir) / "train_state" / "state.json"
    return json.loads(state.read_text())["step"]


def bits_per_byte(checkpoint: Path, data: Path) -> float:
    from fmforge.adapt.specialist import load_specialist
    from fmforge.eval.tasks import evaluate_perplexity
    model, _, _, _ = load_specialist(str(checkpoint))
    return evaluate_perplexity(model, data)["bits_per_byte"]


# ---- 4. one server, every skill ------------------------------------------------------------------------------------

def start_server(base: Path, specialists: Path, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "fmforge.cli", "serve", "--checkpoint", str(base), "--port", str(port),
               "--log-level", "warning"]
    for name in SKILLS:
        command += ["--adapter", f"{name}={specialists / name}"]
    process = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process, port, "fmforge " + " ".join(command[3:])
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"fmforge serve exited ({process.returncode}); see {log}")
            time.sleep(0.3)
    process.kill()
    raise SystemExit("fmforge serve did not become healthy in 3 minutes")


def png_url(image: np.ndarray) -> str:
    from fmforge.data.images import encode_png
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()


def ask_everything(client, judges: dict, count: int, fsdd_rate: int) -> dict:
    """Every skill through the one server; scores by the judges (never the model under test)."""
    from PIL import Image

    from fmforge.data.audio import decode_audio_bytes, encode_wav, load_audio
    from fmforge.data.images import load_images
    from fmforge.eval.speech import word_error_rate

    import audio as audio_bench
    import vision as vision_bench

    results, examples = {"models": sorted(m.id for m in client.models.list().data)}, {}
    started = time.perf_counter()

    code = client.completions.create(model="base", prompt="def ", max_tokens=48, temperature=0)
    examples["code"] = "def " + code.choices[0].text
    chat = client.chat.completions.create(model="chat", max_tokens=64, temperature=0, messages=[
        {"role": "user", "content": "Which module is this from?\n\ndef dirname(p):\n    return split(p)[0]"}])
    examples["chat"] = chat.choices[0].message.content

    test = load_images("mnist", "test", limit=count)
    labels = [int(r["label"]) for r in test.records]
    correct = 0
    for image, label in zip(test.images, labels):
        reply = client.chat.completions.create(model="recognise", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(image)}},
                                         {"type": "text", "text": "What is in this image?"}]}])
        correct += reply.choices[0].message.content.strip() == str(label)
    results["recognise_accuracy"] = correct / len(labels)

    per_digit = max(1, count // 10)
    drawn, wanted = [], []
    for digit in range(10):
        response = client.images.generate(model="draw", prompt=f"a handwritten digit {digit}", size="28x28",
                                          n=per_digit, response_format="b64_json", extra_body={"seed": digit})
        for item in response.data:
            drawn.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(item.b64_json))).convert("RGB")))
            wanted.append(digit)
    results["draw_judge_accuracy"] = vision_bench.judge_accuracy(judges["image"], np.stack(drawn), wanted)
    results["draw_images"] = len(drawn)

    heard = load_audio("espeak:numbers", "test", count)  # held-out voices
    hypotheses = []
    for wave in heard.waves:
        hypotheses.append(client.audio.transcriptions.create(
            model="transcribe", file=("clip.wav", encode_wav(wave, 16000), "audio/wav")).text)
    references = [r["text"] for r in heard.records]
    results["transcribe_wer"] = word_error_rate(references, hypotheses)
    results["transcribe_exact"] = float(np.mean([h.strip() == r for h, r in zip(hypotheses, references)]))
    examples["transcribe"] = list(zip(references[:3], hypotheses[:3]))

    spoken, said = [], []
    for digit in range(10):
        for take in range(per_digit):
            response = client.audio.speech.create(model="speak", voice="alloy", input=DIGIT_WORDS[digit],
                                                  response_format="wav", extra_body={"seed": take})
            spoken.append(decode_audio_bytes(response.content, 16000))
            said.append(digit)
    heard_digits = audio_bench.read_digits(judges["audio"], spoken)
    results["speak_judge_accuracy"] = float(np.mean(heard_digits == np.array(said)))
    agreed = []
    for wave, digit in zip(spoken, said):
        text = client.audio.transcriptions.create(
            model="transcribe", file=("speech.wav", encode_wav(wave, 16000), "audio/wav")).text
        agreed.append(text.strip() == DIGIT_WORDS[digit])
    results["speak_transcriber_agrees"] = float(np.mean(agreed))

    voiced, shown, written = [], [], []
    for image, label in zip(test.images[:count], labels[:count]):
        reply = client.chat.completions.create(
            model="say", max_tokens=160, temperature=0, modalities=["text", "audio"],
            audio={"voice": "alloy", "format": "wav"}, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_url(image)}},
                {"type": "text", "text": "Say what the image shows."}]}]).choices[0].message
        written.append((reply.content or "").strip() == DIGIT_WORDS[label])
        if reply.audio is not None:
            voiced.append(decode_audio_bytes(base64.b64decode(reply.audio.data), 16000))
            shown.append(label)
    results["say_spoke"] = len(voiced) / len(labels)
    results["say_text_accuracy"] = float(np.mean(written))
    results["say_judge_accuracy"] = float(np.sum(audio_bench.read_digits(judges["audio"], voiced) == np.array(shown))
                                          / len(labels)) if voiced else 0.0
    results["seconds"] = time.perf_counter() - started
    results["examples"] = examples
    return results


# ---- the report ----------------------------------------------------------------------------------------------------

def report(quickstart: dict, bpb: dict, judges: dict, served: dict, serve_command: str, count: int, load, args) -> str:
    def met(value, target, higher=True):
        return "yes" if (value >= target if higher else value <= target) else "**no**"

    rows = [
        ("builds end to end", "quickstart --multimodal wall time", f"{quickstart['minutes']:.1f} min", "<= 20 min",
         met(quickstart["minutes"], 20, higher=False)),
        ("writes code", "stdlib val bits/byte (text-only twin)", f"{bpb['multimodal']:.3f} ({bpb['text_only']:.3f})",
         "near the twin", "-"),
        ("sees", "recognise, MNIST test, via chat image_url", f"{served['recognise_accuracy']:.3f}", ">= 0.97",
         met(served["recognise_accuracy"], 0.97)),
        ("draws", "MNIST judge reads the prompted digit (images API)", f"{served['draw_judge_accuracy']:.3f}",
         ">= 0.95", met(served["draw_judge_accuracy"], 0.95)),
        ("hears", "transcribe espeak numbers, held-out voices: WER", f"{served['transcribe_wer']:.3f}", "<= 0.05",
         met(served["transcribe_wer"], 0.05, higher=False)),
        ("speaks", "digit judge hears the asked digit (speech API)", f"{served['speak_judge_accuracy']:.3f}",
         ">= 0.90", met(served["speak_judge_accuracy"], 0.90)),
        ("speaks", "the transcription specialist agrees", f"{served['speak_transcriber_agrees']:.3f}", ">= 0.90",
         met(served["speak_transcriber_agrees"], 0.90)),
        ("sees -> speaks", "MNIST image in, message.audio out: digit judge", f"{served['say_judge_accuracy']:.3f}",
         ">= 0.90", met(served["say_judge_accuracy"], 0.90)),
    ]
    table = ["| skill | measured (one `fmforge serve`, official openai client) | value | target | met |",
             "|---|---|---:|---:|---|"] + [f"| {' | '.join(row)} |" for row in rows]
    card = ["| skill | task | metric | base | specialist |", "|---|---|---|---:|---:|"] + \
        [f"| {' | '.join(row)} |" for row in quickstart["scorecard"]]
    examples = served["examples"]
    return "\n".join([
        "## One checkpoint, every skill (issue 14): `fmforge quickstart --multimodal` served whole",
        "",
        f"`python benchmarks/multimodal.py --fsdd ../shared/data/fsdd{' --quick' if args.quick else ''}` — "
        f"{describe_machine()}; commit {git_state()}; load average at start {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f} (1 / 5 / 15 min).",
        "",
        f"The checkpoint: `{quickstart['command']}`"
        + (" (tiny budgets)" if args.quick else " (its defaults: one 20-minute budget for the whole run, "
           "`--total-minutes 20`: 600 codec steps, then pretraining and each LoRA specialist timed from what is left)")
        + f", {bpb['steps']} pretraining steps on stdlib code + MNIST/shapes caption<->image + espeak "
        "transcript<->speech (1:1:1). Served as one process: "
        f"`{serve_command.split(' --port')[0]} --adapter ...` ({', '.join(served['models'])}). "
        f"{count} test examples per skill (digits: {max(1, count // 10)} per digit); judges trained here: MNIST CNN "
        f"{judges['image']:.3f} on MNIST test, log-mel digit CNN {judges['audio']['fsdd_test']:.3f} on FSDD test / "
        f"{judges['audio']['espeak_digits_test']:.3f} on espeak digits test (held-out voices).",
        "",
        *table,
        "",
        "The quickstart's own scorecard (`fmforge eval` on test splits, base asked in each task's format, untuned):",
        "",
        *card,
        "",
        f"Through the server, code: `{examples['code'][:90]!r}`; chat (\"Which module is this from?\"): "
        f"`{examples['chat'][:90]!r}`; transcribe (reference -> heard): {examples['transcribe']}; say also wrote "
        f"the right digit name in {served['say_text_accuracy']:.2f} of replies and spoke in {served['say_spoke']:.2f}.",
        f"The text-only twin: the same shape and tokenizer on the stdlib shards alone for {bpb['text_steps']} steps "
        "(the text windows the multimodal base saw).",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", required=True, help="the Free Spoken Digit Dataset (for the speech judge)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-multimodal"))
    parser.add_argument("--count", type=int, default=100, help="test examples per skill through the server")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the numbers")
    parser.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    if not (Path(args.fsdd) / "recordings").is_dir():
        parser.error(f"--fsdd {args.fsdd} has no recordings/ folder")
    import torch
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"machine: {describe_machine()} | load average at start {load[0]:.2f}", flush=True)
    work = Path(args.work + ("-quick" if args.quick else "")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    count = 10 if args.quick else args.count
    out = work / "quickstart"

    if stage("1. fmforge quickstart --multimodal", work / "quickstart.json"):
        quickstart = run_quickstart(out, args.quick, args.threads)
        (work / "quickstart.json").write_text(json.dumps(quickstart, indent=2) + "\n")
    quickstart = json.loads((work / "quickstart.json").read_text())
    print(f"  built in {quickstart['minutes']:.1f} min", flush=True)

    steps = steps_of(out / "model")
    text_run = work / "text-only"
    if stage("2. the text-only twin", work / "bpb.json"):
        from fmforge.cli import main as fmforge
        text_steps = max(10, steps // 3)
        assert fmforge(["pretrain", "--config", "quickstart", "--data_dir", str(out / "data-text"), "--max_steps",
                        str(text_steps), "--out_dir", str(text_run), "--resume"]) == 0
        cached_json(work / "bpb.json", lambda: {
            "multimodal": bits_per_byte(out / "model", out / "data-text"),
            "text_only": bits_per_byte(text_run, out / "data-text"), "steps": steps, "text_steps": text_steps})
    bpb = json.loads((work / "bpb.json").read_text())
    print(f"  stdlib val bits/byte: multimodal {bpb['multimodal']:.3f}, text-only {bpb['text_only']:.3f}")

    import audio as audio_bench
    import vision as vision_bench
    stage("3. judges", work / "judges.json")
    judges = cached_json(work / "judges.json", lambda: {
        "image": vision_bench.train_digit_judge(work / "mnist-judge.safetensors"),
        "audio": audio_bench.train_digit_judge(args.fsdd, work / "speech-judge.safetensors",
                                               2 if args.quick else audio_bench.DIGIT_JUDGE_EPOCHS,
                                               120 if args.quick else None)})
    print(f"  judges: MNIST {judges['image']:.3f}, speech digits {judges['audio']}", flush=True)
    models = {"image": vision_bench.load_judge(work / "mnist-judge.safetensors"),
              "audio": audio_bench.load_digit_judge(work / "speech-judge.safetensors")}

    import openai
    stage("4. one fmforge serve, every skill", work / "served.json")
    process, port, serve_command = start_server(out / "model", out / "specialists", work / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        served = cached_json(work / "served.json", lambda: ask_everything(client, models, count, 16000))
    finally:
        process.terminate()
        process.wait(30)
    for key, value in served.items():
        if key not in ("examples", "models"):
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    body = report(quickstart, bpb, judges, served, serve_command, count, load, args)
    print(body)
    if not args.no_results and not args.quick:
        write_section("multimodal", body)
        print("RESULTS.md: section multimodal written")


if __name__ == "__main__":
    main()
