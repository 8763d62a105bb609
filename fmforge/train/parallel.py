"""How a model is parallelised for training, applied from outside the model (torchtitan's pattern):
activation checkpointing -> compile -> FSDP2 (`fully_shard` each block, then the root) or DDP.

The model file knows nothing of this. The Trainer calls `parallelize` once, before it builds the optimizer
(FSDP2 replaces the parameters with sharded DTensors, and the optimizer must hold those), and then uses the
helpers below for the parts of a step that differ between the layouts: gradient sync across micro-batches,
gradient clipping, autocast, and letting go of gathered parameters after evaluation.

    ddp, 1 process    the model as is
    ddp, N processes  DistributedDataParallel: whole model, gradients and optimizer state on every process
    fsdp, N processes FSDP2: each process keeps 1/N of the parameters, gradients and AdamW moments; a block's
                      parameters are all-gathered just before it runs and freed after
    fsdp, 1 process   nothing to shard: the model as is, but train_state/ is still written through
                      torch.distributed.checkpoint, so the run can resume on N processes

Mixed precision. DDP and one process use bf16 autocast (fp32 weights, bf16 matmuls). FSDP2 instead uses
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the sharded weights and AdamW stay fp32, the
all-gathered copies a block computes with are bf16 (half the communication and memory of fp32), and gradients
are reduce-scattered in fp32 so that summing over many processes loses nothing. Both work on CPU/gloo and
CUDA/NCCL in torch 2.13 (tests run the CPU one).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from ..config import TrainConfig
from ..model import Block
from .distributed import DistInfo


def is_sharded(cfg: TrainConfig, dist: DistInfo) -> bool:
    """True when the model is FSDP2-sharded over several processes (train.parallel fsdp under torchrun)."""
    return cfg.parallel == "fsdp" and dist.enabled


def parallelize(model: torch.nn.Module, cfg: TrainConfig, dist: DistInfo, device: torch.device,
                precision: str) -> torch.nn.Module:
    """Prepare `model` for training in place and return what the training loop calls: the model itself (one
    process, FSDP2) or a compiled and/or DDP wrapper around it (whose state dict still lives in `model`)."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if is_sharded(cfg, dist):
        if cfg.compile:
            for block in blocks(model):  # per block, before sharding: FSDP's hooks stay outside the graphs
                block.compile()
        apply_fsdp(model, dist, device, precision)
        return model
    train_model = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel
        # gradient_as_bucket_view: gradients live in DDP's all-reduce buckets instead of beside a copy of them
        # (4 bytes/parameter less; the same numbers).
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=getattr(model, "has_unused_parameters", False), gradient_as_bucket_view=True)
    return train_model


def blocks(model: torch.nn.Module) -> list[Block]:
    """The transformer blocks of a model (also under a wrapper such as a classifier head)."""
    return [module for module in model.modules() if isinstance(module, Block)]


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    """Each block keeps only its input for backward and runs its forward again there (Chen et al. 2016,
    "Training Deep Nets with Sublinear Memory Cost"): activations fall from ~L full layers to L block inputs
    plus one layer, for ~1/3 more compute. Non-reentrant torch.utils.checkpoint, which composes with
    torch.compile, DDP and FSDP2. The block's forward is wrapped in place, so parameter names (and so state
    dicts and checkpoints) do not change."""
    for block in blocks(model):
        if not getattr(block, "_fmforge_checkpointed", False):
            block.forward = _checkpointed(block.forward)
            block._fmforge_checkpointed = True


def _checkpointed(forward):
    # A closure, not functools.partial(checkpoint, ...): torch.compile of the block (FSDP's per-block compile)
    # traces through a closure but silently captures nothing through the partial (measured, torch 2.13).
    def checkpointed_forward(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return checkpointed_forward


def mixed_precision_policy(precision: str):
    """bf16: bf16 parameters for compute, fp32 gradient reduction; fp32: no casts."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def apply_fsdp(model: torch.nn.Module, dist: DistInfo, device: torch.device, precision: str) -> None:
    """FSDP2: `fully_shard` each block (its own all-gather/reduce-scatter unit), then the root (embeddings,
    final norm and head). Parameters become DTensors sharded on dim 0 over the processes, on `device`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.world_size,))
    policy = mixed_precision_policy(precision)
    layers = blocks(model)
    for index, block in enumerate(layers):
        # The last block's parameters are needed again at once by backward: keep them gathered (torchtitan).
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def release_gathered_parameters(model: torch.nn.Module) -> None:
    """Reshard parameters an FSDP2 forward left gathered: after a no-grad forward (evaluation) the root and the
    last block stay unsharded, since no backward follows to free them; state dicts must see the shards."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gradient_sync(train_model: torch.nn.Module, last_micro_batch: bool):
    """Context for one micro-batch's forward and backward. DDP all-reduces gradients only on the last
    micro-batch (no_sync before). FSDP2 reduce-scatters after every micro-batch: skipping it
    (set_requires_gradient_sync(False)) would keep whole unsharded gradients between micro-batches, the memory
    that sharding is there to save."""
    if last_micro_batch or not hasattr(train_model, "no_sync"):
        return contextlib.nullcontext()
    return train_model.no_sync()


def autocast_precision(precision: str, cfg: TrainConfig, dist: DistInfo) -> str:
    """The precision autocast should run in: none under FSDP2, whose MixedPrecisionPolicy already computes in
    bf16 (autocast on top would only add casts)."""
    return "fp32" if is_sharded(cfg, dist) else precision


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.
    With FSDP2 the gradients are DTensor shards: the norm of the shards is reduced over the processes
    (full_tensor) before clipping, so every process clips by the same global norm."""
    parameters = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if hasattr(total, "full_tensor"):  # a DTensor
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return float(total)
