"""Where tensors live and in what precision: one set of rules for training, generation and serving."""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """auto (cuda when a GPU is there, else cpu), cpu, cuda or cuda:N; `option` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"{option} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {name} but no CUDA GPU is available; use {option} cpu")
        if ":" in name and int(name[5:]) >= torch.cuda.device_count():
            raise ConfigError(f"{option} {name} but this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, option: str = "--dtype") -> torch.dtype:
    """Inference weights' dtype. auto: bf16 on a GPU that supports it; fp32 on the CPU (batch-1 decoding there is
    bound by overheads and memory, where bf16 gains nothing and costs accuracy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{option} must be auto, float32, bfloat16 or float16, got {name!r}")
    return DTYPES[name]


def release_openmp_threads() -> bool:
    """Free the OpenMP worker threads of the calling thread (OpenMP 5's omp_pause_resource, soft, on the host).

    PyTorch's OpenMP runtime keeps a pool of workers for every thread that ever ran a parallel op. Once all the pools'
    workers outnumber the CPUs, libgomp stops letting idle workers spin (they sleep at once), and every parallel op
    then pays to wake them: on 2 cores, the engine decoding 16 streams in its own thread ran at 1,000 tokens/s while
    the main thread kept the pool it loaded the model with, and at 1,410 (as fast as in the main thread) once that
    pool was freed. So a thread that hands its torch work to another (the server's main thread once the engine
    starts, a worker thread that decoded an image) calls this; a later parallel op in it builds a new pool.

    Every OpenMP runtime loaded in the process is paused, not only torch's: other wheels bring their own copies
    (scikit-learn vendors a libgomp), and pausing one frees nothing of another's pools. Returns False where no loaded
    runtime has the call (a build without OpenMP, a platform without /proc) or one of them refused."""
    pauses = _openmp_pauses()
    return bool(pauses) and all(pause() == 0 for pause in pauses)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's malloc reuse freed memory instead of handing it back to the kernel at once.

    A training step allocates and frees the same large tensors every time (activations, gradients, a bf16 copy of
    each weight). By default glibc serves blocks of more than a few MB with mmap and returns them with munmap, and
    trims the heap's free top beyond twice that: the next step's tensors then start on fresh pages, and the kernel
    zero-fills every page on first touch (the `base` preset's bf16 step: 14,000-57,000 minor page faults a step).
    Serving blocks up to `mmap_threshold` from the heap and trimming only beyond `trim_threshold` keeps those pages
    (0-3 faults a step): 712-748 ms a step against 832-876 (2 threads, benchmarks' `base` shape). The memory stays
    with the process (up to `trim_threshold` idle at the heap's top), which a training run holds again at its next
    step anyway. Returns False where the C library has no mallopt (not
    glibc) or refuses a value; the process then runs with the library's defaults."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


_RUNTIMES: dict = {}  # path -> the runtime's pause function, or None where it has none


def openmp_runtimes() -> set[str]:
    """The paths of the OpenMP runtimes loaded in this process now (empty where /proc cannot tell)."""
    import re

    try:
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", line)}
    except OSError:
        return set()


def _openmp_pauses() -> list:
    """The pause function of each OpenMP runtime loaded now (a library loaded later is found on a later call)."""
    paths = openmp_runtimes()
    for path in paths - _RUNTIMES.keys():
        _RUNTIMES[path] = _pause_of(path)
    return [_RUNTIMES[path] for path in sorted(paths) if _RUNTIMES[path] is not None]


def _pause_of(path: str):
    import ctypes

    try:
        runtime = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        pause, host = runtime.omp_pause_resource, runtime.omp_get_initial_device
    except (OSError, AttributeError):
        return None
    soft = 1  # omp_pause_soft: threads go, state is rebuilt on the next parallel region
    return lambda: pause(soft, host())
