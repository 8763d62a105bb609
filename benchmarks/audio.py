"""Audio benchmark (issue 14): speech in the one-token-stream foundation model, scored by independent judges.

    python benchmarks/audio.py --fsdd DIR --threads 1            # the full run (~60-90 min on 1 busy CPU)
    python benchmarks/audio.py --fsdd DIR --threads 1 --quick    # the whole pipeline with tiny budgets (minutes)

DIR is the Free Spoken Digit Dataset (its recordings/ folder inside). Stages, each cached in --work (an interrupted
run resumes where it stopped):
 1. judges, trained here and never the model under test: a digit CNN on log-mel (FSDD train + espeak:digits train)
    and a word recogniser (conv + BiGRU, CTC over the ~230 words espeak can say, greedy decoding) on espeak:numbers
    and espeak:sentences train voices. Each reports its own accuracy / WER on test splits (held-out voices).
 2. tokenizers: BPE on stdlib text, the FSQ image codec on MNIST, the FSQ audio codec on FSDD + espeak train
    (`fmforge tokenizer train --modality audio`). Held-out log-mel MSE, codes used, and intelligibility: the judges
    on codec round-tripped test audio (encode -> decode with Griffin-Lim) against the originals; and what the codes
    keep: a small classifier over FSDD's codes (own split, and each speaker left out), not the model under test.
 3. data + pretraining: `fmforge prepare` of stdlib text, image:mnist and audio:espeak digits / numbers / sentences
    (train and val splits only), `fmforge pretrain` on the mixture. No FSDD: the base never hears a real speaker
    with a transcript, so that a speaker left out is left out entirely and the foundation claim's N utterances are
    all the labelled real speech the model gets (FSDD's train audio, without transcripts, trains the codec).
 4. specialists (`fmforge finetune`): LoRA and full fine-tuning are compared once, on FSDD transcription's val
    split, and the better method is used for every specialist: transcribe FSDD (own split and leave-one-speaker-
    out for every speaker), transcribe espeak numbers / sentences, speak numbers / sentences in one voice
    (espeak:KIND@en-us), and the mnist-say chain.
 5. scores (`fmforge eval` on the test splits), speech the model writes judged by the word recogniser and the digit
    judge (and by the transcription specialist), and the foundation claim: FSDD transcription at N = 100 and 1,000
    utterances, base + the chosen method vs the same architecture from random weights, same steps.
Results go to RESULTS.md (section "audio") with a spectrogram figure and the pretraining loss curve.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np

from _common import HERE, REPO, describe_machine, git_state, write_section, cached_json, cli, latest, stage

BASE_SHAPE = ["--n_layer", "4", "--n_embd", "192", "--n_head", "4", "--n_kv_head", "4", "--context_length", "256"]
SPEAK_VOICE = "en-us"  # the one voice the speak specialists learn (espeak:KIND@VOICE); the judges heard it in training
CLAIM_SIZES = (100, 1000)


# ---- features shared by the judges ---------------------------------------------------------------------------

def log_mels(waves: list[np.ndarray]) -> list:
    """16 kHz waveforms -> normalised log-mel (64, frames) float tensors, 100 frames/s (silence -1, speech ~ +1).
    The standard Slaney log-mel front end; it has no trained part."""
    import torch

    from fmforge.modalities.audio import AudioCodecConfig, log_mel_spectrogram, normalise
    config = AudioCodecConfig()
    with torch.no_grad():
        return [normalise(log_mel_spectrogram(torch.from_numpy(np.asarray(w, np.float32)), config)) for w in waves]


def pad_batch(mels: list, frames: int | None = None):
    """(64, T_i) tensors -> (B, 64, frames) padded with silence (-1) or cropped; frames defaults to the longest."""
    import torch
    frames = frames or max(m.shape[-1] for m in mels)
    out = torch.full((len(mels), mels[0].shape[0], frames), -1.0)
    for i, mel in enumerate(mels):
        out[i, :, :min(frames, mel.shape[-1])] = mel[:, :frames]
    return out


def augment(batch, generator):
    """Level (±2 nats of log-mel) and time shift (up to 10 frames) per utterance, so the judges do not hang on
    the recording's gain or where it starts."""
    import torch
    gain = (torch.rand(batch.shape[0], *[1] * (batch.ndim - 1), generator=generator) - 0.5) * 0.6
    batch = torch.where(batch > -1, (batch + gain).clamp(-1, 2), batch)
    shift = int(torch.randint(0, 11, (1,), generator=generator))
    return torch.nn.functional.pad(batch, (shift, 0), value=-1.0)[..., :batch.shape[-1]]


# ---- 1a. the digit judge ---------------------------------------------------------------------------------------

DIGIT_FRAMES = 160  # 1.6 s: every FSDD recording but a handful, and every spoken digit espeak says
DIGIT_JUDGE_EPOCHS = 20  # FSDD test: 0.870 after 5 epochs, 0.990 after 20 (RESULTS.md, "audio")


def digit_judge():
    """A small CNN: log-mel (B, 64, 160) -> 10 digit logits."""
    import torch.nn as nn

    def block(c_in, c_out):
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.AdaptiveAvgPool2d((4, 4)), nn.Flatten(),
                         nn.Dropout(0.3), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))


def read_digits(model, waves: list[np.ndarray]) -> np.ndarray:
    """The digit the judge hears in each waveform (16 kHz)."""
    import torch
    model.eval()
    with torch.no_grad():
        x = pad_batch(log_mels(waves), DIGIT_FRAMES)[:, None]
        return torch.cat([model(chunk).argmax(-1) for chunk in x.split(256)]).numpy()


