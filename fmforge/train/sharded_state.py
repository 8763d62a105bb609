"""train_state/sharded/: the model and AdamW state of a run written through torch.distributed.checkpoint (DCP),
so that a run resumes on any number of processes.

Each process writes its own shards (no process ever holds the whole optimizer state) and DCP records which
slice of which tensor every file holds; loading reads back, on each process, the slices its current layout
needs: 2 FSDP processes -> 1 process, 1 -> 2, or the same number (bit-exact). State dicts go through
torch.distributed.checkpoint.state_dict.get_state_dict/set_state_dict, which name optimizer state by parameter
(not by position) and speak both plain tensors and FSDP2's DTensors.

The complete model.safetensors beside it is written as before (gathered to rank 0), for every later stage.

DCP's own reader unpickles its metadata file and torch.load()s non-tensor values with weights_only=False, which
would run whatever code a crafted checkpoint holds. Here the metadata is unpickled with an allow-list of DCP's
record classes and the values are read with weights_only=True: fmforge never executes a checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict, set_state_dict)

from ..errors import CheckpointError


def is_distributed_tensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor")  # torch.distributed.tensor.DTensor, without importing it eagerly


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the main process, in CPU memory ({} on the others). Under FSDP2 this is
    a collective: every process must call it (each contributes its shards)."""
    if not any(is_distributed_tensor(p) for p in model.parameters()):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the model and optimizer state into `directory` with DCP: each process its own shards, the main
    process the metadata. A collective under torchrun: every process calls it with the same directory."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(directory),
                     no_dist=not torch.distributed.is_initialized())
    except (OSError, RuntimeError, CheckpointException) as exc:  # a full or read-only disk, on any process
        raise CheckpointError(f"cannot write the sharded train_state {directory}: {_first_line(exc)} — free disk "
                              f"space or make {Path(directory).parent} writable") from None


def load_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load the state save_sharded wrote into `model` and `optimizer`, whatever their layout now (one process,
    DDP, FSDP2 over any number of processes). A collective under torchrun."""
    model_state, optimizer_state = get_state_dict(model, optimizer)  # templates: which slices this process needs
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_is_intended():
            dcp.load(state, storage_reader=_SafeReader(Path(directory)), planner=_SafeLoadPlanner(),
                     no_dist=not torch.distributed.is_initialized())
    except (Exception, CheckpointException) as exc:  # DCP gathers each process's failure (missing file, bad
        # pickle, wrong shape) into one CheckpointException, a BaseException
        raise CheckpointError(f"cannot load the sharded train_state {directory}: {_first_line(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_into_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path,
                           optimizer_state: dict) -> None:
    """Resume an FSDP2 run from a checkpoint written by one process or DDP: the whole model.safetensors and an
    optimizer.pt keyed by parameter position. Each process keeps its own slices (full_state_dict=True)."""
    weights = load_file(str(checkpoint / "model.safetensors"))
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        weights["lm_head.weight"] = weights["embed_tokens.weight"]  # stored once, named twice in the model
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(model, optimizer, optimizer_state),
                             options=options)


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """torch's Optimizer.state_dict() (state keyed by the parameter's position in the param groups) rekeyed by
    parameter name, the form set_optimizer_state_dict reads. Positions follow `optimizer`'s param groups, which
    build_optimizer fills in the same order for every layout."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(group["params"]) for group in state["param_groups"]):
        raise CheckpointError("the saved optimizer state has another number of parameters than this model")
    return {"state": {order[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


# ---- reading DCP files without running code -----------------------------------------------------------------

_METADATA_CLASSES = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


def _torch_constant(name: str) -> bool:
    """A dtype, layout or memory format of torch (pickled by name, as `torch.float32`)."""
    value = getattr(torch, name, None) if not name.startswith("_") else None
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, allowing only the record classes such a file holds. The names are checked before
    anything is imported, so a crafted file can neither import a module nor build any other object."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_CLASSES and not (module == "torch" and _torch_constant(name)):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
        from torch.distributed.checkpoint.metadata import StorageMeta
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        # The non-tensor values (param groups' lr, betas, ...), read as DefaultLoadPlanner does but weights-only.
        super().load_bytes(read_item, io.BytesIO(_weights_only_bytes(value)))


def _weights_only_bytes(value: io.BytesIO) -> bytes:
    """Check that a torch.save'd value loads with weights_only=True; return its bytes re-saved (so the parent
    class, which loads without that check, only ever sees data that passed it)."""
    checked = torch.load(value, weights_only=True)
    buffer = io.BytesIO()
    torch.save(checked, buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save and load outside torchrun that it assumes one process: here that is the plan."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*assuming the intent")
        yield


def _first_line(exc: BaseException) -> str:
    """The first line of what went wrong; for DCP's CheckpointException, of the first failing process's error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        exc = next(iter(exc.failures.values()))[0]
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
