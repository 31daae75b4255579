"""acecap: label music with the ACE-Step Captioner and Transcriber on NPU, GPU or CPU."""

import os

# Since torch 2.5 `import torch` loads installed device backends itself; a broken CANN install would then
# break `import torch` for everyone. acecap imports torch_npu only when an NPU is used (devices.py).
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from .devices import guard_torch_npu  # noqa: E402

guard_torch_npu()  # before transformers is imported

from .audio import AudioError, Clip, load_audio  # noqa: E402
from .captioner import Captioner, Result, Timings  # noqa: E402
from .generate import Decoding  # noqa: E402

__all__ = ["AudioError", "Captioner", "Clip", "Decoding", "Result", "Timings", "load_audio"]
__version__ = "0.1.0"
