"""Interoperability with the rest of the ecosystem: Hugging Face checkpoints in and out (`hf`), GGUF out
for llama.cpp (`gguf`). The command-line side lives in `commands`."""
