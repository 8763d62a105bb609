"""Many LoRA adapters on one copy of the base weights, chosen per row of a batch (unmerged).

Every adapted linear layer becomes a `MultiLoRALinear` that holds the A and B matrices of all adapters stacked
(adapter 0 is "no adapter": zeros). Before a forward, the engine writes each row's adapter index into the shared
`AdapterSelection`; the layer then adds, per row, B_i A_i x (scaled) with two batched matmuls — the gather-bmm
form of Punica's BGMV kernel (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving"). Ranks differ between
adapters; smaller ones are zero-padded to the largest, which adds nothing to the result. An adapted token
embedding becomes a `MultiLoRAEmbedding`: each row looks its tokens up in its own adapter's A^T, then one bmm by B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import (HEAD_FILE, check_adapter_base, read_adapter_config, read_adapter_tensors, read_finetune_record,
                          resolve_adapter, split_adapter_key)
from ..adapt.media import read_media_encoders
from ..errors import CheckpointError


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r)); embedding:
    # in = vocabulary, out = width
    info: dict
    encoders: dict = field(default_factory=dict)  # modality -> understanding encoder (adapt/media.py), if trained


def read_adapter(name: str, path: str | Path, base_checkpoint: Path) -> LoadedAdapter:
    """Read a PEFT-layout LoRA adapter for serving; refuses classifiers and adapters of another base."""
    directory = resolve_adapter(path)
    config = read_adapter_config(directory)
    check_adapter_base(config, base_checkpoint, directory)
    if (directory / HEAD_FILE).exists():
        raise CheckpointError(f"adapter {name!r} ({directory}) is a classifier (it has {HEAD_FILE}); the server "
                              "generates text, so serve only generative adapters (sft, completion, lm)")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_tensors(directory).items():
        module, part = split_adapter_key(key)
        if not module:
            raise CheckpointError(f"adapter {directory}: unexpected tensor {key!r} (not a LoRA weight)")
        weights.setdefault(module, {})[part] = tensor
    pairs = {}
    for module, parts in weights.items():
        if set(parts) != {"A", "B"}:
            raise CheckpointError(f"adapter {directory}: {module} lacks lora_{'B' if 'A' in parts else 'A'}")
        pairs[module] = (parts["A"], parts["B"])
    return LoadedAdapter(name, directory, config["lora_alpha"] / config["r"], pairs, read_finetune_record(directory),
                         read_media_encoders(directory))


class AdapterSelection:
    """Which adapter each row of the next forward uses: a (B,) index tensor, or None for the base alone."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, selection: AdapterSelection, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base, self.selection = base, selection
        self.register_buffer("lora_A", A)  # (n_adapters + 1, r, in)
        self.register_buffer("lora_B", B)  # (n_adapters + 1, out, r), scaling folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ids = self.selection.ids
        if ids is None:
            return y
        low = torch.bmm(x, self.lora_A[ids].transpose(1, 2))  # (B, T, r)
        return y + torch.bmm(low, self.lora_B[ids].transpose(1, 2))


class MultiLoRAEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, selection: AdapterSelection, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.base, self.selection = base, selection
        self.register_buffer("lora_A_T", A.transpose(1, 2).contiguous())  # (n_adapters + 1, vocab, r)
        self.register_buffer("lora_B", B)  # (n_adapters + 1, dim, r), scaling folded in

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.base(ids)
        rows = self.selection.ids
        if rows is None:
            return y
        low = self.lora_A_T[rows[:, None], ids]  # (B, T, r): each row's tokens in its own adapter's table
        return y + torch.bmm(low, self.lora_B[rows].transpose(1, 2))


def attach_adapters(model: nn.Module, adapters: list[LoadedAdapter]) -> AdapterSelection:
    """Replace each linear layer (and the token embedding) that any adapter targets by a MultiLoRALinear
    (MultiLoRAEmbedding); adapter i is index i + 1."""
    selection = AdapterSelection()
    modules = dict(model.named_modules())
    targeted = sorted({module for adapter in adapters for module in adapter.weights})
    for path in targeted:
        base = modules.get(path)
        if not isinstance(base, (nn.Linear, nn.Embedding)):
            owner = next(a for a in adapters if path in a.weights)
            raise CheckpointError(f"adapter {owner.name!r} targets {path}, which is not a linear layer or the "
                                  "token embedding of this base model")
        # A maps `fan_in` (features, or token ids) to the rank; B maps the rank to `fan_out`.
        fan_in, fan_out = ((base.in_features, base.out_features) if isinstance(base, nn.Linear)
                           else (base.num_embeddings, base.embedding_dim))
        rank = max(a.weights[path][0].shape[0] for a in adapters if path in a.weights)
        dtype, device = base.weight.dtype, base.weight.device
        A = torch.zeros(len(adapters) + 1, rank, fan_in, dtype=dtype, device=device)
        B = torch.zeros(len(adapters) + 1, fan_out, rank, dtype=dtype, device=device)
        for index, adapter in enumerate(adapters, start=1):
            if path not in adapter.weights:
                continue
            a, b = adapter.weights[path]
            if a.shape[1] != fan_in or b.shape[0] != fan_out or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"adapter {adapter.name!r}: {path} has shapes A {tuple(a.shape)}, B "
                                      f"{tuple(b.shape)}; the base layer is {fan_out}x{fan_in}")
            A[index, :a.shape[0]] = a.to(device, dtype)
            B[index, :, :b.shape[1]] = (b.float() * adapter.scaling).to(device, dtype)
        parent_path, _, child = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        layer = MultiLoRALinear if isinstance(base, nn.Linear) else MultiLoRAEmbedding
        setattr(parent, child, layer(base, selection, A, B))
    return selection