def train_digit_judge(fsdd: str, path: Path, epochs: int, limit: int | None) -> dict:
    """Train on FSDD train + espeak:digits train; accuracy on FSDD test and espeak digits test (held-out voices)."""
    import torch
    from safetensors.torch import save_file

    from fmforge.data.audio import load_audio
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    sets = [load_audio(f"fsdd:{fsdd}", "train", limit), load_audio("espeak:digits", "train", limit)]
    waves = [w for s in sets for w in s.waves]
    labels = torch.tensor([int(r["digit"]) for s in sets for r in s.records])
    x = pad_batch(log_mels(waves), DIGIT_FRAMES)[:, None]  # (N, 1, 64, 160)
    model = digit_judge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    steps = epochs * -(-len(x) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.cross_entropy(model(augment(x[batch], generator)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    save_file(model.state_dict(), str(path))
    result = {"train_utterances": len(x), "epochs": epochs, "seconds": time.perf_counter() - started}
    for name, source in (("fsdd_test", f"fsdd:{fsdd}"), ("espeak_digits_test", "espeak:digits")):
        test = load_audio(source, "test", limit)
        result[name] = float((read_digits(model, test.waves) == [int(r["digit"]) for r in test.records]).mean())
    return result


def load_digit_judge(path: Path):
    from safetensors.torch import load_file
    model = digit_judge()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ---- 1b. the word recogniser -----------------------------------------------------------------------------------

def judge_vocabulary() -> list[str]:
    """Every word espeak:numbers and espeak:sentences say; index 0 is CTC's blank."""
    from fmforge.data.audio import NUMBER_VOCABULARY, sentence_vocabulary
    return ["<blank>"] + sorted(sentence_vocabulary() | NUMBER_VOCABULARY)


def word_recogniser(vocabulary_size: int):
    """log-mel (B, 64, T) -> (B, T/4, vocabulary) logits: two stride-2 convolutions (25 frames/s), a 2-layer BiGRU."""
    import torch.nn as nn

    class Recogniser(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = nn.Sequential(nn.Conv1d(64, 128, 5, stride=2, padding=2), nn.BatchNorm1d(128), nn.ReLU(),
                                       nn.Conv1d(128, 128, 5, stride=2, padding=2), nn.BatchNorm1d(128), nn.ReLU())
            self.rnn = nn.GRU(128, 128, num_layers=2, batch_first=True, bidirectional=True, dropout=0.1)
            self.out = nn.Linear(256, vocabulary_size)

        def forward(self, mels):
            hidden, _ = self.rnn(self.front(mels).transpose(1, 2))  # (B, T/4, 256)
            return self.out(hidden)

    return Recogniser()


def recognise_words(model, waves: list[np.ndarray]) -> list[str]:
    """Greedy CTC decoding of each waveform into words, one utterance at a time: padding would run the backward
    GRU through silence first and change what it hears (it trained on length-bucketed batches)."""
    import torch
    vocabulary = judge_vocabulary()
    model.eval()
    texts = []
    with torch.no_grad():
        for mel in log_mels(waves):
            ids = torch.unique_consecutive(model(mel[None])[0].argmax(-1)).tolist()  # (T/4,) best words
            texts.append(" ".join(vocabulary[t] for t in ids if t != 0))
    return texts


def recogniser_wer(model, limit: int | None) -> dict:
    """The word recogniser's WER on espeak numbers and sentences test splits (held-out voices)."""
    from fmforge.data.audio import load_audio
    from fmforge.eval.speech import word_error_rate
    result = {}
    for kind in ("numbers", "sentences"):
        test = load_audio(f"espeak:{kind}", "test", limit)
        result[f"{kind}_test_wer"] = word_error_rate([r["text"] for r in test.records],
                                                     recognise_words(model, test.waves))
    return result


def train_word_recogniser(path: Path, minutes: float, limit: int | None) -> dict:
    """CTC over words on espeak:numbers + espeak:sentences train (72 voices), for `minutes`; WER on their test
    splits (4 held-out voices)."""
    import torch
    from safetensors.torch import save_file

    from fmforge.data.audio import load_audio
    vocabulary = judge_vocabulary()
    index = {word: i for i, word in enumerate(vocabulary)}
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    sets = [load_audio(f"espeak:{kind}", "train", limit) for kind in ("numbers", "sentences")]
    mels = log_mels([w for s in sets for w in s.waves])
    targets = [torch.tensor([index[w] for w in r["text"].split()]) for s in sets for r in s.records]
    model = word_recogniser(len(vocabulary))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    ctc = torch.nn.CTCLoss(zero_infinity=True)
    order = np.argsort([m.shape[-1] for m in mels])
    buckets = [order[i:i + 32] for i in range(0, len(order), 32)]  # similar lengths: little padding
    started, step, losses = time.perf_counter(), 0, []
    model.train()
    while time.perf_counter() - started < minutes * 60:
        for b in torch.randperm(len(buckets), generator=generator).tolist():
            batch = augment(pad_batch([mels[i] for i in buckets[b]]), generator)
            log_probs = model(batch).log_softmax(-1).transpose(0, 1)  # (T/4, B, vocabulary)
            frames = torch.tensor([-(-mels[i].shape[-1] // 4) for i in buckets[b]]).clamp(max=log_probs.shape[0])
            labels = [targets[i] for i in buckets[b]]
            loss = ctc(log_probs, torch.cat(labels), frames, torch.tensor([len(t) for t in labels]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            losses.append(float(loss))
            if time.perf_counter() - started > minutes * 60:
                break
    save_file(model.state_dict(), str(path))
    return {"train_utterances": len(mels), "steps": step, "seconds": time.perf_counter() - started,
            "final_loss": float(np.mean(losses[-20:]))}


def load_word_recogniser(path: Path):
    from safetensors.torch import load_file
    model = word_recogniser(len(judge_vocabulary()))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ---- 2. the audio tokenizer's round trip -----------------------------------------------------------------------

def round_trip(tokenizer, waves: list[np.ndarray]) -> list[np.ndarray]:
    """Each waveform encoded to audio codes and decoded back (Griffin-Lim), as the model's speech is."""
    codec = tokenizer.codecs["audio"]
    return [codec.decode(codes) for codes in codec.encode_batch(waves)]


def codec_intelligibility(tokenizer_dir: Path, fsdd: str, judges: dict, limit: int | None) -> dict:
    """The judges on test audio, original vs round-tripped: digit accuracy (FSDD, espeak digits) and WER (espeak
    numbers, sentences)."""
    from fmforge.checkpoint import load_tokenizer
    from fmforge.data.audio import load_audio
    from fmforge.eval.speech import word_error_rate
    tokenizer = load_tokenizer(tokenizer_dir)
    report = json.loads((tokenizer_dir / "audio_tokenizer" / "report.json").read_text()) \
        if (tokenizer_dir / "audio_tokenizer" / "report.json").exists() else {}
    result = {key: report.get(key) for key in ("mse", "untrained_mse", "codes_used", "code_usage", "perplexity",
                                               "codebook_size", "held_out_waves", "steps", "seconds")}
    for name, source in (("fsdd", f"fsdd:{fsdd}"), ("espeak_digits", "espeak:digits")):
        test = load_audio(source, "test", limit)
        digits = [int(r["digit"]) for r in test.records]
        result[f"{name}_digit_accuracy"] = float((read_digits(judges["digit"], test.waves) == digits).mean())
        result[f"{name}_digit_accuracy_round_trip"] = float(
            (read_digits(judges["digit"], round_trip(tokenizer, test.waves)) == digits).mean())
    for kind in ("numbers", "sentences"):
        test = load_audio(f"espeak:{kind}", "test", limit)
        texts = [r["text"] for r in test.records]
        result[f"{kind}_wer"] = word_error_rate(texts, recognise_words(judges["words"], test.waves))
        result[f"{kind}_wer_round_trip"] = word_error_rate(
            texts, recognise_words(judges["words"], round_trip(tokenizer, test.waves)))
    return result


CODES_PROBE_EPOCHS = 30


def codes_probe(tokenizer_dir: Path, fsdd: str, speakers: list[str], epochs: int, limit: int | None) -> dict:
    """What the audio codes keep of a real speaker's digit: a small conv classifier over each utterance's FSQ values
    (the codes the specialists read, as the 4 numbers each stands for), trained here for `epochs` on the same train
    split as a specialist and scored on its test split: FSDD's own split, and each speaker left out. It is not the
    model under test; it shows how far the codes themselves carry the task."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from fmforge.checkpoint import load_tokenizer
    from fmforge.data.audio import load_audio
    codec = load_tokenizer(tokenizer_dir).codecs["audio"]
    encoded = {}  # recording path -> its FSQ values: each recording is encoded once, whichever folds read it

    def features(audio_set):
        paths = [r["path"] for r in audio_set.records]
        new = [i for i, path in enumerate(paths) if path not in encoded]
        for i, grid in zip(new, codec.encode_batch([audio_set.waves[i] for i in new])):
            encoded[paths[i]] = codec.quantizer.from_codes(grid.reshape(1, -1))[0]
        values = [encoded[path] for path in paths]
        x = torch.zeros(len(values), DIGIT_FRAMES // codec.config.downsample, values[0].shape[1])
        for i, v in enumerate(values):
            x[i, :min(len(v), x.shape[1])] = v[:x.shape[1]]
        return x.transpose(1, 2), torch.tensor([int(r["digit"]) for r in audio_set.records])

    def accuracy(source: str) -> float:
        torch.manual_seed(0)
        (x, y), (x_test, y_test) = (features(load_audio(source, split, limit)) for split in ("train", "test"))
        model = nn.Sequential(nn.Conv1d(x.shape[1], 128, 3, padding=1), nn.GELU(), nn.Conv1d(128, 128, 3, padding=1),
                              nn.GELU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(128, 10))
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x)).split(64):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        model.eval()
        with torch.no_grad():
            return float((model(x_test).argmax(-1) == y_test).float().mean())

    return {"epochs": epochs, "fsdd": accuracy(f"fsdd:{fsdd}"),
            **{f"loso-{speaker}": accuracy(f"fsdd:{fsdd}@{speaker}") for speaker in speakers}}


# ---- 4. specialists --------------------------------------------------------------------------------------------

def finetune(base: Path, out: Path, task: str, data: str, method: str, budget: list, seed: int = 0,
             limit: int | None = None, lr: float | None = None) -> Path:
    """`fmforge finetune` of one specialist (skipped when it exists); returns its run directory."""
    done = out / ("adapter_config.json" if method == "lora" else "latest")
    if stage(f"specialist {out.name} ({method}, {data})", done):
        cli("finetune", "--checkpoint", base, "--task", task, "--data", data, "--out", out, "--method", method,
            "--lora-rank", "32", "--lr", lr or (3e-3 if method == "lora" else 1e-3), "--batch_size", "16",
            "--seed", seed, "--eval_interval", "100000", "--log_interval", "50", *budget,
            *(["--limit", limit] if limit else []))
    return out


def specialist_args(base: Path, run: Path, method: str) -> list:
    """--checkpoint/--adapter of a specialist: the base with its LoRA, or the fine-tuned checkpoint itself."""
    return ["--checkpoint", base, "--adapter", run] if method == "lora" else ["--checkpoint", latest(run)]


def fmforge_eval(base: Path, run: Path | None, method: str, spec: str, out: Path, limit: int | None) -> dict:
    """`fmforge eval --tasks SPEC` of a specialist (cached in out/report.json); its results for SPEC."""
    if not (out / "report.json").exists():
        where = specialist_args(base, run, method) if run is not None else ["--checkpoint", base]
        cli("eval", *where, "--tasks", spec, "--out", out, *(["--limit", limit] if limit else []))
    return json.loads((out / "report.json").read_text())["results"][spec]


def load(base: Path, run: Path, method: str):
    from fmforge.adapt.specialist import load_specialist
    if method == "lora":
        model, tokenizer, _, _ = load_specialist(str(base), str(run))
    else:
        model, tokenizer, _, _ = load_specialist(str(latest(run)), None)
    return model, tokenizer


def val_accuracy(base: Path, run: Path, method: str, fsdd: str, limit: int | None) -> float:
    """Transcription exact match on FSDD's val split (never test): how the method is chosen."""
    from fmforge.data.speech import source_records
    from fmforge.eval.speech import evaluate_transcribe
    model, tokenizer = load(base, run, method)
    return evaluate_transcribe(model, tokenizer, source_records("transcribe", f"fsdd:{fsdd}", "val", limit))[
        "exact_match"]


# ---- 5. speech the model writes ------------------------------------------------------------------------------

def held_out_prompts(count: int) -> dict[str, list[str]]:
    """Texts no train split says: 3-digit numbers absent from espeak:numbers train, and espeak:sentences test
    sentences absent from its train split (what pretraining and the speak specialists saw)."""
    from fmforge.data.audio import _espeak_utterance, TRAIN_VOICES, ESPEAK_COUNTS, number_words
    seen = {kind: {_espeak_utterance(kind, "train", i, TRAIN_VOICES)["text"] for i in range(ESPEAK_COUNTS[kind])}
            for kind in ("numbers", "sentences")}
    rng = np.random.default_rng(14)
    numbers = [number_words(int(n)) for n in rng.permutation(np.arange(100, 1000))
               if number_words(int(n)) not in seen["numbers"]][:count]
    sentences = []
    for i in range(ESPEAK_COUNTS["sentences"]):
        text = _espeak_utterance("sentences", "test", i, TRAIN_VOICES)["text"]
        if text not in seen["sentences"] and text not in sentences:
            sentences.append(text)
        if len(sentences) == count:
            break
    return {"numbers": numbers, "sentences": sentences}


def generate_speech(base: Path, run: Path, method: str, texts: list[str]) -> list[np.ndarray | None]:
    """Greedy speak replies to "Say: TEXT", decoded to 16 kHz waveforms (None where no audio span came back)."""
    from fmforge.data.audio import load_audio
    from fmforge.eval.speech import replies, spoken_tokens
    model, tokenizer = load(base, run, method)
    reference = load_audio("espeak:sentences:10", "train", 1).waves[0]  # a long utterance bounds the reply length
    limit = max(spoken_tokens(reference, tokenizer), 120)
    outputs = replies(model, tokenizer, "speak", [(f"prompt:{i}", {"text": t}) for i, t in enumerate(texts)], limit)
    waves = [tokenizer.decode_audio(ids) for ids in outputs]
    return [w[0] if w and len(w[0]) > 160 else None for w in waves]


def speak_scores(base: Path, runs: dict, transcribers: dict, method: str, judge, prompts: dict, work: Path) -> dict:
    """Per kind: words the recogniser recovers from the generated speech (1 - WER), valid share, and the
    transcription specialist's WER on the same speech."""
    from fmforge.eval.speech import evaluate_transcribe, word_error_rate
    result = {}
    for kind, texts in prompts.items():
        waves = generate_speech(base, runs[kind], method, texts)
        np.savez_compressed(work / "scores" / f"speak-{kind}.npz", *[w if w is not None else np.zeros(1, np.float32)
                                                                     for w in waves])
        silent = np.zeros(1600, np.float32)
        heard = recognise_words(judge, [w if w is not None else silent for w in waves])
        wer = word_error_rate(texts, heard)
        model, tokenizer = load(base, transcribers[kind], method)
        records = [(f"speak:{i}", {"audio": w if w is not None else silent, "text": t})
                   for i, (w, t) in enumerate(zip(waves, texts))]
        agreement = evaluate_transcribe(model, tokenizer, records)
        result[kind] = {"prompts": len(texts), "valid": float(np.mean([w is not None for w in waves])),
                        "judge_wer": wer, "words_recovered": max(0.0, 1 - wer),
                        "judge_exact": float(np.mean([h == t for h, t in zip(heard, texts)])),
                        "transcriber_wer": agreement["wer"], "transcriber_exact": agreement["exact_match"],
                        "examples": [{"prompt": t, "judge_heard": h} for t, h in list(zip(texts, heard))[:4]]}
        print(f"speak {kind}: {result[kind]}", flush=True)
    return result


def say_scores(base: Path, run: Path, method: str, judge, limit: int) -> dict:
    """mnist-say on MNIST test images: the written digit name (as fmforge eval scores it) and the spoken part read
    by the digit judge."""
    from fmforge.data.tasks import task_records
    from fmforge.eval.speech import TEXT_REPLY_TOKENS, evaluate_say, replies, spoken_tokens
    model, tokenizer = load(base, run, method)
    records = task_records("mnist-say", "test", limit)
    written = evaluate_say(model, tokenizer, records)
    limits = [TEXT_REPLY_TOKENS + spoken_tokens(r["audio"], tokenizer) for _, r in records]
    outputs = replies(model, tokenizer, "say", records, limits)
    waves = [tokenizer.decode_audio(ids) for ids in outputs]
    spoken = [w[0] if w and len(w[0]) > 160 else np.zeros(1600, np.float32) for w in waves]
    heard = read_digits(judge, spoken)
    labels = np.array([int(r["label"]) for _, r in records])
    confusion = np.zeros((10, 10), int)
    for label, digit in zip(labels, heard):
        confusion[label, digit] += 1
    return {"written_accuracy": written["accuracy"], "valid": written["valid"], "examples": len(records),
            "judge_accuracy": float((heard == labels).mean()), "confusion": confusion.tolist()}


# ---- 5b. the foundation claim ----------------------------------------------------------------------------------

def foundation_claim(base: Path, fsdd: str, method: str, work: Path, steps: int, eval_limit: int | None) -> dict:
    """FSDD transcription with N training utterances: the base + `method` vs the same architecture from random
    weights (full fine-tuning), same steps, same data, scored on FSDD's test split."""
    import torch

    from fmforge.checkpoint import load_model_and_tokenizer, write_checkpoint
    from fmforge.model import Transformer
    scratch = work / "claim" / "scratch-init"
    if not (scratch / "model.safetensors").exists():
        model, _, _ = load_model_and_tokenizer(latest(base) if (base / "latest").exists() else base)
        torch.manual_seed(0)
        write_checkpoint(scratch, Transformer(model.config), tokenizer_dir=latest(base))
    results = {}
    for n in CLAIM_SIZES:
        for arm, start, arm_method, lr in (("base", base, method, None), ("scratch", scratch, "full", 3e-3)):
            out = finetune(start, work / "claim" / f"fsdd-{n}-{arm}", "transcribe", f"fsdd:{fsdd}", arm_method,
                           ["--max_steps", steps], limit=n, lr=lr)
            got = fmforge_eval(start, out, arm_method, f"transcribe:fsdd:{fsdd}", work / "claim" / f"eval-{n}-{arm}",
                               eval_limit)
            results[f"{n} {arm}"] = got["exact_match"]
            print(f"claim N={n} {arm}: {got}", flush=True)
    return results


# ---- figures -------------------------------------------------------------------------------------------------

def spectrogram_figure(tokenizer_dir: Path, fsdd: str, prompts: dict, work: Path, path: Path) -> None:
    """Log-mel of an FSDD test digit and an espeak test sentence, original vs round trip; and the speech the speak
    specialist wrote for a held-out sentence next to espeak saying it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fmforge.checkpoint import load_tokenizer
    from fmforge.data.audio import SAMPLE_RATE, Espeak, load_audio, resample
    tokenizer = load_tokenizer(tokenizer_dir)
    digit = load_audio(f"fsdd:{fsdd}", "test", 1)
    sentence = load_audio("espeak:sentences", "test", 1)
    generated = np.load(work / "scores" / "speak-sentences.npz")["arr_0"]
    with Espeak() as espeak:
        said = resample(espeak.say(prompts["sentences"][0], SPEAK_VOICE), espeak.rate, SAMPLE_RATE)
    panels = [(f"FSDD test '{digit.records[0]['text']}'", digit.waves[0]),
              ("... codec round trip", round_trip(tokenizer, digit.waves)[0]),
              (f"espeak test voice: '{sentence.records[0]['text']}'", sentence.waves[0]),
              ("... codec round trip", round_trip(tokenizer, sentence.waves)[0]),
              (f"espeak {SPEAK_VOICE}: '{prompts['sentences'][0]}' (held out)", said),
              ("... the speak specialist's speech for it", generated)]
    figure, axes = plt.subplots(3, 2, figsize=(12, 7.5))
    for axis, (title, wave) in zip(axes.flat, panels):
        axis.imshow(log_mels([wave])[0].numpy(), origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1.2,
                    extent=(0, len(wave) / SAMPLE_RATE, 0, 64))
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("seconds", fontsize=8)
        axis.set_ylabel("mel band", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


# ---- the run ---------------------------------------------------------------------------------------------------

def budgets(quick: bool) -> dict:
    if quick:
        return dict(limit=120, judge_epochs=2, recogniser_minutes=0.5, codec_steps=120, codec_limit=150,
                    image_limit=300, audio_limit=150, pretrain_minutes=1.5, specialist=["--max_steps", 20],
                    loso=["--max_steps", 10], claim_steps=10, eval_limit=20, prompts=8, say_limit=20,
                    vocab_size=1024, espeak_limit=300)
    return dict(limit=None, judge_epochs=DIGIT_JUDGE_EPOCHS, recogniser_minutes=3.5, codec_steps=1200,
                codec_limit=1500, image_limit=3000, audio_limit=None, pretrain_minutes=10.0,
                specialist=["--max_minutes", 1.5], loso=["--max_minutes", 0.8], claim_steps=60, eval_limit=None,
                prompts=50, say_limit=100,
                vocab_size=2048, espeak_limit=2500)  # espeak specialists: more utterances than 1.5 min of steps see


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", required=True, help="the Free Spoken Digit Dataset folder")
    parser.add_argument("--work", default=None, help="stage cache (default runs/bench-audio[-quick])")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--quick", action="store_true", help="the whole pipeline with tiny budgets")
    parser.add_argument("--no-results", action="store_true", help="print the section, do not write RESULTS.md")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    fsdd, quick, b = str(Path(args.fsdd).resolve()), args.quick, budgets(args.quick)
    work = Path(args.work or REPO / "runs" / ("bench-audio-quick" if quick else "bench-audio")).resolve()
    (work / "scores").mkdir(parents=True, exist_ok=True)
    started, load_at_start = time.perf_counter(), os.getloadavg()
    timings = cached_json(work / "timings.json", dict)

    def timed(name, compute):
        """cached_json, with the minutes the stage took recorded the first time it runs."""
        path = work / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        begin = time.perf_counter()
        value = cached_json(path, compute)
        timings[name] = (time.perf_counter() - begin) / 60
        (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        return value

    # 1. judges
    print("== judges", flush=True)
    judge_report = {
        "digit": timed("judge-digit", lambda: train_digit_judge(fsdd, work / "judge-digit.safetensors",
                                                                b["judge_epochs"], b["limit"])),
        "words": timed("judge-words", lambda: train_word_recogniser(work / "judge-words.safetensors",
                                                                    b["recogniser_minutes"], b["limit"]))}
    judges = {"digit": load_digit_judge(work / "judge-digit.safetensors"),
              "words": load_word_recogniser(work / "judge-words.safetensors")}
    judge_report["words"].update(timed("judge-words-test", lambda: recogniser_wer(
        judges["words"], b["limit"] and max(20, b["limit"] // 10))))
    print(f"judges: {judge_report}", flush=True)

    # 2. tokenizers: text, + image, + audio
    text_src = work / "text-source"
    if not text_src.exists():
        shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "email", text_src,
                        ignore=shutil.ignore_patterns("__pycache__"))
    text_tok, image_tok, tok = work / "text-tokenizer", work / "image-tokenizer", work / "tokenizer"
    if stage("text tokenizer", text_tok / "tokenizer.json"):
        cli("tokenizer", "train", text_src, "--vocab-size", b["vocab_size"], "--out", text_tok)
    if stage("image tokenizer", image_tok / "tokenizer_config.json"):
        cli("tokenizer", "train", "--modality", "image", "mnist", "--limit", b["image_limit"], "--steps",
            300 if quick else 800, "--tokenizer", text_tok, "--out", image_tok)
    if stage("audio tokenizer", tok / "tokenizer_config.json"):
        begin = time.perf_counter()
        cli("tokenizer", "train", "--modality", "audio", f"fsdd:{fsdd}", "espeak:digits", "espeak:numbers",
            "espeak:sentences", "--limit", b["codec_limit"], "--steps", b["codec_steps"], "--tokenizer", image_tok,
            "--out", tok)
        timings["audio-tokenizer"] = (time.perf_counter() - begin) / 60
    codec = timed("codec", lambda: codec_intelligibility(tok, fsdd, judges, b["limit"] or 200))  # 200 each
    print(f"codec: {codec}", flush=True)
    speakers = sorted({path.name.split("_")[1] for path in (Path(fsdd) / "recordings").glob("*.wav")})
    probe = timed("codes-probe", lambda: codes_probe(tok, fsdd, speakers, 2 if quick else CODES_PROBE_EPOCHS,
                                                      b["limit"]))
    print(f"what the codes keep: {probe}", flush=True)

    # 3. data and pretraining
    text_data, image_data, audio_data, base = work / "text-data", work / "image-data", work / "audio-data", work / "base"
    if stage("text data", text_data / "manifest.json"):
        cli("prepare", text_src, "--tokenizer", tok, "--out", text_data, "--val-fraction", "0.1", "--workers", "1")
    if stage("image data", image_data / "manifest.json"):
        cli("prepare", "image:mnist", "--image-limit", b["image_limit"], "--tokenizer", tok, "--out", image_data)
    if stage("audio data", audio_data / "manifest.json"):
        cli("prepare", "audio:espeak:digits", "audio:espeak:numbers", "audio:espeak:sentences",
            "--tokenizer", tok, "--out", audio_data, *(["--audio-limit", b["audio_limit"]] if b["audio_limit"] else []))
    if stage("multimodal pretraining", base / "latest"):
        begin = time.perf_counter()
        cli("pretrain", *BASE_SHAPE, "--batch_size", "16", "--lr", "3e-3", "--warmup_steps", "50", "--schedule",
            "wsd", "--eval_interval", "250", "--log_interval", "50", "--checkpoint_interval", "500",
            "--mixture", f"{{{text_data}: 1, {image_data}: 1, {audio_data}: 4}}", "--max_minutes",
            b["pretrain_minutes"], "--out_dir", base)
        timings["pretrain"] = (time.perf_counter() - begin) / 60
    state = latest(base) / "train_state" / "state.json"
    base_steps = json.loads(state.read_text())["step"] if state.exists() else None

    # 4. specialists: the method, chosen on FSDD's val split
    spec = work / "specialists"
    choice = timed("method", lambda: {
        method: val_accuracy(base, finetune(base, spec / f"fsdd-{method}", "transcribe", f"fsdd:{fsdd}", method,
                                            b["specialist"]), method, fsdd, b["limit"] or 300)
        for method in ("lora", "full")})
    method = max(choice, key=choice.get)
    print(f"method on FSDD val: {choice} -> {method}", flush=True)
    runs = {"fsdd": spec / f"fsdd-{method}"}
    for kind in ("numbers", "sentences"):
        runs[f"transcribe-{kind}"] = finetune(base, spec / f"transcribe-{kind}", "transcribe", f"espeak:{kind}",
                                              method, b["specialist"], limit=b["espeak_limit"])
        runs[f"speak-{kind}"] = finetune(base, spec / f"speak-{kind}", "speak", f"espeak:{kind}@{SPEAK_VOICE}",
                                         method, b["specialist"], limit=b["espeak_limit"])
    runs["say"] = finetune(base, spec / "say", "say", "mnist-say", method, b["specialist"])
    for speaker in speakers:
        runs[f"loso-{speaker}"] = finetune(base, spec / f"loso-{speaker}", "transcribe", f"fsdd:{fsdd}@{speaker}",
                                           method, b["loso"])

    # 5. scores on the test splits
    scores = {"fsdd": fmforge_eval(base, runs["fsdd"], method, f"transcribe:fsdd:{fsdd}", work / "scores" / "fsdd",
                                   b["eval_limit"])}
    for speaker in speakers:
        scores[f"loso-{speaker}"] = fmforge_eval(base, runs[f"loso-{speaker}"], method,
                                                 f"transcribe:fsdd:{fsdd}@{speaker}", work / "scores" / f"loso-{speaker}",
                                                 b["eval_limit"])
    for kind in ("numbers", "sentences"):
        scores[f"transcribe-{kind}"] = fmforge_eval(base, runs[f"transcribe-{kind}"], method,
                                                    f"transcribe:espeak:{kind}", work / "scores" / f"transcribe-{kind}",
                                                    b["eval_limit"])
        scores[f"speak-{kind}"] = fmforge_eval(base, runs[f"speak-{kind}"], method,
                                               f"speak:espeak:{kind}@{SPEAK_VOICE}", work / "scores" / f"speak-{kind}",
                                               b["eval_limit"] or 100)  # 100 test texts: generation is the slow part
    print(f"scores: {json.dumps(scores)}", flush=True)
    prompts = cached_json(work / "prompts.json", lambda: held_out_prompts(b["prompts"]))
    speak = timed("speak", lambda: speak_scores(
        base, {k: runs[f"speak-{k}"] for k in prompts}, {k: runs[f"transcribe-{k}"] for k in prompts}, method,
        judges["words"], prompts, work))
    say = timed("say", lambda: say_scores(base, runs["say"], method, judges["digit"], b["say_limit"]))
    print(f"say: {say}", flush=True)
    claim = timed("claim", lambda: foundation_claim(base, fsdd, method, work, b["claim_steps"], b["eval_limit"]))

    figure = work / "spectrograms.png"
    if not figure.exists():
        spectrogram_figure(tok, fsdd, prompts, work, figure)
    minutes = (time.perf_counter() - started) / 60
    timings["this run"] = minutes
    (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    if not quick:
        shutil.copyfile(figure, HERE / "audio-spectrograms.png")
        shutil.copyfile(base / "loss.png", HERE / "audio-pretrain-loss.png")
    image_codec = json.loads((image_tok / "image_tokenizer" / "report.json").read_text())
    body = report(judge_report, codec, probe, image_codec, base_steps, choice, method, scores, speakers, speak, say,
                  claim, timings, load_at_start, args, b)
    print(body)
    if not args.no_results and not quick:
        write_section("audio", body)


def met(value: float, target: float, higher: bool = True) -> str:
    ok = value >= target if higher else value <= target
    return "yes" if ok else f"**no** ({value - target:+.3f})"


def report(judges, codec, probe, image_codec, base_steps, choice, method, scores, speakers, speak, say, claim, timings,
           load, args, b) -> str:
    d, w = judges["digit"], judges["words"]
    fsdd_acc = scores["fsdd"]["exact_match"]
    lines = [
        "## Audio (issue 14): speech in the one-token-stream base, specialists, independent judges",
        "",
        f"`python benchmarks/audio.py --fsdd DIR --threads {args.threads}` (DIR: the Free Spoken Digit Dataset) — "
        f"{timings.get('this run', 0):.0f} min for this invocation (stages cached in the work dir: "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items() if k != "this run") + " min) on "
        f"{describe_machine(args.threads)}; load average at start {load[0]:.2f} (other jobs share the 2 CPUs: times "
        f"are not speed claims). Commit {git_state()}. Test splits are read only for the scores below; the method "
        f"and every budget were fixed before them.",
        "",
        "**Judges** (trained here, never the model under test; log-mel input):",
        f"- digit CNN on FSDD train + espeak:digits train ({d['train_utterances']} utterances, {d['epochs']} "
        f"epochs): accuracy {d['fsdd_test']:.3f} on FSDD test, {d['espeak_digits_test']:.3f} on espeak digits test "
        "(held-out voices)",
        f"- word recogniser (2 stride-2 convs + 2-layer BiGRU, CTC over {len(judge_vocabulary()) - 1} words, greedy) "
        f"on espeak numbers + sentences train ({w['train_utterances']} utterances, {w['steps']} steps in "
        f"{w['seconds'] / 60:.1f} min): WER {w['numbers_test_wer']:.3f} numbers, {w['sentences_test_wer']:.3f} "
        "sentences on their test splits (held-out voices)",
        "",
        f"**Audio tokenizer** (`fmforge tokenizer train --modality audio` on FSDD + espeak digits / numbers / "
        f"sentences train, {b['codec_limit']} utterances each, {codec['steps']} steps; FSQ {codec['codebook_size']} "
        f"codes, 25 codes/s): held-out log-mel MSE {codec['mse']:.4f} (untrained {codec['untrained_mse']:.4f}), "
        f"{codec['codes_used']} codes used ({codec['code_usage']:.0%}), perplexity {codec['perplexity']:.0f}.",
        "",
        f"**Image tokenizer** (`fmforge tokenizer train --modality image mnist`, {image_codec['train_images']} "
        f"images, {image_codec['steps']} steps; what mnist-say's prompts are read through): held-out MSE "
        f"{image_codec['mse']:.4f} (PSNR {image_codec['psnr']:.1f} dB), {image_codec['codes_used']} of "
        f"{image_codec['codebook_size']} codes used, perplexity {image_codec['perplexity']:.0f}.",
        "",
        "| test audio | judge | original | codec round trip |",
        "|---|---|---|---|",
        f"| FSDD test | digit accuracy | {codec['fsdd_digit_accuracy']:.3f} | "
        f"{codec['fsdd_digit_accuracy_round_trip']:.3f} |",
        f"| espeak digits, held-out voices | digit accuracy | {codec['espeak_digits_digit_accuracy']:.3f} | "
        f"{codec['espeak_digits_digit_accuracy_round_trip']:.3f} |",
        f"| espeak numbers, held-out voices | WER | {codec['numbers_wer']:.3f} | {codec['numbers_wer_round_trip']:.3f} |",
        f"| espeak sentences, held-out voices | WER | {codec['sentences_wer']:.3f} | "
        f"{codec['sentences_wer_round_trip']:.3f} |",
        "",
        "The digit judge learnt FSDD's band-limited originals (8 kHz: nothing above 4 kHz), which Griffin-Lim's "
        "reconstruction is not, so the round trip's FSDD row understates what the codes keep. **What the codes "
        f"keep** (a 2-layer conv classifier over each utterance's FSQ values, {probe['epochs']} epochs on the "
        "specialist's train split; not the model under test): FSDD test "
        f"{probe['fsdd']:.3f}; each speaker left out "
        + ", ".join(f"{s} {probe[f'loso-{s}']:.3f}" for s in speakers)
        + f" (mean {np.mean([probe[f'loso-{s}'] for s in speakers]):.3f}).",
        "",
        f"**Base**: {BASE_SHAPE[1]} layers x {BASE_SHAPE[3]}, context {BASE_SHAPE[-1]}, {base_steps} steps "
        f"(`fmforge pretrain --max_minutes {b['pretrain_minutes']}`, batch 16) on stdlib `email` text 1 : image:mnist "
        "1 : audio 4 (espeak digits, numbers, sentences: transcript -> speech and speech -> transcript documents of "
        "their train splits). No FSDD: the base never heard a real speaker with a transcript (FSDD's train audio, "
        "without transcripts, trained the codec).",
        "",
        f"**Method**: LoRA (rank 32, lr 3e-3) vs full fine-tuning (lr 1e-3), same budget, on FSDD transcription, "
        f"exact match on FSDD's val split: LoRA {choice['lora']:.3f}, full {choice['full']:.3f} -> **{method}** for "
        f"every specialist (budget {' '.join(map(str, b['specialist']))}; leave-one-speaker-out "
        f"{' '.join(map(str, b['loso']))}).",
        "",
        "| task | metric (test split) | result | target | met |",
        "|---|---|---|---|---|",
        f"| transcribe FSDD (own split) | digit accuracy | {fsdd_acc:.3f} | ≥ 0.97 | {met(fsdd_acc, 0.97)} |",
    ]
    for speaker in speakers:
        value = scores[f"loso-{speaker}"]["exact_match"]
        lines.append(f"| transcribe FSDD, speaker {speaker} left out | digit accuracy (all "
                     f"{scores[f'loso-{speaker}']['examples']}) | {value:.3f} | ≥ 0.90 | {met(value, 0.90)} |")
    for kind in ("numbers", "sentences"):
        value = scores[f"transcribe-{kind}"]["wer"]
        lines.append(f"| transcribe espeak {kind} (held-out voices) | WER (exact "
                     f"{scores[f'transcribe-{kind}']['exact_match']:.3f}) | {value:.3f} | ≤ 0.05 | "
                     f"{met(value, 0.05, higher=False)} |")
    for kind in ("numbers", "sentences"):
        s, e = speak[kind], scores[f"speak-{kind}"]
        lines.append(f"| speak {kind} ({s['prompts']} held-out prompts) | words the recogniser recovers (1 - WER); "
                     f"valid {s['valid']:.2f} | {s['words_recovered']:.3f} | ≥ 0.90 | "
                     f"{met(s['words_recovered'], 0.90)} |")
        lines.append(f"| speak {kind} | transcription specialist's WER on that speech (exact "
                     f"{s['transcriber_exact']:.3f}) | {s['transcriber_wer']:.3f} | (agreement) | |")
        lines.append(f"| speak {kind} (`fmforge eval`, {e['examples']} test texts) | valid / length ratio | "
                     f"{e['valid']:.2f} / {e['length_ratio']:.2f} | 1 / ~1 | |")
    lines += [
        f"| mnist-say chain ({say['examples']} MNIST test images) | digit judge reads the spoken digit (written "
        f"name right {say['written_accuracy']:.3f}, valid {say['valid']:.2f}) | {say['judge_accuracy']:.3f} | ≥ 0.90 "
        f"| {met(say['judge_accuracy'], 0.90)} |",
        "",
        f"Foundation claim: FSDD transcription from N training utterances, {b['claim_steps']} steps each (batch 16, "
        f"seed 0), digit accuracy on FSDD test:",
        "",
        f"| N | base + {method} | same architecture from random weights (full) | difference |",
        "|---|---|---|---|",
    ]
    for n in CLAIM_SIZES:
        lines.append(f"| {n} | {claim[f'{n} base']:.3f} | {claim[f'{n} scratch']:.3f} | "
                     f"{claim[f'{n} base'] - claim[f'{n} scratch']:+.3f} |")
    lines += ["", "Heard by the word recogniser in the generated speech (first held-out prompts): " + "; ".join(
        f"'{x['prompt']}' -> '{x['judge_heard']}'" for kind in ("numbers", "sentences") for x in speak[kind]["examples"][:2]),
        "", "![spectrograms](audio-spectrograms.png) ![loss](audio-pretrain-loss.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
