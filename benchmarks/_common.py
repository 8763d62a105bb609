"""What every benchmark shares: the RESULTS.md section writer, a description of the machine and of how busy it is,
CPU accounting from /proc, the Hugging Face twin of an fmforge model, and random models and checkpoints.

A script run as `python benchmarks/NAME.py` has benchmarks/ on sys.path[0], so `import _common` works; fmforge
comes from the installed package. Nothing heavy is imported at the top: interop_benchmark.py reads this module
inside processes whose baseline memory it measures.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"


# ---- the report ---------------------------------------------------------------------------------------------

def write_section(name: str, body: str, path: Path = RESULTS) -> None:
    """Replace the block between `<!-- name:start -->` and `<!-- name:end -->` of `path` with `body`, or append the
    block at the end. The file is read at the moment of writing: other runs and people edit it too."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# fmforge benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def section_name(base: str, threads: int) -> str:
    """A run on fewer threads than CPUs (the clean choice on a busy shared machine) keeps its own section."""
    return base if threads == os.cpu_count() else f"{base}-threads{threads}"


def git_state() -> str:
    """The commit under test, marked when fmforge/ has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fmforge"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes in fmforge/" if dirty else "")


# ---- stages: the CLI in this process, cached outputs ------------------------------------------------------------

def cli(*args) -> None:
    """`fmforge ARGS` in this process; a failure stops the benchmark. Prints how long it took."""
    from fmforge.cli import main
    started = time.perf_counter()
    code = main([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"fmforge {' '.join(map(str, args[:3]))} ... failed ({code})")
    print(f"  [{time.perf_counter() - started:.0f}s] fmforge {' '.join(map(str, args[:2]))}", flush=True)


def stage(name: str, done: Path) -> bool:
    """Print the stage; whether it still has to run (its output `done` does not exist yet)."""
    print(f"== {name}" + (" (cached)" if done.exists() else ""), flush=True)
    return not done.exists()


def cached_json(path: Path, compute):
    """The JSON at `path`, or compute() written there first (atomically: a stopped run leaves no half file)."""
    import json
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)
    return value


def latest(run: Path) -> Path:
    """The newest complete checkpoint of a run directory (or the checkpoint directory itself)."""
    from fmforge.checkpoint import resolve_checkpoint
    return resolve_checkpoint(run)


# ---- the machine --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the architecture where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> tuple[float, float, float]:
    """Runnable processes averaged over 1, 5 and 15 minutes (/proc/loadavg)."""
    return os.getloadavg()


def describe_machine(threads: int | None = None) -> str:
    """One line for a report: CPU, cores (and how many we use), GPU, library versions, load average now."""
    import torch

    parts = [f"{cpu_model()}, {os.cpu_count()} CPUs" + (f" ({threads} used)" if threads else "")]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    parts.append(f"torch {torch.__version__}")
    try:
        import transformers

        parts.append(f"transformers {transformers.__version__}")
    except ImportError:
        pass
    parts.append("load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min)".format(*load_average()))
    return ", ".join(parts)


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS; VmHWM, the peak, which restarts at exec) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass(frozen=True)
class CpuSample:
    """Wall time (s), busy clock ticks of the whole machine, and clock ticks used by the processes we measure."""
    wall: float
    busy: int
    ours: int


def cpu_sample(pids: list[int]) -> CpuSample:
    """Read /proc/stat (steal counts as busy: the hypervisor gave our CPU to another VM) and /proc/PID/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    ours = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ours += int(stat[11]) + int(stat[12])  # utime + stime
    return CpuSample(time.perf_counter(), busy, ours)


def other_cpu_share(before: CpuSample, after: CpuSample, threads: int) -> float:
    """Share of our `threads` CPUs that other processes took between two samples: the CPU time anything but the
    measured processes used, beyond the CPUs we leave free (os.cpu_count() - threads), over our CPUs."""
    seconds = after.wall - before.wall
    if seconds <= 0:
        return 0.0
    other_cpus = ((after.busy - before.busy) - (after.ours - before.ours)) / (seconds * os.sysconf("SC_CLK_TCK"))
    return max(0.0, other_cpus - (os.cpu_count() - threads)) / threads


# ---- models -------------------------------------------------------------------------------------------------

def stdlib_texts(*names: str) -> list[str]:
    """Source files of this interpreter's standard library (e.g. "textwrap.py"): text to train a tokenizer on."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text() for name in names]


def stdlib_tokenizer(vocab_size: int = 2048, names: tuple[str, ...] = ("textwrap.py", "difflib.py")):
    """An fmforge byte-level BPE tokenizer trained on a few stdlib modules (seconds)."""
    from fmforge.tokenizer import train_tokenizer

    return train_tokenizer(stdlib_texts(*names), vocab_size)


def random_model(config, seed: int = 0):
    """fmforge Transformer(config) with its own initialisation, seeded."""
    import torch

    from fmforge.model import Transformer

    torch.manual_seed(seed)
    return Transformer(config).eval()


def save_checkpoint(directory: Path, model, tokenizer) -> Path:
    """Write `tokenizer` to directory/tokenizer and a checkpoint of `model` with it to directory/model."""
    from fmforge.checkpoint import write_checkpoint

    tokenizer.save(directory / "tokenizer")
    return write_checkpoint(directory / "model", model, directory / "tokenizer")


def hf_model(config):
    """transformers' model of the family that expresses fmforge's ModelConfig `config` (Llama for a dense model
    without biases), fp32, sdpa attention, random weights; the config comes from fmforge's exporter."""
    import torch
    import transformers

    from fmforge.interop.hf import family_for, hf_config_from_model_config

    fields = hf_config_from_model_config(config, family_for(config, "llama"), torch.float32, {})
    model_type = fields.pop("model_type")
    for key in ("architectures", "torch_dtype"):
        fields.pop(key)
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    return transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa",
                                                         dtype=torch.float32).eval()


def hf_twin(model):
    """hf_model(model.config) holding the weights of the fmforge `model` (renamed as `fmforge export hf` does)."""
    from fmforge.checkpoint import model_state_for_saving
    from fmforge.interop.hf import family_for, hf_name

    twin = hf_model(model.config)
    model_type = family_for(model.config, "llama")
    state = {hf_name(k, model_type): v.float() for k, v in model_state_for_saving(model).items()}
    missing, unexpected = twin.load_state_dict(state, strict=False)
    tied = model.config.tie_embeddings and missing == ["lm_head.weight"]
    if unexpected or (missing and not tied):
        raise RuntimeError(f"the transformers twin does not match: missing {missing}, unexpected {unexpected}")
    return twin
