"""Device and dtype resolution, synchronisation, memory and timing for cpu, cuda, npu and mps.

Everything backend-specific lives here. torch_npu is imported only when an NPU is asked for
(or probed by `auto`), so a missing or broken CANN never breaks CPU or GPU use.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("cpu", "cuda", "npu", "mps")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# Without expandable segments the NPU caching allocator fragments badly on variable-length batches.
NPU_ALLOC_CONF = "expandable_segments:True"


class DeviceError(RuntimeError):
    """A device or dtype that cannot be used here, with a message meant for a person."""


_npu_failure: str | None = None  # why an installed torch_npu could not be loaded


def guard_torch_npu() -> None:
    """Load an installed torch_npu before transformers does, and hide it if CANN is broken.

    transformers (4.57 and 5.x) imports any installed torch_npu unguarded at import time, so a broken
    CANN would crash it. Where loading fails, the reason is kept for `--device npu` and torch_npu is
    marked absent, so CPU and GPU use go on.
    """
    global _npu_failure
    if _npu_failure is not None or importlib.util.find_spec("torch_npu") is None:
        return
    try:
        _load_torch_npu()
    except DeviceError as error:
        _npu_failure = str(error)
        sys.modules["torch_npu"] = None  # find_spec and import now treat it as not installed


def _load_torch_npu() -> None:
    """Import torch_npu once; raise DeviceError with advice instead of a CANN traceback."""
    if _npu_failure is not None:
        raise DeviceError(_npu_failure)
    if sys.modules.get("torch_npu") is not None:
        return
    os.environ.setdefault("PYTORCH_NPU_ALLOC_CONF", NPU_ALLOC_CONF)
    if importlib.util.find_spec("torch_npu") is None:
        raise DeviceError(
            "npu requested but torch_npu is not installed: install CANN and the torch_npu release "
            f"built for torch {torch.__version__.split('+')[0]} (README: 'Ascend NPU')"
        )
    try:
        import torch_npu  # noqa: F401
    except Exception as error:  # a broken CANN raises OSError, ImportError or RuntimeError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DeviceError(
            f"torch_npu is installed but could not be loaded ({first_line}); "
            "source CANN's set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) and check that "
            "torch_npu matches torch and CANN (README: 'Ascend NPU')"
        ) from None


def _npu_count() -> int:
    _load_torch_npu()
    return torch.npu.device_count() if torch.npu.is_available() else 0


def _count(kind: str) -> int:
    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    return _npu_count()


def choose_auto(npu: int, cuda: int, mps: int) -> str:
    """The device `auto` means, given how many of each accelerator are usable: npu > cuda > mps > cpu."""
    if npu:
        return "npu:0"
    if cuda:
        return "cuda:0"
    if mps:
        return "mps"
    return "cpu"


def _auto_npu_count() -> int:
    # `auto` only probes the NPU where torch_npu is installed, and falls back with a warning if CANN is broken.
    if _npu_failure is None and importlib.util.find_spec("torch_npu") is None:
        return 0
    try:
        return _npu_count()
    except DeviceError as error:
        print(f"acecap: warning: {error}; not using the NPU", file=sys.stderr)
        return 0


def _auto() -> str:
    """What `auto` means on this machine (choose_auto over its devices)."""
    return choose_auto(_auto_npu_count(), _count("cuda"), _count("mps"))


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn `auto`, `cpu`, `cuda[:i]`, `npu[:i]` or `mps` into a usable torch.device, or raise DeviceError."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = _auto()
    kind, _, index_text = spec.partition(":")
    if kind not in KINDS:
        raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda[:i], npu[:i] or mps")
    if index_text and (not index_text.isdigit() or kind in ("cpu", "mps")):
        raise DeviceError(f"bad device {spec!r}: only cuda and npu take an index, like cuda:1")
    index = int(index_text) if index_text else 0
    count = _count(kind)
    if count == 0:
        raise DeviceError(f"device {spec!r} is not available on this machine (torch {torch.__version__})")
    if index >= count:
        raise DeviceError(f"device {spec!r} does not exist: this machine has {count} {kind} device(s)")
    return torch.device(kind) if kind in ("cpu", "mps") else torch.device(kind, index)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on accelerators and fp32 on cpu; otherwise bf16, fp16 or fp32."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if spec not in DTYPES:
        raise DeviceError(f"unknown dtype {spec!r}: use auto, bf16, fp16 or fp32")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _backend(device: torch.device):
    """The torch.<backend> module with the memory and synchronize API of this device, or None for cpu."""
    return {"cuda": torch.cuda, "npu": getattr(torch, "npu", None), "mps": torch.mps}.get(device.type)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on the device, so wall-clock timings mean something."""
    if device.type in ("cuda", "npu"):
        _backend(device).synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def now(device: torch.device) -> float:
    """A timestamp taken after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the allocator's on a card; on Linux CPUs the process's resident high-water mark."""
    if device.type in ("cuda", "npu"):
        _backend(device).reset_peak_memory_stats(device)
    elif device.type == "cpu" and _STATUS.is_file():
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current resident size
        except OSError:
            pass  # not allowed here: the peak stays the process's since it started


