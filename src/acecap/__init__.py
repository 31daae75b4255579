"""acecap: label music with the ACE-Step Captioner and Transcriber on NPU, GPU or CPU."""

import logging
import os

# Since torch 2.5 `import torch` loads installed device backends itself; a broken CANN install would then
# break `import torch` for everyone. acecap imports torch_npu only when an NPU is used (devices.py).
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

# torchao 0.18 (the quant extra, which transformers imports whenever it is installed) registers enums the way
# torch >= 2.12 deprecates: two warnings at import that no acecap user can act on.
logging.getLogger("torch.utils._pytree").addFilter(lambda record: "is an Enum subclass" not in record.getMessage())

from .devices import guard_torch_npu  # noqa: E402

guard_torch_npu()  # before transformers is imported

from .audio import AudioError, Clip, load_audio  # noqa: E402
from .captioner import Captioner, Result, Timings  # noqa: E402
from .generate import Decoding  # noqa: E402

__all__ = ["AudioError", "Captioner", "Clip", "Decoding", "Result", "Timings", "load_audio"]
__version__ = "0.1.0"
