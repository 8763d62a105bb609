"""`fmforge import hf` and `fmforge export {hf,gguf}`: the command-line side of interop.

    fmforge import hf DIR --out CKPT              a local Hugging Face model directory -> fmforge checkpoint
    fmforge export hf CKPT --out DIR              fmforge checkpoint -> Hugging Face model directory
                      [--adapter ADAPTER]...      + LoRA adapters in PEFT layout (OUT/adapters/NAME)
    fmforge export gguf CKPT --out model.gguf     fmforge checkpoint -> GGUF for llama.cpp (f32, f16, q8_0)
"""

from __future__ import annotations

import argparse


def cmd_import_hf(args) -> None:
    from .hf import import_hf

    import_hf(args.source, args.out, dtype=args.dtype, context_length=args.context_length)


def cmd_export_hf(args) -> None:
    from .hf import export_hf

    export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
              adapters=args.adapter or [])


def cmd_export_gguf(args) -> None:
    from .gguf import export_gguf

    export_gguf(args.checkpoint, args.out, outtype=args.outtype)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add the `import` and `export` subcommands to the fmforge parser's subcommands `sub`."""
    p = sub.add_parser("import", help="bring a model in from another format")
    isub = p.add_subparsers(dest="import_format", required=True)
    i = isub.add_parser("hf", help="a local Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3, Mixtral)",
                        allow_abbrev=False)
    i.add_argument("source", help="directory with config.json, *.safetensors, tokenizer.json, tokenizer_config.json")
    i.add_argument("--out", required=True, help="checkpoint directory to write")
    i.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="precision of the stored weights (auto = as in the source)")
    i.add_argument("--context-length", type=int, default=None,
                   help="use a shorter context than the model's (smaller RoPE tables and KV caches)")
    i.set_defaults(handler=cmd_import_hf)

    p = sub.add_parser("export", help="write a checkpoint in another format")
    esub = p.add_subparsers(dest="export_format", required=True)
    e = esub.add_parser("hf", help="a Hugging Face model directory (transformers' from_pretrained loads it)",
                        allow_abbrev=False)
    e.add_argument("checkpoint", help="checkpoint or run directory")
    e.add_argument("--out", required=True, help="directory to write")
    e.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="precision of the written weights (default: as stored)")
    e.add_argument("--max-shard-size", default="5GB", help="largest weights file, e.g. 2GB (default 5GB)")
    e.add_argument("--adapter", action="append",
                   help="a LoRA adapter (or fine-tuning run) trained on CHECKPOINT, written to OUT/adapters/NAME "
                        "for peft.PeftModel.from_pretrained (repeatable)")
    e.set_defaults(handler=cmd_export_hf)

    g = esub.add_parser("gguf", help="a GGUF file for llama.cpp (Llama architecture)", allow_abbrev=False)
    g.add_argument("checkpoint", help="checkpoint or run directory")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"],
                   help="weight type of matrices (norms stay f32; default f16)")
    g.set_defaults(handler=cmd_export_gguf)
