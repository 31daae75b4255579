"""acecap: label music with the ACE-Step Captioner and Transcriber on NPU, GPU or CPU."""

import importlib
import importlib.util
import logging
import os

# Since torch 2.5 `import torch` loads installed device backends itself; a broken CANN install would then
# break `import torch` for everyone. acecap imports torch_npu only when an NPU is used (devices.py).
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# torchao 0.18 (the quant extra, which transformers imports whenever it is installed) registers enums the way
# torch >= 2.12 deprecates: two warnings at import that no acecap user can act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

if importlib.util.find_spec("torch_npu") is not None:  # only where it is installed: this imports torch
    from .devices import guard_torch_npu

    guard_torch_npu()  # before transformers is imported

# The public API, imported on first use: `acecap --version` and `--help` must not wait for torch.
_API = {
    "AudioError": ".audio",
    "Clip": ".audio",
    "load_audio": ".audio",
    "Captioner": ".captioner",
    "Result": ".captioner",
    "Timings": ".captioner",
    "Decoding": ".generate",
}
__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'acecap' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
