"""Small runtime helpers every layer of the package may use: choices, device choice, distributed set-up, autocast,
atomic file writes."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from moe_cli.errors import ConfigError


class Choice(str, Enum):
    """A named choice that prints as its value (``f"{Precision.bf16}"`` is ``bf16``) and equals its string. Every
    set of choices (gates, dispatchers, inits, precisions) is one of these, declared once; config fields are
    typed with it and the CLI lists it. A member may carry a help text: ``topk = "topk", "each token its k best
    experts"`` (:func:`describe` lists them)."""

    def __new__(cls, value: str, help: str = ""):
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.help = help
        return obj

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def of(cls, name: str, **members: str) -> type[Choice]:
        """A Choice called ``name`` whose members are the keywords, each with its help text:
        ``Choice.of("Split", cluster="balanced k-means", random="a random partition")``."""
        module = sys._getframe(1).f_globals.get("__name__", __name__)  # where it is defined: pickling finds it
        return cls(name, [(key, (key, help)) for key, help in members.items()], module=module)


def describe(choice: type[Choice]) -> str:
    """'a: what a does; b: what b does' for the members of ``choice`` that carry a help text."""
    return "; ".join(f"{m.value}: {m.help}" for m in choice if m.help)


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


class Parallel(Choice):
    """How torchrun ranks hold the model: whole on every rank, or sharded."""

    ddp = "ddp"  # every rank holds the whole model, gradients averaged (DistributedDataParallel)
    fsdp = "fsdp"  # parameters, gradients and optimizer state sharded over the ranks (FSDP2 fully_shard)


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', ...) checked; else the ``MOE_DEVICE`` environment variable; else
    cuda when available, else cpu. Devices that cannot run a model (meta, ...) are refused in one line."""
    where = "--device" if requested else "MOE_DEVICE"
    requested = requested or os.environ.get("MOE_DEVICE") or None
    if requested:
        try:
            dev = torch.device(requested)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"{where} must be cpu, cuda or cuda:N, got {requested!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{where} {requested}: CUDA is not available on this machine")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{where} {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: take the GPU of this process's local rank (``cuda`` ->
    ``cuda:LOCAL_RANK``, made the current device, as NCCL and FSDP expect) and join the group (NCCL on GPU, gloo
    on CPU). Returns this process's place and its device. One torchrun process joins a group of one (the NCCL
    path on one GPU); without torchrun nothing is joined."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return Dist(), device
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", d.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=d.rank, world_size=world)
    return d, device


def autocast(device: torch.device, precision: str):
    """Mixed precision for ``precision`` bf16/fp16 on ``device``; fp32 is a no-op context."""
    if precision == Precision.fp32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=Precision(precision).dtype)


def reuse_freed_memory() -> bool:
    """Keep the host memory this process frees for its next allocations instead of handing it back to the OS
    (glibc's allocator; elsewhere nothing changes). Returns whether the setting took.

    glibc serves every block above 32 MB with a fresh ``mmap`` and unmaps it on free, so each training step's
    weight gradients of a many-expert layer (E x H x D floats each) are new pages the kernel faults in and zeroes
    again: at E = 128 that was 40% of the layer's CPU forward+backward (bench/RESULTS.md). With mmap off and no
    trimming, freed blocks go back to the heap and the next step reuses them. Process-wide, so the training
    commands (``moe finetune``, ``moe densify-to-sparse``) call it when they train on the CPU, not the library;
    resident memory then stays near the run's peak rather than falling between steps (on a GPU host that would
    keep the host copy of a loaded checkpoint, so it is not done there)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def memory_bytes(device: torch.device | None = None) -> int | None:
    """Memory of ``device`` (CUDA: the GPU's; else what this process may use: the machine's RAM, lowered by what
    is left of an address-space limit (``ulimit -v``) or by a cgroup memory limit), or None when unknown."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:  # what is left of the address space this process may map
            used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(soft - used, 0))
    except (ImportError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            limits.append(int(text))
    return min(limits) if limits else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp_path)``, flush it to disk and rename onto ``target``, so no half-written file is ever
    visible, even after a power cut. The file gets the permissions the umask gives new files (not mkstemp's
    0600); temporary files that a killed earlier write left for ``target`` are removed first. A folder that
    cannot be written is an OSError naming ``target``, not the temporary file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except PermissionError as e:
        raise PermissionError(e.errno, e.strerror, str(target)) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_size(value: str | int | None, what: str = "--max-shard-size") -> int | None:
    """'5GB', '500MB', 10**9 -> bytes (huggingface_hub's rule), None stays None; else one line naming ``what``."""
    if value is None or isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        size = parse_size_to_int(str(value))
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"{what} must be a size such as 5GB, 500MB or 200KB, got {value!r}")
    return size