def peak_memory(device: torch.device) -> int:
    """Peak bytes allocated on the device since the last reset; on the CPU the process's peak resident memory
    since the last reset (Linux) or since it started (elsewhere)."""
    if device.type in ("cuda", "npu"):
        return int(_backend(device).max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    if _STATUS.is_file():
        return _status_bytes("VmHWM")
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def resident_memory() -> int:
    """The process's resident memory now (Linux), 0 where it cannot be read."""
    return _status_bytes("VmRSS") if _STATUS.is_file() else 0


_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    return int(match.group(1)) * 1024 if match else 0


def memory_info(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on the device, or None where the backend cannot tell."""
    if device.type in ("cuda", "npu"):
        free, total = _backend(device).mem_get_info(device)
        return int(free), int(total)
    if device.type == "cpu" and Path("/proc/meminfo").is_file():
        # MemAvailable counts reclaimable page cache, which free pages alone do not.
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemAvailable"].split()[0]) * 1024, int(fields["MemTotal"].split()[0]) * 1024
    return None


def check_fits(
    weight_bytes: int, device: torch.device, dtype: torch.dtype, free: int | None = None, quant: str = "none"
) -> None:
    """Refuse up front, with advice, to load weights that cannot fit, instead of dying mid-load."""
    if free is None:
        info = memory_info(device)
        if info is None:
            return
        free = info[0]
    if weight_bytes <= free:
        return
    need, have = weight_bytes / 2**30, free / 2**30
    if dtype == torch.float32:
        advice = "use --dtype bf16 to halve it, or "
    elif quant == "none":
        advice = "use --quant int8 or int4 to shrink it (pip install 'acecap[quant]'), or "
    else:
        advice = "use --quant int4, or " if quant != "int4" else ""
    what = dtype_name(dtype) if quant == "none" else f"{quant} ({dtype_name(dtype)} activations)"
    raise DeviceError(
        f"the model's weights need {need:.1f} GiB in {what} but {device} has {have:.1f} GiB free; "
        f"{advice}free memory or choose another device"
    )


def device_name(device: torch.device) -> str:
    """A human name for the device, like 'NVIDIA H100 80GB HBM3' or 'Ascend910B2'."""
    if device.type in ("cuda", "npu"):
        return str(_backend(device).get_device_name(device))
    if device.type == "cpu":
        return f"{os.cpu_count()} CPU cores"
    return device.type


@dataclass(frozen=True)
class Available:
    """What accelerators this process can use, for `acecap doctor`."""

    cuda: int
    npu: int | str  # a count, or the reason torch_npu could not be loaded
    mps: bool


def available() -> Available:
    try:
        installed = _npu_failure is not None or importlib.util.find_spec("torch_npu") is not None
        npu: int | str = _npu_count() if installed else "torch_npu not installed"
    except DeviceError as error:
        npu = str(error)
    return Available(cuda=_count("cuda"), npu=npu, mps=bool(_count("mps")))


OUT_OF_MEMORY = ("out of memory", "can't allocate memory")  # torch_npu's and the CPU allocator's words


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation failure: torch's OutOfMemoryError (CUDA), the RuntimeError of torch_npu or the CPU, or a
    MemoryError, here or anywhere in the chain of causes (transformers wraps numpy's in a ValueError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(error, RuntimeError) and any(words in str(error).lower() for words in OUT_OF_MEMORY):
            return True
        error = error.__cause__ or error.__context__
    return False


def empty_cache(device: torch.device) -> None:
    """Return cached blocks to the device after an out-of-memory, so a smaller retry can fit."""
    if device.type in ("cuda", "npu", "mps"):
        _backend(device).empty_cache()


def device_kind(spec: str) -> str:
    """cpu, cuda, npu or mps: the kind of device `spec` names (`auto`: this machine's choice)."""
    spec = spec.strip().lower()
    return (_auto() if spec == "auto" else spec).partition(":")[0]


def expand_devices(spec: str) -> list[str]:
    """`all` → every card of the preferred accelerator (else one cpu); a comma list → its items."""
    if spec.strip().lower() == "all":
        first = _auto()
        kind = first.partition(":")[0]
        if kind in ("cuda", "npu"):
            return [f"{kind}:{index}" for index in range(_count(kind))]
        return [first]
    return [part.strip() for part in spec.split(",") if part.strip()]


def packs_prompts(device: torch.device) -> bool:
    """Whether prefill packs several prompts into one pass. An accelerator gains larger matrix products; a CPU
    is at its peak with one prompt's, and a packed pass's activations outgrow glibc's reused heap, so each is
    faulted in afresh: prefill of 16 clips of 5–240 s measured 18 % slower packed in a job (docs/benchmarks.md)."""
    return device.type != "cpu"


M_ARENA_MAX = -8  # glibc's mallopt parameter


def share_malloc_arena() -> None:
    """Make threads started from now on allocate from glibc's main arena.

    A worker thread otherwise gets its own arena, whose heaps give large activations back to the system
    and fault them in again op after op: measured 5-10 % slower CPU captioning than on the main thread.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)
        except (OSError, AttributeError):  # not glibc
            pass


def release_host_memory() -> None:
    """Give host memory freed by large tensors back to the system.

    glibc keeps it for reuse, so a model quantized layer by layer would otherwise hold about twice its final
    size in resident memory (measured: 1.9 GB for 0.93 GB of int8 weights in the small shape).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def choose_compiler(kind: str, torchair_installed: bool) -> tuple[str | None, str]:
    """The torch.compile backend for the decode step on a device kind, or None and why it decodes eagerly."""
    if kind in ("cpu", "cuda"):
        return "inductor", ""
    if kind == "npu":
        if torchair_installed:
            return "torchair", ""
        return None, "torchair (Ascend's torch.compile backend) is not installed"
    return None, f"torch.compile has no backend acecap trusts on {kind}"


def compile_config(kind: str) -> dict:
    """torch._inductor settings for compiling the decode step on a device kind."""
    if kind == "cpu":
        # Frozen weights are constants inductor can pack for its own AMX / AVX-512 matrix kernels, which
        # autotuning picks where they win: 1.4-1.8x eager for a bf16 decode step at batch 1 on an AMX Xeon.
        return {"freezing": True, "max_autotune": True}
    return {}


def compiler(device: torch.device) -> tuple[object, str]:
    """What to pass torch.compile as backend on this device, or None and why decoding stays eager."""
    name, reason = choose_compiler(device.type, importlib.util.find_spec("torchair") is not None)
    return (_torchair_backend() if name == "torchair" else name), reason


@functools.cache
def _torchair_backend():
    import torchair  # Ascend's graph-mode backend, shipped beside torch_npu

    return torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
