"""LoRA adapters out to PEFT: `fmforge export hf CKPT --out DIR --adapter ADAPTER` writes DIR/adapters/NAME,
which `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR/adapters/NAME)` loads
unmerged. fmforge already saves adapters in PEFT's layout with Hugging Face module names
(base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight), so export is a checked copy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import PEFT_PREFIX, check_adapter_base, read_adapter_config, resolve_adapter
from ..errors import CheckpointError


def resolve_adapters(adapters, checkpoint: Path) -> dict[str, Path]:
    """{name: adapter directory} for --adapter arguments, each checked to belong to `checkpoint`."""
    found: dict[str, Path] = {}
    for given in adapters:
        directory = resolve_adapter(given)
        check_adapter_base(read_adapter_config(directory), checkpoint, directory)
        if (directory / "head.safetensors").exists():
            raise CheckpointError(f"{directory} carries a classification head, which a PEFT causal-LM adapter "
                                  "cannot hold; export the merged model instead")
        name = Path(given).name
        if name in found:
            raise CheckpointError(f"two adapters are both named {name!r}; give them distinct directory names")
        found[name] = directory
    return found


def write_peft_adapter(source: Path, target: Path, exported: Path, hf_name: Callable[[str], str]) -> None:
    """adapter_config.json + adapter_model.safetensors in PEFT's layout for the exported model, whose tensor
    names `hf_name` gives for fmforge's parameter names. fmforge's keys are already PEFT's (base_model.model. +
    the Hugging Face module name); MoE experts cannot carry LoRA in transformers' Mixtral, where they are one
    fused parameter."""
    config = read_adapter_config(source)
    target.mkdir(parents=True)
    tensors = {}
    with safe_open(str(source / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            module, _, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
            if ".experts." in module:
                raise CheckpointError(f"{source}: LoRA on MoE experts ({module}) has no place in transformers' "
                                      "Mixtral, whose experts are one fused parameter; merge the adapter instead")
            tensors["base_model.model." + hf_name(module + ".weight").removesuffix(".weight")
                    + ".lora_" + rest] = f.get_tensor(key)
    save_file(tensors, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {k: v for k, v in config.items() if k != "fmforge"}  # PEFT warns about keys it does not know
    peft_config["base_model_name_or_path"] = str(exported.resolve())
    (target / "adapter_config.json").write_text(json.dumps(peft_config, indent=2) + "\n")
