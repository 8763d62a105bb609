"""`fmforge plan`: the memory arithmetic of training a model shape on N GPUs, with DDP or FSDP2, with and
without activation checkpointing. Estimates in bytes per GPU; nothing is allocated.

Model states (per parameter, the Trainer's layout: fp32 weights, fp32 gradients, AdamW with two fp32 moments):

    weights 4 B + gradients 4 B + AdamW moments 8 B = 16 B/parameter
    (the "16Ψ" of ZeRO, Rajbhandari et al. 2020, sec. 3.1)

    DDP    every GPU holds all of it, plus, under bf16 autocast, the bf16 copy of each weight that autocast makes in
           the forward and keeps for the backward (2 B/parameter).
    FSDP2  every GPU holds 1/N of it, plus a working set of whole (all-gathered) units: the root (embeddings,
           final norm, head: gathered for the whole forward) and two blocks (the one computing and the one
           prefetched), each as a bf16 weight copy and its unsharded bf16 gradient before reduce-scatter.

Activations (saved for backward), per token, counted the way Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", sec. 4.1) count a GPT block -- every tensor an op keeps for its
backward -- but for fmforge's Llama block (RMSNorm in fp32, fused attention that keeps no T x T scores, SwiGLU),
C = n_embd, I = the MLP's hidden size (for MoE: experts per token x expert size + shared experts' sizes):

    one block, bf16 weights (FSDP2 MixedPrecisionPolicy)   24 C + 8 I bytes
    one block, bf16 autocast over fp32 weights (DDP)       34 C + 8 I bytes (the residual stream stays fp32)
    one block, fp32                                         40 C + 16 I bytes
    the head: fp32 log-probabilities for the loss           4 V + 10 C bytes (V = vocabulary)

These constants are what torch autograd saves for fmforge's block (tests/test_fsdp.py measures it with
saved_tensors_hooks and holds the formula to it). With activation checkpointing a block keeps only its input
(2 C bytes in bf16, 4 C in fp32) and one block's activations exist again while it is recomputed:

    activations = B T (L x block + head)                 without checkpointing
    activations = B T (L x input + block + head)         with checkpointing

Not counted: the CUDA context, allocator fragmentation and temporary buffers (communication buckets, the
forward's transient logits copies); `fits` therefore leaves 10% of each GPU's memory free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig

GiB = 2 ** 30
USABLE_FRACTION = 0.9  # of a GPU's memory; the rest for the CUDA context, fragmentation and temporary buffers
GPU_COUNTS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # FSDP2 over one GPU has nothing to shard


@dataclass
class MemoryEstimate:
    """Bytes per GPU."""

    parameters: float  # fp32 weights (this GPU's shard under FSDP2)
    gradients: float  # fp32 gradients
    optimizer: float  # AdamW's two fp32 moments
    weight_copies: float  # bf16 copies: autocast's (DDP) or the all-gathered working set with its gradients (FSDP2)
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.weight_copies + self.activations


def root_parameters(config: ModelConfig) -> int:
    """Parameters outside the blocks: embeddings, the untied head, the final norm (FSDP2's root unit)."""
    return config.vocab_size * config.n_embd * (1 if config.tie_embeddings else 2) + config.n_embd


def mlp_width(config: ModelConfig) -> int:
    """I: the MLP hidden units a token's activations pass through (MoE: its routed experts + shared experts)."""
    if config.n_experts:
        return config.n_experts_per_token * config.moe_intermediate_size + \
            config.n_shared_experts * config.intermediate_size
    return config.intermediate_size


def block_activation_bytes(config: ModelConfig, parallel: str, precision: str) -> int:
    """Bytes one block saves for backward per token (see the module docstring)."""
    C, I = config.n_embd, mlp_width(config)
    if precision == "fp32":
        return 40 * C + 16 * I
    return 24 * C + 8 * I if parallel == "fsdp" else 34 * C + 8 * I


def activation_bytes(config: ModelConfig, context: int, batch: int, parallel: str, precision: str,
                     checkpointing: bool) -> float:
    """Activations saved for backward on one GPU: `batch` sequences of `context` tokens."""
    C, L = config.n_embd, config.n_layer
    block = block_activation_bytes(config, parallel, precision)
    head = 4 * config.vocab_size + 10 * C
    if checkpointing:
        block_input = 2 * C if (parallel == "fsdp" and precision == "bf16") else 4 * C
        return batch * context * (L * block_input + block + head)
    return batch * context * (L * block + head)


def estimate(config: ModelConfig, context: int, batch: int, gpus: int, parallel: str, checkpointing: bool,
             precision: str = "bf16") -> MemoryEstimate:
    """Memory per GPU of training `config` with AdamW: `batch` sequences of `context` tokens per GPU, on `gpus`
    GPUs with parallel = "ddp" or "fsdp", in precision "bf16" or "fp32"."""
    P = config.num_parameters()
    activations = activation_bytes(config, context, batch, parallel, precision, checkpointing)
    compute_bytes = 2 if precision == "bf16" else 4
    if parallel == "ddp":
        copies = 2 * P if precision == "bf16" else 0
        return MemoryEstimate(4 * P, 4 * P, 8 * P, copies, activations)
    block = (P - root_parameters(config)) / config.n_layer
    gathered = root_parameters(config) + 2 * block
    working = gathered * 2 * compute_bytes  # the gathered weights and their unsharded gradients
    return MemoryEstimate(4 * P / gpus, 4 * P / gpus, 8 * P / gpus, working, activations)


def smallest_gpu_count(config: ModelConfig, context: int, batch: int, parallel: str, checkpointing: bool,
                       gpu_memory_gib: float, precision: str = "bf16") -> int | None:
    """The fewest GPUs on which the estimate fits USABLE_FRACTION of each GPU's memory (DDP: 1 or None, its
    per-GPU memory does not fall with more GPUs; FSDP2: one of GPU_COUNTS, or None)."""
    budget = gpu_memory_gib * GiB * USABLE_FRACTION
    for gpus in [1] if parallel == "ddp" else GPU_COUNTS:
        if estimate(config, context, batch, gpus, parallel, checkpointing, precision).total <= budget:
            return gpus
    return None


def format_plan(name: str, config: ModelConfig, context: int, batch: int, gpus: int, gpu_memory_gib: float,
                precision: str = "bf16") -> str:
    """The report `fmforge plan` prints: a table per GPU for DDP and FSDP2 over `gpus` GPUs, and the fewest
    GPUs of `gpu_memory_gib` GiB each configuration fits on."""
    P = config.num_parameters()
    ddp = estimate(config, context, batch, gpus, "ddp", False, precision)
    fsdp = estimate(config, context, batch, gpus, "fsdp", False, precision)
    ddp_ac = activation_bytes(config, context, batch, "ddp", precision, True)
    fsdp_ac = activation_bytes(config, context, batch, "fsdp", precision, True)
    gib = lambda value: f"{value / GiB:,.1f} GiB"  # noqa: E731
    rows = [
        ("weights (fp32)", ddp.parameters, fsdp.parameters),
        ("gradients (fp32)", ddp.gradients, fsdp.gradients),
        ("AdamW moments (2 x fp32)", ddp.optimizer, fsdp.optimizer),
        ("weight copies (autocast|gathered)", ddp.weight_copies, fsdp.weight_copies),
        ("activations", ddp.activations, fsdp.activations),
        ("total", ddp.total, fsdp.total),
        ("  activations, checkpointed", ddp_ac, fsdp_ac),
        ("  total, checkpointed", ddp.total - ddp.activations + ddp_ac, fsdp.total - fsdp.activations + fsdp_ac),
    ]
    lines = [f"{name}: {P / 1e9:.2f}B parameters ({config.n_layer} layers, n_embd {config.n_embd}, vocabulary "
             f"{config.vocab_size:,}), context {context:,}, batch {batch} sequence{'s' * (batch > 1)} per GPU, "
             f"{precision}",
             f"{'per GPU':<34}{'DDP':>12}{f'FSDP2 over {gpus}':>18}"]
    lines += [f"{label:<34}{gib(a):>12}{gib(b):>18}" for label, a, b in rows]
    budget = gpu_memory_gib * USABLE_FRACTION
    lines.append(f"fits on {gpu_memory_gib:g} GiB GPUs (counting {budget:.0f} GiB usable each):")
    for parallel, checkpointing in [("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True)]:
        label = ("DDP" if parallel == "ddp" else "FSDP2") + (" + activation checkpointing" if checkpointing else "")
        count = smallest_gpu_count(config, context, batch, parallel, checkpointing, gpu_memory_gib, precision)
        if count is None:
            need = estimate(config, context, batch, GPU_COUNTS[-1], parallel, checkpointing, precision).total
            verdict = f"no: {gib(need)} per GPU" + ("" if parallel == "ddp" else f" even on {GPU_COUNTS[-1]}")
        else:
            at = estimate(config, context, batch, count, parallel, checkpointing, precision).total
            verdict = ("yes, on each GPU" if parallel == "ddp" else f"on {count} GPUs or more") + \
                f": {gib(at)} per GPU"
        lines.append(f"  {label:<36}{verdict}")
    lines += ["bytes: 4 weights + 4 gradients + 8 AdamW per parameter (ZeRO's 16); activations per token L x block "
              "+ head,",
              "  block = 24C+8I (FSDP2 bf16) | 34C+8I (DDP autocast) | 40C+16I (fp32), head = 4V+10C; "
              "checkpointed: L x block input",
              "  (2C bf16, 4C fp32) + one block + head. C = n_embd, I = MLP width, V = vocabulary; "
              "see fmforge/train/plan.py"]
    return "\n".join(lines)
